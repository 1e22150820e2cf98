"""LoRA files in ComfyUI's `loras` folders: listing, reading with a small cache, safe save paths."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import folder_paths

from ..training.lora import LoraSet, read_lora
from ..training.lora.names import SUFFIX, BadName, check_name
from ..training.lora.read import PEFT_CONFIG, PEFT_WEIGHTS

NONE = "None"
_CACHE: "OrderedDict[tuple, LoraSet]" = OrderedDict()
_CACHE_SIZE = 8


def lora_choices() -> list[str]:
    return [NONE] + folder_paths.get_filename_list("loras")


def load_lora_file(name: str) -> LoraSet:
    """Read a file listed in the loras folders; re-reads only when the file changed on disk."""
    path = Path(folder_paths.get_full_path_or_raise("loras", name))
    key = (str(path), *file_state(path))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    lora = read_lora(path, name=name)  # errors name the file as the user picked it, never the server's path
    lora.source = name
    _CACHE[key] = lora
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return lora


def file_state(path: Path) -> tuple:
    """What identifies a file's version on disk: (mtime_ns, size), or ("missing",)."""
    try:
        stat = path.stat()
    except OSError:
        return ("missing",)
    return (stat.st_mtime_ns, stat.st_size)


def lora_file_state(name: str) -> tuple:
    """file_state of a listed LoRA and, for a PEFT file, of the adapter_config.json beside it (for fingerprints)."""
    try:
        path = Path(folder_paths.get_full_path_or_raise("loras", name))
    except Exception:  # noqa: BLE001 - not listed (any more): executing will say so
        return (name, "missing")
    config = path.parent / PEFT_CONFIG
    return (name, *file_state(path), *(file_state(config) if path.name in PEFT_WEIGHTS else ()))


def loras_root() -> Path:
    return Path(folder_paths.get_folder_paths("loras")[0]).resolve()


def display_path(path: Path) -> str:
    """A path as users see it: relative to ComfyUI's models folder (e.g. 'loras/texforce/x.safetensors'), never
    the server's absolute path."""
    path = Path(path)
    for base, prefix in ((Path(folder_paths.models_dir).resolve(), ""), (loras_root(), "loras/")):
        try:
            return prefix + path.relative_to(base).as_posix()
        except ValueError:
            continue
    return path.name


def save_path(name: str, subfolder: str = "") -> Path:
    """models/loras/<subfolder>/<name>.safetensors for a name that passes the save-name rule (names.check_name)."""
    raw = check_name(name, "save name", "/".join(["models/loras", *([subfolder] if subfolder else [])]))
    root = loras_root()
    base = root / subfolder if subfolder else root
    target = (base / raw.replace("\\", "/")).resolve()
    if target.suffix != SUFFIX:
        target = target.with_name(target.name + SUFFIX)
    if root not in target.parents:  # e.g. a sub-folder that is a link to elsewhere
        raise BadName(f"Save name {raw!r} resolves outside models/loras; choose a plain name.")
    return target
