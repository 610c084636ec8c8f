"""Rollouts: for each prompt a standard trajectory and its partner (ZMV, or a second standard one for
MV-RDL) from the same initial noise x_T, all views of all prompts in one UNet call per step.

The ZMV partner reuses the standard rollout's x_T and draws independent step noise (``mvczigal.md`` §5);
its recorded state 0 is the inverted latent x̃_T.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mvz.models.cameras import CameraSet
from mvz.pipeline import Conditioning, MultiviewPipeline, Trajectory

TRAJECTORY_LABELS = {"zigzag": ("standard", "zmv"), "standard": ("standard", "standard2"), "single": ("standard",)}


@dataclass
class Rollout:
    """One process's rollouts of an iteration: P prompts, V views, 1 or 2 trajectories each."""

    prompts: list[str]
    cond: Conditioning  # P·V rows (views of a prompt contiguous), what the log-prob recompute needs
    trajectories: list[Trajectory]  # states/next_states [P·V, S, C, h, w], log_probs [P·V, S]
    rewards: list[dict[str, torch.Tensor]]  # per trajectory: "view" [P, V], "joint" [P], "joint/<sub>" [P]

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)


def cat_conditioning(parts: Sequence[Conditioning]) -> Conditioning:
    if len(parts) == 1:
        return parts[0]
    return Conditioning(
        torch.cat([c.prompt_embeds for c in parts]),
        torch.cat([c.text_embeds for c in parts]),
        torch.cat([c.time_ids for c in parts]),
        torch.cat([c.timestep_cond for c in parts]),
        torch.cat([c.timestep_cond_inv for c in parts]),
        [torch.cat([c.cams[i] for c in parts]) for i in range(len(parts[0].cams))],
    )


def cat_trajectories(parts: Sequence[Trajectory]) -> Trajectory:
    if len(parts) == 1:
        return parts[0]
    return Trajectory(
        states=torch.cat([t.states for t in parts]),
        next_states=torch.cat([t.next_states for t in parts]),
        log_probs=torch.cat([t.log_probs for t in parts]),
        timesteps=parts[0].timesteps,
        prev_timesteps=parts[0].prev_timesteps,
    )


def concat_rollouts(parts: Sequence[Rollout]) -> Rollout:
    if len(parts) == 1:
        return parts[0]
    n = len(parts[0].trajectories)
    rewards = []
    for i in range(n):
        keys = parts[0].rewards[i].keys()
        rewards.append({k: torch.cat([p.rewards[i][k] for p in parts]) for k in keys})
    return Rollout(
        prompts=[q for p in parts for q in p.prompts],
        cond=cat_conditioning([p.cond for p in parts]),
        trajectories=[cat_trajectories([p.trajectories[i] for p in parts]) for i in range(n)],
        rewards=rewards,
    )


def collect(
    pipeline: MultiviewPipeline,
    score,
    prompts: list[str],
    seeds: list[int],
    noise_seeds: list[int],
    pairing: str,
    tcfg,
    autocast=contextlib.nullcontext,
) -> Rollout:
    """Sample one batch of prompts (``pairing``: zigzag | standard | single) and score every trajectory.

    ``score(images [P, V, 3, H, W], prompts) -> dict`` (see :class:`mvz.train.rewards.TrainingRewards`);
    ``autocast()`` wraps the sampling only (rewards run in their own dtype, outside mixed precision).
    """
    cams = CameraSet.default(tcfg.num_views)
    res = tcfg.resolution
    common = dict(steps=tcfg.num_inference_steps, guidance=tcfg.guidance_scale, cameras=cams, height=res, width=res,
                  inv_guidance=tcfg.inv_guidance_scale, record=True)
    with torch.no_grad(), autocast():
        cond = pipeline.prepare(prompts, cams, res, res, tcfg.guidance_scale, tcfg.inv_guidance_scale)
        first = pipeline.sample(prompts, seeds, conditioning=cond, **common)
        results = [first]
        if pairing in ("zigzag", "standard"):
            x_t = first.trajectory.states[:, 0]
            results.append(pipeline.sample(
                prompts, seeds, conditioning=cond, initial_latents=x_t, noise_seeds=noise_seeds,
                zmv=pairing == "zigzag", zmv_steps=tcfg.zmv_steps, zmv_repeats=tcfg.zmv_repeats, **common,
            ))
    rewards = [score(r.images, prompts) for r in results]
    return Rollout(list(prompts), cond, [r.trajectory for r in results], rewards)
