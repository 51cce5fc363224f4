"""Keyword spotting on Google Speech Commands v0.02, 10 words (paper A).

Source: the official archive (downloaded once, the chosen words unpacked), or a local directory in
the Speech Commands layout (`data_dir`). Splits: the official validation_list.txt /
testing_list.txt, training = every other clip of the chosen words.

Features (computed once, stored in the cache): WAV read with soundfile, resampled to 16 kHz if
needed, zero-padded / cropped to 1 s; torchaudio MelSpectrogram (40 bins, n_fft 512, window 400,
hop 320; power spectrogram, centred frames) then AmplitudeToDB; the first 49 frames; each mel bin
standardised with the mean and (unbiased) std over all training frames (std floored at 1e-5).
Model: Linear(40 -> D) read-in, bidirectional, mean-pooled `classify` head. Metric: accuracy.

Legend: N clips, S samples, F frames, M mel bins, C classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import numpy as np
import pyarrow as pa

from storage.prep import speech
from storage.prep.sources import content_digest, download, downloads_dir, local_hint, progress, require_path
from workers._lazy import F, no_grad, torch  # torch on first use: validating a study file imports this module
from workers.tasks.base import PreparedTask, Task

FEATURE_BATCH = 256
STD_FLOOR = 1e-5


def log_mel(waves_NS: np.ndarray, opts: dict[str, Any]) -> np.ndarray:
    """(N, S) waveforms -> (N, n_frames, n_mels) float32 dB log-mel frames."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchaudio's deprecation notices on import
        import torchaudio.transforms as T

    mel = T.MelSpectrogram(sample_rate=opts["sample_rate"], n_fft=opts["n_fft"], win_length=opts["win_length"],
                           hop_length=opts["hop_length"], n_mels=opts["n_mels"])
    to_db = T.AmplitudeToDB()
    out = []
    for start in range(0, len(waves_NS), FEATURE_BATCH):
        with torch.no_grad():
            spec_NMF = to_db(mel(torch.from_numpy(waves_NS[start : start + FEATURE_BATCH])))
        frames_NFM = spec_NMF.transpose(1, 2)
        if frames_NFM.shape[1] < opts["n_frames"]:  # shorter clips: zero frames at the end (paper A)
            frames_NFM = F.pad(frames_NFM, (0, 0, 0, opts["n_frames"] - frames_NFM.shape[1]))
        out.append(frames_NFM[:, : opts["n_frames"]].numpy())
    return np.concatenate(out) if out else np.zeros((0, opts["n_frames"], opts["n_mels"]), np.float32)


def standardise(train_NFM: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and unbiased std over every training frame (std >= 1e-5)."""
    flat = train_NFM.reshape(-1, train_NFM.shape[-1]).astype(np.float64)
    return flat.mean(0).astype(np.float32), np.maximum(flat.std(0, ddof=1), STD_FLOOR).astype(np.float32)


class KWS(Task):
    name = "kws"
    PREP_VERSION = 1
    metric = "val_accuracy"
    lower_is_better = False
    DEFAULTS: dict[str, Any] = {
        "data_dir": None,  # local Speech Commands layout; None: the official archive
        "url": speech.ARCHIVE_URL,
        "words": list(speech.PAPER_WORDS),  # the classes, in label order
        "sample_rate": 16_000,
        "clip_samples": 16_000,  # pad / crop to 1 s
        "n_mels": 40,
        "n_fft": 512,
        "win_length": 400,
        "hop_length": 320,
        "n_frames": 49,
        "max_clips_per_word": None,  # per split: the first N clips of each word (quick builds)
    }
    FEATURE_KEYS = ("sample_rate", "clip_samples", "n_mels", "n_fft", "win_length", "hop_length", "n_frames")
    HINT = local_hint("kws", "data_dir", "a directory in the Speech Commands layout (<word>/<speaker>_nohash_<n>.wav, "
                      "validation_list.txt, testing_list.txt)", "/data/speech_commands_v0.02")

    def identity(self, options):
        words = list(options["words"])
        if options["data_dir"] is not None:
            root = require_path(self.name, "data_dir", options["data_dir"], "dir")
            source: dict[str, Any] = {"tree": content_digest(root, speech.wav_files(root, words))["sha256"]}
        else:
            source = {"url": options["url"]}
        params = {k: options[k] for k in (*self.FEATURE_KEYS, "max_clips_per_word")}
        return {"task": self.name, "prep": self.PREP_VERSION, "source": source, "words": words, "params": params}

    def _root(self, options) -> str:
        if options["data_dir"] is not None:
            return require_path(self.name, "data_dir", options["data_dir"], "dir")
        archive = download(self.name, self.HINT, options["url"])
        words = list(options["words"])
        tag = hashlib.sha1(json.dumps([options["url"], sorted(words)]).encode()).hexdigest()[:10]
        return speech.extract_archive(archive, os.path.join(downloads_dir(), f"speech_commands-{tag}"), words)

    def build(self, options):
        words = list(options["words"])
        root = self._root(options)
        index = speech.split_index(root, words)
        if options["max_clips_per_word"] is not None:
            index = {s: _first_per_word(items, int(options["max_clips_per_word"])) for s, items in index.items()}
        empty = [s for s, items in index.items() if not items]
        if empty:
            raise ValueError(f"kws: no clips of {words} in the {empty} split(s) of {root}")
        features, labels, source_bytes = {}, {}, 0
        with progress(sum(len(v) for v in index.values()), f"{self.name} read wav", unit="clip") as bar:
            for split, items in index.items():
                waves = np.empty((len(items), options["clip_samples"]), dtype=np.float32)
                for i, (rel, _) in enumerate(items):
                    waves[i] = self._wave(os.path.join(root, rel), options)
                    source_bytes += os.path.getsize(os.path.join(root, rel))
                    bar.update(1)
                features[split] = log_mel(waves, options)
                labels[split] = np.array([label for _, label in items], dtype=np.int16)
        mean, std = standardise(features["train"])
        tables, stats = {}, {}
        width = options["n_frames"] * options["n_mels"]
        for split in index:
            normed = ((features[split] - mean) / std).astype(np.float32).reshape(-1, width)
            tables[split] = pa.table({
                "features": pa.FixedSizeListArray.from_arrays(pa.array(normed.reshape(-1)), width),
                "label": pa.array(labels[split]),
            })
            stats[split] = {"clips": int(len(labels[split])),
                            "per_word": {w: int((labels[split] == i).sum()) for i, w in enumerate(words)}}
        meta = {"words": words, "num_classes": len(words), "n_frames": options["n_frames"], "n_mels": options["n_mels"],
                "mean": mean.tolist(), "std": std.tolist(), "splits": stats, "source_bytes": source_bytes,
                "source": {"dir": root}}
        return tables, meta

    @staticmethod
    def _wave(path: str, options) -> np.ndarray:
        samples, rate = speech.read_wav(path)
        if rate != options["sample_rate"]:
            import torchaudio.functional as AF

            samples = AF.resample(torch.from_numpy(samples), rate, options["sample_rate"]).numpy()
        return speech.fit_length(samples, options["clip_samples"])

    def model_fields(self, prepared: PreparedTask) -> dict[str, Any]:
        return {"vocab_size": 0, "input_dim": int(prepared.meta["n_mels"]), "max_seq_len": int(prepared.meta["n_frames"]),
                "head": "classify", "num_classes": int(prepared.meta["num_classes"]), "causal": False}

    def tokens_per_example(self, prepared: PreparedTask) -> int:
        return int(prepared.meta["n_frames"])

    def arrays(self, entry, options):
        """features as (N, n_frames, n_mels): a reshaped view of the memory-mapped column."""
        out = super().arrays(entry, options)
        shape = (int(entry.meta["n_frames"]), int(entry.meta["n_mels"]))
        for split in out.values():
            split["features"] = split["features"].reshape(-1, *shape)
        return out

    def batch(self, split, index):
        return self.placed({
            "features": torch.from_numpy(np.ascontiguousarray(split["features"][index], dtype=np.float32)),
            "labels": torch.from_numpy(split["label"][index].astype(np.int64)),
        })

    def model_inputs(self, batch):
        return (batch["features"],), {}

    def loss_from_output(self, logits_BC, batch):
        return F.cross_entropy(logits_BC, batch["labels"])

    @no_grad
    def evaluate(self, model, split, batch_size, prefix):
        n = len(split["label"])
        correct, loss_sum = 0, 0.0
        for start in range(0, n, batch_size):
            batch = self.batch(split, np.arange(start, min(start + batch_size, n)))
            logits_BC = model(batch["features"])
            loss_sum += F.cross_entropy(logits_BC, batch["labels"], reduction="sum").item()
            correct += (logits_BC.argmax(-1) == batch["labels"]).sum().item()
        return {f"{prefix}_loss": loss_sum / max(n, 1), f"{prefix}_accuracy": correct / max(n, 1),
                f"{prefix}_examples": float(n)}


def _first_per_word(items: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    taken: dict[int, int] = {}
    out = []
    for rel, label in items:
        if taken.get(label, 0) < limit:
            out.append((rel, label))
            taken[label] = taken.get(label, 0) + 1
    return out
