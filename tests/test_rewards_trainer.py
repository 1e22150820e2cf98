"""The Trainer's side of the reward contract (training/reward.py): a mix is recognised by what it offers, and
only a mix's running statistics go into the checkpoint (a model reward's weights never do)."""
from __future__ import annotations

import torch

import conftest  # noqa: F401
from texforce_pack.rewards.jpeg import JpegReward
from texforce_pack.rewards.mix import RewardMix
from texforce_pack.training.config import make_config
from texforce_pack.training.loop import Trainer
from texforce_pack.training.reward import MixedReward
from toy_host import ToyHost

torch.set_num_threads(1)

PROMPTS = ["a red cat", "a blue dog"]
SMALL = dict(num_steps=3, height=32, width=32, images_per_epoch=4, images_per_prompt=2, sample_batch_size=4,
             train_batch_size=2, gradient_accumulation_steps=2, epochs=1, warmup_fraction=0.0)


class BrightnessModel(torch.nn.Module):
    """A reward with weights, like the learned ones: it has state_dict/load_state_dict but is no mix."""

    name = "brightness"

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((64,), 2.0))

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return (images.mean(dim=(1, 2, 3)) * self.scale[0]).detach()


def contrast(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return images.std(dim=(1, 2, 3))


def test_a_mix_is_recognised_by_what_it_offers():
    assert isinstance(RewardMix([BrightnessModel(), contrast], [1.0, 1.0]), MixedReward)
    for plain in (BrightnessModel(), JpegReward(), contrast):
        assert not isinstance(plain, MixedReward)


def test_only_a_mix_keeps_its_statistics_in_the_checkpoint():
    model_reward = BrightnessModel()
    tr = Trainer(ToyHost(0), model_reward, PROMPTS, make_config("texforce", **SMALL))
    tr.run(1)
    assert "reward_state" not in tr.state_dict()

    mix = RewardMix([model_reward, contrast], [1.0, 0.5])
    tr = Trainer(ToyHost(0), mix, PROMPTS, make_config("texforce", **SMALL))
    tr.run(1)
    state = tr.state_dict()
    assert state["reward_state"] == mix.state_dict() and state["reward_state"]["stats"][0]["count"] == 4
    fresh = RewardMix([BrightnessModel(), contrast], [1.0, 0.5])
    resumed = Trainer(ToyHost(0), fresh, PROMPTS, make_config("texforce", **SMALL))
    resumed.load_state_dict(state)
    assert fresh.state_dict() == mix.state_dict()
