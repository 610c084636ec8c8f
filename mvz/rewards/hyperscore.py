"""HyperScore (MATE-3D): per-set quality scores [alignment, geometry, texture, overall] of a multiview set.

Loads MATE-3D's ``checkpoint/model.pth`` (``model.state_dict()`` with the original module names) strictly:

* ``clip_model.*`` (OpenAI CLIP ViT-B/16 layout) -> transformers ``CLIPModel`` by key mapping; the text tower
  is taken from its aliases ``text_encoder.*`` (identical tensors in the original);
* ``prompt_learner.{ctx, token_prefix, token_suffix}`` (CoOp, class-specific, "front" layout) are encoded
  once into the K condition embeddings ``c_k``;
* ``fc_condition`` + ``hypernet.*`` generate the target MLPs from ``c_k`` only, so they are **folded to
  constants** at load time (weights ``W1..W4``, biases ``b1..b4`` per condition);
* ``fc_quality`` stays a live layer.

Every size is read from tensor shapes; head widths, class names, activation and layout come from an
optional ``hyperscore_config.json`` beside the checkpoint (defaults: the MATE-3D values). Forward, per
reference section 5.3: patch tokens P (B, V*N, D), text tokens T (B, L, D) and EOT feature e, condition-aware
pooling W = softmax_patches(cos(P,T) @ cos(c,T)^T), v_k = sum_p W[p,k] P_p, u_k = v_k * e, q_k = fc_quality(u_k),
then the folded target MLP 1x1-conv stack (ReLU after the first three layers).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mvz.errors import CheckpointError, InputError, summarize_keys
from mvz.paths import rewards_dir
from mvz.rewards.base import RewardOutput, register_reward
from mvz.rewards.checkpoints import find_file, find_folder, load_torch_state, strip_prefix
from mvz.rewards.clip_convert import build_clip_config, convert_open_clip, load_clip_model, read_dims
from mvz.rewards.preprocess import check_images, hyperscore_preprocess
from mvz.rewards.runtime import ModelReward
from mvz.rewards.text import clip_tokenize

SUB_SCORES = ("alignment", "geometry", "texture", "overall")
SOURCE = ("MATE-3D (github.com/zhangyujie-1998/MATE-3D): checkpoint/model.pth, a manual download from the "
          "OneDrive link in its README")
TOKENIZER_REPOS = ("openai/clip-vit-base-patch16", "openai/clip-vit-large-patch14")
CONFIG_FILE = "hyperscore_config.json"
HYPER_LAYERS = ("fc1w_conv", "fc1b_fc", "fc2w_conv", "fc2b_fc", "fc3w_conv", "fc3b_fc", "fc4w_fc", "fc4b_fc")
TEXT_ALIASES = ("transformer.", "positional_embedding", "ln_final.", "text_projection")
# MV-Adapter T2MV views run in azimuth order 0/45/90/180/270/315; HyperScore was trained on
# front/right/back/left/top/bottom. "ring4" keeps azimuths 0/90/180/270 (= front/right/back/left).
VIEW_PRESETS = {"native": None, "ring4": (0, 2, 3, 4)}


@dataclass
class HyperScoreConfig:
    """Architecture facts not visible in tensor shapes (defaults: MATE-3D / OpenAI CLIP ViT-B/16)."""

    classnames: list[str] = field(default_factory=lambda: [f"{n} quality" for n in SUB_SCORES])
    class_token_position: str = "front"
    vision_head_width: int = 64  # OpenAI build_model: heads = width // 64
    text_head_width: int = 64
    hidden_act: str = "quick_gelu"  # OpenAI CLIP uses QuickGELU

    @classmethod
    def from_file(cls, path: Path) -> HyperScoreConfig:
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise CheckpointError(f"hyperscore: cannot parse {path}: {exc}.") from None
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise CheckpointError(f"hyperscore: unknown key(s) in {path}: {summarize_keys(unknown)}.")
        return cls(**data)


@dataclass
class HeadDims:
    embed: int  # D
    quality: int  # Q (224 in MATE-3D)
    hyper_in: int  # Q/2 channels of the hypernet input map
    spatial: int  # S (7)
    f1: int
    f2: int
    f3: int


def split_state(state: dict) -> tuple[dict, dict, dict[str, list[str]]]:
    """Partition a MATE-3D state dict: (open_clip-layout CLIP state, head tensors, mapping).

    ``mapping[original_key]`` names where each tensor goes (``clip:<CLIPModel key>`` or ``head:<name>``);
    the ``clip_model`` text tensors and their ``text_encoder`` aliases map to the same CLIP keys.
    """
    clip_sd, text_alias, head, unknown = {}, {}, {}, []
    origin: dict[str, list[str]] = {}
    for key, t in state.items():
        if key.startswith("clip_model."):
            clip_sd[key[len("clip_model."):]] = t
        elif key.startswith("text_encoder."):
            sub = key[len("text_encoder."):]
            if not sub.startswith(TEXT_ALIASES):
                unknown.append(key)
            text_alias[sub] = t
        elif key in ("prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix") or \
                re.match(r"^(fc_quality|fc_condition)\.(weight|bias)$", key) or \
                re.match(rf"^hypernet\.({'|'.join(HYPER_LAYERS)})\.(weight|bias)$", key):
            head[key] = t
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"hyperscore: {len(unknown)} unexpected key(s): {summarize_keys(unknown)}.",
                              "Is it MATE-3D's model.pth?")
    needed = ["prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix",
              "fc_quality.weight", "fc_quality.bias", "fc_condition.weight", "fc_condition.bias"]
    needed += [f"hypernet.{n}.{p}" for n in HYPER_LAYERS for p in ("weight", "bias")]
    missing = [k for k in needed if k not in head]
    text_keys = [k for k in clip_sd if k.startswith(TEXT_ALIASES)]
    missing += [f"text_encoder.{k}" for k in text_keys if k not in text_alias]
    missing += [f"clip_model.{k}" for k in text_alias if k not in clip_sd]
    if not clip_sd:
        missing.append("clip_model.*")
    if missing:
        raise CheckpointError(f"hyperscore: checkpoint is missing {len(missing)} key(s): {summarize_keys(missing)}.",
                              "Is it MATE-3D's model.pth?")
    merged = {**clip_sd, **text_alias}  # the text tower as the text encoder sees it
    for k in head:
        origin[k] = [f"head:{k}"]
    return merged, head, origin


def head_dims(head: dict) -> HeadDims:
    wq = head["fc_quality.weight"]
    hyper_in = head["hypernet.fc1b_fc.weight"].shape[1]
    s2 = head["fc_condition.weight"].shape[0] // hyper_in
    spatial = math.isqrt(s2)
    dims = HeadDims(embed=wq.shape[1], quality=wq.shape[0], hyper_in=hyper_in, spatial=spatial,
                    f1=head["hypernet.fc1b_fc.weight"].shape[0], f2=head["hypernet.fc2b_fc.weight"].shape[0],
                    f3=head["hypernet.fc3b_fc.weight"].shape[0])
    checks = [
        (spatial * spatial * hyper_in == head["fc_condition.weight"].shape[0], "fc_condition output is not (Q/2)*S^2"),
        (head["hypernet.fc1w_conv.weight"].shape[0] * s2 == dims.f1 * dims.quality, "fc1w_conv channels != f1*Q/S^2"),
        (head["hypernet.fc2w_conv.weight"].shape[0] * s2 == dims.f2 * dims.f1, "fc2w_conv channels != f2*f1/S^2"),
        (head["hypernet.fc3w_conv.weight"].shape[0] * s2 == dims.f3 * dims.f2, "fc3w_conv channels != f3*f2/S^2"),
        (tuple(head["hypernet.fc4w_fc.weight"].shape) == (dims.f3, hyper_in), "fc4w_fc is not hyper_in -> f3"),
        (head["hypernet.fc4b_fc.weight"].shape[0] == 1, "fc4b_fc does not output 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise CheckpointError(f"hyperscore: inconsistent head shapes: {msg}.")
    return dims


def fold_hypernet(cond: torch.Tensor, head: dict, dims: HeadDims) -> dict[str, torch.Tensor]:
    """Generate the K target MLPs from the condition embeddings ``cond`` (K, D): constants after training."""
    h = F.linear(cond, head["fc_condition.weight"], head["fc_condition.bias"])
    h = h.view(-1, dims.hyper_in, dims.spatial, dims.spatial)
    pooled = h.mean(dim=(2, 3))
    k = cond.shape[0]

    def conv(name: str) -> torch.Tensor:
        w = head[f"hypernet.{name}.weight"]
        return F.conv2d(h, w, head[f"hypernet.{name}.bias"], padding=w.shape[-1] // 2)

    def lin(name: str) -> torch.Tensor:
        return F.linear(pooled, head[f"hypernet.{name}.weight"], head[f"hypernet.{name}.bias"])

    return {
        "w1": conv("fc1w_conv").reshape(k, dims.f1, dims.quality), "b1": lin("fc1b_fc").reshape(k, dims.f1),
        "w2": conv("fc2w_conv").reshape(k, dims.f2, dims.f1), "b2": lin("fc2b_fc").reshape(k, dims.f2),
        "w3": conv("fc3w_conv").reshape(k, dims.f3, dims.f2), "b3": lin("fc3b_fc").reshape(k, dims.f3),
        "w4": lin("fc4w_fc").reshape(k, 1, dims.f3), "b4": lin("fc4b_fc").reshape(k, 1),
    }


def encode_text_tokens(clip, embeds: torch.Tensor) -> torch.Tensor:
    """CLIP text tower on token embeddings (N, L, W): causal transformer, ``ln_final``, projection, all tokens."""
    tm = clip.text_model
    x = tm.embeddings(inputs_embeds=embeds)
    n = x.shape[1]
    mask = torch.full((n, n), float("-inf"), device=x.device, dtype=x.dtype).triu(1)[None, None]
    x = tm.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state
    return clip.text_projection(tm.final_layer_norm(x))


class HyperScore(ModelReward):
    name = "hyperscore"
    kind = "per_set"

    def __init__(self, checkpoint: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                 device=None, dtype=None, memory_budget_mb: float = 2048.0, max_batch: int | None = None,
                 views: str | Sequence[int] = "native", white_background: bool = False,
                 background_level: float = 0.5, background_tol: float = 0.03):
        super().__init__(device, dtype, memory_budget_mb, max_batch)
        from transformers import CLIPTokenizer

        home = rewards_dir() / "hyperscore"
        path = find_file("hyperscore", ("model.pth",), checkpoint, [], [], SOURCE)
        tok_folder = find_folder("hyperscore", "vocab.json", "CLIP BPE tokenizer", tokenizer,
                                 [path.parent / "tokenizer", home / "tokenizer"], TOKENIZER_REPOS,
                                 f"https://huggingface.co/{TOKENIZER_REPOS[0]}")
        self.tokenizer = CLIPTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
        self.tokenizer.model_max_length = 10**9  # clip_tokenize cuts to the context itself (no HF length warning)
        self.config = HyperScoreConfig.from_file(path.parent / CONFIG_FILE)
        state = strip_prefix(load_torch_state(path, "hyperscore"))
        self.set_views(views, white_background, background_level, background_tol)

        clip_sd, head, origin = split_state(state)
        dims = read_dims(clip_sd, "hyperscore")
        hf, mapping = convert_open_clip(clip_sd, "hyperscore")
        for key in state:
            if key.startswith(("clip_model.", "text_encoder.")):
                origin[key] = [f"clip:{t}" for t in mapping[key.split(".", 1)[1]]]
        self.key_mapping = origin
        config = build_clip_config(dims, self.config.vision_head_width, self.config.text_head_width,
                                   self.config.hidden_act, eos_token_id=self.tokenizer.eos_token_id,
                                   bos_token_id=self.tokenizer.bos_token_id)
        self.clip = load_clip_model(hf, config, "hyperscore")
        self.dims = head_dims(head)
        if self.dims.embed != dims.embed_dim:
            raise CheckpointError(f"hyperscore: fc_quality takes {self.dims.embed} features but CLIP projects to {dims.embed_dim}.")
        self.context_length = dims.context_length
        self.image_size = dims.image_size
        with torch.no_grad():
            self.cond = self._condition_embeddings(head, dims.context_length)  # (K, D)
            self.target = fold_hypernet(self.cond, head, self.dims)
        self.fc_quality = torch.nn.Linear(self.dims.embed, self.dims.quality)
        self.fc_quality.load_state_dict({"weight": head["fc_quality.weight"], "bias": head["fc_quality.bias"]})
        self._setup_modules(self.clip, self.fc_quality)
        self.cond = self.cond.to(self.device, self.dtype)
        self.target = {k: v.to(self.device, self.dtype) for k, v in self.target.items()}
        self.checkpoint = str(path)
        vc = self.clip.config.vision_config
        self._tokens = (self.image_size // vc.patch_size) ** 2 + 1
        self._width, self._heads = vc.hidden_size, vc.num_attention_heads

    def set_views(self, views: str | Sequence[int] = "native", white_background: bool = False,
                  background_level: float = 0.5, background_tol: float = 0.03) -> None:
        """How views are presented: ``native`` (as given, MVC-ZigAL's convention), ``ring4`` (MV-Adapter
        azimuths 0/90/180/270 = HyperScore's front/right/back/left), or explicit view indices; optionally
        recolour a flat grey background (``background_level`` +- ``background_tol``) to white, as rendered
        for HyperScore's training data."""
        if isinstance(views, str):
            if views not in VIEW_PRESETS:
                raise InputError(f"hyperscore: unknown view preset {views!r}.", f"Use one of {', '.join(VIEW_PRESETS)} or indices.")
            self.view_indices = VIEW_PRESETS[views]
            name = views
        else:
            self.view_indices = tuple(int(i) for i in views)
            name = "views" + ",".join(map(str, self.view_indices))
        self.white_background = bool(white_background)
        self.background_level, self.background_tol = float(background_level), float(background_tol)
        self.view_convention = name + ("+white-bg" if white_background else "")

    @torch.no_grad()
    def _condition_embeddings(self, head: dict, context: int) -> torch.Tensor:
        ctx, prefix, suffix = head["prompt_learner.ctx"], head["prompt_learner.token_prefix"], head["prompt_learner.token_suffix"]
        k, n_ctx = ctx.shape[0], ctx.shape[1]
        names = self.config.classnames
        if len(names) != k or prefix.shape[0] != k or suffix.shape[0] != k:
            raise CheckpointError(f"hyperscore: prompt learner has {k} contexts, {prefix.shape[0]} prefixes and "
                                  f"{suffix.shape[0]} suffixes for {len(names)} class names.")
        if 1 + n_ctx + suffix.shape[1] != context:
            raise CheckpointError(f"hyperscore: prompt learner length 1+{n_ctx}+{suffix.shape[1]} != context {context}.")
        name_lens = [len(self.tokenizer.encode(n, add_special_tokens=False)) for n in names]
        ids, _ = clip_tokenize(self.tokenizer, [" ".join(["X"] * n_ctx) + " " + n + "." for n in names], context)
        parts = []
        for i, nl in enumerate(name_lens):
            if self.config.class_token_position == "front":
                parts.append(torch.cat([prefix[i:i + 1], suffix[i:i + 1, :nl], ctx[i:i + 1], suffix[i:i + 1, nl:]], 1))
            elif self.config.class_token_position == "end":
                parts.append(torch.cat([prefix[i:i + 1], ctx[i:i + 1], suffix[i:i + 1]], 1))
            else:
                raise CheckpointError(f"hyperscore: class_token_position {self.config.class_token_position!r} is not supported.")
        tokens = encode_text_tokens(self.clip, torch.cat(parts, 0).to(self.clip.dtype))
        return tokens[torch.arange(k), ids.argmax(-1)]

    def _present(self, images: torch.Tensor) -> torch.Tensor:
        if self.view_indices is not None:
            if max(self.view_indices) >= images.shape[1]:
                raise InputError(f"hyperscore: view preset needs view {max(self.view_indices)} but sets have {images.shape[1]} views.")
            images = images[:, list(self.view_indices)]
        if self.white_background:
            grey = (images - self.background_level).abs().amax(dim=2, keepdim=True) <= self.background_tol
            images = torch.where(grey, torch.ones_like(images), images)
        return images

    @torch.no_grad()
    def _score_sets(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        b, v = images.shape[:2]
        px = hyperscore_preprocess(images.reshape(b * v, *images.shape[2:]).to(self.device), self.image_size)
        hidden = self.clip.vision_model(pixel_values=px.to(self.dtype)).last_hidden_state
        patches = self.clip.visual_projection(self.clip.vision_model.post_layernorm(hidden[:, 1:]))
        p = patches.reshape(b, -1, patches.shape[-1])  # (B, V*N, D)
        ids = ids.to(self.device)
        emb = self.clip.text_model.embeddings.token_embedding(ids)
        t = encode_text_tokens(self.clip, emb)  # (B, L, D)
        e = t[torch.arange(b, device=ids.device), ids.argmax(-1)]  # (B, D)
        tn, pn, cn = F.normalize(t, dim=-1), F.normalize(p, dim=-1), F.normalize(self.cond, dim=-1)
        s_tex = pn @ tn.transpose(1, 2)  # (B, V*N, L)
        s_cond = cn @ tn.transpose(1, 2)  # (B, K, L)
        w = torch.softmax(s_tex @ s_cond.transpose(1, 2), dim=1)  # (B, V*N, K)
        u = (w.transpose(1, 2) @ p) * e[:, None, :]  # (B, K, D)
        q = self.fc_quality(u)  # (B, K, Q)
        tg = self.target
        h = torch.relu(torch.einsum("koi,bki->bko", tg["w1"], q) + tg["b1"])
        h = torch.relu(torch.einsum("koi,bki->bko", tg["w2"], h) + tg["b2"])
        h = torch.relu(torch.einsum("koi,bki->bko", tg["w3"], h) + tg["b3"])
        return (torch.einsum("koi,bki->bko", tg["w4"], h) + tg["b4"]).squeeze(-1)  # (B, K)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts, self.name)
        images = self._present(images)
        ids, lengths = clip_tokenize(self.tokenizer, prompts, self.context_length)
        self.notice_truncation(prompts, lengths, self.context_length, "(MATE-3D's clip.tokenize would refuse it)")
        v = images.shape[1]
        sets_per_chunk = max(1, self.chunk_size(self._tokens, self._width, self._heads) // v)
        scores = self.map_chunks(images.shape[0], sets_per_chunk, lambda s: self._score_sets(images[s], ids[s]))
        subs = {name: scores[:, i] for i, name in enumerate(self.sub_score_names)}
        return RewardOutput(per_set=subs.get("overall", scores[:, -1]), per_view=None, sub_scores=subs)

    @property
    def sub_score_names(self) -> list[str]:
        """``alignment, geometry, texture, overall`` (the class names without " quality")."""
        return [n.removesuffix(" quality").strip() for n in self.config.classnames]


@register_reward("hyperscore")
def make_hyperscore(**kwargs) -> HyperScore:
    return HyperScore(**kwargs)
