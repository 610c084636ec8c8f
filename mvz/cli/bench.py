"""``mvz bench``: latency per stage, compute floor, fidelity and quality, into report.json/report.md/PNGs."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from mvz.spec import DEFAULT_AZIMUTHS, DEFAULT_GUIDANCE, DEFAULT_SEED, DEFAULT_STEPS


def register(app: typer.Typer) -> None:
    @app.command("bench")
    def bench(
        model: str = typer.Option("sdxl-lcm", "--model", "-m", help="Preset (tiny, sdxl-lcm) or an assembled model folder."),
        random_weights: bool = typer.Option(False, "--random-weights", help="Full-size architecture from shipped configs, no download (latency only)."),
        backends: str = typer.Option("torch", "--backends", help="Comma-separated: torch, torch-compile, onnxruntime, tensorrt."),
        baseline: str = typer.Option(None, "--baseline", help="Backend the ratios are against (default: the first measured)."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
        dtype: str = typer.Option("auto", "--dtype", help="fp16, bf16, fp32 or auto (fp16 on CUDA, fp32 on CPU)."),
        resolution: int = typer.Option(None, "--resolution", help="Image side in pixels (default: the model's, 768 for sdxl-lcm)."),
        height: int = typer.Option(None, "--height", hidden=True, help="Old: image height (use --resolution)."),
        width: int = typer.Option(None, "--width", hidden=True, help="Old: image width (use --resolution)."),
        views: int = typer.Option(len(DEFAULT_AZIMUTHS), "--views", help="Views per multiview set."),
        steps: int = typer.Option(DEFAULT_STEPS, "--steps", help="LCM sampling steps."),
        guidance: float = typer.Option(DEFAULT_GUIDANCE, "--guidance", help="LCM guidance (w-embedding)."),
        batch: int = typer.Option(1, "--batch-size", help="Prompts per timed generation (all their views in one UNet call)."),
        warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up runs per backend."),
        runs: int = typer.Option(20, "--runs", help="Timed runs per backend (median/p90/p99/min over them)."),
        seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the first prompt (0..2^63-1); prompt i uses seed + i."),
        prompts: Path = typer.Option(None, "--prompts", help="Prompt file, one a line (default: bench/prompts/objects.txt)."),
        latency: bool = typer.Option(True, "--latency/--no-latency", help="Measure latency."),
        fidelity: bool = typer.Option(True, "--fidelity/--no-fidelity", help="Compare each backend with the reference."),
        fidelity_prompts: int = typer.Option(1, "--fidelity-prompts", help="Prompts (seeds) compared for fidelity."),
        reference_dtype: str = typer.Option("fp32", "--reference-dtype", help="dtype of the eager torch reference."),
        quality: str = typer.Option("auto", "--quality", help="auto (skip when rewards are missing), on (fail), off."),
        quality_prompts: int = typer.Option(8, "--quality-prompts", help="Prompts scored per variant."),
        rewards: list[str] = typer.Option(["pickscore,hpsv2,imagereward,hyperscore"], "--rewards",
                                          help="Rewards for quality: pickscore, hpsv2, imagereward, hyperscore (comma-separated or repeated)."),
        reward_preset: str = typer.Option("auto", "--reward-preset", help="auto (tiny for the tiny model), tiny, none."),
        latency_reward: str = typer.Option("auto", "--latency-reward", help="Reward whose image encoder is timed (auto, none, NAME)."),
        zmv: bool = typer.Option(True, "--zmv/--no-zmv", help="Also score ZMV sampling."),
        lora: Path = typer.Option(None, "--lora", help="LoRA file: quality of base vs LoRA."),
        lora_scale: float = typer.Option(1.0, "--lora-scale", help="LoRA scale for the LoRA variants."),
        engines_dir: Path = typer.Option(None, "--engines", help="Export/engine folder for the onnxruntime and tensorrt backends."),
        export: bool = typer.Option(True, "--export/--no-export", help="Export ONNX into OUT/engines when an ONNX backend needs it and --engines is not given."),
        peak_tflops: float = typer.Option(None, "--peak-tflops", help="Override the device's dense peak TFLOP/s."),
        threads: int = typer.Option(None, "--threads", help="torch CPU threads."),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG plots and the contact sheet."),
        out: Path = typer.Option(Path("bench-report"), "--out", help="Report folder (must be writable)."),
        as_json: bool = typer.Option(False, "--json", help="Print the report (or comparison) as JSON."),
        precisions: str = typer.Option(None, "--precisions", help="Compare precisions side by side (e.g. fp32,fp16,int8,fp8): export each, run it with the first of --backends that exports (onnxruntime/tensorrt); latency, memory, fidelity vs fp32, reward deltas vs fp16."),
        calib_prompts: Path = typer.Option(None, "--calib-prompts", help="With --precisions int8/fp8: calibration prompts (default: the shipped list)."),
        calib_steps: int = typer.Option(None, "--calib-steps", help="With --precisions int8/fp8: calibration sampler steps."),
        compare: bool = typer.Option(False, "--compare", help="Compare two reports given as OLD.json NEW.json; measures nothing."),
        reports: list[Path] = typer.Argument(None, help="With --compare: OLD.json NEW.json.", show_default=False),
    ) -> None:
        """Benchmark latency per stage per backend, the compute floor, fidelity and quality."""
        import json

        if compare or reports:
            from bench.report import compare_reports, load_report, render_compare, sanitize
            from mvz.errors import InputError

            if not compare or len(reports or []) != 2:
                raise InputError("--compare takes exactly two reports: mvz bench --compare OLD.json NEW.json.")
            old, new = load_report(reports[0]), load_report(reports[1])
            cmp = compare_reports(old, new)
            typer.echo(json.dumps(sanitize(cmp), indent=2) if as_json else render_compare(cmp, str(reports[0]), str(reports[1])))
            return

        from mvz.cli import output
        from mvz.cli.common import split_names

        reward_names = split_names(rewards)
        _check_numbers(resolution, height, width, views, steps, guidance, batch, warmup, runs, seed, lora_scale,
                       fidelity_prompts, quality_prompts, peak_tflops)
        _check_choices(threads, fidelity, fidelity_prompts, reference_dtype)
        _check_latency_reward(latency_reward, reward_names)
        height, width = height or resolution, width or resolution
        if precisions:
            _precision_bench(locals())
            return

        from bench.suite import BenchConfig, run_bench

        err = output.console(stderr=True)
        _note_partial_results_on_interrupt(out)
        cfg = BenchConfig(
            model=model, random_weights=random_weights, device=None if device == "auto" else device,
            dtype=None if dtype == "auto" else dtype, height=height, width=width,
            views=views, steps=steps, guidance=guidance, batch=batch,
            backends=[b.strip() for b in backends.split(",") if b.strip()], baseline=baseline,
            reference_dtype=reference_dtype, warmup=warmup, runs=runs, seed=seed,
            prompts_file=str(prompts) if prompts else None, latency=latency, fidelity=fidelity,
            fidelity_prompts=fidelity_prompts, quality=quality, quality_prompts=quality_prompts,
            rewards=reward_names,
            reward_preset=None if reward_preset == "none" else reward_preset,
            latency_reward=latency_reward, zmv=zmv, lora=str(lora) if lora else None, lora_scale=lora_scale,
            engines_dir=str(engines_dir) if engines_dir else None, export=export, peak_tflops=peak_tflops, threads=threads,
            plots=plots, out=str(out),
        )
        report = run_bench(cfg, log=lambda m: err.print(m, style="cyan", highlight=False), argv=["mvz", *sys.argv[1:]])
        if as_json:
            from bench.report import sanitize

            typer.echo(json.dumps(sanitize(report), indent=2))
        else:
            _summary(report, out)
        _fail_when_nothing_ran(report, out)


def _note_partial_results_on_interrupt(out: Path) -> None:
    """An interrupted bench writes no report, but an export into OUT/engines may already be there: say so."""
    from mvz.cli import interrupts

    if not (out / "report.json").exists():
        interrupts.set_outcome(f"no report written; anything already in {out} (e.g. engines/) is kept")


def _check_numbers(resolution, height, width, views, steps, guidance, batch, warmup, runs, seed, lora_scale,
                   fidelity_prompts, quality_prompts, peak_tflops) -> None:
    """The same checks as generate's (``mvz.spec``'s), before torch is imported."""
    from mvz import spec as sp
    from mvz.cli import checks
    from mvz.errors import InputError

    if resolution is not None and (height is not None or width is not None):
        raise InputError("--resolution and the old --height/--width were both given.", "Pass only --resolution.")
    for flag, value in (("--resolution", resolution), ("--height", height), ("--width", width)):
        checks.resolution(value, flag)
    spec = sp.SampleSpec.build(views=views, steps=steps, guidance=guidance, lora_scale=lora_scale)
    side = resolution or max(height or 0, width or 0) or None
    checks.fits_memory(side, views, batch)  # before the numbers: says how much is needed
    spec.check(sp.HOUSE_LIMITS.narrowed(lora_scale_settable=True))
    checks.at_least(batch, "--batch-size")
    checks.at_least(runs, "--runs")
    checks.at_least(warmup, "--warmup", 0)
    checks.at_least(fidelity_prompts, "--fidelity-prompts", 0)
    checks.at_least(quality_prompts, "--quality-prompts")
    checks.seed(seed, max(batch, fidelity_prompts, quality_prompts))
    if peak_tflops is not None:
        checks.finite(peak_tflops, "--peak-tflops", low=1e-3)


REFERENCE_DTYPES = ("fp32", "bf16", "fp16")


def _check_choices(threads, fidelity: bool, fidelity_prompts: int, reference_dtype: str) -> None:
    """Options a report would otherwise record as given (``--reference-dtype foo``) or silently ignore."""
    from mvz.cli import checks
    from mvz.errors import InputError

    if threads is not None:
        checks.at_least(threads, "--threads")
    if fidelity and fidelity_prompts < 1:
        raise InputError("--fidelity-prompts 0 compares nothing.", "Pass --fidelity-prompts 1 or more, or --no-fidelity.")
    if reference_dtype not in REFERENCE_DTYPES:
        raise InputError(f"--reference-dtype must be one of {', '.join(REFERENCE_DTYPES)}, got {reference_dtype!r}.")


def _check_latency_reward(name: str, rewards: list[str]) -> None:
    """``auto``, ``none``, a reward of ``--rewards``, a built-in reward or a custom ``module:callable``; before
    the model loads (the registry's names need its module, which imports torch)."""
    from mvz.errors import InputError
    from mvz.rewards.registry import available_rewards

    if name in ("auto", "none") or name in rewards or ":" in name or name in available_rewards():
        return
    raise InputError(f"--latency-reward {name!r} is not a reward.",
                     f"Use auto, none or one of {', '.join(available_rewards())}.")


def _fail_when_nothing_ran(report: dict, out: Path) -> None:
    """A bench where every backend was skipped or failed measured nothing: say so and exit non-zero."""
    from mvz.errors import BackendUnavailableError

    statuses = report.get("backends", {})
    if statuses and not any(b.get("status") == "ok" for b in statuses.values()):
        why = "; ".join(f"{name} {b.get('status')}: {b.get('reason')}" for name, b in statuses.items())
        raise BackendUnavailableError(f"no backend ran ({why}).",
                                      f"The report in {out} records why; pick a backend that runs here (mvz info).")


def _precision_bench(opts: dict) -> None:
    """``--precisions``: bench/precision.py over an ONNX backend, into OUT/precision.json."""
    import json

    from bench.precision import render_rows, run_precision_bench
    from bench.report import sanitize
    from bench.suite import shipped_prompts
    from engines import registry
    from mvz.prompts import read_prompt_file

    names = [b.strip() for b in opts["backends"].split(",") if b.strip() in registry.backend_names()
             and registry.get(b.strip()).needs_export]
    prompts = read_prompt_file(opts["prompts"] or shipped_prompts("objects"))[: max(opts["quality_prompts"], 1)]
    section = run_precision_bench(
        model_name=opts["model"], precisions=[p.strip() for p in opts["precisions"].split(",") if p.strip()],
        backend=names[0] if names else "onnxruntime", out=opts["out"], views=opts["views"],
        resolution=opts["height"], steps=opts["steps"], guidance=opts["guidance"], prompts=prompts, seed=opts["seed"],
        calib_prompts=str(opts["calib_prompts"]) if opts["calib_prompts"] else None, calib_steps=opts["calib_steps"],
        rewards=[] if opts["quality"] == "off" else [r.lower() for r in opts["reward_names"]],
        reward_preset=None if opts["reward_preset"] == "none" else opts["reward_preset"], device=opts["device"],
        warmup=opts["warmup"], runs=opts["runs"], log=lambda m: typer.secho(m, err=True, fg="cyan"))
    if opts["as_json"]:
        typer.echo(json.dumps(sanitize(section), indent=2))
        return
    typer.echo(render_rows(section["rows"]))
    for what, why in section["skipped"].items():
        typer.echo(f"{what}: skipped ({why})")
    typer.echo(f"report: {Path(opts['out']) / 'precision.json'}")


def _summary(report: dict, out: Path) -> None:
    lat = report["latency"]
    for name, b in report["backends"].items():
        if b["status"] != "ok":
            typer.echo(f"{name:14s} {b['status']}: {b['reason']}")
            continue
        entry = lat["backends"].get(name)
        if entry:
            e = entry["stages"]["end_to_end"]
            u = entry["stages"]["unet_step"]
            typer.echo(f"{name:14s} end-to-end median {e['median_ms']:.1f} ms (p90 {e['p90_ms']:.1f}, min {e['min_ms']:.1f}); "
                       f"UNet step {u['median_ms']:.1f} ms; {entry['throughput_sets_per_s']:.3f} sets/s")
        f = report["fidelity"].get("backends", {}).get(name)
        if f:
            typer.echo(f"{'':14s} fidelity: final latent rel. err. {f['final_latent_rel_error']:.2e}, "
                       f"PSNR min {f.get('psnr_db_min', float('nan')):.1f} dB, finite {f['ok_finite']}")
    if report["quality"].get("status") != "ok":
        typer.echo(f"quality: skipped ({report['quality'].get('reason')})")
    typer.echo(f"report: {out / 'report.md'} and {out / 'report.json'}")
