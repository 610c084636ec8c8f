"""``mvz export --precision int8|fp8``: bad input refused before anything is written (one line, exit 2), and the
whole CPU flow (calibrate, export INT8 Q/DQ, generate with ONNX Runtime, re-export from the saved calibration)."""

from __future__ import annotations

import json

import pytest

from mvz.cli import main

pytest.importorskip("modelopt.torch.quantization")


def run_cli(args) -> int:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) <= 2, err  # the message and its hint
    return err


@pytest.mark.parametrize("case", ["missing", "empty", "fp8-engines-on-cpu", "refittable", "steps"])
def test_bad_quantized_export_input_exits_2_and_writes_nothing(tmp_path, capsys, case):
    out = tmp_path / "exp"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    args = {
        "missing": ["--precision", "int8", "--calib-prompts", str(tmp_path / "nope.txt"), "--onnx-only"],
        "empty": ["--precision", "int8", "--calib-prompts", str(empty), "--onnx-only"],
        "fp8-engines-on-cpu": ["--precision", "fp8", "--device", "cpu"],
        "refittable": ["--precision", "int8", "--refittable"],
        "steps": ["--precision", "int8", "--calib-steps", "0", "--onnx-only"],
    }[case]
    assert run_cli(["export", "--model", "tiny", "--out", str(out), *args]) == 2
    err = _one_line_error(capsys)
    assert {"missing": "does not exist", "empty": "calibration set", "fp8-engines-on-cpu": "8.9",
            "refittable": "never refit", "steps": "--calib-steps"}[case] in err
    assert not out.exists()


def test_unknown_precision_refused(tmp_path, capsys):
    assert run_cli(["export", "--model", "tiny", "--precision", "int4", "--out", str(tmp_path / "e")]) == 2
    assert "int8" in _one_line_error(capsys)


@pytest.mark.slow
def test_int8_export_then_generate_with_onnxruntime_and_reexport_reuses_calibration(tmp_path, capsys, monkeypatch, tiny_model):
    monkeypatch.setenv("MVZ_HOME", str(tmp_path / "home"))  # a fresh calibration cache (the tiny model is rebuilt)
    prompts = tmp_path / "calib.txt"
    prompts.write_text("a red car\na wooden chair\n")
    common = ["export", "--model", "tiny", "--precision", "int8", "--onnx-only", "--views", "2", "--device", "cpu",
              "--calib-prompts", str(prompts), "--calib-steps", "2", "--json"]
    main([*common, "--out", str(tmp_path / "a")])
    first = json.loads(capsys.readouterr().out)
    manifest = json.loads((tmp_path / "a" / "mvz_export.json").read_text())
    q = manifest["quantization"]
    assert manifest["precision"] == "int8" and manifest["refit_map"] is None and not (tmp_path / "a" / "refit_map.json").exists()
    assert q["calibration"]["unet_calls"] == 4 and not q["calibration_reused"]  # 2 prompts x 2 steps
    assert first["parity"]["unet"]["status"] == "pass"

    main([*common, "--out", str(tmp_path / "b")])
    capsys.readouterr()
    again = json.loads((tmp_path / "b" / "mvz_export.json").read_text())["quantization"]
    assert again["calibration_reused"] and again["calibration_hash"] == q["calibration_hash"]

    out = tmp_path / "views.png"
    main(["generate", "a red car", "--model", "tiny", "--backend", "onnxruntime", "--engines", str(tmp_path / "a"),
          "--views", "2", "--steps", "2", "--device", "cpu", "--out", str(out)])
    assert out.is_file()


@pytest.mark.slow
def test_bench_precisions_exports_and_reports_each(tmp_path, capsys, monkeypatch, tiny_model):
    monkeypatch.setenv("MVZ_HOME", str(tmp_path / "home"))
    prompts = tmp_path / "calib.txt"
    prompts.write_text("a red car\n")
    main(["bench", "--model", "tiny", "--backends", "onnxruntime", "--precisions", "fp32,int8", "--views", "2",
          "--steps", "1", "--quality", "off", "--warmup", "0", "--runs", "1", "--quality-prompts", "1",
          "--calib-prompts", str(prompts), "--calib-steps", "1", "--device", "cpu", "--out", str(tmp_path / "b"),
          "--json"])
    section = json.loads(capsys.readouterr().out)
    assert [r["precision"] for r in section["rows"]] == ["fp32", "int8"]
    assert all(r["backend"] == "onnxruntime" and r["end_to_end_ms"] > 0 for r in section["rows"])
    fp32, int8 = section["rows"]
    assert fp32["final_latent_rel_error"] < 1e-3 < int8["final_latent_rel_error"]  # the fp32 graph ~ torch fp32
    assert (tmp_path / "b" / "precision.json").is_file()
