"""training/flow_step.py, the Flow-GRPO SDE step: its Gaussian and log-prob in closed form, marginals kept on a
distribution whose exact velocity is known, the ODE limit, ratio exactly 1, gradients against finite differences."""
from __future__ import annotations

import math

import pytest
import torch

import conftest  # noqa: F401  (loads the pack as texforce_pack)
from texforce_pack.training import flow_step as flow


def _batch(seed: int = 0, shape=(3, 4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_step_is_the_papers_gaussian_and_the_log_prob_is_its_density():
    x, v, noise = _batch()
    t, t_prev, a = 0.6, 0.5, 0.7
    prev, log_prob, mean, std = flow.flow_sde_step(x, v, t, t_prev, a, noise=noise)
    sigma = a * math.sqrt(t / (1 - t))
    dt = t - t_prev
    expected_mean = x - (v + sigma ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(std, torch.tensor(sigma * math.sqrt(dt)))
    torch.testing.assert_close(prev, expected_mean + sigma * math.sqrt(dt) * noise)
    density = torch.distributions.Normal(expected_mean, sigma * math.sqrt(dt)).log_prob(prev)
    torch.testing.assert_close(log_prob, density.mean(dim=(1, 2, 3)))


def test_first_step_at_t_1_uses_the_next_t_for_sigma():
    x, v, noise = _batch(1)
    _, log_prob, _, std = flow.flow_sde_step(x, v, 1.0, 0.9, 0.7, noise=noise)
    assert torch.isfinite(log_prob).all()
    torch.testing.assert_close(std, torch.tensor(0.7 * math.sqrt(0.9 / 0.1) * math.sqrt(0.1)))


def test_noise_level_0_is_the_euler_ode_step_with_log_prob_0_per_sample():
    x, v, noise = _batch(2)
    level = torch.tensor([0.0, 0.7, 0.0])
    prev, log_prob, _, _ = flow.flow_sde_step(x, v, 0.5, 0.45, level, noise=noise)
    torch.testing.assert_close(prev[0], x[0] - 0.05 * v[0])
    torch.testing.assert_close(prev[2], x[2] - 0.05 * v[2])
    assert log_prob[0] == 0 and log_prob[2] == 0 and log_prob[1] != 0


def test_the_sde_keeps_the_flow_marginals_to_second_order():
    """x0 ~ N(0, s²), ε ~ N(0, 1): x_t ~ N(0, (1−t)²s² + t²) and the exact velocity is E[ε − x0 | x_t] = c_t·x_t,
    c_t = (t − (1−t)s²)/((1−t)²s² + t²). The step is then x_{t−Δ} = m·x_t + std·ε (m from the step's mean at x = 1),
    so the variance it lands on is var(t)·m² + std², computed exactly. It must match the marginal at t − Δ with an
    error that shrinks as Δ² (a first-order method: O(Δ) local drift, O(Δ²) local error), for the ODE and the SDE
    alike; the ODE's drift with the SDE's noise added is off by σ²Δ, first order."""
    s2, t = 0.25, 0.7
    var = lambda u: (1 - u) ** 2 * s2 + u ** 2  # noqa: E731
    c = (t - (1 - t) * s2) / var(t)
    one = torch.ones(1, 1)

    def landed_variance(level: float, dt: float) -> float:
        _, _, mean, std = flow.flow_sde_step(one, c * one, t, t - dt, level, noise=torch.zeros(1, 1))
        return var(t) * mean.item() ** 2 + float(std) ** 2

    for level in (0.0, 0.7, 1.0):
        errors = [abs(landed_variance(level, dt) - var(t - dt)) for dt in (0.02, 0.01)]
        assert errors[1] < 0.01 * 0.01 * 40, (level, errors)  # O(Δ²) with a modest constant
        assert 3.0 < errors[0] / errors[1] < 5.0, (level, errors)  # halving Δ quarters the error
    sigma2 = 0.49 * t / (1 - t)
    wrong = abs(var(t) * (1 - c * 0.01) ** 2 + sigma2 * 0.01 - var(t - 0.01))  # ODE drift + SDE noise
    assert wrong > 10 * abs(landed_variance(0.7, 0.01) - var(t - 0.01))


def test_scoring_its_own_sample_gives_ratio_exactly_1():
    x, v, noise = _batch(4)
    prev, lp_sample, _, _ = flow.flow_sde_step(x, v, 0.8, 0.75, 0.7, noise=noise)
    _, lp_score, _, _ = flow.flow_sde_step(x, v.clone(), 0.8, 0.75, 0.7, prev_sample=prev)
    assert torch.equal(torch.exp(lp_score - lp_sample), torch.ones(3))


def test_log_prob_gradient_matches_finite_differences():
    x, v, noise = _batch(5, shape=(2, 3, 4, 4))
    prev, _, _, _ = flow.flow_sde_step(x, v, 0.5, 0.4, 0.7, noise=noise)
    x, prev = x.double(), prev.double()
    v = v.double().requires_grad_(True)
    # the step runs in fp32; the finite difference is taken on the closed form in float64
    def surrogate(vel):
        sigma = 0.7 * math.sqrt(0.5 / 0.5)
        mean = x - (vel + sigma ** 2 / (2 * 0.5) * (x + 0.5 * vel)) * 0.1
        std = sigma * math.sqrt(0.1)
        return (-((prev - mean) ** 2) / (2 * std ** 2)).mean(dim=(1, 2, 3)).sum()
    _, lp, _, _ = flow.flow_sde_step(x, v, 0.5, 0.4, 0.7, prev_sample=prev)
    (grad,) = torch.autograd.grad(lp.sum(), v)
    direction = torch.randn(v.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h = 1e-4
    fd = (surrogate(v.detach() + h * direction) - surrogate(v.detach() - h * direction)) / (2 * h)
    assert abs((grad.double() * direction).sum().item() - fd.item()) < 1e-3 * max(1.0, abs(fd.item()))


def test_velocity_from_a_comfy_flow_models_denoised_output():
    x, v, _ = _batch(7)
    t = torch.tensor([0.9, 0.5, 0.1])
    denoised = x - t.view(-1, 1, 1, 1) * v  # ComfyUI's CONST: x0 = x − σ·v with σ = t
    torch.testing.assert_close(flow.velocity_from_denoised(x, denoised, t), v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"t": 0.4, "t_prev": 0.5}, "smaller t_prev"),
    ({"t": 0.5, "t_prev": 0.4, "noise_level": -0.1}, "≥ 0"),
])
def test_bad_steps_are_refused(kwargs, message):
    x, v, noise = _batch()
    with pytest.raises(ValueError, match=message):
        flow.flow_sde_step(x, v, noise=noise, **kwargs)


def test_shifted_times_are_comfys_flow_shift():
    t = flow.shifted_times(4, shift=3.0)
    s = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    torch.testing.assert_close(t, 3 * s / (1 + 2 * s))
    assert t[0] == 1 and t[-1] == 0 and bool((t[1:] < t[:-1]).all())
    torch.testing.assert_close(flow.shifted_times(4), s)
    with pytest.raises(ValueError, match="shift"):
        flow.shifted_times(4, shift=0)


@pytest.mark.parametrize("level", [0.0, 0.7])
def test_a_whole_chain_from_noise_lands_on_the_data_distribution(level):
    """FlowSchedule.step from t = 1 (pure noise) to 0 with the exact velocity of x0 ~ N(0, s²): the variance it
    lands on (propagated exactly through the linear steps) converges to s² as the steps get finer."""
    s2 = 0.25
    one = torch.ones(1, 1)

    def landed(num_steps: int) -> float:
        sched = flow.FlowSchedule(flow.shifted_times(num_steps, shift=3.0))
        var = 1.0
        for i in range(len(sched)):
            t = float(sched.times[i])
            c = (t - (1 - t) * s2) / ((1 - t) ** 2 * s2 + t ** 2)
            _, _, mean, std = sched.step(one, c * one, i, level, noise=torch.zeros(1, 1))
            var = var * mean.item() ** 2 + float(std) ** 2
        return var

    coarse, fine = abs(landed(50) - s2), abs(landed(200) - s2)
    assert fine < 0.01 and fine < coarse / 2, (coarse, fine)


def test_flow_schedule_has_the_ddim_schedules_sampler_interface():
    sched = flow.FlowSchedule(flow.shifted_times(8, shift=3.0))
    assert len(sched) == 8
    x, v, noise = _batch(8)
    cols = torch.tensor([0, 3, 7])
    prev, lp, _, _ = sched.step(x, v, cols, 0.7, noise=noise)
    _, lp2, _, _ = sched.step(x, v, cols, 0.7, prev_sample=prev)
    assert torch.equal(lp, lp2)
    ref = flow.flow_sde_step(x, v, sched.times[cols], sched.times[cols + 1], 0.7, noise=noise)
    assert all(torch.equal(a, b) for a, b in zip((prev, lp), ref[:2]))
    assert torch.equal(sched.model_time(cols, 3), sched.times[cols])
    assert torch.equal(sched.model_time(2, 3), sched.times[2].expand(3))
    torch.testing.assert_close(sched.x0(x, v, cols), x - sched.times[cols].view(-1, 1, 1, 1) * v)
