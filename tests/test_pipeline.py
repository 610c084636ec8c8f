import pytest
import torch

from mvz.errors import InputError
from mvz.models.cameras import CameraSet
from mvz.pipeline import MultiviewPipeline, images_to_grid, recompute_log_probs
from mvz.scheduler import LCMSchedule


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return MultiviewPipeline(tiny_model)


def to_uint8(images):
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def test_same_seed_same_pixels_other_seed_differs(pipe):
    a = pipe.sample(["a red chair"], [7], steps=4)
    b = pipe.sample(["a red chair"], [7], steps=4)
    c = pipe.sample(["a red chair"], [8], steps=4)
    assert a.images.shape == (1, 6, 3, 64, 64)
    assert torch.equal(to_uint8(a.images), to_uint8(b.images))
    assert not torch.equal(to_uint8(a.images), to_uint8(c.images))


def test_batch_equals_one_prompt_at_a_time(pipe):
    batch = pipe.sample(["a red chair", "a blue mug"], [1, 2], steps=4)
    one = pipe.sample(["a blue mug"], [2], steps=4)
    torch.testing.assert_close(batch.images[1], one.images[0], rtol=0, atol=2e-5)
    torch.testing.assert_close(batch.latents[6:], one.latents, rtol=0, atol=1e-4)


def test_views_and_non_square(pipe):
    out = pipe.sample(["a lamp"], [0], steps=2, cameras=CameraSet(azimuths=(0.0, 90.0, 180.0, 270.0)), height=64, width=96)
    assert out.images.shape == (1, 4, 3, 64, 96)
    grid = images_to_grid(out.images[0])
    assert grid.size == (4 * 96, 64)


def test_trajectory_and_log_probs_recompute(pipe, tiny_model):
    out = pipe.sample(["a vase"], [3], steps=4, record=True)
    traj = out.trajectory
    assert traj.states.shape == (6, 4, 4, 8, 8)
    assert traj.log_probs.shape == (6, 4)
    assert traj.timesteps == [999, 759, 499, 259] and traj.prev_timesteps[-1] == 259
    assert torch.equal(traj.states[:, 1], traj.next_states[:, 0])
    cond = pipe.prepare(["a vase"], CameraSet(), 64, 64)
    ac = LCMSchedule.create(4).alphas_cumprod
    for j, (t, tp) in enumerate(zip(traj.timesteps, traj.prev_timesteps, strict=True)):
        with torch.no_grad():
            lp = recompute_log_probs(pipe.denoiser, tiny_model.dtype, traj.states[:, j], traj.next_states[:, j], t, tp, cond, ac)
        torch.testing.assert_close(lp, traj.log_probs[:, j], rtol=0, atol=1e-5)


def test_zmv_costs_two_extra_calls_and_records_inverted_state(pipe):
    std = pipe.sample(["a boot"], [5], steps=8, record=True)
    zmv = pipe.sample(["a boot"], [5], steps=8, record=True, zmv=True, initial_latents=std.trajectory.states[:, 0], noise_seeds=[99])
    assert std.nfe == 8 and zmv.nfe == 10
    assert not torch.allclose(zmv.trajectory.states[:, 0], std.trajectory.states[:, 0])  # x̃_T, not x_T
    full = pipe.sample(["a boot"], [5], steps=4, zmv=True, zmv_steps=4, zmv_repeats=2)
    assert full.nfe == 4 + 2 * 2 * 4


def test_bad_requests(pipe):
    with pytest.raises(InputError, match="steps"):
        pipe.sample(["x"], [0], steps=0)
    with pytest.raises(InputError, match="views"):
        pipe.sample(["x"], [0], cameras=CameraSet(azimuths=()))
    with pytest.raises(InputError, match="multiple of 32"):
        pipe.sample(["x"], [0], height=70, width=64)
    with pytest.raises(InputError, match="empty"):
        pipe.sample(["  "], [0])
    with pytest.raises(InputError, match="seeds"):
        pipe.sample(["a", "b"], [0])


def test_chunked_vae_decode_equals_unchunked(tiny_model, monkeypatch):
    """The Decoder decodes DEFAULT_VAE_VIEWS_PER_CALL views per VAE call; the images equal one all-views call."""
    from mvz.pipeline import DEFAULT_VAE_VIEWS_PER_CALL, TorchDecoder

    z = torch.randn(6, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    whole = TorchDecoder(tiny_model, batch=None)(z)
    calls = []
    decode = tiny_model.vae.decode
    monkeypatch.setattr(tiny_model.vae, "decode", lambda x, **kw: calls.append(x.shape[0]) or decode(x, **kw))
    chunked = TorchDecoder(tiny_model)(z)
    assert calls == [DEFAULT_VAE_VIEWS_PER_CALL] * (6 // DEFAULT_VAE_VIEWS_PER_CALL)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert chunked.shape == (6, 3, 64, 96)
