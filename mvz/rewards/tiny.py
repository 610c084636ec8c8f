"""``tiny`` reward checkpoints: random weights and tiny dimensions, written in each ORIGINAL format.

``$MVZ_HOME/rewards/tiny/<name>/`` holds, per reward:

* ``pickscore``: a Hugging Face CLIP folder (``config.json``, ``model.safetensors``) with its tokenizer files;
* ``hpsv2`` / ``hpsv2.1``: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` (``{"state_dict": <open_clip
  names>}``, other random weights per version) + ``open_clip_config.json``
  (open_clip's model-config format) + ``tokenizer/``;
* ``imagereward``: ``ImageReward.pt`` (BLIP names + ``mlp.layers.*``) + ``med_config.json`` + ``tokenizer/vocab.txt``;
* ``hyperscore``: ``model.pth`` (MATE-3D names) + ``hyperscore_config.json`` (head widths) + ``tokenizer/``.

The real converters and loaders read them. Writes are atomic; a ``tiny.json`` marker is written last, so
the call is idempotent and a killed write is redone.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mvz.atomic import atomic_write, save_safetensors, write_json, write_text
from mvz.models.tiny_tokenizer import clip_vocab_size, write_clip_tokenizer
from mvz.paths import rewards_dir

TINY_VERSION = 1
NAMES = ("pickscore", "hpsv2", "hpsv2.1", "imagereward", "hyperscore")
FILES = {
    "pickscore": "",
    "hpsv2": "HPS_v2_compressed.pt",
    "hpsv2.1": "HPS_v2.1_compressed.pt",
    "imagereward": "ImageReward.pt",
    "hyperscore": "model.pth",
}


def tiny_dir(name: str) -> Path:
    return rewards_dir() / "tiny" / name


def _save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda p: torch.save(obj, p))


class _Init:
    """Deterministic random tensors (own generator; global RNG untouched)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def w(self, *shape, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * std

    def ln(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return 1.0 + self.w(n, std=0.05), self.w(n, std=0.02)


def open_clip_state(seed: int, *, vision_width: int, vision_layers: int, patch: int, image: int, text_width: int,
                    text_layers: int, context: int, vocab: int, embed: int, mlp_ratio: int = 2) -> dict:
    """A random state dict in the open_clip / OpenAI CLIP layout."""
    r = _Init(seed)
    sd: dict[str, torch.Tensor] = {}

    def blocks(prefix: str, width: int, layers: int) -> None:
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            sd[b + "ln_1.weight"], sd[b + "ln_1.bias"] = r.ln(width)
            sd[b + "attn.in_proj_weight"] = r.w(3 * width, width, std=width**-0.5)
            sd[b + "attn.in_proj_bias"] = r.w(3 * width)
            sd[b + "attn.out_proj.weight"] = r.w(width, width, std=width**-0.5)
            sd[b + "attn.out_proj.bias"] = r.w(width)
            sd[b + "ln_2.weight"], sd[b + "ln_2.bias"] = r.ln(width)
            sd[b + "mlp.c_fc.weight"] = r.w(mlp_ratio * width, width, std=width**-0.5)
            sd[b + "mlp.c_fc.bias"] = r.w(mlp_ratio * width)
            sd[b + "mlp.c_proj.weight"] = r.w(width, mlp_ratio * width, std=(mlp_ratio * width) ** -0.5)
            sd[b + "mlp.c_proj.bias"] = r.w(width)

    grid = image // patch
    sd["visual.class_embedding"] = r.w(vision_width, std=0.5)
    sd["visual.positional_embedding"] = r.w(grid * grid + 1, vision_width, std=0.1)
    sd["visual.proj"] = r.w(vision_width, embed, std=vision_width**-0.5)
    sd["visual.conv1.weight"] = r.w(vision_width, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = r.ln(vision_width)
    blocks("visual.", vision_width, vision_layers)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = r.ln(vision_width)
    sd["token_embedding.weight"] = r.w(vocab, text_width, std=0.5)
    sd["positional_embedding"] = r.w(context, text_width, std=0.1)
    blocks("", text_width, text_layers)
    sd["ln_final.weight"], sd["ln_final.bias"] = r.ln(text_width)
    sd["text_projection"] = r.w(text_width, embed, std=text_width**-0.5)
    sd["logit_scale"] = torch.tensor(4.6052)
    return sd


# ---------------------------------------------------------------------------------------------- writers


def _write_pickscore(folder: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    write_clip_tokenizer(folder)
    vocab = clip_vocab_size()
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, hidden_act="gelu", projection_dim=16,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, hidden_act="gelu", projection_dim=16)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng():
        torch.manual_seed(101)
        model = CLIPModel(config)
        for p in model.parameters():  # default init leaves biases/LN trivial; make every weight matter
            p.data.add_(torch.randn_like(p) * 0.02)
    write_text(folder / "config.json", config.to_json_string())
    save_safetensors(folder / "model.safetensors", model.state_dict(), metadata={"format": "pt"})


def _write_hpsv2(folder: Path, filename: str = FILES["hpsv2"], seed: int = 202) -> None:
    tok = write_clip_tokenizer(folder / "tokenizer")
    assert tok
    arch = {"embed_dim": 16, "quick_gelu": False,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 77, "vocab_size": clip_vocab_size(), "width": 32, "heads": 2, "layers": 2}}
    write_json(folder / "open_clip_config.json", arch)
    sd = open_clip_state(seed, vision_width=32, vision_layers=2, patch=8, image=32, text_width=32, text_layers=2,
                         context=77, vocab=clip_vocab_size(), embed=16)
    _save_torch(folder / filename, {"state_dict": sd})


BERT_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789")
_WORDS = ["a", "the", "of", "and", "photo", "cat", "dog", "red", "blue", "green", "chair", "car", "house", "toy",
          "robot", "on", "with", "in", "white", "background", "3d", "model"]


def bert_vocab() -> list[str]:
    out = BERT_SPECIAL + _CHARS + list(".,!?'\"-:;()/&+*#%$@_") + ["##" + c for c in _CHARS]
    return out + [w for w in _WORDS if w not in out]


def _write_imagereward(folder: Path) -> None:
    tok = folder / "tokenizer"
    vocab = bert_vocab()
    write_text(tok / "vocab.txt", "\n".join(vocab) + "\n")
    write_json(tok / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                               "model_max_length": 512})
    vocab_size = len(vocab) + 2  # + [DEC], [ENC] as BLIP's init_tokenizer adds them
    vw, vlayers, patch, image, tw, tlayers, maxpos = 128, 2, 8, 32, 32, 2, 40
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": tw, "initializer_range": 0.02, "intermediate_size": 2 * tw,
           "layer_norm_eps": 1e-12, "max_position_embeddings": maxpos, "model_type": "bert",
           "num_attention_heads": 2, "num_hidden_layers": tlayers, "pad_token_id": 0, "type_vocab_size": 2,
           "vocab_size": vocab_size, "encoder_width": vw, "add_cross_attention": True}
    write_json(folder / "med_config.json", med)
    r = _Init(303)
    sd: dict[str, torch.Tensor] = {}
    v = "blip.visual_encoder."
    grid = image // patch
    sd[v + "cls_token"] = r.w(1, 1, vw, std=0.5)
    sd[v + "pos_embed"] = r.w(1, grid * grid + 1, vw, std=0.1)
    sd[v + "patch_embed.proj.weight"] = r.w(vw, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd[v + "patch_embed.proj.bias"] = r.w(vw)
    for i in range(vlayers):
        b = f"{v}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = r.ln(vw)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = r.w(3 * vw, vw, std=vw**-0.5), r.w(3 * vw)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = r.w(vw, vw, std=vw**-0.5), r.w(vw)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = r.ln(vw)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = r.w(2 * vw, vw, std=vw**-0.5), r.w(2 * vw)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = r.w(vw, 2 * vw, std=(2 * vw) ** -0.5), r.w(vw)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = r.ln(vw)
    t = "blip.text_encoder."
    sd[t + "embeddings.position_ids"] = torch.arange(maxpos).expand((1, -1)).clone()
    sd[t + "embeddings.word_embeddings.weight"] = r.w(vocab_size, tw, std=0.5)
    sd[t + "embeddings.position_embeddings.weight"] = r.w(maxpos, tw, std=0.1)
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = r.ln(tw)
    for i in range(tlayers):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", tw), ("crossattention", vw)):
            sd[b + f"{att}.self.query.weight"], sd[b + f"{att}.self.query.bias"] = r.w(tw, tw, std=tw**-0.5), r.w(tw)
            sd[b + f"{att}.self.key.weight"], sd[b + f"{att}.self.key.bias"] = r.w(tw, kv_in, std=kv_in**-0.5), r.w(tw)
            sd[b + f"{att}.self.value.weight"], sd[b + f"{att}.self.value.bias"] = r.w(tw, kv_in, std=kv_in**-0.5), r.w(tw)
            sd[b + f"{att}.output.dense.weight"], sd[b + f"{att}.output.dense.bias"] = r.w(tw, tw, std=tw**-0.5), r.w(tw)
            sd[b + f"{att}.output.LayerNorm.weight"], sd[b + f"{att}.output.LayerNorm.bias"] = r.ln(tw)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = r.w(2 * tw, tw, std=tw**-0.5), r.w(2 * tw)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = r.w(tw, 2 * tw, std=(2 * tw) ** -0.5), r.w(tw)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = r.ln(tw)
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = r.w(16, vw), r.w(16)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = r.w(16, tw), r.w(16)
    sizes = [tw, 24, 16, 8, 4, 1]  # the real head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1
    for (i, (fin, fout)) in zip((0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:], strict=True), strict=True):
        sd[f"mlp.layers.{i}.weight"] = r.w(fout, fin, std=fin**-0.5)
        sd[f"mlp.layers.{i}.bias"] = r.w(fout, std=0.1)
    _save_torch(folder / "ImageReward.pt", sd)


HYPER_TINY = {"n_ctx": 4, "quality": 16, "spatial": 2}


def _write_hyperscore(folder: Path) -> None:
    from transformers import CLIPTokenizer

    from mvz.rewards.hyperscore import HyperScoreConfig
    from mvz.rewards.text import clip_tokenize

    tok_dir = write_clip_tokenizer(folder / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    cfg = HyperScoreConfig(vision_head_width=16, text_head_width=16)
    write_json(folder / "hyperscore_config.json", {"vision_head_width": 16, "text_head_width": 16})
    tw, embed, context = 32, 16, 77
    clip = open_clip_state(404, vision_width=32, vision_layers=2, patch=8, image=32, text_width=tw, text_layers=2,
                           context=context, vocab=clip_vocab_size(), embed=embed)
    r = _Init(405)
    n_ctx, q, s = HYPER_TINY["n_ctx"], HYPER_TINY["quality"], HYPER_TINY["spatial"]
    k = len(cfg.classnames)
    ids, _ = clip_tokenize(tokenizer, [" ".join(["X"] * n_ctx) + " " + n + "." for n in cfg.classnames], context)
    emb = clip["token_embedding.weight"][ids]  # (K, L, W), as CoOp builds its buffers at init
    sd: dict[str, torch.Tensor] = {f"clip_model.{key}": t for key, t in clip.items()}
    sd["prompt_learner.ctx"] = r.w(k, n_ctx, tw, std=0.02)
    sd["prompt_learner.token_prefix"] = emb[:, :1, :].clone()
    sd["prompt_learner.token_suffix"] = emb[:, 1 + n_ctx:, :].clone()
    for key, t in clip.items():  # CoOp TextEncoder: aliases of the CLIP text tensors
        if key.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            sd[f"text_encoder.{key}"] = t
    hin, f1, f2, f3 = q // 2, q // 2, q // 4, q // 8
    sd["fc_quality.weight"], sd["fc_quality.bias"] = r.w(q, embed, std=embed**-0.5), r.w(q, std=0.1)
    sd["fc_condition.weight"], sd["fc_condition.bias"] = r.w(hin * s * s, embed, std=embed**-0.5), r.w(hin * s * s, std=0.1)
    for name, out_ch in (("fc1w_conv", f1 * q), ("fc2w_conv", f2 * f1), ("fc3w_conv", f3 * f2)):
        sd[f"hypernet.{name}.weight"] = r.w(out_ch // (s * s), hin, 3, 3, std=(hin * 9) ** -0.5)
        sd[f"hypernet.{name}.bias"] = r.w(out_ch // (s * s), std=0.1)
    for name, out in (("fc1b_fc", f1), ("fc2b_fc", f2), ("fc3b_fc", f3), ("fc4w_fc", f3), ("fc4b_fc", 1)):
        sd[f"hypernet.{name}.weight"], sd[f"hypernet.{name}.bias"] = r.w(out, hin, std=hin**-0.5), r.w(out, std=0.1)
    sd["hypernet.fc4b_fc.bias"] = sd["hypernet.fc4b_fc.bias"] + 5.0  # centre the MOS-like scale a little
    _save_torch(folder / "model.pth", sd)


_WRITERS = {"pickscore": _write_pickscore, "hpsv2": _write_hpsv2,
            "hpsv2.1": lambda folder: _write_hpsv2(folder, FILES["hpsv2.1"], seed=212), "imagereward": _write_imagereward,
            "hyperscore": _write_hyperscore}


def ensure_tiny(name: str) -> Path:
    """Write the tiny ``name`` checkpoint once; return the path to pass as ``checkpoint``."""
    if name not in _WRITERS:
        from mvz.errors import InputError

        raise InputError(f"no tiny preset for reward {name!r}.", f"Tiny rewards: {', '.join(NAMES)}.")
    folder = tiny_dir(name)
    marker = folder / "tiny.json"
    current = False
    if marker.is_file():
        try:
            current = json.loads(marker.read_text()).get("version") == TINY_VERSION
        except ValueError:
            current = False
    if not current:
        folder.mkdir(parents=True, exist_ok=True)
        _WRITERS[name](folder)
        write_json(marker, {"reward": name, "version": TINY_VERSION, "format": "original", "weights": "random"})
    return folder / FILES[name] if FILES[name] else folder
