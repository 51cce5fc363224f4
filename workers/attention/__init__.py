"""Attention variants: one file each, one registry entry each.

Each variant module holds a pure function of tensors (easy to test against a reference) and a thin
`nn.Module` that owns the parameters. `build_attention(name, ...)` fails with the known names.

Every module takes (x_BTD, key_padding_BT=None) and returns (B, T, D); it reports
`projection_flops_per_token(D)`, `attention_flops_per_token(T, D)` (forward matmul FLOPs, 2 per
multiply-add) and `extra_params()` for `workers.model` and `workers.sizing`.
"""

from __future__ import annotations

from typing import Any

from storage.suggest import did_you_mean
from workers.attention.kuramoto import KuramotoAttention
from workers.attention.oscillator import OscillatorAttention, oscillator_attention, oscillator_attention_reference
from workers.attention.softmax import SoftmaxAttention, softmax_attention
from workers.variant_options import USES_D_OSC, VARIANT_OPTIONS  # torch-free: what studies.spec validates against

VARIANTS: dict[str, type] = {
    "softmax": SoftmaxAttention,
    "oscillator": OscillatorAttention,
    "kuramoto": KuramotoAttention,
}

assert set(VARIANTS) == set(VARIANT_OPTIONS), "workers/variant_options.py out of step with the variant registry"


def build_attention(
    name: str, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool, rotary: bool = False, **options: Any
):
    """`rotary`: the backbone's RoPE on q and k (paper B); variant options come as keywords."""
    if name not in VARIANTS:
        raise ValueError(f"unknown attention variant {name!r}; known variants: {sorted(VARIANTS)}{did_you_mean(name, VARIANTS)}")
    unknown = set(options) - set(VARIANT_OPTIONS[name])
    if unknown:
        raise ValueError(f"variant {name}: unknown option(s) {sorted(unknown)}; allowed: {sorted(VARIANT_OPTIONS[name])}")
    return VARIANTS[name](d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, causal=causal, rotary=rotary,
                          **options)


__all__ = [
    "VARIANTS",
    "VARIANT_OPTIONS",
    "USES_D_OSC",
    "build_attention",
    "softmax_attention",
    "oscillator_attention",
    "oscillator_attention_reference",
    "SoftmaxAttention",
    "OscillatorAttention",
    "KuramotoAttention",
]
