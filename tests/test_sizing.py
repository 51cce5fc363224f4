"""Parameter-count targeting: every variant within 2% of the target, variants matched within 2% of each
other, counts equal to the built model's, and a clear error where no shape fits."""

from __future__ import annotations

import pytest
import torch

from workers.model import ModelConfig, Transformer
from workers.sizing import model_fields, parameter_matched, shape_for_target

VARIANTS = [("softmax", {}), ("oscillator", {"d_osc": 2}), ("oscillator", {"d_osc": 32}),
            ("oscillator", {"d_osc": 64}), ("kuramoto", {})]


BYTES_B = dict(vocab_size=256, seq_len=512, backbone="b")  # paper B: bytes, RoPE + SwiGLU
WORDS_A = dict(vocab_size=10_000, seq_len=49, backbone="a")  # paper A's WikiText-2 data (1M total is too small for it)


@pytest.mark.parametrize("target,data", [(1e6, BYTES_B), (5e6, BYTES_B), (2e7, BYTES_B), (5e6, WORDS_A), (2e7, WORDS_A)],
                         ids=["1M-bytes-b", "5M-bytes-b", "20M-bytes-b", "5M-words-a", "20M-words-a"])
def test_every_variant_within_2_percent_and_matched(target, data):
    shapes = parameter_matched(target, VARIANTS, **data)
    totals = [s["params_total"] for s in shapes]
    assert all(abs(t - target) <= 0.02 * target for t in totals), totals
    assert max(totals) <= 1.02 * min(totals)
    assert shapes[0]["shared_shape"] and shapes[1]["shared_shape"]  # softmax and d_osc 2: same depth and width
    assert shapes[1]["d_model"] == shapes[0]["d_model"] and shapes[1]["n_layers"] == shapes[0]["n_layers"]


@pytest.mark.parametrize("variant,options", VARIANTS[1:4:2] + VARIANTS[4:], ids=["osc-d2", "osc-d64", "kuramoto"])
def test_counts_are_those_of_the_built_model(variant, options):
    shape = shape_for_target(2e6, variant=variant, variant_options=options, vocab_size=256, seq_len=256, backbone="b")
    cfg = ModelConfig(vocab_size=256, max_seq_len=256, backbone="b", positions="none", attention=variant,
                      attention_options=options, **model_fields(shape))
    model = Transformer(cfg)
    assert model.param_counts() == (shape["params_total"], shape["params_non_embedding"])
    assert shape["relative_error"] == pytest.approx((shape["params_total"] - 2e6) / 2e6)
    assert shape["d_model"] % shape["n_heads"] == 0 and shape["d_model"] // shape["n_heads"] == 32
    assert shape["d_model"] <= shape["d_ff"] <= 8 * shape["d_model"]


@pytest.mark.parametrize("target", [4e5, 1e6])
def test_kuramoto_with_a_fixed_phase_dim_gets_heads_that_divide_it(target):
    """softmax's head count at these targets (3 and 5 heads of 32) does not divide phase_dim 32:
    Kuramoto takes the divisor of d_model nearest it that does, and says it is not the shared shape."""
    reference = shape_for_target(target, vocab_size=1000, seq_len=128)
    shape = shape_for_target(target, variant="kuramoto", variant_options={"phase_dim": 32}, vocab_size=1000, seq_len=128)
    assert 32 % reference["n_heads"] != 0
    assert 32 % shape["n_heads"] == 0 and shape["d_model"] % shape["n_heads"] == 0
    assert shape["d_model"] == reference["d_model"] and shape["n_layers"] == reference["n_layers"]
    assert not shape["shared_shape"] and abs(shape["relative_error"]) <= 0.01
    others = [h for h in range(1, shape["d_model"] + 1) if shape["d_model"] % h == 0 and 32 % h == 0]
    assert min(abs(h - reference["n_heads"]) for h in others) == abs(shape["n_heads"] - reference["n_heads"])
    cfg = ModelConfig(vocab_size=1000, max_seq_len=128, attention="kuramoto", attention_options={"phase_dim": 32},
                      **model_fields(shape))
    with torch.device("meta"):
        assert Transformer(cfg).param_counts() == (shape["params_total"], shape["params_non_embedding"])


def test_shape_policy_aspect_ratio_and_ffn_ratio():
    shape = shape_for_target(1e7, vocab_size=256, seq_len=512, backbone="a")
    assert shape["n_layers"] == max(1, round(shape["d_model"] / 64))
    assert 3 <= shape["d_ff"] / shape["d_model"] <= 5  # near the nominal 4x
    assert shape["d_ff"] % 8 == 0


def test_non_embedding_target():
    """Non-embedding = total minus the token (and learned position) tables; the untied head stays in."""
    shape = shape_for_target(1e6, variant="oscillator", variant_options={"d_osc": 8}, vocab_size=2_000, seq_len=49,
                             count="non_embedding")
    assert abs(shape["params_non_embedding"] - 1e6) <= 0.02 * 1e6
    assert shape["params_total"] - shape["params_non_embedding"] == 2_000 * shape["d_model"]


def test_impossible_target_says_why():
    with pytest.raises(ValueError, match="embedding alone exceeds the target; use count='non_embedding'"):
        shape_for_target(1e6, vocab_size=10_000, seq_len=49)
    with pytest.raises(ValueError, match="count='all'; allowed"):
        shape_for_target(1e6, vocab_size=256, seq_len=49, count="all")


def test_sizing_allocates_nothing():
    before = torch.randn(1)  # meta-device builds: the sizing loop never materialises weights
    shape_for_target(2e7, variant="oscillator", variant_options={"d_osc": 64}, vocab_size=256, seq_len=2048,
                     backbone="b")
    assert before.device.type == "cpu"
