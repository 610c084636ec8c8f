"""Image checks and preprocessing in torch (no torchvision): resize, normalise.

One convention for all four rewards, MVC-ZigAL's tensor wrappers' (``resize(images, [224, 224])``): each
view is resized to the model's square input, never cropped, so a non-square view is squashed. Constants are
each model's own (``docs/rewards.md``, *Images*).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mvz.errors import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images: torch.Tensor, prompts, what: str = "reward") -> tuple[int, int]:
    """Validate ``images`` ``[B, V, 3, H, W]`` and ``prompts`` (B strings); returns (B, V)."""
    if not isinstance(images, torch.Tensor):
        raise InputError(f"{what}: images must be a torch tensor [B, V, 3, H, W], got {type(images).__name__}.")
    if images.ndim != 5:
        raise InputError(
            f"{what}: images must have shape [B, V, 3, H, W], got {list(images.shape)}.",
            "Stack the views of each prompt along dim 1.",
        )
    b, v, c, h, w = images.shape
    if c != 3:
        raise InputError(f"{what}: images must have 3 (RGB) channels, got {c}.", "Convert the images to RGB.")
    if h < 8 or w < 8:
        raise InputError(f"{what}: images of {h}x{w} pixels are too small.", "Pass views of at least 8x8 pixels.")
    if not images.is_floating_point():
        raise InputError(f"{what}: images must be float in [0, 1], got {images.dtype}.", "Divide uint8 by 255.")
    if isinstance(prompts, str):
        raise InputError(f"{what}: prompts must be a list of {b} strings, got one string.", "Wrap it in a list.")
    if len(prompts) != b:
        raise InputError(f"{what}: got {len(prompts)} prompts for {b} image sets.", "Pass one prompt per set.")
    return b, v


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize ``[N, 3, H, W]`` to ``size`` (antialiased like PIL / torchvision's tensor Resize)."""
    if isinstance(size, int):
        size = (size, size)
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    align = None if mode in ("nearest", "area") else False
    return F.interpolate(x, size=size, mode=mode, align_corners=align, antialias=mode in ("bilinear", "bicubic"))


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def clip_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """PickScore / HPSv2 / ImageReward: resize to ``size x size`` (bicubic), CLIP mean/std.
    ``x``: ``[N, 3, H, W]`` in [0, 1]."""
    return normalize(resize(x.float(), size, "bicubic"), CLIP_MEAN, CLIP_STD)


# ImageReward's own package centre-crops a non-square PIL image (Resize(shorter side) + CenterCrop); mvz
# follows MVC-ZigAL's tensor wrappers for all four rewards instead: every view is resized to the square model
# input without a crop. For square views (all MV-Adapter output) both give the same pixels.
blip_preprocess = clip_preprocess


def hyperscore_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    """HyperScore: each view resized to ``size`` (bilinear, as MVC-ZigAL's wrapper), ImageNet mean/std."""
    return normalize(resize(x.float(), size, "bilinear"), IMAGENET_MEAN, IMAGENET_STD)
