"""The model: both backbones with every variant, exact parameter counts, FLOPs growing as they should
(against torch's flop counter: tests/test_contracts.py), heads, and paper A's presets.

Legend: B batch, T sequence, D model width, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.model import ModelConfig, SwiGLU, Transformer
from workers.presets import PAPER_A, check_task_fields, paper_preset
from workers.trial import TRAIN_DEFAULTS, resolve_train

VARIANTS = [("softmax", {}), ("oscillator", {"d_osc": 4}), ("oscillator", {"d_osc": 32}),
            ("oscillator", {"d_osc": 4, "p": 2.0}), ("kuramoto", {}),
            ("kuramoto", {"readout": "delta", "gate_per": "head", "phase_dim": 32})]
IDS = ["softmax", "osc-d4", "osc-d32", "osc-p2", "kuramoto", "kuramoto-alt"]


def config(attention="softmax", options=None, backbone="a", **fields) -> ModelConfig:
    base = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=64,
                positions="sinusoidal" if backbone == "a" else "none")
    return ModelConfig(**{**base, **fields}, attention=attention, attention_options=options or {}, backbone=backbone)


@pytest.mark.parametrize("backbone", ["a", "b"])
@pytest.mark.parametrize("attention,options", VARIANTS, ids=IDS)
def test_param_counts_are_exact(attention, options, backbone):
    model = Transformer(config(attention, options, backbone, positions="learned"))
    total, non_embedding = model.param_counts()
    assert total == sum(p.numel() for p in model.parameters())
    assert total - non_embedding == 300 * 64 + 64 * 64  # token table + learned positions


# FLOPs per token against torch's flop counter: the variant contract (tests/test_contracts.py).


def test_flops_grow_with_context_and_d_osc():
    cfg = dict(vocab_size=64, d_model=32, d_ff=64, max_seq_len=128)
    small = Transformer(config("oscillator", {"d_osc": 2}, **cfg))
    large = Transformer(config("oscillator", {"d_osc": 32}, **cfg))
    assert small.flops_per_token(100) < large.flops_per_token(100)
    assert small.flops_per_token(50) < small.flops_per_token(100)


def test_backbone_b_is_rope_swiglu_rmsnorm():
    model = Transformer(config("softmax", backbone="b"))
    block = model.blocks[0]
    assert isinstance(block.ffn, SwiGLU) and isinstance(block.ln_attn, nn.RMSNorm)
    assert isinstance(model.ln_final, nn.RMSNorm) and block.attn.rotary
    assert all(not hasattr(m, "bias") or m.bias is None for m in block.ffn.modules() if isinstance(m, nn.Linear))
    a = Transformer(config("softmax", backbone="a")).blocks[0]
    assert isinstance(a.ln_attn, nn.LayerNorm) and not a.attn.rotary


def test_backbone_a_drops_out_in_the_ffn_only():
    """Paper A's reference code: no dropout on the attention branch."""
    block_a = Transformer(config("softmax", backbone="a", dropout=0.5)).blocks[0]
    block_b = Transformer(config("softmax", backbone="b", dropout=0.5)).blocks[0]
    assert isinstance(block_a.drop, nn.Identity) and isinstance(block_b.drop, nn.Dropout)


@pytest.mark.parametrize("backbone", ["a", "b"])
@pytest.mark.parametrize("attention,options", VARIANTS[:2] + VARIANTS[4:5], ids=["softmax", "osc", "kuramoto"])
def test_model_is_causal_through_gradients(attention, options, backbone):
    model = Transformer(config(attention, options, backbone, dropout=0.0)).double()
    x = torch.randn(2, 10, 64, dtype=torch.float64, requires_grad=True)

    def from_embeddings(x_BTD):
        for block in model.blocks:
            x_BTD = block(x_BTD, None)
        return model.head(model.ln_final(x_BTD))

    out = from_embeddings(x)
    for t in range(10):
        (grad,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
        assert torch.all(grad[:, t + 1 :] == 0)


def test_heads_classify_token_and_feature_input():
    torch.manual_seed(0)
    features = torch.randn(3, 12, 40)
    pad = torch.zeros(3, 12, dtype=torch.bool)
    pad[0, 8:] = True
    kws = Transformer(config(head="classify", num_classes=10, input_dim=40, causal=False, positions="none",
                             final_norm=False)).eval()
    logits = kws(features, pad)
    assert logits.shape == (3, 10)
    other = features.clone()
    other[0, 8:] = 100.0  # padded frames change nothing
    torch.testing.assert_close(kws(other, pad), logits)
    sva = Transformer(config(head="token", num_classes=1, causal=False)).eval()
    tokens = torch.randint(0, 300, (3, 12))
    out = sva(tokens, positions_B=torch.tensor([1, 5, 11]))
    assert out.shape == (3, 1)
    with pytest.raises(ValueError, match="needs positions_B"):
        sva(tokens)


def test_bad_backbone_rejected():
    with pytest.raises(ValueError, match="backbone='c'; allowed: \\['a', 'b'\\]"):
        config(backbone="c")


# ---- paper A presets -------------------------------------------------------------------------

TASK_FIELDS = {
    "kws": {"vocab_size": 0, "input_dim": 40, "max_seq_len": 49, "head": "classify", "num_classes": 10, "causal": False},
    "sva": {"vocab_size": 169, "max_seq_len": 9, "head": "token", "num_classes": 1, "causal": False},
    "wikitext2": {"vocab_size": 10_000, "max_seq_len": 49, "head": "lm", "causal": True},
    "tinystories": {"vocab_size": 8_004, "max_seq_len": 127, "head": "lm", "causal": True},
}


@pytest.mark.parametrize("task", sorted(PAPER_A))
@pytest.mark.parametrize("attention,options", [("softmax", {}), ("oscillator", {"d_osc": 2})])
def test_paper_presets_build_the_papers_models(task, attention, options):
    preset = paper_preset(task)
    check_task_fields(task, TASK_FIELDS[task])
    with torch.device("meta"):
        model = Transformer(ModelConfig(**preset["model"], **TASK_FIELDS[task], attention=attention,
                                        attention_options=options))
    total, _ = model.param_counts()
    assert abs(total - preset["params_approx"]) <= 0.05 * preset["params_approx"], (task, total)
    assert set(preset["train"]) <= set(TRAIN_DEFAULTS)
    resolve_train(preset["train"], {})  # every value is one the trainer accepts


def test_preset_lookup_and_mismatch_messages():
    assert paper_preset("WikiText-2")["model"]["d_model"] == 128
    assert paper_preset("kws")["model"]["final_norm"] is False
    with pytest.raises(ValueError, match="presets exist for: \\['kws', 'sva', 'tinystories', 'wikitext2'\\]"):
        paper_preset("enwik8")
    with pytest.raises(ValueError, match="vocab_size: paper 10000, data 20000"):
        check_task_fields("wikitext2", {**TASK_FIELDS["wikitext2"], "vocab_size": 20_000})


def test_positions_rope_rotates_q_and_k_and_adds_nothing():
    """`model: {positions: rope}` (accepted by the study schema) is RoPE inside every attention layer."""
    model = Transformer(config("softmax", positions="rope"))
    assert model.pos_LD is None and all(block.attn.rotary for block in model.blocks)
    assert not Transformer(config("softmax", positions="sinusoidal")).blocks[0].attn.rotary
    with pytest.raises(ValueError, match="need an even head width, but d_model=24 / n_heads=8 = 3"):
        config("softmax", positions="rope", d_model=24, n_heads=8)


def test_every_model_option_the_study_schema_accepts_trains():
    """Each value of each Literal the schema takes for `model:` builds a model that takes a training step."""
    from workers.configs import BACKBONES, POSITIONS

    for positions in POSITIONS:
        for backbone in BACKBONES:
            model = Transformer(config("oscillator", {"d_osc": 2}, backbone, positions=positions, n_layers=1, d_model=32,
                                       d_ff=32, max_seq_len=8))
            tokens = torch.randint(0, 300, (2, 8))
            loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
            loss.backward()
            assert torch.isfinite(loss), (positions, backbone)


@pytest.mark.slow  # ~7 s (builds the MQAR data); the step above covers the default run
def test_a_positions_rope_trial_completes(tmp_path):
    from conftest import tiny_spec
    from workers import run_trial

    spec = tiny_spec(model={**tiny_spec().model, "positions": "rope"}, train={**tiny_spec().train, "steps": 2, "eval_every": 2})
    record = run_trial(spec, storage_uri=str(tmp_path / "study"), cache_uri=str(tmp_path / "cache"))
    assert record.status == "completed", record.error
