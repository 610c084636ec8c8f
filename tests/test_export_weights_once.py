"""Weights touched once: the meta-device dynamo trace against the TorchScript one (node types, ONNX Runtime
outputs), no external data loaded after the trace, the refit map built from structure equal to the in-memory
one, and the host-memory refusal of ``mvz export``."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import run_main as _cli

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export.exporter import export_model  # noqa: E402
from export.fuse import lora_target_modules  # noqa: E402
from export.onnx_export import export_graph  # noqa: E402
from export.refit_map import build_refit_map  # noqa: E402
from export.wrappers import UNET_INPUTS, UNET_OUTPUTS, UNetWrapper, unet_example_inputs  # noqa: E402

RES, VIEWS = 32, 2
# the dynamo graph may use only the op types of the TorchScript one, plus Split: ``torch.chunk`` (GEGLU) is one
# Split there instead of Shape/Gather/Slice (a standard op TensorRT's ONNX parser takes)
DYNAMO_EXTRA_OPS = {"Split"}


@pytest.fixture(scope="module")
def unet_graphs(tiny_model, tmp_path_factory):
    """The tiny UNet exported by both routes (fp32, static shapes), with the inputs used."""
    folder = tmp_path_factory.mktemp("routes")
    args = unet_example_inputs(tiny_model, torch.float32, VIEWS, RES, RES)
    paths = {}
    for exporter in ("torchscript", "dynamo"):
        wrapper = UNetWrapper(tiny_model.unet, VIEWS, RES // 8, RES // 8).eval()
        paths[exporter] = export_graph(wrapper, args, folder / f"{exporter}.onnx", UNET_INPUTS, UNET_OUTPUTS,
                                       exporter=exporter, external_data=True).path
    return paths, args


def _ops(path: Path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def _run(path: Path, args) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: a.numpy() for n, a in zip(UNET_INPUTS, args, strict=True)})[0]


def _psnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    err = float(np.mean((ref.astype(np.float64) - x) ** 2))
    return 10 * np.log10(float(np.max(np.abs(ref))) ** 2 / max(err, 1e-30))


def test_dynamo_graph_is_the_torchscript_computation_in_the_same_node_types(unet_graphs, tiny_model):
    paths, args = unet_graphs
    dyn, ts = _ops(paths["dynamo"]), _ops(paths["torchscript"])
    assert set(dyn) <= set(ts) | DYNAMO_EXTRA_OPS, set(dyn) - set(ts)
    for op in ("Softmax", "Conv"):  # every attention and every convolution is still there, once
        assert dyn[op] == ts[op], (op, dyn[op], ts[op])
    assert not {"Cast", "CastLike", "Shape"} & set(dyn)  # nothing left for TensorRT to trip over at fp32
    # the same computation: ONNX Runtime on both graphs, and against eager torch
    with torch.no_grad():
        eager = UNetWrapper(tiny_model.unet, VIEWS, RES // 8, RES // 8)(*args).numpy()
    out_dyn, out_ts = _run(paths["dynamo"], args), _run(paths["torchscript"], args)
    assert _psnr_db(out_ts, out_dyn) >= 80.0
    assert _psnr_db(eager, out_dyn) >= 80.0


def test_dynamo_graph_keeps_row_attention_plain_and_shapes_static(unet_graphs):
    paths, _ = unet_graphs
    model = onnx.load(str(paths["dynamo"]), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    users: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax
    for sm in softmax:  # scores = MatMul(q, k^T) (maybe scaled) -> Softmax -> MatMul(p, v): what TensorRT fuses
        src = producer[sm.input[0]]
        while src.op_type in ("Mul", "Div", "Add"):
            src = producer[src.input[0]]
        assert src.op_type == "MatMul", src.op_type
        assert [u.op_type for u in users[sm.output[0]]] == ["MatMul"]
    for v in (*model.graph.input, *model.graph.output):
        assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name


def _old_build_refit_map(onnx_path, unet):
    """The refit map as built before (the whole graph loaded with its weights, hashed from memory): the oracle
    for reading the digests from structure, one tensor at a time. The matching itself is shared."""
    from onnx import numpy_helper

    from export.refit_map import _digest, map_lora_targets

    model = onnx.load(str(onnx_path), load_external_data=True)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    by_digest: dict[str, list[str]] = {}
    for init in model.graph.initializer:
        if len(init.dims) == 2:
            by_digest.setdefault(_digest(numpy_helper.to_array(init)), []).append(init.name)
    return map_lora_targets(unet, by_digest, consumers)


def test_refit_map_from_structure_equals_the_in_memory_one(unet_graphs, tiny_model):
    paths, _ = unet_graphs
    targets = len(lora_target_modules(tiny_model.unet))
    for path in paths.values():
        new = build_refit_map(path, tiny_model.unet)
        assert new == _old_build_refit_map(path, tiny_model.unet)
        # the MV branch starts as a copy of attn1 (identical bytes): told apart by the consuming node's module
        assert len(new["weights"]) == targets and not new["unmapped"] and not new["shared"]


def test_export_never_loads_external_data_after_the_trace(tiny_model, tmp_path, monkeypatch):
    """Every load of a written graph is structure only; tensors are read one by one, each at most once
    (the refit map's hashes), and only 2-D ones; shape inference and the checker work on the path."""
    import onnx.external_data_helper as edh

    loads, reads = [], Counter()
    real_load, real_read = onnx.load, edh._read_external_data_bytes

    def spy_load(f, *a, **k):
        loads.append(k.get("load_external_data", True))
        return real_load(f, *a, **k)

    def spy_read(tensor, base_dir):
        assert len(tensor.dims) == 2, tensor.name  # only the refit map's candidates
        reads[tensor.name] += 1
        return real_read(tensor, base_dir)

    def no_in_memory(*a, **k):
        raise AssertionError("a graph was held in memory for shape inference")

    def checker_on_path(model, *a, **k):
        assert isinstance(model, str), "onnx.checker got a loaded graph, not a path"
        return real_check(model, *a, **k)

    real_check = onnx.checker.check_model
    monkeypatch.setattr(onnx, "load", spy_load)
    monkeypatch.setattr(onnx, "load_model", spy_load)
    monkeypatch.setattr(edh, "_read_external_data_bytes", spy_read)
    monkeypatch.setattr(edh, "load_external_data_for_model", no_in_memory)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", no_in_memory)
    monkeypatch.setattr(onnx.checker, "check_model", checker_on_path)
    res = export_model(tiny_model, tmp_path / "out", precision="fp32", height=RES, num_views=VIEWS, parity=False,
                       external_data=True, exporter="dynamo")
    assert loads and not any(loads), loads  # every onnx.load was load_external_data=False
    assert reads and max(reads.values()) == 1, reads.most_common(3)
    assert res.manifest.graphs["unet"].external_data == "unet.onnx.data"
    # the hash of the weights is the data file's bytes, streamed
    data = tmp_path / "out" / "unet.onnx.data"
    assert res.manifest.graphs["unet"].external_data_sha256 == hashlib.sha256(data.read_bytes()).hexdigest()


def test_weights_on_meta_restores_the_very_same_tensors(tiny_model):
    from export.onnx_export import weights_on_meta

    before = {k: v for k, v in tiny_model.unet.state_dict(keep_vars=True).items()}
    with pytest.raises(RuntimeError, match="inside"):
        with weights_on_meta(tiny_model.unet) as state:
            assert all(v.device.type == "cpu" for v in state.values())
            assert all(p.is_meta for p in tiny_model.unet.parameters())
            raise RuntimeError("inside")
    after = tiny_model.unet.state_dict(keep_vars=True)
    assert set(before) == set(after) and all(after[k] is before[k] for k in before)


# ---- host memory ----------------------------------------------------------------------------------
def test_cli_refuses_early_when_the_host_has_too_little_memory(tmp_path, capsys, monkeypatch):
    import export.memory_plan as mp

    monkeypatch.setattr(mp, "available_host_memory", lambda: 1 << 28)  # 0.25 GiB free (plus the model's own)
    out = tmp_path / "x"
    for extra, option in (([], "--views or --resolution"), (["--exporter", "torchscript"], "--exporter dynamo")):
        code, text = _cli(["export", "--model", "tiny", "--random-weights", "--out", str(out), "--onnx-only",
                           "--skip-parity", "--device", "cpu", *extra], capsys)
        errors = [line for line in text.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in text, text
        assert "GiB of memory available" in errors[0] and option in text, text
        assert not out.exists()
    # the same export passes the check when the host has the memory (the plan is only printed)
    monkeypatch.setattr(mp, "available_host_memory", lambda: 64 << 30)
    monkeypatch.setattr("export.exporter.export_model", _stop_before_export)
    code, text = _cli(["export", "--model", "tiny", "--out", str(out), "--onnx-only", "--skip-parity",
                       "--device", "cpu"], capsys)
    assert "host peak" in text and "reached the export" in text, text


def _stop_before_export(*a, **k):
    from mvz.errors import InputError

    raise InputError("reached the export")
