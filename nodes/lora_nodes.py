"""TexForce LoRA Loader and LoRA Fuse: text-encoder LoRAs in every layout, stacked or fused."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..training.lora import LoraFileError, fuse_loras, save_kohya
from ..training.lora.family import FAMILIES, family_names
from ..training.lora.family_detect import lora_family
from .lora_apply import ClipLayout, clip_patches, looks_like_unet, match_to_clip, to_file_slots, unet_patches
from .lora_files import NONE, display_path, file_state, load_lora_file, lora_choices, lora_file_state, save_path

log = logging.getLogger(__name__)
MAX_ROWS = 8
# Fuse: how many times this server process wrote each target file (part of the node's fingerprint)
_WRITES: dict[str, int] = {}


def _row_inputs(weight_name: str, weight_tooltip: str, with_toggle: bool) -> list:
    inputs = []
    for i in range(1, MAX_ROWS + 1):
        inputs.append(io.Combo.Input(
            f"lora_{i}", options=lora_choices(), default=NONE, optional=True,
            tooltip="A LoRA from models/loras: kohya or diffusers .safetensors, or the adapter_model.bin / "
                    ".safetensors of a PEFT folder (official TexForce releases) with its adapter_config.json beside it."))
        inputs.append(io.Float.Input(
            f"{weight_name}_{i}", default=1.0, min=-10.0, max=10.0, step=0.05, optional=True, tooltip=weight_tooltip))
        if with_toggle:
            inputs.append(io.Boolean.Input(f"on_{i}", default=True, optional=True,
                                           tooltip="Switch this row off without losing its settings."))
    return inputs


def _rows(kwargs: dict, weight_name: str) -> list[tuple[int, str, float]]:
    rows = []
    for i in range(1, MAX_ROWS + 1):
        name = kwargs.get(f"lora_{i}") or NONE
        weight = float(kwargs.get(f"{weight_name}_{i}", 1.0))
        if name != NONE and kwargs.get(f"on_{i}", True) and weight != 0.0:
            rows.append((i, name, weight))
    return rows


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values) or "-"


def _files_fingerprint(kwargs: dict, weight_name: str) -> tuple:
    """The selected rows and the on-disk version of each file: a file replaced under the same name is read again
    (ComfyUI would otherwise reuse the cached result)."""
    return tuple((i, weight, lora_file_state(name)) for i, name, weight in _rows(kwargs, weight_name))


class TexForceLoraLoader(io.ComfyNode):
    """Stacks text-encoder LoRAs of any layout onto a CLIP (and their U-Net parts onto a MODEL)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceLoraLoader",
            display_name="TexForce LoRA Loader",
            category="TexForce/loaders",
            description="Loads text-encoder LoRAs in kohya, diffusers, PEFT (official TexForce releases) and "
                        "ComfyUI layouts, and reports what each file changed.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP to apply the text-encoder LoRAs to. It is not modified; "
                                              "a patched copy is returned."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional. When connected, U-Net parts of the files are applied to it "
                                       "(e.g. a TexForce text-encoder LoRA together with a DPOK/ReFL U-Net LoRA)."),
                *_row_inputs("strength", "Strength of this LoRA (text encoder and U-Net parts). "
                                         "Negative values subtract it.", with_toggle=True),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the LoRAs applied."),
                io.Model.Output(display_name="MODEL", tooltip="The MODEL with U-Net parts applied (or unchanged)."),
                io.String.Output(display_name="report", tooltip="Per file: layout, encoders touched, modules "
                                                                "matched, keys not matched, rank and alpha."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return _files_fingerprint(kwargs, "strength")

    @classmethod
    def execute(cls, clip, model=None, **kwargs) -> io.NodeOutput:
        layout = ClipLayout.of(clip)
        out_clip, out_model = clip.clone(), (model.clone() if model is not None else None)
        lines = []
        for i, name, strength in _rows(kwargs, "strength"):
            lora = load_lora_file(name)
            res = match_to_clip(lora, layout)
            unet, unmatched = unet_patches(lora.other, out_model)
            if not res.modules and not unet:
                if looks_like_unet(list(lora.other)) and model is None:
                    raise LoraFileError(f"{name}: holds only U-Net (or Flux / SD 3.x transformer) weights; connect a "
                                        "MODEL to this node to apply it.")
                raise LoraFileError(
                    f"{name}: no LoRA weights recognised ({len(lora.other)} keys, e.g. {next(iter(lora.other), '-')}). "
                    f"It is not a LoRA for the text encoders or diffusion model of {family_names()}.")
            if res.modules:
                out_clip.add_patches(clip_patches(res), strength)
            if unet:
                out_model.add_patches(unet, strength)
            lines += _report(i, name, strength, lora, res, len(unet), unmatched, model is not None)
        report = "\n".join(lines) or "No LoRA selected."
        log.info("TexForce LoRA Loader:\n%s", report)
        return io.NodeOutput(out_clip, out_model if out_model is not None else model, report)


def _report(i, name, strength, lora, res, n_unet, unmatched, has_model) -> list[str]:
    per_encoder = {}
    for (enc, _), _m in res.modules.items():
        per_encoder[enc] = per_encoder.get(enc, 0) + 1
    lines = [f"[{i}] {name}  strength {strength:g}",
             f"    format: {lora.format}; rank {_fmt(lora.ranks())}, alpha {_fmt(lora.alphas())}"
             + (f"; for {FAMILIES[family].label}" if (family := lora_family(lora)) else ""),
             "    text encoders: " + (", ".join(f"{e} {n} modules" for e, n in sorted(per_encoder.items())) or "none")]
    if n_unet or (lora.other and has_model):
        lines.append(f"    U-Net: {n_unet} modules")
    elif lora.other and looks_like_unet(list(lora.other)):
        lines.append(f"    U-Net part ({len(lora.other)} tensors) not applied: connect a MODEL")
    # without a MODEL, keys that are neither text-encoder nor U-Net weights would otherwise vanish from the report
    stray = [k for k in lora.other if not looks_like_unet([k])]
    not_matched = res.unmatched + (unmatched if has_model else stray)
    lines.append(f"    keys not matched: {len(not_matched)}" + (f" (e.g. {not_matched[0]})" if not_matched else ""))
    lines += [f"    note: {note}" for note in lora.notes]
    return lines


class TexForceLoraFuse(io.ComfyNode):
    """Fuses weighted text-encoder LoRAs into one file, exactly equal to stacking them."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceLoraFuse",
            display_name="TexForce LoRA Fuse",
            category="TexForce/loaders",
            is_output_node=True,
            description="Adds text-encoder LoRAs with weights into one kohya LoRA in models/loras (ranks are "
                        "stacked, so the result equals loading them together). U-Net parts are not fused.",
            inputs=[
                io.Clip.Input("clip", tooltip="The CLIP the LoRAs are for: decides the encoders (te / te1 / te2 / te3) "
                                              "and checks that every file fits."),
                io.String.Input("save_name", default="texforce/fused",
                                tooltip="File name inside models/loras (sub-folders allowed, '.safetensors' added)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of that name. Off: an existing file is an error."),
                *_row_inputs("weight", "Weight of this LoRA in the sum (TexForce fuses rewards this way).",
                             with_toggle=False),
            ],
            outputs=[
                io.Clip.Output(display_name="CLIP", tooltip="The CLIP with the fused LoRA applied."),
                io.String.Output(display_name="lora_path", tooltip="Where the fused LoRA was written."),
                io.String.Output(display_name="report", tooltip="What was fused."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, save_name: str = "", overwrite: bool = False, **kwargs):
        """Besides the inputs: the output file's state, and how often this server wrote it. A re-run then executes
        again whenever the file changed or disappeared since (ComfyUI would otherwise answer from its cache with
        a lora_path to a deleted file), and an existing file with overwrite off is refused, not reported as
        written."""
        try:
            target = save_path(save_name)
        except LoraFileError:
            return ("bad save_name", save_name)  # execute() reports it
        return (str(target), bool(overwrite), file_state(target), _WRITES.get(str(target), 0),
                _files_fingerprint(kwargs, "weight"))

    @classmethod
    def execute(cls, clip, save_name: str, overwrite: bool = False, **kwargs) -> io.NodeOutput:
        rows = _rows(kwargs, "weight")
        if not rows:
            raise LoraFileError("TexForce LoRA Fuse: select at least one LoRA with a non-zero weight.")
        target = save_path(save_name)
        if target.exists() and not overwrite:
            raise LoraFileError(f"{display_path(target)} already exists: choose another save_name or switch "
                                "overwrite on.")
        layout = ClipLayout.of(clip)
        weighted, lines = [], []
        for i, name, weight in rows:
            lora = load_lora_file(name)
            res = match_to_clip(lora, layout)
            if not res.modules:
                raise LoraFileError(f"{name}: has no text-encoder weights to fuse.")
            weighted.append((to_file_slots(res, layout, name), weight))
            lines.append(f"[{i}] {name} ×{weight:g}: {len(res.modules)} modules, rank {_fmt(lora.ranks())}")
        fused = fuse_loras(weighted, source=save_name)
        save_kohya(fused, target, family=layout.family,
                   metadata={"fused_from": [{"file": n, "weight": w} for _, n, w in rows]})
        _WRITES[str(target)] = _WRITES.get(str(target), 0) + 1
        res = match_to_clip(fused, layout)
        out_clip = clip.clone()
        out_clip.add_patches(clip_patches(res), 1.0)
        lines.append(f"wrote {display_path(target)}: {len(fused.modules)} modules, rank {_fmt(fused.ranks())}")
        return io.NodeOutput(out_clip, str(target), "\n".join(lines))
