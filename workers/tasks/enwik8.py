"""enwik8 byte-level language modelling (paper B): bits per character on the standard split.

Source: the official http://mattmahoney.net/dc/enwik8.zip (downloaded once, checked against the
known sha256 of enwik8), or a local `data_file`: the raw 100 MB file, the zip, or a head slice.
Split: bytes [0, 90M) / [90M, 95M) / [95M, 100M); on a shorter file the same proportions
(`storage.prep.bytestream.proportional_split`). Vocabulary: the 256 byte values. enwik8's
"characters" are bytes, as in every published enwik8 number.
"""

from __future__ import annotations

import hashlib
from typing import Any

from storage.prep import bytestream
from storage.prep.sources import content_digest, download, local_hint, require_path, SourceUnavailable
from workers.tasks.lm import ByteLMTask


class Enwik8(ByteLMTask):
    name = "enwik8"
    unit = "bpc"
    metric = "val_bpc"
    PREP_VERSION = 1
    DEFAULTS: dict[str, Any] = {
        "data_file": None,  # local enwik8: raw, enwik8.zip, or a head slice
        "url": bytestream.ENWIK8_URL,  # the online source when data_file is not set
        "max_bytes": None,  # use only the first N bytes (a head slice)
        "split_bytes": list(bytestream.ENWIK8_SPLIT),  # train / val / test; proportional on shorter data
        "seq_len": 256,  # model context (windows are cut at read time: not part of the cache)
        "max_eval_tokens": None,  # evaluate on the first N bytes of val/test only (None: all)
    }
    HINT = local_hint("enwik8", "data_file", "the enwik8 file (raw, .zip, or a head slice)", "/data/enwik8")

    def identity(self, options):
        if options["data_file"] is not None:
            path = require_path(self.name, "data_file", options["data_file"])
            source = {"sha256": content_digest(path)["sha256"]}
        elif options["url"] == bytestream.ENWIK8_URL:
            source = {"sha256": bytestream.ENWIK8_SHA256}  # = a local copy of the official raw file
        else:
            source = {"url": options["url"]}
        params = {"max_bytes": options["max_bytes"], "split_bytes": [int(b) for b in options["split_bytes"]]}
        return {"task": self.name, "prep": self.PREP_VERSION, "source": source, "params": params}

    def build(self, options):
        if len(options["split_bytes"]) != 3:
            raise ValueError(f"enwik8: split_bytes={options['split_bytes']} must list train, val, test sizes")
        if options["data_file"] is not None:
            path = require_path(self.name, "data_file", options["data_file"])
            data = bytestream.read_enwik8(path, options["max_bytes"])
        else:
            path = download(self.name, self.HINT, options["url"])
            data = bytestream.read_enwik8(path)
            if options["url"] == bytestream.ENWIK8_URL and hashlib.sha256(data).hexdigest() != bytestream.ENWIK8_SHA256:
                raise SourceUnavailable(f"enwik8: {path} does not unpack to the official enwik8 (sha256 differs); "
                                        f"delete it to download again, or set data_file")
            if options["max_bytes"] is not None:
                data = data[: int(options["max_bytes"])]
        bounds = bytestream.proportional_split(len(data), options["split_bytes"])
        tables = {split: bytestream.stream_table(data[a:b]) for split, (a, b) in zip(bytestream.SPLITS, bounds)}
        meta = {
            "vocab_size": 256,
            "splits": {split: {"bytes": b - a, "start": a} for split, (a, b) in zip(bytestream.SPLITS, bounds)},
            "proportional": sum(int(s) for s in options["split_bytes"]) > len(data),
            "source_bytes": int(len(data)),
            "source": {"file": path},
        }
        return tables, meta
