"""The sampling formulas pinned to independent references (diffusers, or the formula written out here in
float64), each at a tolerance that a changed constant or a swapped term cannot pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.scheduler import (
    LCMSchedule,
    boundary_coefficients,
    guidance_embedding,
    inverse_step,
    lcm_alphas_cumprod,
    lcm_timesteps,
    policy_step,
    predict_denoised,
)


def stock_lcm(num_inference_steps: int):
    """diffusers' LCMScheduler with the upstream settings (its own default scaled_linear betas)."""
    from diffusers import LCMScheduler

    s = LCMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     original_inference_steps=50, timestep_scaling=10.0, set_alpha_to_one=False)
    s.set_timesteps(num_inference_steps)
    return s


@pytest.mark.parametrize("steps", [4, 8])
def test_boundary_scalings_match_diffusers_at_every_timestep(steps):
    sched = stock_lcm(steps)
    assert lcm_timesteps(steps) == sched.timesteps.tolist()
    for t in sched.timesteps.tolist():
        c_skip_ref, c_out_ref = sched.get_scalings_for_boundary_condition_discrete(t)
        c_skip, c_out = boundary_coefficients(t)
        assert float(c_skip) == pytest.approx(c_skip_ref, rel=1e-7, abs=0), t
        assert float(c_out) == pytest.approx(c_out_ref, rel=1e-7, abs=0), t
        # and these are what the step uses: D = c_out·x0 + c_skip·x_t
        x, eps = torch.full((1, 1), 2.0), torch.full((1, 1), 0.5)
        a = lcm_alphas_cumprod()[t]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        d = predict_denoised(eps, x, t, a)
        torch.testing.assert_close(d, c_out_ref * x0 + c_skip_ref * x, rtol=1e-6, atol=0)


def reference_shifted_alphas(shift: float = 8.0) -> np.ndarray:
    """mvczigal.md §3 written out in float64: log SNR'(t) = log SNR(t) − (t/999)·log 8, ᾱ' = SNR'/(1+SNR')."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    snr = ac / (1.0 - ac) * np.exp(-(np.arange(1000) / 999.0) * math.log(shift))
    return snr / (1.0 + snr)


def test_shifted_snr_alphas_follow_the_formula():
    ours = lcm_alphas_cumprod().double().numpy()
    np.testing.assert_allclose(ours, reference_shifted_alphas(), rtol=1e-5, atol=0)
    # without the shift: diffusers' own scaled_linear schedule
    np.testing.assert_allclose(lcm_alphas_cumprod(shift_scale=None).numpy(), stock_lcm(8).alphas_cumprod.numpy(),
                               rtol=1e-6, atol=0)


def test_step_mean_and_std_use_the_previous_timestep():
    """π(x_prev|x_t) = N(√ᾱ_prev·D, (1−ᾱ_prev)·I): the sampled action with unit noise pins mean and std."""
    s = LCMSchedule.create(8)
    ac = s.alphas_cumprod
    torch.manual_seed(0)
    x, eps = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    for i, t in enumerate(s.timesteps):
        tp = s.prev_timestep(i)
        d = predict_denoised(eps, x, t, ac[t])
        z = torch.randn_like(x)
        out = policy_step(eps, x, t, tp, ac, noise=z)
        torch.testing.assert_close(out.prev_sample, ac[tp].sqrt() * d + (1 - ac[tp]).sqrt() * z, rtol=1e-6, atol=1e-6)
        # the log-prob is the per-element mean, in float64 by hand
        var = (1 - ac[tp]).double()
        ref = (-(z.double() ** 2) * var / (2 * var) - 0.5 * torch.log(var) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
        torch.testing.assert_close(out.log_prob.double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [4, 8])
def test_inverse_step_recovers_x_t_from_noise_free_eps(steps):
    """If x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and the step moves along that same ε, the zag lands back on x_t."""
    s = LCMSchedule.create(steps)
    ac = s.alphas_cumprod.double()
    torch.manual_seed(1)
    x0, eps = torch.randn(2, 4, 6, 6, dtype=torch.float64), torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for i, t in enumerate(s.timesteps[:-1]):
        t_cur = s.prev_timestep(i)
        x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
        # the noise-free forward move to t_cur, written out (D = c_out·x0 + c_skip·x_t)
        c_skip, c_out = boundary_coefficients(t)
        d = c_out.double() * x0 + c_skip.double() * x_t
        x_cur = ac[t_cur].sqrt() * d + (1 - ac[t_cur]).sqrt() * eps
        back = inverse_step(eps, x_cur, t_cur, t, s.alphas_cumprod).double()
        # c_skip ≤ 1.3e-7 and c_out ≈ 1 at these t: the only residue is of that order
        torch.testing.assert_close(back, x_t, rtol=0, atol=2e-5)


def test_guidance_embedding_matches_diffusers_and_the_model_uses_w_minus_one(tiny_model):
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([6.0, 0.0, 2.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_embedding(w, 256), ref.float(), rtol=1e-5, atol=1e-5)
    # the model's timestep_cond for guidance 7 is the embedding of w = 6 (the LCM pipeline's w = scale − 1)
    dim = tiny_model.guidance_dim
    got = tiny_model.guidance_cond(7.0, 3)
    want = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, torch.full((3,), 6.0), embedding_dim=dim)
    torch.testing.assert_close(got.float().cpu(), want.float(), rtol=1e-5, atol=1e-5)
