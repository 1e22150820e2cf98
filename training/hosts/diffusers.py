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

SD 3.x and Flux (rectified flow, a transformer instead of the U-Net) follow ComfyUI's SD3ClipModel / FluxClipModel
and its flow sampling: SD3's context is CLIP-L's and CLIP-G's penultimate layers (no final LN) concatenated,
zero-padded to T5's width and followed by T5-XXL's last layer (at least 77 tokens), its pooled vector CLIP-L's
un-projected pooled output and CLIP-G's projected one; Flux's context is T5's last layer (at least 256 tokens), its
pooled vector CLIP-L's un-projected pooled output. T5 is never masked (ComfyUI's default) and is truncated here at
that minimum length. The model predicts the velocity; SD3 guides with a second, negative pass, Flux-dev gives the
guidance to the model (its guidance embedding) and runs no negative pass. Times are those of ComfyUI's `simple`
scheduler on the model's sampling (comfy_flow_sampling below).

The LoRA starts from the same seeded initialisation as the ComfyUI host (training/lora/trainable.py), is
held by peft's LoRA layers alone (`inject_adapter_in_model`), read and written through peft's state-dict helpers,
and is saved in the pack's kohya form. What differs between families comes from the registry
(training/lora/family.py).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..ddim import DDIMSchedule, ddim_schedule, eps_from_v, eps_from_x0
from ..flow_step import FlowSchedule
from ..host import Cond, Predict
from ..lora.family import (ENCODERS, FAMILIES, PROJECTIONS, T5_PROJECTIONS, Family, attention_path,
                           slot_for_encoder)
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
# ComfyUI's ModelSamplingFlux shift for Flux-dev models: supported_models.Flux sets none, so the class default holds
# (the resolution-dependent shift is ComfyUI's ModelSamplingFlux node, which a graph may add; the headless host
# samples as the plain checkpoint does)
FLUX_SHIFT = 1.15


@dataclass(frozen=True)
class FlowConditioning:
    """What ComfyUI's text-encoder model of a flow family reads from each encoder (sd3_clip.SD3ClipModel,
    flux.FluxClipModel)."""

    clip_tokens: tuple[str, ...]  # CLIPs whose penultimate layers (no final LN) are concatenated, zero-padded to
    #                               T5's width and put before T5's tokens
    pooled: tuple[tuple[str, bool], ...]  # (encoder, projected) pooled outputs concatenated into the pooled vector
    t5_min_tokens: int  # ComfyUI's T5XXLTokenizer min_length: T5 tokens are padded (with id 0) to this length


FLOW_CONDITIONING = {
    "sd3": FlowConditioning(("clip_l", "clip_g"), (("clip_l", False), ("clip_g", True)), 77),
    "flux": FlowConditioning((), (("clip_l", False),), 256),
}


class DiffusersHost:
    """Implements training.host.Host on a diffusers pipeline (whose frozen weights it never changes)."""

    def __init__(self, pipe, rank: int = 16, alpha: float = 16.0, seed: int = 0,
                 encoders: list[str] | None = None, device: torch.device | str | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        self.pipe = pipe
        self.family = family_of(pipe)
        self.spec: Family = FAMILIES[self.family]
        self.flow = self.spec.flow
        # the denoiser: the U-Net of SD 1.x / 2.x / SDXL, the transformer of SD 3.x / Flux
        self.denoiser = pipe.transformer if self.flow else pipe.unet
        self.unet, self.vae = getattr(pipe, "unet", None), pipe.vae
        self.device = torch.device(device) if device is not None else self.denoiser.device
        self.dtype = self.denoiser.dtype
        if self.flow:
            self._init_flow(pipe)
        else:
            self._init_vp(pipe)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in (self.denoiser, self.vae, *(getattr(pipe, m.pipeline) for m in self.spec.members)):
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
            targets = T5_PROJECTIONS if ENCODERS[enc].arch == "t5" else PROJECTIONS
            cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
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

    def _init_vp(self, pipe) -> None:
        """SD 1.x / 2.x / SDXL: ε / v / x0 prediction on the scheduler's ᾱ (DDIM on them)."""
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the pipeline's scheduler")
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.detach().float().cpu().contiguous()
        self._abar = self.alphas_cumprod.to(self.device)

    def _init_flow(self, pipe) -> None:
        """SD 3.x / Flux: velocity prediction on ComfyUI's flow times (no ᾱ); what the conditioning reads."""
        self.prediction_type = "flow"
        self.alphas_cumprod, self._abar = None, None
        self.conditioning = FLOW_CONDITIONING[self.family]
        self.guidance_embeds = bool(self.denoiser.config.get("guidance_embeds", False))
        self.uses_negative_prompt = not self.guidance_embeds  # Flux: one pass, the guidance is an input
        self._sigmas, self._time_scale = comfy_flow_sampling(self.family, pipe.scheduler.config, self.guidance_embeds)
        attrs = {m.encoder: m.pipeline for m in self.spec.members}
        for enc, projected in self.conditioning.pooled:
            te = getattr(pipe, attrs[enc])
            if projected and not hasattr(te, "text_projection"):
                raise PipelineLoadError(f"this {self.spec.name} pipeline's {attrs[enc]} is a {type(te).__name__}; "
                                        f"{self.spec.name} needs CLIPTextModelWithProjection "
                                        f"({ENCODERS[enc].label}'s projected pooled output)")
        t5 = next(getattr(pipe, m.pipeline) for m in self.spec.members if ENCODERS[m.encoder].arch == "t5")
        width = int(self.denoiser.config.joint_attention_dim)
        if int(t5.config.d_model) != width:
            raise PipelineLoadError(f"this {self.spec.name} pipeline's T5 is {t5.config.d_model} wide but its "
                                    f"transformer reads {width}-wide text: not one model's parts")

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

    def sampler_schedule(self, num_steps: int) -> DDIMSchedule | FlowSchedule:
        """The chain's steps: DDIM on the scheduler's ᾱ, or for SD 3.x / Flux the times ComfyUI's `simple`
        scheduler gives the model (its shift), from 1 to 0."""
        if not self.flow:
            return ddim_schedule(self.alphas_cumprod, num_steps)
        return FlowSchedule(simple_times(self._sigmas, num_steps))

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
        h, w = height // self.vae_scale, width // self.vae_scale
        if not self.flow:
            return self.unet.config.in_channels, h, w
        if self.family == "flux" and (h % 2 or w % 2):
            raise ValueError(f"Flux packs 2×2 latent patches: height and width must be multiples of "
                             f"{2 * self.vae_scale}, got {height}×{width}")
        return self.vae.config.latent_channels, h, w

    def _tokens(self, tokenizer, prompts: list[str], encoder: str) -> torch.Tensor:
        """Token ids padded as ComfyUI pads for this encoder, whatever pad token the pipeline's tokenizer names.

        CLIP-L pads with its end token; OpenCLIP-H (SD2) and CLIP-G (SDXL) pad with id 0 ("!"), as their
        diffusers tokenizers do too. Padding positions still pass through the causal encoder, so they matter.
        """
        length = min(tokenizer.model_max_length, self.max_tokens)
        pad = tokenizer.eos_token_id if ENCODERS[encoder].pads_with_end_token else 0
        ids = tokenizer(prompts, truncation=True, max_length=length).input_ids
        return torch.tensor([x + [pad] * (length - len(x)) for x in ids], dtype=torch.long, device=self.device)

    def _t5_tokens(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        """T5 ids as ComfyUI's T5XXLTokenizer gives them: no start token, the end token, padded with 0 to the
        family's minimum length (truncated there: longer prompts would need a length per prompt)."""
        length = self.conditioning.t5_min_tokens
        ids = tokenizer(prompts, truncation=True, max_length=length).input_ids
        if any(len(x) >= length for x in ids):
            log.warning("a prompt has %d or more T5 tokens: truncated to %d (ComfyUI would encode it whole)",
                        length, length)
        return torch.tensor([x + [0] * (length - len(x)) for x in ids], dtype=torch.long, device=self.device)

    def encode(self, prompts: list[str]) -> Cond:
        """One forward per distinct prompt (repeats share it), as the ComfyUI host does."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        if self.flow:
            return {k: v[index] for k, v in self._encode_flow(unique).items()}
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

    def _encode_flow(self, prompts: list[str]) -> Cond:
        """SD 3.x / Flux conditioning as ComfyUI's SD3ClipModel / FluxClipModel compute it (see the module doc)."""
        spec = self.conditioning
        hidden, pooled, t5 = {}, {}, None
        for (te, enc), tok in zip(self.text_encoders, self.tokenizers):
            if ENCODERS[enc].arch == "t5":
                t5 = te(self._t5_tokens(tok, prompts)).last_hidden_state  # final layer norm applied
                continue
            # the text model itself: its pooled output is the un-projected one (final LN at the end token)
            out = getattr(te, "text_model", te)(self._tokens(tok, prompts, enc), output_hidden_states=True)
            hidden[enc] = out.hidden_states[-2]
            pooled[enc] = out.pooler_output
        parts = [pooled[enc] if not projected else self._projection(enc)(pooled[enc])
                 for enc, projected in spec.pooled]
        context = t5
        if spec.clip_tokens:
            clip = torch.cat([hidden[enc] for enc in spec.clip_tokens], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            context = torch.cat([clip.to(t5.dtype), t5], dim=-2)
        return {"cross_attn": context.float(), "pooled": torch.cat([p.float() for p in parts], dim=-1)}

    def _projection(self, encoder: str) -> torch.nn.Module:
        return next(te for te, enc in self.text_encoders if enc == encoder).text_projection

    def _time_ids(self, batch: int, height: int, width: int) -> torch.Tensor:
        """SDXL's size conditioning: original size, crop (0, 0), target size, as ComfyUI sets them by default."""
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=self.device)
        return ids.expand(batch, 6)

    @contextlib.contextmanager
    def predictor(self, cond: Cond, uncond: Cond, guidance: float) -> Iterator[Predict]:
        batch = cond["cross_attn"].shape[0]
        if uncond["cross_attn"].shape[0] != batch:
            uncond = {k: v.expand(batch, *v.shape[1:]) for k, v in uncond.items()}
        yield self._flow_predict(cond, uncond, guidance) if self.flow else self._unet_predict(cond, uncond, guidance)

    def _unet_predict(self, cond: Cond, uncond: Cond, guidance: float) -> Predict:
        """ε̂ of the U-Net with classifier-free guidance; v / x0 predictions converted to ε."""
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

        return predict

    def _flow_predict(self, cond: Cond, uncond: Cond, guidance: float) -> Predict:
        """The velocity at flow time t: SD3 with classifier-free guidance (equal to ComfyUI's guidance on the
        denoised image, since v = (x − x0)/t is affine in x0); Flux-dev with the guidance as the model's input and
        no negative pass (its uncond is never read)."""
        guided = not self.guidance_embeds and guidance != 1.0
        ctx = torch.cat([uncond["cross_attn"], cond["cross_attn"]]) if guided else cond["cross_attn"]
        pooled = torch.cat([uncond["pooled"], cond["pooled"]]) if guided else cond["pooled"]
        ctx, pooled = ctx.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x, t = x.to(self.device), t.to(self.device).float()
            xin, tin = (torch.cat([x, x]), torch.cat([t, t])) if guided else (x, t)
            if self.family == "flux":
                g = torch.full_like(tin, guidance) if self.guidance_embeds else None
                out = self._flux_forward(xin.to(self.dtype), tin, ctx, pooled, g)
            else:
                out = self.denoiser(hidden_states=xin.to(self.dtype), encoder_hidden_states=ctx,
                                    pooled_projections=pooled, timestep=(tin * self._time_scale).to(self.dtype),
                                    return_dict=False)[0]
            out = out.float()
            if not guided:
                return out
            v_u, v_c = out.chunk(2)
            return v_u + guidance * (v_c - v_u)

        return predict

    def _flux_forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, pooled: torch.Tensor,
                      guidance: torch.Tensor | None) -> torch.Tensor:
        """FluxTransformer2DModel on (B, C, h, w) latents: 2×2 patches packed into tokens with their (0, row, col)
        position ids and zero text ids, as diffusers' FluxPipeline and ComfyUI's Flux model both do."""
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device)
        img_ids[..., 1] = torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] = torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(ctx.shape[1], 3, device=x.device)
        out = self.denoiser(hidden_states=tokens, encoder_hidden_states=ctx, pooled_projections=pooled,
                            timestep=(t * self._time_scale).to(x.dtype), img_ids=img_ids.reshape(-1, 3),
                            txt_ids=txt_ids, guidance=None if guidance is None else guidance.to(x.dtype),
                            return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        upcast = vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
        shift = vae.config.get("shift_factor")  # SD 3.x / Flux VAEs: ComfyUI's latent format shift
        with torch.no_grad():
            z = latents.to(self.device) / vae.config.scaling_factor
            if shift is not None:
                z = z + shift
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


# -- ComfyUI's flow sampling (comfy/model_sampling.py, comfy/samplers.py), without importing ComfyUI -------------
def comfy_flow_sampling(family: str, scheduler_config: dict, guidance_embeds: bool) -> tuple[torch.Tensor, float]:
    """(sigma table, model-time multiplier) of ComfyUI's model_sampling for an SD 3.x / Flux model.

    SD 3.x: ModelSamplingDiscreteFlow with the model's shift (3.0, which the diffusers scheduler config carries),
    called at t·1000. Flux-dev (guidance embedding): ModelSamplingFlux with its default shift, called at t (its
    transformer multiplies by 1000 itself). Flux-schnell (no guidance embedding): ModelSamplingDiscreteFlow with
    shift 1 and multiplier 1, as supported_models.FluxSchnell sets them.
    """
    if family == "sd3":
        return discrete_flow_sigmas(float(scheduler_config.get("shift", 3.0)), 1000.0), 1000.0
    if family == "flux":
        return (flux_sigmas(FLUX_SHIFT), 1.0) if guidance_embeds else (discrete_flow_sigmas(1.0, 1.0), 1.0)
    raise ValueError(f"{family} is not a flow-matching family")


def discrete_flow_sigmas(shift: float, multiplier: float, timesteps: int = 1000) -> torch.Tensor:
    """ModelSamplingDiscreteFlow.sigmas, computed as ComfyUI computes them (fp32)."""
    t = (torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier / multiplier
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


def flux_sigmas(shift: float, timesteps: int = 10000) -> torch.Tensor:
    """ModelSamplingFlux.sigmas, computed as ComfyUI computes them (fp32)."""
    t = torch.arange(1, timesteps + 1, 1) / timesteps
    return math.exp(shift) / (math.exp(shift) + (1 / t - 1) ** 1.0)


def simple_times(sigmas: torch.Tensor, num_steps: int) -> torch.Tensor:
    """ComfyUI's `simple` scheduler on a sigma table: N evenly spaced entries from the top, then 0 (fp32)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    stride = len(sigmas) / num_steps
    return torch.tensor([float(sigmas[-(1 + int(x * stride))]) for x in range(num_steps)] + [0.0],
                        dtype=torch.float32)
