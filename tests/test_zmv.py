"""ZMV-Sampling (mvczigal.md §5) through the real pipeline, against the algorithm written out step by step.

A recording denoiser stands in for the UNet: its ε depends on the sample, the timestep and the guidance
embedding, so a zag that is skipped, queried at another timestep or at the wrong guidance, or inverted to
another timestep gives other latents and another call sequence.
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.models.cameras import CameraSet
from mvz.pipeline import MultiviewPipeline
from mvz.scheduler import LCMSchedule, inverse_step, policy_step


class RecordingDenoiser:
    def __init__(self):
        self.calls: list[tuple[int, float]] = []  # (timestep, first element of timestep_cond)

    def __call__(self, sample, timestep, prompt_embeds, text_embeds, time_ids, timestep_cond, *cams):
        t = float(timestep.reshape(-1)[0])
        w = timestep_cond.float().mean(dim=1)[:, None, None, None]
        self.calls.append((int(t), float(timestep_cond.reshape(-1)[1])))
        return torch.tanh(0.7 * sample.float() + 0.3 * torch.cos(torch.tensor(t / 97.0)) + 0.2 * w)


def eps_fn(x, t, cond_row):
    w = cond_row.float().mean(dim=1)[:, None, None, None]
    return torch.tanh(0.7 * x + 0.3 * torch.cos(torch.tensor(t / 97.0)) + 0.2 * w)


def reference_zmv(x_T, cond, steps, noise_gen, v, shape):
    """The algorithm as the reference states it (T_max = 1, lambda_step = 1)."""
    s = LCMSchedule.create(steps)
    ac = s.alphas_cumprod
    x = x_T
    states, nexts, logps, calls = [], [], [], []

    def noise():
        return torch.randn((v, *shape), generator=noise_gen, dtype=torch.float32)

    for i, t in enumerate(s.timesteps):
        t_prev = s.prev_timestep(i)
        out = policy_step(eps_fn(x, t, cond.timestep_cond), x, t, t_prev, ac, noise=noise())  # zig, w = 6
        calls.append((t, "zig"))
        if i < 1:
            eps_inv = eps_fn(out.prev_sample, t, cond.timestep_cond_inv)  # zag: UNet at the TARGET t, w = 0
            calls.append((t, "zag"))
            x = inverse_step(eps_inv, out.prev_sample, t_prev, t, ac)  # x' at t_prev back up to t
            out = policy_step(eps_fn(x, t, cond.timestep_cond), x, t, t_prev, ac, noise=noise())  # zig again
            calls.append((t, "zig"))
        states.append(x)
        nexts.append(out.prev_sample)
        logps.append(out.log_prob)
        x = out.prev_sample
    return torch.stack(states, 1), torch.stack(nexts, 1), torch.stack(logps, 1), calls


@pytest.mark.parametrize("steps", [4, 8])
def test_zmv_run_follows_the_reference_algorithm(tiny_model, steps):
    den = RecordingDenoiser()
    pipe = MultiviewPipeline(tiny_model, denoiser=den)
    cams = CameraSet.default(6)
    cond = pipe.prepare(["a boot"], cams, 64, 64, guidance=7.0, inv_guidance=1.0)
    x_T = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    out = pipe.sample(["a boot"], [5], steps=steps, cameras=cams, height=64, width=64, zmv=True, record=True,
                      decode=False, initial_latents=x_T, noise_seeds=[11], conditioning=cond)
    states, nexts, logps, calls = reference_zmv(x_T, cond, steps, torch.Generator().manual_seed(11), 6, (4, 8, 8))

    w_zig, w_zag = float(cond.timestep_cond[0, 1]), float(cond.timestep_cond_inv[0, 1])
    assert w_zig != w_zag  # guidance 7 (w = 6) vs inversion guidance 1 (w = 0) are distinguishable
    label = {w_zig: "zig", w_zag: "zag"}
    assert [(t, label[w]) for t, w in den.calls] == calls
    assert out.nfe == steps + 2
    tr = out.trajectory
    torch.testing.assert_close(tr.states, states, rtol=0, atol=1e-6)  # state 0 is the inverted x̃_T
    torch.testing.assert_close(tr.next_states, nexts, rtol=0, atol=1e-6)
    torch.testing.assert_close(tr.log_probs, logps, rtol=0, atol=1e-6)
    assert not torch.allclose(tr.states[:, 0], x_T)


def test_zmv_state_zero_differs_from_a_standard_run_only_by_the_zag(tiny_model):
    """Same x_T and step noise: a standard run and ZMV share nothing after step 0 but the later maths."""
    den = RecordingDenoiser()
    pipe = MultiviewPipeline(tiny_model, denoiser=den)
    x_T = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(steps=4, height=64, width=64, record=True, decode=False, initial_latents=x_T, noise_seeds=[2])
    std = pipe.sample(["a cup"], [1], **kw).trajectory
    assert [t for t, _ in den.calls] == [999, 759, 499, 259]
    den.calls.clear()
    zmv = pipe.sample(["a cup"], [1], zmv=True, **kw).trajectory
    assert [t for t, _ in den.calls] == [999, 999, 999, 759, 499, 259]
    torch.testing.assert_close(std.states[:, 0], x_T)
    assert (zmv.states[:, 0] - x_T).abs().max() > 1e-3
