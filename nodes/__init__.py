"""ComfyUI node classes: schemas and thin calls into training/ and rewards/."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .lora_nodes import TexForceLoraFuse, TexForceLoraLoader
from .reward_nodes import (TexForceDiversityReward, TexForceJPEGReward, TexForceRewardMix,
                           TexForceRewardModelLoader, TexForceScoreImages)
from .train_node import TexForceTrain


class TexForceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [TexForceLoraLoader, TexForceLoraFuse, TexForceTrain, TexForceJPEGReward,
                TexForceRewardModelLoader,
                TexForceDiversityReward,
                TexForceRewardMix,
                TexForceScoreImages]
