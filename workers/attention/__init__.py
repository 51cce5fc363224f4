"""Attention variants: one file each, one registry entry each.

Each variant module holds a pure function of tensors (easy to test against a reference) and a thin
`nn.Module` that owns the parameters. `build_attention(name, ...)` fails with the known names.
"""

from __future__ import annotations

from typing import Any

from workers.attention.oscillator import OscillatorAttention, oscillator_attention
from workers.attention.softmax import SoftmaxAttention, softmax_attention

VARIANTS: dict[str, type] = {
    "softmax": SoftmaxAttention,
    "oscillator": OscillatorAttention,
}

# Options each variant accepts in a study file, with their defaults (validated by `studies.spec`).
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "softmax": {},
    "oscillator": OscillatorAttention.DEFAULTS,
}

# Variants whose cells multiply by the study's d_osc list.
USES_D_OSC = frozenset({"oscillator"})


def build_attention(name: str, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool, **options: Any):
    if name not in VARIANTS:
        raise ValueError(f"unknown attention variant {name!r}; known variants: {sorted(VARIANTS)}")
    return VARIANTS[name](d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, causal=causal, **options)


__all__ = [
    "VARIANTS",
    "VARIANT_OPTIONS",
    "USES_D_OSC",
    "build_attention",
    "softmax_attention",
    "oscillator_attention",
    "SoftmaxAttention",
    "OscillatorAttention",
]
