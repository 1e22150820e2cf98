"""The toy world (toy/world.py) and its alignment reward: the scorer reads back what the renderer drew."""
from __future__ import annotations

import pytest
import torch

import conftest  # noqa: F401
from texforce_pack.rewards.toy_alignment import ToyAlignmentReward
from texforce_pack.toy import world


def test_scorer_reads_every_attribute_of_clean_renders():
    scenes = world.all_scenes() * 2
    images = world.render(scenes, torch.Generator().manual_seed(3))
    assert images.shape == (len(scenes), world.SIZE, world.SIZE, 3)
    correct = world.read_back(images).correct(scenes)
    assert bool(correct.all()), correct.float().mean(0)
    soft = world.alignment(images, [s.prompt for s in scenes])
    assert float(soft.min()) > 0.8


@pytest.mark.parametrize("attribute", range(4))
def test_one_wrong_attribute_costs_the_strict_score_and_lowers_the_soft_one(attribute):
    scenes = world.all_scenes()
    images = world.render(scenes, torch.Generator().manual_seed(4))
    values = [list(world.COLOURS), list(world.SHAPES), list(world.POSITIONS), list(world.BACKGROUNDS)][attribute]

    def other(scene):
        v = list(scene.values())
        v[attribute] = values[(values.index(v[attribute]) + 1) % len(values)]
        return world.Scene(*v).prompt

    right, wrong = [s.prompt for s in scenes], [other(s) for s in scenes]
    assert float(world.alignment(images, wrong, strict=True).max()) == 0.0
    drop = world.alignment(images, right) - world.alignment(images, wrong)
    assert float(drop.min()) > 0.1  # a quarter of the reward is that attribute's probability


def test_an_empty_image_has_no_colour_shape_or_place():
    blank = torch.full((2, 64, 64, 3), 0.94)
    prompts = ["a red circle on the left, white background", "a blue square at the top, black background"]
    r = world.alignment(blank, prompts)
    # background right (≈1) for the first, wrong for the second; the other three at chance
    assert r[0] == pytest.approx((1 + 1 / 4 + 1 / 3 + 1 / 4) / 4, abs=0.02)
    assert float(r[1]) < 0.25


def test_held_out_combinations_are_a_quarter_and_every_value_is_still_trained():
    train, held = world.training_scenes(), world.held_out_scenes()
    assert len(held) == 24 and len(train) == 72 and not set(train) & set(held)
    for i, values in enumerate([world.COLOURS, world.SHAPES, world.POSITIONS, world.BACKGROUNDS]):
        assert {s.values()[i] for s in train} == set(values)
        assert {s.values()[i] for s in held} == set(values)


def test_prompts_and_their_phrasings_parse_back_and_foreign_prompts_are_refused_with_an_example():
    for s in world.all_scenes():
        assert world.parse_prompt(s.prompt) == s
        assert world.parse_prompt("  " + s.prompt.upper()) == s
    reward = ToyAlignmentReward()
    scene = world.all_scenes()[7]
    for text in scene.phrasings()[1:]:  # the other ways to write it read back as the same scene
        assert world.parse_prompt(text) == scene
    canonical = reward(world.render([scene] * 2, torch.Generator().manual_seed(0)), [scene.prompt] * 2)
    other = reward(world.render([scene] * 2, torch.Generator().manual_seed(0)), scene.phrasings()[1:3])
    assert torch.equal(canonical, other)
    held, train = world.rephrased(world.held_out_scenes()), world.rephrased(world.training_scenes())
    assert len(held) == 24 * 7 and len(train) == 72 * 7 and not set(held) & set(train)
    assert not {world.parse_prompt(t) for t in held} & {world.parse_prompt(t) for t in train}
    with pytest.raises(ValueError, match="not a toy-world prompt: 'a photo of a cat'.*e.g. 'a red circle"):
        reward(torch.zeros(1, 64, 64, 3), ["a photo of a cat"])
    with pytest.raises(ValueError, match="mode must be"):
        ToyAlignmentReward("exact")


def test_node_optimizer_steps_set_the_accumulation():
    from texforce_pack.nodes.train_node import node_accumulation
    from texforce_pack.training.config import ConfigError

    assert node_accumulation(32, 4, "texforce") == 4  # 8 micro-batches, the preset's 2 steps
    assert node_accumulation(32, 8, "fast") == 1  # 4 micro-batches, fast's 4 steps
    assert node_accumulation(32, 4, "texforce", optimizer_steps=8) == 1
    assert node_accumulation(12, 4, "texforce") == 3  # 3 micro-batches do not split in 2: one step
    with pytest.raises(ConfigError, match="optimizer_steps = 3 does not divide the epoch's 8 micro-batches"):
        node_accumulation(32, 4, "texforce", optimizer_steps=3)


def test_build_captions_start_with_each_canonical_prompt_and_phrase_every_attribute():
    """The toy build's phrasings: the prompt RL and the scorer use comes first, the others are distinct and still
    name the scene's colour, shape and background (the U-Net must learn the same scene from each)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "build_toy_model.py"
    spec = importlib.util.spec_from_file_location("texforce_build_toy_model", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    scenes = world.all_scenes()
    one, index_one = build.captions(world, 1)
    assert one == [s.prompt for s in scenes] and index_one == list(range(len(scenes)))
    texts, index = build.captions(world, 8)
    assert len(texts) == 8 * len(scenes) and index == [i for i in range(len(scenes)) for _ in range(8)]
    for i, scene in enumerate(scenes):
        mine = texts[8 * i:8 * i + 8]
        assert mine[0] == scene.prompt and len(set(mine)) == 8
        assert all(scene.colour in t and scene.shape in t and scene.background in t for t in mine)


def test_toy_checkpoint_node_gives_the_prompts_or_their_other_phrasings():
    from texforce_pack.nodes.toy_nodes import TexForceToyCheckpoint

    out = TexForceToyCheckpoint.execute().result
    assert out[3].splitlines() == [s.prompt for s in world.training_scenes()]
    assert out[4].splitlines() == [s.prompt for s in world.held_out_scenes()]
    out = TexForceToyCheckpoint.execute(phrasing="rephrased").result
    assert out[3].splitlines() == world.rephrased(world.training_scenes())
    assert out[4].splitlines() == world.rephrased(world.held_out_scenes())
    with pytest.raises(ValueError, match="phrasing must be one of prompt, rephrased"):
        TexForceToyCheckpoint.execute(phrasing="casual")
