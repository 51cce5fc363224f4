"""Benchmark (marker `bench`): the dataset cache against the issue's targets, on a 10M-token split of
real WikiText-2 text (synthetic words without ../shared): open in a fresh worker process <= 50 ms and
>= 100x faster than preparing it again; random batches >= 1M tokens/s on one CPU core; preparation
throughput per task on the real samples. Writes JSON to $SCALING_BENCH_JSON when set."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.bench


def test_cache_open_batch_and_prepare_throughput(tmp_path):
    from workers.tasks.bench import main

    out = os.environ.get("SCALING_BENCH_JSON") or str(tmp_path / "cache_bench.json")
    assert main(["--json", out]) == 0
    result = json.loads(open(out).read())
    lm = result["open_and_batch"]
    assert lm["train_tokens"] >= 10_000_000
    assert lm["open_ms_max"] <= 50, lm
    assert lm["prepare_over_open"] >= 100, lm
    assert lm["batch_tokens_per_s_one_core"] >= 1_000_000, lm
    for name, row in result["tasks"].items():
        assert row["prepare_mb_per_s"] and row["prepare_mb_per_s"] > 0, (name, row)
