"""The embedded toy text-to-image model and its alignment reward, as nodes: try training with nothing downloaded.

The checkpoint (toy/texforce_toy.safetensors, built by scripts/build_toy_model.py) is a small pretrained
SD 1.x-architecture model of a world of coloured shapes; the reward reads back from an image whether it
shows what the prompt names. Together they show RL on the text encoder making a model measurably better
in minutes on a CPU (README: "What training does to a pretrained model").
"""
from __future__ import annotations

from comfy_api.latest import io

from ..rewards.toy_alignment import MODES, ToyAlignmentReward
from ..toy import world
from .reward_nodes import Reward

_CACHE: dict = {}
# phrasing setting -> the prompts of a list of scenes
PHRASING_CHOICES = {"prompt": lambda scenes: [s.prompt for s in scenes], "rephrased": world.rephrased}


class TexForceToyCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceToyCheckpoint",
            display_name="TexForce Toy Checkpoint",
            category="TexForce/examples",
            description="A small pretrained text-to-image model that ships with the pack (64×64 images, SD 1.x "
                        "architecture, the real SD 1.x tokenizer): it draws one coloured shape, placed left/right/"
                        "top/bottom, on a black or white background, e.g. 'a red circle on the left, white "
                        "background'. Good, not perfect: train it with the TexForce Toy Alignment Reward to see RL "
                        "on the text encoder improve a model in minutes on a CPU.",
            inputs=[io.Combo.Input("phrasing", options=list(PHRASING_CHOICES), default="prompt", optional=True,
                                   tooltip="prompt: the prompts as the model learned them (72 training, 24 held "
                                           "out); it follows them well. rephrased: the same scenes written 7 other "
                                           "ways ('a circle, red, at the left, black background'; 504 training, "
                                           "168 held out): the model follows them much worse, because its text "
                                           "encoder does not carry them to the U-Net as it carries the prompts it "
                                           "learned. That gap is what training the text encoder can close.")],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output(),
                     io.String.Output(display_name="training_prompts",
                                      tooltip="The prompts meant for training (one per line)."),
                     io.String.Output(display_name="held_out_prompts",
                                      tooltip="The attribute combinations kept out of training, to check that "
                                              "what the LoRA learned carries over to prompts it never saw.")],
        )

    @classmethod
    def execute(cls, phrasing: str = "prompt") -> io.NodeOutput:
        from ..toy.comfy_model import load_toy

        if phrasing not in PHRASING_CHOICES:
            raise ValueError(f"phrasing must be one of {', '.join(PHRASING_CHOICES)}, got {phrasing!r}")
        if "toy" not in _CACHE:
            _CACHE["toy"] = load_toy()
        model, clip, vae = _CACHE["toy"]
        prompts = PHRASING_CHOICES[phrasing]
        train = "\n".join(prompts(world.training_scenes()))
        held = "\n".join(prompts(world.held_out_scenes()))
        return io.NodeOutput(model.clone(), clip.clone(), vae, train, held)


class TexForceToyAlignmentReward(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TexForceToyAlignmentReward",
            display_name="TexForce Toy Alignment Reward",
            category="TexForce/examples",
            description="For the TexForce Toy Checkpoint: reads colour, shape, place and background back from each "
                        "image and compares them with its prompt (GenEval in miniature; no model weights).",
            inputs=[io.Combo.Input("mode", options=list(MODES), default="soft",
                                   tooltip="soft: mean over the four attributes of the probability the scorer gives "
                                           "the named value (0..1, smooth: best for training). strict: 1 when all "
                                           "four are right, else 0 (GenEval's accuracy).")],
            outputs=[Reward.Output(display_name="reward", tooltip="Alignment of each image with its prompt, 0..1.")],
        )

    @classmethod
    def execute(cls, mode: str = "soft") -> io.NodeOutput:
        return io.NodeOutput(ToyAlignmentReward(mode))
