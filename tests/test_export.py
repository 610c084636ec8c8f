"""Export: LoRA fusion, ONNX graphs (fp32 tight parity, fp16 structure), manifests, refit map, CLI."""

from __future__ import annotations

import copy
import errno
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from cli_helpers import run_main as _cli

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from export.exporter import export_model  # noqa: E402
from export.fuse import changed_weights, fused_unet, lora_deltas  # noqa: E402
from export.onnx_export import float_initializer_dtypes, graph_io  # noqa: E402
from export.refit_map import build_refit_map, lora_changed_names, mapped_weights  # noqa: E402
from export.wrappers import UNET_INPUTS, UNetWrapper, unet_example_inputs  # noqa: E402
from mvz.artifacts.manifest import (  # noqa: E402
    MANIFEST_NAME,
    ExportManifest,
    check_request,
    read_manifest,
    verify_graph_files,
)
from mvz.errors import CheckpointError, ManifestMismatchError, MvzError  # noqa: E402

# The smallest export that still tests the real thing: 2 views (row attention across views), 32 px (the
# tiny model's resolution multiple). Exports are the slow part (~20-30 s each on 2 cores): one fp32, one
# fp32 with a LoRA, one fp16 (through the CLI); test_engines reuses the fp32 one.
RES = 32
VIEWS = 2


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model  # one load per session (conftest); no test here modifies it


def make_lora(model, path, seed: int = 0, rank: int = 4):
    """A random LoRA in the upstream layout (PEFT's gaussian init leaves B at zero, so B is randomised)."""
    from mvz.models.lora import add_lora, save_lora

    unet = copy.deepcopy(model.unet)
    add_lora(unet, rank=rank)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return save_lora(unet, path)


@pytest.fixture(scope="module")
def lora_file(model, tmp_path_factory):
    return make_lora(model, tmp_path_factory.mktemp("lora") / "lora.safetensors")


@pytest.fixture(scope="module")
def fused_lora_unet(model, lora_file):
    """The UNet with the LoRA fused at scale 0.8 (shared); ``.model_unchanged``: fusion left ``model`` as it was."""
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    fused = fused_unet(model.unet, lora_file, scale=0.8)
    after = model.unet.state_dict()
    fused.model_unchanged = set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    return fused


@pytest.fixture(scope="module")
def base_export(model, tmp_path_factory):
    """fp32, no LoRA; shared with test_engines (same folder + same request -> reused, not re-exported)."""
    return export_model(model, tmp_path_factory.getbasetemp() / "shared_tiny_fp32", precision="fp32", height=RES,
                        num_views=VIEWS)


@pytest.fixture(scope="module")
def lora_export(model, lora_file, tmp_path_factory):
    return export_model(model, tmp_path_factory.mktemp("exp") / "lora_fp32", precision="fp32", height=RES,
                        num_views=VIEWS, lora=lora_file, lora_scale=0.8)


def _unet_out(unet, args):
    with torch.no_grad():
        return UNetWrapper(unet, VIEWS, RES // 8, RES // 8)(*args)


# ---- fusion ---------------------------------------------------------------------------------------
def test_fusion_equals_unfused_lora_and_leaves_model_unchanged(model, lora_file, fused_lora_unet):
    from mvz.models.lora import load_lora

    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    args = unet_example_inputs(model, torch.float32, VIEWS, RES, RES)
    fused = fused_lora_unet
    peft = copy.deepcopy(model.unet)
    load_lora(peft, lora_file, scale=0.8)
    ref = _unet_out(peft, args)
    out = _unet_out(fused, args)
    assert (out - _unet_out(model.unet, args)).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # a UNet that carries PEFT layers fuses to the same weights (compared directly: no extra forward)
    merged = fused_unet(peft).state_dict()
    assert merged.keys() == fused.state_dict().keys()
    for k, v in fused.state_dict().items():
        torch.testing.assert_close(merged[k], v, atol=1e-6, rtol=1e-5)
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and set(before) == set(after)
    assert fused.model_unchanged and not getattr(model.unet, "peft_config", None)


def test_lora_that_does_not_fit_is_refused(model, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(4, 7),
               "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 4)}, str(bad))
    with pytest.raises(CheckpointError, match="does not fit"):
        lora_deltas(model.unet, bad)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError):
        fused_unet(model.unet, corrupt)


# ---- fp32 graphs --------------------------------------------------------------------------------
def test_fp32_export_matches_pytorch_tightly(base_export):
    import onnx

    m = base_export.manifest
    for name in ("unet", "vae_decoder"):
        p = m.graphs[name].parity
        assert p["status"] == "pass", p
        assert p["max_rel_err"] < 1e-4 and p["cosine"] > 0.999999
        model = onnx.load(str(base_export.folder / m.graphs[name].file), load_external_data=False)
        onnx.checker.check_model(model)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 19
    ins, outs = graph_io(base_export.folder / "unet.onnx")
    assert [i["name"] for i in ins] == list(UNET_INPUTS)
    assert ins[0]["shape"] == [VIEWS, 4, RES // 8, RES // 8] and ins[1] == {"name": "timestep", "shape": [1], "dtype": "float32"}
    assert outs[0]["name"] == "eps"


def test_fp32_lora_export_matches_and_refit_map_covers_exactly_the_lora_weights(model, base_export, lora_export, lora_file,
                                                                                 fused_lora_unet):
    import onnx
    from onnx import numpy_helper

    m = lora_export.manifest
    assert m.lora["scale"] == 0.8 and len(m.lora["sha256"]) == 64
    assert all(m.graphs[g].parity["status"] == "pass" for g in ("unet", "vae_decoder"))
    base_map = json.loads((base_export.folder / "refit_map.json").read_text())
    assert not base_map["unmapped"] and not base_map["shared"]
    fused = fused_lora_unet
    changed = changed_weights(model.unet, fused)
    assert changed == lora_changed_names(model.unet, lora_file, 0.8)
    # initializers that differ between the base and the LoRA graphs == the mapped names of the changed weights
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(base_export.folder / "unet.onnx")).graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(lora_export.folder / "unet.onnx")).graph.initializer}
    assert set(a) == set(b)
    differing = {n for n in a if not np.array_equal(a[n], b[n])}
    assert differing == {base_map["weights"][n]["onnx"] for n in changed}
    # and the refit arrays are exactly the LoRA graph's initializers
    for name, arr in mapped_weights(base_map, fused, changed).items():
        np.testing.assert_allclose(arr, b[name], atol=1e-6)
    assert build_refit_map(lora_export.folder / "unet.onnx", fused)["weights"].keys() == base_map["weights"].keys()


def test_polygraphy_runs_the_graphs_with_onnxruntime(base_export):
    for name in ("unet", "vae_decoder"):
        r = subprocess.run([sys.executable, "-m", "polygraphy", "run", str(base_export.folder / f"{name}.onnx"), "--onnxrt"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0 and "No module named polygraphy.__main__" in r.stderr:
            exe = shutil.which("polygraphy")
            assert exe, "polygraphy CLI not found"
            r = subprocess.run([exe, "run", str(base_export.folder / f"{name}.onnx"), "--onnxrt"],
                               capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "PASSED" in r.stdout + r.stderr


# ---- manifests ----------------------------------------------------------------------------------
def test_manifest_round_trips_and_mismatches_are_refused(model, base_export, tmp_path):
    from mvz.artifacts.manifest import model_fingerprint

    m = read_manifest(base_export.folder)
    assert ExportManifest.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    check_request(m, model_fp=model_fingerprint(model), lora=None, num_views=VIEWS, height=RES, width=RES, batch=1, precision="fp32")
    for bad in ({"num_views": 4}, {"height": 64, "width": 64}, {"batch": 2}, {"precision": "fp16"},
                {"model_fp": "0" * 32}, {"model_name": "sdxl-lcm"},
                {"lora": {"path": "x.safetensors", "sha256": "0" * 64, "scale": 1.0}}):
        with pytest.raises(ManifestMismatchError, match="mvz export"):
            check_request(m, **bad)
    verify_graph_files(base_export.folder, m)
    # a copy with a truncated graph, a corrupt manifest, a missing folder
    broken = tmp_path / "broken"
    shutil.copytree(base_export.folder, broken)
    with open(broken / "vae_decoder.onnx", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_graph_files(broken, read_manifest(broken))
    (broken / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_manifest(broken)
    with pytest.raises(MvzError, match="does not exist"):
        read_manifest(tmp_path / "nope")


def test_existing_export_is_reused_and_foreign_content_refused(model, base_export, tmp_path):
    again = export_model(model, base_export.folder, precision="fp32", height=RES, num_views=VIEWS)
    assert again.reused
    with pytest.raises(MvzError, match="another export"):
        export_model(model, base_export.folder, precision="fp32", height=RES, num_views=4)
    with pytest.raises(MvzError, match="another export"):
        export_model(model, base_export.folder, precision="fp32", height=RES, num_views=VIEWS, batch=2)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(MvzError, match="not empty"):
        export_model(model, junk, precision="fp32", height=RES)


def test_disk_full_leaves_no_half_written_export(model, tmp_path, monkeypatch):
    import export.onnx_export as ox

    def full(module, args, path, *a, **k):  # the disk fills up half way through writing the graph
        path.write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ox, "trace_to_onnx", full)
    out = tmp_path / "full"
    with pytest.raises(MvzError, match="out of disk space"):
        export_model(model, out, precision="fp32", height=RES, parity=False)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # no temp folders left either


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_fp16_export_end_to_end(tmp_path, capsys):
    out = tmp_path / "fp16"
    code, text = _cli(["export", "--model", "tiny", "--out", str(out), "--resolution", str(RES), "--views", str(VIEWS)], capsys)
    assert code == 0, text
    assert "engines need TensorRT and an NVIDIA GPU" in " ".join(text.split())  # no TensorRT here
    m = read_manifest(out)
    assert m.precision == "fp16" and m.vae_precision == "fp16" and not m.dynamic_batch
    counts = float_initializer_dtypes(out / "unet.onnx")
    assert counts.get("float16", 0) > 10 * counts.get("float32", 0), counts
    ins, outs = graph_io(out / "unet.onnx")
    assert {i["name"]: i["dtype"] for i in ins} == {n: ("float32" if n == "timestep" else "float16") for n in UNET_INPUTS}
    assert outs[0]["dtype"] == "float16"
    vin, vout = graph_io(out / "vae_decoder.onnx")
    assert vin[0]["dtype"] == "float16" and vout[0]["dtype"] == "float32"
    for g in ("unet", "vae_decoder"):  # ORT CPU runs it here; where it cannot, the check says so
        assert m.graphs[g].parity["status"] in ("pass", "skipped"), m.graphs[g].parity


def test_cli_bad_inputs_exit_2(base_export, lora_file, tmp_path, capsys):
    from safetensors.torch import save_file

    out = str(base_export.folder)
    # another export already there (other precision / views)
    code, text = _cli(["export", "--model", "tiny", "--out", out, "--onnx-only", "--views", "4"], capsys)
    assert code == 2 and "--force" in text and "Traceback" not in text
    bad = tmp_path / "bad_lora.safetensors"
    save_file({"mid_block.nonexistent.lora_A.weight": torch.zeros(4, 8), "mid_block.nonexistent.lora_B.weight": torch.zeros(8, 4)}, str(bad))
    for args in (
        ["--precision", "bf16"],
        ["--resolution", "65"],
        ["--lora", str(tmp_path / "missing.safetensors")],
        ["--lora", str(bad)],
        ["--opset", "17"],
    ):
        code, text = _cli(["export", "--model", "tiny", "--out", str(tmp_path / "x"), "--onnx-only", *args], capsys)
        assert code == 2, (args, text)
        assert "error:" in text and "Traceback" not in text
        assert not (tmp_path / "x").exists()


def test_cli_help_is_cheap():
    r = subprocess.run([sys.executable, "-m", "mvz", "export", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--onnx-only" in r.stdout and "--refittable" in r.stdout


def test_fingerprint_of_random_weights_ignores_an_attached_lora(model, lora_file):
    """A random-weight model (fingerprinted by its parameters) keeps its fingerprint when a LoRA is attached
    (PEFT renames the wrapped weights to ``*.base_layer.weight``)."""
    from mvz.artifacts.manifest import model_fingerprint
    from mvz.models.lora import load_lora

    m = copy.copy(model)
    m.info = copy.copy(model.info)
    m.info.random_weights = True
    m.unet = copy.deepcopy(model.unet)
    before = model_fingerprint(m)
    load_lora(m.unet, lora_file)
    assert model_fingerprint(m) == before
