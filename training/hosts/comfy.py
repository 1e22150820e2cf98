"""The ComfyUI host: trains a LoRA on the text encoder of the CLIP the graph loaded, through ComfyUI's own calls.

What makes gradients flow inside ComfyUI (DESIGN.md §5), all on clones so the user's objects stay as they were:
- every node runs under inference mode, so the frozen weights are inference tensors that autograd cannot
  save: during the training pass the U-Net's parameters are swapped for frozen aliases of the same storage
  (no copy; restored afterwards), and the CLIP's comfy-op weights get weight wrappers returning detached
  copies, which autograd keeps as recipes, not copies (`WeightCopies`: T5-XXL's are 19 GB a forward);
- the LoRA itself is a weight wrapper on q/k/v/out of every CLIP layer (q/k/v/o of every T5 block on SD 3.x and
  Flux): W + (α/r)·B·A;
- `CLIPLayer.forward` and T5's attention and feed-forward layers add residuals in place, which breaks backward:
  out-of-place forwards are swapped in per instance for the training pass and restored afterwards (the CLIP
  module is shared by all clones); Flux's transformer blocks do the same in many places, so its training pass
  saves copies of the activations backward needs (`_copies_of_saved_activations`) instead;
- the U-Net is called through `comfy.samplers.sampling_function`, as ComfyUI's samplers do, so cfg functions,
  model_function_wrapper and transformer patches the user put on the MODEL are honoured, and SDXL's pooled
  and size conditioning are built by the model's own `extra_conds`; Flux's distilled guidance goes into its
  conditioning (as ComfyUI's FluxGuidance node puts it) with no negative pass;
- off the CPU, ComfyUI's model management offloads the VAE and the reward models for the training pass (they come
  back for sampling on their own).
"""
from __future__ import annotations

import contextlib
import logging
import math
import types
import weakref
from typing import Iterator

import torch
import torch.utils.checkpoint

import comfy.clip_model
import comfy.ldm.flux.model
import comfy.text_encoders.t5
import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.sampler_helpers
import comfy.samplers

from ..ddim import DDIMSchedule, abar_from_sigma, ddim_schedule, eps_from_denoised_k, sigma_from_abar, vp_to_k
from ..flow_step import FlowSchedule, velocity_from_denoised
from ..host import Cond, Predict
from ..lora.family import (ENCODER_LABELS, FAMILIES, attention_path, comfy_encoder_module, encoders_label,
                           family_label, family_names, family_of_clip, family_of_comfy_config, listed,
                           slot_for_encoder)
from ..lora.keys import parse_state_dict
from ..lora.trainable import TrainableLora
from ..memory_plan import PlanInputs, T5EncoderSpec, TextEncoderSpec, TransformerSpec, UNetSpec

log = logging.getLogger(__name__)
# ComfyUI attention functions that keep O(tokens) for backward (the others keep softmax maps; memory_plan.py)
EFFICIENT_ATTENTION = ("attention_pytorch", "attention_xformers", "attention_flash", "attention_sage")


class WeightCopies:
    """The text encoders' per-forward weight copies, which autograd need not keep.

    ComfyUI's ops copy a weight that has a weight function (every CLIP weight here: detached, or W + ΔW) or that is
    stored in another dtype than it computes in, and a linear layer saves the weight it used for its backward: an
    encoder forward with gradient would keep a copy of all its weights (T5-XXL: 19 GB in fp32, per prompt). Inside
    `recomputed()`, autograd keeps instead a recipe for each copy a wrapper handed out, and backward casts the
    stored weight again (and adds the LoRA's current ΔW, which does not change before the step): the same values,
    one layer's copy alive at a time."""

    def __init__(self):
        self._made: dict[int, tuple[weakref.ref, object]] = {}  # storage address -> (the copy, its recipe)
        self._active = False

    def made(self, out: torch.Tensor, recipe) -> torch.Tensor:
        """Note that `out` can be made again by `recipe()` (only inside `recomputed()`)."""
        if self._active:
            self._made[out.untyped_storage().data_ptr()] = (weakref.ref(out), recipe)
        return out

    def _pack(self, t: torch.Tensor):
        """A recipe for `t` when it is a copy a wrapper made or a view of one (a linear saves W's transpose)."""
        hit = self._made.get(t.untyped_storage().data_ptr())
        out = hit[0]() if hit is not None else None
        if out is None:  # not a copy (a copy alive keeps its storage, so the address is its own)
            return t
        recipe = hit[1]
        if t is out:
            return recipe
        size, stride, offset = t.size(), t.stride(), t.storage_offset() - out.storage_offset()
        return lambda: recipe().as_strided(size, stride, offset)

    @staticmethod
    def _unpack(x):
        return x if isinstance(x, torch.Tensor) else x()

    @contextlib.contextmanager
    def recomputed(self) -> Iterator[None]:
        self._active = True
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._active = False
            self._made.clear()


def _cast(stored: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The stored weight as ComfyUI's ops hand it to weight functions: on the device, in the compute dtype."""
    w = stored.to(device=device, dtype=dtype)
    return w.dequantize() if hasattr(w, "dequantize") and type(w) is not torch.Tensor else w


class _FrozenWeight:
    """Identity wrapper returning the weight detached, so that the frozen model is usable in autograd."""

    def __init__(self, module: torch.nn.Module, name: str, copies: WeightCopies):
        self.module, self.name, self.copies = module, name, copies

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        # the recipe holds no tensor (holding `w` would keep the copy): it reads the module's weight when called
        module, name, device, dtype = self.module, self.name, w.device, w.dtype
        return self.copies.made(w.detach(), lambda: _cast(getattr(module, name), device, dtype).detach())


def _wrap_all(patcher: comfy.model_patcher.ModelPatcher, copies: WeightCopies, skip: set[str] = frozenset()) -> None:
    """Identity (detach) wrappers on every comfy-op weight and bias, so the frozen model is usable in autograd."""
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for param in ("weight", "bias"):
            key = f"{name}.{param}"
            if getattr(module, param, None) is not None and key not in skip:
                patcher.add_weight_wrapper(key, _FrozenWeight(module, param, copies))


def _alias_parameters(module: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Parameter]]:
    """Swap every parameter for a frozen alias of the same storage (no copy), until _restore_parameters.

    ComfyUI loads weights under inference mode; autograd cannot save inference tensors for backward, and
    U-Net parameters keep requires_grad=True. The alias is a normal tensor with requires_grad=False, so the
    U-Net is differentiable with respect to its input and conditioning only, at no per-call cost (weight
    wrappers would copy every weight on every call).
    """
    swapped = []
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            alias = torch.empty(0, dtype=p.dtype, device=p.device).set_(
                p.untyped_storage(), p.storage_offset(), p.size(), p.stride())
            mod._parameters[name] = torch.nn.Parameter(alias, requires_grad=False)
            swapped.append((mod, name, p))
    return swapped


def _restore_parameters(swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]]) -> None:
    for mod, name, p in swapped:
        mod._parameters[name] = p


def _checkpoint_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Recompute each U-Net block during backward instead of keeping its activations (until _restore_blocks).

    The training pass back-propagates through the whole U-Net to reach the conditioning; checkpointing keeps one
    tensor per block instead of every attention map and norm in it, for about one more forward per backward.
    Non-reentrant checkpointing, as ComfyUI's own LoRA trainer uses: the conditioning is not a block input's
    leaf, and it still gets its gradient. Not for blocks that add residuals in place (Flux's): the recomputation
    would read tensors its own additions changed (the host turns checkpointing off for them).
    """
    stages = [*getattr(unet, "input_blocks", []), *([unet.middle_block] if hasattr(unet, "middle_block") else []),
              *getattr(unet, "output_blocks", [])]
    # ComfyUI runs a stage's layers one by one (forward_timestep_embed), so the layers are what gets wrapped;
    # transformers (SD 3.x's MMDiT, Flux) run their blocks directly
    blocks = [layer for stage in stages for layer in stage] + [
        block for name in ("joint_blocks", "double_blocks", "single_blocks") for block in getattr(unet, name, [])]
    for block in blocks:
        def checkpointed(*args, _forward=block.forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        block.forward = checkpointed  # an instance attribute: the class's forward comes back on restore
    return blocks


def _restore_blocks(blocks: list[torch.nn.Module]) -> None:
    for block in blocks:
        block.__dict__.pop("forward", None)


def _clip_layer_forward_out_of_place(self, x, mask=None, optimized_attention=None):
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def _t5_attention_forward_out_of_place(self, x, mask=None, past_bias=None, optimized_attention=None):
    output, past_bias = self.SelfAttention(self.layer_norm(x), mask=mask, past_bias=past_bias,
                                           optimized_attention=optimized_attention)
    return x + output, past_bias


def _t5_ff_forward_out_of_place(self, x):
    return x + self.DenseReluDense(self.layer_norm(x))


# Diffusion models whose blocks add residuals in place (`img += ...`) onto tensors autograd saved
_INPLACE_RESIDUAL_MODELS = (comfy.ldm.flux.model.Flux,)


@contextlib.contextmanager
def _copies_of_saved_activations() -> Iterator[None]:
    """Autograd saves a copy of each activation (a tensor with a grad_fn) it needs for backward, so that the
    model's own in-place additions afterwards change what it computes with but not what backward reads. Weights
    and inputs are saved as they are; an activation saved by several ops is copied once (per version)."""
    copies: dict[tuple[int, int], tuple[weakref.ref, torch.Tensor]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.grad_fn is None:
            return t
        key = (id(t), t._version)
        hit = copies.get(key)
        if hit is not None and hit[0]() is t:
            return hit[1]
        copy = t.detach().clone()
        copies[key] = (weakref.ref(t), copy)
        return copy

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


# ComfyUI's text-encoder layers that add their residual in place, and the out-of-place forward for training
_OUT_OF_PLACE = {comfy.clip_model.CLIPLayer: _clip_layer_forward_out_of_place,
                 comfy.text_encoders.t5.T5LayerSelfAttention: _t5_attention_forward_out_of_place,
                 comfy.text_encoders.t5.T5LayerFF: _t5_ff_forward_out_of_place}


class _LoraWrapper:
    """Weight wrapper computing W + ΔW for one target; reads the host's LoRA (and its on/off switch) at call time.

    `scale`: a scaled-fp8 layer's `scale_weight` (e.g. t5xxl_fp8_e4m3fn_scaled). ComfyUI hands weight wrappers the
    stored weight, W/scale, and multiplies by scale afterwards, so ΔW/scale is added: the layer computes W + ΔW,
    what ComfyUI's LoRA patching (and every other loader) gives for the file the run writes."""

    def __init__(self, lora: TrainableLora, index: int, scale: torch.Tensor | None = None,
                 module: torch.nn.Module | None = None, copies: WeightCopies | None = None):
        self.lora, self.index = lora, index
        self.scale = None if scale is None else float(scale)  # one number per layer (a float: no inference tensor)
        self.module, self.copies = module, copies

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        w = w.detach()
        if not self.lora.enabled:
            return w
        out = self._apply(w)
        if self.copies is not None:  # a recipe holding no tensor (see _FrozenWeight)
            device, dtype = w.device, w.dtype
            self.copies.made(out, lambda: self._recompute(device, dtype))
        return out

    def _apply(self, w: torch.Tensor) -> torch.Tensor:
        # ΔW and the sum in fp32, rounded once to the weight's dtype: in bf16/fp16 a product of two half-precision
        # factors, then a half-precision add, would lose an early, small ΔW twice over
        delta = self.lora.delta(self.index, torch.float32, w.device)
        if self.scale is not None:
            delta = delta / self.scale
        return w + delta if w.dtype == torch.float32 else (w.float() + delta).to(w.dtype)

    def _recompute(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        with torch.no_grad():
            return self._apply(_cast(self.module.weight, device, dtype))


class ComfyHost:
    """Implements training.host.Host on ComfyUI MODEL / CLIP / VAE objects (which it never modifies)."""

    def __init__(self, model, clip, vae, rank: int = 16, alpha: float = 16.0, seed: int = 0,
                 encoders: list[str] | None = None, gradient_checkpointing: bool | None = None):
        """gradient_checkpointing: recompute U-Net blocks in the training pass (None: on unless the model runs on
        the CPU, where memory is rarely the limit and the extra forward costs time)."""
        self._check_model(model)
        self.vae = vae
        self.device = model.load_device
        sampling = model.get_model_object("model_sampling")  # honours ModelSampling* patches on the MODEL
        # a flow-matching MODEL (ComfyUI's CONST: SD3-style sampling, or ModelSamplingSD3 on another U-Net) samples
        # with Flow-GRPO's SDE and predicts velocities; the others are VP models with DDIM and ε
        self.flow = isinstance(sampling, comfy.model_sampling.CONST)
        self.model_family = family_of_comfy_config(getattr(model.model, "model_config", None))
        self.distilled_guidance = bool(self.model_family and FAMILIES[self.model_family].distilled_guidance)
        self.uses_negative_prompt = not self.distilled_guidance  # Flux: one pass, the guidance is an input
        params = getattr(model.model.diffusion_model, "params", None)
        if self.distilled_guidance and params is not None and not getattr(params, "guidance_embed", True):
            log.info("this Flux model has no guidance input (Flux schnell): it samples in one pass at cfg 1 and the "
                     "guidance setting has no effect")
        self.alphas_cumprod = (None if self.flow else
                               abar_from_sigma(sampling.sigmas.detach().float().cpu()).contiguous())
        self.sample_sigmas: torch.Tensor | None = None  # the run's DDIM sigmas, for MODEL patches that read them

        self.clip = clip.clone()
        targets: dict[tuple[str, str], str] = {}  # (encoder, module path) -> state-dict key of its weight
        for name, module in self.clip.cond_stage_model.named_modules():
            m = comfy_encoder_module(name)
            if m and attention_path(m[1]) == m[1]:  # q/k/v/out of a CLIP layer, q/k/v/o of a T5 block
                targets[m] = f"{name}.weight"
        self.model_encoders = sorted({enc for enc, _ in targets})
        # the MODEL's family when the CLIP's encoders are (some of) its own: an SD 3.x CLIP without T5 is SD 3.x's
        fits_model = self.model_family and set(self.model_encoders) <= set(FAMILIES[self.model_family].encoders)
        self.family = (self.model_family if fits_model else
                       family_of_clip(self.clip.cond_stage_model, self.model_encoders))
        self.encoders = self._check_encoders(encoders)
        params = dict(self.clip.cond_stage_model.named_parameters())
        # Slots follow the CLIP's encoders, not the trained subset: CLIP-G alone on SDXL is still te2.
        by_slot = {(slot_for_encoder(enc, self.model_encoders), path): key
                   for (enc, path), key in targets.items() if enc in self.encoders}
        shapes = {slot_key: tuple(params[key].shape) for slot_key, key in by_slot.items()}
        with torch.inference_mode(False):  # nodes run in inference mode; trainable tensors must not be inference tensors
            self.lora = TrainableLora(shapes, rank=rank, alpha=alpha, seed=seed, device=self.clip.patcher.load_device)
        self.lora.family = self.family
        modules = dict(self.clip.cond_stage_model.named_modules())
        self.weight_copies = WeightCopies()
        for index, slot_key in enumerate(self.lora.keys):
            key = by_slot[slot_key]
            module = modules[key[:-len(".weight")]]
            self.clip.patcher.add_weight_wrapper(key, _LoraWrapper(self.lora, index, getattr(module, "scale_weight", None),
                                                                   module, self.weight_copies))
        _wrap_all(self.clip.patcher, self.weight_copies, skip=set(by_slot.values()))
        self._context_dim = _context_dim(model)
        self._context_checked = False

        self._model = model.clone()
        self._training = False
        self.gradient_checkpointing = (torch.device(self.device).type != "cpu" if gradient_checkpointing is None
                                       else bool(gradient_checkpointing))
        if self.gradient_checkpointing and isinstance(model.model.diffusion_model, _INPLACE_RESIDUAL_MODELS):
            if gradient_checkpointing:
                log.warning("TexForce: gradient checkpointing is off for %s: its blocks add residuals in place, "
                            "which the recomputation in backward would read changed.", _model_label(model))
            self.gradient_checkpointing = False

    def _check_encoders(self, encoders: list[str] | None) -> list[str]:
        """The encoders to train (all of the CLIP's by default); naming one the CLIP lacks is an error."""
        have = self.model_encoders
        if not have:
            raise ValueError(f"this CLIP has none of the text encoders TexForce trains LoRAs on "
                             f"({listed(ENCODER_LABELS.values())}: {family_names('')}).")
        wanted = have if encoders is None else list(dict.fromkeys(encoders))
        missing = [e for e in wanted if e not in have]
        if missing or not wanted:
            what = encoders_label(missing) if missing else "no encoder"
            raise ValueError(
                f"cannot train {what}: this CLIP is {family_label(self.family, 'a CLIP with ' + ', '.join(have))}, "
                f"which has {encoders_label(have)} only. Train {listed([ENCODER_LABELS[e] for e in have])}"
                f"{' (or all)' if len(have) > 2 else ' (or both)' if len(have) > 1 else ''} instead.")
        return [e for e in have if e in wanted]

    @staticmethod
    def _check_model(model) -> None:
        sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else None
        if sampling is None or not hasattr(sampling, "sigmas") or sampling.sigmas.numel() < 2:
            raise ValueError("TexForce training needs a diffusion MODEL with a discrete noise schedule "
                             f"({family_names('')}).")
        continuous = (comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.ModelSamplingContinuousV)
        if isinstance(sampling, continuous):
            raise ValueError(f"{type(sampling).__mro__[1].__name__} models (continuous EDM/V schedules) are not "
                             "supported yet: the log-probability needs a DDPM (VP) schedule or a rectified flow.")
        config = getattr(getattr(model, "model", None), "model_config", None)
        if isinstance(sampling, comfy.model_sampling.CONST) and family_of_comfy_config(config) is None:
            raise ValueError(f"{type(config).__name__} models are not supported yet: flow-matching sampling is, on "
                             f"{family_names('')} models (their text encoders are the ones the LoRA covers).")

    def _check_context(self, width: int) -> None:
        """A CLIP of one family with a MODEL of another fails deep in the U-Net; say which is which instead."""
        if self._context_dim is not None and width != self._context_dim:
            raise ValueError(
                f"the CLIP ({family_label(self.family, encoders_label(self.model_encoders))}) gives {width}-wide "
                f"conditioning, but the MODEL ({_model_label(self._model)}) expects {self._context_dim}-wide "
                "conditioning: connect the CLIP and MODEL of the same checkpoint.")
        self._context_checked = True

    # -- memory plan (training/memory_plan.py): what the estimate needs from ComfyUI's objects ------------
    def memory_inputs(self, cfg) -> PlanInputs | None:
        """The model's shape, dtypes, weight sizes and ComfyUI's attention choice, with the run's settings: a U-Net
        spec, or a transformer spec for SD 3.x's MMDiT and Flux (None for a layout the plan does not walk)."""
        base = self._model.model
        config = base.model_config.unet_config
        unet = transformer = None
        if "channel_mult" in config:
            unet = UNetSpec.from_config(config)
        else:
            try:
                transformer = TransformerSpec.from_config(config)
            except (KeyError, ValueError) as e:
                log.debug("TexForce: no memory plan for %s: %s", type(base.diffusion_model).__name__, e)
                return None
        weight_dtype = base.get_dtype()
        compute = base.manual_cast_dtype or weight_dtype
        attention = comfy.ldm.modules.attention.optimized_attention.__name__
        precision = comfy.ldm.modules.attention.get_attn_precision(config.get("attn_precision"), compute)
        low_vram = comfy.model_management.vram_state in (comfy.model_management.VRAMState.LOW_VRAM,
                                                         comfy.model_management.VRAMState.NO_VRAM)
        # a transformer's encoders: the trained ones only (an untrained T5 keeps nothing, and would dwarf the rest);
        # a U-Net's: all of them, as before
        encoders = tuple(_encoder_specs(self.clip, self.encoders if unet is None else None))
        return PlanInputs(
            unet=unet, transformer=transformer, encoders=encoders,
            latent=self.latent_shape(cfg.height, cfg.width), sample_batch=cfg.sample_batch_size,
            # Flux's distilled guidance is one pass (no negative)
            train_batch=cfg.train_batch_size, guidance=not (math.isclose(cfg.guidance, 1.0) or self.distilled_guidance),
            images_per_epoch=cfg.images_per_epoch, steps=cfg.num_steps, act_bytes=compute.itemsize,
            unet_weight_bytes=self._model.model_size(),
            unet_parameters=sum(p.numel() for p in base.diffusion_model.parameters()),
            # ComfyUI's CLIP text models compute in fp32 whatever their weights' dtype (manual_cast ops)
            clip_weight_bytes=self.clip.patcher.model_size(), clip_act_bytes=4,
            attention="efficient" if attention in EFFICIENT_ATTENTION else "quadratic",
            upcast_attention=precision == torch.float32 and compute != torch.float32,
            weights_cast=compute != weight_dtype,
            lora_parameters=sum(p.numel() for p in self.lora.parameters()),
            checkpointing=self.gradient_checkpointing, count_weights=not low_vram,
            context_tokens=_context_tokens(self.clip, unet is not None),
            # the pooled vector comes from the CLIP encoders (T5 gives none): trained, it carries a gradient
            vector_grad=any(enc != "t5xxl" for enc in self.encoders),
            inplace_residuals=isinstance(base.diffusion_model, _INPLACE_RESIDUAL_MODELS),
            negative_with_grad=self.uses_negative_prompt)

    def available_memory(self) -> tuple[float, str]:
        """(bytes, device name): what ComfyUI reports free on the model's device, plus what the models it has
        loaded there hold (it unloads them to load ours; ours are counted in the plan's weights)."""
        device = torch.device(self.device)
        # an entry whose model was garbage-collected stays listed until ComfyUI's next clean-up: it holds nothing
        loaded = sum(m.model_loaded_memory() for m in comfy.model_management.current_loaded_models
                     if m.model is not None and torch.device(m.device) == device)
        return float(comfy.model_management.get_free_memory(device)) + loaded, str(device)

    # -- Host interface -------------------------------------------------------------------------
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        fmt = self._model.model.latent_format
        ratio = getattr(fmt, "spacial_downscale_ratio", 8)
        return fmt.latent_channels, height // ratio, width // ratio

    def sampler_schedule(self, num_steps: int) -> DDIMSchedule | FlowSchedule:
        """The chain's steps: DDIM on the model's ᾱ, or for a flow model the times ComfyUI's `simple` scheduler
        gives it (its own shift), from 1 to 0."""
        if not self.flow:
            return ddim_schedule(self.alphas_cumprod, num_steps)
        sampling = self._model.get_model_object("model_sampling")
        return FlowSchedule(comfy.samplers.calculate_sigmas(sampling, "simple", num_steps).float().cpu())

    def set_schedule(self, timesteps: torch.Tensor) -> None:
        if self.flow:  # the model's times are its sigmas
            self.sample_sigmas = timesteps.float().cpu()
            return
        sampling = self._model.get_model_object("model_sampling")
        if hasattr(sampling, "sigma"):  # the run's sigmas, for MODEL patches that read sample_sigmas
            self.sample_sigmas = sampling.sigma(timesteps.float()).cpu()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.lora.parameters())

    def lora_state(self) -> dict[str, torch.Tensor]:
        return self.lora.kohya_state()

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lora.load_lora_set(parse_state_dict(state, source="checkpoint"))

    @contextlib.contextmanager
    def lora_enabled(self, enabled: bool) -> Iterator[None]:
        before = self.lora.enabled
        self.lora.enabled = enabled
        try:
            yield
        finally:
            self.lora.enabled = before

    def encode(self, prompts: list[str]) -> Cond:
        # with gradient, autograd keeps recipes for the encoders' weight copies, not the copies (WeightCopies)
        keep_recipes = self._training and torch.is_grad_enabled()
        with self.weight_copies.recomputed() if keep_recipes else contextlib.nullcontext():
            out = encode_batch(self.clip, prompts)
        if not self._context_checked:
            self._check_context(out["cross_attn"].shape[-1])
        return out

    @contextlib.contextmanager
    def predictor(self, cond: Cond, uncond: Cond, guidance: float) -> Iterator[Predict]:
        model = self._model
        batch = cond["cross_attn"].shape[0]
        if uncond["cross_attn"].shape[0] != batch:
            uncond = {k: v.expand(batch, *v.shape[1:]) for k, v in uncond.items()}
        options = _sampling_options(model.model_options, self.sample_sigmas)
        device = model.load_device
        flow = self.flow
        # Flux: the guidance is the model's input, and one pass (ComfyUI skips the negative at cfg 1)
        distilled = self.distilled_guidance
        cfg_scale = 1.0 if distilled else guidance
        inplace_residuals = isinstance(model.model.diffusion_model, _INPLACE_RESIDUAL_MODELS)
        abar_table = None if flow else self.alphas_cumprod.to(device)
        state: dict = {}

        def prepare(shape: torch.Size) -> dict:
            # What ComfyUI's CFGGuider does before sampling: load the models, let the model build its conds
            # (SDXL: pooled + size conditioning from the latent size; Flux: the guidance embedding's input).
            extra = {"guidance": guidance} if distilled else {}
            conds = {"positive": comfy.sampler_helpers.convert_cond([comfy_cond(cond, extra)]),
                     "negative": comfy.sampler_helpers.convert_cond([comfy_cond(uncond, extra)])}
            real_model, conds, extra = comfy.sampler_helpers.prepare_sampling(model, shape, conds, options)
            conds = comfy.samplers.process_conds(real_model, torch.zeros(shape, device=device), conds, device)
            model.pre_run()
            # after loading (U-Net LoRAs are patched in at load): frozen, autograd-usable views of the weights
            aliases = _alias_parameters(real_model.diffusion_model) if self._training else []
            blocks = (_checkpoint_blocks(real_model.diffusion_model)
                      if self._training and self.gradient_checkpointing else [])
            return {"shape": shape, "model": real_model, "conds": conds, "extra": extra, "aliases": aliases,
                    "blocks": blocks}

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with (_copies_of_saved_activations() if self._training and inplace_residuals else contextlib.nullcontext()):
                return predict_step(x, t)

        def predict_step(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if state.get("shape") != x.shape:
                if state:
                    _restore_parameters(state["aliases"])
                    _restore_blocks(state["blocks"])
                state.update(prepare(x.shape))
            conds = state["conds"]
            if flow:  # t is the flow time, ComfyUI's σ; x is the model's own x_t; the velocity is what it predicts
                sigma = t.to(device).float()
                denoised = comfy.samplers.sampling_function(state["model"], x.to(device), sigma, conds["negative"],
                                                            conds["positive"], cfg_scale, model_options=options)
                return velocity_from_denoised(x.to(device), denoised, sigma)
            sigma = sigma_from_abar(abar_table[t.to(device)])
            x_k = vp_to_k(x.to(device), sigma)
            denoised = comfy.samplers.sampling_function(state["model"], x_k, sigma, conds["negative"],
                                                        conds["positive"], guidance, model_options=options)
            return eps_from_denoised_k(x_k, denoised, sigma)

        try:
            yield predict
        finally:
            if state:
                _restore_parameters(state["aliases"])
                _restore_blocks(state["blocks"])
                model.cleanup()
                comfy.sampler_helpers.cleanup_models(state["conds"], state["extra"])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = self.vae.decode(self._model.model.process_latent_out(latents.to(self.device)))
        return images.float().clamp(0, 1)

    @contextlib.contextmanager
    def training(self) -> Iterator[None]:
        layers = [(m, forward) for m in self.clip.cond_stage_model.modules()
                  for kind, forward in _OUT_OF_PLACE.items() if isinstance(m, kind)]
        self._offload_for_training()
        self._training = True
        try:
            with torch.inference_mode(False), torch.enable_grad():
                for layer, forward in layers:
                    layer.forward = types.MethodType(forward, layer)
                yield
        finally:
            for layer, _ in layers:
                layer.__dict__.pop("forward", None)
            self._training = False

    def _offload_for_training(self) -> None:
        """Before the training pass, ComfyUI offloads every model it holds on the U-Net's device but the U-Net and
        the CLIP: after sampling, the VAE and the reward models, which training does not use and the memory plan
        does not count. They come back when next used (VAE.decode and the reward nodes call load_models_gpu). On
        the CPU nothing is asked: loaded and offloaded are the same RAM."""
        if torch.device(self.device).type != "cpu":
            offload_except(self.device, [self._model, self.clip.patcher])


def offload_except(device: torch.device, keep: list) -> list:
    """Have ComfyUI's model management unload every model it has loaded on `device` except the patchers in `keep`;
    returns what it unloaded (its LoadedModel entries)."""
    mm = comfy.model_management
    kept = [m for m in mm.current_loaded_models if any(m.model is k for k in keep)]
    return mm.free_memory(math.inf, device, keep_loaded=kept)


def _sampling_options(model_options: dict, sample_sigmas: torch.Tensor | None) -> dict:
    """The model_options a predictor hands sampling_function: the MODEL's, with the run's sample_sigmas in
    transformer_options as ComfyUI's samplers put them. A copy, so that the MODEL's own dict never changes; for a
    MODEL without patches the copy is built directly instead of walking the nested dicts (the same dict)."""
    if list(model_options) == ["transformer_options"] and not model_options["transformer_options"]:  # unpatched
        return {"transformer_options": {} if sample_sigmas is None else {"sample_sigmas": sample_sigmas}}
    options = comfy.model_patcher.create_model_options_clone(model_options)
    if sample_sigmas is not None:
        options.setdefault("transformer_options", {})["sample_sigmas"] = sample_sigmas
    return options


def encode_batch(clip, prompts: list[str]) -> Cond:
    """One conditioning row per prompt through a ComfyUI CLIP: one forward per distinct prompt (repeats share it),
    multi-chunk prompts padded to a common length as ComfyUI's concat does."""
    unique = list(dict.fromkeys(prompts))
    outs = {p: clip.encode_from_tokens(clip.tokenize(p), return_pooled=True) for p in unique}
    length = math.lcm(*(c.shape[1] for c, _ in outs.values()))
    conds = {p: c.repeat(1, length // c.shape[1], 1) for p, (c, _) in outs.items()}
    out: Cond = {"cross_attn": torch.cat([conds[p] for p in prompts]).float()}
    pooled = [outs[p][1] for p in prompts]
    if all(x is not None for x in pooled):
        out["pooled"] = torch.cat(pooled).float()
    return out


def _encoder_specs(clip, trained: list[str] | None = None) -> list[TextEncoderSpec | T5EncoderSpec]:
    """The shape of every text encoder in a ComfyUI CLIP (SDXL: CLIP-L and CLIP-G; SD 3.x: those and T5-XXL; Flux:
    CLIP-L and T5-XXL), each at the tokens its tokenizer pads to; only the `trained` ones when given (the others
    run without gradient and keep nothing)."""
    specs = []
    for name, m in clip.cond_stage_model.named_modules():
        encoder = comfy_encoder_module(f"{name}.x")
        if trained is not None and (encoder is None or encoder[0] not in trained):
            continue
        if isinstance(m, comfy.clip_model.CLIPEncoder) and len(m.layers):
            layer = m.layers[0]
            act = next((k for k, f in comfy.clip_model.ACTIVATIONS.items() if f is layer.mlp.activation), "gelu")
            specs.append(TextEncoderSpec(width=layer.self_attn.q_proj.in_features, layers=len(m.layers),
                                         heads=layer.self_attn.heads, intermediate=layer.mlp.fc1.out_features,
                                         activation=act))
        elif isinstance(m, comfy.text_encoders.t5.T5Stack) and len(m.block):
            attn = m.block[0].layer[0].SelfAttention
            ff = m.block[0].layer[-1].DenseReluDense
            gated = isinstance(ff, comfy.text_encoders.t5.T5DenseGatedActDense)
            specs.append(T5EncoderSpec(width=attn.q.in_features, layers=len(m.block), heads=attn.num_heads,
                                       head_width=attn.q.out_features // attn.num_heads,
                                       intermediate=(ff.wi_0 if gated else ff.wi).out_features, gated=gated,
                                       tokens=_t5_tokens(clip)))
    return specs


def _t5_tokens(clip) -> int:
    """The tokens ComfyUI's T5 tokenizer pads a prompt to (77 on SD 3.x, 256 on Flux); longer prompts have more."""
    return int(getattr(getattr(clip.tokenizer, "t5xxl", None), "min_length", None) or 77)


def _context_tokens(clip, unet: bool) -> int:
    """The text tokens the diffusion model attends to: 77 for a U-Net; SD 3.x joins CLIP's 77 to T5's tokens, Flux
    has T5's only."""
    tokenizer = clip.tokenizer
    if unet or getattr(tokenizer, "t5xxl", None) is None:
        return 77
    return (77 if getattr(tokenizer, "clip_l", None) is not None and getattr(tokenizer, "clip_g", None) is not None
            else 0) + _t5_tokens(clip)


def _context_dim(model) -> int | None:
    config = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    dim = config.get("context_dim")
    return int(dim) if isinstance(dim, int) else None


def _model_label(model) -> str:
    """'SDXL' / 'SD 2.x' / 'SD 1.x' from the model's ComfyUI config class ('SDXL (SSD1B)' for a variant's), else
    the class name."""
    config = getattr(model.model, "model_config", model.model)
    name, family = type(config).__name__, family_of_comfy_config(config)
    if family is None:
        return name
    return FAMILIES[family].name + ("" if name == FAMILIES[family].comfy_config else f" ({name})")


def comfy_cond(c: Cond, extra: dict | None = None) -> list:
    """A ComfyUI conditioning entry ([tensor, dict]) of a Cond, with `extra` keys (Flux's guidance) in its dict."""
    options = {"pooled_output": c["pooled"]} if "pooled" in c else {}
    return [c["cross_attn"], {**options, **(extra or {})}]
