"""The CLIP tokenizer, built offline from the BPE vocabulary shipped in data/ (MIT, see its notice).

transformers' CLIPTokenizer is given `vocab` and `merges` directly; the two are derived from the
BPE file the way OpenAI's CLIP derives them, so no tokenizer file is ever downloaded.
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
MAX_LENGTH = 77
N_MERGES = 49152 - 256 - 2   # CLIP keeps the first 48894 merges: 49408 tokens in all


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in CLIP's vocabulary order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@lru_cache(maxsize=1)
def vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:N_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer():
    """A transformers CLIPTokenizer identical to OpenAI CLIP's (49408 tokens, 77 positions)."""
    from transformers import CLIPTokenizer
    vocab, merges = vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)
