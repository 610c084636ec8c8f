"""The T2I-Adapter camera encoder (``full_adapter_xl``, 6 Plücker channels) and strict MV-Adapter loading."""

from __future__ import annotations

from pathlib import Path

import torch

from mvz.errors import CheckpointError, ModelNotFoundError
from mvz.models.attention import mv_processors
from mvz.state_dicts import check_state


def build_camera_adapter(unet_config, vae_scale_factor: int = 8):
    """``T2IAdapter(in_channels=6, channels=(c0, c1, c2, c2), num_res_blocks=2, downscale_factor=2·vae,
    adapter_type="full_adapter_xl")``: for SDXL (320, 640, 1280, 1280) and 16."""
    from diffusers import T2IAdapter

    ch = list(unet_config.block_out_channels)
    return T2IAdapter(
        in_channels=6,
        channels=[*ch, ch[-1]],
        num_res_blocks=2,
        downscale_factor=2 * vae_scale_factor,
        adapter_type="full_adapter_xl",
    )


def load_mvadapter_file(path: str | Path, unet, adapter) -> None:
    """Load ``mvadapter_t2mv_sdxl.safetensors`` into the installed MV processors and the camera adapter.

    Strict, unlike upstream (``strict=False``): every ``_mv`` key of the UNet and every ``adapter.`` key
    must be in the file with the right shape, and nothing else may be.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(
            f"MV-Adapter file {path} does not exist.",
            "Download mvadapter_t2mv_sdxl.safetensors from huanngzh/mv-adapter and pass --adapter PATH.",
        )
    try:
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"MV-Adapter file {path} is not a readable safetensors file ({exc}).") from None

    expected: dict[str, torch.Tensor] = {}
    for name, proc in mv_processors(unet).items():
        for k, v in proc.state_dict().items():
            expected[f"{name}.{k}"] = v
    expected.update(adapter.state_dict())
    check_state(sd, expected, f"MV-Adapter file {path} (for this UNet)",
                "Use the T2MV SDXL adapter (mvadapter_t2mv_sdxl.safetensors) with an SDXL-layout UNet.")
    for name, proc in mv_processors(unet).items():
        prefix = f"{name}."
        proc.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=True)
    adapter.load_state_dict({k: v for k, v in sd.items() if k.startswith("adapter.")}, strict=True)
