"""Stacked seeds (workers/stacked.py): a seed trained in a pack is the same trial as the seed run
alone (its loss, step by step, to float32 rounding; its records, keys and checkpoints), a diverging
seed does not stop the others, and a killed pack resumes. Tiny shapes: seconds on a CPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MQAR, tiny_spec
from workers.stacked import _dropout_mask, pack_key, run_pack
from workers.trial import Checkpoints, run_trial

SMALL_MQAR = {**TINY_MQAR, "val_examples": 16, "test_examples": 16}


def small_spec(seed: int, **train):
    base = tiny_spec()
    return tiny_spec(task_options=dict(SMALL_MQAR), seed=seed,
                     model={**base.model, "d_model": 16, "d_ff": 16, "dropout": 0.1},
                     train={**base.train, "batch_size": 8, "eval_batch_size": 16, **train})


def test_dropout_masks_are_torch_dropout_from_the_same_generator():
    x = torch.randn(4, 7, 16)
    torch.manual_seed(5)
    want = torch.nn.functional.dropout(x, 0.1, training=True)
    got = x * _dropout_mask(x.shape, 0.1, torch.Generator().manual_seed(5), "cpu")
    assert torch.equal(got, want)


@pytest.mark.parametrize("every", [10, pytest.param(1, marks=pytest.mark.slow)], ids=["every-10-steps", "every-step"])
def test_a_stacked_seed_matches_the_seed_run_alone_step_by_step(tmp_path, one_thread, every):
    """100 steps with dropout 0.1: the training loss within 1e-4 relative at every evaluation (every
    10 steps by default; every step under `slow`: an evaluation and a checkpoint per step cost ~20 s),
    and the records keep their keys, with the pack noted."""
    specs = [small_spec(seed, steps=100, eval_every=every) for seed in (0, 1)]
    alone = {}
    for spec in specs:
        seen = []
        record = run_trial(spec, storage_uri=str(tmp_path / "alone"), cache_uri=str(tmp_path / "c"), report=seen.append)
        assert record.status == "completed", record.error
        alone[spec.seed] = (record, [p["train_loss"] for p in seen])
    packed = {spec.seed: [] for spec in specs}
    records = run_pack(specs, storage_uri=str(tmp_path / "pack"), cache_uri=str(tmp_path / "c"),
                       report=lambda i, m: packed[specs[i].seed].append(m["train_loss"]))
    for spec, record in zip(specs, records):
        assert record.status == "completed", record.error
        solo_record, solo_losses = alone[spec.seed]
        assert len(packed[spec.seed]) == len(solo_losses) == 100 // every
        assert packed[spec.seed] == pytest.approx(solo_losses, rel=1e-4)
        assert record.key == solo_record.key == spec.key  # packing never changes the trial key
        assert record.metric_value == pytest.approx(solo_record.metric_value, rel=1e-3)
        note = json.loads(record.metrics_json)["pack"]
        assert note == {"size": 2, "seeds": [0, 1], "keys": [s.key for s in specs]}
    assert alone[0][1] != pytest.approx(alone[1][1], rel=1e-3)  # the seeds really differ


def test_a_diverging_seed_is_recorded_and_the_others_finish(tmp_path, one_thread):
    specs = [small_spec(seed, steps=30, eval_every=10) for seed in (0, 1)]
    # poison seed 1's data stream: a NaN feature can't be injected through MQAR, so blow up its
    # weights through the checkpoint it resumes from
    records = run_pack(specs, storage_uri=str(tmp_path / "s"), cache_uri=str(tmp_path / "c"),
                       report=_poison(specs, 1, at_step=10), keep_checkpoint=False)
    assert records[0].status == "completed", records[0].error
    assert records[1].status == "diverged" and "non-finite" in records[1].error
    assert records[0].steps == 30 and records[1].steps < 30


def _poison(specs, index, at_step):
    """A reporter that, at `at_step`, fills one seed's live parameters with NaN (through the frame
    of run_pack's caller is not reachable: it uses the stacked model's parameters, found by gc)."""
    import gc

    from workers.stacked import StackedModel

    def report(i, metrics):
        if i == index and metrics["step"] == at_step:
            stacked = next(o for o in gc.get_objects() if isinstance(o, StackedModel))
            with torch.no_grad():
                for p in stacked.params.values():
                    p[index] = float("nan")

    return report


def test_a_killed_pack_resumes_from_each_seeds_checkpoint(tmp_path, one_thread):
    specs = [small_spec(seed, steps=40, eval_every=10) for seed in (0, 1)]
    full = run_pack(specs, storage_uri=str(tmp_path / "full"), cache_uri=str(tmp_path / "c"))

    class Stop(Exception):
        pass

    def stop_at_20(i, metrics):
        if metrics["step"] == 20 and i == len(specs) - 1:
            raise Stop

    partial = run_pack(specs, storage_uri=str(tmp_path / "part"), cache_uri=str(tmp_path / "c"), report=stop_at_20)
    assert all(r.status == "failed" and "Stop" in r.error for r in partial)
    assert [Checkpoints(str(tmp_path / "part"), s.key).load()["step"] for s in specs] == [20, 20]
    resumed = run_pack(specs, storage_uri=str(tmp_path / "part"), cache_uri=str(tmp_path / "c"))
    for a, b in zip(resumed, full):
        assert a.status == "completed"
        assert a.metric_value == pytest.approx(b.metric_value, rel=1e-6)
        hist_a, hist_b = json.loads(a.metrics_json)["history"], json.loads(b.metrics_json)["history"]
        assert [p["train_loss"] for p in hist_a] == pytest.approx([p["train_loss"] for p in hist_b], rel=1e-6)


def test_only_trials_that_differ_in_seed_pack(tmp_path):
    a, b = small_spec(0), small_spec(1)
    assert pack_key(a) == pack_key(b) and a.key != b.key
    other = small_spec(1, lr=1e-3)
    assert pack_key(other) != pack_key(a)
    with pytest.raises(ValueError, match="differ in more than their seed"):
        run_pack([a, other], storage_uri=str(tmp_path), cache_uri=str(tmp_path / "c"))


def test_pack_seeds_is_validated_with_the_fix(tmp_path):
    from conftest import tiny_study_dict
    from studies.spec import StudySpec

    for good in (1, 5, "auto"):
        data = tiny_study_dict(tmp_path, resources={"pack_seeds": good})
        assert StudySpec.model_validate(data).resources.pack_seeds == good
    with pytest.raises(Exception, match="pack_seeds=0: give a number of seeds from 1 to 1024, or auto"):
        StudySpec.model_validate(tiny_study_dict(tmp_path, resources={"pack_seeds": 0}))


# ---- the natively stacked forward against each seed's own model -----------------------------------

STACKED_SHAPES = {
    # name: (ModelConfig fields, input kind) -- every backbone, head, position and attention path
    "softmax-lm-pad-row": (dict(attention="softmax", vocab_size=11, padding_idx=0), "tokens"),
    "oscillator-d2-folded": (dict(attention="oscillator", attention_options={"d_osc": 2}, vocab_size=11), "tokens"),
    "oscillator-d16-dense": (dict(attention="oscillator", attention_options={"d_osc": 16}, vocab_size=11), "tokens"),
    "oscillator-token-padding": (dict(attention="oscillator", attention_options={"d_osc": 4, "readout_padding_mask": False},
                                      vocab_size=11, head="token", num_classes=1, causal=False, padding_idx=0), "padded"),
    "kuramoto-b-learned": (dict(attention="kuramoto", backbone="b", positions="learned", vocab_size=11), "tokens"),
    "kuramoto-head-gate-padding": (dict(attention="kuramoto", attention_options={"gate_per": "head", "readout": "delta"},
                                        vocab_size=11, head="classify", num_classes=3, causal=False), "padded"),
    "oscillator-d4-rope": (dict(attention="oscillator", attention_options={"d_osc": 4}, positions="rope", vocab_size=11),
                           "tokens"),
    "softmax-features-classify": (dict(attention="softmax", input_dim=5, head="classify", num_classes=3, causal=False,
                                       positions="none", final_norm=False, vocab_size=1), "features"),
}


def _stacked_case(name, S=3, B=4, T=6):
    from workers.model import ModelConfig, Transformer

    fields, kind = STACKED_SHAPES[name]
    cfg = ModelConfig(**{"d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 24, "dropout": 0.1, "max_seq_len": 8,
                         **fields})
    models = []
    for s in range(S):
        torch.manual_seed(s)
        models.append(Transformer(cfg).train())
    g = torch.Generator().manual_seed(123)
    if kind == "features":
        inputs = torch.randn(S, B, T, cfg.input_dim, generator=g)
    else:
        inputs = torch.randint(1, cfg.vocab_size, (S, B, T), generator=g)
    kwargs = {}
    if kind == "padded":
        lengths = torch.randint(2, T + 1, (S, B), generator=g)
        padding = torch.arange(T)[None, None, :] >= lengths[..., None]
        inputs = inputs.masked_fill(padding, 0)
        kwargs["key_padding_BT"] = padding
        if cfg.head == "token":
            kwargs["positions_B"] = lengths - 1
    return models, inputs, kwargs


@pytest.mark.parametrize("name", sorted(STACKED_SHAPES))
def test_the_stacked_forward_is_each_seeds_own_model(name):
    """Outputs and every parameter's gradient equal each seed's solo model (its own dropout masks from
    its own generator, as run_trial draws them from the global one)."""
    from workers.stacked import StackedModel

    models, inputs, kwargs = _stacked_case(name)
    S = len(models)
    generators = [torch.Generator().manual_seed(1000 + s) for s in range(S)]
    solo_out, solo_grads = [], []
    for s, model in enumerate(models):
        torch.set_rng_state(generators[s].get_state())
        out = model(inputs[s], **{k: v[s] for k, v in kwargs.items()})
        out.square().sum().backward()
        solo_out.append(out.detach())
        solo_grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    stacked = StackedModel(models, generators)
    out_S = stacked.forward(inputs, **kwargs)
    torch.stack([o.square().sum() for o in out_S]).sum().backward()
    for s in range(S):
        torch.testing.assert_close(out_S[s].detach(), solo_out[s], rtol=1e-5, atol=1e-6)
        for n, grad in solo_grads[s].items():
            torch.testing.assert_close(stacked.params[n].grad[s], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    if models[0].cfg.padding_idx is not None:  # the PAD row gets no gradient in either
        assert not stacked.params["embed.weight"].grad[:, 0].any()


@pytest.mark.parametrize("name", ["oscillator-d2-folded", "oscillator-token-padding"])
def test_the_stacked_oscillator_is_each_seeds_own_model_on_the_pytorch_paths(name):
    """Where the compiled kernel builds it runs the oscillator at every d_osc (T <= 128); its
    pure-PyTorch fallback (the two-Function dense path at these d_osc) stacks the same way."""
    from workers.attention import native

    with native.pytorch_only():
        test_the_stacked_forward_is_each_seeds_own_model(name)


def test_an_attention_module_the_stacked_forward_does_not_know_runs_seed_by_seed():
    from workers.stacked import StackedModel
    from workers.stacked_forward import _per_seed_attention

    models, inputs, kwargs = _stacked_case("kuramoto-head-gate-padding")
    generators = [torch.Generator().manual_seed(s) for s in range(len(models))]
    native = StackedModel(models, generators)
    out_native = native.forward(inputs, **kwargs)
    generators = [torch.Generator().manual_seed(s) for s in range(len(models))]
    fallback = StackedModel(models, generators)
    fallback.forward.attention = [_per_seed_attention] * len(models[0].blocks)
    torch.testing.assert_close(fallback.forward(inputs, **kwargs), out_native, rtol=1e-5, atol=1e-6)


def test_a_pack_saves_on_the_clock_and_on_sigterm_and_resumes_to_the_unbroken_result(tmp_path, one_thread):
    """Packs operate as single trials (workers/lifecycle.py): a train-metrics row per seed every
    `log_every` steps, a wall-clock checkpoint between evaluations, and SIGTERM at a named step (sent
    from the log hook, so it lands at the same point every run) saves every seed there and raises
    TrialInterrupted; the re-run resumes from that step to the unbroken pack's result. Each seed
    keeps its own progress file and log."""
    import os
    import signal

    from workers import lifecycle

    specs = [small_spec(seed, steps=30, eval_every=10) for seed in (0, 1)]
    cache = str(tmp_path / "c")
    full = run_pack(specs, storage_uri=str(tmp_path / "full"), cache_uri=cache)
    storage = str(tmp_path / "part")
    rows, starts = [], []

    def sigterm_at_15(i, row):
        rows.append((i, row))
        if row["step"] == 15 and i == len(specs) - 1:
            os.kill(os.getpid(), signal.SIGTERM)

    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(lifecycle.TrialInterrupted) as stopped:
            run_pack(specs, storage_uri=storage, cache_uri=cache, log=sigterm_at_15, log_every=5,
                     on_start=lambda i, info: starts.append((i, info)))
    finally:
        lifecycle.clear_stop()
    assert signal.getsignal(signal.SIGTERM) is handler
    assert stopped.value.step == 15 and stopped.value.reason == "SIGTERM"
    assert [(i, r["step"]) for i, r in rows] == [(0, 5), (1, 5), (0, 10), (1, 10), (0, 15), (1, 15)]
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "tokens"} <= set(rows[-1][1])
    assert rows[0][1]["train_loss"] != rows[1][1]["train_loss"]  # each seed's own window
    assert [i for i, _ in starts] == [0, 1] and starts[0][1]["pack_size"] == 2 and starts[0][1]["total_steps"] == 30
    assert [Checkpoints(storage, s.key).load()["step"] for s in specs] == [15, 15]  # not the evaluation at 10
    for spec in specs:
        progress = json.loads((tmp_path / "part" / "progress" / f"{spec.key}.json").read_text())
        assert progress["state"] == "interrupted" and progress["step"] == 15 and progress["pack"] == [0, 1]

    crashed_at = []

    class Crash(Exception):
        pass

    def crash_at_23(i, row):
        if row["step"] == 23:
            crashed_at.append(i)
            raise Crash

    crashed = run_pack(specs, storage_uri=storage, cache_uri=cache, log=crash_at_23, log_every=1, checkpoint_every_s=1e-9)
    assert all(r.status == "failed" and "Crash" in r.error for r in crashed)
    assert [Checkpoints(storage, s.key).load()["step"] for s in specs] == [22, 22]  # every step saved on the clock
    resumed = run_pack(specs, storage_uri=storage, cache_uri=cache, on_start=lambda i, info: starts.append((i, info)))
    assert starts[-1][1]["resumed_from_step"] == 22
    for a, b in zip(resumed, full):
        assert a.status == "completed"
        assert a.metric_value == pytest.approx(b.metric_value, rel=1e-6)
        hist_a, hist_b = json.loads(a.metrics_json)["history"], json.loads(b.metrics_json)["history"]
        assert [p["train_loss"] for p in hist_a] == pytest.approx([p["train_loss"] for p in hist_b], rel=1e-6)
    for spec in specs:
        assert not (tmp_path / "part" / "progress" / f"{spec.key}.json").exists()  # removed when done
        log = (tmp_path / "part" / "logs" / f"{spec.key}.log").read_text()
        assert "packed with seeds [0, 1]" in log and "interrupted at step 15 (SIGTERM)" in log
        assert "resumed from the checkpoint at step 22" in log and "finished: completed" in log
