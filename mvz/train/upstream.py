"""Upstream MVC-ZigAL's own config files (``mvczigal/configs/*.yaml``, originally ``mvczigal/config/mvczigal.yaml``)
read key by key into mvz's config.

The layout is the published one (``ZiyiZhang27/MVC-ZigAL: mvczigal/config/mvczigal.yaml``): three sections,
``wandb`` (``log``, ``project_name``, ``run_name``), ``pretrained`` (``base_model``, ``vae_model``,
``unet_model``, ``custom_adapter``, ``lora_model``) and ``training`` (everything else; see :data:`TRAINING`).
Newer revisions renamed ``constrain_threshold`` to ``constrain_threshold_init`` (``mvczigal.md`` §7); both
are read. Every key maps to an mvz key, or is ignored with a note saying why, or is refused naming it.
"""

from __future__ import annotations

from typing import Any

from mvz.errors import ConfigError
from mvz.models.specs import SDXL_LCM

# upstream training key -> mvz training key (same meaning, same value)
SAME = ("save_interval", "lora_scale", "lora_rank", "gradient_checkpointing", "seed", "num_views",
        "num_inference_steps", "guidance_scale", "lr", "sample_batch_size_per_gpu", "train_batch_size_per_gpu",
        "num_sample_iters", "clip_range", "max_grad_norm", "adv_clip_max", "gradient_accumulation_steps",
        "num_epochs", "batches_per_epoch", "num_inner_epochs", "lambda_init", "lambda_lr", "lambda_max",
        "lambda_update_delay_steps", "ema_beta")
RENAMED = {"constrain_threshold": "constrain_threshold_init", "constrain_threshold_init": "constrain_threshold_init"}
PROMPT_SETS = {"SimpleAnimals": "simple_animals", "MATE3D": "mate3d"}
REWARDS = {"pick_score": "pickscore", "hyper_score": "hyperscore", "hpsv2": "hpsv2", "image_reward": "imagereward"}
IGNORED = {  # key -> why it has no mvz counterpart
    "wandb.run_name": "the run is named after its --run-dir folder",
    "pretrained.lora_model": "upstream never reads it",
    "training.logdir": "mvz writes to --run-dir",
    "training.eta": "the LCM step ignores eta",
    "training.negative_prompt": "the LCM UNet runs without CFG, so the negative prompt is never used",
}
# pretrained key -> (mvz model key, the sdxl-lcm preset's own repo: that value keeps the preset default)
PRETRAINED = {"base_model": ("base_model", SDXL_LCM.base.repo_id), "vae_model": ("vae_model", SDXL_LCM.vae.repo_id),
              "unet_model": ("unet_model", SDXL_LCM.unet.repo_id),
              "custom_adapter": ("adapter", SDXL_LCM.adapter.repo_id)}
TRAINING = (*SAME, *RENAMED, "use_lora", "image_height", "image_width", "scheduler", "prompt_set", "reward_fn",
            "mv_reward_fn", "logdir", "eta", "negative_prompt")


def is_upstream(data: dict[str, Any]) -> bool:
    """An upstream file has a ``pretrained`` or ``wandb`` section, which mvz's layout never has."""
    return "pretrained" in data or "wandb" in data


def _refuse(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"upstream config key {key}={value!r} cannot be used: {why}.")


def _section(data: dict[str, Any], name: str) -> dict[str, Any]:
    sec = data.get(name) or {}
    if not isinstance(sec, dict):
        raise ConfigError(f"upstream config section {name} must be a mapping, got {sec!r}.")
    return sec


def _reward(key: str, value: Any) -> str:
    if value not in REWARDS:
        raise _refuse(key, value, f"mvz knows the upstream rewards {', '.join(REWARDS)}")
    return REWARDS[value]


def _training(t: dict[str, Any], out: dict[str, Any]) -> None:
    training, prompts, reward = out["training"], out["prompts"], out["reward"]
    for key in SAME:
        if key in t:
            training[key] = t[key]
    for old, new in RENAMED.items():
        if old in t:
            training[new] = t[old]
    if "lora_rank" in t:
        training["lora_alpha"] = t["lora_rank"]  # upstream's LoraConfig: lora_alpha = r (scale 1)
    if t.get("use_lora", True) is not True:
        raise _refuse("training.use_lora", t["use_lora"], "mvz trains LoRAs only")
    if t.get("scheduler", "lcm") != "lcm":
        raise _refuse("training.scheduler", t["scheduler"], "mvz trains the LCM UNet with the LCM step only")
    h, w = t.get("image_height"), t.get("image_width")
    if h is not None or w is not None:
        if h != w:
            raise _refuse("training.image_width", w, f"mvz trains square images and image_height is {h}")
        training["resolution"] = h
    if "prompt_set" in t:
        if t["prompt_set"] not in PROMPT_SETS:
            raise _refuse("training.prompt_set", t["prompt_set"], f"upstream's sets are {', '.join(PROMPT_SETS)}")
        prompts["prompt_set"] = PROMPT_SETS[t["prompt_set"]]
    for key in ("reward_fn", "mv_reward_fn"):
        if key in t:
            reward[key] = _reward(f"training.{key}", t[key])


def map_upstream(data: dict[str, Any], notes: list[str] | None = None) -> dict[str, Any]:
    """An upstream config dict as an mvz config dict (to merge over mvz's defaults); ``notes`` gets one line per
    ignored key. Unknown keys are refused naming them."""
    notes = notes if notes is not None else []
    for name in data:
        if name not in ("wandb", "pretrained", "training"):
            raise ConfigError(f"unknown upstream config section {name}.", "Sections: wandb, pretrained, training.")
    known = {"wandb": ("log", "project_name", "run_name"), "pretrained": (*PRETRAINED, "lora_model"),
             "training": TRAINING}
    sections = {name: _section(data, name) for name in known}
    for name, sec in sections.items():
        for key in sec:
            if key not in known[name]:
                raise ConfigError(f"unknown upstream config key {name}.{key}.",
                                  f"Keys of upstream's {name} section: {', '.join(known[name])}.")
            if f"{name}.{key}" in IGNORED:
                notes.append(f"upstream key {name}.{key} ignored: {IGNORED[f'{name}.{key}']}.")
    out: dict[str, Any] = {"model": {"name": "sdxl-lcm"}, "training": {"method": "mvczigal"}, "prompts": {},
                           "reward": {}, "logging": {}}
    for key, (ours, preset_repo) in PRETRAINED.items():
        value = sections["pretrained"].get(key)
        if key == "unet_model" and value == "":
            raise _refuse("pretrained.unet_model", value, "an empty unet_model is the SDXL (DDIM, CFG) backbone, "
                          "and mvz trains the LCM UNet")
        if value is not None and value != preset_repo:
            out["model"][ours] = value
    _training(sections["training"], out)
    wb = sections["wandb"]
    if "log" in wb:
        out["logging"]["wandb"] = bool(wb["log"])
    if "project_name" in wb:
        out["logging"]["wandb_project"] = wb["project_name"]
    return out
