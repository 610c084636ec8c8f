"""``mvz bench`` end to end on the tiny model (CPU), the report schema, plots, --compare, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mvz.cli import main

FAST = ["--model", "tiny", "--runs", "2", "--warmup", "1", "--steps", "2", "--threads", "1"]


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory) -> Path:
    import torch

    from mvz.models.loading import load_model
    from mvz.models.lora import add_lora, save_lora

    model = load_model("tiny", device="cpu")
    add_lora(model.unet, rank=2)
    torch.manual_seed(0)
    for name, p in model.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return save_lora(model.unet, tmp_path_factory.mktemp("lora") / "lora.safetensors")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, lora_file) -> Path:
    out = tmp_path_factory.mktemp("bench") / "report"
    code = _run(["bench", *FAST, "--backends", "torch,onnxruntime,tensorrt", "--quality-prompts", "2",
                 "--rewards", "pickscore,hyperscore", "--lora", str(lora_file), "--out", str(out)])
    assert code == 0
    return out


def test_report_files_and_schema(bench_run: Path):
    from bench.report import load_report, validate_report

    for name in ("report.json", "report.md", "latency.png", "fidelity.png", "quality.png", "contact_sheet.png"):
        assert (bench_run / name).is_file(), name
        assert (bench_run / name).stat().st_size > 0
    raw = json.loads((bench_run / "report.json").read_text())  # strict JSON: no Infinity/NaN literals
    assert raw["schema"] == "mvz.bench.report" and raw["schema_version"] == 1
    report = load_report(bench_run / "report.json")
    assert validate_report(report) == []
    assert report["config"]["runs"] == 2 and report["config"]["warmup"] == 1


def test_latency_section(bench_run: Path):
    from bench.report import load_report

    report = load_report(bench_run / "report.json")
    torch_lat = report["latency"]["backends"]["torch"]
    stages = torch_lat["stages"]
    for stage in ("text_encode", "camera_residuals", "unet_step", "unet_total", "vae_decode", "end_to_end", "image_encode"):
        assert stages[stage]["median_ms"] > 0, stage
    assert stages["end_to_end"]["n"] == 2 and stages["unet_step"]["n"] == 4  # 2 runs × 2 steps
    assert len(torch_lat["unet_step_median_ms_by_index"]) == 2
    assert torch_lat["throughput_sets_per_s"] > 0
    assert torch_lat["ratios_vs_baseline"]["end_to_end"] == pytest.approx(1.0)
    assert report["latency"]["baseline"] == "torch"
    comp = report["compute"]
    assert comp["flops"]["unet_per_call"] > comp["flops"]["mv_proj_per_call"] > 0
    assert comp["achieved"]["torch"]["unet_tflops"] > 0


def test_backends_reported_ok_or_skipped_with_reason(bench_run: Path):
    from bench.backends import availability
    from bench.report import load_report

    report = load_report(bench_run / "report.json")
    assert report["backends"]["torch"]["status"] == "ok"
    trt = report["backends"]["tensorrt"]
    assert trt["status"] == "skipped" and trt["reason"]  # no GPU / TensorRT in CI
    ort = report["backends"]["onnxruntime"]
    if availability().get("onnxruntime") is None:  # once engines provides it, it must run
        assert ort["status"] == "ok", ort
        assert report["fidelity"]["backends"]["onnxruntime"]["psnr_db_min"] > 30
    else:
        assert ort["status"] == "skipped" and ort["reason"]


def test_fidelity_torch_vs_reference_is_exact(bench_run: Path):
    from bench.report import load_report

    fid = load_report(bench_run / "report.json")["fidelity"]
    assert fid["status"] == "ok"
    f = fid["backends"]["torch"]
    assert f["final_latent_rel_error"] == 0.0
    assert f["psnr_db_min"] == math.inf and f["ok_finite"]
    assert len(f["per_step_latent_rel_error"]) == 2


def test_quality_variants(bench_run: Path):
    from bench.report import load_report

    q = load_report(bench_run / "report.json")["quality"]
    assert q["status"] == "ok"
    assert list(q["variants"]) == ["base", "base+zmv", "lora", "lora+zmv"]
    for var in q["variants"].values():
        assert var["pickscore"]["per_set"]["n"] == 2 and len(var["pickscore"]["values_per_view"][0]) == 6
        assert var["hyperscore"]["per_set"]["n"] == 2
    assert set(q["differences_vs_base"]) == {"base+zmv", "lora", "lora+zmv"}
    assert q["differences_vs_base"]["lora"]["pickscore"]["direction"] in ("better", "worse", "inconclusive")
    md = (bench_run / "report.md").read_text()
    assert "## Quality" in md and "lora+zmv" in md


def test_compare(bench_run: Path, capsys):
    report = str(bench_run / "report.json")
    capsys.readouterr()
    assert _run(["bench", "--compare", report, report, "--json"]) == 0
    cmp = json.loads(capsys.readouterr().out)
    assert cmp["latency"]["torch"]["end_to_end"]["change"] == pytest.approx(0.0)
    assert _run(["bench", "--compare", report, report]) == 0
    assert "Latency: torch" in capsys.readouterr().out
    assert _run(["bench", "--compare", report]) == 2


def test_unwritable_report_folder_fails_before_measuring(tmp_path: Path, capsys, monkeypatch):
    from mvz.atomic import ensure_writable_dir

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setattr("mvz.models.loading.load_model", lambda *a, **k: pytest.fail("measured before failing"))
    assert _run(["bench", *FAST, "--out", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err
    with pytest.raises(Exception, match="not writable"):
        ensure_writable_dir(blocker / "sub", "report folder")


def test_quality_requested_with_missing_checkpoints_fails(tmp_path: Path, capsys):
    code = _run(["bench", *FAST, "--no-latency", "--no-fidelity", "--quality", "on", "--reward-preset", "none",
                 "--rewards", "pickscore", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "pickscore" in capsys.readouterr().err


def test_missing_checkpoints_skip_quality_in_auto(tmp_path: Path):
    from bench.report import load_report

    out = tmp_path / "r"
    code = _run(["bench", *FAST, "--no-latency", "--no-fidelity", "--reward-preset", "none", "--rewards", "pickscore",
                 "--latency-reward", "none", "--no-plots", "--out", str(out)])
    assert code == 0
    q = load_report(out / "report.json")["quality"]
    assert q["status"] == "skipped" and "pickscore" in q["reason"]


def test_every_backend_skipped_exits_non_zero(tmp_path: Path, capsys):
    """Nothing measured is a failure (exit 2, one line naming each backend's reason), not a green report."""
    out = tmp_path / "r"
    code = _run(["bench", "--model", "tiny", "--backends", "tensorrt", "--steps", "1", "--runs", "1", "--warmup", "0",
                 "--no-fidelity", "--quality", "off", "--no-plots", "--threads", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        next(ln for ln in err.splitlines() if ln.startswith("error: no backend ran (tensorrt skipped: "))]
    assert "Traceback" not in err and (out / "report.json").is_file()  # the report keeps the reasons
