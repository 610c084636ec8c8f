"""Model presets and where their components come from.

* ``tiny``: a complete model with random weights and tiny dimensions, written to
  ``$MVZ_HOME/models/tiny`` in the real formats and loaded back through the real loaders.
* ``sdxl-lcm``: the paper's model: SDXL base text encoders/tokenizers, the full LCM-SDXL UNet, the
  fp16-fix VAE and the MV-Adapter T2MV weights, resolved offline-first (an assembled folder under
  ``$MVZ_HOME/models/sdxl-lcm``, else the Hugging Face cache).
* any path to an assembled folder (``unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/
  scheduler/ mvadapter_t2mv_sdxl.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

ADAPTER_FILENAME = "mvadapter_t2mv_sdxl.safetensors"
MODEL_CARD = "mvz_model.json"  # our small descriptor inside an assembled folder


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    subfolder: str | None = None  # None: the component sits at the repo root
    filename: str | None = None  # for single-file components (the adapter)


@dataclass(frozen=True)
class PresetSpec:
    name: str
    default_resolution: int
    base: HubSource | None = None
    unet: HubSource | None = None
    vae: HubSource | None = None
    adapter: HubSource | None = None
    configs: str | None = None  # prefix of the shipped full-size configs for --random-weights


SDXL_LCM = PresetSpec(
    name="sdxl-lcm",
    default_resolution=768,
    base=HubSource("stabilityai/stable-diffusion-xl-base-1.0"),
    unet=HubSource("latent-consistency/lcm-sdxl"),
    vae=HubSource("madebyollin/sdxl-vae-fp16-fix"),
    adapter=HubSource("huanngzh/mv-adapter", filename=ADAPTER_FILENAME),
    configs="sdxl-lcm",
)

TINY = PresetSpec(name="tiny", default_resolution=64)

PRESETS: dict[str, PresetSpec] = {"tiny": TINY, "sdxl-lcm": SDXL_LCM}


def shipped_config(prefix: str, component: str) -> dict:
    """A full-size component config shipped with mvz (``mvz/models/configs/<prefix>_<component>.json``)."""
    text = resources.files("mvz.models").joinpath("configs").joinpath(f"{prefix}_{component}.json").read_text()
    return json.loads(text)
