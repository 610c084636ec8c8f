"""Advantages, the Lagrangian constraint and the regression target (``mvczigal.md`` §6, §7).

All functions are pure and run on the *gathered* iteration batch (every process, standard and ZMV pooled),
so every process computes the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADV_EPS = 1e-8


def zscore(x: torch.Tensor, eps: float = ADV_EPS) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over *all* elements (one global z-score).

    The reference does not say which std; we use the population std (ddof = 0, numpy's default, which
    DDPO-derived loops use on gathered numpy rewards). Computed in float64.
    """
    x = x.double()
    return ((x - x.mean()) / (x.std(unbiased=False) + eps)).float()


@dataclass
class PooledAdvantages:
    """Z-scored rewards of one iteration, split back into the two trajectories of each pair.

    ``view_*`` are ``[P, V]`` (per-view reward advantages Â_v); ``mv_*`` are ``[P, V]`` (the joint-reward
    advantage Â^mv broadcast to the views).
    """

    view_s: torch.Tensor
    view_z: torch.Tensor
    mv_s: torch.Tensor
    mv_z: torch.Tensor


def pooled_advantages(r_s: torch.Tensor, r_z: torch.Tensor, rmv_s: torch.Tensor, rmv_z: torch.Tensor) -> PooledAdvantages:
    """``r_*``: per-view rewards ``[P, V]``; ``rmv_*``: joint rewards ``[P]``. z-scores pool both trajectories:
    Â_v over all 2·P·V view rewards, Â^mv over all 2·P sets, then broadcast to the V views."""
    p, v = r_s.shape
    view = zscore(torch.cat([r_s, r_z], dim=0))
    mv = zscore(torch.cat([rmv_s, rmv_z], dim=0))[:, None].expand(-1, v)
    return PooledAdvantages(view[:p], view[p:], mv[:p].contiguous(), mv[p:].contiguous())


def delta_target(adv: PooledAdvantages, objective: str, lam: float = 0.0, weight: float = 0.5) -> torch.Tensor:
    """The per-view regression target Δ_v ``[P, V]`` of pair (s, z).

    * ``constrained`` (MVC-ZigAL): ``[(Â^s_v − Â^z_v) + λ·(Â^{mv,s} − Â^{mv,z})] / (1 + λ)``;
    * ``weighted`` (WS-ZigAL, fixed sum R + w·R_mv): ``(Â^s_v − Â^z_v) + w·(Â^{mv,s} − Â^{mv,z})``;
    * ``joint`` (MV-ZigAL / MV-RDL): ``Â^{mv,s} − Â^{mv,z}``;
    * ``per_view``: ``Â^s_v − Â^z_v``.
    """
    d_view = adv.view_s - adv.view_z
    d_mv = adv.mv_s - adv.mv_z
    if objective == "constrained":
        return (d_view + lam * d_mv) / (1.0 + lam)
    if objective == "weighted":
        return d_view + weight * d_mv
    if objective == "joint":
        return d_mv
    if objective == "per_view":
        return d_view
    raise ValueError(f"unknown objective {objective!r}")


def single_advantages(r: torch.Tensor, rmv: torch.Tensor, objective: str, lam: float = 0.0, weight: float = 0.5,
                      clip_max: float | None = None) -> torch.Tensor:
    """MV-PG: per-view advantages ``[P, V]`` of single trajectories, combined like :func:`delta_target`,
    clipped to ±``clip_max`` (RLCM/DDPO)."""
    a_view = zscore(r)
    a_mv = zscore(rmv)[:, None].expand_as(r)
    if objective == "constrained":
        a = (a_view + lam * a_mv) / (1.0 + lam)
    elif objective == "weighted":
        a = a_view + weight * a_mv
    elif objective == "joint":
        a = a_mv.clone()
    elif objective == "per_view":
        a = a_view
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return a.clamp(-clip_max, clip_max) if clip_max else a


@dataclass
class LagrangianState:
    """λ and the EMA threshold τ (§7). ``tau <= 0`` means "not initialised" (upstream init 0)."""

    lam: float = 0.0
    tau: float = 0.0

    def update(self, mv_mean: float, lambda_lr: float, lambda_max: float | None, ema_beta: float = 0.99,
               update_lambda: bool = True) -> LagrangianState:
        """One update per iteration, before training, from the mean joint reward ``m`` of the gathered batch,
        in upstream's order:

        τ ← m on the first iteration (τ ≤ 0), else τ ← β·τ + (1−β)·m (EMA, every iteration, before λ);
        then, unless ``update_lambda`` is false (upstream: ``epoch < lambda_update_delay_steps``, where τ
        still moves and only λ waits): lr ← lambda_lr if m < τ (violated) else 0.1·lambda_lr;
        λ ← clamp(λ + lr·(τ − m), 0, λ_max). ``lambda_max`` 0 or None means no upper cap, as upstream reads
        it (``lambda_max if lambda_max else None``).
        """
        m = float(mv_mean)
        self.tau = m if self.tau <= 0 else ema_beta * self.tau + (1.0 - ema_beta) * m
        if update_lambda:
            lr = lambda_lr if m < self.tau else 0.1 * lambda_lr
            lam = max(self.lam + lr * (self.tau - m), 0.0)
            self.lam = min(lam, lambda_max) if lambda_max else lam
        return self

    def state_dict(self) -> dict[str, float]:
        return {"lam": self.lam, "tau": self.tau}

    def load_state_dict(self, d: dict[str, float]) -> None:
        self.lam, self.tau = float(d["lam"]), float(d["tau"])
