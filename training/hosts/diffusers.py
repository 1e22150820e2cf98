"""The headless host: the training core on a diffusers Stable Diffusion pipeline, with a peft LoRA on the
text encoder(s). Used by the command-line trainer (train.py), alone or under torchrun / accelerate.

It computes what the ComfyUI host computes, so a run can move between them (tests check parity on the same
weights, SD1, SD2 and SDXL): the same tokenisation (77 tokens, padded as ComfyUI pads each encoder), the same
encoder outputs (SD1: last layer; SD2: penultimate layer, normalised; SDXL: penultimate layers of CLIP-L and
CLIP-G concatenated, un-normalised, CLIP-G's projected pooled output and the size conditioning ComfyUI builds
from the latent size), classifier-free guidance as ε_u + g·(ε_c − ε_u) (equal to ComfyUI's guidance on the
denoised image, which is affine in ε), and v-prediction converted to ε. The empty negative prompt is encoded
like any other (ComfyUI does not zero it, whatever SDXL's force_zeros_for_empty_prompt says).
Differences: prompts longer than 75 tokens are truncated here (ComfyUI encodes them in 77-token chunks).

The LoRA starts from the same seeded initialisation as the ComfyUI host (training/lora/trainable.py), is
held by peft's LoRA layers alone (`inject_adapter_in_model`), read and written through peft's state-dict helpers,
and is saved in the pack's kohya form. What differs between families comes from the registry
(training/lora/family.py).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator

import torch

from ..ddim import eps_from_v, eps_from_x0
from ..host import Cond, Predict
from ..lora.family import ENCODERS, FAMILIES, PROJECTIONS, Family, attention_path, slot_for_encoder
from ..lora.family_detect import describe_lora
from ..lora.keys import parse_state_dict
from ..lora.trainable import TrainableLora, fit_lora
from ..lora.types import LoraModule, LoraSet
from ..lora.write import kohya_state_dict
from .pipeline import PipelineLoadError, family_of, load_pipeline  # noqa: F401 (the CLI and tests load pipelines from here)

log = logging.getLogger(__name__)

ADAPTER = "texforce"
# ComfyUI's default SDXL size conditioning is the latent size × 8, whatever the VAE (comfy.samplers.encode_model_conds)
COMFY_LATENT_SCALE = 8


class DiffusersHost:
    """Implements training.host.Host on a diffusers pipeline (whose frozen weights it never changes)."""

    def __init__(self, pipe, rank: int = 16, alpha: float = 16.0, seed: int = 0,
                 encoders: list[str] | None = None, device: torch.device | str | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        self.pipe = pipe
        self.family = family_of(pipe)
        self.spec: Family = FAMILIES[self.family]
        self.device = torch.device(device) if device is not None else pipe.unet.device
        self.unet, self.vae = pipe.unet, pipe.vae
        self.dtype = self.unet.dtype
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the pipeline's scheduler")
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.detach().float().cpu().contiguous()
        self._abar = self.alphas_cumprod.to(self.device)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in (self.unet, self.vae, *(getattr(pipe, m.pipeline) for m in self.spec.members)):
            module.requires_grad_(False).eval()

        names = [(m.pipeline, m.encoder) for m in self.spec.members]
        present = [enc for _, enc in names]
        wanted = present if encoders is None else list(encoders)
        unknown = [e for e in wanted if e not in present]
        if unknown or not wanted:
            raise ValueError(f"this {self.family.upper()} pipeline has text encoder(s) {present}; cannot train {wanted}")
        self.encoders = sorted(e for e in present if e in wanted)  # as the ComfyUI host lists them
        self.text_encoders = [(getattr(pipe, attr), enc) for attr, enc in names]
        # diffusers names each text encoder's tokenizer alike: text_encoder_2 -> tokenizer_2
        self.tokenizers = [getattr(pipe, attr.replace("text_encoder", "tokenizer")) for attr, _ in names]
        self.max_tokens = int(pipe.text_encoder.config.max_position_embeddings)  # 77

        # peft LoRA layers on q/k/v/out of every layer of each trained encoder
        self._layers: dict[tuple[str, str], torch.nn.Module] = {}
        self._peft: list[tuple[torch.nn.Module, dict[str, tuple[str, str]]]] = []  # (encoder, peft module -> key)
        shapes = {}
        for te, _ in self.text_encoders:
            if ADAPTER in (getattr(te, "peft_config", None) or {}):
                raise ValueError("this pipeline already carries a TexForce LoRA (another DiffusersHost was built on "
                                 "it); load the pipeline again for a new host")
        for te, enc in self.text_encoders:
            if enc not in self.encoders:
                continue
            cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(PROJECTIONS), lora_dropout=0.0,
                             init_lora_weights=True)
            inject_adapter_in_model(cfg, te, adapter_name=ADAPTER)
            keys = {}
            for name, module in te.named_modules():
                path = attention_path(name)
                if path and hasattr(module, "lora_A"):
                    key = keys[name] = (slot_for_encoder(enc, present), path)
                    self._layers[key] = module
                    shapes[key] = tuple(module.base_layer.weight.shape)
                    # fp32 LoRA on an fp16/bf16 model (peft casts the input to the adapter's dtype)
                    module.lora_A[ADAPTER].float()
                    module.lora_B[ADAPTER].float()
            self._peft.append((te, keys))
        dropped = self._dropped_layer_shapes(shapes) if self.spec.diffusers_truncated else {}
        self.rank, self.alpha = int(rank), float(alpha)
        self._shapes = {**shapes, **dropped}
        # The seeded initialisation of the ComfyUI host, so both hosts start from the same LoRA.
        init = TrainableLora(self._shapes, rank=rank, alpha=alpha, seed=seed).to_lora_set()
        # plain parameters for the LoRA of a layer diffusers' encoder lacks; peft's layers hold all the others
        self._dropped = {key: (torch.nn.Parameter(init.modules[key].down.to(self.device, copy=True)),
                               torch.nn.Parameter(init.modules[key].up.to(self.device, copy=True))) for key in dropped}
        self._set({key: (m.down, m.up) for key, m in init.modules.items()})
        weights = {**{key: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
                      for key, layer in self._layers.items()}, **self._dropped}
        self.keys = sorted(self._shapes)  # the ComfyUI host's order, so optimizer states move between hosts
        self._params = [weights[k][0] for k in self.keys] + [weights[k][1] for k in self.keys]
        for p in self._params:
            p.requires_grad_(True)

    def _dropped_layer_shapes(self, shapes: dict[tuple[str, str], tuple[int, int]]) -> dict:
        """SD2: LoRA keys for OpenCLIP-H's last layer, which diffusers' SD2 text encoder does not have.

        ComfyUI loads all of OpenCLIP-H's layers and reads the penultimate one (final LN applied); diffusers'
        SD2 text encoder ends at that layer (its hub folders have 23 of 24 layers; the single-file converter
        drops the last). The ComfyUI host trains a LoRA on every layer it has, so the LoRA of that last layer is
        kept here too, as plain parameters nothing reads: both hosts then have the same keys, initialisation,
        optimizer layout and files (that LoRA never gets a gradient on either host), and resume across hosts.
        """
        te = self.text_encoders[0][0]
        last = int(te.config.num_hidden_layers)
        return {(slot, path.replace(f"layers.{last - 1}.", f"layers.{last}.")): shape
                for (slot, path), shape in shapes.items() if f"layers.{last - 1}." in path}

    # -- LoRA state: peft's own state dicts, re-keyed as the pack's LoRA files ---------------------------------
    def _set(self, weights: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]) -> None:
        from peft import set_peft_model_state_dict

        for te, keys in self._peft:
            sd = {}
            for name, key in keys.items():
                sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = weights[key]
            unexpected = set_peft_model_state_dict(te, sd, adapter_name=ADAPTER).unexpected_keys
            if unexpected:
                raise RuntimeError(f"peft did not place the LoRA weights {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for key, (down, up) in self._dropped.items():
                down.copy_(weights[key][0])
                up.copy_(weights[key][1])

    def _lora_set(self) -> LoraSet:
        from peft import get_peft_model_state_dict

        lora = LoraSet(source="trained", format="kohya")
        for te, keys in self._peft:
            sd = get_peft_model_state_dict(te, adapter_name=ADAPTER)
            for name, key in keys.items():
                lora.modules[key] = LoraModule(down=sd[f"{name}.lora_A.weight"].detach().float().cpu(),
                                               up=sd[f"{name}.lora_B.weight"].detach().float().cpu(), alpha=self.alpha)
        for key, (down, up) in self._dropped.items():
            lora.modules[key] = LoraModule(down=down.detach().float().cpu(), up=up.detach().float().cpu(),
                                           alpha=self.alpha)
        return lora

    def set_schedule(self, timesteps: torch.Tensor) -> None:
        """Nothing to do: the pipeline's denoiser takes the timestep of each call."""

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._params)

    def lora_state(self) -> dict[str, torch.Tensor]:
        return kohya_state_dict(self._lora_set())

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        lora = parse_state_dict(state, source="checkpoint")
        self._set(fit_lora(lora, self._shapes, self.rank, self.alpha,
                           lambda: describe_lora(self._lora_set(), family=self.family)))

    @contextlib.contextmanager
    def lora_enabled(self, enabled: bool) -> Iterator[None]:
        layers = list(self._layers.values())
        before = [not layer.disable_adapters for layer in layers]
        try:
            for layer in layers:
                layer.enable_adapters(enabled)
            yield
        finally:
            for layer, on in zip(layers, before):
                layer.enable_adapters(on)
            for p in self._params:  # peft's enable_adapters(False) turns requires_grad off
                p.requires_grad_(True)

    # -- Host interface ------------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.unet.config.in_channels, height // self.vae_scale, width // self.vae_scale

    def _tokens(self, tokenizer, prompts: list[str], encoder: str) -> torch.Tensor:
        """Token ids padded as ComfyUI pads for this encoder, whatever pad token the pipeline's tokenizer names.

        CLIP-L pads with its end token; OpenCLIP-H (SD2) and CLIP-G (SDXL) pad with id 0 ("!"), as their
        diffusers tokenizers do too. Padding positions still pass through the causal encoder, so they matter.
        """
        length = min(tokenizer.model_max_length, self.max_tokens)
        pad = tokenizer.eos_token_id if ENCODERS[encoder].pads_with_end_token else 0
        ids = tokenizer(prompts, truncation=True, max_length=length).input_ids
        return torch.tensor([x + [pad] * (length - len(x)) for x in ids], dtype=torch.long, device=self.device)

    def encode(self, prompts: list[str]) -> Cond:
        """One forward per distinct prompt (repeats share it), as the ComfyUI host does."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        if self.spec.pooled is None:
            # SD1: the last layer, final LN applied. SD2: diffusers' text encoder ends at OpenCLIP-H's penultimate
            # layer, so its last_hidden_state is ComfyUI's SD2 conditioning (penultimate layer, final LN applied).
            te, enc = self.text_encoders[0]
            hidden = te(self._tokens(self.tokenizers[0], unique, enc)).last_hidden_state
            return {"cross_attn": hidden.float()[index]}
        # SDXL: the penultimate layers of CLIP-L and CLIP-G without the final LN, concatenated; pooled = CLIP-G's
        # projected pooled output (final LN at its end token, then text_projection), as ComfyUI's SDXLClipModel.
        parts, pooled = [], None
        for (te, enc), tok in zip(self.text_encoders, self.tokenizers):
            out = te(self._tokens(tok, unique, enc), output_hidden_states=True)
            parts.append(out.hidden_states[-2])
            if enc == self.spec.pooled:
                pooled = out.text_embeds
        return {"cross_attn": torch.cat(parts, dim=-1).float()[index], "pooled": pooled.float()[index]}

    def _time_ids(self, batch: int, height: int, width: int) -> torch.Tensor:
        """SDXL's size conditioning: original size, crop (0, 0), target size, as ComfyUI sets them by default."""
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=self.device)
        return ids.expand(batch, 6)

    @contextlib.contextmanager
    def predictor(self, cond: Cond, uncond: Cond, guidance: float) -> Iterator[Predict]:
        batch = cond["cross_attn"].shape[0]
        if uncond["cross_attn"].shape[0] != batch:
            uncond = {k: v.expand(batch, *v.shape[1:]) for k, v in uncond.items()}
        guided = guidance != 1.0
        ctx = torch.cat([uncond["cross_attn"], cond["cross_attn"]]) if guided else cond["cross_attn"]
        ctx = ctx.to(self.device, self.dtype)
        pooled = None
        if self.spec.pooled:
            pooled = torch.cat([uncond["pooled"], cond["pooled"]]) if guided else cond["pooled"]
            pooled = pooled.to(self.device, self.dtype)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x = x.to(self.device)
            t = t.to(self.device)
            xin, tin = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
            added = None
            if pooled is not None:
                h, w = x.shape[-2] * COMFY_LATENT_SCALE, x.shape[-1] * COMFY_LATENT_SCALE
                added = {"text_embeds": pooled, "time_ids": self._time_ids(xin.shape[0], h, w).to(self.dtype)}
            out = self.unet(xin.to(self.dtype), tin, encoder_hidden_states=ctx, added_cond_kwargs=added,
                            return_dict=False)[0].float()
            abar = self._abar[tin]
            if self.prediction_type == "v_prediction":
                out = eps_from_v(xin.float(), out, abar)
            elif self.prediction_type == "sample":
                out = eps_from_x0(xin.float(), out, abar)
            if not guided:
                return out
            eps_u, eps_c = out.chunk(2)
            return eps_u + guidance * (eps_c - eps_u)

        yield predict

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        with torch.no_grad():
            z = latents.to(self.device) / vae.config.scaling_factor
            if upcast:  # SDXL's VAE overflows in fp16
                images = vae.float().decode(z.float(), return_dict=False)[0]
                vae.to(torch.float16)
            else:
                images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        with torch.enable_grad():
            yield
