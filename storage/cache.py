"""Content-addressed dataset cache: prepared splits as Arrow IPC files, memory-mapped on read.

Layout under the cache root (a local path or a pyarrow.fs URI):

    <root>/<name>-<fingerprint>/<split>.arrow     one Arrow IPC file per split
    <root>/<name>-<fingerprint>/manifest.json     identity, sizes, sha256 per split; written last

The fingerprint hashes (source identity, preprocessing parameters, vocabulary, cache format
version): same inputs, same fingerprint; any change, a new entry. A build happens in a temporary
directory and is renamed into place under a lock, so concurrent builders produce one build and no
reader ever sees a partial one. A file whose size or checksum disagrees with the manifest is
detected on open and the entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs

from storage import fs as sfs
from storage.records import canonical_json, stable_hash

FORMAT_VERSION = 1
DEFAULT_ROOT_ENV = "SCALING_CACHE"


def default_root() -> str:
    return os.environ.get(DEFAULT_ROOT_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "oscillator-scaling")


def fingerprint(identity: dict[str, Any]) -> str:
    return stable_hash({"identity": identity, "format": FORMAT_VERSION}, 20)


class CacheCorrupt(RuntimeError):
    pass


@dataclass
class CachedDataset:
    name: str
    fingerprint: str
    path: str
    manifest: dict[str, Any]
    tables: dict[str, pa.Table]

    def __getitem__(self, split: str) -> pa.Table:
        if split not in self.tables:
            raise KeyError(f"dataset {self.name} has no split {split!r}; splits: {sorted(self.tables)}")
        return self.tables[split]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})


def _sha256_file(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class DatasetCache:
    def __init__(self, root_uri: str | None = None) -> None:
        self.uri = root_uri or default_root()
        self.fs, self.root = sfs.resolve(self.uri)
        self._verified: set[str] = set()

    def entry_path(self, name: str, fp: str) -> str:
        return sfs.join(self.root, f"{name}-{fp}")

    def get_or_build(
        self,
        name: str,
        identity: dict[str, Any],
        build: Callable[[], tuple[dict[str, pa.Table], dict[str, Any]]],
    ) -> CachedDataset:
        """Open the entry for (name, identity), building it once if it is missing or corrupt.

        `build` returns ({split: table}, meta), meta being small JSON facts (vocabulary size, ...).
        """
        fp = fingerprint(identity)
        path = self.entry_path(name, fp)
        try:
            return self.open(name, fp)
        except (FileNotFoundError, CacheCorrupt):
            pass
        with self._lock(name, fp):
            try:  # another process may have built it while we waited
                return self.open(name, fp)
            except CacheCorrupt:
                self._remove(path)
            except FileNotFoundError:
                pass
            tables, meta = build()
            self._write(name, fp, identity, tables, meta)
        return self.open(name, fp)

    def open(self, name: str, fp: str, verify: bool | None = None) -> CachedDataset:
        path = self.entry_path(name, fp)
        manifest_path = sfs.join(path, "manifest.json")
        if not sfs.exists(self.fs, manifest_path):
            raise FileNotFoundError(manifest_path)
        manifest = json.loads(sfs.read_bytes(self.fs, manifest_path))
        check_sums = path not in self._verified if verify is None else verify
        tables = {}
        for split, info in manifest["splits"].items():
            file_path = sfs.join(path, info["file"])
            file_info = self.fs.get_file_info(file_path)
            if file_info.type == pafs.FileType.NotFound or file_info.size != info["bytes"]:
                raise CacheCorrupt(f"{file_path}: size {file_info.size} != manifest {info['bytes']}")
            if check_sums and _sha256_file(self.fs, file_path) != info["sha256"]:
                raise CacheCorrupt(f"{file_path}: checksum differs from the manifest")
            tables[split] = self._read_table(file_path)
        self._verified.add(path)
        return CachedDataset(name, fp, path, manifest, tables)

    def _read_table(self, path: str) -> pa.Table:
        if isinstance(self.fs, pafs.LocalFileSystem):
            source = pa.memory_map(path, "r")  # zero-copy: every worker shares the page cache
        else:
            source = self.fs.open_input_file(path)
        return pa.ipc.open_file(source).read_all()

    def _write(self, name, fp, identity, tables, meta) -> None:
        final = self.entry_path(name, fp)
        tmp = sfs.join(self.root, f".tmp-{name}-{fp}-{uuid.uuid4().hex[:8]}")
        self.fs.create_dir(tmp, recursive=True)
        splits = {}
        for split, table in tables.items():
            file_path = sfs.join(tmp, f"{split}.arrow")
            with self.fs.open_output_stream(file_path) as sink:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
            splits[split] = {
                "file": f"{split}.arrow",
                "rows": table.num_rows,
                "bytes": self.fs.get_file_info(file_path).size,
                "sha256": _sha256_file(self.fs, file_path),
            }
        manifest = {
            "name": name,
            "fingerprint": fp,
            "identity": identity,
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "splits": splits,
            "meta": meta,
        }
        with self.fs.open_output_stream(sfs.join(tmp, "manifest.json")) as out:
            out.write(canonical_json(manifest).encode())
        self._remove(final)
        self.fs.move(tmp, final)

    def _remove(self, path: str) -> None:
        if sfs.exists(self.fs, path):
            self.fs.delete_dir(path)
            self._verified.discard(path)

    def _lock(self, name: str, fp: str):
        """An exclusive lock for one entry: a file lock on local/shared volumes."""
        import filelock  # installed with `datasets`

        if isinstance(self.fs, pafs.LocalFileSystem):
            os.makedirs(self.root, exist_ok=True)
            return filelock.FileLock(os.path.join(self.root, f".{name}-{fp}.lock"))
        # Object stores have no locks; two concurrent builders write identical content, and the
        # manifest (written last) makes the entry visible, so the race is harmless.
        return _NullLock()

    def entries(self) -> list[dict[str, Any]]:
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        out = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.Directory or info.base_name.startswith("."):
                continue
            manifest_path = sfs.join(info.path, "manifest.json")
            if sfs.exists(self.fs, manifest_path):
                out.append(json.loads(sfs.read_bytes(self.fs, manifest_path)))
        return out


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


