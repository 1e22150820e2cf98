"""ComfyUI node classes: schemas and thin calls into training/ and rewards/."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .lora_nodes import TexForceLoraFuse, TexForceLoraLoader
from .progress import register_routes
from .reward_nodes import (TexForceDiversityReward, TexForceJPEGReward, TexForceRewardMix,
                           TexForceRewardModelLoader, TexForceScoreImages)
from .train_node import TexForceTrain


class TexForceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_routes()  # read-only /texforce/ routes for the browser's training chart (needs a PromptServer)
        return [TexForceLoraLoader, TexForceLoraFuse, TexForceTrain, TexForceJPEGReward,
                TexForceRewardModelLoader,
                TexForceDiversityReward,
                TexForceRewardMix,
                TexForceScoreImages]
