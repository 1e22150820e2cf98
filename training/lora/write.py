"""Write LoRAs as kohya safetensors: the layout ComfyUI's stock loader, Forge and A1111 all read."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .family import FAMILIES, FILE_SLOTS, path_to_kohya_module
from .types import LoraFileError, LoraSet


def kohya_state_dict(lora: LoraSet, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """`lora_te*_<module>.lora_down/.lora_up/.alpha` for every module; slots must be kohya's (te, te1, te2; te3 for
    T5-XXL, as sd-scripts and ComfyUI's loader name it for SD 3.x and Flux)."""
    out: dict[str, torch.Tensor] = {}
    for (slot, path), m in sorted(lora.modules.items()):
        if slot not in FILE_SLOTS:
            raise LoraFileError(f"{lora.source}: module {path} is on encoder {slot!r}; map it to one of the kohya "
                                f"slots {'/'.join(FILE_SLOTS)} before writing")
        name = f"lora_{slot}_{path_to_kohya_module(path)}"
        out[f"{name}.lora_down.weight"] = m.down.detach().to("cpu", dtype).contiguous()
        out[f"{name}.lora_up.weight"] = m.up.detach().to("cpu", dtype).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def kohya_metadata(lora: LoraSet, family: str | None, extra: dict[str, object] | None = None) -> dict[str, str]:
    """kohya's ss_* fields (rank, alpha, base model) plus our own texforce.* fields, all as strings."""
    ranks, alphas = lora.ranks(), lora.alphas()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks)) if ranks else "0",
        "ss_network_alpha": str(alphas[0] if len(alphas) == 1 else max(alphas, default=0.0)),
        "ss_network_args": json.dumps({"text_encoder_only": True}),
    }
    if family:
        entry = FAMILIES.get(family)
        # kohya's ss_base_model_version, which A1111/Forge show and some tools filter on
        meta["ss_base_model_version"] = entry.kohya_version if entry else family
        meta["ss_v2"] = str(bool(entry and entry.kohya_v2))
        meta["texforce.family"] = family
    for key, value in (extra or {}).items():
        meta[key if key.startswith(("ss_", "texforce.")) else f"texforce.{key}"] = (
            value if isinstance(value, str) else json.dumps(value))
    return meta


def save_kohya(lora: LoraSet, path: str | Path, family: str | None = None,
               metadata: dict[str, object] | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write atomically (temp file + rename), so a crash never leaves a half-written LoRA behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = kohya_state_dict(lora, dtype)
    meta = kohya_metadata(lora, family, metadata)
    # a short temporary name: the final name may already be as long as file systems allow
    fd, tmp = tempfile.mkstemp(prefix=".texforce-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
