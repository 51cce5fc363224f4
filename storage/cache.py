"""Content-addressed dataset cache: prepared splits as Arrow IPC files, memory-mapped on read.

Layout under the cache root (a local path, a shared volume, or a pyarrow.fs URI such as s3://...):

    <root>/<name>-<fingerprint>/<split>.arrow     one Arrow IPC file per split (or per extra table)
    <root>/<name>-<fingerprint>/manifest.json     identity, request, sizes, checksums; written last
    <root>/refs/<name>-<request hash>.json        the fingerprint last built for a request (below)
    <root>/.locks/<name>-<fingerprint>.lock       one lock file per entry (local and shared volumes)

The fingerprint hashes (source identity, preprocessing parameters, vocabulary, cache format
version): same inputs, same fingerprint; any change, a new entry. A build happens in a temporary
directory that is renamed into place under a lock, so concurrent builders produce one build and no
reader ever sees a partial one. Object stores have neither locks nor directory renames: there the
split files get a per-build name and the manifest, one atomic PUT written last, makes the entry
visible, so a reader sees a complete entry or none (two racing builders may both build; each
manifest names only its own, complete files).

Every open checks each file's size against the manifest, and, once per cache object and file, a fast
checksum (xxh3-128, ~20 GB/s) of its bytes; `verify(full=True)` re-checks sha256 as well. A
mismatch raises `CacheCorrupt`, and `get_or_build` then rebuilds the entry: a damaged file is never
silently used.

A *request* is what a caller asked for (task name + options, e.g. a local source path). Its
fingerprint is recorded under refs/, so a worker that cannot see the source files (a node without
the dataset mounted) can still open the entry the driver built for the same request.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.fs as pafs

from storage import fs as sfs
from storage.records import canonical_json, stable_hash

FORMAT_VERSION = 1
DEFAULT_ROOT_ENV = "SCALING_CACHE"
MANIFEST = "manifest.json"
LOCK_WAIT_NOTICE_S = 30.0

def default_root() -> str:
    return os.environ.get(DEFAULT_ROOT_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "oscillator-scaling")


def fingerprint(identity: dict[str, Any]) -> str:
    return stable_hash({"identity": identity, "format": FORMAT_VERSION}, 20)


def request_key(request: dict[str, Any]) -> str:
    return stable_hash({"request": request, "format": FORMAT_VERSION}, 20)


class NotCached(LookupError):
    """A split that is not in the cache yet, asked for by a caller that must not build it
    (`scaling plan`); the message says how to build it."""


class CacheCorrupt(RuntimeError):
    pass


@dataclass
class CachedDataset:
    name: str
    fingerprint: str
    path: str  # in the cache's filesystem (no scheme)
    manifest: dict[str, Any]
    tables: dict[str, pa.Table]
    uri: str = ""  # the same with its scheme (s3://...), for printing

    def __getitem__(self, split: str) -> pa.Table:
        if split not in self.tables:
            raise KeyError(f"dataset {self.name} has no split {split!r}; splits: {sorted(self.tables)}")
        return self.tables[split]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

    @property
    def nbytes(self) -> int:
        return sum(int(info["bytes"]) for info in self.manifest["splits"].values())


def _digests(data) -> dict[str, str]:
    import xxhash  # a dependency of `datasets`; listed in pyproject too

    return {"sha256": hashlib.sha256(data).hexdigest(), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}


def _xxh3(data) -> str:
    import xxhash

    return xxhash.xxh3_128(data).hexdigest()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class DatasetCache:
    """The cache under one root. `filesystem` lets a caller pass a ready pyarrow filesystem (tests
    use pyarrow's in-memory mock); otherwise the root URI is resolved through `storage.fs`."""

    def __init__(self, root_uri: str | None = None, filesystem: pafs.FileSystem | None = None) -> None:
        self.uri = root_uri or default_root()
        if filesystem is not None:
            self.fs, self.root = filesystem, self.uri
        else:
            self.fs, self.root = sfs.resolve(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self._verified: set[tuple[str, str, str]] = set()  # (entry, build id, split) checked by this instance

    # ---- paths ---------------------------------------------------------------------------------
    def entry_path(self, name: str, fp: str) -> str:
        return sfs.join(self.root, f"{name}-{fp}")

    def _ref_path(self, name: str, request: dict[str, Any]) -> str:
        return sfs.join(self.root, "refs", f"{name}-{request_key(request)}.json")

    # ---- the main entry point ------------------------------------------------------------------
    def get_or_build(
        self,
        name: str,
        identity: dict[str, Any],
        build: Callable[[], tuple[dict[str, pa.Table], dict[str, Any]]],
        request: dict[str, Any] | None = None,
    ) -> CachedDataset:
        """Open the entry for (name, identity), building it once if it is missing or corrupt.

        `build` returns ({split: table}, meta), meta being small JSON facts (vocabulary size, ...).
        `request` (task + options as given) is recorded so that `open_request` finds the entry.
        """
        fp = fingerprint(identity)
        try:
            entry = self.open(name, fp)
        except FileNotFoundError:
            entry = None
        except CacheCorrupt as error:
            print(f"cache: {error}; rebuilding {name}-{fp}", file=sys.stderr)
            entry = None
        if entry is None:
            with self._lock(name, fp):
                try:  # another process may have built it while we waited
                    entry = self.open(name, fp)
                except CacheCorrupt:
                    self.remove(name, fp)
                except FileNotFoundError:
                    pass
                if entry is None:
                    self._clear_stale_temps(name, fp)
                    t0 = time.perf_counter()
                    tables, meta = build()
                    seconds = time.perf_counter() - t0
                    self._write(name, fp, identity, request, tables, meta, seconds)
                    entry = self.open(name, fp)
        if request is not None:
            self._write_ref(name, request, fp)
        return entry

    def get(self, name: str, identity: dict[str, Any]) -> CachedDataset | None:
        """Open the entry for (name, identity) if it is there, building nothing and checking sizes
        only (memory-mapped: its arrays' shapes cost no reading); None when it is missing or damaged."""
        try:
            return self.open(name, fingerprint(identity), verify=False)
        except (FileNotFoundError, CacheCorrupt):
            return None

    def open_request(self, name: str, request: dict[str, Any]) -> CachedDataset | None:
        """The entry last built for this request, or None when there is none. Raises CacheCorrupt
        when it is damaged (only a machine that has the source can rebuild it)."""
        path = self._ref_path(name, request)
        if not sfs.exists(self.fs, path):
            return None
        fp = json.loads(sfs.read_bytes(self.fs, path))["fingerprint"]
        try:
            return self.open(name, fp)
        except FileNotFoundError:
            return None

    # ---- reading -------------------------------------------------------------------------------
    def read_manifest(self, name: str, fp: str) -> dict[str, Any]:
        path = sfs.join(self.entry_path(name, fp), MANIFEST)
        if not sfs.exists(self.fs, path):
            raise FileNotFoundError(path)
        try:
            manifest = json.loads(sfs.read_bytes(self.fs, path))
        except (ValueError, UnicodeDecodeError) as error:
            raise CacheCorrupt(f"{sfs.uri(self.fs, path)}: unreadable manifest ({error})") from error
        if manifest.get("fingerprint") != fp or not isinstance(manifest.get("splits"), dict):
            raise CacheCorrupt(f"{sfs.uri(self.fs, path)}: manifest does not describe entry {name}-{fp}")
        return manifest

    def open(self, name: str, fp: str, verify: bool | None = None) -> CachedDataset:
        """Memory-map an entry. Sizes are always checked; checksums once per process and file
        (verify=True: always; verify=False: never). Raises FileNotFoundError or CacheCorrupt."""
        path = self.entry_path(name, fp)
        manifest = self.read_manifest(name, fp)
        build_id = str(manifest.get("build_id", manifest.get("created", "")))
        tables = {}
        for split, info in manifest["splits"].items():
            file_path = sfs.join(path, info["file"])
            file_info = self.fs.get_file_info(file_path)
            if file_info.type == pafs.FileType.NotFound:
                raise CacheCorrupt(f"{sfs.uri(self.fs, file_path)}: missing (the manifest lists it)")
            if file_info.size != info["bytes"]:
                raise CacheCorrupt(f"{sfs.uri(self.fs, file_path)}: size {file_info.size} != manifest {info['bytes']}")
            key = (path, build_id, split)
            check = key not in self._verified if verify is None else verify
            buffer = self._read_buffer(file_path, info["bytes"])
            if check:
                self._check_sums(sfs.uri(self.fs, file_path), buffer, info, full=False)
                self._verified.add(key)
            try:
                table = pa.ipc.open_file(buffer).read_all()
            except (pa.ArrowInvalid, OSError) as error:
                raise CacheCorrupt(f"{sfs.uri(self.fs, file_path)}: not a readable Arrow file ({error})") from error
            if table.num_rows != info["rows"]:
                raise CacheCorrupt(f"{sfs.uri(self.fs, file_path)}: {table.num_rows} rows != manifest {info['rows']}")
            tables[split] = table
        return CachedDataset(name, fp, path, manifest, tables, sfs.uri(self.fs, path))

    def _read_buffer(self, path: str, size: int) -> pa.Buffer:
        if self.local:
            return pa.memory_map(path, "r").read_buffer(size)  # zero-copy: workers share the page cache
        with self.fs.open_input_file(path) as stream:  # object store: one download, kept in memory
            return stream.read_buffer(size)

    @staticmethod
    def _check_sums(path: str, buffer: pa.Buffer, info: dict[str, Any], full: bool) -> None:
        if "xxh3_128" in info and _xxh3(buffer) != info["xxh3_128"]:
            raise CacheCorrupt(f"{path}: checksum (xxh3-128) differs from the manifest")
        if (full or "xxh3_128" not in info) and hashlib.sha256(buffer).hexdigest() != info["sha256"]:
            raise CacheCorrupt(f"{path}: sha256 differs from the manifest")

    # ---- writing -------------------------------------------------------------------------------
    def _write(self, name, fp, identity, request, tables, meta, seconds) -> None:
        build_id = uuid.uuid4().hex[:12]
        final = self.entry_path(name, fp)
        if self.local:
            directory = sfs.join(self.root, f".tmp-{name}-{fp}-{build_id}")
            file_name = "{split}.arrow"
        else:  # no directory rename on object stores: per-build file names, manifest last
            directory = final
            file_name = "{split}-" + build_id + ".arrow"
        self.fs.create_dir(directory, recursive=True)
        splits = {}
        for split, table in tables.items():
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            data = sink.getvalue()
            file = file_name.format(split=split)
            with self.fs.open_output_stream(sfs.join(directory, file)) as out:
                out.write(data)
            splits[split] = {"file": file, "rows": table.num_rows, "bytes": data.size, **_digests(data)}
        manifest = {
            "name": name,
            "fingerprint": fp,
            "identity": identity,
            "request": request,
            "format_version": FORMAT_VERSION,
            "created": _now(),
            "build_id": build_id,
            "build_seconds": round(seconds, 6),
            "splits": splits,
            "meta": meta,
        }
        with self.fs.open_output_stream(sfs.join(directory, MANIFEST)) as out:
            out.write(canonical_json(manifest).encode())
        if self.local:
            if sfs.exists(self.fs, final):
                self.fs.delete_dir(final)
            self.fs.move(directory, final)  # one rename: the entry appears complete or not at all

    def _write_ref(self, name: str, request: dict[str, Any], fp: str) -> None:
        path = self._ref_path(name, request)
        data = canonical_json({"fingerprint": fp, "request": request}).encode()
        try:
            if sfs.exists(self.fs, path) and sfs.read_bytes(self.fs, path) == data:
                return
            sfs.write_bytes_atomic(self.fs, path, data)
        except OSError as error:  # a read-only cache mount still serves entries
            print(f"cache: could not record {sfs.uri(self.fs, path)} ({error})", file=sys.stderr)

    def remove(self, name: str, fp: str) -> None:
        path = self.entry_path(name, fp)
        if sfs.exists(self.fs, path):
            self.fs.delete_dir(path)

    def _clear_stale_temps(self, name: str, fp: str) -> None:
        """Under the entry's lock, a temp dir of the same entry can only be a dead builder's."""
        if not self.local:
            return
        prefix = f".tmp-{name}-{fp}-"
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True)):
            if info.base_name.startswith(prefix):
                self.fs.delete_dir(info.path)

    def _lock(self, name: str, fp: str):
        """An exclusive lock for one entry: a file lock on local and shared (NFS/PVC) volumes."""
        if not self.local:
            # Object stores have no locks; racing builders each write complete, uniquely named
            # files and an atomic manifest, so the race costs duplicate work, never a bad read.
            return _NullLock()
        os.makedirs(os.path.join(self.root, ".locks"), exist_ok=True)
        return _WaitingLock(os.path.join(self.root, ".locks", f"{name}-{fp}.lock"), f"{name}-{fp}")

    # ---- listing and verification ----------------------------------------------------------------
    def entries(self) -> list[dict[str, Any]]:
        """Manifests of every complete entry, oldest first."""
        out = []
        for info in self._list_root():
            if info.type != pafs.FileType.Directory or info.base_name.startswith(".") or info.base_name == "refs":
                continue
            manifest_path = sfs.join(info.path, MANIFEST)
            if not sfs.exists(self.fs, manifest_path):
                continue
            try:
                manifest = json.loads(sfs.read_bytes(self.fs, manifest_path))
            except ValueError:
                manifest = {"name": info.base_name.rsplit("-", 1)[0], "fingerprint": info.base_name.rsplit("-", 1)[-1],
                            "splits": {}, "unreadable": True}
            out.append(manifest)
        return sorted(out, key=lambda m: (m.get("created", ""), m.get("name", "")))

    def _list_root(self) -> Iterable[pafs.FileInfo]:
        return self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))

    def verify(self, full: bool = True) -> list[dict[str, Any]]:
        """Check every entry (sizes, sha256 when `full`, xxh3, Arrow readability): one row per entry
        with `ok` and `problem`, plus rows for leftover temporary directories of dead builders."""
        rows = []
        for manifest in self.entries():
            name, fp = manifest.get("name", "?"), manifest.get("fingerprint", "?")
            row = {"name": name, "fingerprint": fp, "ok": True, "problem": "", "bytes": 0, "kind": "entry"}
            try:
                if manifest.get("unreadable"):
                    raise CacheCorrupt("unreadable manifest")
                manifest = self.read_manifest(name, fp)
                path = self.entry_path(name, fp)
                for split, info in manifest["splits"].items():
                    file_path = sfs.join(path, info["file"])
                    file_info = self.fs.get_file_info(file_path)
                    if file_info.type == pafs.FileType.NotFound or file_info.size != info["bytes"]:
                        raise CacheCorrupt(f"{split}: size {file_info.size} != manifest {info['bytes']}")
                    buffer = self._read_buffer(file_path, info["bytes"])
                    self._check_sums(sfs.uri(self.fs, file_path), buffer, info, full=full)
                    if pa.ipc.open_file(buffer).read_all().num_rows != info["rows"]:
                        raise CacheCorrupt(f"{split}: row count differs from the manifest")
                    row["bytes"] += info["bytes"]
            except (CacheCorrupt, pa.ArrowInvalid, OSError) as error:
                row.update(ok=False, problem=str(error))
            rows.append(row)
        for info in self._list_root():
            if info.base_name.startswith(".tmp-"):
                rows.append({"name": info.base_name, "fingerprint": "", "ok": False, "kind": "temp",
                             "problem": "temporary directory of an unfinished build", "bytes": 0})
        return rows

    def remove_path(self, base_name: str) -> None:
        self.fs.delete_dir(sfs.join(self.root, base_name))


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _WaitingLock:
    """filelock.FileLock (flock, released by the kernel if a builder dies) that says what it waits for."""

    def __init__(self, path: str, what: str) -> None:
        import filelock  # installed with `datasets`; listed in pyproject too

        self._lock = filelock.FileLock(path)
        self._timeout = filelock.Timeout
        self._what = what

    def __enter__(self):
        waited = 0.0
        while True:
            try:
                self._lock.acquire(timeout=LOCK_WAIT_NOTICE_S)
                return self
            except self._timeout:
                waited += LOCK_WAIT_NOTICE_S
                print(f"cache: waiting {waited:.0f}s for another process building {self._what}", file=sys.stderr)

    def __exit__(self, *exc):
        self._lock.release()
        return False
