"""Test helper run as a separate process (plain, or under torchrun): the real headless CLI (training/cli.py)
with a reward from the real registry, plus what the tests need to watch it from outside:

- TRACE_DIR: after every optimizer step, this rank's LoRA parameters are saved as
  TRACE_DIR/rank<r>_step<n>.pt (the loop's own _optimizer_step is wrapped; nothing else changes);
- INTERRUPT_AT_CALL: the reward raises KeyboardInterrupt on that call (1-based), as Ctrl-C would;
- FAIL_RANK / FAIL_AT_CALL: the reward raises RuntimeError on that rank at that call (a rank that dies).
"""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # as train.py at the repository root has it

import torch  # noqa: E402

import training.loop as loop  # noqa: E402
from rewards.registry import build_rewards  # noqa: E402
from training.cli import main  # noqa: E402
from training.reward import MixedReward  # noqa: E402

TRACE_DIR = os.environ.get("TRACE_DIR")
_original_step = loop.Trainer._optimizer_step
_steps = {"n": 0}


def traced_step(self, info):
    _original_step(self, info)
    _steps["n"] += 1
    if TRACE_DIR:
        params = [p.detach().float().cpu().clone() for p in self.params]
        torch.save(params, Path(TRACE_DIR) / f"rank{self.dist.rank}_step{_steps['n']}.pt")


loop.Trainer._optimizer_step = traced_step


class InjectedFaults:
    """The real reward, with the faults the environment asks for injected at its n-th scoring call. Everything
    else (a mix's score_components / combine / state_dict) is the real reward's own."""

    def __init__(self, reward):
        self.reward = reward
        self.rank = int(os.environ.get("RANK", "0"))
        self.interrupt_at = int(os.environ.get("INTERRUPT_AT_CALL", "0"))
        self.fail_rank, self.fail_at = int(os.environ.get("FAIL_RANK", "-1")), int(os.environ.get("FAIL_AT_CALL", "0"))
        self.calls = 0
        if isinstance(reward, MixedReward):  # the trainer scores a mix's components, then combines the epoch
            self.score_components = self._score_components
            # stated here, not left to __getattr__: protocol isinstance checks look attributes up statically
            self.combine, self.state_dict, self.load_state_dict = (reward.combine, reward.state_dict,
                                                                   reward.load_state_dict)

    def _count(self) -> None:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        if self.rank == self.fail_rank and self.calls == self.fail_at:
            raise RuntimeError("the reward model ran out of memory (injected by the test)")

    def __call__(self, images, prompts):
        self._count()
        return self.reward(images, prompts)

    def _score_components(self, images, prompts):
        self._count()
        return self.reward.score_components(images, prompts)

    def __getattr__(self, name):  # name and the rest: the real reward's
        if name in ("reward", "score_components"):
            raise AttributeError(name)
        return getattr(self.reward, name)


def factory(specs, base_dir, device, normalize):
    return InjectedFaults(build_rewards(specs, base_dir=base_dir, device=device, normalize=normalize))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], reward_factory=factory))
