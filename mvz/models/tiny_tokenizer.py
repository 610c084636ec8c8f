"""A byte-level CLIP BPE tokenizer written in the real CLIP file format (``vocab.json`` + ``merges.txt``).

It has the 256 byte symbols, their end-of-word forms, a few merges and the two CLIP special tokens, so
``transformers.CLIPTokenizer`` / ``CLIPTokenizerFast`` load it through their ordinary code path. Used by
the ``tiny`` presets (model and rewards) and by ``--random-weights`` full-size models; no download.
"""

from __future__ import annotations

import json
from pathlib import Path

from mvz.atomic import write_text

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# a handful of merges so BPE has something to do (common English pairs)
_MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n", "r e", "a t", "e n", "o r"]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_vocab() -> dict[str, int]:
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    for merge in _MERGES:
        vocab_list.append(merge.replace(" ", ""))
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(vocab_list)}


def write_clip_tokenizer(folder: str | Path, model_max_length: int = 77, pad_token: str = EOS) -> Path:
    """Write a loadable CLIP tokenizer folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = clip_vocab()
    write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(_MERGES) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2))
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    write_text(folder / "special_tokens_map.json", json.dumps(special, indent=2))
    return folder


def clip_vocab_size() -> int:
    return len(clip_vocab())
