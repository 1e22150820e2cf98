"""Convert PEFT / diffusers / ComfyUI text-encoder LoRAs to kohya safetensors for Forge and A1111.

    cd <this pack> && python -m training.lora.convert INPUT [OUTPUT.safetensors] [--family sd1|sd2|sdxl|sd3|flux]

INPUT is a .safetensors/.bin file or a PEFT folder (adapter_config.json + adapter_model.*). T5-XXL modules of
SD 3.x and Flux files are written as te3, the slot kohya's sd-scripts and ComfyUI's loader use for them.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .family import FAMILIES, file_slots, listed
from .family_detect import certain_family, describe_lora, lora_families
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


def _recorded_family(lora: LoraSet, family: str | None) -> str | None:
    """The family to record in the output: the one asked for, else the one the file names for certain (on the
    kohya slots: a lone 768-wide clip_l is SD 1.x here). A file that fits several families gets none, with a note
    saying how to record it: a guess written down would make the pack refuse the file on the others."""
    fits = lora_families(lora)
    if family:
        if fits and family not in fits:
            raise LoraFileError(f"{lora.source}: --family {family} does not fit this LoRA, which is for "
                                f"{describe_lora(lora)}; pass --family {'|'.join(fits)}, or leave it out.")
        return family
    found = certain_family(lora)
    if found is None and len(fits) > 1:
        names = listed((FAMILIES[f].name for f in fits), "or")
        lora.notes.append(f"the file fits {names} and names none of them; no family recorded (pass --family "
                          f"{'|'.join(fits)} to record one)")
    return found


def convert(src: Path, dst: Path, family: str | None = None) -> tuple[Path, LoraSet]:
    lora = read_lora(src)
    if not lora.modules:
        raise LoraFileError(f"{src}: no text-encoder LoRA weights found ({len(lora.other)} other keys); nothing to convert.")
    out = _to_file_slots(lora)
    meta = {"converted_from": str(src.name), "source_format": lora.format}
    return save_kohya(out, dst, family=_recorded_family(out, family), metadata=meta), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.lora.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="LoRA file or PEFT folder")
    parser.add_argument("output", type=Path, nargs="?", help="output .safetensors (default: beside the input)")
    parser.add_argument("--family", choices=list(FAMILIES), help="base model family for the metadata (if left "
                                                                 "out: the one the file names, when only one fits)")
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
