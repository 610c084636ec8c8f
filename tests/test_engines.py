"""Backends: ONNX Runtime images agree with torch; manifest checks; torch variants; TensorRT (skipped here)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("onnxruntime")

from engines import BACKENDS, available_backends, create_backend  # noqa: E402
from export.exporter import export_model  # noqa: E402
from mvz.errors import BackendUnavailableError, InputError, ManifestMismatchError  # noqa: E402

RES = 32  # same export request as tests/test_export.py (2 views, 32 px): whichever runs second reuses it
VIEWS = 2
GPU_RES = 64  # GPU tests run the pipeline at the tiny model's default resolution and 6 views


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model  # one load per session (conftest); no test here modifies it


@pytest.fixture(scope="module")
def fp32_export(model, tmp_path_factory):
    return export_model(model, tmp_path_factory.getbasetemp() / "shared_tiny_fp32", precision="fp32", height=RES,
                        num_views=VIEWS)


def _sample(model, backend=None, views=VIEWS, res=RES, steps=2):
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import MultiviewPipeline

    kw = {"denoiser": backend.denoiser, "decoder": backend.decoder} if backend is not None else {}
    pipe = MultiviewPipeline(model, num_views=views, **kw)
    return pipe.sample(["a red chair"], [3], steps=steps, cameras=CameraSet.default(views), height=res, width=res).images


def _has_tensorrt() -> str | None:
    from engines.tensorrt_backend import unavailable_reason

    return unavailable_reason(need_builder=True)


def test_available_backends_lists_every_backend_with_reasons():
    av = available_backends()
    assert set(av) == set(BACKENDS)
    assert av["torch"] is None and av["onnxruntime"] is None
    if not torch.cuda.is_available():
        assert av["torch-cudagraph"] and av["tensorrt"]


def test_onnxruntime_images_agree_with_torch(model, fp32_export):
    backend = create_backend("onnxruntime", model, engines_dir=fp32_export.folder, num_views=VIEWS, height=RES, width=RES,
                             batch=1, device="cpu")
    assert backend.name == "onnxruntime" and backend.info["provider"] == "CPUExecutionProvider"
    assert backend.info["manifest"]["precision"] == "fp32"
    ref, out = _sample(model), _sample(model, backend)
    assert out.shape == ref.shape == (1, VIEWS, 3, RES, RES)
    # stated tolerance for fp32 ORT vs torch: 1e-3 max abs on [0,1] pixels
    assert (out - ref).abs().max() < 1e-3


class _FakeGraph:
    """A static graph of ``rows`` rows that records its calls; each output row depends on its own inputs only."""

    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def run(self, tensors):
        self.calls.append({k: tuple(v.shape) for k, v in tensors.items()})
        x = tensors["sample"] if "sample" in tensors else tensors["latents"]
        assert x.shape[0] == self.rows
        extra = tensors["cam_3"].flatten(1).sum(1)[:, None, None, None] if "cam_3" in tensors else 0
        return x * 2 + extra + (tensors["timestep"] if "timestep" in tensors else 0)


def test_graph_backends_pass_inputs_by_name_and_pad_short_batches():
    from engines.base import GraphDecoder, GraphDenoiser
    from export.wrappers import UNET_INPUTS

    g = _FakeGraph(rows=4)  # exported for 2 prompts x 2 views
    den = GraphDenoiser(g, num_views=2, name="fake")
    rows = 2  # one prompt: padded to 4 rows, the padding dropped
    args = [torch.randn(rows, 4, 2, 2), torch.tensor([7.0]), *[torch.randn(rows, 3) for _ in range(4)],
            *[torch.randn(rows, 5, 2, 2) for _ in range(4)]]
    eps = den(*args)
    assert eps.shape == args[0].shape and set(g.calls[0]) == set(UNET_INPUTS)
    torch.testing.assert_close(eps, args[0] * 2 + args[-1].flatten(1).sum(1)[:, None, None, None] + 7.0)
    six = [torch.cat([a] * 3) if a.shape[0] == rows else a for a in args]  # 3 prompts: 4 + 2 (padded) rows
    assert den(*six).shape[0] == 6 and [c["sample"][0] for c in g.calls[1:]] == [4, 4]
    with pytest.raises(ManifestMismatchError, match="whole prompts"):
        den(*[a[:1] if a.shape[0] == rows else a for a in args])  # half a prompt
    dec = GraphDecoder(_FakeGraph(rows=4), "fake")
    z = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(dec(z), z * 2)


def test_corrupt_graph_is_refused_in_one_line(model, fp32_export, tmp_path):
    import shutil

    from mvz.errors import CheckpointError

    broken = tmp_path / "broken"
    shutil.copytree(fp32_export.folder, broken)
    f = broken / "vae_decoder.onnx"
    f.write_bytes(b"\x07" * f.stat().st_size)  # same size: the full sha256 at load tells
    with pytest.raises(CheckpointError, match="does not match its export manifest"):
        create_backend("onnxruntime", model, engines_dir=broken, num_views=VIEWS, height=RES, width=RES, batch=1, device="cpu")


def test_export_that_does_not_fit_is_refused(model, fp32_export, tmp_path):
    kw = {"engines_dir": fp32_export.folder, "device": "cpu", "height": RES, "width": RES}
    with pytest.raises(ManifestMismatchError, match=f"views {VIEWS} != 4"):
        create_backend("onnxruntime", model, num_views=4, batch=1, **kw)
    with pytest.raises(ManifestMismatchError, match="batch"):
        create_backend("onnxruntime", model, num_views=VIEWS, batch=2, **kw)
    with pytest.raises(ManifestMismatchError, match="resolution"):
        create_backend("onnxruntime", model, num_views=VIEWS, batch=1, engines_dir=fp32_export.folder, device="cpu", height=64, width=64)
    # a model that carries a LoRA against a LoRA-free export
    lora = tmp_path / "l.safetensors"
    lora.write_bytes(b"x")
    m2 = copy.copy(model)
    m2.info = copy.copy(model.info)
    m2.info.lora, m2.info.lora_scale = str(lora), 1.0
    with pytest.raises(ManifestMismatchError, match="LoRA"):
        create_backend("onnxruntime", m2, num_views=VIEWS, batch=1, **kw)
    with pytest.raises(Exception, match="holds no mvz export|does not exist"):
        create_backend("onnxruntime", model, num_views=VIEWS, batch=1, engines_dir=tmp_path, device="cpu", height=RES, width=RES)


def test_unavailable_backends_say_why(model):
    with pytest.raises(InputError, match="unknown backend"):
        create_backend("nope", model, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError, match="CUDA"):
            create_backend("torch-cudagraph", model, device="cpu")
    if _has_tensorrt():
        with pytest.raises(BackendUnavailableError, match="TensorRT"):
            create_backend("tensorrt", model, engines_dir="x", height=RES, device="cpu")
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        from engines.onnxruntime_backend import select_providers

        with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
            select_providers("cuda", torch.device("cpu"))


def test_fused_qkv_matches_the_unfused_unet(model):
    from engines.torch_backend import fuse_qkv, unfuse_qkv
    from export.wrappers import UNetWrapper, unet_example_inputs
    from mvz.models.attention import mv_processors

    unet = copy.deepcopy(model.unet)
    args = unet_example_inputs(model, torch.float32, VIEWS, RES, RES)
    wrap = UNetWrapper(unet, VIEWS, RES // 8, RES // 8)
    with torch.no_grad():
        ref = wrap(*args)
        n = fuse_qkv(unet)
        procs = list(mv_processors(unet).values())
        assert n > 0 and sum(p.fused_qkv is not None for p in procs) == n
        fused = wrap(*args)
        # the fused projection really runs: perturbing the fused weight changes the output
        saved = procs[0].fused_qkv.clone()
        procs[0].fused_qkv.mul_(1.5)
        assert (wrap(*args) - fused).abs().max() > 1e-4
        procs[0].fused_qkv.copy_(saved)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert set(unet.state_dict()) == set(model.unet.state_dict())  # the keys stay MV-Adapter's while fused
    assert unfuse_qkv(unet) == n and all(p.fused_qkv is None for p in procs)
    with torch.no_grad():
        torch.testing.assert_close(wrap(*args), ref, atol=0, rtol=0)


def _fixed_unet_inputs(model, views=VIEWS, prompts=1, res=RES):
    from export.wrappers import unet_example_inputs

    return unet_example_inputs(model, torch.float32, prompts * views, res, res, seed=5)


def _backend_or_skip(name, model, **kw):
    reason = available_backends()[name]
    if reason:
        pytest.skip(f"{name}: {reason}")
    return create_backend(name, model, num_views=VIEWS, height=RES, width=RES, batch=1, device="cpu", **kw)


@pytest.mark.parametrize("name", ["torch", "onnxruntime", pytest.param("torch-compile", marks=pytest.mark.slow)])
def test_each_backend_matches_eager_torch_on_fixed_inputs(name, fresh_tiny_model, fp32_export):
    """Denoiser and Decoder of every backend that runs here against eager torch on the same fixed inputs
    (torch-cudagraph and tensorrt: GPU tests below)."""
    from mvz.pipeline import TorchDecoder, TorchDenoiser

    model = fresh_tiny_model  # compile variants optimise the UNet in place
    args = _fixed_unet_inputs(model)
    z = torch.randn(2 * VIEWS + 1, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(6))  # padded chunk
    with torch.no_grad():
        eps_ref, img_ref = TorchDenoiser(model, VIEWS)(*args), TorchDecoder(model, batch=None)(z)
    backend = _backend_or_skip(name, model, **({"engines_dir": fp32_export.folder} if name == "onnxruntime" else {}))
    with torch.no_grad():
        eps, img = backend.denoiser(*args), backend.decoder(z)
    assert eps.shape == eps_ref.shape and img.shape == img_ref.shape
    torch.testing.assert_close(eps, eps_ref, rtol=1e-3, atol=1e-4)  # fp32 everywhere; ORT/inductor reorder sums
    torch.testing.assert_close(img, img_ref, rtol=1e-3, atol=1e-4)
    assert (eps - TorchDenoiser(model, 1)(*args)).abs().max() > 1e-4, "the views setting must reach the backend"


def _replaying_capture(log):
    """A CPU stand-in for CUDA-graph capture: the 'graph' re-runs exactly what was captured (its baked
    Python settings included) into the static output, as a replayed CUDA graph would."""

    def capture(run, static_in):
        log.append(tuple(t.shape for t in static_in))
        out = run()

        def replay():
            out.copy_(run())

        return replay, out

    return capture


def test_cudagraph_runner_never_replays_another_views_split(fresh_tiny_model):
    """Same tensor shapes, other (prompts, views) split: a new capture, never the other split's graph."""
    from engines.torch_backend import GraphedDenoiser
    from mvz.pipeline import TorchDenoiser

    model = fresh_tiny_model
    log = []
    den = GraphedDenoiser(model, 2, channels_last=False, capture=_replaying_capture(log))
    args = _fixed_unet_inputs(model, views=2, prompts=2)  # 4 rows: 2 prompts x 2 views, or 1 prompt x 4 views
    with torch.no_grad():
        eager = {v: TorchDenoiser(model, v)(*args) for v in (2, 4)}
        for views in (2, 4, 2, 4):
            den.num_views = views
            torch.testing.assert_close(den(*args), eager[views], rtol=0, atol=0)
    assert len(log) == 2, "one capture per (prompts, views) split, replayed afterwards"
    assert (eager[2] - eager[4]).abs().max() > 1e-4


@pytest.mark.gpu
def test_cudagraph_backend_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from mvz.models.loading import load_model
    from mvz.pipeline import MultiviewPipeline

    m = load_model("tiny", device="cuda", dtype="fp16")
    ref = MultiviewPipeline(m).sample(["a chair"], [0], steps=4).images
    b = create_backend("torch-cudagraph", m, device="cuda", height=GPU_RES)
    out = MultiviewPipeline(m, denoiser=b.denoiser, decoder=b.decoder).sample(["a chair"], [0], steps=4).images
    assert (out - ref).abs().max() < 2e-2


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_tensorrt_build_run_and_refit(tmp_path):
    reason = _has_tensorrt()
    if reason:
        pytest.skip(reason)
    from engines.tensorrt_build import build_engines
    from mvz.models.loading import load_model
    from mvz.pipeline import MultiviewPipeline

    m = load_model("tiny", device="cuda", dtype="fp16")
    exp = export_model(m, tmp_path / "fp16", precision="fp16", height=GPU_RES)
    em = build_engines(exp.folder, refittable=True, timing_cache=tmp_path / "timing.cache")
    assert set(em.engines) == {"unet", "vae_decoder"} and (tmp_path / "timing.cache").is_file()
    again = build_engines(exp.folder, refittable=True, timing_cache=tmp_path / "timing.cache")
    assert again.engines["unet"].build_seconds == em.engines["unet"].build_seconds  # reused, not rebuilt
    # the torch reference first: creating the TensorRT backend moves the torch UNet and VAE off the GPU
    ref = MultiviewPipeline(m).sample(["a chair"], [0], steps=4).images
    trt_b = create_backend("tensorrt", m, engines_dir=exp.folder, num_views=6, height=GPU_RES, width=GPU_RES, batch=1, device="cuda")
    ort_b = create_backend("onnxruntime", m, engines_dir=exp.folder, num_views=6, height=GPU_RES, width=GPU_RES, batch=1,
                           device="cuda", providers="cuda") if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers() else None
    out = MultiviewPipeline(m, denoiser=trt_b.denoiser, decoder=trt_b.decoder).sample(["a chair"], [0], steps=4).images
    assert (out - ref).abs().max() < 5e-2
    if ort_b is not None:
        o2 = MultiviewPipeline(m, denoiser=ort_b.denoiser, decoder=ort_b.decoder).sample(["a chair"], [0], steps=4).images
        assert (o2 - out).abs().max() < 5e-2
    # LoRA switch by refit: the base (refittable) engines serve a model that carries a LoRA
    from mvz.models.lora import add_lora, save_lora

    unet = copy.deepcopy(m.unet).float()
    add_lora(unet, rank=4)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    lora = save_lora(unet, tmp_path / "lora.safetensors")
    ml = load_model("tiny", device="cuda", dtype="fp16", lora=str(lora))
    ref_l = MultiviewPipeline(ml).sample(["a chair"], [0], steps=4).images  # before the backend moves the UNet
    trt_l = create_backend("tensorrt", ml, engines_dir=exp.folder, num_views=6, height=GPU_RES, width=GPU_RES, batch=1, device="cuda")
    assert trt_l.info["refit"]["weights"] > 0
    out_l = MultiviewPipeline(ml, denoiser=trt_l.denoiser, decoder=trt_l.decoder).sample(["a chair"], [0], steps=4).images
    assert (out_l - ref_l).abs().max() < 5e-2 and (ref_l - ref).abs().max() > 1e-3


_ALL_EPS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
_GPU = torch.device("cuda", 1)


@pytest.mark.parametrize("requested,device,available,expected", [
    ("auto", torch.device("cpu"), _ALL_EPS, ["CPUExecutionProvider"]),
    (None, _GPU, _ALL_EPS, ["CUDAExecutionProvider", "CPUExecutionProvider"]),  # never TensorRT unasked
    ("auto", _GPU, ["TensorrtExecutionProvider", "CPUExecutionProvider"], "no CUDA provider"),
    ("cuda", _GPU, _ALL_EPS, ["CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("cpu", _GPU, _ALL_EPS, ["CPUExecutionProvider"]),
    ("tensorrt", _GPU, _ALL_EPS, ["TensorrtExecutionProvider", "CPUExecutionProvider"]),
    (["tensorrt", "cuda"], _GPU, _ALL_EPS, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
    ("tensorrt", _GPU, ["CUDAExecutionProvider", "CPUExecutionProvider"], "TensorrtExecutionProvider not available"),
])
def test_ort_provider_selection_per_request(requested, device, available, expected, tmp_path):
    from engines.onnxruntime_backend import select_providers

    kw = {"available": available, "stream": 1234, "trt_workspace_bytes": 3 << 30}
    if isinstance(expected, str):
        with pytest.raises(BackendUnavailableError, match=expected):
            select_providers(requested, device, tmp_path, **kw)
        return
    got = select_providers(requested, device, tmp_path, **kw)
    assert [p if isinstance(p, str) else p[0] for p in got] == expected
    options = {p[0]: p[1] for p in got if not isinstance(p, str)}
    gpu = {"device_id": 1, "user_compute_stream": "1234"}
    if "CUDAExecutionProvider" in options:
        assert options["CUDAExecutionProvider"] == gpu
    if "TensorrtExecutionProvider" in options:
        assert options["TensorrtExecutionProvider"] == {
            **gpu, "trt_fp16_enable": True, "trt_max_workspace_size": 3 << 30,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(tmp_path),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(tmp_path)}


def test_ort_default_stream_is_not_passed():
    """ORT treats stream 0 (torch's legacy default stream) as no stream: never pass it."""
    from engines.onnxruntime_backend import select_providers

    got = select_providers("cuda", _GPU, available=_ALL_EPS, stream=0)
    assert got[0] == ("CUDAExecutionProvider", {"device_id": 1})


class _FakeEngine:
    def __init__(self, need):
        self.device_memory_bytes, self.given = need, []

    def set_device_memory(self, ptr, size):
        self.given.append((ptr, size))


def test_engines_share_one_context_buffer_sized_by_the_largest():
    """USER_MANAGED contexts: one buffer of max(device_memory_size_v2), the same pointer for every engine."""
    from engines.tensorrt_backend import share_context_memory, shared_context_bytes

    unet, vae = _FakeEngine(3000), _FakeEngine(7000)
    assert shared_context_bytes([unet, vae]) == 7000 and shared_context_bytes([]) == 0
    buf = share_context_memory([unet, vae], torch.device("cpu"))
    assert buf.numel() == 7000 and buf.dtype == torch.uint8
    assert unet.given == vae.given == [(buf.data_ptr(), 7000)]
