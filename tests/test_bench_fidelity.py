"""Fidelity metrics on constructed inputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bench.fidelity import compare_samples, nonfinite, psnr, rel_error, ssim


def test_identical_images_have_infinite_psnr_and_unit_ssim():
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert psnr(img, img.clone()) == math.inf
    assert ssim(img, img.clone()) == pytest.approx(1.0)


def test_known_noise_gives_known_psnr():
    img = torch.full((3, 64, 64), 0.5)
    sign = torch.where(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    noisy = img + 0.01 * sign  # MSE exactly 1e-4 -> 40 dB
    assert psnr(noisy, img) == pytest.approx(40.0, abs=1e-4)
    assert psnr(img + 0.1, img) == pytest.approx(20.0, abs=1e-4)
    assert ssim(noisy, img) < 1.0


def test_ssim_known_case_constant_images():
    # constant images: SSIM = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
    a, b = torch.full((1, 16, 16), 0.2), torch.full((1, 16, 16), 0.6)
    c1 = 0.01**2
    assert ssim(a, b) == pytest.approx((2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), rel=1e-6)


def test_rel_error_and_nonfinite():
    ref = torch.ones(10)
    assert rel_error(ref, ref) == 0.0
    assert rel_error(ref * 1.1, ref) == pytest.approx(0.1)
    t = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    assert nonfinite(t) == {"nan": 1, "inf": 2}


def _result(latents, images, steps=3):
    traj = SimpleNamespace(next_states=latents[:, None].repeat(1, steps, 1, 1, 1), timesteps=list(range(steps)))
    return SimpleNamespace(latents=latents, images=images, trajectory=traj)


def test_compare_samples():
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, 4, 8, 8, generator=g)
    imgs = torch.rand(1, 2, 3, 16, 16, generator=g)
    same = compare_samples(_result(lat, imgs), _result(lat.clone(), imgs.clone()))
    assert same["final_latent_rel_error"] == 0.0 and same["psnr_db_min"] == math.inf
    assert same["per_step_latent_rel_error"] == [0.0, 0.0, 0.0] and same["ok_finite"]
    assert same["identical_views"] == 2
    bad_imgs = imgs.clone()
    bad_imgs[0, 1, 0, 0, 0] = float("nan")
    off = compare_samples(_result(lat * 1.01, bad_imgs), _result(lat, imgs))
    assert off["final_latent_rel_error"] == pytest.approx(0.01, rel=1e-5)
    assert not off["ok_finite"] and off["nonfinite"]["images"]["nan"] == 1
