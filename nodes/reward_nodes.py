"""Reward nodes: each outputs a TEXFORCE_REWARD that TexForceTrain (and scoring nodes) can use."""
from __future__ import annotations

from comfy_api.latest import io

from ..rewards.jpeg import JpegReward

Reward = io.Custom("TEXFORCE_REWARD")


class TexForceJPEGReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceJPEGReward",
            display_name="TexForce JPEG Reward",
            category="TexForce/rewards",
            description="DDPO's JPEG reward: the file size of each image saved as JPEG (quality 95). "
                        "Needs no model weights, so training works out of the box.",
            inputs=[
                io.Combo.Input("mode", options=["compressibility", "incompressibility"], default="compressibility",
                               tooltip="compressibility rewards smaller files (simpler, smoother images); "
                                       "incompressibility rewards larger files (more detail and texture)."),
                io.Int.Input("quality", default=95, min=1, max=100,
                             tooltip="JPEG quality used to measure the size (DDPO uses 95)."),
            ],
            outputs=[Reward.Output(display_name="reward", tooltip="Score: −kB (compressibility) or +kB.")],
        )

    @classmethod
    def execute(cls, mode: str, quality: int = 95) -> io.NodeOutput:
        return io.NodeOutput(JpegReward(mode, quality))
