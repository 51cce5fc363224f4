"""Attention variants: one file each, one registry line each (workers/variants.py).

Each variant module holds a pure function of tensors (easy to test against a reference), a thin
`nn.Module` that owns the parameters and is built from the variant's frozen config, and its
benchmark case. `build_attention(name, ...)` fails with the known names.

Every module takes (x_BTD, key_padding_BT=None) and returns (B, T, D); it reports
`projection_flops_per_token(D)` and `attention_flops_per_token(T, D)` (forward matmul FLOPs, 2 per
multiply-add) for `workers.model`. Parameter counts come from the module itself (`workers.sizing`
builds the model on the meta device).
"""

from __future__ import annotations

from typing import Any

from workers.attention.kuramoto import KuramotoAttention
from workers.attention.oscillator import OscillatorAttention, oscillator_attention, oscillator_attention_reference
from workers.attention.softmax import SoftmaxAttention, softmax_attention
from workers.variants import VARIANTS, get_variant


def build_attention(
    name: str, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool, rotary: bool = False, **options: Any
):
    """`rotary`: RoPE on q and k (backbone b, or `positions: rope`); variant options come as keywords."""
    return get_variant(name).build(d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, causal=causal,
                                   rotary=rotary, **options)


__all__ = [
    "VARIANTS",
    "build_attention",
    "softmax_attention",
    "oscillator_attention",
    "oscillator_attention_reference",
    "SoftmaxAttention",
    "OscillatorAttention",
    "KuramotoAttention",
]
