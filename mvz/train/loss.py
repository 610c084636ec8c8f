"""The per-timestep losses (``mvczigal.md`` §6).

Log-probs are per-view MEAN Gaussian log-densities (float32), so the clip range ε = 1e-4 is in those units.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    approx_kl: torch.Tensor  # scalar, detached: 0.5·mean((logπ_θ − logπ_old)²) over all views (both trajectories)
    clipfrac: torch.Tensor  # scalar, detached: share of views with |logπ_θ − logπ_old| > ε


def _stats(*pairs: tuple[torch.Tensor, torch.Tensor], clip_range: float) -> tuple[torch.Tensor, torch.Tensor]:
    diff = torch.cat([(new - old).detach() for new, old in pairs])
    return 0.5 * (diff**2).mean(), (diff.abs() > clip_range).float().mean()


def clipped_regression_loss(
    logp_s: torch.Tensor,
    old_s: torch.Tensor,
    logp_z: torch.Tensor,
    old_z: torch.Tensor,
    delta: torch.Tensor,
    clip_range: float,
) -> LossOutput:
    """MV-ZigAL loss for one prompt pair and one timestep; all tensors ``[V]``.

    ``d = ρ^s − ρ^z`` with ``ρ = logπ_θ − logπ_old``;
    ``d_clip = [clip(logπ_θ^s, old^s ± ε) − old^s] − [clip(logπ_θ^z, old^z ± ε) − old^z]``;
    ``L = mean_v max((d − Δ_v)², (d_clip − Δ_v)²)``. Both trajectories get gradients; the max is a trust
    region (no gradient once a log-prob has moved more than ε in the loss-reducing direction).
    """
    old_s, old_z, delta = old_s.detach().float(), old_z.detach().float(), delta.detach().float()
    logp_s, logp_z = logp_s.float(), logp_z.float()
    d = (logp_s - old_s) - (logp_z - old_z)
    clip_s = torch.clamp(logp_s, old_s - clip_range, old_s + clip_range) - old_s
    clip_z = torch.clamp(logp_z, old_z - clip_range, old_z + clip_range) - old_z
    d_clip = clip_s - clip_z
    loss = torch.maximum((d - delta) ** 2, (d_clip - delta) ** 2).mean()
    kl, frac = _stats((logp_s, old_s), (logp_z, old_z), clip_range=clip_range)
    return LossOutput(loss, kl, frac)


def ppo_clipped_loss(logp: torch.Tensor, old: torch.Tensor, advantages: torch.Tensor, clip_range: float) -> LossOutput:
    """MV-PG: the PPO-style clipped policy-gradient loss of RLCM/DDPO for one trajectory and timestep, ``[V]``.

    ``ratio = exp(logπ_θ − logπ_old)``; ``L = mean max(−A·ratio, −A·clip(ratio, 1 ± ε))``.
    """
    old, advantages = old.detach().float(), advantages.detach().float()
    ratio = torch.exp(logp.float() - old)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    kl, _ = _stats((logp.float(), old), clip_range=clip_range)
    frac = ((ratio.detach() - 1.0).abs() > clip_range).float().mean()
    return LossOutput(loss, kl, frac)
