"""LoRA layouts: diffusers- and kohya-layout files written by the real savers load to the same weights as the PEFT
layout; ``mvz lora convert --to diffusers`` loads with diffusers' own loader; text-encoder and stray keys refused."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from train_helpers import one_thread  # noqa: F401  (autouse fixture)

from mvz.errors import CheckpointError
from mvz.models.lora import load_lora
from mvz.models.lora_formats import DIFFUSERS, KOHYA, PEFT, load_lora_any, read_lora, write_lora

RANK = 4
BASE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]  # what a style LoRA for SDXL touches
ALL_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "to_k_mv", "to_q_mv", "to_v_mv", "to_out_mv.0"]


_MADE: dict[tuple, dict[str, torch.Tensor]] = {}  # peft's injection is the slow part: make each LoRA once


def random_lora(tiny_model, targets, alpha=RANK, seed=0) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """A PEFT LoRA made by peft itself on a copy of the tiny UNet (non-zero B, so it changes the weights)."""
    config = LoraConfig(r=RANK, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets)
    key = (tuple(targets), seed)
    if key not in _MADE:
        unet = copy.deepcopy(tiny_model.unet)
        torch.manual_seed(seed)
        unet.add_adapter(config)
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
        _MADE[key] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}
    return {k: v.clone() for k, v in _MADE[key].items()}, config


def hand_deltas(sd, scales=None) -> dict[str, torch.Tensor]:
    """``scale·B·A`` per module, by hand."""
    scales = scales or {}
    out = {}
    for key, a in sd.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            out[module] = scales.get(module, 1.0) * sd[f"{module}.lora_B.weight"] @ a
    return out


def unet_deltas(unet, adapter) -> dict[str, torch.Tensor]:
    """What the UNet adds to each weight (PEFT's ``get_delta_weight``: ``(alpha/r)·B·A``)."""
    return {name: m.get_delta_weight(adapter).detach() for name, m in unet.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def assert_same_deltas(got, want):
    assert sorted(got) == sorted(want)
    for module in want:
        torch.testing.assert_close(got[module], want[module], rtol=1e-5, atol=1e-7)


def kohya_file(sd, alphas, path, extra=None):
    """A kohya/A1111 file from the published key rules: ``lora_unet_`` + module path with '.' -> '_',
    ``.lora_down.weight`` (A), ``.lora_up.weight`` (B), ``.alpha`` (a scalar)."""
    out = {}
    for key, a in sd.items():
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            name = "lora_unet_" + module.replace(".", "_")
            out[f"{name}.lora_down.weight"] = a.contiguous()
            out[f"{name}.lora_up.weight"] = sd[f"{module}.lora_B.weight"].contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(alphas[module]))
    out.update(extra or {})
    save_file(out, str(path))
    return path


def test_kohya_file_loads_to_the_same_weights_as_peft(tmp_path, tiny_model):
    sd, _ = random_lora(tiny_model, BASE_TARGETS)
    modules = sorted(k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight"))
    alphas = {m: (8.0 if i % 3 == 0 else 2.0) for i, m in enumerate(modules)}  # per-module alphas differ
    scales = {m: alphas[m] / RANK for m in modules}
    path = kohya_file(sd, alphas, tmp_path / "style_kohya.safetensors")

    lora = read_lora(path, unet_config=tiny_model.unet.config)
    assert lora.layout == KOHYA and lora.rank == RANK
    assert sorted(lora.state_dict) == sorted(sd)  # every module under its diffusers/PEFT name
    unet = copy.deepcopy(tiny_model.unet)
    assert load_lora_any(unet, path) == RANK
    assert_same_deltas(unet_deltas(unet, "default"), hand_deltas(sd, scales))


def test_kohya_sgm_block_names_map_with_the_unet_config(tmp_path, tiny_model):
    """kohya trains SDXL on the sgm UNet: down_blocks.1.attentions.0 is input_blocks_4_1 (layers_per_block 2)."""
    sd, _ = random_lora(tiny_model, ["to_q"])
    block = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    one = {f"{block}.lora_A.weight": sd[f"{block}.lora_A.weight"], f"{block}.lora_B.weight": sd[f"{block}.lora_B.weight"]}
    save_file({"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": one[f"{block}.lora_A.weight"],
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": one[f"{block}.lora_B.weight"]},
              str(tmp_path / "sgm.safetensors"))
    unet = copy.deepcopy(tiny_model.unet)
    load_lora_any(unet, tmp_path / "sgm.safetensors")
    assert_same_deltas(unet_deltas(unet, "default"), hand_deltas(one))


def test_diffusers_files_load_to_the_same_weights_as_peft(tmp_path, tiny_model):
    # (a) PEFT keys with diffusers' metadata (alpha 2r: scale 2), MV branch included, as save_lora_weights writes
    sd, config = random_lora(tiny_model, ALL_TARGETS, alpha=2 * RANK)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "a", unet_lora_layers=sd,
                                                unet_lora_adapter_metadata=config.to_dict())
    path_a = tmp_path / "a" / "pytorch_lora_weights.safetensors"
    assert all(k.startswith("unet.") for k in load_file(str(path_a)))
    lora = read_lora(path_a)
    assert lora.layout == DIFFUSERS and sorted(lora.state_dict) == sorted(sd)
    from_diffusers = copy.deepcopy(tiny_model.unet)
    load_lora_any(from_diffusers, path_a)
    # the same LoRA in the PEFT layout (alpha folded, as mvz saves it) through today's strict loader
    peft_path = tmp_path / "peft.safetensors"
    save_file({k: v * 2 if "lora_B" in k else v for k, v in sd.items()}, str(peft_path))
    from_peft = copy.deepcopy(tiny_model.unet)
    load_lora(from_peft, peft_path)
    want = hand_deltas(sd, dict.fromkeys(hand_deltas(sd), 2.0))
    assert_same_deltas(unet_deltas(from_diffusers, "default"), want)
    assert_same_deltas(unet_deltas(from_peft, "default"), want)

    # (b) diffusers' training scripts' spelling (convert_state_dict_to_diffusers: '.lora.down'/'.lora.up'), no metadata
    base, _ = random_lora(tiny_model, BASE_TARGETS, seed=1)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path / "b", unet_lora_layers=convert_state_dict_to_diffusers(base))
    path_b = tmp_path / "b" / "pytorch_lora_weights.safetensors"
    assert any(".lora.down.weight" in k for k in load_file(str(path_b)))
    unet = copy.deepcopy(tiny_model.unet)
    load_lora_any(unet, path_b)
    assert_same_deltas(unet_deltas(unet, "default"), hand_deltas(base))


def test_convert_to_diffusers_loads_with_diffusers_own_loader(tmp_path, tiny_model):
    """MV-Adapter's pipeline is a StableDiffusionXLPipeline: its load_lora_weights is lora_state_dict +
    load_lora_into_unet. Every key, the _mv ones included, must land in the UNet carrying the MV processors."""
    from mvz.cli import main

    sd, _ = random_lora(tiny_model, ALL_TARGETS, seed=2)
    assert any("attn1.processor.to_q_mv" in k for k in sd)
    src = tmp_path / "mvz_lora.safetensors"
    save_file(sd, str(src), metadata={"lora_alpha": str(2 * RANK)})  # mvz's file-level alpha: scale 2
    out = tmp_path / "out" / "for_diffusers.safetensors"
    main(["lora", "convert", str(src), str(out), "--to", "diffusers"])

    warnings = _DiffusersWarnings()
    state, alphas, metadata = StableDiffusionXLPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    unet = copy.deepcopy(tiny_model.unet)
    with warnings:
        StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, unet, adapter_name="mvz", metadata=metadata)
    assert not [w for w in warnings.messages if "unexpected" in w or "No LoRA keys" in w], warnings.messages
    assert sorted(get_peft_model_state_dict(unet, adapter_name="mvz")) == sorted(sd)
    reference = copy.deepcopy(tiny_model.unet)
    load_lora(reference, src)
    want = unet_deltas(reference, "default")
    assert_same_deltas(unet_deltas(unet, "mvz"), want)
    assert_same_deltas(want, hand_deltas(sd, dict.fromkeys(want, 2.0)))


def test_convert_kohya_to_upstream_and_back_through_peft(tmp_path, tiny_model):
    sd, _ = random_lora(tiny_model, BASE_TARGETS, seed=3)
    modules = [k.removesuffix(".lora_A.weight") for k in sd if k.endswith(".lora_A.weight")]
    kohya = kohya_file(sd, dict.fromkeys(modules, 1.0), tmp_path / "k.safetensors")  # alpha 1, rank 4: scale 1/4
    out = write_lora(read_lora(kohya), tmp_path / "up.safetensors", "upstream")
    back = read_lora(out)
    assert back.layout == PEFT and back.rank == RANK
    for key, value in sd.items():
        torch.testing.assert_close(back.state_dict[key], value / RANK if "lora_B" in key else value)


def test_text_encoder_loras_are_refused_naming_them(tmp_path, tiny_model):
    sd, _ = random_lora(tiny_model, BASE_TARGETS)
    te = {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(RANK, 8),
          "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(8, RANK)}
    kohya = kohya_file(sd, {k.removesuffix(".lora_A.weight"): 4.0 for k in sd if "lora_A" in k},
                       tmp_path / "te.safetensors", extra=te)
    with pytest.raises(CheckpointError, match=r"text-encoder keys \(text_encoder: lora_te1_text_model"):
        read_lora(kohya)
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "d", unet_lora_layers=sd,
        text_encoder_2_lora_layers={"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(RANK, 8),
                                    "text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, RANK)})
    unet = copy.deepcopy(tiny_model.unet)
    with pytest.raises(CheckpointError, match=r"text_encoder_2: text_encoder_2\.text_model.*UNet only"):
        load_lora_any(unet, tmp_path / "d" / "pytorch_lora_weights.safetensors")
    assert not getattr(unet, "peft_config", None)  # nothing half-loaded


def test_cli_refuses_a_text_encoder_lora_in_one_line(tmp_path, tiny_model, capsys):
    from mvz.cli import main

    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(RANK, 8),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.ones(8, RANK)},
              str(tmp_path / "te.safetensors"))
    with pytest.raises(SystemExit) as done:
        main(["lora", "convert", str(tmp_path / "te.safetensors"), str(tmp_path / "o.safetensors"), "--to", "upstream"])
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and err.count("\n") == 0 and "text_encoder_2" in err and err.startswith("error:")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("stray, why", [
    ({"lora_unet_not_a_module.lora_down.weight": torch.ones(RANK, 32),
      "lora_unet_not_a_module.lora_up.weight": torch.ones(32, RANK)}, "which is not in this UNet"),  # renames to nothing
    ({"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": torch.ones(RANK, 4)},
     "fit no LoRA module"),  # LoHa, beside a real module of the same name
    ({"model.diffusion_model.weight": torch.ones(2, 2)}, "fit no LoRA module"),  # not a LoRA key at all
])
def test_a_stray_kohya_key_is_refused_naming_it(tmp_path, tiny_model, stray, why):
    sd, _ = random_lora(tiny_model, BASE_TARGETS)
    path = kohya_file(sd, {k.removesuffix(".lora_A.weight"): 4.0 for k in sd if "lora_A" in k},
                      tmp_path / "stray.safetensors", extra=stray)
    unet = copy.deepcopy(tiny_model.unet)
    name = next(iter(stray)).split(".")[0]
    with pytest.raises(CheckpointError, match=f"{name}.*{why}|{why}.*{name}"):
        load_lora_any(unet, path)
    assert not getattr(unet, "peft_config", None)


def test_a_stray_diffusers_key_is_refused_naming_it(tmp_path, tiny_model):
    sd, _ = random_lora(tiny_model, ALL_TARGETS)
    sd["up_blocks.9.attentions.0.proj_in.lora_A.weight"] = torch.ones(RANK, 64)
    sd["up_blocks.9.attentions.0.proj_in.lora_B.weight"] = torch.ones(64, RANK)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=sd)
    unet = copy.deepcopy(tiny_model.unet)
    with pytest.raises(CheckpointError, match=r"unet\.up_blocks\.9\.attentions\.0\.proj_in\.lora_A\.weight maps to .* "
                                              r"not in this UNet"):
        load_lora_any(unet, tmp_path / "pytorch_lora_weights.safetensors")


def test_non_finite_kohya_weights_are_refused_naming_the_file_key(tmp_path, tiny_model):
    sd, _ = random_lora(tiny_model, ["to_q"])
    key = next(k for k in sd if "lora_B" in k)
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    path = kohya_file(sd, {k.removesuffix(".lora_A.weight"): 4.0 for k in sd if "lora_A" in k}, tmp_path / "n.safetensors")
    name = "lora_unet_" + key.removesuffix(".lora_B.weight").replace(".", "_") + ".lora_up.weight"
    with pytest.raises(CheckpointError, match=f"{name} holds NaN"):
        read_lora(path)


class _DiffusersWarnings(logging.Handler):
    """Collects what diffusers' loggers warn while active (they do not propagate to the root logger)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("diffusers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("diffusers").removeHandler(self)
