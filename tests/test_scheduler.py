import math

import numpy as np
import pytest
import torch

from mvz.scheduler import (
    LCMSchedule,
    guidance_embedding,
    inverse_step,
    lcm_alphas_cumprod,
    lcm_timesteps,
    policy_step,
    scaled_linear_alphas_cumprod,
    shifted_snr_betas,
)


def diffusers_lcm():
    from diffusers import LCMScheduler

    betas = shifted_snr_betas(scaled_linear_alphas_cumprod(), 8.0)
    return LCMScheduler(
        num_train_timesteps=1000, trained_betas=betas.tolist(), original_inference_steps=50,
        timestep_scaling=10.0, set_alpha_to_one=False, prediction_type="epsilon",
    )


def test_timesteps_match_reference_and_diffusers():
    assert lcm_timesteps(8) == [999, 879, 759, 639, 499, 379, 259, 139]
    assert lcm_timesteps(4) == [999, 759, 499, 259]
    sched = diffusers_lcm()
    for n in (1, 2, 4, 6, 8, 16):
        sched.set_timesteps(n)
        assert lcm_timesteps(n) == sched.timesteps.tolist()


def test_shifted_alphas_match_reference_table_and_diffusers():
    ac = lcm_alphas_cumprod()
    # the reference table, as printed (rounded): each value must round to the printed digits
    expected = {999: "0.00058", 879: "0.00286", 759: "0.01122", 639: "0.0367", 499: "0.1198", 379: "0.2778",
                259: "0.5299", 139: "0.8010"}
    for t, text in expected.items():
        decimals = len(text.split(".")[1])
        assert math.isclose(float(ac[t]), float(text), abs_tol=0.5 * 10**-decimals + 1e-9), (t, float(ac[t]), text)
    torch.testing.assert_close(ac, diffusers_lcm().alphas_cumprod, rtol=0, atol=0)


def test_deterministic_part_of_step_matches_diffusers():
    sched = diffusers_lcm()
    sched.set_timesteps(8)
    schedule = LCMSchedule.create(8)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(schedule.timesteps):
        eps = torch.randn_like(x)
        ours = policy_step(eps, x, t, schedule.prev_timestep(i), schedule.alphas_cumprod, noise=torch.zeros_like(x))
        out = sched.step(eps, t, x, return_dict=True)
        torch.testing.assert_close(ours.denoised, out.denoised, rtol=1e-5, atol=1e-5)
        if i < len(schedule) - 1:  # diffusers adds noise via its own generator; compare the mean
            a_prev = schedule.alphas_cumprod[schedule.prev_timestep(i)]
            torch.testing.assert_close(ours.prev_sample, a_prev.sqrt() * out.denoised, rtol=1e-5, atol=1e-5)
        x = ours.prev_sample


def test_last_step_maps_to_itself_and_still_injects_noise():
    s = LCMSchedule.create(8)
    assert s.prev_timestep(7) == 139
    x = torch.randn(1, 4, 4, 4)
    a = policy_step(torch.randn_like(x), x, 139, 139, s.alphas_cumprod, noise=torch.randn_like(x))
    assert not torch.allclose(a.prev_sample, s.alphas_cumprod[139].sqrt() * a.denoised)


def test_log_prob_equals_direct_gaussian_density():
    s = LCMSchedule.create(8)
    torch.manual_seed(1)
    x = torch.randn(3, 4, 6, 6)
    eps = torch.randn_like(x)
    out = policy_step(eps, x, 759, 639, s.alphas_cumprod, noise=torch.randn_like(x))
    std = (1 - s.alphas_cumprod[639]).sqrt()
    ref = torch.distributions.Normal(out.mean.double(), std.double()).log_prob(out.prev_sample.double())
    torch.testing.assert_close(out.log_prob.double(), ref.mean(dim=(1, 2, 3)), rtol=1e-5, atol=1e-5)
    # scoring a recorded action gives the recorded log-prob
    again = policy_step(eps, x, 759, 639, s.alphas_cumprod, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob)


def test_inverse_step_inverts_a_noise_free_step():
    s = LCMSchedule.create(8)
    ac = s.alphas_cumprod
    torch.manual_seed(2)
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t, t_prev in [(999, 879), (759, 639), (379, 259)]:
        x_t = ac[t].sqrt() * x0 + (1 - ac[t]).sqrt() * eps
        # step with the model's own ε as "noise" (DDIM-like), then invert with the same ε
        x_prev = policy_step(eps, x_t, t, t_prev, ac, noise=eps).prev_sample
        back = inverse_step(eps, x_prev, t_prev, t, ac)
        torch.testing.assert_close(back, x_t, rtol=1e-3, atol=1e-3)


def test_guidance_embedding_matches_diffusers():
    from diffusers import LatentConsistencyModelPipeline

    w = torch.tensor([6.0, 0.0])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    torch.testing.assert_close(guidance_embedding(w, 256), ref.float(), rtol=1e-5, atol=1e-5)
    assert guidance_embedding(6.0, 32, batch=3).shape == (3, 32)


def test_bad_step_counts():
    with pytest.raises(ValueError):
        lcm_timesteps(0)
    with pytest.raises(ValueError):
        lcm_timesteps(51)
    assert np.all(np.diff(lcm_timesteps(50)) < 0)
