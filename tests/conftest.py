"""Shared fixtures: tiny specs and synthetic ledgers (seconds, offline, CPU)."""

from __future__ import annotations

import os
import pathlib

import pytest

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def shared_dir() -> pathlib.Path:
    if not SHARED.exists():
        pytest.skip(f"{SHARED} not present (a fresh clone has no ../shared); integration data unavailable")
    return SHARED


TINY_MQAR = {"num_pairs": 3, "num_queries": 3, "num_keys": 8, "num_values": 8,
             "train_examples": 2000, "val_examples": 64, "test_examples": 64, "pair_tokens": True}
TINY_MODEL = {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 32, "dropout": 0.0, "positions": "sinusoidal"}
TINY_TRAIN = {"steps": 20, "batch_size": 16, "eval_batch_size": 64, "lr": 1e-2, "eval_every": 10,
              "warmup_steps": 0, "schedule": "cosine", "grad_clip": 1.0, "weight_decay": 0.0, "optimizer": "adamw"}


def tiny_spec(**overrides):
    from storage.records import TrialSpec

    fields = dict(study="tiny", task="mqar", task_options=dict(TINY_MQAR), variant="softmax", variant_options={},
                  model=dict(TINY_MODEL), train=dict(TINY_TRAIN), seed=0)
    fields.update(overrides)
    return TrialSpec(**fields)


def tiny_study_dict(tmp_path, **overrides) -> dict:
    data = {
        "name": "tiny",
        "storage": str(tmp_path / "study"),
        "cache": str(tmp_path / "cache"),
        "tasks": [{"name": "mqar", "options": dict(TINY_MQAR)}],
        "variants": [{"name": "softmax"}, {"name": "oscillator", "d_osc": [2, 4, 8]}],
        "model": dict(TINY_MODEL),
        "seeds": [0],
        "train": dict(TINY_TRAIN),
        "resources": {"cpus_per_trial": 1, "max_concurrent_trials": 2},
        "tracking": {"wandb": {"mode": "offline"}},
    }
    data.update(overrides)
    return data


def make_record(**overrides):
    """A TrialRecord with plausible defaults, for ledger/fit/report tests that need no training."""
    from storage.records import TrialRecord

    fields = dict(
        key="k", study="synthetic", cell="lm/softmax", task="lm", variant="softmax", d_osc=None,
        target_params=None, params_total=1000, params_non_embedding=800, seed=0, stage="replicate",
        hparams_json="{}", spec_json="{}", status="completed", metric_name="val_loss", metric_value=1.0,
        metrics_json="{}", best_step=10, steps=10, tokens_seen=100, flops=1e6, wall_seconds=1.0,
        started_at="2026-01-01T00:00:00+00:00", finished_at="2026-01-01T00:00:01+00:00",
        wandb_run_id=None, host="test", error=None,
    )
    fields.update(overrides)
    return TrialRecord(**fields)


def write_synthetic_study(storage: pathlib.Path, *, C=2.0, alpha=0.7, base=3.0, noise=0.02, seeds=(0, 1, 2, 3, 4),
                          ds=(2, 4, 8, 16, 32), task="lm", rng_seed=0, extra_rows=()):
    """A study directory (study.yaml + ledger) whose gaps follow C * d^-alpha with seed noise."""
    import numpy as np
    import yaml

    from storage.ledger import Ledger

    rng = np.random.default_rng(rng_seed)
    storage.mkdir(parents=True, exist_ok=True)
    (storage / "study.yaml").write_text(yaml.safe_dump({"name": "synthetic", "baseline": "softmax", "fits": ["gap_vs_dosc"]}))
    ledger = Ledger(str(storage))
    offsets = {s: rng.normal(0, noise) for s in seeds}  # seed effects shared by variant and baseline
    for s in seeds:
        ledger.append(make_record(key=f"{task}-softmax-s{s}", cell=f"{task}/softmax", task=task, seed=s,
                                  metric_value=base + offsets[s]))
        for d in ds:
            value = base + offsets[s] + C * d ** (-alpha) + rng.normal(0, noise)
            ledger.append(make_record(key=f"{task}-osc-d{d}-s{s}", cell=f"{task}/oscillator/d{d}", task=task,
                                      variant="oscillator", d_osc=d, seed=s, metric_value=value))
    for record in extra_rows:
        ledger.append(record)
    return storage


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is faster, and steady on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3-protocol server on 127.0.0.1 (one per test session), bucket `bkt`, with
    AWS_ENDPOINT_URL and test credentials set for this process and its subprocesses."""
    pytest.importorskip("moto", reason="moto[server] not installed (pip install -e '.[dev]')")
    from storage.s3local import local_s3

    with local_s3("bkt") as endpoint:
        yield endpoint


# S3 cases start a moto server (5-8 s on a busy 2-core machine) and cost ~50 ms a request: `slow`
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.slow)])
def storage_uri(request, tmp_path):
    """A study storage location on each backend: a local directory, and s3://bkt/<unique prefix>."""
    if request.param == "local":
        return str(tmp_path / "study")
    request.getfixturevalue("s3_endpoint")
    import uuid

    return f"s3://bkt/{uuid.uuid4().hex[:12]}/study"
