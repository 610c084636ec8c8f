"""The deployment session under every entry point: a backend registered once in ``engines.registry`` is usable
from ``mvz generate``, ``mvz serve`` and ``mvz bench``; a refused refit is rebuilt by the session, said in one
line, in all three. The backends here are fakes over eager torch (CPU, tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engines import registry
from mvz.artifacts.refit_plan import RefitRefusedError
from mvz.cli import main

REFUSAL = "the fake engine was built for another LoRA"
REBUILD_LINE = f"rebuilding refit-fake engines: {REFUSAL}"


def _torch_backend(model, num_views, device, tag: str, engines_dir=None):
    backend = registry.get("torch").create(model, num_views=num_views, device=device)
    backend.name = tag
    backend.info["engines"] = str(engines_dir) if engines_dir else None
    return backend


@pytest.fixture
def fake_backends(tmp_path):
    """Two backends, each registered in one place: ``fake`` (plain) and ``refit-fake`` (refuses every engines
    folder but the one its rebuild makes)."""
    rebuilt = tmp_path / "rebuilt"
    calls: list[tuple[str, str]] = []

    def create_refit(model, *, engines_dir, num_views, device, **_):
        if engines_dir is None or Path(engines_dir) != rebuilt:
            raise RefitRefusedError(REFUSAL + ".", "The engines are rebuilt for this LoRA.")
        return _torch_backend(model, num_views, device, "refit-fake", engines_dir)

    def rebuild(model, engines_dir, why, say):
        calls.append((str(engines_dir), why))
        return rebuilt

    def create_plain(model, *, num_views, device, **_):
        return _torch_backend(model, num_views, device, "fake")

    registry.register(registry.BackendEntry("fake", create_plain))
    registry.register(registry.BackendEntry("refit-fake", create_refit, lora="refit", rebuild=rebuild))
    yield {"calls": calls, "rebuilt": rebuilt, "old": tmp_path / "old"}
    registry.unregister("fake")
    registry.unregister("refit-fake")


def _generate(tmp_path: Path, backend: str, *extra: str) -> tuple[int, dict, str]:
    out = tmp_path / "g.png"
    argv = ["generate", "a red chair", "--model", "tiny", "--steps", "1", "--views", "2", "--device", "cpu",
            "--dtype", "fp32", "--backend", backend, "--out", str(out), "--save-views", "--overwrite", *extra]
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    side = json.loads(out.with_suffix(".json").read_text()) if code == 0 else {}
    return code, side, ""


def _bench(tmp_path: Path, backend: str, engines: Path | None, log: list[str]) -> dict:
    from bench.suite import BenchConfig, run_bench

    cfg = BenchConfig(model="tiny", device="cpu", dtype="fp32", height=64, width=64, views=2, steps=1, runs=1,
                      warmup=0, fidelity=True, quality="off", latency_reward="none", backends=[backend],
                      engines_dir=str(engines) if engines else None, plots=False, out=str(tmp_path / "bench"))
    return run_bench(cfg, log=log.append)


def _serve_runner(model, backend: str, engines: Path | None, said: list[str]):
    from serve.runner import RunnerConfig, make_runner

    return make_runner(model, RunnerConfig(backend=backend, engines=engines, max_batch=1), say=said.append)


def test_a_backend_registered_once_runs_in_generate_serve_and_bench(fake_backends, tmp_path, tiny_model):
    from serve.schema import GenerateBody, resolve

    code, side, _ = _generate(tmp_path, "fake")
    assert code == 0 and side["backend"]["name"] == "fake"

    runner = _serve_runner(tiny_model, "fake", None, [])
    key, work = resolve(GenerateBody(prompt="a red chair", steps=1, views=2, resolution=64), runner.limits)
    (served,) = runner.run(key, [work])
    assert served.metadata["backend"]["name"] == "fake"

    report = _bench(tmp_path, "fake", None, [])
    assert report["backends"]["fake"]["status"] == "ok"
    assert "fake" in report["latency"]["backends"] and "fake" in report["fidelity"]["backends"]
    assert report["fidelity"]["backends"]["fake"]["final_latent_rel_error"] == 0.0  # it is eager torch


def test_unknown_backend_is_refused_by_every_entry_point_with_the_registry_list(fake_backends, tmp_path, capsys):
    code, _, _ = _generate(tmp_path, "nope")
    err = capsys.readouterr().err
    assert code == 2 and "unknown backend 'nope'" in err and "fake" in err  # the list is the registry's
    from bench.suite import BenchConfig, check_config
    from mvz.errors import InputError
    from serve.runner import RunnerConfig
    from serve.runner import check_config as serve_check

    with pytest.raises(InputError, match="refit-fake"):
        serve_check(RunnerConfig(backend="nope"))
    with pytest.raises(InputError, match="refit-fake"):
        check_config(BenchConfig(backends=["nope"]))


def test_a_refused_refit_is_rebuilt_and_said_once_in_generate(fake_backends, tmp_path, capsys):
    code, side, _ = _generate(tmp_path, "refit-fake", "--engines", str(fake_backends["old"]))
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("rebuilding refit-fake engines") == 1 and REFUSAL in err
    assert fake_backends["calls"] == [(str(fake_backends["old"]), REFUSAL + ".")]
    assert side["backend"]["engines"] == str(fake_backends["rebuilt"])


def test_a_refused_refit_is_rebuilt_and_said_once_in_serve(fake_backends, tiny_model):
    said: list[str] = []
    runner = _serve_runner(tiny_model, "refit-fake", fake_backends["old"], said)
    assert said == [REBUILD_LINE + "."]
    assert len(fake_backends["calls"]) == 1
    assert runner.backend_info["engines"] == str(fake_backends["rebuilt"])
    assert runner.session.engines == fake_backends["rebuilt"]
    assert runner.session.notes == said and runner.session.memory()["process_peak_rss_mb"] > 0  # CPU: the RSS


def test_a_refused_refit_is_rebuilt_and_said_once_in_bench(fake_backends, tmp_path):
    log: list[str] = []
    report = _bench(tmp_path, "refit-fake", fake_backends["old"], log)
    assert [ln for ln in log if ln.startswith("rebuilding")] == [REBUILD_LINE + "."]
    assert len(fake_backends["calls"]) == 1
    assert report["backends"]["refit-fake"]["status"] == "ok"
    assert report["backends"]["refit-fake"]["info"]["engines"] == str(fake_backends["rebuilt"])


def test_a_backend_without_a_rebuild_lets_the_refusal_through(tiny_model):
    from engines.session import BackendSpec, open_session

    def refuse(model, **_):
        raise RefitRefusedError(REFUSAL + ".", "Rebuild.")

    registry.register(registry.BackendEntry("no-rebuild", refuse, lora="refit"))
    try:
        with pytest.raises(RefitRefusedError, match=REFUSAL):
            open_session(tiny_model, BackendSpec("no-rebuild"))
    finally:
        registry.unregister("no-rebuild")


def test_registry_spec_and_cli_modules_import_without_torch():
    code = ("import sys; import mvz.spec, engines.registry, engines, mvz.cli.generate, mvz.cli.bench; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "import engines.session; assert 'export' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
