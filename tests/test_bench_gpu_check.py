"""The prepared GPU script's CPU-runnable parts: the whole flow on the tiny model, and the GPU guard."""

from __future__ import annotations

import json

import pytest


def test_gpu_check_runs_on_tiny_cpu(tmp_path):
    from bench.gpu_check import main

    out = tmp_path / "gpu"
    steps = 2
    code = main(["--model", "tiny", "--device", "cpu", "--height", "64", "--steps", str(steps), "--runs", "2",
                 "--warmup", "0", "--backends", "torch,torch-cudagraph,tensorrt", "--train-steps", "1", "--threads", "1",
                 "--peak-tflops", "1", "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "gpu_check.json").read_text())
    torch_row = summary["backends"]["torch"]
    for stage in ("end_to_end", "unet_step", "vae_decode", "text_encode"):
        st = torch_row["stages"][stage]
        assert 0 < st["p50_ms"] <= st["p90_ms"], stage
    assert torch_row["stage_memory"] == {"status": "skipped", "reason": "peak device memory per stage is measured on CUDA only"}
    fid = torch_row["fidelity"]  # fp32 model against the fp32 reference: the same computation
    assert len(fid["per_step_latent_rel_error"]) == steps and max(fid["per_step_latent_rel_error"]) < 1e-5
    assert fid["psnr_db_min"] > 60 and fid["ok_finite"]
    assert 0 < torch_row["unet_fraction_of_peak"] < 1 and torch_row["end_to_end_over_floor"] > 1
    assert "CUDA" in summary["skipped"]["torch-cudagraph"] and "TensorRT" in summary["skipped"]["tensorrt"]
    tr = summary["train_microstep"]
    assert tr["loss_finite"] and tr["median_s"] > 0 and tr["trainable_params"] > 0
    assert (out / "report.json").is_file()
    md = (out / "gpu_check.md").read_text()
    assert "| torch |" in md and "- tensorrt:" in md and "Training micro-step" in md


def test_gpu_check_without_cuda_says_so(capsys):
    import torch

    from bench.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["--out", "unused"]) == 3
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_builds_tensorrt_engines_when_tensorrt_can_run(tmp_path, monkeypatch):
    """With TensorRT available, the bench builds (or reuses) the engines of the export before opening the
    backend, so TensorRT is measured rather than skipped. TensorRT itself is faked (none here)."""
    from bench import backends as bk
    from bench.suite import BenchConfig, run_bench
    from mvz.errors import BackendUnavailableError

    avail = {n: None for n in bk.KNOWN_BACKENDS}
    monkeypatch.setattr(bk, "availability", lambda: avail)
    built, created = [], []
    monkeypatch.setattr(bk, "build_engines", lambda name, folder, log: built.append((name, folder)) or {"folder": str(folder)})
    real_open = bk.open_backend

    def open_backend(name, model, **kw):
        created.append((name, built[:]))
        if name == "tensorrt":
            raise BackendUnavailableError("fake: no engines")
        return real_open(name, model, **kw)

    monkeypatch.setattr(bk, "open_backend", open_backend)
    engines = tmp_path / "export"
    cfg = BenchConfig(model="tiny", device="cpu", height=64, width=64, steps=1, runs=1, warmup=0, fidelity=False,
                      quality="off", latency_reward="none", backends=["torch", "tensorrt"], engines_dir=str(engines),
                      plots=False, out=str(tmp_path / "out"))
    report = run_bench(cfg)
    assert built == [("tensorrt", engines)]
    assert ("tensorrt", [("tensorrt", engines)]) in created, "engines are built before the TensorRT backend is opened"
    assert report["engines_build"] == {"folder": str(engines)}


def test_default_backends_without_tensorrt_are_the_torch_ones():
    from bench.gpu_check import default_backends

    avail = {"torch": None, "torch-compile": None, "torch-cudagraph": None,
             "onnxruntime": "onnxruntime-gpu is not installed", "tensorrt": "Module 'tensorrt' is required"}
    chosen, left_out = default_backends(avail)
    assert chosen == ["torch", "torch-compile", "torch-cudagraph"]
    assert left_out == {"onnxruntime": avail["onnxruntime"], "tensorrt": avail["tensorrt"]}
    chosen, left_out = default_backends({**avail, "tensorrt": None})
    assert chosen[-1] == "tensorrt" and "tensorrt" not in left_out


def test_no_export_when_nothing_here_can_use_it(monkeypatch):
    """A GPU box with CPU-only ONNX Runtime and no TensorRT: exporting the full UNet would be minutes for nothing."""
    import onnxruntime as ort

    from bench.gpu_check import onnx_consumers

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    avail = {"onnxruntime": None, "tensorrt": "Module 'tensorrt' is required"}
    usable, why = onnx_consumers("cuda", avail)
    assert not usable and "CUDA provider" in why and "tensorrt" in why
    assert onnx_consumers("cpu", avail)[0]  # ONNX Runtime runs the export on the CPU device
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_consumers("cuda", avail)[0]
    assert onnx_consumers("cuda", {"onnxruntime": "x", "tensorrt": None})[0]


def test_a_failing_stage_is_recorded_and_the_rest_still_runs(tmp_path, monkeypatch):
    from bench import gpu_check

    def broken(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setattr(gpu_check, "_bench", broken)
    monkeypatch.setattr(gpu_check, "_train", lambda args: {"what": "fake", "median_s": 0.1, "grad_checkpointing":
                                                         args.grad_checkpointing})
    out = tmp_path / "gpu"
    assert gpu_check.main(["--model", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["failures"] == {"bench": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert summary["train_microstep"]["grad_checkpointing"] is True  # as the training presets
    md = (out / "gpu_check.md").read_text()
    assert "- bench: RuntimeError" in md and "Training micro-step" in md
