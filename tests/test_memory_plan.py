"""The memory plan's arithmetic against hand-computed cases, and its refusal path (in the plan and the CLI)."""

from __future__ import annotations

import pytest
import torch

from export.memory_plan import (
    HOST_OVERHEAD,
    RUNTIME_OVERHEAD,
    GiB,
    HostRequest,
    PlanRequest,
    UNetShape,
    VAEShape,
    check_fits,
    check_host_fits,
    export_plan,
    generate_plan,
    host_export_plan,
    unet_activation_bytes,
    vae_activation_bytes,
)
from mvz.errors import DeviceError

UNET = UNetShape((4, 8), layers_per_block=1, attention_levels=(False, True))
VAE = VAEShape((2, 4))


def test_unet_activations_by_hand():
    # levels (4 ch, 8x8) and (8 ch, 4x4); per row: skips conv_in 256 + level0 256 + downsample 4*4*4=64 +
    # level1 8*16=128 -> 704; work max(8 * 256, ff 12*8*16=1536) = 2048; per row 2752.
    # row-attention scores at level 1: max(1, 8 // 64) heads * 4 rows * (2 views * 4)^2 = 256, one prompt.
    assert unet_activation_bytes(UNET, rows=2, views=2, lat_h=8, lat_w=8, dtype_bytes=2) == (2 * 2752 + 256) * 2
    # two prompts double both terms
    assert unet_activation_bytes(UNET, rows=4, views=2, lat_h=8, lat_w=8, dtype_bytes=2) == (4 * 2752 + 2 * 256) * 2


def test_vae_activations_by_hand():
    # decoder channels (4, 2): 4 ch at 4x4 = 64, its upsampler 4 ch at 8x8 = 256; 2 ch at 8x8 = 128 -> 256;
    # per image 4 maps * 256 + mid attention (16)^2 = 1280 values
    assert vae_activation_bytes(VAE, images=3, lat_h=4, lat_w=4, dtype_bytes=4) == 3 * 1280 * 4


def _request(**kw):
    base = dict(unet_params=1000, vae_decoder_params=100, unet_shape=UNET, vae_shape=VAE, views=2, batch=1, height=64,
                width=64, precision="fp16", vae_precision="fp32", workspace_bytes=1 << 20, vae_scale=8)
    return PlanRequest(**{**base, **kw})


def test_export_plan_stages_by_hand():
    plan = export_plan(_request())
    by = {s.name: s for s in plan.stages}
    unet_a = unet_activation_bytes(UNET, 2, 2, 8, 8, 2)
    vae_a = vae_activation_bytes(VAE, 2, 8, 8, 4)
    assert by["unet: trace"].weights == 1000 * 2 + 100 * 4 and by["unet: trace"].activations == unet_a
    assert by["unet: TensorRT build"].total == 2000 + unet_a + (1 << 20) + RUNTIME_OVERHEAD
    assert by["vae: TensorRT build"].total == 400 + vae_a + (1 << 20) + RUNTIME_OVERHEAD
    assert plan.peak.name == "vae: TensorRT build"  # the VAE's full-resolution maps beat this tiny UNet
    no_build = export_plan(_request(build_engines=False, parity=False))
    assert [s.name for s in no_build.stages] == ["unet: trace", "vae: trace"]
    # decoding one view per call shrinks the VAE build and the generate plan, not the trace
    one = export_plan(_request(vae_views_per_call=1))
    assert {s.name: s for s in one.stages}["vae: TensorRT build"].activations == vae_a // 2
    gen = generate_plan(_request(text_encoder_params=50))
    assert gen.peak.total == 2000 + 400 + 100 + max(unet_a, vae_a) + RUNTIME_OVERHEAD


def test_refusal_names_the_option_that_lowers_the_peak():
    plan = export_plan(_request(workspace_bytes=4 * GiB))
    check_fits(plan, plan.peak.total)  # exactly enough: accepted
    with pytest.raises(DeviceError, match=r"needs about 4\.5 GiB.*--workspace"):
        check_fits(plan, plan.peak.total - 1, device="Test GPU")
    shape_bound = export_plan(_request(build_engines=False, height=8192, width=8192))
    with pytest.raises(DeviceError, match="vae: trace.*--views, --batch or --resolution"):
        check_fits(shape_bound, 1 << 30)


def test_cli_plan_refuses_early_on_a_small_gpu(tiny_model, monkeypatch, capsys, tmp_path):
    """The CLI's plan step with the device's free memory faked small: one DeviceError line (exit 2), before
    any export work."""
    from rich.console import Console

    import export.memory_plan as mp
    from mvz.cli.export import ExportRequest, _memory_plans

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda dev=None: (64 << 20, 24 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev=None: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev=None: "Small GPU")
    monkeypatch.setattr(mp, "available_host_memory", lambda: 64 * GiB)  # the host has plenty
    model = tiny_model  # the plan only reads parameter counts and configs
    req = ExportRequest(out=tmp_path / "x", model="tiny", views=2, resolution=32, workspace_gb=1.0, text_encoders=True)
    with pytest.raises(DeviceError, match="Small GPU has 0.1 GiB free.*--workspace") as err:
        _memory_plans(Console(), model, torch.device("cuda"), req, 32)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert "plan" in capsys.readouterr().out
    quiet = ExportRequest(out=tmp_path / "x", model="tiny", views=2, resolution=32, workspace_gb=1.0,
                          text_encoders=True, memory_check=False)
    _memory_plans(Console(), model, torch.device("cuda"), quiet, 32)  # --no-memory-check: printed only


def test_host_plan_by_hand():
    """Host RAM per stage: the model as loaded, plus what each route copies (see export.memory_plan)."""
    r = _request(parity=False)
    unet_w = 1000 * 2
    dyn = host_export_plan(HostRequest(r, model_bytes=5000, exporter="dynamo"))
    by = {s.name: s for s in dyn.stages}
    assert [s.name for s in dyn.stages] == ["load model (host)", "unet: trace + optimize (host)",
                                            "vae: trace + optimize (host)"]
    assert by["load model (host)"].total == 5000 + HOST_OVERHEAD
    assert by["unet: trace + optimize (host)"].total == 5000 + unet_w + HOST_OVERHEAD  # at most one copy
    assert dyn.peak.name == "unet: trace + optimize (host)"
    ts = host_export_plan(HostRequest(r, model_bytes=5000, exporter="torchscript"))
    unet_a = unet_activation_bytes(UNET, 2, 2, 8, 8, 2)
    ts_unet = {s.name: s for s in ts.stages}["unet: TorchScript trace (host)"]
    assert ts_unet.activations == 2 * unet_w + unet_a and ts_unet.lower_with == "--exporter dynamo"
    on_gpu = host_export_plan(HostRequest(r, model_bytes=0, exporter="torchscript", on_cpu=False))
    assert on_gpu.peak.activations == 2 * unet_w  # the trace computes on the device: two graph copies only
    with_parity = host_export_plan(HostRequest(_request(), model_bytes=5000, copy_bytes=300))
    assert {s.name: s for s in with_parity.stages}["unet: parity (host)"].total == \
        5300 + unet_w + 2 * unet_a + HOST_OVERHEAD
    check_host_fits(dyn, dyn.peak.total)
    with pytest.raises(DeviceError, match=r"memory available but unet: trace \+ optimize.*--views or --resolution"):
        check_host_fits(dyn, dyn.peak.total - 1)


def test_available_host_memory_reads_meminfo_without_psutil(monkeypatch):
    import builtins

    import export.memory_plan as mp

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "psutil"
                        else real_import(name, *a, **k))
    with open("/proc/meminfo") as fh:
        want = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemAvailable:"))
    assert abs(mp.available_host_memory() - want) < 256 << 20  # the same figure, read a moment later
