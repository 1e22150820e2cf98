"""Convert PEFT / diffusers / ComfyUI text-encoder LoRAs to kohya safetensors for Forge and A1111.

    cd <this pack> && python -m training.lora.convert INPUT [OUTPUT.safetensors] [--family sd1|sd2|sdxl]

INPUT is a .safetensors/.bin file or a PEFT folder (adapter_config.json + adapter_model.*).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .family import FAMILIES, file_slots
from .family_detect import lora_family
from .read import read_lora
from .types import LoraFileError, LoraSet
from .write import save_kohya

log = logging.getLogger("texforce.convert")


def _to_file_slots(lora: LoraSet) -> LoraSet:
    """ComfyUI's encoder-named keys become kohya slots; a lone 'te' of an SDXL file becomes te1."""
    rename = file_slots(lora.slots)
    out = LoraSet(source=lora.source, format="kohya", metadata=lora.metadata, notes=list(lora.notes))
    for (slot, path), m in lora.modules.items():
        out.modules[(rename.get(slot, slot), path)] = m
    return out


def convert(src: Path, dst: Path, family: str | None = None) -> tuple[Path, LoraSet]:
    lora = read_lora(src)
    if not lora.modules:
        raise LoraFileError(f"{src}: no text-encoder LoRA weights found ({len(lora.other)} other keys); nothing to convert.")
    out = _to_file_slots(lora)
    family = family or lora_family(out)  # on the kohya slots: a lone 768-wide clip_l is SD 1.x here
    meta = {"converted_from": str(src.name), "source_format": lora.format}
    return save_kohya(out, dst, family=family, metadata=meta), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.lora.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="LoRA file or PEFT folder")
    parser.add_argument("output", type=Path, nargs="?", help="output .safetensors (default: beside the input)")
    parser.add_argument("--family", choices=list(FAMILIES), help="base model family for the metadata "
                                                                 "(guessed from the weights if left out)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    src = args.input
    dst = args.output or (src / f"{src.name}_kohya.safetensors" if src.is_dir() else src.with_name(src.stem + "_kohya.safetensors"))
    try:
        path, lora = convert(src, dst, args.family)
    except LoraFileError as e:
        log.error("error: %s", e)
        return 2
    for note in lora.notes:
        log.info("note: %s", note)
    log.info("wrote %s: %d modules (slots %s), rank %s", path, len(lora.modules), ", ".join(lora.slots),
             "/".join(map(str, lora.ranks())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
