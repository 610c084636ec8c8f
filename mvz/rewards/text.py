"""Prompt tokenisation of the original CLIP tokenizers (OpenAI CLIP's and open_clip's ``simple_tokenizer``).

HPSv2 (open_clip ``get_tokenizer('ViT-H-14')``) and HyperScore (MATE-3D's vendored ``clip.tokenize``) clean
a prompt before BPE: ``ftfy.fix_text`` (mojibake, full-width letters, ligatures, curly quotes, NFC), then
``html.unescape`` twice (``&amp;amp;`` -> ``&``), strip, fold every whitespace run to one space, lowercase.
transformers' CLIP tokenizer only does NFC, whitespace folding and lowercasing, so the cleaning runs here
first; the BPE itself (same vocabulary, merges and pre-tokenisation regex) is the tokenizer's. PickScore and
ImageReward use Hugging Face tokenizers in the original code too, so they get no extra cleaning.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import torch

_WHITESPACE = re.compile(r"\s+")


def clip_clean(text: str) -> str:
    """open_clip/OpenAI ``whitespace_clean(basic_clean(text)).lower()``."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def clip_tokenize(tokenizer, texts: Sequence[str], context: int) -> tuple[torch.Tensor, list[int]]:
    """``clip.tokenize`` / open_clip ``tokenize``: [SOS] + BPE(clean(text)) + [EOS], zero padded to
    ``context``; too long -> cut to ``context`` with EOS last.

    Returns the ids (N, context) and the untruncated token counts (to report truncation).
    """
    sos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.zeros(len(texts), context, dtype=torch.long)
    lengths = []
    for i, text in enumerate(texts):
        toks = [sos, *tokenizer.encode(clip_clean(text), add_special_tokens=False), eos]
        lengths.append(len(toks))
        if len(toks) > context:
            toks = toks[:context]
            toks[-1] = eos
        ids[i, : len(toks)] = torch.tensor(toks)
    return ids, lengths
