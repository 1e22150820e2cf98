"""Read LoRA files safely: safetensors, tensor-only pickles (weights_only=True) and PEFT folders."""
from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .keys import parse_state_dict
from .types import LoraFileError, LoraSet

log = logging.getLogger(__name__)

PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_CONFIG = "adapter_config.json"
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt"}


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        tensors = load_file(str(path), device="cpu")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFileError(
            f"{path}: not a readable safetensors file ({e}). It is probably truncated or corrupt: "
            "download it again and check its size against the source."
        ) from e
    return tensors, metadata


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LoraFileError(
            f"{path}: this pickle holds Python objects, not only tensors, and was refused because "
            f"loading it could run code ({str(e).splitlines()[0]}). Use a .safetensors version of this LoRA, "
            "or convert it on a machine where you trust the file."
        ) from e
    except (EOFError, RuntimeError, OSError) as e:
        raise LoraFileError(f"{path}: cannot be read as a torch file ({e}); it is probably truncated or corrupt.") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LoraFileError(f"{path}: expected a flat dict of named tensors, found {type(obj).__name__}; this is not a LoRA file.")
    return obj


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors file without reading its tensors ({} for other files)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".sft"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFileError(f"{path}: not a readable safetensors file ({e}); it is probably truncated or corrupt.") from e


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one file, refusing anything that is not plain named tensors."""
    if not path.is_file():
        raise LoraFileError(f"{path}: file not found.")
    if path.suffix in (".safetensors", ".sft"):
        return _load_safetensors(path)
    if path.suffix in _PICKLE_SUFFIXES:
        return _load_pickle(path), {}
    raise LoraFileError(f"{path}: unknown LoRA file type '{path.suffix}'; expected .safetensors, .bin, .pt or a PEFT folder.")


def _peft_files(path: Path) -> tuple[Path, Path | None]:
    """(weights file, config file or None) for a PEFT folder or a file inside one."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        weights = next((folder / n for n in PEFT_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise LoraFileError(f"{path}: folder has no {' or '.join(PEFT_WEIGHTS)}; it is not a PEFT LoRA folder.")
    else:
        weights = path
    config = folder / PEFT_CONFIG
    return weights, (config if config.is_file() else None)


def _read_peft_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{path}: not valid JSON ({e}); restore the adapter_config.json of this release.") from e
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraFileError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported.")
    return config


def _check_finite(lora: LoraSet) -> None:
    bad = [f"{slot}:{path}" for (slot, path), m in lora.modules.items()
           if not (torch.isfinite(m.down).all() and torch.isfinite(m.up).all())]
    bad += [key for key, t in lora.other.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise LoraFileError(
            f"{lora.source}: {len(bad)} tensor(s) hold NaN or Inf weights (first: {bad[0]}). "
            "The training run that wrote it diverged; use an earlier checkpoint."
        )


def read_lora(path: str | Path) -> LoraSet:
    """Read any supported LoRA layout from a file or PEFT folder into a :class:`LoraSet`."""
    path = Path(path)
    peft_config = None
    config_path = None
    if path.is_dir() or path.name in PEFT_WEIGHTS:
        path, config_path = _peft_files(path)
        if config_path is not None:
            peft_config = _read_peft_config(config_path)
    tensors, metadata = load_tensors(path)
    lora = parse_state_dict(tensors, source=str(path), peft_config=peft_config)
    lora.metadata = metadata
    if "peft" in lora.format:
        if peft_config is None:
            note = (f"no {PEFT_CONFIG} beside {path.name}: assumed lora_alpha = r (scale 1.0, as in the "
                    "official TexForce releases); put the release's config beside it if it differs")
            lora.notes.append(note)
            log.warning("%s: %s", path, note)
        else:
            lora.notes.append(f"scale from {PEFT_CONFIG}: lora_alpha {peft_config.get('lora_alpha')} / r {peft_config.get('r')}")
    _check_finite(lora)
    return lora
