"""``mvz score``: score a multiview set (a 1xV grid PNG or a folder of view PNGs) with one or more rewards."""

from __future__ import annotations

from pathlib import Path

import typer

from mvz.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _to_rgb(img, path: Path):
    """RGB as is; palette converted; RGBA only when fully opaque; anything else is an error."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" not in img.info:
        return img.convert("RGB")
    if img.mode == "RGBA" and img.getchannel("A").getextrema() == (255, 255):
        return img.convert("RGB")
    bands = len(img.getbands())
    raise InputError(f"{path} has mode {img.mode} ({bands} channel{'s' if bands != 1 else ''}); rewards need RGB.",
                     "Save the views as 3-channel RGB (composite any transparency onto a background first).")


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read image {path}: {exc}.", "Pass a PNG/JPEG file.") from None
    except Image.DecompressionBombError:  # Pillow's guard against images too large to decode safely
        raise InputError(f"image {path} is larger than Pillow decodes safely ({Image.MAX_IMAGE_PIXELS:,} pixels).",
                         "Downscale it first: the reward models see 224-px crops.") from None
    return _to_rgb(img, path)


def load_views(source: Path, views: int | None):
    """``[1, V, 3, H, W]`` float in [0, 1] from a grid image (V views side by side) or a folder of views."""
    import numpy as np
    import torch

    def tensor(img) -> torch.Tensor:
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise InputError(f"folder {source} has no view images (.png/.jpg).", "Put one image per view in it.")
        if views is not None and views != len(files):
            raise InputError(f"folder {source} has {len(files)} view images but --views is {views}.",
                             "Drop --views or pass the matching count.")
        imgs = [_open(p) for p in files]
        sizes = {im.size for im in imgs}
        if len(sizes) != 1:
            raise InputError(f"views in {source} differ in size ({', '.join(f'{w}x{h}' for w, h in sorted(sizes))}).",
                             "Use views of one size.")
        batch = torch.stack([tensor(im) for im in imgs])
    elif source.is_file():
        v = 6 if views is None else views
        if v < 1:
            raise InputError(f"--views must be at least 1, got {v}.")
        img = _open(source)
        w, h = img.size
        if w % v:
            raise InputError(f"grid {source} is {w} px wide, not divisible into {v} views.",
                             "Pass --views with the number of views side by side in the grid.")
        grid = tensor(img)
        batch = torch.stack(list(grid.split(w // v, dim=2)))
    else:
        raise InputError(f"{source} does not exist.", "Pass a grid PNG or a folder of view PNGs.")
    _, _, h, w = batch.shape
    if h != w:
        raise InputError(f"views are {w}x{h} pixels, not square.",
                         "Check --views matches the grid (views sit side by side in one row).")
    if h < 16:
        raise InputError(f"views are only {w}x{h} pixels.", "Pass views of at least 16x16 pixels.")
    return batch[None]


def _parse_checkpoints(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--checkpoint {item!r} is not NAME=PATH.", "Example: --checkpoint hpsv2=/data/HPS_v2_compressed.pt")
        name, path = item.split("=", 1)
        out[name.strip().lower()] = path.strip()
    return out


def register(app: typer.Typer) -> None:
    @app.command("score")
    def score(
        source: Path = typer.Argument(..., help="A grid PNG (V views side by side, 1xV) or a folder of view images."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="The prompt the views were generated from."),
        reward: list[str] = typer.Option(["pickscore,hyperscore"], "--rewards",
                                         help="Rewards: pickscore, hpsv2, imagereward, hyperscore, or your own MODULE:CALLABLE / FILE.py:CALLABLE "
                                              "(comma-separated or repeated; see docs/training.md)."),
        views: int = typer.Option(None, "--views", help="Views in the grid (default 6; a folder gives its own count)."),
        preset: str = typer.Option(None, "--reward-preset",
                                   help="'tiny': random tiny reward weights in the original formats (no download)."),
        checkpoint: list[str] = typer.Option([], "--checkpoint",
                                             help="NAME=PATH: an explicit checkpoint file or folder for one reward."),
        hyperscore_views: str = typer.Option("native", "--hyperscore-views",
                                             help="How HyperScore sees the views: native (as given, like MVC-ZigAL) or ring4 (azimuths 0/90/180/270)."),
        white_background: bool = typer.Option(False, "--white-background",
                                              help="HyperScore only: recolour a flat grey (0.5) background to white, as its training renders."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
        as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table."),
    ) -> None:
        """Score a multiview set against a prompt with one or more reward models."""
        import json
        import logging

        from mvz.cli import output
        from mvz.cli.common import split_names

        if not prompt.strip():
            raise InputError("the prompt is empty.", "Pass --prompt with the text the views were generated from.")
        if views is not None and views < 1:
            raise InputError(f"--views must be at least 1, got {views}.")
        ckpts = _parse_checkpoints(checkpoint)
        names = [n for n in split_names(reward) if ":" not in n]
        names += [n.strip() for item in reward for n in item.split(",") if ":" in n]  # custom specs keep their case
        if not names:
            raise InputError("--rewards is empty.", "Name at least one: pickscore, hpsv2, imagereward, hyperscore.")
        if not source.exists():
            raise InputError(f"{source} does not exist.", "Pass a grid PNG or a folder of view PNGs.")

        from mvz.rewards import load_reward

        logging.getLogger("mvz.rewards").addHandler(logging.NullHandler())
        err = output.console(stderr=True)
        unknown = sorted(set(ckpts) - set(names))
        if unknown:
            raise InputError(f"--checkpoint given for {', '.join(unknown)}, which is not scored.", "Add it with --rewards.")
        images = load_views(source, views)
        results, notices = {}, []
        for name in dict.fromkeys(names):
            kwargs = {}
            if name == "hyperscore":
                kwargs = {"views": hyperscore_views, "white_background": white_background}
            if ":" in name:  # the user's callable, checked on a probe of these views' count and size
                from mvz.rewards.custom import load_custom_reward

                r = load_custom_reward(name, views=images.shape[1], size=images.shape[-1],
                                       device=None if device == "auto" else device)
            else:
                r = load_reward(name, ckpts.get(name), preset=preset, device=None if device == "auto" else device,
                                **kwargs)
            out = r.score(images, [prompt])
            notices += [m for m in getattr(r, "notices", []) if m not in notices]
            entry = {"kind": r.kind, "per_set": float(out.per_set[0]),
                     "per_view": [float(x) for x in out.per_view[0]] if out.per_view is not None else None,
                     "sub_scores": {k: float(v[0]) if v.ndim == 1 else [float(x) for x in v[0]]
                                    for k, v in out.sub_scores.items()},
                     "checkpoint": getattr(r, "checkpoint", "")}
            if name == "hyperscore":
                entry["views"] = r.view_convention
            results[name] = entry
        for m in notices:
            err.print(f"[yellow]note:[/] {m}", highlight=False, soft_wrap=True)
        if as_json:
            typer.echo(json.dumps({"source": str(source), "prompt": prompt, "views": int(images.shape[1]),
                                   "preset": preset, "scores": results}, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"{source} - {images.shape[1]} views" + (f" (preset {preset})" if preset else ""))
        table.add_column("reward")
        table.add_column("score", justify="right")
        table.add_column("per view / sub-scores")
        for name, e in results.items():
            if e["per_view"] is not None:
                detail = " ".join(f"{x:.4f}" for x in e["per_view"])
            else:
                detail = " ".join(f"{k}={v:.3f}" for k, v in e["sub_scores"].items())
                detail += f"  [dim]({e.get('views', 'native')} views)[/]"
            table.add_row(name, f"{e['per_set']:.4f}", detail)
        output.console(stderr=False).print(table)
