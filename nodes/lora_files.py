"""LoRA files in ComfyUI's `loras` folders: listing, reading with a small cache, safe save paths."""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import folder_paths

from ..training.lora import LoraFileError, LoraSet, read_lora

NONE = "None"
_CACHE: "OrderedDict[tuple, LoraSet]" = OrderedDict()
_CACHE_SIZE = 8


def lora_choices() -> list[str]:
    return [NONE] + folder_paths.get_filename_list("loras")


def load_lora_file(name: str) -> LoraSet:
    """Read a file listed in the loras folders; re-reads only when the file changed on disk."""
    path = Path(folder_paths.get_full_path_or_raise("loras", name))
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    lora = read_lora(path)
    lora.source = name
    _CACHE[key] = lora
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return lora


def save_path(name: str, subfolder: str = "") -> Path:
    """models/loras/<subfolder>/<name>.safetensors, refusing names that would leave that folder."""
    raw = name.strip()
    if not raw:
        raise LoraFileError("The save name is empty: give the LoRA a name such as 'my_fused_lora'.")
    if os.path.isabs(raw) or raw.startswith(("/", "\\")) or ".." in Path(raw.replace("\\", "/")).parts or ":" in raw:
        raise LoraFileError(
            f"Save name {name!r} must be a plain name or a sub-folder path inside models/loras "
            "(no '..', no absolute path, no drive letter)."
        )
    root = Path(folder_paths.get_folder_paths("loras")[0]).resolve()
    base = root / subfolder if subfolder else root
    target = (base / raw.replace("\\", "/")).resolve()
    if target.suffix != ".safetensors":
        target = target.with_name(target.name + ".safetensors")
    if root not in target.parents:
        raise LoraFileError(f"Save name {name!r} resolves outside models/loras ({root}); choose a plain name.")
    return target
