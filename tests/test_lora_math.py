"""LoRA arithmetic with alpha != rank (r 4, alpha 8): loading, scaling and fusion against the explicit
W' = W + scale·(alpha/r)·B·A written into a copy of the base weights."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.models.cameras import CameraSet
from mvz.models.lora import LORA_FILENAME, LORA_TARGETS, load_lora
from mvz.pipeline import MultiviewPipeline, TorchDenoiser

RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, tiny_model):
    """A LoRA made by peft (r 4, alpha 8, non-zero B), saved in the upstream layout with our alpha metadata."""
    m = copy.deepcopy(tiny_model)
    torch.manual_seed(0)
    m.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)))
    for name, p in m.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    sd = {k: v.float().contiguous() for k, v in get_peft_model_state_dict(m.unet).items()}
    path = tmp_path_factory.mktemp("lora") / LORA_FILENAME
    save_file(sd, str(path), metadata={"format": "pt", "lora_rank": str(RANK), "lora_alpha": str(ALPHA)})
    return path, sd


def explicit_weights(unet, sd, scale):
    """{'<module>.weight': W + scale·(alpha/r)·B@A} for every LoRA module, in float64 then float32."""
    out = {}
    for key in sd:
        if key.endswith(".lora_A.weight"):
            mod = key[: -len(".lora_A.weight")]
            w = unet.get_submodule(mod).weight.double()
            b, a = sd[f"{mod}.lora_B.weight"].double(), sd[key].double()
            out[f"{mod}.weight"] = (w + scale * (ALPHA / RANK) * (b @ a)).float()
    return out


def explicit_model(base, sd, scale):
    m = copy.deepcopy(base)
    with torch.no_grad():
        for name, w in explicit_weights(base.unet, sd, scale).items():
            m.unet.get_parameter(name).copy_(w)
    return m


def eps_of(model):
    pipe = MultiviewPipeline(model)
    cond = pipe.prepare(["a teapot"], CameraSet(), 64, 64)
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return TorchDenoiser(model, 6)(x, torch.tensor([759.0]), *cond.args())


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_loaded_lora_equals_explicit_weights(tiny_model, lora_file, scale):
    path, sd = lora_file
    m = copy.deepcopy(tiny_model)
    assert load_lora(m.unet, path, scale=scale) == RANK
    ref = eps_of(explicit_model(tiny_model, sd, scale))
    base = eps_of(tiny_model)
    assert (ref - base).abs().max() > 1e-3  # the LoRA matters at this size
    torch.testing.assert_close(eps_of(m), ref, rtol=1e-4, atol=1e-5)


def test_load_model_lora_scale_scales(tiny_model, lora_file):
    from mvz.models.loading import load_model

    path, sd = lora_file
    half = load_model("tiny", device="cpu", dtype="fp32", lora=str(path), lora_scale=0.5)
    assert half.info.lora_scale == 0.5
    torch.testing.assert_close(eps_of(half), eps_of(explicit_model(tiny_model, sd, 0.5)), rtol=1e-4, atol=1e-5)
    assert (eps_of(half) - eps_of(explicit_model(tiny_model, sd, 1.0))).abs().max() > 1e-3


@pytest.mark.parametrize("source", ["file", "peft_layers"])
def test_fusion_equals_explicit_weights(tiny_model, lora_file, source):
    from export.fuse import fused_unet

    path, sd = lora_file
    if source == "file":
        fused = fused_unet(tiny_model.unet, lora_path=path, scale=0.5)
    else:
        m = copy.deepcopy(tiny_model)
        load_lora(m.unet, path, scale=0.5)
        fused = fused_unet(m.unet)
    want = explicit_weights(tiny_model.unet, sd, 0.5)
    params = dict(fused.named_parameters())
    assert set(want) <= set(params)
    for name, w in want.items():
        torch.testing.assert_close(params[name], w, rtol=1e-5, atol=1e-6, msg=name)
    # everything else is the base weight, untouched
    base = dict(tiny_model.unet.named_parameters())
    for name, p in params.items():
        if name not in want:
            assert torch.equal(p, base[name]), name


def test_generate_cli_lora_scale_reaches_the_pixels(tmp_path, tiny_model, lora_file):
    """`mvz generate --lora-scale 0.5` gives the image of the explicit half-scale weights, not of scale 1."""
    import numpy as np
    from PIL import Image

    from mvz.cli import main
    from mvz.pipeline import images_to_grid

    path, sd = lora_file
    out = tmp_path / "half.png"
    main(["generate", "a cat", "--model", "tiny", "--lora", str(path), "--lora-scale", "0.5", "--seed", "1",
          "--steps", "2", "--out", str(out), "--device", "cpu", "--dtype", "fp32"])
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)

    def grid(scale):
        with torch.no_grad():
            imgs = MultiviewPipeline(explicit_model(tiny_model, sd, scale)).sample(["a cat"], [1], steps=2).images
        return np.asarray(images_to_grid(imgs[0])).astype(int)

    half, full = grid(0.5), grid(1.0)
    assert np.abs(full - half).max() >= 3  # the two scales are distinguishable in 8-bit pixels
    assert np.abs(got - half).max() <= 1
