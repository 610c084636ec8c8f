import pytest
import torch
import torch.nn.functional as F

from mvz.models.attention import MVSettings, row_multiview_attention


def naive_row_attention(q, k, v, heads, num_views, h, w):
    """Per (prompt, row): gather that row from every view and attend, one query at a time."""
    bv, _, c = q.shape
    d = c // heads
    out = torch.zeros_like(q)
    for b in range(bv // num_views):
        for i in range(h):
            keys = torch.cat([k[b * num_views + n, i * w : (i + 1) * w] for n in range(num_views)])  # (V·w, C)
            vals = torch.cat([v[b * num_views + n, i * w : (i + 1) * w] for n in range(num_views)])
            for n in range(num_views):
                qs = q[b * num_views + n, i * w : (i + 1) * w]  # (w, C)
                for hd in range(heads):
                    sl = slice(hd * d, (hd + 1) * d)
                    att = torch.softmax(qs[:, sl] @ keys[:, sl].T / d**0.5, dim=-1)
                    out[b * num_views + n, i * w : (i + 1) * w, sl] = att @ vals[:, sl]
    return out


def upstream_style_row_attention(q, k, v, heads, num_views, h, w):
    """The reference's formulation: K/V regrouped per row and repeat-interleaved N times on the batch axis."""
    bv, _, c = q.shape
    b = bv // num_views
    d = c // heads
    qq = q.reshape(b * num_views * h, w, heads, d).transpose(1, 2)
    kk = k.reshape(b, num_views, h, w, c).permute(0, 2, 1, 3, 4).reshape(b, h, num_views * w, heads, d)
    vv = v.reshape(b, num_views, h, w, c).permute(0, 2, 1, 3, 4).reshape(b, h, num_views * w, heads, d)
    kk = kk.repeat_interleave(num_views, dim=0).reshape(b * num_views * h, num_views * w, heads, d).transpose(1, 2)
    vv = vv.repeat_interleave(num_views, dim=0).reshape(b * num_views * h, num_views * w, heads, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(qq, kk, vv).transpose(1, 2).reshape(bv, h * w, c)
    return o


@pytest.mark.parametrize("b,v,h,w,heads", [(1, 6, 4, 4, 2), (2, 3, 2, 5, 4), (2, 1, 3, 3, 1)])
def test_row_attention_matches_naive_and_upstream(b, v, h, w, heads):
    torch.manual_seed(0)
    c = heads * 8
    q, k, vv = (torch.randn(b * v, h * w, c, dtype=torch.float64) for _ in range(3))
    fast = row_multiview_attention(q, k, vv, heads, v, h, w)
    torch.testing.assert_close(fast, naive_row_attention(q, k, vv, heads, v, h, w), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast, upstream_style_row_attention(q, k, vv, heads, v, h, w), rtol=1e-10, atol=1e-10)


def test_row_attention_only_mixes_same_row():
    torch.manual_seed(0)
    b, v, h, w, heads, c = 1, 4, 3, 3, 1, 8
    q, k, vv = (torch.randn(b * v, h * w, c) for _ in range(3))
    base = row_multiview_attention(q, k, vv, heads, v, h, w)
    k2, v2 = k.clone(), vv.clone()
    k2[2, 2 * w : 3 * w] += 5.0  # change row 2 of view 2
    v2[2, 2 * w : 3 * w] += 5.0
    changed = row_multiview_attention(q, k2, v2, heads, v, h, w)
    diff = (changed - base).abs().sum(-1)  # (V, h·w)
    rows = diff.reshape(v, h, w).sum(-1)
    assert torch.all(rows[:, 2] > 0), "row 2 of every view must see view 2's row 2"
    assert torch.all(rows[:, :2] == 0), "other rows must be untouched"


def test_grid_non_square_levels():
    s = MVSettings(num_views=6, latent_height=12, latent_width=8)
    assert s.grid(96) == (12, 8)
    assert s.grid(24) == (6, 4)
    assert s.grid(6) == (3, 2)
    with pytest.raises(ValueError):
        s.grid(7)


def test_zero_out_mv_equals_plain_unet(fresh_tiny_model):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from mvz.models.attention import mv_processors
    from mvz.pipeline import MultiviewPipeline, TorchDenoiser

    model = fresh_tiny_model
    pipe = MultiviewPipeline(model)
    cond = pipe.prepare(["a chair"], __import__("mvz.models.cameras", fromlist=["CameraSet"]).CameraSet(), 64, 64)
    x = torch.randn(6, 4, 8, 8)
    t = torch.tensor([999.0])
    den = TorchDenoiser(model, 6)
    with torch.no_grad():
        with_mv = den(x, t, *cond.args())
        for proc in mv_processors(model.unet).values():
            proc.to_out_mv[0].weight.zero_()
            proc.to_out_mv[0].bias.zero_()
        zeroed = den(x, t, *cond.args())
        model.unet.set_attn_processor(AttnProcessor2_0())
        plain = den(x, t, *cond.args())
    torch.testing.assert_close(zeroed, plain, rtol=1e-5, atol=1e-5)
    assert (with_mv - plain).abs().max() > 1e-4, "the tiny MV branch must matter"


# ---- the real processor, per-call settings ------------------------------------------------------------------


def _mv_attention_block(channels: int, heads: int, seed: int = 0):
    """A diffusers ``Attention`` (attn1-like) carrying our MV processor with random, non-zero MV weights."""
    from diffusers.models.attention_processor import Attention

    from mvz.models.attention import MVRowAttnProcessor

    torch.manual_seed(seed)
    attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads, bias=False).double()
    proc = MVRowAttnProcessor(channels, heads).double()
    for p in proc.parameters():
        torch.nn.init.normal_(p, std=0.3)
    attn.set_processor(proc)
    return attn, proc


def _reference_output(attn, proc, x, mv_scale, num_views, h, w):
    """diffusers' own SDPA processor for the base branch + the naive per-row loop for the MV branch."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    mine = attn.processor
    attn.set_processor(AttnProcessor2_0())
    base = attn(x)
    attn.set_processor(mine)
    rows = naive_row_attention(proc.to_q_mv(x), proc.to_k_mv(x), proc.to_v_mv(x), attn.heads, num_views, h, w)
    return base + mv_scale * proc.to_out_mv[0](rows)


@pytest.mark.parametrize("latent", [(64, 96), (96, 64)])
def test_processor_row_attention_non_square_levels_match_naive(latent):
    """Through diffusers' Attention.forward (which drops kwargs a processor does not name): 64x96 and 96x64
    latents at the /2, /4 and /8 UNet levels equal the per-row reference; the swapped grid does not."""
    from mvz.models.attention import MVSettings

    b, v, heads, c = 2, 3, 2, 16
    attn, proc = _mv_attention_block(c, heads)
    settings = MVSettings(num_views=v, latent_height=latent[0], latent_width=latent[1], mv_scale=0.7)
    swapped = MVSettings(num_views=v, latent_height=latent[1], latent_width=latent[0], mv_scale=0.7)
    with torch.no_grad():
        for factor in (2, 4, 8):
            h, w = latent[0] // factor, latent[1] // factor
            x = torch.randn(b * v, h * w, c, dtype=torch.float64)
            got = attn(x, **settings.attention_kwargs())
            want = _reference_output(attn, proc, x, 0.7, v, h, w)
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
            wrong = attn(x, **swapped.attention_kwargs())  # same token count, rows of the transposed grid
            assert (wrong - want).abs().max() > 1e-3, f"a swapped {w}x{h} grid must give other rows at /{factor}"


@pytest.mark.parametrize("bias", [False, True])
def test_fused_qkv_projection_equals_the_unfused_one(bias):
    """``fuse_projections`` (one GEMM for the six q/k/v projections) gives the unfused output, keeps the
    state-dict keys, and really runs (the Linear it replaces no longer counts)."""
    from diffusers.models.attention_processor import Attention

    from mvz.models.attention import MVRowAttnProcessor

    torch.manual_seed(1)
    c, heads, v, h, w = 16, 2, 3, 2, 4
    attn = Attention(query_dim=c, heads=heads, dim_head=c // heads, bias=bias).double()
    proc = MVRowAttnProcessor(c, heads).double()
    for p in proc.parameters():
        torch.nn.init.normal_(p, std=0.3)
    attn.set_processor(proc)
    kw = MVSettings(num_views=v, latent_height=h, latent_width=w, mv_scale=0.7).attention_kwargs()
    x = torch.randn(2 * v, h * w, c, dtype=torch.float64)
    keys = set(attn.state_dict())
    with torch.no_grad():
        ref = attn(x, **kw)
        proc.fuse_projections(attn)
        assert proc.fused_qkv.shape == (6 * c, c) and set(attn.state_dict()) == keys
        assert attn.to_k.weight.data_ptr() == proc.fused_qkv[c:].data_ptr()  # a view: no second copy
        torch.testing.assert_close(attn(x, **kw), ref, rtol=1e-12, atol=1e-12)
        view = proc.to_k_mv.weight  # the fused GEMM, not the Linear, computes the MV keys now
        proc.to_k_mv.weight = torch.nn.Parameter(torch.zeros_like(view))
        torch.testing.assert_close(attn(x, **kw), ref, rtol=1e-12, atol=1e-12)
        proc.to_k_mv.weight = view
        proc.unfuse_projections(attn)
        assert proc.fused_qkv is None
        torch.testing.assert_close(attn(x, **kw), ref, rtol=1e-12, atol=1e-12)


def test_processor_needs_the_per_call_settings():
    attn, _ = _mv_attention_block(8, 2)
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        attn(torch.randn(2, 6, 8, dtype=torch.float64))


def test_denoisers_over_one_unet_keep_their_own_views(tiny_model):
    """No shared state: a 3-view denoiser called in between does not change a 6-view denoiser's output."""
    from mvz.models.cameras import CameraSet
    from mvz.pipeline import MultiviewPipeline, TorchDenoiser

    cond = MultiviewPipeline(tiny_model).prepare(["a chair"], CameraSet.default(), 64, 64)
    x = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500.0])
    six, three = TorchDenoiser(tiny_model, 6), TorchDenoiser(tiny_model, 3)
    with torch.no_grad():
        before = six(x, t, *cond.args())
        other = three(x, t, *cond.args())
        after = six(x, t, *cond.args())
    assert torch.equal(before, after)
    assert (other - before).abs().max() > 1e-4, "3 views per prompt attend across other rows than 6 views"


def test_unet_wrappers_bake_their_own_grid(tiny_model):
    """Two export wrappers over one UNet each equal the torch denoiser at their own view count."""
    from export.wrappers import UNetWrapper, unet_example_inputs
    from mvz.pipeline import TorchDenoiser

    args = unet_example_inputs(tiny_model, torch.float32, 6, 64, 96)
    with torch.no_grad():
        for views in (6, 2):
            got = UNetWrapper(tiny_model.unet, views, 8, 12)(*args)
            torch.testing.assert_close(got, TorchDenoiser(tiny_model, views)(*args), rtol=0, atol=0)
