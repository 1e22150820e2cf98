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
held by peft's LoRA layers (`inject_adapter_in_model`), and is saved in the pack's kohya form.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Iterator

import torch

from ..ddim import eps_from_v, eps_from_x0
from ..host import Cond, Predict
from ..lora.keys import parse_state_dict, slot_for_encoder
from ..lora.trainable import TrainableLora

log = logging.getLogger(__name__)

ADAPTER = "texforce"
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]
# transformers 4 names CLIP layers text_model.encoder.layers.N..., transformers 5 encoder.layers.N...
_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj$")
FAMILIES = ("sd1", "sd2", "sdxl")
# ComfyUI's default SDXL size conditioning is the latent size × 8, whatever the VAE (comfy.samplers.encode_model_conds)
COMFY_LATENT_SCALE = 8


class PipelineLoadError(RuntimeError):
    """A model that cannot be loaded as a Stable Diffusion pipeline; the message says what to pass instead."""


def family_of(pipe) -> str:
    """sd1 / sd2 / sdxl from the pipeline's components (SD2's OpenCLIP-H uses gelu, OpenAI's CLIP-L quick_gelu).

    SDXL needs both encoders with CLIP-G's projection (its pooled output conditions the U-Net); the SDXL refiner
    (CLIP-G only, aesthetic-score conditioning) is refused, as the ComfyUI host has no refiner path either.
    """
    if getattr(pipe, "text_encoder_2", None) is not None:
        if getattr(pipe, "text_encoder", None) is None:
            raise PipelineLoadError("this SDXL pipeline has no CLIP-L text encoder (an SDXL refiner?): TexForce "
                                    "trains SD 1.x, SD 2.x and SDXL base models")
        if not hasattr(pipe.text_encoder_2, "text_projection"):
            raise PipelineLoadError(f"this SDXL pipeline's text_encoder_2 is a {type(pipe.text_encoder_2).__name__}; "
                                    "SDXL needs CLIPTextModelWithProjection (CLIP-G's pooled output)")
        return "sdxl"
    act = getattr(pipe.text_encoder.config, "hidden_act", "quick_gelu")
    return "sd2" if act == "gelu" else "sd1"


def _encoder_names(family: str) -> list[tuple[str, str]]:
    """(pipeline attribute, ComfyUI encoder name) per text encoder of the family."""
    return {"sd1": [("text_encoder", "clip_l")], "sd2": [("text_encoder", "clip_h")],
            "sdxl": [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")]}[family]


def load_pipeline(model: str | Path, config: str | Path | None = None, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu"):
    """A diffusers folder, or a single .safetensors/.ckpt checkpoint through diffusers' single-file loader.

    `config`: a diffusers folder (or hub id) describing the single file's architecture; needed offline, since
    otherwise diffusers fetches the default config of the detected model type from the hub.
    """
    import warnings

    import diffusers  # heavy; only the headless trainer needs it

    path = Path(model)
    if not path.exists():
        raise PipelineLoadError(f"model {str(model)!r} does not exist: pass a diffusers folder (with model_index.json) "
                                "or a single-file .safetensors checkpoint")
    try:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; torch_dtype works in every supported version
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = _from_path(diffusers, path, config, dtype)
    except PipelineLoadError:
        raise
    except Exception as e:  # diffusers' own messages are long; keep them, and say what to try
        hint = "" if config else (" A single-file checkpoint needs its architecture config: pass --model-config "
                                  "<diffusers folder or hub id> when offline.")
        raise PipelineLoadError(f"could not load {path} as a Stable Diffusion pipeline: {e}.{hint}") from e
    if not hasattr(pipe, "unet") or not hasattr(pipe, "text_encoder"):
        raise PipelineLoadError(f"{path} loaded as {type(pipe).__name__}, which is not a Stable Diffusion (1.x, 2.x, "
                                "XL) pipeline with a U-Net and CLIP text encoder(s)")
    return pipe.to(device)


def _from_path(diffusers, path: Path, config: str | Path | None, dtype: torch.dtype):
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PipelineLoadError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder")
        return diffusers.DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype, safety_checker=None,
                                                           requires_safety_checker=False)
    if _single_file_is_sdxl(path):
        cls, extra = diffusers.StableDiffusionXLPipeline, {}
    else:
        cls, extra = diffusers.StableDiffusionPipeline, {"safety_checker": None, "requires_safety_checker": False}
    kw = {"config": str(config), "local_files_only": Path(str(config)).is_dir()} if config else {}
    return cls.from_single_file(str(path), torch_dtype=dtype, **kw, **extra)


def _single_file_is_sdxl(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return any(k.startswith("conditioner.embedders.1.") for k in f.keys())


class DiffusersHost:
    """Implements training.host.Host on a diffusers pipeline (whose frozen weights it never changes)."""

    def __init__(self, pipe, rank: int = 16, alpha: float = 16.0, seed: int = 0,
                 encoders: list[str] | None = None, device: torch.device | str | None = None):
        from peft import LoraConfig, inject_adapter_in_model

        self.pipe = pipe
        self.family = family_of(pipe)
        self.device = torch.device(device) if device is not None else pipe.unet.device
        self.unet, self.vae = pipe.unet, pipe.vae
        self.dtype = self.unet.dtype
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r} in the pipeline's scheduler")
        self.alphas_cumprod = pipe.scheduler.alphas_cumprod.detach().float().cpu().contiguous()
        self._abar = self.alphas_cumprod.to(self.device)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        for module in (self.unet, self.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
            if module is not None:
                module.requires_grad_(False).eval()

        names = _encoder_names(self.family)
        present = [enc for _, enc in names]
        wanted = present if encoders is None else list(encoders)
        unknown = [e for e in wanted if e not in present]
        if unknown or not wanted:
            raise ValueError(f"this {self.family.upper()} pipeline has text encoder(s) {present}; cannot train {wanted}")
        self.encoders = sorted(e for e in present if e in wanted)  # as the ComfyUI host lists them
        self.text_encoders = [(getattr(pipe, attr), enc) for attr, enc in names]
        self.tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if self.family == "sdxl" else [])
        self.max_tokens = int(pipe.text_encoder.config.max_position_embeddings)  # 77

        # peft LoRA layers on q/k/v/out of every layer of each trained encoder
        self._layers: dict[tuple[str, str], torch.nn.Module] = {}
        shapes = {}
        for te, _ in self.text_encoders:
            if ADAPTER in (getattr(te, "peft_config", None) or {}):
                raise ValueError("this pipeline already carries a TexForce LoRA (another DiffusersHost was built on "
                                 "it); load the pipeline again for a new host")
        for te, enc in self.text_encoders:
            if enc not in self.encoders:
                continue
            cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGET_MODULES, lora_dropout=0.0,
                             init_lora_weights=True)
            inject_adapter_in_model(cfg, te, adapter_name=ADAPTER)
            for name, module in te.named_modules():
                m = _LAYER.search(name)
                if m and hasattr(module, "lora_A"):
                    key = (slot_for_encoder(enc, present),
                           f"text_model.encoder.layers.{m.group(1)}.self_attn.{m.group(2)}_proj")
                    self._layers[key] = module
                    shapes[key] = tuple(module.base_layer.weight.shape)
                    # fp32 LoRA on an fp16/bf16 model (peft casts the input to the adapter's dtype)
                    module.lora_A[ADAPTER].float()
                    module.lora_B[ADAPTER].float()
        dropped = self._dropped_layer_shapes(shapes) if "clip_h" in self.encoders else {}
        # The seeded initialisation of the ComfyUI host, so both hosts start from the same LoRA.
        self._staging = TrainableLora({**shapes, **dropped}, rank=rank, alpha=alpha, seed=seed)
        # (down, up) per LoRA key: peft's lora_A / lora_B, or plain parameters for a dropped layer's LoRA
        self._weights: dict[tuple[str, str], tuple[torch.nn.Parameter, torch.nn.Parameter]] = {
            key: (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight) for key, layer in self._layers.items()}
        for i, key in enumerate(self._staging.keys):
            if key in dropped:
                self._weights[key] = (torch.nn.Parameter(self._staging.down[i].detach().to(self.device, copy=True)),
                                      torch.nn.Parameter(self._staging.up[i].detach().to(self.device, copy=True)))
        self._push(self._staging)
        self.rank, self.alpha = int(rank), float(alpha)
        self._params = ([self._weights[k][0] for k in self._staging.keys]
                        + [self._weights[k][1] for k in self._staging.keys])
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

    # -- LoRA state ------------------------------------------------------------------------------
    def _push(self, lora: TrainableLora) -> None:
        with torch.no_grad():
            for i, key in enumerate(lora.keys):
                down, up = self._weights[key]
                down.copy_(lora.down[i])
                up.copy_(lora.up[i])

    def _pull(self) -> TrainableLora:
        with torch.no_grad():
            for i, key in enumerate(self._staging.keys):
                down, up = self._weights[key]
                self._staging.down[i].copy_(down.float().cpu())
                self._staging.up[i].copy_(up.float().cpu())
        return self._staging

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self._params)

    def lora_state(self) -> dict[str, torch.Tensor]:
        return self._pull().kohya_state()

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        self._staging.load_lora_set(parse_state_dict(state, source="checkpoint"))
        self._push(self._staging)

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
        pad = tokenizer.eos_token_id if encoder == "clip_l" else 0
        ids = tokenizer(prompts, truncation=True, max_length=length).input_ids
        return torch.tensor([x + [pad] * (length - len(x)) for x in ids], dtype=torch.long, device=self.device)

    def encode(self, prompts: list[str]) -> Cond:
        """One forward per distinct prompt (repeats share it), as the ComfyUI host does."""
        unique = list(dict.fromkeys(prompts))
        index = torch.tensor([unique.index(p) for p in prompts], device=self.device)
        if self.family != "sdxl":
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
            if enc == "clip_g":
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
        if self.family == "sdxl":
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
