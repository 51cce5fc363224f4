"""workers: the MQAR generator, the model's counts, and run_trial (train, resume, failure, divergence)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_MQAR, tiny_spec
from storage.cache import DatasetCache
from workers import run_trial
from workers.model import ModelConfig, Transformer
from workers.tasks import get_task
from workers.tasks.base import IGNORE
from workers.tasks.mqar import generate_mqar
from workers.trial import Checkpoints


@pytest.mark.parametrize("pair_tokens", [False, True])
def test_mqar_answers_are_the_queried_values(pair_tokens):
    P, Q, K, V = 4, 3, 10, 10
    inputs, labels = generate_mqar(50, num_pairs=P, num_queries=Q, num_keys=K, num_values=V, seed=1, pair_tokens=pair_tokens)
    for x, y in zip(inputs, labels):
        if pair_tokens:
            code = x[:P] - (1 + K + V)
            pairs = {int(c // V) + 1: int(c % V) + 1 + K for c in code}
            start = P
        else:
            pairs = {int(x[2 * i]): int(x[2 * i + 1]) for i in range(P)}
            start = 2 * P
        assert len(pairs) == P  # distinct keys
        scored = np.flatnonzero(y != IGNORE)
        assert len(scored) == Q and scored[0] == start
        for t in scored:
            assert y[t] == pairs[int(x[t])]  # the label after a queried key is its value
    assert (labels[labels != IGNORE] > K).all()


def test_param_counts_are_exact():
    cfg = ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=12,
                      attention="oscillator", attention_options={"d_osc": 3}, positions="learned")
    model = Transformer(cfg)
    total, non_embedding = model.param_counts()
    assert total == sum(p.numel() for p in model.parameters())
    assert total - non_embedding == 50 * 16 + 12 * 16
    softmax = Transformer(ModelConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=12))
    assert total - softmax.param_counts()[0] - 12 * 16 == 2 * 2 * 12 * 3  # anchors: layers x H x L x d


def test_task_data_goes_through_the_cache(tmp_path):
    task = get_task("mqar")
    cache = DatasetCache(str(tmp_path))
    first = task.prepare(TINY_MQAR, cache)
    second = task.prepare(dict(reversed(list(TINY_MQAR.items()))), cache)
    assert first.fingerprint == second.fingerprint and len(cache.entries()) == 1
    assert first.arrays["train"]["input_ids"].shape == (2000, 8)
    np.testing.assert_array_equal(first.arrays["val"]["labels"], second.arrays["val"]["labels"])


def test_run_trial_learns_and_records(tmp_path):
    spec = tiny_spec(train={**tiny_spec().train, "steps": 150, "eval_every": 50})
    seen = []
    record = run_trial(spec, storage_uri=str(tmp_path / "s"), cache_uri=str(tmp_path / "c"), report=seen.append)
    assert record.status == "completed", record.error
    assert record.key == spec.key and record.cell == "mqar/softmax" and record.metric_name == "val_loss"
    metrics = json.loads(record.metrics_json)
    assert record.metric_value == pytest.approx(min(p["val_loss"] for p in metrics["history"]))
    assert record.metric_value < 0.6 * math.log(8)  # well below chance on 8 values
    assert {"test_loss", "test_accuracy", "val_accuracy"} <= set(metrics)
    assert [p["step"] for p in seen] == [50, 100, 150]
    assert record.steps == 150 and record.tokens_seen == 150 * 16 * 8 and record.flops > 0
    assert record.params_total > 0 and record.best_step in (50, 100, 150)
    assert not (tmp_path / "s" / "checkpoints" / spec.key).exists()  # removed when done


def test_oscillator_trial_is_deterministic(tmp_path):
    spec = tiny_spec(variant="oscillator", variant_options={"d_osc": 4, "p": 1.0, "anchor_norm": "init", "readout_padding_mask": True})
    a = run_trial(spec, storage_uri=str(tmp_path / "a"), cache_uri=str(tmp_path / "c"))
    b = run_trial(spec, storage_uri=str(tmp_path / "b"), cache_uri=str(tmp_path / "c"))
    assert a.status == b.status == "completed"
    assert a.metric_value == b.metric_value and a.metrics_json == b.metrics_json


def test_resume_from_checkpoint_gives_the_same_result(tmp_path):
    spec = tiny_spec(train={**tiny_spec().train, "steps": 40, "eval_every": 10})
    full = run_trial(spec, storage_uri=str(tmp_path / "full"), cache_uri=str(tmp_path / "c"))

    class Stop(Exception):
        pass

    def stop_at_20(point):
        if point["step"] == 20:
            raise Stop

    partial = run_trial(spec, storage_uri=str(tmp_path / "part"), cache_uri=str(tmp_path / "c"), report=stop_at_20)
    assert partial.status == "failed" and "Stop" in partial.error
    assert Checkpoints(str(tmp_path / "part"), spec.key).load()["step"] == 20
    resumed = run_trial(spec, storage_uri=str(tmp_path / "part"), cache_uri=str(tmp_path / "c"))
    assert resumed.status == "completed"
    assert resumed.metric_value == full.metric_value
    assert json.loads(resumed.metrics_json)["history"] == json.loads(full.metrics_json)["history"]


def test_failure_becomes_a_failed_record(tmp_path):
    spec = tiny_spec(model={**tiny_spec().model, "d_model": 15})  # not divisible by n_heads
    record = run_trial(spec, storage_uri=str(tmp_path), cache_uri=str(tmp_path / "c"))
    assert record.status == "failed" and "divisible" in record.error and record.metric_value is None


def test_divergence_is_recorded(tmp_path):
    spec = tiny_spec(train={**tiny_spec().train, "lr": 1e30, "grad_clip": 0.0, "steps": 30})
    torch.manual_seed(0)
    record = run_trial(spec, storage_uri=str(tmp_path), cache_uri=str(tmp_path / "c"))
    assert record.status == "diverged", (record.status, record.metric_value, record.error)
