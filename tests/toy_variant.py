"""A toy attention variant, in one file, as a new variant is written: its config, its module, its
benchmark case. tests/test_contracts.py registers it with one line and runs the whole variant
contract on it (the proof that a variant is one file plus one registry line).

Legend: B batch, T sequence, D model width, H heads, K head width.

The mixing: causal (or bidirectional) attention whose weights are sigmoid(q.k / sqrt K) ** sharpness,
normalised over the allowed keys (no softmax).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from workers.attention.softmax import SoftmaxAttention


@dataclass(frozen=True)
class ToyConfig:
    uses_d_osc: ClassVar[bool] = False
    sharpness: float = 2.0

    def __post_init__(self) -> None:
        if not self.sharpness > 0:
            raise ValueError(f"sharpness={self.sharpness} must be > 0")


def toy_attention(q_BHTK, k_BHTK, v_BHTK, *, causal: bool, key_padding_BT=None, sharpness: float = 2.0):
    T, K = q_BHTK.shape[-2], q_BHTK.shape[-1]
    w_BHTT = torch.sigmoid(q_BHTK @ k_BHTK.transpose(-1, -2) / math.sqrt(K)) ** sharpness
    keep = torch.ones(T, T, dtype=torch.bool, device=q_BHTK.device)
    if causal:
        keep = keep.tril()
    if key_padding_BT is not None:
        keep = (keep & ~key_padding_BT[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=q_BHTK.device)
    w_BHTT = w_BHTT * keep
    return (w_BHTT @ v_BHTK) / w_BHTT.sum(-1, keepdim=True)


class ToyAttention(SoftmaxAttention):
    """The softmax projections (and their RoPE) around the toy mixing."""

    def __init__(self, cfg: ToyConfig, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool,
                 rotary: bool = False) -> None:
        super().__init__(d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, causal=causal, rotary=rotary)
        self.sharpness = cfg.sharpness

    def forward(self, x_BTD: torch.Tensor, key_padding_BT: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x_BTD)
        o = toy_attention(q, k, v, causal=self.causal, key_padding_BT=key_padding_BT, sharpness=self.sharpness)
        return self.w_o(self.merge_heads(o))


def bench_op(case, B: int, T: int, D: int, H: int, device, leaf):
    K = D // H
    q, k, v = leaf(B, H, T, K), leaf(B, H, T, K), leaf(B, H, T, K)
    return (q, k, v), lambda: toy_attention(q, k, v, causal=True, **case.options)
