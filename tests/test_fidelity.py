"""Paper A fidelity of the trainer and the presets: epoch shuffling, evaluation once per epoch, the
selected metric (best | final), PAD embedding, SVA's readout mask, and the divergence criterion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import TINY_TRAIN, tiny_spec, tiny_study_dict
from workers.model import ModelConfig, Transformer
from workers.presets import PAPER_A
from workers.tasks import get_task
from workers.trial import BatchOrder, resolve_budget, resolve_train, run_trial


def _train(**over):
    return resolve_train({**TINY_TRAIN, **over}, {})


def test_epoch_sampling_reads_every_example_once_per_epoch_with_a_short_last_batch():
    train = _train(batch_size=16, sampling="epoch")
    order = BatchOrder(train, 100, seed=3)
    assert order.per_epoch == 7  # 6 full batches + one of 4
    epoch0 = np.concatenate([order.indices(s) for s in range(7)])
    assert len(order.indices(6)) == 4
    assert sorted(epoch0.tolist()) == list(range(100))  # without replacement
    epoch1 = np.concatenate([order.indices(s) for s in range(7, 14)])
    assert sorted(epoch1.tolist()) == list(range(100)) and not np.array_equal(epoch0, epoch1)  # reshuffled
    # a fresh order (a resumed trial) reads the same batch at the same step, with no state carried
    assert np.array_equal(BatchOrder(train, 100, seed=3).indices(9), order.indices(9))
    assert not np.array_equal(BatchOrder(train, 100, seed=4).indices(0), order.indices(0))
    assert order.examples_seen(7) == 100 and order.examples_seen(9) == 132


def test_epochs_budget_counts_whole_passes_and_eval_every_epoch():
    train = resolve_budget(_train(steps=None, epochs=3, batch_size=16, eval_every="epoch"), n_train=100, seq_len=8)
    assert train["steps"] == 21 and train["eval_every_steps"] == 7
    iid = resolve_budget(_train(steps=None, epochs=3, batch_size=16, sampling="replacement"), n_train=100, seq_len=8)
    assert iid["steps"] == 19  # ceil(3 * 100 / 16): the i.i.d. average


@pytest.mark.parametrize("bad,field", [({"sampling": "shuffle"}, "sampling"), ({"select": "last"}, "select"),
                                       ({"eval_every": "epochs"}, "eval_every"), ({"eval_every": 0}, "eval_every")])
def test_bad_recipe_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=f"train.{field}"):
        _train(**bad)


def test_trial_evaluates_once_per_epoch_and_select_final_records_the_last_evaluation(tmp_path):
    # 2000 MQAR examples / batch 16 = 125 steps per epoch; 2 epochs -> evaluations at 125 and 250
    base = {**TINY_TRAIN, "steps": None, "epochs": 2, "eval_every": "epoch", "lr": 3e-3}
    best = run_trial(tiny_spec(train={**base, "select": "best"}), storage_uri=str(tmp_path / "a"), cache_uri=str(tmp_path / "c"),
                     num_threads=1)
    final = run_trial(tiny_spec(train={**base, "select": "final"}), storage_uri=str(tmp_path / "b"), cache_uri=str(tmp_path / "c"),
                      num_threads=1)
    from storage.cache import DatasetCache

    task = get_task("mqar")
    seq_len = task.tokens_per_example(task.prepare(tiny_spec().task_options, DatasetCache(str(tmp_path / "c"))))
    for record in (best, final):
        assert record.status == "completed", record.error
        assert [p["step"] for p in record.metrics["history"]] == [125, 250]
        assert record.steps == 250 and record.tokens_seen == 2 * 2000 * seq_len  # every example twice, none more
    history = final.metrics["history"]
    assert final.best_step == 250 and final.metric_value == history[-1]["val_loss"]
    assert final.metrics["selected"] == "final"
    assert best.metric_value == min(p["val_loss"] for p in best.metrics["history"])


def test_padding_idx_keeps_the_pad_embedding_at_zero_without_gradient():
    cfg = ModelConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=16, max_seq_len=8, padding_idx=0)
    model = Transformer(cfg)
    assert torch.count_nonzero(model.embed.weight[0]) == 0
    tokens = torch.tensor([[1, 2, 3, 0, 0]])
    model(tokens).sum().backward()
    assert torch.count_nonzero(model.embed.weight.grad[0]) == 0
    with pytest.raises(ValueError, match="padding_idx=20 is outside"):
        ModelConfig(vocab_size=20, padding_idx=20)


def test_paper_presets_follow_the_reference_code():
    for task, preset in PAPER_A.items():
        assert preset["train"]["eval_every"] == "epoch" and preset["train"]["sampling"] == "epoch", task
        assert preset["provenance"]["reference code"], task
    assert PAPER_A["sva"]["train"]["select"] == "final"
    assert all(PAPER_A[t]["train"]["select"] == "best" for t in ("kws", "wikitext2", "tinystories"))
    assert all(PAPER_A[t]["model"]["padding_idx"] == 0 for t in ("sva", "wikitext2", "tinystories"))
    assert "padding_idx" not in PAPER_A["kws"]["model"]  # features in, no embedding


def test_sva_preset_trials_mask_the_readout_causally_only(tmp_path):
    from studies.plan import expand
    from studies.spec import parse_study

    data = tiny_study_dict(tmp_path, tasks=[{"name": "sva", "options": {"train_examples": 64, "val_examples": 32,
                                                                        "test_examples": 32}}],
                           preset="paper", variants=[{"name": "softmax"}, {"name": "oscillator", "d_osc": [2]}])
    data.pop("model"), data.pop("train")
    trials = expand(parse_study(data))
    osc = [t for t in trials if t.variant == "oscillator"][0]
    assert osc.variant_options["readout_padding_mask"] is False
    assert osc.train["select"] == "final" and osc.model["padding_idx"] == 0
    # the study can still override the preset's variant option
    data["variants"][1]["options"] = {"readout_padding_mask": True}
    osc = [t for t in expand(parse_study(data)) if t.variant == "oscillator"][0]
    assert osc.variant_options["readout_padding_mask"] is True


def test_divergence_criterion_chance_level_and_task_failure_rule():
    lm, sva = get_task("mqar"), get_task("sva")
    fields = {"vocab_size": 100, "head": "lm"}
    assert lm.divergence({"val_loss": 2.0}, fields) is None
    reason = lm.divergence({"val_loss": 1e4}, fields)
    assert reason and "worse than chance" in reason and f"{math.log(100):.4g}" in reason
    sva_fields = {"head": "token", "num_classes": 1}
    assert sva.divergence({"val_loss": 0.3, "val_accuracy_hard": 0.97}, sva_fields) is None
    reason = sva.divergence({"val_loss": 0.5, "val_accuracy_hard": 0.60}, sva_fields)
    assert reason and "hard-example accuracy below 85%" in reason


def test_a_trial_that_blows_up_but_stays_finite_is_recorded_diverged_with_its_reason(tmp_path):
    spec = tiny_spec(train={**TINY_TRAIN, "steps": 20, "lr": 1e3, "grad_clip": 0.0, "schedule": "constant"})
    record = run_trial(spec, storage_uri=str(tmp_path / "s"), cache_uri=str(tmp_path / "c"))
    assert record.status == "diverged", (record.metric_value, record.error)
    assert record.error and ("chance" in record.error or "non-finite" in record.error)
    assert json.loads(record.metrics_json).get("diverged_reason") == record.error
