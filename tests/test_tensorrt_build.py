"""The TensorRT build half up to the engine boundary: Polygraphy's lazy loader chain (constructed without
TensorRT, inspected), per-weight refit marking, the timing-cache fall-back, the numeric check (ONNX Runtime
runners stand in for the engine), and that a failing engine is not kept."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("polygraphy")
pytest.importorskip("onnxruntime")

from engines import tensorrt_build as tb  # noqa: E402
from mvz.artifacts.manifest import ExportManifest, GraphEntry, TensorSpec  # noqa: E402

FAKE_TRT = SimpleNamespace(MemoryPoolType=SimpleNamespace(WORKSPACE="WORKSPACE"),
                           BuilderFlag=SimpleNamespace(REFIT_INDIVIDUAL="REFIT_INDIVIDUAL"), __version__="10.0.0")


def _manifest(dynamic: bool = False) -> ExportManifest:
    rows = "batch" if dynamic else 4
    spec = [TensorSpec("x", [rows, 3], "float32")]
    g = GraphEntry("g.onnx", None, "0" * 64, 1, spec, [TensorSpec("y", [rows, 3], "float32")], "fp32")
    return ExportManifest(model={"name": "t"}, lora=None, num_views=2, height=8, width=8, batch=2, dynamic_batch=dynamic,
                          precision="fp32", vae_precision="fp32", opset=19, exporter="torchscript",
                          graphs={"unet": g, "vae_decoder": g}, refit_map="refit_map.json")


def _scale_graph(path, factor: float) -> None:
    """y = x * w, w an initializer (a real ONNX file for ONNX Runtime)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.full((3,), factor, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def test_loader_chain_is_configured_as_intended(tmp_path):
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessConfig,
    )

    (tmp_path / "refit_map.json").write_text(json.dumps({"weights": {"a.weight": {"onnx": "onnx::MatMul_1"},
                                                                     "b.weight": {"onnx": "onnx::MatMul_2"}}}))
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"cache")
    m = _manifest()
    spec = tb.build_spec(tmp_path, m, "unet", refit="individual", workspace_bytes=3 << 30, opt_level=4, timing_cache=cache)
    assert spec.profile == {"x": [[4, 3], [4, 3], [4, 3]]} and spec.refit_weights == ["onnx::MatMul_1", "onnx::MatMul_2"]
    network, config, engine = tb.engine_loaders(spec, workspace_pool="WORKSPACE", refit_individual_flag="FLAG")
    assert isinstance(network, NetworkFromOnnxPath) and network.path == str(tmp_path / "g.onnx") and network.strongly_typed
    assert isinstance(config, PostprocessConfig)  # REFIT_INDIVIDUAL + marks on top of CreateConfig
    base = config._config
    assert isinstance(base, CreateConfig) and base.refittable is False
    prof = base.profiles[0]["x"]
    assert (prof.min, prof.opt, prof.max) == ((4, 3), (4, 3), (4, 3))
    assert base.memory_pool_limits == {"WORKSPACE": 3 << 30} and base.builder_optimization_level == 4
    assert base.timing_cache_path == str(cache)
    assert isinstance(engine, EngineBytesFromNetwork) and engine.timing_cache_path == str(cache)
    # whole-engine refit (older TensorRT) and none: plain CreateConfig; the VAE is never refittable
    spec_all = tb.build_spec(tmp_path, m, "unet", refit="all", workspace_bytes=1, opt_level=3, timing_cache=None)
    _, cfg_all, eng_all = tb.engine_loaders(spec_all, workspace_pool="WORKSPACE")
    assert isinstance(cfg_all, CreateConfig) and cfg_all.refittable and cfg_all.timing_cache_path is None
    assert eng_all.timing_cache_path is None
    assert tb.build_spec(tmp_path, m, "vae_decoder", refit="individual", workspace_bytes=1, opt_level=3,
                         timing_cache=None).refit == "none"
    # a dynamic batch spans one prompt to the exported batch
    assert tb.build_spec(tmp_path, _manifest(dynamic=True), "vae_decoder", refit="none", workspace_bytes=1, opt_level=3,
                         timing_cache=None).profile == {"x": [[2, 3], [4, 3], [4, 3]]}


def test_refit_individual_marks_exactly_the_lora_weights():
    marked, flags = [], []
    network = SimpleNamespace(mark_weights_refittable=lambda n: marked.append(n) or n != "missing")
    config = SimpleNamespace(set_flag=flags.append)
    tb._mark_refittable(["w1", "w2"], "FLAG")(None, network, config)
    assert marked == ["w1", "w2"] and flags == ["FLAG"]
    with pytest.raises(tb.EngineBuildError, match="no weights named missing"):
        tb._mark_refittable(["w1", "missing"], "FLAG")(None, network, config)
    new = SimpleNamespace(BuilderFlag=SimpleNamespace(REFIT_INDIVIDUAL=1),
                          INetworkDefinition=SimpleNamespace(mark_weights_refittable=None))
    old = SimpleNamespace(BuilderFlag=SimpleNamespace(REFIT=1), INetworkDefinition=SimpleNamespace())
    assert (tb.refit_mode(True, new), tb.refit_mode(True, old), tb.refit_mode(False, new)) == ("individual", "all", "none")


class _FakeBuilderConfig:
    def __init__(self, accept):
        self.accept = accept

    def create_timing_cache(self, data):
        if self.accept is None:
            raise RuntimeError("not a timing cache")
        return object()

    def set_timing_cache(self, cache, ignore_mismatch):
        return self.accept


class _Logger:
    ERROR = 0

    def __init__(self, level):
        self.level = level


def _fake_trt(accept):
    cfg = _FakeBuilderConfig(accept)
    return SimpleNamespace(Logger=_Logger, __version__="10.0.0",
                           Builder=lambda logger: SimpleNamespace(create_builder_config=lambda: cfg))


@pytest.mark.parametrize("accept", [False, None])  # set_timing_cache refuses it / the bytes are not a cache
def test_rejected_timing_cache_is_set_aside_with_one_line(tmp_path, accept):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    said = []
    assert tb.usable_timing_cache(cache, _fake_trt(accept), said.append) == cache
    assert not cache.exists() and (tmp_path / "timing.cache.rejected").read_bytes() == b"from another GPU"
    assert len(said) == 1 and "fresh cache" in said[0] and "\n" not in said[0]
    # an accepted cache stays where it is, silently
    cache.write_bytes(b"good")
    said.clear()
    assert tb.usable_timing_cache(cache, _fake_trt(True), said.append) == cache and cache.read_bytes() == b"good"
    assert not said


def test_numeric_check_passes_the_same_graph_and_fails_a_wrong_or_nan_one(tmp_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    ref = tmp_path / "ref.onnx"
    _scale_graph(ref, 1.5)
    feeds = tb.check_inputs(_manifest(), "unet")
    assert feeds["x"].shape == (4, 3) and np.array_equal(feeds["x"], tb.check_inputs(_manifest(), "unet")["x"])
    same = tb.compare_with_onnxruntime(OnnxrtRunner(SessionFromOnnx(str(ref)), name="engine"), ref, feeds, "fp32")
    assert same["passed"] and same["finite"] and same["max_abs_err"] == 0.0
    for factor, finite in ((1.6, True), (float("nan"), False)):
        bad = tmp_path / f"bad{factor}.onnx"
        _scale_graph(bad, factor)
        r = tb.compare_with_onnxruntime(OnnxrtRunner(SessionFromOnnx(str(bad)), name="engine"), ref, feeds, "fp32")
        assert not r["passed"] and r["finite"] is finite


def test_a_failing_engine_is_not_kept(tmp_path, monkeypatch):
    onnx_path = tmp_path / "g.onnx"
    _scale_graph(onnx_path, 1.0)
    spec = tb.BuildSpec(onnx=onnx_path, profile={"x": [[4, 3]] * 3}, precision="fp32")
    monkeypatch.setattr(tb, "engine_loaders", lambda spec, **kw: (None, None, lambda: b"plan bytes"))
    monkeypatch.setattr("polygraphy.backend.trt.TrtRunner", lambda engine, name=None: "runner")
    verdict = {"passed": False, "finite": False, "median_rel_err": float("nan"), "cosine": 0.0}
    monkeypatch.setattr(tb, "compare_with_onnxruntime", lambda *a, **k: dict(verdict))
    plan = tmp_path / "g.plan"
    with pytest.raises(tb.EngineBuildError, match="does not match ONNX Runtime.*not kept"):
        tb.build_one(spec, plan, _manifest(), "unet", FAKE_TRT, print)
    assert not plan.exists() and not list(tmp_path.glob("*.plan*"))
    verdict.update(passed=True, finite=True, median_rel_err=0.0, cosine=1.0)
    entry = tb.build_one(spec, plan, _manifest(), "unet", FAKE_TRT, lambda msg: None)
    assert plan.read_bytes() == b"plan bytes" and entry.check["passed"] and entry.bytes == len(b"plan bytes")


def test_a_failed_build_is_one_line_with_what_to_do(tmp_path, monkeypatch):
    spec = tb.BuildSpec(onnx=tmp_path / "g.onnx", profile={}, precision="fp16")

    def fail(msg):
        def build():
            raise RuntimeError(msg)
        return lambda spec, **kw: (None, None, build)

    monkeypatch.setattr(tb, "engine_loaders", fail("Invalid Engine. Please ensure the engine was built correctly\nmore"))
    with pytest.raises(tb.EngineBuildError, match="failed to build the unet engine") as err:
        tb.build_one(spec, tmp_path / "g.plan", _manifest(), "unet", FAKE_TRT, print)
    assert "\n" not in str(err.value) and err.value.exit_code == 2
    monkeypatch.setattr(tb, "engine_loaders", fail("CUDA out of memory"))
    from mvz.errors import DeviceError

    with pytest.raises(DeviceError, match="out of GPU memory.*--workspace"):
        tb.build_one(spec, tmp_path / "g.plan", _manifest(), "unet", FAKE_TRT, print)
    assert not (tmp_path / "g.plan").exists()


def _columns_graph(path, factors) -> None:
    """y = x * w over [4, len(factors)] (a wider graph: room for a corruption confined to a few columns)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    n = len(factors)
    w = numpy_helper.from_array(np.asarray(factors, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("Mul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))


def test_numeric_gate_catches_a_corruption_confined_to_a_few_channels(tmp_path):
    """5 of 300 channels 25% off: the median error and the cosine pass, the 99th percentile does not."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    ref, bad = tmp_path / "ref.onnx", tmp_path / "bad.onnx"
    _columns_graph(ref, [1.5] * 300)
    _columns_graph(bad, [1.5 * 1.25] * 5 + [1.5] * 295)
    feeds = {"x": np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32)}
    r = tb.compare_with_onnxruntime(OnnxrtRunner(SessionFromOnnx(str(bad)), name="engine"), ref, feeds, "fp16")
    assert r["within_tolerance"] and r["cosine"] >= tb.check_bounds("fp16").min_cosine  # what a median gate saw
    assert not r["p99_within_tolerance"] and not r["passed"]
    same = tb.compare_with_onnxruntime(OnnxrtRunner(SessionFromOnnx(str(ref)), name="engine"), ref, feeds, "fp16")
    assert same["passed"]


def test_numeric_gate_requires_the_cosine(tmp_path):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    ref, bad = tmp_path / "ref.onnx", tmp_path / "bad.onnx"
    _columns_graph(ref, [1.0] * 300)
    _columns_graph(bad, [1.0, -1.0] * 150)  # half the channels flipped: a large error everywhere on them
    feeds = {"x": np.full((4, 300), 0.01, dtype=np.float32)}  # tiny values: within atol everywhere
    r = tb.compare_with_onnxruntime(OnnxrtRunner(SessionFromOnnx(str(bad)), name="engine"), ref, feeds, "fp16")
    assert r["within_tolerance"] and r["p99_within_tolerance"] and r["cosine"] < 0.5
    assert not r["cosine_within"] and not r["passed"]


@pytest.mark.parametrize("precision,base", [("int8", "fp16"), ("fp8", "fp16"), ("int8", "fp32"), ("fp16", None),
                                            ("fp32", None)])
def test_every_precision_has_check_bounds(precision, base):
    """A quantized graph's build ended in KeyError (the table was looked up by the graph's precision)."""
    bounds = tb.check_bounds(precision, base)
    assert bounds.min_cosine >= 0.99 and bounds.p99_atol >= bounds.atol and bounds.p99_rtol >= bounds.rtol
    assert (bounds is tb.QUANTIZED_CHECK_TOLERANCE.get(precision)) == (precision in ("int8", "fp8"))


def test_a_quantized_build_is_checked_with_its_own_bounds(tmp_path, monkeypatch):
    """build_one of an int8 UNet over an fp16 base reaches the check with the quantized bounds (no KeyError)."""
    onnx_path = tmp_path / "g.onnx"
    _scale_graph(onnx_path, 1.0)
    m = _manifest()
    m.quantization = {"precision": "int8", "base_dtype": "fp16"}
    m.graphs["unet"].precision = "int8"
    spec = tb.build_spec(tmp_path, m, "unet", refit="none", workspace_bytes=1, opt_level=4, timing_cache=None)
    assert (spec.precision, spec.base_dtype) == ("int8", "fp16")
    monkeypatch.setattr(tb, "engine_loaders", lambda spec, **kw: (None, None, lambda: b"plan"))
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    monkeypatch.setattr("polygraphy.backend.trt.TrtRunner",
                        lambda engine, name=None: OnnxrtRunner(SessionFromOnnx(str(onnx_path)), name="engine"))
    monkeypatch.setattr(tb, "_reference_providers", lambda: ["cpu"])
    entry = tb.build_one(spec, tmp_path / "g.plan", m, "unet", FAKE_TRT, lambda msg: None)
    assert entry.check["passed"] and entry.check["min_cosine"] == tb.QUANTIZED_CHECK_TOLERANCE["int8"].min_cosine


def test_builds_enable_tf32(tmp_path):
    spec = tb.BuildSpec(onnx=tmp_path / "g.onnx", profile={"x": [[4, 3]] * 3}, precision="fp16")
    _, config, _ = tb.engine_loaders(spec, workspace_pool="WORKSPACE")
    assert config.tf32 is True


def test_an_oom_that_polygraphy_reports_as_invalid_engine_says_to_lower_the_workspace(tmp_path, monkeypatch):
    """TensorRT logs the allocation failure; Polygraphy then raises only "Invalid Engine"."""
    from polygraphy.logger import G_LOGGER

    from mvz.errors import DeviceError

    spec = tb.BuildSpec(onnx=tmp_path / "g.onnx", profile={}, precision="fp16")

    def build():
        G_LOGGER.error("[defaultAllocator.cpp::allocate::31] Error Code 1: Cuda Runtime (out of memory)")
        raise RuntimeError("Invalid Engine. Please ensure the engine was built correctly")

    monkeypatch.setattr(tb, "engine_loaders", lambda spec, **kw: (None, None, build))
    with pytest.raises(DeviceError, match="out of GPU memory.*Lower --workspace or the batch") as err:
        tb.build_one(spec, tmp_path / "g.plan", _manifest(), "unet", FAKE_TRT, print)
    assert "raise" not in str(err.value).lower() and "larger" not in str(err.value).lower()
    assert "error" not in vars(G_LOGGER)  # the logger is itself again


def test_a_build_reverifies_the_graph_bytes_against_the_export_manifest(tmp_path, monkeypatch):
    """A swapped weights file is refused before TensorRT sees it (it was built and recorded)."""
    import hashlib

    from mvz.errors import CheckpointError

    onnx_path = tmp_path / "g.onnx"
    _scale_graph(onnx_path, 1.0)
    m = _manifest()
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    for g in m.graphs.values():
        g.sha256, g.bytes = digest, onnx_path.stat().st_size
    m.save(tmp_path)
    built = []
    monkeypatch.setattr(tb, "load_tensorrt", lambda need_builder=False: FAKE_TRT)
    monkeypatch.setattr(tb, "gpu_identity", lambda: {"gpu": "fake", "compute_capability": "8.9"})
    monkeypatch.setattr(tb, "usable_timing_cache", lambda path, trt, say: None)
    monkeypatch.setattr(tb, "build_one", lambda spec, *a, **k: built.append(spec) or (_ for _ in ()).throw(SystemExit))
    _scale_graph(onnx_path, 1.5)  # same size, other weights
    with pytest.raises(CheckpointError, match="does not match its export manifest"):
        tb.build_engines(tmp_path, graphs=("unet",))
    assert not built


def test_refit_gate_refuses_a_corruption_confined_to_a_few_elements(tiny_model, monkeypatch):
    """After a refit: 3% of eps off by 0.5% of its rms passes max, median and cosine, not the p99 bound."""
    import torch

    from engines import tensorrt_refit as tr
    from export.wrappers import UNET_INPUTS, UNetWrapper, unet_example_inputs

    args = unet_example_inputs(tiny_model, torch.float32, 2, 64, 64, seed=3)
    feeds = {n: a.numpy() for n, a in zip(UNET_INPUTS, args, strict=True)}
    monkeypatch.setattr(tr, "check_inputs", lambda manifest, graph: feeds)  # refit reads the shared helper
    manifest = SimpleNamespace(num_views=2, height=64, width=64, precision="fp32")
    wrapper = UNetWrapper(tiny_model.unet, 2, 8, 8).eval()

    def engine(corrupt: bool):
        def run(inputs):
            with torch.no_grad():
                out = wrapper(*[inputs[n] for n in UNET_INPUTS]).clone()
            if corrupt:
                flat = out.view(-1)
                n = int(flat.numel() * 0.03)
                flat[:n] += 5e-3 * float(flat.pow(2).mean().sqrt())
            return out
        return run

    assert tr.check_refit(engine(False), tiny_model, manifest)["passed"]
    with pytest.raises(tr.RefitRefusedError, match="p99 rel err"):
        tr.check_refit(engine(True), tiny_model, manifest)
