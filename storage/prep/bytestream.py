"""Byte-level corpora (paper B): enwik8 and CodeParrot as flat uint8 streams.

enwik8: the standard split is bytes [0, 90M) / [90M, 95M) / [95M, 100M). On a shorter file (a head
slice) the same 90/5/5 proportions are applied to what is there, so val and test are still the
last 10% of the bytes (these numbers are not comparable with published enwik8 results).

CodeParrot: documents (source files) are assigned to train / val / test by a hash of their bytes,
in proportion to the split budgets, so exact duplicates never straddle splits and the assignment
does not depend on the order files arrive in. Each document is followed by one NUL byte (never
present in UTF-8 source text) as end-of-document marker; files that are not UTF-8 or contain NUL
are skipped as binary. A split stops at its byte budget (the last document is cut there).
"""

from __future__ import annotations

import hashlib
import zipfile
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)
ENWIK8_SHA256 = "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"
SPLITS = ("train", "val", "test")
DOC_END = 0  # NUL


def read_enwik8(path: str, max_bytes: int | None = None) -> np.ndarray:
    """The raw bytes of enwik8 (a raw file, a head slice, or the official .zip), as uint8."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = "enwik8" if "enwik8" in archive.namelist() else archive.namelist()[0]
            with archive.open(member) as handle:
                data = handle.read() if max_bytes is None else handle.read(max_bytes)
        return np.frombuffer(data, dtype=np.uint8)
    count = -1 if max_bytes is None else int(max_bytes)
    return np.fromfile(path, dtype=np.uint8, count=count)


def proportional_split(n: int, sizes: tuple[int, ...] | list[int]) -> list[tuple[int, int]]:
    """[start, end) per split: `sizes` as given when they fit in n bytes, else scaled to n in the
    same proportions (val and test rounded down, train takes the rest)."""
    sizes = [int(s) for s in sizes]
    if sum(sizes) <= n:
        scaled = sizes
    else:
        total = sum(sizes)
        tail = [s * n // total for s in sizes[1:]]
        scaled = [n - sum(tail), *tail]
    bounds, start = [], 0
    for size in scaled:
        bounds.append((start, start + size))
        start += size
    return bounds


def stream_table(data: np.ndarray) -> pa.Table:
    """A flat byte stream as one uint8 column `bytes` (zero-copy to numpy on read)."""
    return pa.table({"bytes": pa.array(np.ascontiguousarray(data, dtype=np.uint8))})


def split_of(document: bytes, fractions: list[float]) -> int:
    """The split index of a document by a hash of its bytes (stable across runs and machines)."""
    u = int.from_bytes(hashlib.sha1(document).digest()[:8], "big") / 2.0**64
    edge = 0.0
    for i, fraction in enumerate(fractions):
        edge += fraction
        if u < edge:
            return i
    return len(fractions) - 1


def utf8_document(data: bytes) -> bytes | None:
    """The bytes if they are a UTF-8 text document (no NUL), else None (binary: skipped)."""
    if b"\0" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def pack_documents(documents: Iterable[bytes], budgets: list[int], on_document=None) -> tuple[list[np.ndarray], dict]:
    """Hash-assign documents to splits until every budget is full (or the documents run out).
    Returns ([uint8 stream per split], stats)."""
    fractions = [b / sum(budgets) for b in budgets]
    buffers = [bytearray() for _ in budgets]
    stats = {"documents": [0] * len(budgets), "skipped_binary": 0, "input_bytes": 0}
    for document in documents:
        stats["input_bytes"] += len(document)
        if on_document is not None:
            on_document(len(document))
        text = utf8_document(document)
        if text is None:
            stats["skipped_binary"] += 1
            continue
        i = split_of(text, fractions)
        room = budgets[i] - len(buffers[i])
        if room <= 0:
            if all(len(buf) >= budget for buf, budget in zip(buffers, budgets)):
                break
            continue
        buffers[i] += (text + bytes([DOC_END]))[:room]
        stats["documents"][i] += 1
        if all(len(buf) >= budget for buf, budget in zip(buffers, budgets)):
            break
    return [np.frombuffer(bytes(buf), dtype=np.uint8) for buf in buffers], stats


def iter_tree(root: str, relpaths: list[str], max_file_bytes: int | None) -> Iterator[bytes]:
    import os

    for rel in relpaths:
        path = os.path.join(root, rel)
        if max_file_bytes is not None and os.path.getsize(path) > max_file_bytes:
            continue
        with open(path, "rb") as handle:
            yield handle.read()
