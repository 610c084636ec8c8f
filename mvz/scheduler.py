"""Shifted-SNR LCM maths: pure float32 functions of (alphas_cumprod, timesteps).

Shared by sampling, training (log-probs) and ZMV inversion. Facts (MVC-ZigAL's schedule; summarised in
``docs/architecture.md``, *Scheduler*):

* base schedule: scaled_linear betas 0.00085 -> 0.012 over T = 1000;
* shifted SNR ("interpolated", scale 8): ``log SNR'(t) = log SNR(t) - (t/999) log 8``, converted back to
  ``trained_betas`` and re-accumulated in float32 exactly as diffusers' LCMScheduler does;
* LCM: ``original_inference_steps`` 50, ``timestep_scaling`` 10, sigma_data 0.5, epsilon prediction,
  ``set_alpha_to_one=False``;
* the policy step injects noise at every step, the last included (``t_prev = t`` there), and its
  Gaussian log-prob is the per-element MEAN over each view's latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
SHIFT_SCALE = 8.0
ORIGINAL_INFERENCE_STEPS = 50
TIMESTEP_SCALING = 10.0
SIGMA_DATA = 0.5


def scaled_linear_alphas_cumprod(
    beta_start: float = BETA_START, beta_end: float = BETA_END, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> np.ndarray:
    """float64 ᾱ of the SDXL base schedule."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def shifted_snr_betas(alphas_cumprod: np.ndarray, shift_scale: float = SHIFT_SCALE) -> np.ndarray:
    """The ``trained_betas`` of the interpolated shifted-SNR schedule (float64)."""
    n = len(alphas_cumprod)
    log_snr = np.log(alphas_cumprod / (1.0 - alphas_cumprod))
    log_snr_shifted = log_snr - (np.arange(n, dtype=np.float64) / (n - 1)) * math.log(shift_scale)
    ac = 1.0 / (1.0 + np.exp(-log_snr_shifted))  # SNR'/(1+SNR')
    prev = np.concatenate([[1.0], ac[:-1]])
    return 1.0 - ac / prev


def lcm_alphas_cumprod(
    shift_scale: float | None = SHIFT_SCALE,
    beta_start: float = BETA_START,
    beta_end: float = BETA_END,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> torch.Tensor:
    """float32 ᾱ' as LCMScheduler(trained_betas=shifted betas) holds it (float32 cumprod)."""
    base = scaled_linear_alphas_cumprod(beta_start, beta_end, num_train_timesteps)
    if shift_scale is None or shift_scale == 1.0:
        betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64) ** 2
    else:
        betas = shifted_snr_betas(base, shift_scale)
    betas_t = torch.tensor(betas, dtype=torch.float32)
    return torch.cumprod(1.0 - betas_t, dim=0)


def lcm_timesteps(
    num_inference_steps: int,
    original_inference_steps: int = ORIGINAL_INFERENCE_STEPS,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> list[int]:
    """LCM timesteps: floor(linspace) indices into [999, 979, ..., 19]. 8 -> [999, 879, ..., 139]."""
    if num_inference_steps < 1:
        raise ValueError("num_inference_steps must be >= 1")
    if num_inference_steps > original_inference_steps:
        raise ValueError(f"num_inference_steps must be <= original_inference_steps ({original_inference_steps})")
    c = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, original_inference_steps + 1) * c - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
    return [int(t) for t in origin[idx]]


def boundary_coefficients(t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM consistency-model boundary conditions c_skip(t), c_out(t) (float32)."""
    scaled = torch.as_tensor(t, dtype=torch.float32) * TIMESTEP_SCALING
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


@dataclass(frozen=True)
class LCMSchedule:
    """The timesteps of one sampling run and the ᾱ' table they index."""

    timesteps: tuple[int, ...]
    alphas_cumprod: torch.Tensor  # float32 [T]

    @classmethod
    def create(cls, num_inference_steps: int, shift_scale: float | None = SHIFT_SCALE, **schedule_kwargs) -> LCMSchedule:
        return cls(tuple(lcm_timesteps(num_inference_steps)), lcm_alphas_cumprod(shift_scale, **schedule_kwargs))

    def __len__(self) -> int:
        return len(self.timesteps)

    def prev_timestep(self, index: int) -> int:
        """The next entry of the list; the last step maps to itself (t_prev = t)."""
        return self.timesteps[index + 1] if index + 1 < len(self.timesteps) else self.timesteps[index]

    def alpha(self, t: int) -> torch.Tensor:
        return self.alphas_cumprod[int(t)]


def predict_denoised(eps: torch.Tensor, sample: torch.Tensor, t: int, alpha_t: torch.Tensor) -> torch.Tensor:
    """D = c_out·x0 + c_skip·x_t with x0 = (x_t - √(1-ᾱ_t)·ε)/√ᾱ_t, in float32."""
    eps, sample = eps.float(), sample.float()
    x0 = (sample - (1 - alpha_t).sqrt() * eps) / alpha_t.sqrt()
    c_skip, c_out = boundary_coefficients(t)
    return c_out * x0 + c_skip * sample


def gaussian_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over all non-batch elements of the Gaussian log-density (float32)."""
    x_prev, mean = x_prev.detach().float(), mean.float()
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    lp = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(dim=tuple(range(1, lp.ndim)))


@dataclass
class StepOutput:
    prev_sample: torch.Tensor  # x_{t_prev} (float32)
    denoised: torch.Tensor  # D (float32): the image latent at the last step
    log_prob: torch.Tensor  # [N] per-view mean log-prob of prev_sample
    mean: torch.Tensor  # μ = √ᾱ_prev·D


def policy_step(
    eps: torch.Tensor,
    sample: torch.Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: torch.Tensor,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """The stochastic LCM step and its log-prob.

    π(x_prev | x_t) = N(√ᾱ_prev·D, (1-ᾱ_prev)·I). Give ``noise`` to sample, or ``prev_sample`` to score
    a recorded action (training recomputes log-probs this way, gradients flowing through ``eps``).
    """
    alpha_t = alphas_cumprod[int(t)].to(eps.device)
    alpha_prev = alphas_cumprod[int(t_prev)].to(eps.device)
    denoised = predict_denoised(eps, sample, t, alpha_t)
    mean = alpha_prev.sqrt() * denoised
    std = (1 - alpha_prev).sqrt()
    if prev_sample is None:
        if noise is None:
            raise ValueError("policy_step needs noise (to sample) or prev_sample (to score)")
        prev_sample = mean + std * noise.float()
    log_prob = gaussian_log_prob(prev_sample, mean, std)
    return StepOutput(prev_sample=prev_sample.float(), denoised=denoised, log_prob=log_prob, mean=mean)


def inverse_step(eps: torch.Tensor, sample: torch.Tensor, t_cur: int, t: int, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic LCM inversion (ZMV "zag"): from x' at t_cur back up to the target t, reusing ε'.

    x0 = (x' - √(1-ᾱ_cur)·ε')/√ᾱ_cur; D = c_out(t_cur)·x0 + c_skip(t_cur)·x'; x̃_t = √ᾱ_t·D + √(1-ᾱ_t)·ε'.
    """
    eps, sample = eps.float(), sample.float()
    alpha_cur = alphas_cumprod[int(t_cur)].to(eps.device)
    alpha_t = alphas_cumprod[int(t)].to(eps.device)
    denoised = predict_denoised(eps, sample, t_cur, alpha_cur)
    return alpha_t.sqrt() * denoised + (1 - alpha_t).sqrt() * eps


def guidance_embedding(w: torch.Tensor | float, embedding_dim: int, batch: int = 1) -> torch.Tensor:
    """LCM's w-embedding (``timestep_cond``): sinusoidal embedding of w·1000; w = guidance_scale - 1."""
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    if w.numel() == 1:
        w = w.expand(batch)
    w = w * 1000.0
    half = embedding_dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
