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
    from engines.torch_backend import FusedQKVMVProcessor, fuse_qkv, unfuse_qkv
    from export.wrappers import UNetWrapper, unet_example_inputs

    unet = copy.deepcopy(model.unet)
    args = unet_example_inputs(model, torch.float32, VIEWS, RES, RES)
    wrap = UNetWrapper(unet, VIEWS, RES // 8, RES // 8)
    with torch.no_grad():
        ref = wrap(*args)
        n = fuse_qkv(unet)
        assert n > 0 and sum(isinstance(p, FusedQKVMVProcessor) for p in unet.attn_processors.values()) == n
        fused = wrap(*args)
        # the fused processor really runs: perturbing its weight changes the output
        proc = next(p for p in unet.attn_processors.values() if isinstance(p, FusedQKVMVProcessor))
        proc.qkv.weight.mul_(1.5)
        assert (wrap(*args) - fused).abs().max() > 1e-4
        proc.qkv.weight.div_(1.5)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    assert unfuse_qkv(unet) == n


def test_torch_backends_build(model):
    b = create_backend("torch", model, device="cpu", height=RES)
    assert b.name == "torch" and callable(b.denoiser) and callable(b.decoder)


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
    trt_b = create_backend("tensorrt", m, engines_dir=exp.folder, num_views=6, height=GPU_RES, width=GPU_RES, batch=1, device="cuda")
    ort_b = create_backend("onnxruntime", m, engines_dir=exp.folder, num_views=6, height=GPU_RES, width=GPU_RES, batch=1,
                           device="cuda", providers="cuda") if "CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers() else None
    ref = MultiviewPipeline(m).sample(["a chair"], [0], steps=4).images
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
    trt_l = create_backend("tensorrt", ml, engines_dir=exp.folder, num_views=6, height=GPU_RES, width=GPU_RES, batch=1, device="cuda")
    assert trt_l.info["refit"]["weights"] > 0
    ref_l = MultiviewPipeline(ml).sample(["a chair"], [0], steps=4).images
    out_l = MultiviewPipeline(ml, denoiser=trt_l.denoiser, decoder=trt_l.decoder).sample(["a chair"], [0], steps=4).images
    assert (out_l - ref_l).abs().max() < 5e-2 and (ref_l - ref).abs().max() > 1e-3
