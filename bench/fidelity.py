"""Fidelity of a backend against a reference backend on the same seeds.

Metrics (all on float64 copies):

* ``rel_error(a, ref) = ||a - ref||₂ / ||ref||₂`` per sampling step of the recorded trajectories (both runs
  start from the same x_T and draw the same step noise, so the per-step error is how far the backend's
  trajectory has drifted by that step) and for the final denoised latent;
* ``psnr(a, b) = 10·log10(1 / MSE)`` for images in [0, 1]: ``inf`` when identical;
* ``ssim``: Wang et al. 2004 with an 11×11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, data range 1,
  'valid' convolution, averaged over channels and pixels;
* NaN/inf counts in the latents and images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rel_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    a64, r64 = a.detach().double().cpu(), ref.detach().double().cpu()
    denom = r64.norm().item()
    num = (a64 - r64).norm().item()
    if denom == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / denom


def max_abs_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double().cpu() - ref.detach().double().cpu()).abs().max().item()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB of two images (any equal shapes) with values in [0, data_range]."""
    mse = (a.detach().double().cpu() - b.detach().double().cpu()).pow(2).mean().item()
    if mse == 0.0:
        return float("inf")
    if not math.isfinite(mse):
        return float("nan")
    return 10.0 * math.log10(data_range**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] @ g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two images [C, H, W] (or [H, W]); windows shrink for images smaller than 11 px."""
    x = a.detach().double().cpu()
    y = b.detach().double().cpu()
    if x.dim() == 2:
        x, y = x[None], y[None]
    c = x.shape[0]
    size = min(window, x.shape[-1], x.shape[-2])
    w = _gaussian_window(size, sigma)[None, None].expand(c, 1, size, size)
    x, y = x[None], y[None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(t):
        return F.conv2d(t, w, groups=c)

    mu_x, mu_y = filt(x), filt(y)
    sxx = filt(x * x) - mu_x**2
    syy = filt(y * y) - mu_y**2
    sxy = filt(x * y) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2)
    return (num / den).mean().item()


def nonfinite(t: torch.Tensor | None) -> dict:
    if t is None:
        return {"nan": 0, "inf": 0}
    t = t.detach()
    return {"nan": int(torch.isnan(t).sum().item()), "inf": int(torch.isinf(t).sum().item())}


def compare_samples(result, reference) -> dict:
    """Compare two ``SampleResult`` (same prompts, seeds, steps, record=True) -> fidelity dict."""
    out: dict = {}
    tr, rr = result.trajectory, reference.trajectory
    if tr is not None and rr is not None:
        steps = tr.next_states.shape[1]
        out["per_step_latent_rel_error"] = [rel_error(tr.next_states[:, i], rr.next_states[:, i]) for i in range(steps)]
        out["timesteps"] = list(tr.timesteps)
    out["final_latent_rel_error"] = rel_error(result.latents, reference.latents)
    out["final_latent_max_abs_error"] = max_abs_error(result.latents, reference.latents)
    out["nonfinite"] = {"latents": nonfinite(result.latents), "images": nonfinite(result.images)}
    if tr is not None:
        out["nonfinite"]["trajectory"] = nonfinite(tr.next_states)
    if result.images is not None and reference.images is not None:
        b, v = result.images.shape[:2]
        per_view_psnr = [[psnr(result.images[i, j], reference.images[i, j]) for j in range(v)] for i in range(b)]
        per_view_ssim = [[ssim(result.images[i, j], reference.images[i, j]) for j in range(v)] for i in range(b)]
        out["psnr_db_per_view"] = per_view_psnr
        out["ssim_per_view"] = per_view_ssim
        flat_p = [x for row in per_view_psnr for x in row]
        flat_s = [x for row in per_view_ssim for x in row]
        out["psnr_db_min"] = min(flat_p)
        finite = [x for x in flat_p if math.isfinite(x)]
        # identical views have infinite PSNR: the mean is over the others, and they are counted apart
        out["psnr_db_mean"] = sum(finite) / len(finite) if finite else float("inf")
        out["identical_views"] = sum(1 for x in flat_p if x == float("inf"))
        out["ssim_min"] = min(flat_s)
        out["ssim_mean"] = sum(flat_s) / len(flat_s)
    nf = out["nonfinite"]
    out["ok_finite"] = all(d["nan"] == 0 and d["inf"] == 0 for d in nf.values())
    return out
