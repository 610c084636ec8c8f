"""Reward models on the tiny checkpoints (original formats): converters, independent evaluations, API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

# the normalisation constants as another library ships them (transformers' image processors)
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from mvz.errors import CheckpointError, InputError, ModelNotFoundError
from mvz.rewards import RewardOutput, load_reward
from mvz.rewards import preprocess as pp

PROMPTS = ["a red chair", "a blue toy robot on a white background"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("mvz_home")
    mp.setenv("MVZ_HOME", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def rewards(home):
    return {n: load_reward(n, preset="tiny", device="cpu") for n in ("pickscore", "hpsv2", "imagereward", "hyperscore")}


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 6, 3, 64, 64, generator=g)


# ------------------------------------------------------------------------------------------- plain references


def _ln(x, sd, p, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps=eps)


def _mha(q, k, v, heads, mask=None):
    b, lq, d = q.shape
    hd = d // heads
    q, k, v = (t.reshape(b, t.shape[1], heads, hd).transpose(1, 2) for t in (q, k, v))
    a = q @ k.transpose(-1, -2) / math.sqrt(hd)
    if mask is not None:
        a = a + mask
    return (a.softmax(-1) @ v).transpose(1, 2).reshape(b, lq, d)


def _quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


def _oc_block(x, sd, p, heads, act, mask=None):
    """One open_clip / OpenAI residual attention block, written out."""
    h = _ln(x, sd, p + "ln_1")
    q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, -1)
    x = x + _mha(q, k, v, heads, mask) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = act(_ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def _layers(sd, prefix):
    return 1 + max(int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix))


def oc_visual(px, sd, heads, act):
    """open_clip VisionTransformer: returns ln_post(all tokens) @ proj, (N, 1+P, E)."""
    w = sd["visual.conv1.weight"]
    x = F.conv2d(px, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(_layers(sd, "visual.transformer.resblocks.")):
        x = _oc_block(x, sd, f"visual.transformer.resblocks.{i}.", heads, act)
    return _ln(x, sd, "visual.ln_post") @ sd["visual.proj"]


def oc_text(emb, sd, heads, act):
    """open_clip text transformer on token embeddings: ln_final(all tokens) @ text_projection."""
    x = emb + sd["positional_embedding"]
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    for i in range(_layers(sd, "transformer.resblocks.")):
        x = _oc_block(x, sd, f"transformer.resblocks.{i}.", heads, act, mask)
    return _ln(x, sd, "ln_final") @ sd["text_projection"]


# ---------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_constants_match_transformers():
    assert pp.CLIP_MEAN == pytest.approx(OPENAI_CLIP_MEAN, rel=0, abs=0)
    assert pp.CLIP_STD == pytest.approx(OPENAI_CLIP_STD, rel=0, abs=0)
    assert pp.IMAGENET_MEAN == pytest.approx(IMAGENET_DEFAULT_MEAN, rel=0, abs=0)
    assert pp.IMAGENET_STD == pytest.approx(IMAGENET_DEFAULT_STD, rel=0, abs=0)


@pytest.mark.parametrize("fn,mean,std", [(pp.clip_preprocess, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                                         (pp.blip_preprocess, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                                         (pp.hyperscore_preprocess, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
def test_preprocess_normalises_and_resizes(fn, mean, std):
    x = torch.full((2, 3, 48, 48), 0.25)
    y = fn(x, 224)
    assert y.shape == (2, 3, 224, 224)
    for c in range(3):
        assert torch.allclose(y[:, c], torch.full_like(y[:, c], (0.25 - mean[c]) / std[c]), atol=1e-5)


def test_resize_is_bicubic_antialiased_and_identity_at_size():
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(pp.resize(x, 64), x)
    ref = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(pp.resize(x, 32), ref)
    # non-square views are squashed to the square input (MVC-ZigAL's tensor wrappers), never centre-cropped:
    # the left and right quarters of a wide view still reach the reward
    wide = torch.zeros(1, 3, 40, 80)
    wide[..., :20] = 1.0
    out = pp.clip_preprocess(wide, 32)
    ref = pp.normalize(F.interpolate(wide, size=(32, 32), mode="bicubic", align_corners=False, antialias=True),
                       pp.CLIP_MEAN, pp.CLIP_STD)
    assert out.shape[-2:] == (32, 32) and torch.allclose(out, ref, atol=1e-6)


# --------------------------------------------------------------------------------------------------- HPSv2


def test_hpsv2_converter_maps_every_key(rewards):
    from mvz.rewards.hpsv2 import hps_state_dict

    r = rewards["hpsv2"]
    state = hps_state_dict(torch.load(r.checkpoint, weights_only=True))
    assert set(r.key_mapping) == set(state)
    targets = [t for ts in r.key_mapping.values() for t in ts]
    assert len(targets) == len(set(targets))
    assert set(targets) == set(r.model.state_dict())


def test_hpsv2_matches_plain_open_clip_forward(rewards, images):
    from mvz.rewards.hpsv2 import hps_state_dict, read_arch

    r = rewards["hpsv2"]
    sd = hps_state_dict(torch.load(r.checkpoint, weights_only=True))
    arch = read_arch(__import__("pathlib").Path(r.checkpoint))
    vheads = sd["visual.conv1.weight"].shape[0] // arch["vision_cfg"]["head_width"]
    flat = images.reshape(-1, 3, 64, 64)
    img = oc_visual(pp.clip_preprocess(flat, r.image_size), sd, vheads, F.gelu)[:, 0]
    ids = r.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    txt = oc_text(sd["token_embedding.weight"][ids], sd, arch["text_cfg"]["heads"], F.gelu)
    txt = txt[torch.arange(2), ids.argmax(-1)]
    img, txt = F.normalize(img, dim=-1).reshape(2, 6, -1), F.normalize(txt, dim=-1)
    expected = torch.einsum("bvd,bd->bv", img, txt)
    out = r.score(images, PROMPTS)
    assert torch.allclose(out.per_view, expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------- PickScore


def test_pickscore_is_cosine_without_logit_scale(rewards, images):
    r = rewards["pickscore"]
    flat = images.reshape(-1, 3, 64, 64)
    enc = r.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        logits = r.model(input_ids=enc["input_ids"].repeat_interleave(6, 0),
                         attention_mask=enc["attention_mask"].repeat_interleave(6, 0),
                         pixel_values=pp.clip_preprocess(flat, r.image_size)).logits_per_image
    expected = (logits.diagonal() / r.model.logit_scale.exp()).reshape(2, 6)
    out = r.score(images, PROMPTS)
    assert torch.allclose(out.per_view, expected, atol=1e-5)
    assert torch.allclose(out.per_set, expected.mean(1), atol=1e-6)


# --------------------------------------------------------------------------------------------- ImageReward


def test_imagereward_converter_maps_every_key(rewards):
    r = rewards["imagereward"]
    state = torch.load(r.checkpoint, weights_only=True)
    assert set(r.key_mapping) == set(state)
    vis = {t[len("vision:"):] for ts in r.key_mapping.values() for t in ts if t.startswith("vision:")}
    txt = {t[len("text:"):] for ts in r.key_mapping.values() for t in ts if t.startswith("text:")}
    assert vis == set(r.visual.state_dict())
    assert txt == set(r.text.state_dict())
    ignored = sorted(k for k, v in r.key_mapping.items() if not v)
    assert ignored == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias", "blip.text_proj.weight",
                       "blip.vision_proj.bias", "blip.vision_proj.weight"]


def _bert_attn(x, kv, sd, p, heads, mask):
    q = x @ sd[p + "self.query.weight"].T + sd[p + "self.query.bias"]
    k = kv @ sd[p + "self.key.weight"].T + sd[p + "self.key.bias"]
    v = kv @ sd[p + "self.value.weight"].T + sd[p + "self.value.bias"]
    o = _mha(q, k, v, heads, mask) @ sd[p + "output.dense.weight"].T + sd[p + "output.dense.bias"]
    return _ln(o + x, sd, p + "output.LayerNorm", eps=1e-12)


def test_imagereward_matches_plain_blip(rewards, images):
    import json
    from pathlib import Path

    from mvz.rewards.imagereward import MEAN, STD

    r = rewards["imagereward"]
    sd = torch.load(r.checkpoint, weights_only=True)
    med = json.loads((Path(r.checkpoint).parent / "med_config.json").read_text())
    v = {k[len("blip.visual_encoder."):]: t for k, t in sd.items() if k.startswith("blip.visual_encoder.")}
    t = {k[len("blip.text_encoder."):]: x for k, x in sd.items() if k.startswith("blip.text_encoder.")}
    flat = images.reshape(-1, 3, 64, 64)
    px = pp.blip_preprocess(flat, r.image_size)
    w = v["patch_embed.proj.weight"]
    x = F.conv2d(px, w, v["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([v["cls_token"].expand(x.shape[0], 1, -1), x], 1) + v["pos_embed"]
    vheads = x.shape[-1] // 64
    for i in range(_layers(v, "blocks.")):
        p = f"blocks.{i}."
        h = _ln(x, v, p + "norm1", 1e-6)
        q, k, vv = (h @ v[p + "attn.qkv.weight"].T + v[p + "attn.qkv.bias"]).chunk(3, -1)
        x = x + _mha(q, k, vv, vheads) @ v[p + "attn.proj.weight"].T + v[p + "attn.proj.bias"]
        h = F.gelu(_ln(x, v, p + "norm2", 1e-6) @ v[p + "mlp.fc1.weight"].T + v[p + "mlp.fc1.bias"])
        x = x + h @ v[p + "mlp.fc2.weight"].T + v[p + "mlp.fc2.bias"]
    img = _ln(x, v, "norm", 1e-6)
    prompts = [p for p in PROMPTS for _ in range(6)]
    enc = r.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    y = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = _ln(y, t, "embeddings.LayerNorm", 1e-12)
    mask = ((1.0 - am[:, None, None, :].float()) * -1e9)
    for i in range(_layers(t, "encoder.layer.")):
        p = f"encoder.layer.{i}."
        y = _bert_attn(y, y, t, p + "attention.", med["num_attention_heads"], mask)
        y = _bert_attn(y, img, t, p + "crossattention.", med["num_attention_heads"], None)
        h = F.gelu(y @ t[p + "intermediate.dense.weight"].T + t[p + "intermediate.dense.bias"])
        y = _ln(h @ t[p + "output.dense.weight"].T + t[p + "output.dense.bias"] + y, t, p + "output.LayerNorm", 1e-12)
    z = y[:, 0]
    for i in (0, 2, 4, 6, 7):  # no non-linearities
        z = z @ sd[f"mlp.layers.{i}.weight"].T + sd[f"mlp.layers.{i}.bias"]
    expected = ((z.squeeze(-1) - MEAN) / STD).reshape(2, 6)
    assert MEAN == 0.16717362830052426 and STD == 1.0333394966054072
    out = r.score(images, PROMPTS)
    assert torch.allclose(out.per_view, expected, atol=1e-4)


# ---------------------------------------------------------------------------------------------- HyperScore


def test_hyperscore_converter_maps_every_key(rewards):
    r = rewards["hyperscore"]
    state = torch.load(r.checkpoint, weights_only=True)
    assert set(r.key_mapping) == set(state)
    clip_targets = {t[len("clip:"):] for ts in r.key_mapping.values() for t in ts if t.startswith("clip:")}
    assert clip_targets == set(r.clip.state_dict())
    # text tensors and their text_encoder aliases land on the same CLIP keys
    assert r.key_mapping["clip_model.ln_final.weight"] == r.key_mapping["text_encoder.ln_final.weight"]


def hyperscore_plain(sd, tokenizer, images, prompts, head_width=16):
    """MATE-3D HyperScore written out from the state dict: CLIP, CoOp prompts, pooling, live hypernetwork."""
    from mvz.rewards.hyperscore import clip_tokenize

    c = {k[len("clip_model."):]: v for k, v in sd.items() if k.startswith("clip_model.")}
    te = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    tsd = {**c, **te}
    vheads = c["visual.conv1.weight"].shape[0] // head_width
    theads = c["token_embedding.weight"].shape[1] // head_width
    b, nv = images.shape[:2]
    px = pp.hyperscore_preprocess(images.reshape(b * nv, *images.shape[2:]), c["visual.conv1.weight"].shape[-1]
                                  * math.isqrt(c["visual.positional_embedding"].shape[0] - 1))
    P = oc_visual(px, c, vheads, _quick_gelu)[:, 1:].reshape(b, -1, c["visual.proj"].shape[1])
    ids, _ = clip_tokenize(tokenizer, prompts, 77)
    T = oc_text(c["token_embedding.weight"][ids], tsd, theads, _quick_gelu)
    e = T[torch.arange(b), ids.argmax(-1)]
    # CoOp "front": [SOS, class words, ctx, '.', EOS, pad]
    ctx, pre, suf = sd["prompt_learner.ctx"], sd["prompt_learner.token_prefix"], sd["prompt_learner.token_suffix"]
    names = ["alignment quality", "geometry quality", "texture quality", "overall quality"]
    n_ctx = ctx.shape[1]
    rows = []
    for i, name in enumerate(names):
        nl = len(tokenizer.encode(name, add_special_tokens=False))
        rows.append(torch.cat([pre[i], suf[i, :nl], ctx[i], suf[i, nl:]], 0))
    pids, _ = clip_tokenize(tokenizer, [" ".join(["X"] * n_ctx) + " " + n + "." for n in names], 77)
    Q = oc_text(torch.stack(rows), tsd, theads, _quick_gelu)[torch.arange(4), pids.argmax(-1)]
    s_tex = F.cosine_similarity(P[:, :, None, :], T[:, None, :, :], dim=-1)  # (B, VP, 77)
    s_cond = F.cosine_similarity(Q[None, :, None, :], T[:, None, :, :], dim=-1)  # (B, 4, 77)
    W = torch.softmax(s_tex @ s_cond.transpose(1, 2), dim=1)
    hin = sd["hypernet.fc1b_fc.weight"].shape[1]
    S = math.isqrt(sd["fc_condition.weight"].shape[0] // hin)
    Qd = sd["fc_quality.weight"].shape[0]
    f1, f2, f3 = (sd[f"hypernet.fc{j}b_fc.weight"].shape[0] for j in (1, 2, 3))
    scores = torch.zeros(b, 4)
    for k in range(4):
        v = (W[:, :, k:k + 1] * P).sum(1)
        q = (v * e) @ sd["fc_quality.weight"].T + sd["fc_quality.bias"]
        hf = (Q[k] @ sd["fc_condition.weight"].T + sd["fc_condition.bias"]).reshape(1, hin, S, S)
        pooled = hf.mean((2, 3))[0]
        for bi in range(b):  # hyperIQA-style: generate the target net per sample, then run it as 1x1 convs
            h = q[bi].reshape(1, Qd, 1, 1)
            for j, (fo, fi) in enumerate(((f1, Qd), (f2, f1), (f3, f2)), start=1):
                wj = F.conv2d(hf, sd[f"hypernet.fc{j}w_conv.weight"], sd[f"hypernet.fc{j}w_conv.bias"], padding=1)
                bj = pooled @ sd[f"hypernet.fc{j}b_fc.weight"].T + sd[f"hypernet.fc{j}b_fc.bias"]
                h = F.relu(F.conv2d(h, wj.reshape(fo, fi, 1, 1), bj))
            w4 = pooled @ sd["hypernet.fc4w_fc.weight"].T + sd["hypernet.fc4w_fc.bias"]
            b4 = pooled @ sd["hypernet.fc4b_fc.weight"].T + sd["hypernet.fc4b_fc.bias"]
            scores[bi, k] = F.conv2d(h, w4.reshape(1, f3, 1, 1), b4).flatten()[0]
    return scores


def test_hyperscore_matches_plain_evaluation(rewards, images):
    r = rewards["hyperscore"]
    sd = torch.load(r.checkpoint, weights_only=True)
    expected = hyperscore_plain(sd, r.tokenizer, images, PROMPTS)
    out = r.score(images, PROMPTS)
    assert out.per_view is None and r.kind == "per_set"
    assert list(out.sub_scores) == ["alignment", "geometry", "texture", "overall"]
    got = torch.stack([out.sub_scores[n] for n in ("alignment", "geometry", "texture", "overall")], 1)
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.equal(out.per_set, out.sub_scores["overall"])


def test_hyperscore_view_presentation(rewards, images):
    r = rewards["hyperscore"]
    try:
        r.set_views("ring4")
        a = r.score(images, PROMPTS)
        r.set_views((0, 2, 3, 4))
        c = r.score(images, PROMPTS)
        assert torch.allclose(a.per_set, c.per_set)
        r.set_views("native", white_background=True)
        grey = torch.full_like(images, 0.5)
        w = r.score(grey, PROMPTS)
        r.set_views("native")
        white = r.score(torch.ones_like(images), PROMPTS)
        assert torch.allclose(w.per_set, white.per_set)
        with pytest.raises(InputError):
            r.set_views("sideways")
    finally:
        r.set_views("native")


# --------------------------------------------------------------------------------------------- shared API


@pytest.mark.parametrize("name", ["pickscore", "hpsv2", "imagereward", "hyperscore"])
def test_deterministic_and_batched_equals_one_by_one(home, rewards, images, name):
    r = rewards[name]
    a, b = r.score(images, PROMPTS), r.score(images, PROMPTS)
    assert isinstance(a, RewardOutput) and a.per_set.shape == (2,) and a.per_set.dtype == torch.float32
    assert torch.equal(a.per_set, b.per_set)
    one = load_reward(name, preset="tiny", device="cpu", max_batch=1)  # one image per forward
    few = images[:, :3]
    batched = r.score(few, PROMPTS).per_set
    singles = torch.cat([one.score(few[i:i + 1], PROMPTS[i:i + 1]).per_set for i in range(2)])
    assert torch.allclose(batched, singles, atol=1e-5)
    if a.per_view is not None:
        assert a.per_view.shape == (2, 6)
    assert all(not p.requires_grad for p in getattr(r, "model", getattr(r, "clip", getattr(r, "visual", None))).parameters())


def test_tiny_is_idempotent(home, rewards):
    from mvz.rewards.tiny import ensure_tiny

    path = ensure_tiny("hyperscore")
    before = path.stat().st_mtime_ns
    assert ensure_tiny("hyperscore") == path and path.stat().st_mtime_ns == before


def test_overlong_prompt_truncates_and_says_so_once(home, images):
    long = " ".join(["chair"] * 120)
    for name in ("hpsv2", "imagereward", "hyperscore"):
        r = load_reward(name, preset="tiny", device="cpu")
        r.score(images[:1], [long])
        r.score(images[:1], [long])
        assert len(r.notices) == 1 and "truncated" in r.notices[0]


def test_bad_images_and_prompts(rewards):
    r = rewards["pickscore"]
    with pytest.raises(InputError, match="3 \\(RGB\\) channels"):
        r.score(torch.rand(1, 6, 4, 32, 32), ["x"])
    with pytest.raises(InputError, match="shape"):
        r.score(torch.rand(6, 3, 32, 32), ["x"])
    with pytest.raises(InputError, match="prompts"):
        r.score(torch.rand(2, 6, 3, 32, 32), ["x"])


def test_missing_checkpoint_names_file_and_source(home, tmp_path, monkeypatch):
    monkeypatch.setenv("MVZ_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(ModelNotFoundError, match="HPS_v2_compressed.pt.*xswu/HPSv2"):
        load_reward("hpsv2", device="cpu")
    with pytest.raises(ModelNotFoundError, match="model.pth.*MATE-3D"):
        load_reward("hyperscore", device="cpu")
    with pytest.raises(ModelNotFoundError, match="ImageReward.pt.*THUDM/ImageReward"):
        load_reward("imagereward", device="cpu")
    with pytest.raises(ModelNotFoundError, match="yuvalkirstain/PickScore_v1"):
        load_reward("pickscore", device="cpu")
    with pytest.raises(InputError, match="unknown reward"):
        load_reward("clipscore")


def test_wrong_model_and_missing_keys(home, rewards, tmp_path):
    import shutil
    from pathlib import Path

    hps = Path(rewards["hpsv2"].checkpoint)
    with pytest.raises(CheckpointError, match="unexpected key"):
        load_reward("hyperscore", hps, device="cpu")  # an open_clip file where MATE-3D's is expected
    sd = torch.load(rewards["hyperscore"].checkpoint, weights_only=True)
    del sd["hypernet.fc2b_fc.weight"]
    folder = tmp_path / "hs"
    shutil.copytree(Path(rewards["hyperscore"].checkpoint).parent, folder)
    torch.save(sd, folder / "model.pth")
    with pytest.raises(CheckpointError, match="hypernet.fc2b_fc.weight"):
        load_reward("hyperscore", folder / "model.pth", device="cpu")
    ir = torch.load(rewards["imagereward"].checkpoint, weights_only=True)
    del ir["mlp.layers.7.bias"]
    shutil.copytree(Path(rewards["imagereward"].checkpoint).parent, tmp_path / "ir")
    torch.save(ir, tmp_path / "ir" / "ImageReward.pt")
    with pytest.raises(CheckpointError, match="mlp.layers.7.bias"):
        load_reward("imagereward", tmp_path / "ir", device="cpu")
    with pytest.raises(CheckpointError, match="not a CLIP model|cannot read"):
        bad = tmp_path / "notclip"
        bad.mkdir()
        (bad / "config.json").write_text('{"model_type": "bert"}')
        load_reward("pickscore", bad, device="cpu")
