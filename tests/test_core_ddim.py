"""The DDIM schedule and the stochastic step with log-probabilities (training/ddim.py)."""
from __future__ import annotations

import math

import pytest
import torch

import conftest  # noqa: F401  (loads the pack as texforce_pack)
from texforce_pack.training import ddim


def test_schedule_matches_diffusers_leading_spacing():
    # diffusers DDIMScheduler, SD config: timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False
    assert ddim.ddim_timesteps(50).tolist() == list(range(981, 0, -20))
    assert ddim.ddim_timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert ddim.ddim_timesteps(30).tolist()[:3] == [958, 925, 892]  # step_ratio 33, not 1000/30
    abar = ddim.scaled_linear_alphas_cumprod()
    assert abar[0].item() == pytest.approx(0.99915, abs=1e-7)
    assert abar[999].item() == pytest.approx(0.0046601, abs=1e-6)
    s = ddim.ddim_schedule(abar, 50)
    assert torch.equal(s.abar_t, abar[s.timesteps])
    assert torch.equal(s.abar_prev[:-1], abar[s.timesteps[1:]])  # prev of step i is the timestep of step i+1
    assert s.abar_prev[-1].item() == abar[0].item()  # final_alpha_cumprod = ᾱ[0], not 1


def test_schedule_refuses_more_steps_than_it_has():
    assert ddim.max_ddim_steps() == 999
    assert ddim.ddim_timesteps(999)[0].item() == 999
    with pytest.raises(ValueError, match="at most 999"):
        ddim.ddim_timesteps(1000)


def _closed_form(x, eps, at, ap, eta, prev):
    """DESIGN.md §3 written out independently, in float64, with torch.distributions.Normal."""
    x, eps, prev = x.double(), eps.double(), prev.double()
    at = torch.as_tensor(at, dtype=torch.float64).reshape(-1, 1, 1, 1)
    ap = torch.as_tensor(ap, dtype=torch.float64).reshape(-1, 1, 1, 1)
    x0 = (x - (1 - at).sqrt() * eps) / at.sqrt()
    sigma = eta * ((1 - ap) / (1 - at)).sqrt() * (1 - at / ap).sqrt()
    mu = ap.sqrt() * x0 + (1 - ap - sigma ** 2).sqrt() * eps
    lp = torch.distributions.Normal(mu, sigma.expand_as(mu)).log_prob(prev)
    return lp.mean(dim=(1, 2, 3)), mu, sigma


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_log_prob_equals_closed_form_gaussian(eta):
    g = torch.Generator().manual_seed(0)
    abar = ddim.scaled_linear_alphas_cumprod()
    s = ddim.ddim_schedule(abar, 50)
    steps = torch.tensor([0, 17, 49])  # the noisiest, a middle and the last step (ᾱ_prev = ᾱ[0])
    x = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    prev, lp, mean, std = ddim.ddim_step(x, eps, s.abar_t[steps], s.abar_prev[steps], eta, noise=noise)
    ref_lp, ref_mu, ref_sigma = _closed_form(x, eps, s.abar_t[steps], s.abar_prev[steps], eta, prev)
    assert lp.dtype == torch.float32 and lp.shape == (3,)
    torch.testing.assert_close(mean.double(), ref_mu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(std.double(), ref_sigma, rtol=1e-5, atol=0)
    torch.testing.assert_close(lp.double(), ref_lp, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(prev, mean + std * noise)
    # scoring the same transition (training) gives bit-identical log-probs
    _, lp2, _, _ = ddim.ddim_step(x, eps, s.abar_t[steps], s.abar_prev[steps], eta, prev_sample=prev)
    assert torch.equal(lp, lp2)


def test_batched_timesteps_equal_one_at_a_time_and_low_precision_input_is_scored_in_fp32():
    g = torch.Generator().manual_seed(1)
    s = ddim.ddim_schedule(ddim.scaled_linear_alphas_cumprod(), 20)
    steps = torch.tensor([3, 11, 19, 0])
    x, eps, z = (torch.randn(4, 4, 6, 6, generator=g) for _ in range(3))
    _, lp, _, _ = ddim.ddim_step(x, eps, s.abar_t[steps], s.abar_prev[steps], 1.0, noise=z)
    for i, k in enumerate(steps.tolist()):
        _, lpi, _, _ = ddim.ddim_step(x[i:i + 1], eps[i:i + 1], s.abar_t[k].item(), s.abar_prev[k].item(), 1.0,
                                      noise=z[i:i + 1])
        torch.testing.assert_close(lpi[0], lp[i], rtol=1e-6, atol=1e-6)
    _, lp_bf16, _, _ = ddim.ddim_step(x.bfloat16(), eps.bfloat16(), s.abar_t[steps], s.abar_prev[steps], 1.0, noise=z)
    assert lp_bf16.dtype == torch.float32 and torch.isfinite(lp_bf16).all()


def test_gradient_flows_through_eps_only():
    s = ddim.ddim_schedule(ddim.scaled_linear_alphas_cumprod(), 10)
    x = torch.randn(2, 4, 4, 4)
    eps = torch.randn(2, 4, 4, 4, requires_grad=True)
    prev = torch.randn(2, 4, 4, 4, requires_grad=True)
    _, lp, _, _ = ddim.ddim_step(x, eps, s.abar_t[2], s.abar_prev[2], 1.0, prev_sample=prev)
    lp.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert prev.grad is None  # the stored next latent is data, not a function of the policy


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan")])
def test_eta_zero_is_refused(eta):
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim.ddim_step(x, x, 0.5, 0.6, eta, noise=x)


def test_needs_exactly_one_of_noise_and_prev_sample():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="exactly one"):
        ddim.ddim_step(x, x, 0.5, 0.6, 1.0)
    with pytest.raises(ValueError, match="exactly one"):
        ddim.ddim_step(x, x, 0.5, 0.6, 1.0, noise=x, prev_sample=x)


def test_parameterisation_and_space_conversions():
    g = torch.Generator().manual_seed(2)
    abar = torch.tensor([0.9, 0.3, 0.01])
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    a = abar.reshape(-1, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps  # VP forward process
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # diffusers' v definition
    torch.testing.assert_close(ddim.eps_from_v(x, v, abar), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddim.eps_from_x0(x, x0, abar), eps, rtol=1e-4, atol=1e-4)
    sigma = ddim.sigma_from_abar(abar)
    torch.testing.assert_close(ddim.abar_from_sigma(sigma), abar)
    torch.testing.assert_close(sigma, torch.sqrt((1 - abar) / abar))
    x_k = ddim.vp_to_k(x, sigma)  # k-diffusion: x_k = x0 + σ ε
    torch.testing.assert_close(x_k, x0 + sigma.reshape(-1, 1, 1, 1) * eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ddim.k_to_vp(x_k, sigma), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ddim.eps_from_denoised_k(x_k, x0, sigma), eps, rtol=1e-4, atol=1e-4)
    assert math.isclose(float(ddim.sigma_from_abar(0.5)), 1.0, rel_tol=1e-6)


def test_per_sample_eta_with_zeros_takes_the_deterministic_step_and_log_prob_zero():
    """Branch sampling: η 0 for some samples of a batch is plain DDIM (x_prev = the η-0 mean) with log-prob 0 and
    no gradient; the others are exactly the scalar-η step."""
    g = torch.Generator().manual_seed(2)
    s = ddim.ddim_schedule(ddim.scaled_linear_alphas_cumprod(), 20)
    x, z = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g)
    eps = torch.randn(3, 4, 6, 6, generator=g, requires_grad=True)
    eta = torch.tensor([0.0, 1.0, 0.0])
    prev, lp, _, _ = ddim.ddim_step(x, eps, s.abar_t[4], s.abar_prev[4], eta, noise=z)
    _, lp1, mean1, _ = ddim.ddim_step(x[1:2], eps[1:2], s.abar_t[4], s.abar_prev[4], 1.0, noise=z[1:2])
    torch.testing.assert_close(lp[1], lp1[0], rtol=0, atol=0)
    at, ap = s.abar_t[4], s.abar_prev[4]
    det = ap.sqrt() * (x - (1 - at).sqrt() * eps) / at.sqrt() + (1 - ap).sqrt() * eps  # DDIM η = 0
    torch.testing.assert_close(prev[[0, 2]], det[[0, 2]].detach(), rtol=1e-6, atol=1e-6)
    assert lp[0] == 0 and lp[2] == 0 and torch.isfinite(lp).all()
    lp.sum().backward()
    assert eps.grad[[0, 2]].abs().sum() == 0 and eps.grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match="≥ 0"):
        ddim.ddim_step(x, eps, at, ap, torch.tensor([1.0, -1.0, 0.0]), noise=z)


def test_schedule_step_is_ddim_step_for_one_index_or_one_per_sample():
    """The sampler interface (DDIMSchedule.step / x0 / model_time) that sampling and training call is exactly
    ddim_step with the step's ᾱ pair, for a step shared by the batch (int) and for per-sample steps (tensor)."""
    sched = ddim.ddim_schedule(ddim.scaled_linear_alphas_cumprod(), 10)
    g = torch.Generator().manual_seed(0)
    x, eps, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    ref = ddim.ddim_step(x, eps, sched.abar_t[4].expand(3), sched.abar_prev[4].expand(3), 1.0, noise=noise)
    for got, want in zip(sched.step(x, eps, 4, 1.0, noise=noise), ref):
        assert torch.equal(got, want)
    cols = torch.tensor([1, 4, 9])
    ref = ddim.ddim_step(x, eps, sched.abar_t[cols], sched.abar_prev[cols], 1.0, prev_sample=noise)
    for got, want in zip(sched.step(x, eps, cols, 1.0, prev_sample=noise), ref):
        assert torch.equal(got, want)
    assert torch.equal(sched.model_time(4, 3), sched.timesteps[4].expand(3))
    assert torch.equal(sched.model_time(cols, 3), sched.timesteps[cols])
    abar = sched.abar_t[cols].view(-1, 1, 1, 1)
    torch.testing.assert_close(sched.x0(x, eps, cols), (x - (1 - abar).sqrt() * eps) / abar.sqrt())
    # x0 is the mean's clean-image part: a deterministic step from x0 with ε̂ reproduces the DDIM mean
    mean = ddim.ddim_step(x, eps, sched.abar_t[cols], sched.abar_prev[cols], 1e-9, prev_sample=x)[2]
    ap = sched.abar_prev[cols].view(-1, 1, 1, 1)
    torch.testing.assert_close(mean, ap.sqrt() * sched.x0(x, eps, cols) + (1 - ap).sqrt() * eps, rtol=1e-4, atol=1e-4)
