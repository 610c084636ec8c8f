"""PNG figures of a report (matplotlib, Agg) and the contact sheet of sample grids (PIL)."""

from __future__ import annotations

import math
from pathlib import Path

from mvz.atomic import atomic_write, save_image

PLOT_STAGES = ("text_encode", "camera_residuals", "unet_total", "vae_decode", "scheduler_and_other", "image_encode")


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)
    return path


def latency_plot(report: dict, path: Path) -> Path | None:
    lat = report["latency"].get("backends", {})
    if not lat:
        return None
    plt = _plt()
    names = list(lat)
    stages = [s for s in PLOT_STAGES if any(s in lat[n]["stages"] for n in names)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(names), 4.2))
    bottom = [0.0] * len(names)
    for stage in stages:
        vals = [lat[n]["stages"].get(stage, {}).get("median_ms", 0.0) for n in names]
        ax.bar(names, vals, bottom=bottom, label=stage)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    for i, n in enumerate(names):
        e2e = lat[n]["stages"]["end_to_end"]
        ax.errorbar(i, e2e["median_ms"], yerr=[[0], [max(e2e["p90_ms"] - e2e["median_ms"], 0)]], fmt="k_", capsize=6)
    ax.set_ylabel("median ms per multiview set (stacked by stage; whisker: end-to-end p90)")
    cfg = report["config"]
    ax.set_title(f"{cfg['model']}: {cfg['views']} views, {cfg['height']} px, {cfg['steps']} steps")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def fidelity_plot(report: dict, path: Path) -> Path | None:
    fid = report["fidelity"]
    if fid.get("status") != "ok" or not fid.get("backends"):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    any_line = False
    for name, f in fid["backends"].items():
        errs = f.get("per_step_latent_rel_error") or []
        if errs:
            ys = [max(e, 1e-12) if math.isfinite(e) else float("nan") for e in errs]
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
            any_line = True
    ax.set_yscale("log")
    ax.set_xlabel("sampling step")
    ax.set_ylabel(f"latent rel. error vs {fid.get('reference')}")
    ax.set_title("fidelity per step (identical = 1e-12 floor)")
    if any_line:
        ax.legend(fontsize=8)
    return _save(fig, path)


def quality_plot(report: dict, path: Path) -> Path | None:
    q = report["quality"]
    if q.get("status") != "ok":
        return None
    plt = _plt()
    rewards = q.get("rewards", [])
    variants = list(q["variants"])
    fig, axes = plt.subplots(1, len(rewards), figsize=(max(3.2 * len(rewards), 4), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rewards, strict=True):
        data = [q["variants"][v][r]["values_per_set"] for v in variants if r in q["variants"][v]]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(data) + 1), variants[: len(data)], rotation=20, fontsize=8)
        for i, vals in enumerate(data, start=1):
            ax.scatter([i] * len(vals), vals, s=8, alpha=0.5)
        ax.set_title(r, fontsize=9)
    fig.suptitle("reward per multiview set")
    return _save(fig, path)


def contact_sheet(rows: list[tuple[str, object]], path: Path, max_width: int = 1536) -> Path | None:
    """rows: (label, images [V, 3, H, W] in [0, 1]) -> one PNG, a labelled 1×V grid per row."""
    if not rows:
        return None
    from PIL import Image, ImageDraw

    from mvz.pipeline import images_to_grid

    grids = [(label, images_to_grid(imgs.float().cpu())) for label, imgs in rows]
    scale = min(1.0, max_width / max(g.width for _, g in grids))
    if scale < 1.0:
        grids = [(lab, g.resize((max(1, int(g.width * scale)), max(1, int(g.height * scale))))) for lab, g in grids]
    label_h = 14
    width = max(max(g.width for _, g in grids), 240)
    height = sum(g.height + label_h for _, g in grids)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, g in grids:
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        sheet.paste(g, (0, y + label_h))
        y += g.height + label_h
    return save_image(path, sheet)
