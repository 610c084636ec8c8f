"""FLOP counting: hand-computed ops, the MV branch against a direct formula, the tiny UNet against torch's
own FlopCounterMode, and (slow) the full-size model against reference/deployment.md §6."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.flops import FlopCounter, achieved_fraction, count_unet, count_vae_decoder, floor_seconds


def test_hand_computed_ops():
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    lin = torch.nn.Linear(16, 32)
    c = FlopCounter()
    with c, torch.no_grad():
        conv(torch.zeros(1, 3, 16, 16))
        lin(torch.zeros(2, 5, 16))
        F.scaled_dot_product_attention(torch.zeros(2, 4, 10, 8), torch.zeros(2, 4, 12, 8), torch.zeros(2, 4, 12, 8))
        torch.matmul(torch.zeros(3, 4, 5), torch.zeros(3, 5, 6))
    assert c.by_op["conv"] == 2 * 8 * 16 * 16 * 3 * 3 * 3
    assert c.by_op["linear"] == 2 * 2 * 5 * 16 * 32
    assert c.by_op["sdpa"] == 2 * 2 * 4 * 10 * 12 * (8 + 8)
    assert c.by_op["matmul"] == 2 * 3 * 4 * 5 * 6
    assert c.counts["total"] == sum(c.by_op.values())


def test_grouped_and_strided_conv():
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
    c = FlopCounter()
    with c, torch.no_grad():
        conv(torch.zeros(1, 8, 16, 16))
    assert c.by_op["conv"] == 2 * 8 * 8 * 8 * (8 // 4) * 9


def test_row_attention_matches_formula():
    from mvz.models.attention import row_multiview_attention

    b, v, h, w, ch, heads = 2, 6, 4, 5, 16, 2
    q = torch.zeros(b * v, h * w, ch)
    c = FlopCounter()
    with c:
        row_multiview_attention(q, q, q, heads, v, h, w)
    # every one of the B·V·h·w queries attends V·w keys: QKᵀ + AV = 2 · 2 · C MACs per (query, key)
    assert c.by_op["sdpa"] == 4 * (b * v * h * w) * (v * w) * ch


def _mv_formula(cfg: dict, rows: int, views: int, lh: int, lw: int) -> tuple[int, int]:
    """(mv_proj, mv_attention) per UNet call from the config alone."""
    proj = attn = 0
    tl = cfg["transformer_layers_per_block"]
    n_levels = len(cfg["block_out_channels"])
    blocks = []  # (channels, level, count)
    for i, kind in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in kind:
            blocks.append((cfg["block_out_channels"][i], i, cfg["layers_per_block"] * tl[i]))
    blocks.append((cfg["block_out_channels"][-1], n_levels - 1, tl[-1]))  # mid block
    for j, kind in enumerate(cfg["up_block_types"]):
        i = n_levels - 1 - j
        if "CrossAttn" in kind:
            blocks.append((cfg["block_out_channels"][i], i, (cfg["layers_per_block"] + 1) * tl[i]))
    for ch, level, count in blocks:
        h, w = lh // 2**level, lw // 2**level
        tokens = rows * h * w
        proj += count * 4 * 2 * tokens * ch * ch
        attn += count * 4 * tokens * (views * w) * ch
    return proj, attn


def test_tiny_unet_counts_match_formula_and_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from bench.flops import _meta_unet
    from mvz.models.attention import MVSettings
    from mvz.models.tiny import tiny_unet_config

    cfg = tiny_unet_config()
    rows, views, lh, lw = 6, 6, 8, 8
    ours = count_unet(cfg, rows, views, lh, lw)
    proj, attn = _mv_formula(cfg, rows, views, lh, lw)
    assert ours["mv_proj"] == proj
    assert ours["mv_attention"] == attn
    unet = _meta_unet(cfg)
    with torch.device("meta"), FlopCounterMode(display=False) as fc, torch.no_grad():
        unet(torch.empty(rows, 4, lh, lw), torch.tensor([1.0]), encoder_hidden_states=torch.empty(rows, 77, 64),
             timestep_cond=torch.empty(rows, 32),
             added_cond_kwargs={"text_embeds": torch.empty(rows, 32), "time_ids": torch.empty(rows, 6)},
             cross_attention_kwargs=MVSettings(views, lh, lw).attention_kwargs())
    assert sum(ours.values()) == fc.get_total_flops()


def test_tiny_vae_matches_torch_flop_counter():
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    from mvz.models.tiny import tiny_vae_config

    ours = count_vae_decoder(tiny_vae_config(), 8, 8)
    with torch.device("meta"), FlopCounterMode(display=False) as fc, torch.no_grad():
        AutoencoderKL.from_config(tiny_vae_config()).decode(torch.empty(1, 4, 8, 8))
    assert ours == fc.get_total_flops() > 0


def test_floor_and_fraction():
    assert floor_seconds(2e12, 1.0) == pytest.approx(2.0)
    assert floor_seconds(1e12, None) is None
    assert achieved_fraction(1e12, 2.0, 1.0) == pytest.approx(0.5)
    assert achieved_fraction(1e12, None, 1.0) is None


@pytest.mark.slow
def test_full_size_matches_reference_floor():
    """reference/deployment.md §6: 3.64 TFLOP base UNet, 4.21 TFLOP/view with MV, 5.75 TFLOP VAE, at 768 px."""
    from mvz.models.specs import shipped_config

    u = count_unet(shipped_config("sdxl-lcm", "unet"), 6, 6, 96, 96)
    assert u["unet_base"] / 6 / 1e12 == pytest.approx(3.64, rel=0.005)
    assert sum(u.values()) / 6 / 1e12 == pytest.approx(4.21, rel=0.005)
    assert count_vae_decoder(shipped_config("sdxl-lcm", "vae"), 96, 96) / 1e12 == pytest.approx(5.75, rel=0.005)
