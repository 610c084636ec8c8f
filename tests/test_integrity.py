"""Integrity and refit planning on two real exports of the tiny model with different LoRAs.

Weight files are compared by full sha256 (the two exports' data files have the same size, so a size check
cannot tell them apart); engine manifests are bound to their export; the refit planner is all or nothing and
the weights a refit sends equal the ones an export with that LoRA holds.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from test_export import make_lora  # noqa: E402

from engines.tensorrt_build import BuildSpec, new_engine_manifest, record_plan  # noqa: E402
from engines.tensorrt_manifest import ENGINES_SUBDIR, EngineManifest, check_engines, profile_shapes  # noqa: E402
from export.exporter import export_model  # noqa: E402
from mvz.artifacts.manifest import MANIFEST_NAME, read_manifest, verify_graph_files  # noqa: E402
from mvz.artifacts.refit_plan import (  # noqa: E402
    REFIT_MAP_NAME,
    RefitRefusedError,
    changed_by_switch,
    plan_refit,
    read_initializers,
    target_array,
)
from mvz.errors import CheckpointError, ManifestMismatchError  # noqa: E402
from mvz.models.lora import fused_weight, peft_lora_modules  # noqa: E402

RES, VIEWS, SCALE = 32, 2, 0.8


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """{'a': (lora file, export), 'b': ...}: fp32, external data (the data-file path), no parity (tested elsewhere)."""
    root = tmp_path_factory.mktemp("integrity")
    out = {}
    for tag, seed in (("a", 1), ("b", 2)):
        lora = make_lora(model, root / f"lora_{tag}.safetensors", seed=seed)
        out[tag] = (lora, export_model(model, root / f"export_{tag}", precision="fp32", height=RES, num_views=VIEWS,
                                       lora=lora, lora_scale=SCALE, external_data=True, parity=False))
    return out


def _copy(exports, tag, dst):
    shutil.copytree(exports[tag][1].folder, dst)
    return dst


# ---- export files --------------------------------------------------------------------------------
def test_data_file_swapped_from_an_export_with_another_lora_is_refused(exports, tmp_path):
    a, b = exports["a"][1].folder, exports["b"][1].folder
    verify_graph_files(a, read_manifest(a))  # the genuine folder passes
    assert (a / "unet.onnx.data").stat().st_size == (b / "unet.onnx.data").stat().st_size  # sizes cannot tell
    swapped = _copy(exports, "a", tmp_path / "swapped")
    shutil.copy(b / "unet.onnx.data", swapped / "unet.onnx.data")
    with pytest.raises(CheckpointError, match="another export.*mvz export"):
        verify_graph_files(swapped, read_manifest(swapped))
    # and through a real consumer: the ONNX Runtime backend refuses to load it
    from engines import create_backend

    with pytest.raises(CheckpointError, match="unet.onnx.data"):
        create_backend("onnxruntime", None, engines_dir=swapped, num_views=VIEWS, height=RES, width=RES)


def test_edited_manifest_hash_is_detected(exports, tmp_path):
    a, b = exports["a"][1], exports["b"][1]
    forged = _copy(exports, "a", tmp_path / "forged")
    shutil.copy(b.folder / "unet.onnx.data", forged / "unet.onnx.data")
    d = json.loads((forged / MANIFEST_NAME).read_text())
    d["graphs"]["unet"]["external_data_sha256"] = b.manifest.graphs["unet"].external_data_sha256  # hide the swap
    (forged / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="edited"):
        read_manifest(forged)
    assert a.manifest.graphs["unet"].external_data_sha256 != b.manifest.graphs["unet"].external_data_sha256


# ---- engine folders ------------------------------------------------------------------------------
def _fake_engines(export_dir, payload: bytes) -> EngineManifest:
    """An engine folder as the builder records it, with stand-in plan bytes (no TensorRT here)."""
    manifest = read_manifest(export_dir)
    eng = export_dir / ENGINES_SUBDIR
    eng.mkdir(exist_ok=True)
    em = new_engine_manifest(export_dir, "10.0.0", "Test GPU", "8.9", opt_level=3, workspace_bytes=1 << 30)
    for g in ("unet", "vae_decoder"):
        plan = eng / f"{g}.plan"
        plan.write_bytes(payload + g.encode())
        spec = BuildSpec(onnx=export_dir / manifest.graphs[g].file, profile=profile_shapes(manifest, g), precision="fp32")
        em.engines[g] = record_plan(plan, spec, manifest, g, 1.0, {"passed": True})
    em.save(eng)
    return em


def test_engine_folder_copied_from_another_export_is_refused(exports, tmp_path):
    a = _copy(exports, "a", tmp_path / "a")
    b = _copy(exports, "b", tmp_path / "b")
    _fake_engines(a, b"plan of a")
    _fake_engines(b, b"plan of b")
    env = ("10.0.0", "Test GPU", "8.9")
    check_engines(EngineManifest.load(a / ENGINES_SUBDIR), a / ENGINES_SUBDIR, a, read_manifest(a), environment=env)
    shutil.rmtree(a / ENGINES_SUBDIR)
    shutil.copytree(b / ENGINES_SUBDIR, a / ENGINES_SUBDIR)  # B's engines next to A's export
    with pytest.raises(ManifestMismatchError, match="another export.*mvz export"):
        check_engines(EngineManifest.load(a / ENGINES_SUBDIR), a / ENGINES_SUBDIR, a, read_manifest(a), environment=env)
    with pytest.raises(ManifestMismatchError, match="TensorRT 10.0.0, this is 10.1"):
        check_engines(EngineManifest.load(b / ENGINES_SUBDIR), b / ENGINES_SUBDIR, b, read_manifest(b),
                      environment=("10.1", "Test GPU", "8.9"))


def test_swapped_plan_and_edited_engine_manifest_are_refused(exports, tmp_path):
    a = _copy(exports, "a", tmp_path / "a")
    em = _fake_engines(a, b"plan of a")
    eng = a / ENGINES_SUBDIR
    (eng / "unet.plan").write_bytes(b"another plan")
    with pytest.raises(ManifestMismatchError, match="not the plan that was built"):
        check_engines(EngineManifest.load(eng), eng, a, read_manifest(a))
    d = json.loads((eng / "mvz_engines.json").read_text())
    d["engines"]["unet"]["plan_sha256"] = "0" * 64
    (eng / "mvz_engines.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="edited"):
        EngineManifest.load(eng)
    assert em.engines["unet"].plan_sha256 != "0" * 64


# ---- refit planning ------------------------------------------------------------------------------
def _peft_unet(model, lora, scale=SCALE):
    from mvz.models.lora import load_lora

    unet = copy.deepcopy(model.unet)
    load_lora(unet, lora, scale=scale)
    return unet


def _refit_map(export):
    return json.loads((export.folder / REFIT_MAP_NAME).read_text())


def test_refit_sends_exactly_the_weights_an_export_with_that_lora_holds(model, exports):
    """Engine built from export A (LoRA a), model carrying LoRA b: the plan covers every LoRA target and the
    arrays sent equal export B's initializers (read alone, without loading the whole graph)."""
    (_, exp_a), (lora_b, exp_b) = exports["a"], exports["b"]
    refit_map = _refit_map(exp_a)
    unet_b = _peft_unet(model, lora_b)
    targets = plan_refit(refit_map, changed_by_switch(refit_map, True, peft_lora_modules(unet_b)))
    assert {t.torch_name for t in targets} == set(refit_map["weights"]) and not refit_map["unmapped"]
    b_map = _refit_map(exp_b)
    want = read_initializers(exp_b.folder / "unet.onnx", [b_map["weights"][t.torch_name]["onnx"] for t in targets])
    assert len(want) == len(targets)
    worst = 0.0
    for t in targets:
        sent = target_array(t, fused_weight(unet_b, t.torch_name.removesuffix(".weight")), np.dtype("float32"))
        worst = max(worst, float(np.abs(sent - want[b_map["weights"][t.torch_name]["onnx"]]).max()))
    assert worst < 1e-5
    a_vals = read_initializers(exp_a.folder / "unet.onnx", [targets[0].onnx_name])[targets[0].onnx_name]
    assert np.abs(a_vals - want[b_map["weights"][targets[0].torch_name]["onnx"]]).max() > 1e-4  # a switch changes them


def test_refit_planner_refuses_a_lora_with_an_unmapped_target(model, exports):
    from peft import LoraConfig

    from mvz.models.lora import LORA_TARGETS

    refit_map = _refit_map(exports["a"][1])
    unet = copy.deepcopy(model.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=[*LORA_TARGETS, "proj_in"]))  # proj_in: not mapped
    changed = changed_by_switch(refit_map, False, peft_lora_modules(unet))
    assert any("proj_in" in n for n in changed)
    with pytest.raises(RefitRefusedError, match="no ONNX initializer.*proj_in"):
        plan_refit(refit_map, changed)


def test_refit_planner_refuses_shared_and_non_refittable_weights(exports):
    refit_map = _refit_map(exports["a"][1])
    names = sorted(refit_map["weights"])
    assert len(plan_refit(refit_map, names)) == len(names)  # the full, fitting plan
    with pytest.raises(RefitRefusedError, match="not refittable in the engine"):
        plan_refit(refit_map, names, refittable={refit_map["weights"][n]["onnx"] for n in names[1:]})
    shared = dict(refit_map, shared=[names[0]])
    with pytest.raises(RefitRefusedError, match="share an initializer"):
        plan_refit(shared, names)
    # an engine without a LoRA switching to a model without one changes nothing
    assert plan_refit(refit_map, changed_by_switch(refit_map, False, [])) == []


def test_read_initializers_reads_only_the_named_tensors(exports):
    import onnx
    from onnx import numpy_helper

    path = exports["a"][1].folder / "unet.onnx"
    full = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    some = sorted(n for n, a in full.items() if a.ndim == 2)[:3]
    got = read_initializers(path, some)
    assert sorted(got) == some and all(np.array_equal(got[n], full[n]) for n in some)
    with pytest.raises(RefitRefusedError, match="no initializer"):
        read_initializers(path, ["not_there"])


def test_in_place_fusion_matches_the_copy_and_restores_bit_for_bit(model, exports):
    from export.fuse import fused_unet, lora_fused_in_place

    lora = exports["a"][0]
    unet = copy.deepcopy(model.unet)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    ref = fused_unet(model.unet, lora, SCALE).state_dict()
    with lora_fused_in_place(unet, lora, SCALE) as fused:
        assert fused is unet
        changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all(torch.equal(unet.state_dict()[k], ref[k]) for k in before)
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())


def test_refit_check_accepts_the_right_weights_and_refuses_stale_ones(model, exports):
    """The post-refit comparison with the torch UNet carrying the LoRA: export B's graph (what a correct refit
    to LoRA b computes) passes; export A's graph (a refit that left LoRA a's weights) is refused."""
    from types import SimpleNamespace

    from engines.tensorrt_refit import check_refit
    from export.parity import run_onnx

    (_, exp_a), (lora_b, exp_b) = exports["a"], exports["b"]
    torch_b = SimpleNamespace(unet=_peft_unet(model, lora_b), device=torch.device("cpu"), dtype=torch.float32,
                              vae_scale_factor=model.vae_scale_factor)

    def engine(folder):
        return lambda feeds: torch.from_numpy(run_onnx(folder / "unet.onnx", {k: v.numpy() for k, v in feeds.items()})[0])

    assert check_refit(engine(exp_b.folder), torch_b, exp_b.manifest)["passed"]
    with pytest.raises(RefitRefusedError, match="does not match the torch UNet"):
        check_refit(engine(exp_a.folder), torch_b, exp_a.manifest)
