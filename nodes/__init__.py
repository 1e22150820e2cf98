"""ComfyUI node classes: schemas and thin calls into training/ and rewards/."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .lora_nodes import TexForceLoraFuse, TexForceLoraLoader
from .progress import register_routes
from .reward_nodes import (TexForceDiversityReward, TexForceJPEGReward, TexForceRewardMix,
                           TexForceRewardModelLoader, TexForceScoreImages)
from .evaluate_node import TexForceCompare
from .toy_nodes import TexForceToyAlignmentReward, TexForceToyCheckpoint
from .train_node import TexForceTrain
from ..rewards.base import RewardInputError
from ..rewards.weights import BadWeightsError, MissingWeightsError
from ..training.advantages import RewardError
from ..training.checkpoint import CheckpointError
from ..training.config import ConfigError
from ..training.lora import LoraFileError
from ..training.lora.names import BadName
from ..training.loop import TrainingCancelled

# ComfyUI reports an error as "<module of its class>.<class name>", and it imports a custom-node folder under the
# folder's absolute path: LoraFileError would read '/home/.../ComfyUI-TexForce.training.lora.types.LoraFileError'.
for _error in (LoraFileError, BadName, ConfigError, CheckpointError, RewardError, RewardInputError,
               MissingWeightsError, BadWeightsError, TrainingCancelled):
    _error.__module__ = "texforce"


class TexForceExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_routes()  # read-only /texforce/ routes for the browser's training chart (needs a PromptServer)
        return [TexForceLoraLoader, TexForceLoraFuse, TexForceTrain, TexForceJPEGReward,
                TexForceRewardModelLoader,
                TexForceDiversityReward,
                TexForceRewardMix,
                TexForceScoreImages,
                TexForceCompare,
                TexForceToyCheckpoint,
                TexForceToyAlignmentReward]
