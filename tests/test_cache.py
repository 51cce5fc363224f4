"""storage.cache: fingerprints, atomic builds under a lock, damage detection and rebuild, request refs,
listing / verification and the `scaling cache` CLI. The backend suite runs once per storage backend:
a local path, a file:// URI, and pyarrow's in-memory mock filesystem (the object-store code path:
no lock, no rename, per-build file names, manifest written last)."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

import storage.cache as cache_mod
from storage import fs as sfs
from storage.cache import CacheCorrupt, DatasetCache, fingerprint, request_key


class Counter:
    def __init__(self, n: int = 100) -> None:
        self.calls, self.n = 0, n

    def __call__(self):
        self.calls += 1
        return {"train": pa.table({"x": np.arange(self.n)}), "val": pa.table({"x": [1, 2, 3]})}, {"vocab_size": 7}


@pytest.fixture(params=["local", "file_uri", "mock"])
def make_cache(request, tmp_path):
    """A factory of DatasetCache objects on one root: each call is a fresh 'process' view."""
    if request.param == "local":
        return lambda: DatasetCache(str(tmp_path / "cache"))
    if request.param == "file_uri":
        return lambda: DatasetCache(f"file://{tmp_path / 'cache'}")
    mock = pafs._MockFileSystem()
    return lambda: DatasetCache("bucket/cache", filesystem=mock)


def _file(cache: DatasetCache, entry, split: str) -> str:
    return sfs.join(entry.path, entry.manifest["splits"][split]["file"])


def _rewrite(cache: DatasetCache, path: str, data: bytes) -> None:
    with cache.fs.open_output_stream(path) as out:
        out.write(data)


# ---- fingerprints ------------------------------------------------------------------------------------


def test_fingerprint_is_stable_and_sensitive():
    identity = {"task": "t", "source": {"train": "abc", "val": "def"}, "params": {"vocab_size": 10, "seq_len": 50}}
    reordered = {"params": {"seq_len": 50, "vocab_size": 10}, "source": {"val": "def", "train": "abc"}, "task": "t"}
    assert fingerprint(identity) == fingerprint(reordered)
    assert fingerprint(identity) == fingerprint(dict(identity))  # a pure function of the content
    changed = [
        {**identity, "task": "u"},
        {**identity, "source": {"train": "abd", "val": "def"}},  # one source byte
        {**identity, "params": {"vocab_size": 11, "seq_len": 50}},  # vocabulary
        {**identity, "params": {"vocab_size": 10, "seq_len": 51}},  # preprocessing
        {**identity, "params": {"vocab_size": 10, "seq_len": 50, "extra": None}},
    ]
    prints = {fingerprint(c) for c in changed}
    assert len(prints) == len(changed) and fingerprint(identity) not in prints


def test_format_version_is_part_of_the_fingerprint(monkeypatch):
    identity = {"task": "t"}
    before = fingerprint(identity)
    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", cache_mod.FORMAT_VERSION + 1)
    assert cache_mod.fingerprint(identity) != before
    assert request_key({"a": 1}) != request_key({"a": 2})


# ---- the backend suite -------------------------------------------------------------------------------


def test_builds_once_then_opens(make_cache):
    build = Counter()
    first = make_cache().get_or_build("toy", {"n": 100}, build)
    second = make_cache().get_or_build("toy", {"n": 100}, build)
    assert build.calls == 1
    assert first.fingerprint == second.fingerprint == fingerprint({"n": 100})
    assert second["train"].column("x").to_pylist() == list(range(100))
    assert second.meta == {"vocab_size": 7}
    info = second.manifest["splits"]["train"]
    assert info["rows"] == 100 and len(info["sha256"]) == 64 and len(info["xxh3_128"]) == 32
    other = make_cache().get_or_build("toy", {"n": 101}, Counter(101))
    assert other.fingerprint != first.fingerprint
    assert sorted(m["fingerprint"] for m in make_cache().entries()) == sorted([first.fingerprint, other.fingerprint])
    assert all(r["ok"] for r in make_cache().verify())


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_damage_is_detected_on_open_and_rebuilt(make_cache, damage):
    build = Counter()
    entry = make_cache().get_or_build("toy", {"n": 100}, build)
    path = _file(make_cache(), entry, "train")
    cache = make_cache()
    data = bytearray(sfs.read_bytes(cache.fs, path))
    if damage == "truncate":
        _rewrite(cache, path, bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit, same size
        _rewrite(cache, path, bytes(data))
    elif damage == "delete":
        cache.fs.delete_file(path)
    else:
        _rewrite(cache, sfs.join(entry.path, "manifest.json"), b'{"fingerprint": "trunc')
    with pytest.raises(CacheCorrupt):
        make_cache().open("toy", entry.fingerprint)
    problems = [r for r in make_cache().verify() if not r["ok"]]
    assert [r["fingerprint"] for r in problems] == [entry.fingerprint]
    rebuilt = make_cache().get_or_build("toy", {"n": 100}, build)
    assert build.calls == 2
    assert rebuilt["train"].column("x").to_pylist() == list(range(100))
    assert all(r["ok"] for r in make_cache().verify())


def test_a_checked_file_is_not_rehashed_by_the_same_cache_object(make_cache, monkeypatch):
    cache = make_cache()
    entry = cache.get_or_build("toy", {"n": 100}, Counter())
    calls = []
    real = cache_mod._xxh3
    monkeypatch.setattr(cache_mod, "_xxh3", lambda data: calls.append(1) or real(data))
    cache.open("toy", entry.fingerprint)
    cache.open("toy", entry.fingerprint)
    assert calls == []  # checked when it was first opened (after the build)
    make_cache().open("toy", entry.fingerprint)
    assert len(calls) == 2  # a fresh cache object (a new worker) checks each split once


def test_request_ref_finds_the_entry_without_the_identity(make_cache):
    request = {"task": "toy", "options": {"data_dir": "/somewhere"}}
    entry = make_cache().get_or_build("toy", {"source": "sha-of-content"}, Counter(), request=request)
    found = make_cache().open_request("toy", request)
    assert found is not None and found.fingerprint == entry.fingerprint
    assert found.manifest["request"] == request
    assert make_cache().open_request("toy", {"task": "toy", "options": {"data_dir": "/elsewhere"}}) is None
    assert [m["name"] for m in make_cache().entries()] == ["toy"]  # refs/ is not an entry


def test_object_store_layout_has_no_temp_dirs_and_per_build_names(tmp_path):
    mock = pafs._MockFileSystem()
    cache = DatasetCache("bucket/cache", filesystem=mock)
    assert not cache.local
    entry = cache.get_or_build("toy", {"n": 1}, Counter())
    names = {info.base_name for info in mock.get_file_info(pafs.FileSelector("bucket/cache", recursive=True))}
    build_id = entry.manifest["build_id"]
    assert {f"train-{build_id}.arrow", f"val-{build_id}.arrow", "manifest.json"} <= names
    assert not [n for n in names if n.startswith(".tmp-")]


# ---- local: atomicity and concurrency -----------------------------------------------------------------


def _slow_builder(root, rows, marker_dir):
    def build():
        open(os.path.join(marker_dir, f"build-{os.getpid()}"), "w").close()
        time.sleep(0.3)
        return {"train": pa.table({"x": np.arange(rows, dtype=np.int64)})}, {}

    DatasetCache(root).get_or_build("big", {"rows": rows}, build)


def test_readers_never_see_a_partial_entry(tmp_path):
    """A reader polling while another process writes a 64 MB split sees nothing, then all of it."""
    root, rows = str(tmp_path / "cache"), 8_000_000
    markers = tmp_path / "markers"
    markers.mkdir()
    ctx = mp.get_context("spawn")
    builder = ctx.Process(target=_slow_builder, args=(root, rows, str(markers)))
    builder.start()
    fp = fingerprint({"rows": rows})
    seen_missing, deadline = 0, time.time() + 60
    while time.time() < deadline:
        try:
            entry = DatasetCache(root).open("big", fp)
            break
        except FileNotFoundError:
            seen_missing += 1
        # CacheCorrupt here would mean a half-written entry was visible: the test fails
    builder.join(30)
    assert builder.exitcode == 0
    assert seen_missing > 0  # the poller did run while the entry was being built
    assert entry["train"].num_rows == rows and entry["train"].column("x")[rows - 1].as_py() == rows - 1
    assert len(list(markers.iterdir())) == 1


def _racing_builder(root, marker_dir, queue):
    def build():
        open(os.path.join(marker_dir, f"build-{os.getpid()}"), "w").close()
        time.sleep(0.5)
        return Counter()()

    entry = DatasetCache(root).get_or_build("toy", {"n": 100}, build, request={"task": "toy", "options": {}})
    queue.put((entry.fingerprint, entry["train"].num_rows))


def test_three_concurrent_builders_make_one_build(tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_racing_builder, args=(str(tmp_path / "cache"), str(markers), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    results = [queue.get(timeout=5) for _ in procs]
    assert len(set(results)) == 1 and results[0][1] == 100
    assert len(list(markers.iterdir())) == 1
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp-")]


def test_a_dead_builders_temp_dir_is_reported_and_cleared(tmp_path):
    root = tmp_path / "cache"
    fp = fingerprint({"n": 100})
    stale = root / f".tmp-toy-{fp}-deadbeef0000"
    stale.mkdir(parents=True)
    (stale / "train.arrow").write_bytes(b"half a file")
    cache = DatasetCache(str(root))
    assert [r["kind"] for r in cache.verify() if not r["ok"]] == ["temp"]
    cache.get_or_build("toy", {"n": 100}, Counter())
    assert not stale.exists()  # under the entry's lock, it can only be a dead builder's
    assert all(r["ok"] for r in cache.verify())


# ---- CLI ---------------------------------------------------------------------------------------------


def test_cache_cli_ls_and_verify(tmp_path, capsys):
    from scaling.cache_cli import main

    root = str(tmp_path / "cache")
    entry = DatasetCache(root).get_or_build("toy", {"n": 100}, Counter(), request={"task": "toy", "options": {"k": 1}})
    assert main(["cache", "ls", "--cache", root]) == 0
    out = capsys.readouterr().out
    assert f"toy-{entry.fingerprint}" in out and "train:100" in out and '{"k": 1}' in out
    assert main(["cache", "verify", "--cache", root]) == 0
    (tmp_path / "cache" / f"toy-{entry.fingerprint}" / "val.arrow").write_bytes(b"garbage")
    assert main(["cache", "verify", "--cache", root]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert main(["cache", "verify", "--cache", root, "--remove"]) == 0
    assert DatasetCache(root).entries() == []


def test_option_values_are_yaml():
    from scaling.cache_cli import parse_options

    assert parse_options(["a=1", "b=true", "c=[.py, .pyx]", "d=/x/y", "e=null", "f=", 'g="\\n\\n"']) == {
        "a": 1, "b": True, "c": [".py", ".pyx"], "d": "/x/y", "e": None, "f": None, "g": "\n\n"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["novalue"])


def test_storage_stays_free_of_torch():
    code = (
        "import sys, storage.cache, scaling.cache_cli, storage.prep.sources, storage.prep.text, "
        "storage.prep.bytestream, storage.prep.sva, storage.prep.speech, scaling.cli;"
        "scaling.cli.build_parser();"
        "bad = [m for m in ('torch', 'ray', 'torchaudio') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
