"""CodeParrot byte-level language modelling (paper B): bits per byte of Python source.

Source: the HF hub `codeparrot/codeparrot-clean` (streamed: only the bytes needed are fetched), or
any local directory tree of source files (`data_dir`, files filtered by `extensions`; Python's
standard library serves). Documents are assigned to train / val / test by a hash of their bytes,
in proportion to `split_bytes`, each followed by a NUL end-of-document byte, until every split's
budget is full (`storage.prep.bytestream.pack_documents`). Vocabulary: the 256 byte values.
"""

from __future__ import annotations

from typing import Any, Iterator

from storage.prep import bytestream
from storage.prep.sources import content_digest, hf_load, local_hint, progress, require_path, tree_files
from workers.tasks.lm import ByteLMTask


class CodeParrot(ByteLMTask):
    name = "codeparrot"
    unit = "bpb"
    metric = "val_bpb"
    PREP_VERSION = 1
    DEFAULTS: dict[str, Any] = {
        "data_dir": None,  # a local tree of source files (else the hub)
        "extensions": [".py"],  # which local files are documents
        "max_file_bytes": 1_000_000,  # skip larger files (generated code, data dumps)
        "hf_dataset": "codeparrot/codeparrot-clean",
        "hf_revision": None,
        "split_bytes": [100_000_000, 5_000_000, 5_000_000],  # train / val / test budgets
        "seq_len": 256,  # model context (windows are cut at read time: not part of the cache)
        "max_eval_tokens": None,  # evaluate on the first N bytes of val/test only (None: all)
    }
    HINT = local_hint("codeparrot", "data_dir", "a directory tree of Python files", "/usr/lib/python3.11")

    def identity(self, options):
        if options["data_dir"] is not None:
            root = require_path(self.name, "data_dir", options["data_dir"], "dir")
            files = tree_files(root, options["extensions"])
            source = {"tree": content_digest(root, files)["sha256"], "extensions": sorted(options["extensions"])}
        else:
            source = {"hub": options["hf_dataset"], "revision": options["hf_revision"]}
        params = {"split_bytes": [int(b) for b in options["split_bytes"]], "max_file_bytes": options["max_file_bytes"]}
        return {"task": self.name, "prep": self.PREP_VERSION, "source": source, "params": params}

    def build(self, options):
        budgets = [int(b) for b in options["split_bytes"]]
        if len(budgets) != 3 or min(budgets) <= 0:
            raise ValueError(f"codeparrot: split_bytes={options['split_bytes']} must be three positive sizes")
        if options["data_dir"] is not None:
            root = require_path(self.name, "data_dir", options["data_dir"], "dir")
            files = tree_files(root, options["extensions"])
            documents = bytestream.iter_tree(root, files, options["max_file_bytes"])
            where: dict[str, Any] = {"tree": root, "files": len(files)}
        else:
            stream = hf_load(self.name, self.HINT, options["hf_dataset"], split="train",
                             revision=options["hf_revision"], streaming=True)
            documents = _hub_documents(stream, options["max_file_bytes"])
            where = {"hub": options["hf_dataset"]}
        with progress(sum(budgets), f"{self.name} pack") as bar:
            streams, stats = bytestream.pack_documents(documents, budgets, on_document=bar.update)
        for split, data in zip(bytestream.SPLITS, streams):
            if len(data) < 2:
                raise ValueError(f"codeparrot: the {split} split got {len(data)} bytes; give a larger source "
                                 f"(data_dir) or a larger share in split_bytes")
        tables = {split: bytestream.stream_table(data) for split, data in zip(bytestream.SPLITS, streams)}
        meta = {
            "vocab_size": 256,
            "splits": {split: {"bytes": int(len(data)), "documents": n}
                       for split, data, n in zip(bytestream.SPLITS, streams, stats["documents"])},
            "skipped_binary": stats["skipped_binary"],
            "source_bytes": stats["input_bytes"],
            "source": where,
        }
        return tables, meta


def _hub_documents(stream, max_file_bytes: int | None) -> Iterator[bytes]:
    for row in stream:
        data = row["content"].encode("utf-8")
        if max_file_bytes is None or len(data) <= max_file_bytes:
            yield data
