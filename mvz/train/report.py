"""``mvz train report RUN``: a run's curves as PNGs and one Markdown page, from ``metrics.jsonl`` alone.

What the paper's figures show, per iteration: the per-view reward R and the joint reward R_mv (mean and 95 %
band, i.e. the 2.5-97.5 percentiles of the gathered batch) for each rollout kind, the threshold τ and the
multiplier λ, the fraction of clipped log-ratios, the ZMV-over-standard reward advantage, the approximate KL to
the sampling policy and to the base model, and the time per epoch; plus the last sample grid.

It reads only what a run writes as it goes (``metrics.jsonl`` is gathered over all processes by rank 0, line by
line), so a killed run and a multi-process run report the same way. ``summary.json`` holds every plotted
series, so the numbers can be checked against ``metrics.jsonl``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mvz.atomic import atomic_write, write_json, write_text
from mvz.errors import InputError
from mvz.train.run import RunDir

# plot file -> (title, left y label, [(metric key, legend label)], right y label, [(key, label)] on a twin axis);
# reward keys get their 95 % band
PLOTS: dict[str, tuple[str, str, list[tuple[str, str]], str, list[tuple[str, str]]]] = {
    "rewards_view.png": ("Per-view reward R (mean, 95 % band)", "R", [
        ("reward/standard/view", "standard"), ("reward/zmv/view", "ZMV"), ("reward/standard2/view", "standard 2")],
        "", []),
    "rewards_joint.png": ("Joint-view reward R_mv (mean, 95 % band) and threshold tau", "R_mv", [
        ("reward/standard/joint", "standard"), ("reward/zmv/joint", "ZMV"), ("reward/standard2/joint", "standard 2"),
        ("tau", "tau")], "", []),
    "lambda_tau.png": ("Constraint: multiplier lambda and threshold tau", "lambda", [("lambda", "lambda")],
                       "tau", [("tau", "tau")]),
    "clipfrac.png": ("Fraction of clipped log-ratios", "clip fraction", [("clipfrac", "clipfrac")], "", []),
    "zmv_advantage.png": ("ZMV over standard: mean reward advantage", "per-view R: ZMV - standard", [
        ("zmv_advantage/view", "per-view R")], "joint R_mv: ZMV - standard", [("zmv_advantage/joint", "joint R_mv")]),
    "kl.png": ("Approximate KL (per-element mean log-probs)", "KL to the sampling policy",
               [("approx_kl", "to the sampling policy")], "KL to the base model", [("kl_to_base", "to the base model")]),
}
EPOCH_PLOT = "epoch_time.png"


def _series(records: list[dict[str, Any]], key: str) -> list[float] | None:
    """A metric per iteration (``<key>_mean`` for reward families); None when the run never logged it."""
    name = f"{key}_mean" if key.startswith("reward/") else key
    if not any(name in r for r in records):
        return None
    return [float(r.get(name, float("nan"))) for r in records]


def _band(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]] | None:
    if not key.startswith("reward/") or not any(f"{key}_q025" in r for r in records):
        return None
    return ([float(r.get(f"{key}_q025", float("nan"))) for r in records],
            [float(r.get(f"{key}_q975", float("nan"))) for r in records])


def epoch_times(records: list[dict[str, Any]]) -> dict[int, float]:
    """Seconds of sampling + training per epoch (sum of its iterations' ``time/iteration_s``)."""
    out: dict[int, float] = {}
    for r in records:
        out[int(r["epoch"])] = out.get(int(r["epoch"]), 0.0) + float(r.get("time/iteration_s", 0.0))
    return out


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def _draw_lines(ax, lines, records, steps, series, colors) -> list:
    handles = []
    for key, label in lines:
        style = {"linestyle": "--", "color": "black"} if key == "tau" else {"color": next(colors)}
        (line,) = ax.plot(steps, series[key], marker="o", markersize=3, label=label, **style)
        band = _band(records, key)
        if band is not None:
            ax.fill_between(steps, band[0], band[1], alpha=0.2, color=line.get_color())
        handles.append(line)
    return handles


def _draw_plot(path: Path, spec, records, steps, series) -> bool:
    """One figure; False (nothing written) when the run logged none of its series (e.g. no ZMV rollouts)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    title, ylabel, lines, ylabel2, lines2 = spec
    lines = [(k, lab) for k, lab in lines if series.get(k) is not None]
    lines2 = [(k, lab) for k, lab in lines2 if series.get(k) is not None]
    if not lines and not lines2:
        return False
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = iter(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    handles = _draw_lines(ax, lines, records, steps, series, colors)
    if lines2:
        ax2 = ax.twinx()
        handles += _draw_lines(ax2, lines2, records, steps, series, colors)
        ax2.set_ylabel(ylabel2)
    ax.set(title=title, xlabel="iteration", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
    _save(fig, path)
    plt.close(fig)
    return True


def _draw_epoch_time(path: Path, times: dict[int, float]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar([str(e) for e in times], list(times.values()), color="tab:gray")
    ax.set(title="Time per epoch (sampling + training)", xlabel="epoch", ylabel="seconds")
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)
    plt.close(fig)


def _read_run(run: Path) -> tuple[RunDir, dict[str, Any], list[dict[str, Any]]]:
    rd = RunDir(run)
    marker = rd.read_marker()
    records = rd.read_metrics()
    if not records:
        raise InputError(f"run {run} has no metrics yet (metrics.jsonl is empty).",
                         "Report once the first iteration has finished.")
    return rd, marker, records


def _markdown(rd: RunDir, marker, records, plots: list[str], times: dict[int, float], grid: str | None) -> str:
    cfg = rd.saved_config()
    done = [c.epoch for c in rd.checkpoints()]
    last_epoch = int(records[-1]["epoch"])
    state = "finished" if done and done[-1] + 1 >= cfg.training.num_epochs else (
        f"stopped: the last checkpoint is epoch_{done[-1]}" if done else "stopped before its first checkpoint")
    lines = [f"# Training report: {rd.path.name}", "",
             f"- method {cfg.training.method} (objective {cfg.objective}), preset {cfg.preset}, "
             f"{marker.get('world_size', 1)} process(es)",
             f"- {len(records)} iterations logged, epochs 0..{last_epoch} of {cfg.training.num_epochs}; {state}", "",
             "## Per epoch (last iteration of each)", "",
             "| epoch | R (view) | R_mv (joint) | tau | lambda | clipfrac | ZMV adv. (joint) | KL to base | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    last = {int(r["epoch"]): r for r in records}
    for e, r in last.items():
        cells = [r.get(k, float("nan")) for k in ("reward/view_mean", "reward/joint_mean", "tau", "lambda", "clipfrac",
                                                  "zmv_advantage/joint", "kl_to_base")]
        lines.append(f"| {e} | " + " | ".join(f"{float(c):.6g}" for c in cells) + f" | {times.get(e, 0.0):.3g} |")
    lines += ["", "## Curves", ""] + [f"![{p}]({p})" for p in plots]
    if grid:
        lines += ["", "## Last sample grid (rows: standard, ZMV per prompt)", "", f"![samples]({grid})"]
    return "\n".join(lines) + "\n"


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``out`` (default ``RUN/report``): one PNG per plot, ``report.md`` and ``summary.json``."""
    import matplotlib

    matplotlib.use("Agg")
    rd, marker, records = _read_run(Path(run))
    out = Path(out) if out is not None else rd.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    steps = list(range(len(records)))
    keys = {k for spec in PLOTS.values() for k, _ in (*spec[2], *spec[4])}
    series = {k: _series(records, k) for k in sorted(keys)}
    plots = [name for name, spec in PLOTS.items() if _draw_plot(out / name, spec, records, steps, series)]
    times = epoch_times(records)
    _draw_epoch_time(out / EPOCH_PLOT, times)
    plots.append(EPOCH_PLOT)
    samples = sorted(rd.path.glob("samples/epoch_*.png"), key=lambda p: int(p.stem.split("_")[1]))
    grid = None
    if samples:
        grid = "last_samples.png"
        atomic_write(out / grid, lambda p: shutil.copyfile(samples[-1], p))
    write_json(out / "summary.json", {"iterations": len(records), "plots": plots, "epoch_seconds": times,
                                      "series": {k: v for k, v in series.items() if v is not None},
                                      "last_sample_grid": str(samples[-1]) if samples else None})
    return write_text(out / "report.md", _markdown(rd, marker, records, plots, times, grid))

