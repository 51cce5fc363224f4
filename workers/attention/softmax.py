"""Softmax attention (the baseline), VARIANTS.md section 1: fused scaled dot-product attention.

Legend: B batch, T sequence, D model width, H heads, K head width (D/H).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def softmax_attention(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTK: torch.Tensor,
    *,
    causal: bool,
    key_padding_BT: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head SDPA. `key_padding_BT` is True where a key is padding (never attended to)."""
    if key_padding_BT is None:
        return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=causal)
    T = q_BHTK.shape[-2]
    allowed_B11T = ~key_padding_BT[:, None, None, :]
    if causal:
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=q_BHTK.device).tril()
        allowed_B1TT = allowed_B11T & causal_TT
    else:
        allowed_B1TT = allowed_B11T.expand(-1, -1, T, -1)
    # A query whose every key is padding would give NaN; let it attend to itself instead.
    allowed_B1TT = allowed_B1TT | torch.eye(T, dtype=torch.bool, device=q_BHTK.device)
    return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, attn_mask=allowed_B1TT)


class SoftmaxAttention(nn.Module):
    """W_q, W_k, W_v without bias, W_o with bias (paper A's projections)."""

    DEFAULTS: dict = {}

    def __init__(self, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.causal = n_heads, causal
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=True)

    def split_heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        return x_BTD.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)

    def merge_heads(self, o_BHTK: torch.Tensor) -> torch.Tensor:
        B, H, T, K = o_BHTK.shape
        return o_BHTK.transpose(1, 2).reshape(B, T, H * K)

    def forward(self, x_BTD: torch.Tensor, key_padding_BT: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (self.split_heads(w(x_BTD)) for w in (self.w_q, self.w_k, self.w_v))
        o_BHTK = softmax_attention(q, k, v, causal=self.causal, key_padding_BT=key_padding_BT)
        return self.w_o(self.merge_heads(o_BHTK))

    def attention_flops_per_token(self, seq_len: int, d_model: int) -> float:
        """Forward FLOPs of the score and value stages per token (matmuls count 2 per MAC)."""
        context = (seq_len + 1) / 2 if self.causal else seq_len
        return 2 * 2 * d_model * context
