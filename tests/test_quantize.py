"""Quantized UNet through ModelOpt (export/quantize.py) on the tiny model: the keep-in-fp16 decision, the
calibration (deterministic, cached), the INT8 Q/DQ graph node by node, ONNX Runtime's INT8 output against
fp32, FP8 Q/DQ structure, and the manifest's refusal to refit a quantized UNet with a LoRA.

Costly steps (one calibration + one INT8 UNet export, about a minute on 2 cores) run once per module.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("modelopt.torch.quantization")

VIEWS, RES = 2, 64
# ONNX Runtime's INT8 eps vs the fp32 UNet on fixed inputs: at least this PSNR (dB, over the eps range)
INT8_MIN_PSNR_DB = 30.0


def _spec(precision="int8", seed=7, prompts=("a red car",), steps=1):
    from export.quantize import CalibrationSpec

    return CalibrationSpec(precision, list(prompts), steps, seed=seed, num_views=VIEWS, height=RES, width=RES,
                           base_dtype="fp32")


def _calibrate(model, spec, cache_dir):
    from export.fuse import fused_unet
    from export.quantize import calibrated_unet

    unet = fused_unet(model.unet, None, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibrated_unet(model, unet, spec, model_fp="tiny-test", lora=None, cache_dir=cache_dir)


def _amax(unet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unet.state_dict().items() if k.endswith("_amax") or k.endswith("pre_quant_scale")}


def _inputs(model, seed=0):
    from export.wrappers import unet_example_inputs

    return unet_example_inputs(model, torch.float32, VIEWS, RES, RES, seed=seed)


@pytest.fixture(scope="module")
def int8(tiny_model, tmp_path_factory):
    """One INT8 calibration (cached in a private folder) and its Q/DQ ONNX export."""
    from export.quantize import export_quantized_graph
    from export.wrappers import UNET_INPUTS, UNET_OUTPUTS, UNetWrapper

    cache = tmp_path_factory.mktemp("calib")
    result = _calibrate(tiny_model, _spec(), cache)
    wrapper = UNetWrapper(result.unet, VIEWS, RES // 8, RES // 8).eval()
    path = tmp_path_factory.mktemp("int8") / "unet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_quantized_graph("int8")(wrapper, _inputs(tiny_model), path, UNET_INPUTS, UNET_OUTPUTS, opset=19)
    return {"result": result, "cache": cache, "path": path, "wrapper": wrapper}


# ---- the decision ---------------------------------------------------------------------------------------

def test_decision_keeps_mv_branch_embeddings_and_first_last_convs(tiny_model):
    from export.quantize import kept_layers, kept_reason, quantized_layers

    unet = tiny_model.unet
    q, k = set(quantized_layers(unet)), set(kept_layers(unet))
    assert q and k and not (q & k)
    for name in ("conv_in", "conv_out", "time_embedding.linear_1", "add_embedding.linear_2"):
        assert name in k, name
    mv = [n for n in k if n.endswith(("to_q_mv", "to_k_mv", "to_v_mv", "to_out_mv.0"))]
    assert mv and not any("_mv" in n for n in q)
    assert not any(n.endswith("time_emb_proj") for n in q)
    assert any(n.endswith("attn1.to_q") for n in q) and any(n.endswith("resnets.0.conv1") for n in q)
    assert any(n.endswith("ff.net.2") for n in q)
    assert kept_reason("down_blocks.0.resnets.0.conv1") is None
    # NVIDIA's level 2.5: of the Linears only to_q/to_k/to_v and ff.net
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)}
    assert all(n.endswith(("to_q", "to_k", "to_v")) or ".ff.net." in n for n in q & linears), sorted(q & linears)
    assert any(n.endswith("attn1.to_out.0") for n in k) and any(n.endswith("proj_in") for n in k)


def test_modelopt_enables_exactly_the_decided_quantizers(int8):
    from export.quantize import quantized_layers

    unet = int8["result"].unet
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = {n.rsplit(".", 1)[0] for n, m in unet.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
    assert enabled == set(quantized_layers(unet))


# ---- the INT8 graph -------------------------------------------------------------------------------------

def test_int8_graph_has_qdq_exactly_where_the_decision_says(int8):
    from export.quantize import qdq_layers, quantized_layers

    unet = int8["result"].unet
    found = qdq_layers(int8["path"], {n for n, _ in unet.named_modules()})
    decided = quantized_layers(unet)
    assert sorted(found) == sorted(decided)
    for layer in decided:  # weight and input Q/DQ on every quantized layer, int8 both
        assert found[layer] == {"weight": "int8", "input": "int8"}, layer


def test_int8_onnxruntime_output_within_psnr_of_fp32(int8, tiny_model):
    import onnxruntime as ort

    from bench.fidelity import psnr
    from export.wrappers import UNET_INPUTS, UNetWrapper

    args = _inputs(tiny_model, seed=5)
    with torch.no_grad():
        ref = UNetWrapper(tiny_model.unet, VIEWS, RES // 8, RES // 8).eval()(*args)
    sess = ort.InferenceSession(str(int8["path"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {n: a.numpy() for n, a in zip(UNET_INPUTS, args, strict=True)})[0]
    out = torch.from_numpy(out)
    span = float(ref.max() - ref.min())
    db = psnr(out, ref, data_range=span)
    assert db >= INT8_MIN_PSNR_DB, db
    assert not torch.equal(out, ref)  # it is quantized: not bit-equal to fp32


# ---- calibration ----------------------------------------------------------------------------------------

@pytest.mark.slow  # two extra calibrations; CI runs it with -m slow
def test_calibration_is_deterministic_for_a_seed(int8, tiny_model, tmp_path):
    first = _amax(int8["result"].unet)
    again = _amax(_calibrate(tiny_model, _spec(seed=7), tmp_path / "a").unet)
    assert first.keys() == again.keys() and first
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = _amax(_calibrate(tiny_model, _spec(seed=8), tmp_path / "b").unet)  # the seed reaches the sampler
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_reexport_reuses_saved_calibration_without_running_the_unet(int8, tiny_model):
    from export.fuse import fused_unet
    from export.quantize import calibrated_unet

    assert int8["result"].figures["unet_calls"] > 0 and not int8["result"].reused
    unet = fused_unet(tiny_model.unet, None, dtype=torch.float32)
    calls = []
    unet.register_forward_pre_hook(lambda *a: calls.append(1))
    res = calibrated_unet(tiny_model, unet, _spec(), model_fp="tiny-test", lora=None, cache_dir=int8["cache"])
    assert res.reused and res.hash == int8["result"].hash and not calls
    want = _amax(int8["result"].unet)
    got = _amax(res.unet)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_calibration_hash_changes_with_prompts_steps_and_lora():
    from export.quantize import calibration_hash

    layers = ["a", "b"]
    base = calibration_hash(_spec(), "m", None, layers)
    assert base == calibration_hash(_spec(), "m", None, layers)
    assert base != calibration_hash(_spec(prompts=("a blue car",)), "m", None, layers)
    assert base != calibration_hash(_spec(steps=2), "m", None, layers)
    assert base != calibration_hash(_spec(), "m", {"sha256": "x", "scale": 1.0}, layers)
    assert base != calibration_hash(_spec(precision="fp8"), "m", None, layers)


# ---- FP8 structure --------------------------------------------------------------------------------------

def test_fp8_graph_has_standard_float8_qdq(tmp_path):
    """A ModelOpt FP8 module exported through our path: standard Q/DQ with float8e4m3fn, no trt custom ops."""
    import modelopt.torch.quantization as mtq
    import onnx

    from export.quantize import export_quantized_graph, modelopt_config, qdq_layers

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).eval()
    x = torch.randn(2, 4, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mtq.quantize(net, modelopt_config("fp8", ["0", "2"], "fp32"), forward_loop=lambda m: m(x))
        path = tmp_path / "fp8.onnx"
        export_quantized_graph("fp8")(net, (x,), path, ["x"], ["y"], opset=19)
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert not any(n.domain == "trt" or n.op_type.startswith("TRT_") for n in model.graph.node)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    found = qdq_layers(path)
    assert set(found) == {"0", "2"}
    assert all(v == {"weight": "float8_e4m3fn", "input": "float8_e4m3fn"} for v in found.values()), found
    onnx.checker.check_model(str(path), full_check=True)


# ---- refusals -------------------------------------------------------------------------------------------

def _manifest(quantized: bool, lora=None):
    from mvz.artifacts.manifest import ExportManifest

    return ExportManifest(model={"name": "tiny"}, lora=lora, num_views=2, height=64, width=64, batch=1,
                          dynamic_batch=False, precision="int8" if quantized else "fp16", vae_precision="fp32",
                          opset=19, exporter="torchscript", graphs={},
                          quantization={"precision": "int8", "calibration_hash": "h"} if quantized else None)


def test_manifest_refuses_lora_refit_of_a_quantized_unet():
    from mvz.artifacts.manifest import ExportManifest, refuse_quantized_refit
    from mvz.errors import ManifestMismatchError

    lora = {"path": "/x/l.safetensors", "sha256": "abc", "scale": 1.0}
    m = ExportManifest.from_dict(_manifest(True).to_dict())  # survives the JSON round trip
    assert m.quantization["calibration_hash"] == "h"
    with pytest.raises(ManifestMismatchError, match="re-calibration"):
        refuse_quantized_refit(m, lora)
    refuse_quantized_refit(m, None)  # the exported (no) LoRA is fine
    refuse_quantized_refit(_manifest(True, lora), dict(lora))
    with pytest.raises(ManifestMismatchError, match="re-calibration"):
        refuse_quantized_refit(_manifest(True, lora), {**lora, "scale": 0.5})
    refuse_quantized_refit(_manifest(False), lora)  # fp16 engines may be refit


def test_fp8_refused_below_compute_capability_89(monkeypatch):
    from export.quantize import check_precision_for_device
    from mvz.errors import DeviceError

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    with pytest.raises(DeviceError, match="8.9"):
        check_precision_for_device("fp8", torch.device("cuda:0"), build_engines=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    check_precision_for_device("fp8", torch.device("cuda:0"), build_engines=True)
    with pytest.raises(DeviceError, match="--onnx-only"):
        check_precision_for_device("fp8", torch.device("cpu"), build_engines=True)
    check_precision_for_device("fp8", torch.device("cpu"), build_engines=False)
    check_precision_for_device("int8", torch.device("cpu"), build_engines=True)


def test_empty_and_missing_calibration_sets(tmp_path):
    from export.quantize import load_calib_prompts
    from mvz.errors import InputError

    with pytest.raises(InputError, match="does not exist"):
        load_calib_prompts(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(InputError, match="calibration set"):
        load_calib_prompts(empty)
    with pytest.raises(InputError, match="empty"):
        _spec(prompts=()).validate()
    assert len(load_calib_prompts()) >= 32  # the shipped default list


def test_psnr_bound_is_meaningful():
    """The PSNR bound separates a quantization-sized error from a broken graph (guards the test above)."""
    from bench.fidelity import psnr

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 4, 8, 8, generator=g)
    span = float(ref.max() - ref.min())
    small = ref + 0.005 * span * torch.randn(ref.shape, generator=g)
    broken = torch.from_numpy(np.roll(ref.numpy(), 1, axis=1))
    assert psnr(small, ref, data_range=span) > INT8_MIN_PSNR_DB > psnr(broken, ref, data_range=span)


# ---- bench ----------------------------------------------------------------------------------------------

def test_bench_reports_every_precision_side_by_side(int8, tiny_model):
    """fp32 (torch), fp16-labelled torch stand-in and the ORT INT8 graph: latency, memory, fidelity vs fp32,
    reward deltas vs fp16 with intervals, one row each."""
    from bench.backends import torch_backend
    from bench.precision import compare_precisions, precision_rows, render_rows
    from bench.quality import load_rewards
    from engines.base import Backend, GraphDenoiser
    from engines.onnxruntime_backend import OrtGraph
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import TorchDecoder

    graph = OrtGraph(int8["path"], ["CPUExecutionProvider"], torch.device("cpu"))
    backends = {"int8": Backend("onnxruntime", GraphDenoiser(graph, VIEWS, "onnxruntime"), TorchDecoder(tiny_model)),
                "fp16": torch_backend(tiny_model, VIEWS), "fp32": torch_backend(tiny_model, VIEWS)}
    rewards, missing = load_rewards(["pickscore", "hyperscore"], "tiny", "cpu")
    assert not missing, missing
    section = compare_precisions(tiny_model, backends, prompts=["a red car", "a chair", "a cat"], seeds=[0, 1, 2],
                                 cameras=CameraSet.default(VIEWS), height=RES, width=RES, steps=2, guidance=6.0,
                                 rewards=rewards, warmup=0, runs=1)
    assert list(section["precisions"]) == ["fp32", "fp16", "int8"]
    rows = {r["precision"]: r for r in precision_rows(section)}
    assert rows["fp32"]["final_latent_rel_error"] == 0.0  # the torch fp32 run is the reference itself
    int8_row = rows["int8"]
    assert 0 < int8_row["final_latent_rel_error"] < 0.5 and int8_row["end_to_end_ms"] > 0
    assert len(section["precisions"]["int8"]["fidelity"]["per_step_latent_rel_error"]) == 2
    assert len(section["precisions"]["int8"]["fidelity"]["psnr_db_per_view"][0]) == VIEWS
    assert section["quality"]["base"] == "fp16"
    for reward in ("pickscore", "hyperscore"):
        d = int8_row["reward_delta"][reward]
        assert d["vs"] == "fp16" and d["ci_low"] <= d["mean"] <= d["ci_high"]
        assert rows["fp32"]["reward_delta"][reward]["mean"] == 0.0  # same images as the fp16 stand-in
    assert "int8" in render_rows(list(rows.values()))
