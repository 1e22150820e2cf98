"""Read LoRA files safely: safetensors, tensor-only pickles (weights_only=True) and PEFT folders."""
from __future__ import annotations

import json
import logging
import pickle
import re
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
# How torch's weights_only unpickler names what it refused: "GLOBAL posix.system", "Unsupported global: GLOBAL x".
_BLOCKED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _why(e: BaseException) -> str:
    """A short reason: the exception's message, or its type when the message is empty (EOFError())."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _not_empty(path: Path, name: str) -> None:
    if path.stat().st_size == 0:
        raise LoraFileError(f"{name}: the file is empty (0 bytes): an interrupted download or copy. Download it "
                            "again and check its size against the source.")


def _load_safetensors(path: Path, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _not_empty(path, name)
    try:
        tensors = load_file(str(path), device="cpu")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFileError(
            f"{name}: not a readable safetensors file ({_why(e)}). It is probably truncated or corrupt: "
            "download it again and check its size against the source."
        ) from e
    return tensors, metadata


def _load_pickle(path: Path, name: str) -> dict[str, torch.Tensor]:
    _not_empty(path, name)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = _BLOCKED_GLOBAL.search(str(e))
        what = (f"it would call {blocked.group(1)} while loading" if blocked
                else "it holds Python objects other than tensors")
        raise LoraFileError(
            f"{name}: refused, because loading this pickle can run code: {what}. A LoRA file holds only tensors, "
            "and pickles are only ever read as tensors here. Use a .safetensors version of this LoRA from a "
            "source you trust."
        ) from None  # torch's own message recommends the unsafe weights_only=False
    except Exception as e:  # noqa: BLE001 - any other failure of the unpickler means a damaged or foreign file
        raise LoraFileError(f"{name}: cannot be read as a torch file ({_why(e)}); it is probably truncated or "
                            "corrupt, or not a torch file at all. Download it again.") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise LoraFileError(f"{name}: expected a flat dict of named tensors, found {type(obj).__name__}; this is not a LoRA file.")
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
        raise LoraFileError(f"{path.name}: not a readable safetensors file ({_why(e)}); it is probably truncated or "
                            "corrupt.") from e


def load_tensors(path: Path, name: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one file, refusing anything that is not plain named tensors. Errors call the
    file `name` (default: the path as given)."""
    name = name or str(path)
    if not path.is_file():
        raise LoraFileError(f"{name}: file not found.")
    if path.suffix in (".safetensors", ".sft"):
        return _load_safetensors(path, name)
    if path.suffix in _PICKLE_SUFFIXES:
        return _load_pickle(path, name), {}
    raise LoraFileError(f"{name}: unknown LoRA file type '{path.suffix}'; expected .safetensors, .bin, .pt or a PEFT folder.")


def _peft_files(path: Path, name: str) -> tuple[Path, Path | None]:
    """(weights file, config file or None) for a PEFT folder or a file inside one."""
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        weights = next((folder / n for n in PEFT_WEIGHTS if (folder / n).is_file()), None)
        if weights is None:
            raise LoraFileError(f"{name}: folder has no {' or '.join(PEFT_WEIGHTS)}; it is not a PEFT LoRA folder.")
    else:
        weights = path
    config = folder / PEFT_CONFIG
    return weights, (config if config.is_file() else None)


def _read_peft_config(path: Path, name: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFileError(f"{name}: not valid JSON ({_why(e)}); restore the adapter_config.json of this "
                            "release.") from e
    if not isinstance(config, dict):
        raise LoraFileError(f"{name}: holds a JSON {type(config).__name__}, not a PEFT adapter config; restore the "
                            "adapter_config.json of this release.")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoraFileError(f"{name}: peft_type is {config.get('peft_type')!r}; only LoRA adapters are supported.")
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


def read_lora(path: str | Path, name: str | None = None) -> LoraSet:
    """Read any supported LoRA layout from a file or PEFT folder into a :class:`LoraSet`. Errors and notes call
    the file `name` (e.g. its name in ComfyUI's LoRA list; default: the path as given)."""
    path = Path(path)
    name = name or str(path)
    peft_config = None
    config_path = None
    if path.is_dir() or path.name in PEFT_WEIGHTS:
        folder = Path(name) if path.is_dir() else Path(name).parent
        path, config_path = _peft_files(path, name)
        if config_path is not None:
            peft_config = _read_peft_config(config_path, (folder / PEFT_CONFIG).as_posix())
        name = (folder / path.name).as_posix()  # the weights file, also when a folder was given
    tensors, metadata = load_tensors(path, name)
    lora = parse_state_dict(tensors, source=name, peft_config=peft_config)
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
