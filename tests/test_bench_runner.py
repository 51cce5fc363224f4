"""Benchmark (marker `bench`): runner overhead on 24 trials of 2 s fixed work on 2 CPUs."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.ray]


def test_runner_makespan_close_to_ideal():
    from studies.bench import run

    out = run(trials=24, work=2.0, cpus=2, wandb="offline")
    print(out)
    assert out["ratio"] <= 1.10, out
