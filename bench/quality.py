"""Quality: rewards per view and per set for sampling variants (base vs LoRA, standard vs ZMV).

Every variant samples the same prompts with the same seeds, so differences between variants are paired
per prompt: the report gives each variant's mean with a 95 % Student-t interval and, for each variant
against ``base``, the mean paired difference with its interval (a LoRA that follows the paper's direction
of improvement has a difference interval above zero).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from bench.stats import mean_ci


@dataclass(frozen=True)
class Variant:
    name: str
    lora_scale: float  # 0 = the base model (LoRA layers off)
    zmv: bool


def variants(with_lora: bool, lora_scale: float = 1.0, zmv: bool = True) -> list[Variant]:
    out = [Variant("base", 0.0, False)]
    if zmv:
        out.append(Variant("base+zmv", 0.0, True))
    if with_lora:
        out.append(Variant("lora", lora_scale, False))
        if zmv:
            out.append(Variant("lora+zmv", lora_scale, True))
    return out


def load_rewards(names: Sequence[str], preset: str | None, device) -> tuple[dict, dict[str, str]]:
    """({name: Reward}, {name: why it could not be loaded})."""
    from mvz.errors import MvzError
    from mvz.rewards import load_reward

    loaded, missing = {}, {}
    for name in names:
        try:
            loaded[name] = load_reward(name, preset=preset, device=device)
        except MvzError as exc:
            missing[name] = str(exc)
    return loaded, missing


def run_quality(
    model,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rewards: dict,
    variant_list: Sequence[Variant],
    *,
    cameras,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    batch: int = 1,
    keep_images: int = 0,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Sample every variant on every prompt, score with every reward.

    Returns (quality section of the report, {variant: images [k, V, 3, H, W] of the first ``keep_images``}).
    """
    from mvz.models.lora import has_lora, set_lora_scale
    from mvz.pipeline import MultiviewPipeline

    pipe = MultiviewPipeline(model, num_views=cameras.num_views)
    scores: dict[str, dict[str, dict[str, list]]] = {}
    kept: dict[str, torch.Tensor] = {}
    total = len(variant_list) * len(prompts)
    done = 0
    for var in variant_list:
        if has_lora(model.unet):
            set_lora_scale(model.unet, var.lora_scale)
        per = {r: {"per_set": [], "per_view": []} for r in rewards}
        imgs_kept = []
        for start in range(0, len(prompts), batch):
            ps, ss = list(prompts[start:start + batch]), list(seeds[start:start + batch])
            res = pipe.sample(ps, ss, steps=steps, guidance=guidance, cameras=cameras, height=height, width=width,
                              zmv=var.zmv)
            if len(imgs_kept) < keep_images:
                imgs_kept.extend(res.images[: keep_images - len(imgs_kept)])
            for rname, reward in rewards.items():
                out = reward.score(res.images, ps)
                per[rname]["per_set"].extend(out.per_set.float().tolist())
                if out.per_view is not None:
                    per[rname]["per_view"].extend(out.per_view.float().tolist())
            done += len(ps)
            if on_progress:
                on_progress(done, total)
        scores[var.name] = per
        if imgs_kept:
            kept[var.name] = torch.stack(imgs_kept)
    if has_lora(model.unet):
        set_lora_scale(model.unet, 1.0)
    return summarize_quality(scores, [v.name for v in variant_list]), kept


def summarize_quality(scores: dict[str, dict[str, dict[str, list]]], order: Sequence[str]) -> dict:
    """scores[variant][reward] = {"per_set": [B], "per_view": [[V] x B]} -> report section."""
    section: dict = {"variants": {}, "differences_vs_base": {}}
    for var in order:
        section["variants"][var] = {}
        for rname, s in scores[var].items():
            entry = {"per_set": mean_ci(s["per_set"]), "values_per_set": s["per_set"]}
            if s["per_view"]:
                # the views of one set share a prompt and a seed, so they are not independent samples: the
                # interval is over the sets (each set's view mean), not over all B*V views (too narrow)
                entry["per_view"] = mean_ci([sum(row) / len(row) for row in s["per_view"]])
                entry["per_view"]["views"] = sum(len(row) for row in s["per_view"])
                entry["values_per_view"] = s["per_view"]
                views = len(s["per_view"][0])
                entry["per_view_index_mean"] = [mean_ci([row[j] for row in s["per_view"]])["mean"] for j in range(views)]
            section["variants"][var][rname] = entry
    if order and order[0] in scores:
        base = order[0]
        for var in order[1:]:
            section["differences_vs_base"][var] = {}
            for rname in scores[var]:
                a, b = scores[var][rname]["per_set"], scores[base][rname]["per_set"]
                diffs = [x - y for x, y in zip(a, b, strict=True)]
                ci = mean_ci(diffs)
                ci["direction"] = ("better" if ci["ci_low"] is not None and ci["ci_low"] > 0 else
                                   "worse" if ci["ci_high"] is not None and ci["ci_high"] < 0 else "inconclusive")
                section["differences_vs_base"][var][rname] = ci
    return section
