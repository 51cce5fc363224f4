"""Google Speech Commands v0.02: the directory layout, the official split lists, WAV reading.

Layout: <root>/<word>/<speaker>_nohash_<n>.wav, plus validation_list.txt and testing_list.txt
(one "<word>/<file>.wav" per line). Training = every clip of the chosen words in neither list (the
dataset's own rule). Audio is read with `soundfile` (float32 in [-1, 1), as torchaudio would give);
the log-mel features are computed in `workers/tasks/kws.py` with torchaudio transforms.
"""

from __future__ import annotations

import os
import tarfile

import numpy as np

PAPER_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
ARCHIVE_URL = "http://download.tensorflow.org/data/speech_commands_v0.02.tar.gz"
LISTS = {"val": "validation_list.txt", "test": "testing_list.txt"}


def read_list(root: str, name: str) -> set[str]:
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; a Speech Commands directory has {sorted(LISTS.values())}")
    with open(path, encoding="utf-8") as handle:
        return {line.strip().replace("\\", "/") for line in handle if line.strip()}


def split_index(root: str, words: list[str]) -> dict[str, list[tuple[str, int]]]:
    """{split: [(relative wav path, class index)]}, sorted by path, for the given words."""
    listed = {split: read_list(root, name) for split, name in LISTS.items()}
    out: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for label, word in enumerate(words):
        directory = os.path.join(root, word)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no folder for the word {word!r} in {root}")
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".wav"):
                continue
            rel = f"{word}/{name}"
            split = "val" if rel in listed["val"] else "test" if rel in listed["test"] else "train"
            out[split].append((rel, label))
    return out


def wav_files(root: str, words: list[str]) -> list[str]:
    """The files that define the data: the chosen words' clips and the two split lists."""
    files = [name for name in LISTS.values()]
    for word in words:
        directory = os.path.join(root, word)
        if os.path.isdir(directory):
            files += [f"{word}/{n}" for n in sorted(os.listdir(directory)) if n.endswith(".wav")]
    return sorted(files)


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """(mono float32 samples, sample rate); multi-channel audio is averaged to mono."""
    import soundfile

    samples, rate = soundfile.read(path, dtype="float32", always_2d=False)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    return np.ascontiguousarray(samples, dtype=np.float32), int(rate)


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Zero-pad at the end, or crop, to exactly `length` samples (paper A: 1 s at 16 kHz)."""
    if len(samples) >= length:
        return samples[:length]
    return np.pad(samples, (0, length - len(samples)))


def extract_archive(archive: str, dest: str, words: list[str]) -> str:
    """Unpack the chosen words and the split lists from the official .tar.gz (temp dir + rename)."""
    if os.path.isdir(dest) and os.path.isfile(os.path.join(dest, LISTS["val"])):
        return dest
    tmp = dest + ".part"
    wanted = tuple(f"{w}/" for w in words) + tuple(LISTS.values())
    with tarfile.open(archive, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.lstrip("./").startswith(wanted)]
        try:
            tar.extractall(tmp, members=members, filter="data")  # no absolute paths / links out
        except TypeError:  # Python < 3.11.4 has no extraction filters
            tar.extractall(tmp, members=members)
    os.replace(tmp, dest)
    return dest
