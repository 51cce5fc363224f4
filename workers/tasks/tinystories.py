"""TinyStories word-level language modelling, as in paper A.

Source: the HF hub (`roneneldan/TinyStories`, splits train / validation, column `text`), or local
text files whose stories are separated by `separator` (the official TinyStories*-train.txt /
-valid.txt files use `<|endoftext|>`). `data_dir` is searched for the official names; explicit
`train_file` / `val_file` / `test_file` override it. With only a train file, `val_fraction` > 0
holds out that share of the stories as validation, chosen by a hash of each story's text.

Tokenisation (paper A): lowercase, ASCII punctuation to spaces, whitespace split; vocabulary = top
`vocab_size - 4` train words + PAD/BOS/EOS/UNK; each story BOS ... EOS cut into `seq_len`-token
chunks, chunks of fewer than `min_chunk_tokens` dropped. Metric: best validation perplexity.

`authors_eval_dir`: paper A's shipped evaluation data (their repository's `data/tinystories_eval/`:
`vocab.pt`, `val_chunks.pkl`). The published numbers were computed on that split with that
vocabulary, and rebuilding both from the hub need not give the same ones (tie-breaking among
equally frequent words, upstream corpus drift), so with it the vocabulary and the validation split
are the authors' and only the train split is tokenised here (with their vocabulary). Both files are
read with loaders that refuse anything but plain containers, numbers and strings.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Iterable, Iterator

from storage.prep import text
from storage.prep.bytestream import split_of
from storage.prep.sources import (
    content_digest,
    hf_load,
    iter_documents,
    local_hint,
    local_split_files,
    progress,
)
from workers.tasks.lm import ChunkLMTask

FILE_NAMES = {
    "train": ["TinyStoriesV2-GPT4-train.txt", "TinyStories-train.txt", "train.txt"],
    "val": ["TinyStoriesV2-GPT4-valid.txt", "TinyStories-valid.txt", "valid.txt", "validation.txt"],
    "test": ["test.txt"],
}
HF_SPLITS = {"train": "train", "val": "validation"}
NO_SEPARATOR_BYTES = 100_000  # a file this large read as one story almost surely has another separator


class TinyStories(ChunkLMTask):
    name = "tinystories"
    PREP_VERSION = 1
    DEFAULTS: dict[str, Any] = {
        "data_dir": None,  # local directory with the official text files (names above)
        "train_file": None,  # explicit local files; override data_dir's
        "val_file": None,
        "test_file": None,  # optional: TinyStories has no test split
        "separator": "<|endoftext|>",  # between stories in local files ("\n\n": one paragraph = one story)
        "val_fraction": 0.0,  # > 0: hold out this share of the train stories as val (no val file needed)
        "hf_dataset": "roneneldan/TinyStories",
        "hf_revision": None,
        "vocab_size": 8004,  # 8000 words + PAD, BOS, EOS, UNK
        "seq_len": 128,  # tokens per stored chunk (BOS/EOS included); the model sees 127
        "min_chunk_tokens": 5,  # paper A drops chunks of <= 4 tokens
        "max_bytes": None,  # use only about the first N bytes of each split (whole stories)
        "authors_eval_dir": None,  # paper A's data/tinystories_eval/: their vocabulary and validation chunks
    }
    HINT = local_hint("tinystories", "train_file", "a text file of stories separated by <|endoftext|> (and "
                      "val_file, or val_fraction=0.05)", "/data/TinyStoriesV2-GPT4-train.txt")

    def _local(self, options) -> dict[str, str] | None:
        explicit = {s: options[f"{s}_file"] for s in FILE_NAMES}
        required = ("train",) if options["val_fraction"] or options["authors_eval_dir"] else ("train", "val")
        return local_split_files(self.name, options["data_dir"], explicit, FILE_NAMES, required=required)

    def options(self, given):
        options = super().options(given)
        if not 0.0 <= float(options["val_fraction"]) < 1.0:
            raise ValueError(f"tinystories: val_fraction={options['val_fraction']} must be in [0, 1)")
        if options["authors_eval_dir"] is not None:
            if options["val_fraction"] or options["val_file"]:
                raise ValueError("tinystories: authors_eval_dir supplies the validation split; remove val_fraction / val_file")
            missing = [n for n in AUTHORS_FILES if not os.path.isfile(os.path.join(options["authors_eval_dir"], n))]
            if missing:
                raise ValueError(f"tinystories: authors_eval_dir={options['authors_eval_dir']!r} lacks {missing}; give the "
                                 f"directory data/tinystories_eval of paper A's repository (vocab.pt, val_chunks.pkl)")
        return options

    def identity(self, options):
        files = self._local(options)
        if files is None:
            source = {"hub": options["hf_dataset"], "revision": options["hf_revision"]}
        else:
            source = {split: content_digest(path)["sha256"] for split, path in files.items()}
            source["separator"] = options["separator"]
        params = {k: options[k] for k in ("vocab_size", "seq_len", "min_chunk_tokens", "max_bytes", "val_fraction")}
        if options["authors_eval_dir"] is not None:
            source["authors_eval"] = {n: content_digest(os.path.join(options["authors_eval_dir"], n))["sha256"]
                                      for n in AUTHORS_FILES}
        return {"task": self.name, "prep": self.PREP_VERSION, "source": source, "params": params}

    def _stories(self, options) -> tuple[dict[str, Callable[[], Iterator[str]]], int, dict[str, Any]]:
        """A re-iterable story stream per split (two passes: vocabulary, then chunks)."""
        files = self._local(options)
        max_bytes, separator = options["max_bytes"], options["separator"]
        if files is not None:
            streams = {s: (lambda p=p: iter_documents(p, separator, max_bytes)) for s, p in files.items()}
            total = sum(min(os.path.getsize(p), max_bytes or os.path.getsize(p)) for p in files.values())
            return streams, total, {"files": files}
        dataset = hf_load(self.name, self.HINT, options["hf_dataset"], revision=options["hf_revision"])
        streams = {s: (lambda hf=hf: _hub_stories(dataset[hf], max_bytes)) for s, hf in HF_SPLITS.items()}
        return streams, 0, {"hub": options["hf_dataset"]}

    def build(self, options):
        streams, total, where = self._stories(options)
        fraction = float(options["val_fraction"])
        if fraction and "val" not in streams:  # carve val from train by a hash of each story
            source = streams["train"]
            streams["train"] = lambda: (s for s in source() if split_of(s.encode("utf-8"), [1 - fraction, fraction]) == 0)
            streams["val"] = lambda: (s for s in source() if split_of(s.encode("utf-8"), [1 - fraction, fraction]) == 1)
        counted = _Counted()
        authors = load_authors_eval(options["authors_eval_dir"], options["seq_len"]) if options["authors_eval_dir"] else None
        if authors is not None:
            vocab = authors[0]
            streams.pop("val", None)
            for _ in counted(streams["train"]()):  # the separator check below needs the story count
                pass
        else:
            vocab = text.build_vocab(counted(streams["train"]()), text.tinystories_tokens, options["vocab_size"],
                                     text.TS_SPECIALS)
        if files := where.get("files"):
            size = os.path.getsize(files["train"])
            if counted.documents == 1 and size > NO_SEPARATOR_BYTES:
                raise ValueError(
                    f"tinystories: {files['train']} ({size} bytes) holds no {options['separator']!r}, so it would be "
                    f"one story; set the task option `separator` to what separates its stories (e.g. \"\\n\\n\")"
                )
        tables, stats, source_bytes = {}, {}, 0
        with progress(total or None, f"{self.name} tokenise") as bar:
            for split, stream in streams.items():
                seen = _Counted()

                def advance(story: str) -> None:
                    bar.update(len(story.encode("utf-8")))

                chunks = text.story_chunks(seen(stream()), text.tinystories_tokens, vocab, options["seq_len"],
                                           options["min_chunk_tokens"], on_document=advance)
                if len(chunks) == 0:
                    raise ValueError(f"tinystories: the {split} split has no story long enough for one chunk")
                tables[split] = text.tokens_table(chunks)
                stats[split] = {"stories": seen.documents, "chunks": int(len(chunks)),
                                "scored": text.count_scored(chunks), "unk": int((chunks == text.UNK).sum())}
                source_bytes += seen.bytes
        if authors is not None:
            tables["val"] = text.tokens_table(authors[1])
            stats["val"] = {"stories": None, "chunks": int(len(authors[1])), "scored": text.count_scored(authors[1]),
                            "unk": int((authors[1] == text.UNK).sum()), "from": "authors_eval_dir"}
            where = {**where, "authors_eval_dir": options["authors_eval_dir"]}
        tables["vocab"] = text.vocab_table(vocab)
        meta = {"vocab_size": len(vocab), "seq_len": options["seq_len"], "splits": stats,
                "source_bytes": source_bytes, "source": where}
        return tables, meta


AUTHORS_FILES = ("vocab.pt", "val_chunks.pkl")


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, numbers and strings only: a pickle that names any class or function
    (which could run code) is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: val_chunks.pkl should hold lists of token ids")


def load_authors_eval(directory: str, seq_len: int) -> tuple[list[str], Any]:
    """Paper A's shipped vocabulary (id order) and validation chunks, PAD-filled to `seq_len`."""
    import numpy as np
    import torch

    path = os.path.join(directory, "vocab.pt")
    stored = torch.load(path, weights_only=True, map_location="cpu")  # plain containers only
    word_to_id = stored["vocab"] if isinstance(stored, dict) and "vocab" in stored else stored
    if not isinstance(word_to_id, dict) or sorted(word_to_id.values()) != list(range(len(word_to_id))):
        raise ValueError(f"tinystories: {path} must map words to the ids 0..N-1 (paper A's {{'vocab': ..., 'idx2word': ...}})")
    vocab = [w for w, _ in sorted(word_to_id.items(), key=lambda item: item[1])]
    if [w.lower() for w in vocab[:4]] != [w.lower() for w in text.TS_SPECIALS]:
        raise ValueError(f"tinystories: {path} starts with {vocab[:4]}, not the specials {text.TS_SPECIALS}")
    path = os.path.join(directory, "val_chunks.pkl")
    with open(path, "rb") as handle:
        chunks = _PlainUnpickler(handle).load()
    if not isinstance(chunks, list) or not chunks or not all(isinstance(c, list) for c in chunks):
        raise ValueError(f"tinystories: {path} must hold a non-empty list of token-id lists")
    longest = max(len(c) for c in chunks)
    if longest > seq_len:
        raise ValueError(f"tinystories: {path} has chunks of {longest} tokens; set the task option seq_len >= {longest}")
    out = np.full((len(chunks), seq_len), text.PAD, dtype=text.token_dtype(len(vocab)))
    for row, chunk in enumerate(chunks):
        if chunk and not 0 <= min(chunk) <= max(chunk) < len(vocab):
            raise ValueError(f"tinystories: {path} chunk {row} has ids outside the vocabulary of {len(vocab)}")
        out[row, : len(chunk)] = chunk
    return vocab, out


class _Counted:
    """Counts the documents and bytes that pass through an iterator."""

    def __init__(self) -> None:
        self.documents, self.bytes = 0, 0

    def __call__(self, documents: Iterable[str]) -> Iterator[str]:
        for document in documents:
            self.documents += 1
            self.bytes += len(document.encode("utf-8"))
            yield document


def _hub_stories(split, max_bytes: int | None) -> Iterator[str]:
    used = 0
    for batch in split.iter(batch_size=1000):
        for story in batch["text"]:
            if not story.strip():
                continue
            used += len(story.encode("utf-8"))
            if max_bytes is not None and used > max_bytes:
                return
            yield story
