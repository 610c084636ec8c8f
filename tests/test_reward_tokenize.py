"""Rewards tokenise prompts like their original code: open_clip/OpenAI cleaning for HPSv2 and HyperScore,
Hugging Face tokenizers (no extra cleaning) for PickScore and ImageReward.

Expected ids are written from the BPE rules of the tiny CLIP vocabulary (256 byte symbols, their ``</w>``
end-of-word forms, a handful of merges): the symbols of the already-clean text, spelled out by hand.
"""

from __future__ import annotations

import pytest
import torch

from mvz.models.tiny_tokenizer import BOS, EOS, _bytes_to_unicode, clip_vocab, write_clip_tokenizer
from mvz.rewards import load_reward
from mvz.rewards.text import clip_clean, clip_tokenize

BYTE = _bytes_to_unicode()


def sym(ch: str, end: bool = False) -> list[str]:
    """The byte symbols of one character (UTF-8), ``</w>`` on the last when it ends a word."""
    out = [BYTE[b] for b in ch.encode("utf-8")]
    if end:
        out[-1] += "</w>"
    return out


def ids_of(symbols: list[str], context: int = 77) -> list[int]:
    vocab = clip_vocab()
    ids = [vocab[BOS], *(vocab[s] for s in symbols), vocab[EOS]]
    return ids + [0] * (context - len(ids))  # clip.tokenize / open_clip pad with 0


# (dirty prompt, the clean text the original cleaning gives, its BPE symbols under the tiny merges)
CASES = [
    # HTML entities, double-escaped: ftfy unescapes once, html.unescape twice more
    ("cat &amp;amp; dog", "cat & dog", ["c", "a", "t</w>", "&</w>", "d", "o", "g</w>"]),
    ("a&nbsp;cat", "a cat", ["a</w>", "c", "a", "t</w>"]),
    # with a "<" in the text ftfy leaves entities alone: only the double html.unescape decodes them
    ("a < b &amp;amp; c", "a < b & c", ["a</w>", "<</w>", "b</w>", "&</w>", "c</w>"]),
    # full-width letters and an ideographic space: ftfy's width fix, then lowercase; merge "r e" -> "re"
    ("ＲＥＤ\u3000ｃａｒ", "red car", ["re", "d</w>", "c", "a", "r</w>"]),
    # mojibake (UTF-8 read as Latin-1): ftfy repairs it to "é", two byte symbols
    ("cafÃ©", "café", ["c", "a", "f", *sym("é", end=True)]),
    # whitespace runs fold and strip
    ("  the \t\n cat  ", "the cat", ["the</w>", "c", "a", "t</w>"]),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path_factory.mktemp("tok"))))
    tok.model_max_length = 10**9
    return tok


@pytest.mark.parametrize(("dirty", "clean", "symbols"), CASES, ids=[c[1] for c in CASES])
def test_clip_ids_equal_the_cleaned_originals(tokenizer, dirty, clean, symbols):
    assert clip_clean(dirty) == clean
    ids, lengths = clip_tokenize(tokenizer, [dirty, clean], 77)
    assert ids[0].tolist() == ids_of(symbols)
    assert ids[1].tolist() == ids_of(symbols)
    assert lengths == [len(symbols) + 2] * 2


def test_hf_clip_tokenizer_alone_does_not_clean(tokenizer):
    """What PickScore's original (Hugging Face) tokenizer does: NFC, whitespace folding, lowercase only."""
    ids = tokenizer("cat &amp; dog")["input_ids"]
    vocab = clip_vocab()
    literal = ["c", "a", "t</w>", "&</w>", "a", "m", "p</w>", ";</w>", "d", "o", "g</w>"]
    assert ids == [vocab[BOS], *(vocab[s] for s in literal), vocab[EOS]]


@pytest.fixture(scope="module")
def rewards():
    return {name: load_reward(name, preset="tiny", device="cpu") for name in ("hpsv2", "hyperscore", "pickscore")}


def test_hpsv2_and_hyperscore_score_dirty_prompts_as_their_clean_form(rewards):
    images = torch.rand(2, 6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dirty, clean = ["cat &amp;amp; dog", "ＲＥＤ\u3000ｃａｒ"], ["cat & dog", "red car"]
    hps = rewards["hpsv2"]
    assert torch.equal(hps.embed_text(dirty), hps.embed_text(clean))
    assert not torch.allclose(hps.embed_text(["cat & dog"]), hps.embed_text(["red car"]))
    hyper = rewards["hyperscore"]
    assert torch.equal(hyper.score(images, dirty).per_set, hyper.score(images, clean).per_set)
    pick = rewards["pickscore"]  # the original HF tokenizer keeps "&amp;" literal
    assert not torch.allclose(pick.embed_text(dirty[:1]), pick.embed_text(clean[:1]))


def test_imagereward_bert_tokenizer_matches_the_python_bert_tokenizer():
    """BLIP (ImageReward) ran transformers' Python ``BertTokenizer``; mvz's tokenizers-backed one gives the same ids."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    from mvz.rewards.imagereward import MAX_LENGTH, load_bert_tokenizer
    from mvz.rewards.tiny import ensure_tiny

    folder = ensure_tiny("imagereward").parent / "tokenizer"
    ours = load_bert_tokenizer(folder)
    legacy = BertTokenizerLegacy(str(folder / "vocab.txt"), do_lower_case=True)
    legacy.add_special_tokens({"bos_token": "[DEC]"})
    legacy.add_tokens(["[ENC]"], special_tokens=True)
    prompts = ["A Café-Chair, 3D model!", "cat &amp; dog", "ＲＥＤ car", "a\u00a0red\tcar 猫", "naïve  robot's toy"]
    kw = dict(padding="max_length", truncation=True, max_length=MAX_LENGTH)
    for p in prompts:
        assert ours(p, **kw)["input_ids"] == legacy(p, **kw)["input_ids"], p
