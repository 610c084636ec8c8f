"""Upstream MVC-ZigAL config files map key by key onto mvz's config.

The upstream files are written out here from the published layout (``ZiyiZhang27/MVC-ZigAL:
mvczigal/config/mvczigal.yaml``, the original of ``lcm_sdxl_simple.yaml``) and the values of
``shared/reference/mvczigal.md`` §9 for ``lcm_sdxl_mate3d.yaml``, which renames ``constrain_threshold`` to
``constrain_threshold_init``.
"""

from __future__ import annotations

import pytest
import yaml

from mvz.cli import main
from mvz.errors import ConfigError
from mvz.train.config import load_config

SIMPLE = """
wandb:
  log: true
  project_name: "mvczigal"
  run_name: ""

pretrained:
  base_model: "stabilityai/stable-diffusion-xl-base-1.0"
  vae_model: "madebyollin/sdxl-vae-fp16-fix"
  unet_model: "latent-consistency/lcm-sdxl"
  custom_adapter: "huanngzh/mv-adapter"
  lora_model: ""

training:
  logdir: "logs"
  save_interval: 1
  use_lora: true
  lora_scale: 1.0
  lora_rank: 16
  gradient_checkpointing: true
  seed: 42
  image_height: 768
  image_width: 768
  num_views: 6
  num_inference_steps: 8
  guidance_scale: 7.0
  scheduler: "lcm"
  eta: 1.0
  lr: 1e-4
  sample_batch_size_per_gpu: 4
  train_batch_size_per_gpu: 1
  num_sample_iters: 1
  clip_range: 1e-4
  max_grad_norm: 5
  adv_clip_max: 10
  gradient_accumulation_steps: 32
  num_epochs: 70
  batches_per_epoch: 10
  num_inner_epochs: 1
  lambda_init: 0.0
  lambda_lr: 0.1
  lambda_max: 5.0
  lambda_update_delay_steps: 0
  ema_beta: 0.99
  constrain_threshold: 0
  prompt_set: SimpleAnimals
  negative_prompt: "watermark, ugly, deformed, noisy, blurry, low contrast"
  reward_fn: pick_score
  mv_reward_fn: hyper_score
"""


def mate3d() -> str:
    data = yaml.safe_load(SIMPLE)
    t = data["training"]
    t.update(lr=5e-5, num_sample_iters=4, gradient_accumulation_steps=64, num_epochs=100, prompt_set="MATE3D")
    t["constrain_threshold_init"] = t.pop("constrain_threshold")
    return yaml.safe_dump(data)


def same_run(cfg, preset_name):
    preset = load_config(preset_name)
    for section in ("model", "prompts", "reward", "training"):  # logging (sample prompts) is not the run
        assert getattr(cfg, section) == getattr(preset, section), section


@pytest.mark.parametrize("text, preset", [(SIMPLE, "lcm_sdxl_simple"), (mate3d(), "lcm_sdxl_mate3d")])
def test_upstream_file_maps_to_our_preset(tmp_path, text, preset):
    path = tmp_path / f"{preset}.yaml"
    path.write_text(text)
    notes = []
    cfg = load_config(config_file=path, notes=notes)
    same_run(cfg, preset)
    assert cfg.logging.wandb is True and cfg.logging.wandb_project == "mvczigal"
    assert sorted(n.split()[2] for n in notes) == ["pretrained.lora_model", "training.eta", "training.logdir",
                                                   "training.negative_prompt", "wandb.run_name"]


def test_non_default_sources_and_values_are_carried(tmp_path):
    data = yaml.safe_load(SIMPLE)
    data["pretrained"]["vae_model"] = "/models/my-vae"
    data["training"].update(lora_rank=8, image_height=512, image_width=512, reward_fn="image_reward")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = load_config(config_file=path, overrides=["logging.wandb=false"])
    assert cfg.model.vae_model == "/models/my-vae" and cfg.model.base_model is None
    assert (cfg.training.lora_rank, cfg.training.lora_alpha, cfg.training.resolution) == (8, 8.0, 512)
    assert cfg.reward.reward_fn == "imagereward" and not cfg.logging.wandb


@pytest.mark.parametrize("edit, needle", [
    (("training", "scheduler", "ddim"), "training.scheduler='ddim' cannot be used"),
    (("pretrained", "unet_model", ""), "pretrained.unet_model='' cannot be used"),
    (("training", "use_lora", False), "training.use_lora=False cannot be used"),
    (("training", "image_width", 512), "training.image_width=512 cannot be used"),
    (("training", "prompt_set", "Fruits"), "training.prompt_set='Fruits' cannot be used"),
    (("training", "reward_fn", "clip_score"), "training.reward_fn='clip_score' cannot be used"),
    (("training", "warmup", 3), "unknown upstream config key training.warmup"),
    (("hydra", "run", 1), "unknown upstream config section hydra"),
])
def test_unmappable_upstream_keys_are_refused_by_name(tmp_path, edit, needle):
    data = yaml.safe_load(SIMPLE)
    section, key, value = edit
    data.setdefault(section, {})[key] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as exc:
        load_config(config_file=path)
    assert needle in str(exc.value)


def test_cli_accepts_the_upstream_file_with_notes(tmp_path, capsys):
    path = tmp_path / "lcm_sdxl_simple.yaml"
    path.write_text(SIMPLE)
    main(["train", "--config", str(path), "--print-config"])
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["training"]["gradient_accumulation_steps"] == 32
    assert "note: upstream key training.negative_prompt ignored: the LCM UNet runs without CFG" in out.err
    assert len([ln for ln in out.err.splitlines() if ln.startswith("note: upstream key")]) == 5
