"""Strict loading of every model component, and the tiny preset written in the real SDXL key layouts."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mvz.errors import CheckpointError
from mvz.models.loading import load_model
from mvz.models.tiny import ensure_tiny_model
from mvz.paths import models_dir


@pytest.fixture(scope="module")
def tiny_folder():
    return ensure_tiny_model(models_dir() / "tiny")


def saved_keys(path) -> list[str]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def test_tiny_text_encoders_use_the_sdxl_key_layout(tiny_folder):
    te1 = saved_keys(tiny_folder / "text_encoder" / "model.safetensors")
    te2 = saved_keys(tiny_folder / "text_encoder_2" / "model.safetensors")
    assert all(k.startswith("text_model.") for k in te1), [k for k in te1 if not k.startswith("text_model.")][:3]
    for k in ("text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.final_layer_norm.weight"):
        assert k in te1 and k in te2
    assert [k for k in te2 if not k.startswith("text_model.")] == ["text_projection.weight"]
    assert "text_projection.weight" not in te1


def test_tiny_text_encoder_weights_are_the_files_weights(tiny_folder, tiny_model):
    mv = tiny_model
    for module, sub in ((mv.text_encoder, "text_encoder"), (mv.text_encoder_2, "text_encoder_2")):
        stored = load_file(str(tiny_folder / sub / "model.safetensors"))
        loaded = module.state_dict()
        assert len(stored) == len(loaded)
        for key, value in stored.items():
            name = key if key in loaded else key.removeprefix("text_model.")
            assert torch.equal(loaded[name], value), key


def _copy_model(tiny_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder, dst)
    return dst


def _edit(path, edit) -> None:
    sd = load_file(str(path))
    edit(sd)
    save_file(sd, str(path), metadata={"format": "pt"})


CASES = [
    ("text_encoder/model.safetensors", "drop", "text_model.final_layer_norm.bias", "text encoder", "missing"),
    ("text_encoder_2/model.safetensors", "drop", "text_projection.weight", "second text encoder", "missing"),
    ("text_encoder_2/model.safetensors", "add", "text_model.extra.weight", "second text encoder", "unexpected"),
    ("unet/diffusion_pytorch_model.safetensors", "drop", "conv_out.bias", "UNet", "missing"),
    ("vae/diffusion_pytorch_model.safetensors", "add", "decoder.extra.weight", "VAE", "unexpected"),
    ("vae/diffusion_pytorch_model.safetensors", "shape", "decoder.conv_out.bias", "VAE", ""),
]


@pytest.mark.parametrize(("file", "how", "key", "what", "kind"), CASES, ids=[f"{c[3]}-{c[1]}" for c in CASES])
def test_component_with_a_key_mismatch_is_refused(tiny_folder, tmp_path, file, how, key, what, kind):
    folder = _copy_model(tiny_folder, tmp_path)

    def edit(sd):
        if how == "drop":
            sd.pop(key)
        elif how == "add":
            sd[key] = torch.zeros(2)
        else:
            sd[key] = torch.zeros(sd[key].numel() + 1)

    _edit(folder / file, edit)
    with pytest.raises(CheckpointError) as err:
        load_model(str(folder), device="cpu", dtype="fp32")
    message = str(err.value)
    assert what in message and str(folder) in message
    assert key.removeprefix("text_model.") in message
    if kind:
        assert kind in message


def test_text_encoder_in_the_transformers5_default_layout_still_loads(tiny_folder, tmp_path, tiny_model):
    """Files without the ``text_model.`` prefix (what transformers 5 writes by default) load with the same weights."""
    folder = _copy_model(tiny_folder, tmp_path)
    path = folder / "text_encoder" / "model.safetensors"
    _edit(path, lambda sd: sd.update({k.removeprefix("text_model."): sd.pop(k) for k in list(sd)}))
    a = load_model(str(folder), device="cpu", dtype="fp32").text_encoder.state_dict()
    b = tiny_model.text_encoder.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
