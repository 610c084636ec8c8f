import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from mvz.errors import CheckpointError
from mvz.models.cameras import CameraSet
from mvz.models.lora import LORA_FILENAME, load_lora, save_lora
from mvz.pipeline import MultiviewPipeline, TorchDenoiser

UPSTREAM_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "to_k_mv", "to_q_mv", "to_v_mv", "to_out_mv.0"]


def write_peft_lora(model, path, zero_b=False, seed=0):
    """A LoRA written by peft itself with the upstream LoraConfig, saved the way MVC-ZigAL saves it."""
    torch.manual_seed(seed)
    model.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=UPSTREAM_TARGETS))
    for name, p in model.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p) if zero_b else torch.nn.init.normal_(p, std=0.05)
    sd = get_peft_model_state_dict(model.unet)
    save_file({k: v.float().contiguous() for k, v in sd.items()}, str(path))
    model.unet.delete_adapters("default")
    return sd


def eps_of(model, seed=0):
    pipe = MultiviewPipeline(model)
    cond = pipe.prepare(["a teapot"], CameraSet(), 64, 64)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, 8, 8, generator=g)
    with torch.no_grad():
        return TorchDenoiser(model, 6)(x, torch.tensor([759.0]), *cond.args())


def test_upstream_peft_lora_loads_strictly_and_changes_output(tmp_path, fresh_tiny_model):
    model = fresh_tiny_model
    path = tmp_path / LORA_FILENAME
    sd = write_peft_lora(model, path)
    keys = list(load_file(str(path)))
    assert all(not k.startswith(("unet.", "base_model.")) and ".default." not in k for k in keys)
    assert any(".attn1.processor.to_out_mv.0.lora_A.weight" in k for k in keys)
    assert any(".attn2.to_k.lora_B.weight" in k for k in keys)
    before = eps_of(model)
    assert load_lora(model.unet, path) == 4
    # no missing / unexpected keys: our state dict is exactly the file's, values included
    from mvz.models.lora import lora_state_dict

    ours = lora_state_dict(model.unet)
    assert set(ours) == set(sd)
    for k in sd:
        torch.testing.assert_close(ours[k].float(), sd[k].float())
    after = eps_of(model)
    assert (after - before).abs().max() > 1e-4
    # scale 0 turns it off
    from mvz.models.lora import set_lora_scale

    set_lora_scale(model.unet, 0.0)
    torch.testing.assert_close(eps_of(model), before, rtol=1e-5, atol=1e-6)


def test_zero_b_lora_changes_nothing(tmp_path, fresh_tiny_model):
    model = fresh_tiny_model
    path = tmp_path / "zero.safetensors"
    write_peft_lora(model, path, zero_b=True)
    before = eps_of(model)
    load_lora(model.unet, path)
    torch.testing.assert_close(eps_of(model), before, rtol=0, atol=0)


def test_our_saved_lora_loads_through_peft(tmp_path, fresh_tiny_model):
    model = fresh_tiny_model
    src = tmp_path / "src.safetensors"
    write_peft_lora(model, src, seed=3)
    load_lora(model.unet, src)
    out = save_lora(model.unet, tmp_path / "ours" / LORA_FILENAME)
    ours = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in ours.values())
    # "theirs": a fresh UNet, add_adapter with the training config, set_peft_model_state_dict
    from mvz.models.loading import load_model

    other = load_model("tiny", device="cpu", dtype="fp32")
    other.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=UPSTREAM_TARGETS))
    result = set_peft_model_state_dict(other.unet, ours)
    assert not [k for k in (result.unexpected_keys or []) if "lora" in k]
    torch.testing.assert_close(eps_of(other), eps_of(model), rtol=1e-5, atol=1e-6)


def test_bad_lora_files_are_refused(tmp_path, fresh_tiny_model):
    model = fresh_tiny_model
    path = tmp_path / "good.safetensors"
    sd = write_peft_lora(model, path)
    k = sorted(sd)[0]
    missing = dict(sd)
    missing.pop(k)
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="1 missing"):
        load_lora(model.unet, tmp_path / "missing.safetensors")
    extra = dict(sd)
    extra["down_blocks.9.attn1.to_q.lora_A.weight"] = torch.zeros(4, 8)
    extra["down_blocks.9.attn1.to_q.lora_B.weight"] = torch.zeros(8, 4)
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected.*down_blocks.9"):
        load_lora(model.unet, tmp_path / "extra.safetensors")
    notlora = {"conv.weight": torch.zeros(2)}
    save_file(notlora, str(tmp_path / "notlora.safetensors"))
    with pytest.raises(CheckpointError, match="not a PEFT LoRA"):
        load_lora(model.unet, tmp_path / "notlora.safetensors")
    # the model is left without a half-loaded adapter
    assert not getattr(model.unet, "peft_config", None) or "default" not in model.unet.peft_config
