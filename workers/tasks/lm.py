"""The two language-modelling layouts of the real corpora.

Legend: B batch, T sequence (model input length), L stored chunk length (T + 1), V vocabulary.

- `ChunkLMTask` (paper A: WikiText-2, TinyStories): the cache holds (N, L) chunks BOS ... EOS,
  PAD-filled. The model reads chunk[:-1] and predicts chunk[1:]; PAD targets are not scored, so
  perplexity is exp(mean NLL over the non-PAD targets), EOS included, BOS never a target.
- `ByteLMTask` (paper B: enwik8, CodeParrot): the cache holds one uint8 stream per split. Training
  windows of T + 1 bytes start at every offset (a zero-copy sliding view of the memory-mapped
  stream); evaluation windows start every T bytes, so each byte after the first is predicted once,
  with a context of up to T bytes. Bits per byte (= bits per character on enwik8) = mean NLL / ln 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from storage.cache import CachedDataset
from storage.prep.text import PAD
from workers._lazy import no_grad, torch  # torch on first use: validating a study file imports this module
from workers.tasks.base import IGNORE, SPLITS, LMTask, PreparedTask, bits_per_unit, column_to_numpy, lm_metrics


class ChunkLMTask(LMTask):
    metric = "val_ppl"

    def batch(self, split: dict[str, np.ndarray], index: np.ndarray) -> dict[str, torch.Tensor]:
        chunks_BL = torch.from_numpy(split["tokens"][index].astype(np.int64))
        labels_BT = chunks_BL[:, 1:].clone()
        labels_BT[labels_BT == PAD] = IGNORE
        return self.placed({"input_ids": chunks_BL[:, :-1], "labels": labels_BT})

    def model_fields(self, prepared: PreparedTask) -> dict[str, Any]:
        return {
            "vocab_size": int(prepared.meta["vocab_size"]),
            "max_seq_len": int(prepared.meta["seq_len"]) - 1,
            "head": "lm",
            "causal": True,
        }

    def tokens_per_example(self, prepared: PreparedTask) -> int:
        return int(prepared.meta["seq_len"]) - 1


def train_windows(stream: np.ndarray, T: int) -> np.ndarray:
    """(len - T, T + 1): a window at every offset (a view, no copy)."""
    if len(stream) < T + 1:
        raise ValueError(f"a split of {len(stream)} bytes is shorter than one window of seq_len + 1 = {T + 1}")
    return sliding_window_view(stream, T + 1)


def eval_windows(stream: np.ndarray, T: int, max_tokens: int | None = None) -> np.ndarray:
    """((len - 1) // T, T + 1): windows every T bytes, overlapping by one (each target scored once);
    the first `max_tokens` targets only when given. A view, no copy."""
    n = (len(stream) - 1) // T
    if max_tokens:
        n = min(n, max(1, int(max_tokens) // T))
    if n < 1:
        raise ValueError(f"a split of {len(stream)} bytes is shorter than one window of seq_len + 1 = {T + 1}")
    return as_strided(stream, shape=(n, T + 1), strides=(T * stream.strides[0], stream.strides[0]), writeable=False)


class ByteLMTask(LMTask):
    unit = "bpb"  # bits per byte (enwik8 calls it bits per character: "bpc")
    metric = "val_bpb"
    VOCAB = 256

    def options(self, given):
        options = super().options(given)
        sizes = options["split_bytes"]
        if not isinstance(sizes, (list, tuple)) or len(sizes) != 3 or not all(isinstance(b, int) and b > 0 for b in sizes):
            raise ValueError(f"{self.name}: split_bytes={sizes!r} must be three positive byte counts (train, val, test)")
        if not isinstance(options["seq_len"], int) or options["seq_len"] < 1:
            raise ValueError(f"{self.name}: seq_len={options['seq_len']!r} must be a positive integer")
        return options

    def arrays(self, entry: CachedDataset, options: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
        T = int(options["seq_len"])
        out = {}
        for split in SPLITS:
            if split in entry.tables:
                stream = column_to_numpy(entry.tables[split].column("bytes"))
                windows = train_windows(stream, T) if split == "train" else eval_windows(stream, T, options["max_eval_tokens"])
                out[split] = {"windows": windows}
        return out

    def prepare(self, options: dict[str, Any], cache, *, build: bool = True) -> PreparedTask:
        prepared = super().prepare(options, cache, build=build)
        prepared.meta = {**prepared.meta, "seq_len": int(self.options(options)["seq_len"])}
        return prepared

    def batch(self, split: dict[str, np.ndarray], index: np.ndarray) -> dict[str, torch.Tensor]:
        windows_BL = torch.from_numpy(split["windows"][index].astype(np.int64))
        return self.placed({"input_ids": windows_BL[:, :-1], "labels": windows_BL[:, 1:]})

    def model_fields(self, prepared: PreparedTask) -> dict[str, Any]:
        return {"vocab_size": self.VOCAB, "max_seq_len": int(prepared.meta["seq_len"]), "head": "lm", "causal": True}

    def tokens_per_example(self, prepared: PreparedTask) -> int:
        return int(prepared.meta["seq_len"])

    @no_grad
    def evaluate(self, model, split, batch_size, prefix):
        nll, correct, tokens = self.scored_sums(model, split, batch_size)
        return {**lm_metrics(nll, correct, tokens, prefix), f"{prefix}_{self.unit}": bits_per_unit(nll, tokens)}
