"""WikiText-2 word-level language modelling, as in paper A.

Source: the HF hub (`Salesforce/wikitext`, config `wikitext-2-raw-v1`), or local files: `data_dir`
holding wiki.{train,valid,test}.tokens (v1), wiki.{train,valid,test}.raw (raw v1) or
{train,valid,test}.txt, or explicit `train_file` / `val_file` / `test_file`. One line = one HF
row. Tokenisation, vocabulary and chunking: `storage.prep.text` (paper A: lowercase, punctuation
split off, top `vocab_size` incl. PAD/BOS/EOS/UNK from train, one stream per split cut into
`seq_len - 2` tokens + BOS + EOS). Metric: best validation perplexity, PAD ignored.
"""

from __future__ import annotations

from typing import Any, Iterator

from storage.prep import text
from storage.prep.sources import content_digest, hf_load, local_hint, local_split_files, progress, read_text_head
from workers.tasks.lm import ChunkLMTask

FILE_NAMES = {
    "train": ["wiki.train.tokens", "wiki.train.raw", "train.txt"],
    "val": ["wiki.valid.tokens", "wiki.valid.raw", "valid.txt", "validation.txt"],
    "test": ["wiki.test.tokens", "wiki.test.raw", "test.txt"],
}
HF_SPLITS = {"train": "train", "val": "validation", "test": "test"}


class WikiText2(ChunkLMTask):
    name = "wikitext2"
    PREP_VERSION = 1
    DEFAULTS: dict[str, Any] = {
        "data_dir": None,  # local directory with the three split files (names above)
        "train_file": None,  # explicit local files; override data_dir's
        "val_file": None,
        "test_file": None,
        "hf_dataset": "Salesforce/wikitext",
        "hf_config": "wikitext-2-raw-v1",
        "hf_revision": None,
        "vocab_size": 10_000,  # including PAD, BOS, EOS, UNK
        "seq_len": 50,  # stored chunk: 48 tokens + BOS + EOS; the model sees 49
        "max_bytes": None,  # use only the first N bytes (whole lines) of each split: quick builds
    }
    HINT = local_hint("wikitext2", "data_dir", "a directory with wiki.{train,valid,test}.tokens (or .raw, or "
                      "{train,valid,test}.txt)", "/data/wikitext-2")

    def _local(self, options) -> dict[str, str] | None:
        explicit = {s: options[f"{s}_file"] for s in FILE_NAMES}
        return local_split_files(self.name, options["data_dir"], explicit, FILE_NAMES, required=("train", "val", "test"))

    def identity(self, options):
        files = self._local(options)
        if files is None:
            source = {"hub": options["hf_dataset"], "config": options["hf_config"], "revision": options["hf_revision"]}
        else:
            source = {split: content_digest(path)["sha256"] for split, path in files.items()}
        params = {k: options[k] for k in ("vocab_size", "seq_len", "max_bytes")}
        return {"task": self.name, "prep": self.PREP_VERSION, "source": source, "params": params}

    def _lines(self, options) -> tuple[dict[str, list[str]], dict[str, Any]]:
        files = self._local(options)
        if files is not None:
            lines = {s: read_text_head(p, options["max_bytes"]).split("\n") for s, p in files.items()}  # "\n" only, as HF rows
            return lines, {"files": files}
        dataset = hf_load(self.name, self.HINT, options["hf_dataset"], options["hf_config"], revision=options["hf_revision"])
        lines = {s: list(_head(dataset[hf]["text"], options["max_bytes"])) for s, hf in HF_SPLITS.items()}
        return lines, {"hub": f"{options['hf_dataset']}/{options['hf_config']}"}

    def build(self, options):
        lines, where = self._lines(options)
        source_bytes = sum(len(line.encode("utf-8")) + 1 for split in lines.values() for line in split)
        lines = {s: [line for line in ls if line.strip()] for s, ls in lines.items()}  # paper A: non-blank rows
        vocab = text.build_vocab(lines["train"], text.wikitext_tokens, options["vocab_size"], text.WT2_SPECIALS)
        tables, stats = {}, {}
        with progress(sum(len(ls) for ls in lines.values()), f"{self.name} tokenise", unit="line") as bar:
            for split, split_lines in lines.items():
                ids = text.encode_stream(_counting(split_lines, bar), text.wikitext_tokens, vocab)
                chunks = text.bookend_chunks(ids, options["seq_len"])
                tables[split] = text.tokens_table(chunks)
                stats[split] = {"tokens": int(len(ids)), "chunks": int(len(chunks)),
                                "scored": text.count_scored(chunks), "unk": int((ids == text.UNK).sum())}
        tables["vocab"] = text.vocab_table(vocab)
        meta = {"vocab_size": len(vocab), "seq_len": options["seq_len"], "splits": stats,
                "source_bytes": source_bytes, "source": where}
        return tables, meta


def _counting(lines: list[str], bar, every: int = 1000) -> Iterator[str]:
    for i, line in enumerate(lines, 1):
        if i % every == 0:
            bar.update(every)
        yield line
    bar.update(len(lines) % every)


def _head(rows, max_bytes: int | None) -> Iterator[str]:
    used = 0
    for row in rows:
        used += len(row.encode("utf-8"))
        if max_bytes is not None and used > max_bytes:
            return
        yield row
