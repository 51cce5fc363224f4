"""Softmax attention (the baseline), VARIANTS.md section 1: fused scaled dot-product attention.

Legend: B batch, T sequence, D model width, H heads, K head width (D/H), L max length.

The paper-B backbone adds rotary position embeddings (RoPE) to q and k; `rotary=True` does that
here, for every variant built on these projections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.variants import SoftmaxConfig

ROPE_BASE = 10000.0


def rotary_tables(max_len: int, width: int, base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of angle t * base^(-m / (width/2)) for positions t and pair index m: (L, width/2) each."""
    if width % 2:
        raise ValueError(f"rotary embeddings need an even head width, got {width}")
    inv_freq = base ** (-torch.arange(0, width // 2, dtype=torch.float64) / (width // 2))
    angle_LM = torch.arange(max_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angle_LM.cos().float(), angle_LM.sin().float()


def apply_rotary(x_BHTK: torch.Tensor, cos_LM: torch.Tensor, sin_LM: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_m, x_{m+K/2}) by position-dependent angles (the half-split RoPE layout)."""
    T, half = x_BHTK.shape[-2], x_BHTK.shape[-1] // 2
    cos_TM, sin_TM = cos_LM[:T].to(x_BHTK.dtype), sin_LM[:T].to(x_BHTK.dtype)
    x1, x2 = x_BHTK[..., :half], x_BHTK[..., half:]
    return torch.cat([x1 * cos_TM - x2 * sin_TM, x1 * sin_TM + x2 * cos_TM], dim=-1)


def softmax_attention(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTK: torch.Tensor,
    *,
    causal: bool,
    key_padding_BT: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head SDPA. `key_padding_BT` is True where a key is padding (never attended to)."""
    if key_padding_BT is None:
        return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, is_causal=causal, scale=scale)
    T = q_BHTK.shape[-2]
    allowed_B11T = ~key_padding_BT[:, None, None, :]
    if causal:
        causal_TT = torch.ones(T, T, dtype=torch.bool, device=q_BHTK.device).tril()
        allowed_B1TT = allowed_B11T & causal_TT
    else:
        allowed_B1TT = allowed_B11T.expand(-1, -1, T, -1)
    # A query whose every key is padding would give NaN; let it attend to itself instead.
    allowed_B1TT = allowed_B1TT | torch.eye(T, dtype=torch.bool, device=q_BHTK.device)
    return F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK, attn_mask=allowed_B1TT, scale=scale)


class SoftmaxAttention(nn.Module):
    """W_q, W_k, W_v without bias, W_o with bias (paper A's projections); RoPE on q, k if `rotary`."""

    def __init__(self, cfg: SoftmaxConfig | None = None, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool,
                 rotary: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.causal, self.rotary = n_heads, causal, bool(rotary)
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=True)
        if self.rotary:
            cos_LM, sin_LM = rotary_tables(max_seq_len, d_model // n_heads)
            self.register_buffer("rope_cos_LM", cos_LM, persistent=False)
            self.register_buffer("rope_sin_LM", sin_LM, persistent=False)

    def split_heads(self, x_BTD: torch.Tensor) -> torch.Tensor:
        B, T, D = x_BTD.shape
        return x_BTD.view(B, T, self.n_heads, D // self.n_heads).transpose(1, 2)

    def merge_heads(self, o_BHTK: torch.Tensor) -> torch.Tensor:
        B, H, T, K = o_BHTK.shape
        return o_BHTK.transpose(1, 2).reshape(B, T, H * K)

    def project(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = (self.split_heads(w(x_BTD)) for w in (self.w_q, self.w_k, self.w_v))
        if self.rotary:
            q = apply_rotary(q, self.rope_cos_LM, self.rope_sin_LM)
            k = apply_rotary(k, self.rope_cos_LM, self.rope_sin_LM)
        return q, k, v

    def forward(self, x_BTD: torch.Tensor, key_padding_BT: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.project(x_BTD)
        o_BHTK = softmax_attention(q, k, v, causal=self.causal, key_padding_BT=key_padding_BT)
        return self.w_o(self.merge_heads(o_BHTK))

    def attention_flops_per_token(self, seq_len: int, d_model: int) -> float:
        """Forward matmul FLOPs of the mixing per token: q.k and a.v over D, 2 per multiply-add.

        Full context even when causal (the Kaplan / Chinchilla / nanoGPT convention, and what
        torch's flop counter measures for SDPA), so variants are counted on the same basis."""
        return 2 * 2 * d_model * seq_len

    def projection_flops_per_token(self, d_model: int) -> float:
        return 2 * 4 * d_model * d_model


def bench_op(case, B: int, T: int, D: int, H: int, device, leaf):
    """The benchmark's case (workers/bench.py): fwd + bwd of the mixing from q, k, v."""
    K = D // H
    q, k, v = leaf(B, H, T, K), leaf(B, H, T, K), leaf(B, H, T, K)
    return (q, k, v), lambda: softmax_attention(q, k, v, causal=True)
