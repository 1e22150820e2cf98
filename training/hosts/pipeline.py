"""Loading a diffusers pipeline (Stable Diffusion 1.x / 2.x / XL / 3.x, Flux) for the headless host, and telling its
family (the registry's, training/lora/family.py): a diffusers folder, or a single-file checkpoint through diffusers'
own loader."""
from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..lora.family import ENCODERS, FAMILIES, family_names


class PipelineLoadError(RuntimeError):
    """A model that cannot be loaded as a Stable Diffusion pipeline; the message says what to pass instead."""


def family_of(pipe) -> str:
    """The registry family of a pipeline: the one with exactly its text encoders (pipeline attributes) of the
    right kind (SDXL's text_encoder_2 is a CLIP, Flux's a T5), and among one-encoder families the one whose
    encoder has its activation (OpenCLIP-H uses gelu, OpenAI's CLIP-L quick_gelu).

    A family whose U-Net reads a pooled output needs that encoder's projection (SDXL: CLIP-G's); a pipeline with
    only some of a family's encoders (the SDXL refiner: CLIP-G only, aesthetic-score conditioning) is refused,
    as the ComfyUI host has no refiner path either.
    """
    attrs = {m.pipeline for f in FAMILIES.values() for m in f.members}
    present = {a for a in attrs if getattr(pipe, a, None) is not None}
    flow = _is_flow(pipe)
    families = [f for f in FAMILIES.values() if flow is None or f.flow == flow]
    candidates = [f for f in families if {m.pipeline for m in f.members} == present]
    candidates = [f for f in candidates if all(_is_t5(getattr(pipe, m.pipeline)) == (ENCODERS[m.encoder].arch == "t5")
                                               for m in f.members)]
    if not candidates:
        partial = next((f for f in families if present < {m.pipeline for m in f.members}), None)
        if partial is None:
            raise PipelineLoadError(f"this pipeline's text encoders ({', '.join(sorted(present)) or 'none'}) are "
                                    f"no {family_names()} model's")
        lacking = [m for m in partial.members if m.pipeline not in present]
        if partial.flow:
            raise PipelineLoadError(f"this {partial.name} pipeline has no {ENCODERS[lacking[0].encoder].label} text "
                                    f"encoder ({lacking[0].pipeline} is None): TexForce trains {partial.label} "
                                    "models with all their text encoders")
        raise PipelineLoadError(f"this {partial.name} pipeline has no {ENCODERS[lacking[0].encoder].label} text "
                                f"encoder (an {partial.name} refiner?): TexForce trains {family_names('and')} "
                                "base models")
    if len(candidates) > 1:
        first = getattr(pipe, candidates[0].members[0].pipeline)
        act = getattr(first.config, "hidden_act", "quick_gelu")
        candidates = [f for f in candidates if ENCODERS[f.members[0].encoder].activation == act] or candidates
    family = candidates[0]
    if family.pooled:
        attr = next(m.pipeline for m in family.members if m.encoder == family.pooled)
        te = getattr(pipe, attr)
        if not hasattr(te, "text_projection"):
            label = ENCODERS[family.pooled].label
            raise PipelineLoadError(f"this {family.name} pipeline's {attr} is a {type(te).__name__}; {family.name} "
                                    f"needs CLIPTextModelWithProjection ({label}'s pooled output)")
    return family.id


def _is_flow(pipe) -> bool | None:
    """Whether the pipeline denoises with a flow-matching transformer (SD 3.x, Flux) or a U-Net; None: neither."""
    if getattr(pipe, "transformer", None) is not None:
        return True
    return False if getattr(pipe, "unet", None) is not None else None


def _is_t5(module) -> bool:
    """A T5 encoder (transformers' T5EncoderModel or UMT5), told by its config's model_type."""
    return getattr(getattr(module, "config", None), "model_type", None) in ("t5", "umt5")


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
    if not (hasattr(pipe, "unet") or hasattr(pipe, "transformer")) or not hasattr(pipe, "text_encoder"):
        raise PipelineLoadError(f"{path} loaded as {type(pipe).__name__}, which is not a {family_names()} "
                                "pipeline with a U-Net or transformer and CLIP text encoder(s)")
    return pipe.to(device)


def _from_path(diffusers, path: Path, config: str | Path | None, dtype: torch.dtype):
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise PipelineLoadError(f"{path} is a folder without model_index.json: not a diffusers pipeline folder")
        return diffusers.DiffusionPipeline.from_pretrained(str(path), torch_dtype=dtype,
                                                           **_no_safety_checker(diffusers, path))
    cls = getattr(diffusers, FAMILIES[_single_file_family(path)].diffusers_pipeline)
    params = inspect.signature(cls.__init__).parameters
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in params else {}
    kw = {"config": str(config), "local_files_only": Path(str(config)).is_dir()} if config else {}
    return cls.from_single_file(str(path), torch_dtype=dtype, **kw, **extra)


def _no_safety_checker(diffusers, folder: Path) -> dict:
    """The keyword arguments that drop the safety checker, for the pipeline classes that have one (SD 1.x / 2.x)."""
    import json

    name = json.loads((folder / "model_index.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, name, None)
    if cls is not None and "safety_checker" not in inspect.signature(cls.__init__).parameters:
        return {}
    return {"safety_checker": None, "requires_safety_checker": False}


def _single_file_family(path: Path) -> str:
    """The family whose checkpoint_prefix the file's keys have (SDXL's second text encoder), else the first
    family without one (SD 1.x and 2.x load alike; the config or the weights say which)."""
    plain = next(f.id for f in FAMILIES.values() if f.checkpoint_prefix is None)
    if path.suffix != ".safetensors":
        return plain
    from safetensors import safe_open

    marked = [f for f in FAMILIES.values() if f.checkpoint_prefix]
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    return next((fam.id for fam in marked if any(k.startswith(fam.checkpoint_prefix) for k in keys)), plain)
