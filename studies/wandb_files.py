"""Read W&B's offline run files (`offline-run-*/run-<id>.wandb`): which runs hold history, and what.

wandb >= 0.19 writes them from its Go core and ships no Python reader. The format is W&B's
transaction log: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB-log records in
32 KiB blocks (CRC32 4 bytes, length 2, type 1: full, first, middle, last), each one a protobuf
`wandb_internal_pb2.Record`. Used to remove header-only leftovers of interrupted trials before a
resumed trial logs under the same id, and by the tests to check what was logged.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import struct
from typing import Any, Iterator

log = logging.getLogger(__name__)

HEADER = struct.Struct("<4sHB")
IDENT, MAGIC = b":W&B", 0xBEE1
BLOCK = 32 * 1024
RECORD_HEADER = 7  # crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str) -> Iterator[Any]:
    """Every complete record of a .wandb file, in order (a record cut short at the end is skipped:
    the file of a killed process)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < HEADER.size:
        return
    ident, magic, _version = HEADER.unpack_from(data)
    if ident != IDENT or magic != MAGIC:
        raise ValueError(f"{path}: not a W&B run file (header {data[:HEADER.size]!r})")
    offset, parts = HEADER.size, []
    while offset + RECORD_HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < RECORD_HEADER:  # block trailer padding
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, offset)
        start, offset = offset + RECORD_HEADER, offset + RECORD_HEADER + length
        if offset > len(data) or kind == 0:
            return
        chunk = data[start:offset]
        if kind == FULL:
            parts = [chunk]
        elif kind == FIRST:
            parts = [chunk]
            continue
        elif kind == MIDDLE:
            parts.append(chunk)
            continue
        else:
            parts.append(chunk)
        record = pb.Record()
        record.ParseFromString(b"".join(parts))
        parts = []
        yield record


def read_run(path: str) -> dict[str, Any]:
    """{'id', 'history': [rows], 'config': {...}, 'summary': {...}, 'exit_code', 'preempting'}."""
    out: dict[str, Any] = {"id": None, "history": [], "config": {}, "summary": {}, "exit_code": None,
                           "preempting": False}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["id"] = record.run.run_id
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
        elif kind == "preempting":
            out["preempting"] = True
    return out


def _items(items) -> dict[str, Any]:
    out = {}
    for item in items:
        name = item.key or "/".join(item.nested_key)
        try:
            value = json.loads(item.value_json)
        except ValueError:
            value = item.value_json
        if isinstance(value, dict) and set(value) == {"desc", "value"}:  # config entries
            value = value["value"]
        out[name] = value
    return out


def offline_runs(wandb_dir: str, run_id: str) -> list[str]:
    """The offline run directories of one run id, oldest first (W&B writes them under WANDB_DIR/wandb)."""
    pattern = os.path.join(glob.escape(wandb_dir), "wandb", f"offline-run-*-{glob.escape(run_id)}")
    return sorted(glob.glob(pattern))


def run_file(run_dir: str) -> str | None:
    files = glob.glob(os.path.join(glob.escape(run_dir), "*.wandb"))
    return files[0] if files else None


def remove_empty_runs(wandb_dir: str, run_id: str, keep: str | None = None) -> list[str]:
    """Delete this run id's offline directories that hold no history row (an attempt killed before
    it logged anything: `wandb sync` would upload a header-only run beside the real one). `keep`
    (the attempt now running) is never touched. Returns the directories removed."""
    removed = []
    for run_dir in offline_runs(wandb_dir, run_id):
        if keep and os.path.abspath(run_dir) == os.path.abspath(keep):
            continue
        path = run_file(run_dir)
        try:
            empty = path is None or not read_run(path)["history"]
        except Exception as error:  # noqa: BLE001 -- an unreadable file is left for a person to judge
            log.warning("W&B run file %s unreadable (%s: %s); left in place", path, type(error).__name__, error)
            continue
        if empty:
            shutil.rmtree(run_dir, ignore_errors=True)
            removed.append(run_dir)
    return removed
