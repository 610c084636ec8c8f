"""report.json (versioned schema), report.md tables, and ``--compare OLD.json NEW.json``.

Schema ``mvz.bench.report`` version 1 (``bench/README.md`` documents every field). JSON has no
infinities: non-finite floats are written as the strings ``"inf"``, ``"-inf"`` and ``"nan"`` (an identical
image pair has PSNR ``"inf"``); :func:`load_report` turns them back into floats.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench import SCHEMA_VERSION
from mvz.errors import InputError

SCHEMA_NAME = "mvz.bench.report"
REQUIRED_TOP = ("schema", "schema_version", "created", "config", "environment", "backends", "latency",
                "compute", "fidelity", "quality", "artifacts")


def sanitize(obj):
    """A JSON-safe copy: non-finite floats -> strings, tuples -> lists, unknown objects -> str."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _restore(obj):
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return float(obj)
    if isinstance(obj, dict):
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore(v) for v in obj]
    return obj


def validate_report(report: dict) -> list[str]:
    """Problems with a report dict (empty when it follows the schema)."""
    problems = [f"missing key {k!r}" for k in REQUIRED_TOP if k not in report]
    if report.get("schema") != SCHEMA_NAME:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA_NAME!r}")
    if not isinstance(report.get("schema_version"), int):
        problems.append("schema_version is not an integer")
    for name, b in (report.get("backends") or {}).items():
        if b.get("status") not in ("ok", "skipped", "failed"):
            problems.append(f"backend {name}: status {b.get('status')!r}")
        if b.get("status") != "ok" and not b.get("reason"):
            problems.append(f"backend {name}: {b.get('status')} without a reason")
    lat = report.get("latency") or {}
    for name, entry in (lat.get("backends") or {}).items():
        for stage in ("end_to_end", "unet_step"):
            s = entry.get("stages", {}).get(stage)
            if not s or not all(k in s for k in ("n", "median_ms", "p90_ms", "p99_ms", "min_ms")):
                problems.append(f"latency {name}: stage {stage} lacks median/p90/p99/min")
    return problems


def write_report_json(path: Path, report: dict) -> Path:
    from mvz.atomic import write_text

    return write_text(path, json.dumps(sanitize(report), indent=2, allow_nan=False) + "\n")


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"report {path} does not exist.", "Pass the report.json written by mvz bench.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read report {path}: {exc}.", "Pass a report.json written by mvz bench.") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_NAME:
        raise InputError(f"{path} is not an mvz bench report (no schema {SCHEMA_NAME!r}).")
    if int(data.get("schema_version", 0)) > SCHEMA_VERSION:
        raise InputError(f"{path} has report schema version {data.get('schema_version')}, newer than this mvz "
                         f"reads ({SCHEMA_VERSION}).", "Upgrade mvz to compare it.")
    return _restore(data)


# ---- markdown ---------------------------------------------------------------------------------------

def _f(x, digits: int = 1, unit: str = "") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:.{digits}f}{unit}"


def _eng(flops) -> str:
    if flops is None:
        return "–"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(flops) >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


STAGE_LABELS = [("text_encode", "text encoding"), ("camera_residuals", "camera residuals"),
                ("unet_step", "UNet step (each)"), ("unet_total", "UNet, all steps"), ("vae_decode", "VAE decode"),
                ("scheduler_and_other", "scheduler + other"), ("end_to_end", "end to end"),
                ("image_encode", "image encoding (reward)")]


def render_markdown(report: dict) -> str:
    """report.md: one section per part of the report, in the order the stages ran."""
    sections = (_md_head, _md_backends, _md_latency, _md_compute, _md_fidelity, _md_quality, _md_figures)
    return "\n".join(line for section in sections for line in section(report))


def _md_head(report: dict) -> list[str]:
    """Title, device, shapes, runs, libraries."""
    cfg, env = report["config"], report["environment"]
    lines = [f"# mvz bench: {cfg.get('model')}{' (--random-weights)' if cfg.get('random_weights') else ''}", ""]
    gpu = env.get("gpu")
    dev = (f"{gpu['name']} (driver {gpu.get('driver')}, clocks {gpu.get('clocks_mhz') or 'n/a'})" if gpu
           else f"CPU {env.get('cpu')}, {env.get('cpu_count')} cores, {env.get('torch_threads')} torch threads")
    libs = env.get("libraries", {})
    lines += [f"- device: {dev}",
              f"- shapes: {cfg.get('batch')} prompt(s) × {cfg.get('views')} views, {cfg.get('height')}×{cfg.get('width')} px, "
              f"{cfg.get('steps')} steps, guidance {cfg.get('guidance')}, dtype {cfg.get('dtype')}",
              f"- runs: {cfg.get('warmup')} warm-up + {cfg.get('runs')} timed per backend",
              "- libraries: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v),
              f"- created {report.get('created')}, schema v{report.get('schema_version')}", ""]
    return lines


def _md_backends(report: dict) -> list[str]:
    """Which backends ran, and why the others did not."""
    lines: list[str] = []
    lines += ["## Backends", ""]
    lines += _table(["backend", "status", "note"], [[n, b["status"], b.get("reason") or b.get("info", {}).get("implementation", "")]
                                                     for n, b in report["backends"].items()])
    lines.append("")
    return lines


def _md_latency(report: dict) -> list[str]:
    """Median per stage per backend, end-to-end spread, notes."""
    lines: list[str] = []
    lat = report["latency"]
    names = list(lat.get("backends", {}))
    if not names:
        return lines
    base = lat.get("baseline")
    lines += ["## Latency (median ms; p90 / p99 / min below)", ""]
    rows = []
    for key, label in STAGE_LABELS:
        if not any(key in lat["backends"][n]["stages"] for n in names):
            continue
        row = [label]
        for n in names:
            s = lat["backends"][n]["stages"].get(key)
            row.append(_f(s["median_ms"], 2) if s else "–")
        rows.append(row)
    rows.append(["throughput (sets/s)"] + [_f(lat["backends"][n].get("throughput_sets_per_s"), 3) for n in names])
    lines += _table(["stage"] + names, rows)
    lines += ["", "End to end, ms:", ""]
    lines += _table(["backend", "median", "p90", "p99", "min", "n", f"× vs {base}", "peak memory MiB"],
                    [[n, *(_f(lat["backends"][n]["stages"]["end_to_end"][k], 2) for k in ("median_ms", "p90_ms", "p99_ms", "min_ms")),
                      str(lat["backends"][n]["stages"]["end_to_end"]["n"]),
                      _f(lat["backends"][n].get("ratios_vs_baseline", {}).get("end_to_end"), 2),
                      _peak(lat["backends"][n]["peak_memory"])]
                     for n in names])
    for note in lat.get("notes", []):
        lines.append(f"\n_{note}_")
    lines.append("")
    return lines


def _md_compute(report: dict) -> list[str]:
    """The compute floor and the fraction of it achieved."""
    lines: list[str] = []
    comp, cfg = report["compute"], report["config"]
    if comp.get("flops"):
        fl = comp["flops"]
        lines += ["## Compute floor", ""]
        lines += _table(["quantity", "FLOPs"], [
            ["UNet call (all rows)", _eng(fl.get("unet_per_call"))],
            ["UNet per view per step (base + MV)", _eng(fl.get("unet_per_view"))],
            ["base UNet per view per step", _eng(fl.get("unet_base_per_view"))],
            ["MV projections / MV row attention per call", f"{_eng(fl.get('mv_proj_per_call'))} / {_eng(fl.get('mv_attention_per_call'))}"],
            ["VAE decode per image", _eng(fl.get("vae_decode_per_image"))],
            ["camera adapter per camera set", _eng(fl.get("camera_adapter"))],
            [f"job: UNet × {cfg.get('steps')} steps", _eng(fl.get("job", {}).get("unet"))],
            ["job: VAE decode", _eng(fl.get("job", {}).get("vae_decode"))],
        ])
        lines += ["", f"Peak: {_f(comp.get('peak_tflops'), 1)} TFLOP/s ({comp.get('peak_source')}). "
                  f"Floor: UNet {_f(_ms(comp.get('floor_s', {}).get('unet')), 2)} ms, VAE {_f(_ms(comp.get('floor_s', {}).get('vae_decode')), 2)} ms.", ""]
        ach = comp.get("achieved", {})
        if ach:
            lines += _table(["backend", "UNet TFLOP/s", "UNet % of peak", "VAE TFLOP/s", "VAE % of peak"],
                            [[n, _f(a.get("unet_tflops"), 3), _f(_pct(a.get("unet_fraction")), 1), _f(a.get("vae_tflops"), 3),
                              _f(_pct(a.get("vae_fraction")), 1)] for n, a in ach.items()])
            lines.append("")
    return lines


def _md_fidelity(report: dict) -> list[str]:
    """Each backend against the reference."""
    lines: list[str] = []
    fid = report["fidelity"]
    lines += ["## Fidelity", ""]
    if fid.get("status") == "ok":
        lines.append(f"Reference: {fid.get('reference')} on the same seeds ({fid.get('seeds')}).")
        lines.append("")
        rows = []
        for n, f in fid["backends"].items():
            rows.append([n, _f(f.get("final_latent_rel_error"), 6), _f(max(f.get("per_step_latent_rel_error") or [0]), 6),
                         _f(f.get("psnr_db_min"), 2), _f(f.get("psnr_db_mean"), 2), _f(f.get("ssim_min"), 4),
                         "yes" if f.get("ok_finite") else "NO"])
        lines += _table(["backend", "final latent rel. err.", "max per-step rel. err.", "PSNR min dB", "PSNR mean dB", "SSIM min", "finite"], rows)
    else:
        lines.append(f"Skipped: {fid.get('reason')}")
    lines.append("")
    return lines


def _md_quality(report: dict) -> list[str]:
    """Reward scores per variant with intervals."""
    lines: list[str] = []
    q = report["quality"]
    lines += ["## Quality", ""]
    if q.get("status") == "ok":
        lines.append(f"{q.get('num_prompts')} prompts from {q.get('prompts_file')}; rewards: {', '.join(q.get('rewards', []))}; "
                     "mean per set [95 % CI].")
        lines.append("")
        rewards = q.get("rewards", [])
        rows = []
        for var, per in q["variants"].items():
            rows.append([var] + [_ci(per[r]["per_set"]) if r in per else "–" for r in rewards])
        lines += _table(["variant"] + rewards, rows)
        diffs = q.get("differences_vs_base", {})
        if diffs:
            lines += ["", "Paired difference vs base (mean [95 % CI], direction):", ""]
            lines += _table(["variant"] + rewards, [[var] + [f"{_ci(d[r])} {d[r].get('direction')}" if r in d else "–" for r in rewards]
                                                   for var, d in diffs.items()])
        if q.get("missing_rewards"):
            lines += ["", "Rewards not loaded: " + "; ".join(f"{k}: {v}" for k, v in q["missing_rewards"].items())]
    else:
        lines.append(f"Skipped: {q.get('reason')}")
    lines.append("")
    return lines


def _md_figures(report: dict) -> list[str]:
    """The plots and the contact sheet."""
    lines: list[str] = []
    art = report.get("artifacts", {})
    if art.get("plots") or art.get("contact_sheet"):
        lines += ["## Figures", ""]
        for p in art.get("plots", []):
            lines.append(f"![{p}]({p})")
        if art.get("contact_sheet"):
            lines.append(f"![contact sheet]({art['contact_sheet']})")
        lines.append("")
    return lines


def _peak(pm: dict) -> str:
    """GPU: torch allocator peak (+ whole-device use, which sees ORT/TensorRT too); CPU: process peak RSS."""
    if "torch_peak_allocated_mb" in pm:
        dev = pm.get("device_used_mb")
        return _f(pm["torch_peak_allocated_mb"], 0) + (f" (device {_f(dev, 0)})" if dev is not None else "")
    rss = _f(pm.get("process_peak_rss_mb"), 0)
    return rss + (" RSS" if pm.get("process_peak_rss_scope") == "timed runs" else " RSS, process lifetime")


def _ms(s):
    return None if s is None else s * 1000.0


def _pct(x):
    return None if x is None else 100.0 * x


def _ci(c: dict) -> str:
    if not c or c.get("mean") is None:
        return "–"
    if c.get("ci_low") is None:
        return f"{c['mean']:.4g} (n={c['n']})"
    return f"{c['mean']:.4g} [{c['ci_low']:.4g}, {c['ci_high']:.4g}]"


# ---- compare ----------------------------------------------------------------------------------------

def compare_reports(old: dict, new: dict) -> dict:
    """Changes from OLD to NEW: latency medians per backend and stage, fidelity, quality means."""
    out: dict = {"latency": {}, "fidelity": {}, "quality": {}, "notes": []}
    for what in ("model", "height", "width", "views", "steps", "dtype"):
        a, b = old["config"].get(what), new["config"].get(what)
        if a != b:
            out["notes"].append(f"config {what} differs: {a} -> {b}")
    dev_a = (old["environment"].get("gpu") or {}).get("name") or old["environment"].get("cpu")
    dev_b = (new["environment"].get("gpu") or {}).get("name") or new["environment"].get("cpu")
    if dev_a != dev_b:
        out["notes"].append(f"device differs: {dev_a} -> {dev_b}")
    lo, ln = old["latency"].get("backends", {}), new["latency"].get("backends", {})
    for name in sorted(set(lo) | set(ln)):
        rows = {}
        so, sn = lo.get(name, {}).get("stages", {}), ln.get(name, {}).get("stages", {})
        for stage in sorted(set(so) | set(sn)):
            a = so.get(stage, {}).get("median_ms")
            b = sn.get(stage, {}).get("median_ms")
            rows[stage] = {"old_ms": a, "new_ms": b, "change": (b / a - 1.0) if a and b else None}
        out["latency"][name] = rows
    fo, fn = old["fidelity"].get("backends", {}), new["fidelity"].get("backends", {})
    for name in sorted(set(fo) | set(fn)):
        out["fidelity"][name] = {k: {"old": fo.get(name, {}).get(k), "new": fn.get(name, {}).get(k)}
                                 for k in ("final_latent_rel_error", "psnr_db_min", "ssim_min")}
    qo, qn = old["quality"].get("variants", {}), new["quality"].get("variants", {})
    for var in sorted(set(qo) | set(qn)):
        for r in sorted(set(qo.get(var, {})) | set(qn.get(var, {}))):
            a = qo.get(var, {}).get(r, {}).get("per_set", {}).get("mean")
            b = qn.get(var, {}).get(r, {}).get("per_set", {}).get("mean")
            out["quality"][f"{var}/{r}"] = {"old": a, "new": b, "change": (b - a) if a is not None and b is not None else None}
    return out


def render_compare(cmp: dict, old_name: str, new_name: str) -> str:
    lines = [f"# mvz bench: {old_name} -> {new_name}", ""]
    for note in cmp["notes"]:
        lines.append(f"- note: {note}")
    if cmp["notes"]:
        lines.append("")
    for name, rows in cmp["latency"].items():
        lines += [f"## Latency: {name} (median ms)", ""]
        lines += _table(["stage", "old", "new", "change"],
                        [[s, _f(r["old_ms"], 2), _f(r["new_ms"], 2), _f(_pct(r["change"]), 1, " %") if r["change"] is not None else "–"]
                         for s, r in rows.items()])
        lines.append("")
    if cmp["fidelity"]:
        lines += ["## Fidelity", ""]
        lines += _table(["backend", "metric", "old", "new"],
                        [[n, k, _f(v["old"], 6), _f(v["new"], 6)] for n, m in cmp["fidelity"].items() for k, v in m.items()])
        lines.append("")
    if cmp["quality"]:
        lines += ["## Quality (mean per set)", ""]
        lines += _table(["variant/reward", "old", "new", "change"],
                        [[k, _f(v["old"], 4), _f(v["new"], 4), _f(v["change"], 4)] for k, v in cmp["quality"].items()])
        lines.append("")
    return "\n".join(lines)


def write_outputs(report: dict, out: Path, sheet_rows=(), plots: bool = True) -> dict:
    """report.json, report.md, plots and the contact sheet into ``out`` (atomic writes)."""
    from mvz.atomic import write_text

    art: dict = {"report_json": "report.json", "report_md": "report.md", "plots": [], "contact_sheet": None}
    report["artifacts"] = art
    if plots:
        from bench import plots as pl

        for fn, fname in ((pl.latency_plot, "latency.png"), (pl.fidelity_plot, "fidelity.png"), (pl.quality_plot, "quality.png")):
            try:
                if fn(report, out / fname):
                    art["plots"].append(fname)
            except Exception as exc:  # a figure must never lose the measurements
                art.setdefault("plot_errors", []).append(f"{fname}: {type(exc).__name__}: {exc}")
        if sheet_rows and pl.contact_sheet(list(sheet_rows), out / "contact_sheet.png"):
            art["contact_sheet"] = "contact_sheet.png"
    write_text(out / "report.md", render_markdown(report) + "\n")
    write_report_json(out / "report.json", report)
    return art
