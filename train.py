"""Headless trainer entry point: `python train.py --config run.yaml`, or under torchrun / accelerate launch.

See training/cli.py for the settings and README.md ("Headless and multi-GPU training") for examples.
This script lives at the repository root so that `training` and `rewards` import as packages; ComfyUI never
imports it.
"""
import sys

from rewards.registry import build_rewards
from training.cli import main

if __name__ == "__main__":
    sys.exit(main(reward_factory=build_rewards))
