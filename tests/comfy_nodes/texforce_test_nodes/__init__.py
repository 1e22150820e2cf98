"""Test-only ComfyUI nodes (never shipped): tiny seeded checkpoints so workflows run in a real server."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import tiny_models


class TexForceTestTinyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceTestTinyCheckpoint",
            display_name="TexForce Test Tiny Checkpoint",
            category="TexForce/testing",
            inputs=[io.Combo.Input("family", options=["sd1", "sd2", "sdxl", "sd3", "flux"], default="sd1"),
                    io.Int.Input("seed", default=0, min=0, max=2**31),
                    io.Boolean.Input("prompt_controls_image", default=False, optional=True,
                                     tooltip="the tiny model whose text pathway controls the image (learning "
                                             "tests, the demo); sd1: v-prediction with output gain 20")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, family: str, seed: int, prompt_controls_image: bool = False) -> io.NodeOutput:
        if prompt_controls_image and family == "sd1":
            return io.NodeOutput(tiny_models.tiny_model(seed, True, v_prediction=True, output_gain=20),
                                 tiny_models.tiny_clip(family, seed, True), tiny_models.tiny_vae(seed, True))
        return io.NodeOutput(*tiny_models.tiny_checkpoint(family, seed, prompt_controls_image))


class _Extension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TexForceTestTinyCheckpoint]


async def comfy_entrypoint() -> ComfyExtension:
    return _Extension()
