"""Paper A word tokenisation, vocabularies and fixed-width chunks (numpy only).

Specials (ids 0..3, both corpora): PAD, BOS, EOS, UNK. Tokens are stored as uint16 when the
vocabulary fits (it does for 10k / 8004 words), so 10M tokens take 20 MB.

WikiText-2 (paper A `_wt2_*`): lowercase; the characters . , ! ? ; : ( ) [ ] { } " ' are split
off as tokens; whitespace split. Non-blank lines only; each split is one stream, cut into pieces of
`seq_len - 2` tokens, each bookended BOS ... EOS (a piece of one token is dropped), padded to
`seq_len` with PAD. Vocabulary: the `vocab_size - 4` most frequent train tokens (ties: first seen).

TinyStories (paper A): lowercase; every ASCII punctuation character becomes a space; whitespace
split. Each story is BOS words EOS, cut into `seq_len`-token chunks; chunks of <= 4 tokens are
dropped. Vocabulary: the `vocab_size - 4` most frequent train words (ties: first seen).
"""

from __future__ import annotations

import re
import string
from array import array
from collections import Counter
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa

PAD, BOS, EOS, UNK = 0, 1, 2, 3
WT2_SPECIALS = ["<PAD>", "<BOS>", "<EOS>", "<UNK>"]
TS_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]

_WT2_PUNCT = re.compile(r"([.,!?;:()\[\]{}\"'])")
_TS_TRANS = str.maketrans(string.punctuation, " " * len(string.punctuation))


def wikitext_tokens(line: str) -> list[str]:
    return _WT2_PUNCT.sub(r" \1 ", line.lower()).split()


def tinystories_tokens(story: str) -> list[str]:
    return story.lower().translate(_TS_TRANS).split()


def build_vocab(documents: Iterable[str], tokenize: Callable[[str], list[str]], vocab_size: int,
                specials: list[str]) -> list[str]:
    """Specials, then the `vocab_size - len(specials)` most frequent tokens (ties: first seen)."""
    if vocab_size <= len(specials):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(specials)} special tokens")
    counter: Counter[str] = Counter()
    for document in documents:
        counter.update(tokenize(document))
    words = [w for w, _ in counter.most_common(vocab_size - len(specials))]
    return list(specials) + words


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def _typecode(dtype: np.dtype) -> str:
    return "H" if dtype == np.uint16 else "I"


def encode_stream(documents: Iterable[str], tokenize: Callable[[str], list[str]], vocab: list[str]) -> np.ndarray:
    """All documents' token ids, concatenated (WikiText-2's one stream per split)."""
    index = {w: i for i, w in enumerate(vocab)}
    get = index.get
    dtype = token_dtype(len(vocab))
    out = array(_typecode(dtype))
    for document in documents:
        out.extend([get(w, UNK) for w in tokenize(document)])
    return np.frombuffer(out, dtype=dtype) if len(out) else np.zeros(0, dtype)


def bookend_chunks(ids: np.ndarray, seq_len: int, min_piece: int = 2) -> np.ndarray:
    """(N, seq_len): pieces of `seq_len - 2` ids as BOS piece EOS, PAD after a short last piece;
    a last piece shorter than `min_piece` ids is dropped (paper A's WikiText-2 chunking)."""
    step = seq_len - 2
    if step < 1:
        raise ValueError(f"seq_len={seq_len} leaves no room between BOS and EOS")
    n_full, rest = divmod(len(ids), step)
    rows = n_full + (1 if rest >= min_piece else 0)
    out = np.full((rows, seq_len), PAD, dtype=ids.dtype)
    out[:, 0] = BOS
    out[:n_full, 1:-1] = ids[: n_full * step].reshape(n_full, step)
    out[:n_full, -1] = EOS
    if rows > n_full:
        out[n_full, 1 : 1 + rest] = ids[n_full * step :]
        out[n_full, 1 + rest] = EOS
    return out


def story_chunks(documents: Iterable[str], tokenize: Callable[[str], list[str]], vocab: list[str],
                 seq_len: int, min_tokens: int = 5, on_document: Callable[[str], None] | None = None) -> np.ndarray:
    """(N, seq_len): each document as BOS ids EOS, cut every `seq_len` tokens; chunks with fewer
    than `min_tokens` tokens are dropped (paper A: `len(chunk) > 4`); PAD after short chunks."""
    index = {w: i for i, w in enumerate(vocab)}
    get = index.get
    dtype = token_dtype(len(vocab))
    out = array(_typecode(dtype))
    pad_row = [PAD] * seq_len
    for document in documents:
        ids = [BOS, *[get(w, UNK) for w in tokenize(document)], EOS]
        for start in range(0, len(ids), seq_len):
            chunk = ids[start : start + seq_len]
            if len(chunk) >= min_tokens:
                out.extend(chunk)
                out.extend(pad_row[: seq_len - len(chunk)])
        if on_document is not None:
            on_document(document)
    flat = np.frombuffer(out, dtype=dtype) if len(out) else np.zeros(0, dtype)
    return flat.reshape(-1, seq_len)


def tokens_table(chunks: np.ndarray) -> pa.Table:
    """(N, L) token ids -> one fixed-size-list column `tokens` (memory-mappable, zero-copy back)."""
    flat = pa.array(np.ascontiguousarray(chunks).reshape(-1))
    return pa.table({"tokens": pa.FixedSizeListArray.from_arrays(flat, chunks.shape[1])})


def vocab_table(vocab: list[str]) -> pa.Table:
    return pa.table({"token": pa.array(vocab, pa.string())})


def count_scored(chunks: np.ndarray) -> int:
    """Targets an LM scores in these chunks: every non-PAD token after the first position."""
    return int((chunks[:, 1:] != PAD).sum())
