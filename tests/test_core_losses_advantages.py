"""Policy losses (training/losses.py) and rewards → advantages (training/advantages.py)."""
from __future__ import annotations

import logging

import pytest
import torch

import conftest  # noqa: F401
from texforce_pack.training import advantages as adv_mod
from texforce_pack.training.losses import dpok_kl, ppo_clip_loss, sf_loss


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage_and_its_gradient_is_the_score_function():
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    out = ppo_clip_loss(lp, lp.detach(), adv, clip_range=1e-4, adv_clip_max=5.0)
    assert out.loss.item() == pytest.approx(-adv.mean().item())
    assert out.approx_kl.item() == 0 and out.clipfrac.item() == 0
    assert torch.equal(out.ratio, torch.ones(3))
    out.loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 3)  # = ∇ SF loss at r = 1


def test_ppo_clip_stops_the_gradient_beyond_the_clip_range_in_the_improving_direction():
    old = torch.zeros(4)
    # ratios 1.5 and 0.5, positive and negative advantages
    lp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    out = ppo_clip_loss(lp, old, adv, clip_range=0.2, adv_clip_max=5.0)
    out.loss.backward()
    # A>0 with r>1+ε and A<0 with r<1−ε are clipped (no gradient); the other two still pull back
    assert lp.grad[0] == 0 and lp.grad[3] == 0
    assert lp.grad[1] != 0 and lp.grad[2] != 0
    assert out.clipfrac.item() == 1.0
    assert out.approx_kl.item() == pytest.approx(0.5 * torch.mean(lp.detach() ** 2).item())


def test_advantages_are_clipped_in_the_loss():
    lp = torch.zeros(2, requires_grad=True)
    out = ppo_clip_loss(lp, lp.detach(), torch.tensor([100.0, -100.0]), 1e-4, adv_clip_max=5.0)
    out.loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-2.5, 2.5]))
    lp2 = torch.zeros(2, requires_grad=True)
    sf_loss(lp2, lp2.detach(), torch.tensor([100.0, -100.0]), adv_clip_max=5.0).loss.backward()
    torch.testing.assert_close(lp2.grad, torch.tensor([-2.5, 2.5]))


def test_sf_loss_is_reinforce():
    lp = torch.tensor([-1.0, -3.0], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    out = sf_loss(lp, torch.tensor([-1.0, -2.0]), adv, adv_clip_max=5.0)
    assert out.loss.item() == pytest.approx(-(2.0 * -1.0 + -1.0 * -3.0) / 2)
    assert out.approx_kl.item() == pytest.approx(0.25)  # ½ mean([0, 1])


def test_dpok_kl_is_the_gaussian_kl_per_step_with_no_gradient_to_the_reference():
    mean = torch.ones(2, 4, 2, 2, requires_grad=True)
    ref = torch.zeros(2, 4, 2, 2, requires_grad=True)
    std = torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)
    kl = dpok_kl(mean, ref, std)
    # per sample (1 − 0)²/(2σ²): 2 and 1/8, averaged over the batch
    assert kl.item() == pytest.approx((2.0 + 0.125) / 2)
    # the closed form against torch's Gaussian KL, per element, for random means
    m, r, s = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.rand(3, 1, 1, 1) + 0.1
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(m, s.expand_as(m)),
                                              torch.distributions.Normal(r, s.expand_as(r))).mean()
    assert dpok_kl(m, r, s).item() == pytest.approx(exact.item(), rel=1e-5)
    kl.backward()
    assert ref.grad is None and mean.grad.abs().sum() > 0


def test_batch_and_group_zscores():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 30.0])
    a = adv_mod.batch_advantages(r)
    assert a.mean().abs() < 1e-6 and a.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    prompts = ["a", "a", "a", "b", "b", "b"]
    g = adv_mod.group_advantages(r, prompts)
    torch.testing.assert_close(g[:3], g[3:], rtol=1e-5, atol=1e-5)  # each group normalised on its own
    torch.testing.assert_close(g[:3], adv_mod.batch_advantages(r[:3]))


def test_per_prompt_tracker_falls_back_to_batch_stats_until_min_count_then_uses_its_buffer():
    t = adv_mod.PerPromptStatTracker(buffer_size=4, min_count=4)
    prompts = ["a", "a", "b", "b"]
    r1 = torch.tensor([1.0, 3.0, 100.0, 102.0])
    torch.testing.assert_close(t.update(prompts, r1), adv_mod.batch_advantages(r1))  # 2 < min_count
    r2 = torch.tensor([5.0, 7.0, 104.0, 106.0])
    a2 = t.update(prompts, r2)  # now 4 each: per-prompt statistics, so both prompts look alike
    hist_a = torch.tensor([1.0, 3.0, 5.0, 7.0])
    expected = (r2[:2] - hist_a.mean()) / (hist_a.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(a2[:2], expected)
    torch.testing.assert_close(a2[:2], a2[2:])
    t.update(["a"], torch.tensor([9.0]))
    assert list(t.buffers["a"]) == [3.0, 5.0, 7.0, 9.0]  # deque of buffer_size
    # state round-trips through plain containers (weights_only checkpoints)
    t2 = adv_mod.PerPromptStatTracker(1, 1)
    t2.load_state_dict(t.state_dict())
    assert t2.buffer_size == 4 and t2.min_count == 4
    assert {k: list(v) for k, v in t2.buffers.items()} == {k: list(v) for k, v in t.buffers.items()}
    torch.testing.assert_close(t2.update(prompts, r2), t.update(prompts, r2))


def test_compute_advantages_dispatches_and_rejects_unknown_modes():
    r = torch.tensor([1.0, 2.0, 4.0, 8.0])
    p = ["x", "x", "y", "y"]
    torch.testing.assert_close(adv_mod.compute_advantages("batch", r, p), adv_mod.batch_advantages(r))
    torch.testing.assert_close(adv_mod.compute_advantages("group", r, p), adv_mod.group_advantages(r, p))
    assert adv_mod.compute_advantages("per_prompt", r, p, adv_mod.PerPromptStatTracker(16, 16)).shape == (4,)
    with pytest.raises(ValueError, match="unknown advantage mode"):
        adv_mod.compute_advantages("rank", r, p)


def test_non_finite_rewards_are_dropped_with_a_warning_and_all_bad_is_an_error(caplog):
    r = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    with caplog.at_level(logging.WARNING):
        keep = adv_mod.finite_mask(r, ["a", "b", "c", "d"])
    assert keep.tolist() == [True, False, True, False]
    assert "dropping 2 of 4" in caplog.text and "'b'" in caplog.text
    with pytest.raises(adv_mod.RewardError, match="all 2 rewards are NaN"):
        adv_mod.finite_mask(torch.tensor([float("nan"), -float("inf")]))


def test_with_many_prompts_the_per_prompt_tracker_gives_batch_advantages_and_group_removes_prompt_difficulty():
    """Why the `fast` preset uses a group baseline: 72 prompts, 8 per epoch, 8 images each. For the first epochs
    no prompt reaches min_count, so DDPO's tracker falls back to the batch's statistics and a hard prompt's images
    all get negative advantages whatever they show (pure noise for the gradient: E[∇log p] = 0). Group z-scores
    compare each image with its own prompt's."""
    from texforce_pack.training.advantages import PerPromptStatTracker, compute_advantages

    g = torch.Generator().manual_seed(0)
    prompts = [f"p{i}" for i in range(8) for _ in range(8)]
    difficulty = torch.arange(8, dtype=torch.float64).repeat_interleave(8)  # prompt i's mean reward is i
    rewards = (difficulty + 0.1 * torch.randn(64, generator=g, dtype=torch.float64)).float()
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    per_prompt = compute_advantages("per_prompt", rewards, prompts, tracker)
    assert torch.allclose(per_prompt, adv_mod.batch_advantages(rewards), atol=1e-5)
    assert float(per_prompt[:8].max()) < -1.0  # the hardest prompt's images: all strongly negative
    group = compute_advantages("group", rewards, prompts)
    for i in range(8):
        block = group[8 * i:8 * i + 8]
        assert abs(float(block.mean())) < 1e-5 and float(block.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_group_mean_keeps_a_solved_prompts_noise_small_where_group_zscores_blow_it_up():
    """A good pretrained model: prompt a's 8 images are all right (rewards differ by noise, ±0.002), prompt b's
    include one wrong image (0.7). Group z-scores give a's noise advantages of ±1, as loud as b's real failure;
    group_mean (one batch-wide scale) keeps a's near 0 and puts the update on b's wrong image."""
    from texforce_pack.training.advantages import compute_advantages

    solved = torch.tensor([0.981, 0.983, 0.979, 0.982, 0.980, 0.978, 0.984, 0.981])
    failing = torch.tensor([0.98, 0.98, 0.70, 0.98, 0.98, 0.98, 0.98, 0.98])
    rewards, prompts = torch.cat([solved, failing]), ["a"] * 8 + ["b"] * 8
    z = compute_advantages("group", rewards, prompts)
    assert float(z[:8].abs().max()) > 1.0  # noise amplified to the scale of a real failure
    m = compute_advantages("group_mean", rewards, prompts)
    assert float(m[:8].abs().max()) < 0.05 and float(m[10]) < -2.0
    assert abs(float(m[:8].mean())) < 1e-6 and abs(float(m[8:].mean())) < 1e-6  # each group centred on its mean
    assert float(m.pow(2).mean()) == pytest.approx(1.0, abs=1e-4)  # one scale for the batch
    # the reward's units do not matter (an affine change of the reward gives the same advantages)
    torch.testing.assert_close(m, compute_advantages("group_mean", rewards * 3 + 5, prompts), atol=1e-4, rtol=1e-4)
