"""What `scaling cache build` and `scaling cache verify --rebuild` run (they need the task code,
hence torch); the command-line parsing lives in `scaling.cache_cli`."""

from __future__ import annotations

import time
from typing import Any

from storage.cache import CacheCorrupt, CachedDataset, DatasetCache, fingerprint
from workers.tasks import get_task


def build_task(name: str, options: dict[str, Any], cache_uri: str | None) -> tuple[CachedDataset, float, bool]:
    """(entry, seconds, built now?) for one task's options, building it unless already cached."""
    task = get_task(name)
    options = task.options(options)
    cache = DatasetCache(cache_uri)
    t0 = time.perf_counter()
    try:
        cache.open(name, fingerprint(task.identity(options)))
        existed = True
    except (FileNotFoundError, CacheCorrupt):
        existed = False
    entry = task.entry(options, cache)
    return entry, time.perf_counter() - t0, not existed


def rebuild_entry(cache: DatasetCache, name: str, fp: str) -> CachedDataset:
    """Rebuild a damaged entry from the request recorded in its manifest. When the source changed
    since (a new fingerprint), the damaged entry is removed and the current data built instead."""
    manifest = cache.read_manifest(name, fp)
    request = manifest.get("request") or {}
    if request.get("task") != name or "options" not in request:
        raise CacheCorrupt(f"{name}-{fp}: the manifest records no request to rebuild from; remove it instead")
    task = get_task(name)
    entry = task.entry(request["options"], cache)
    if entry.fingerprint != fp:
        cache.remove(name, fp)
    return entry
