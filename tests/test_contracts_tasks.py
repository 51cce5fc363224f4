"""Task contract suite: every registered task (workers.tasks.TASKS) goes prepare -> cache -> batches
-> metric on tiny local data written in its source's real format (the fixtures of test_tasks.py),
parametrized over the registry, so a new task gets the suite as soon as it is registered (and a tiny
source for it is added to `tiny_options` below; the suite fails for a task that has none)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import TINY_MQAR, tiny_spec
from storage.cache import DatasetCache
from test_tasks import TINY_SOURCES
from workers.tasks import TASKS, get_task
from workers.trial import build_model


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SCALING_DIGEST_MEMO", str(tmp_path / "digests.json"))
    monkeypatch.setenv("SCALING_DOWNLOADS", str(tmp_path / "downloads"))


def tiny_options(name: str, tmp_path) -> dict:
    """Options that make task `name` prepare from tiny local files (no network, well under a second)."""
    sources = {"mqar": lambda _: dict(TINY_MQAR, train_examples=64), **TINY_SOURCES}
    if name not in sources:
        pytest.fail(f"task {name!r} is registered but has no tiny source for the contract suite: add a writer "
                    "to tests/test_tasks.py::TINY_SOURCES (options pointing at files it writes under tmp_path)")
    return sources[name](tmp_path)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_contract(name, tmp_path):
    task = get_task(name)
    options = tiny_options(name, tmp_path)
    cache_uri = str(tmp_path / "cache")

    # prepare: every split the trainer reads, columns of equal length, the model's fixed fields
    prepared = task.prepare(options, DatasetCache(cache_uri))
    assert {"train", "val"} <= set(prepared.arrays), f"{name}: splits {sorted(prepared.arrays)}"
    for split, columns in prepared.arrays.items():
        lengths = {column: len(array) for column, array in columns.items()}
        assert len(set(lengths.values())) == 1 and min(lengths.values()) > 0, f"{name}/{split}: {lengths}"
    fields = task.model_fields(prepared)
    assert fields["max_seq_len"] > 0 and (fields.get("vocab_size") or fields.get("num_classes") or fields.get("input_dim"))
    assert task.tokens_per_example(prepared) > 0

    # cache: one entry, verified; a fresh reader opens it without building, bit for bit
    cache = DatasetCache(cache_uri)
    assert [e["name"] for e in cache.entries()] == [name]
    assert all(row["ok"] for row in cache.verify(full=True))
    reopened = task.prepare(options, DatasetCache(cache_uri), build=False)
    assert reopened.fingerprint == prepared.fingerprint and reopened.meta == prepared.meta
    for split, columns in prepared.arrays.items():
        for column, array in columns.items():
            np.testing.assert_array_equal(reopened.arrays[split][column], array, err_msg=f"{name}/{split}/{column}")

    # batches: a few rows of train, a finite scalar loss whose gradient reaches the parameters
    torch.manual_seed(0)
    model = build_model(tiny_spec(task=name, task_options=options), fields)
    batch = task.batch(prepared.arrays["train"], np.arange(3))
    assert all(isinstance(t, torch.Tensor) and t.shape[0] == 3 for t in batch.values()), {k: v.shape for k, v in batch.items()}
    loss = task.loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)

    # metric: the primary validation metric (and the test one where there is a test split), finite;
    # an untrained model is no better than chance by a wide margin and is not called diverged by it
    model.eval()
    head = lambda split: {column: array[:32] for column, array in prepared.arrays[split].items()}  # noqa: E731
    val = task.evaluate(model, head("val"), 16, "val")
    assert task.metric in val and math.isfinite(val[task.metric]), f"{name}: {val}"
    assert math.isfinite(val["val_loss"]) and val["val_loss"] < 2 * task.chance_loss(fields) + 1
    if "test" in prepared.arrays:
        test = task.evaluate(model, head("test"), 16, "test")
        assert task.metric.replace("val_", "test_") in test
    assert task.divergence({**val, "val_loss": 10 * task.chance_loss(fields)}, fields) is not None
