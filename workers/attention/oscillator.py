"""Fixed-query oscillator attention (paper A), VARIANTS.md section 2, analytic fixed point.

Legend: B batch, T sequence, H heads, K head width, d oscillator dimension (d_osc), L max length.

Each query position i holds one oscillator z_i on the sphere S^(d-1) driven by per-position anchors
r_j with positive couplings w_ij = softplus(q_i.k_j / sqrt K). Its stable equilibrium is
z_i* = h_i/|h_i|, h_i = sum_j w_ij r_j; the readout s_ij = (1 + <z_i*, r_j>)^p normalised over j
weights the values. With p = 1 the attention matrix has rank <= d + 1 per head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention.softmax import SoftmaxAttention


def allowed_keys(T: int, *, causal: bool, key_padding_BT: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask broadcastable to (B, H, T, T): True where query i may use key j."""
    allowed = None
    if causal:
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_BT is not None:
        keys = ~key_padding_BT[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


def oscillator_attention(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTK: torch.Tensor,
    anchors_HLd: torch.Tensor,
    *,
    causal: bool,
    key_padding_BT: torch.Tensor | None = None,
    p: float = 1.0,
    readout_padding_mask: bool = True,
    eps: float = 1e-8,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (output_BHTK, attention_BHTT or None)."""
    T, K = q_BHTK.shape[-2], q_BHTK.shape[-1]
    r_1HTd = anchors_HLd[None, :, :T]
    allowed = allowed_keys(T, causal=causal, key_padding_BT=key_padding_BT, device=q_BHTK.device)

    # 1. coupling: positive, causal, padding keys contribute nothing; no row normalisation
    w_BHTT = F.softplus(q_BHTK @ k_BHTK.transpose(-1, -2) / math.sqrt(K))
    if allowed is not None:
        w_BHTT = w_BHTT.masked_fill(~allowed, 0.0)
    # 2-4. the stable fixed point of dz/dt = (I - z z^T) h
    h_BHTd = w_BHTT @ r_1HTd
    z_BHTd = h_BHTd / h_BHTd.norm(dim=-1, keepdim=True).clamp_min(eps)
    # 5. readout: the only global operation
    s_BHTT = (1.0 + z_BHTd @ r_1HTd.transpose(-1, -2)).clamp_min(0.0)
    if p != 1:
        s_BHTT = s_BHTT.pow(p)
    readout_allowed = allowed
    if not readout_padding_mask:  # the reference code masks only causally in the readout
        readout_allowed = allowed_keys(T, causal=causal, key_padding_BT=None, device=q_BHTK.device)
    if readout_allowed is not None:
        s_BHTT = s_BHTT.masked_fill(~readout_allowed, 0.0)
    a_BHTT = s_BHTT / s_BHTT.sum(dim=-1, keepdim=True).clamp_min(1e-8)
    # 6. values
    return a_BHTT @ v_BHTK, (a_BHTT if return_weights else None)


class OscillatorAttention(SoftmaxAttention):
    """The softmax projections plus learned anchors r of shape (H, max_seq_len, d_osc)."""

    DEFAULTS: dict[str, Any] = {
        "d_osc": 2,
        "p": 1.0,
        "anchor_norm": "init",  # init (as the reference code) | always
        "readout_padding_mask": True,  # False reproduces the reference code
    }

    def __init__(
        self,
        *,
        d_model: int,
        n_heads: int,
        max_seq_len: int,
        causal: bool,
        d_osc: int = 2,
        p: float = 1.0,
        anchor_norm: str = "init",
        readout_padding_mask: bool = True,
    ) -> None:
        super().__init__(d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, causal=causal)
        if int(d_osc) < 2:
            raise ValueError(f"d_osc={d_osc} must be >= 2 (the oscillator lives on the sphere S^(d_osc-1))")
        if anchor_norm not in ("init", "always"):
            raise ValueError(f"anchor_norm={anchor_norm!r}; allowed: 'init', 'always'")
        self.d_osc, self.p = int(d_osc), float(p)
        self.anchor_norm, self.readout_padding_mask = anchor_norm, bool(readout_padding_mask)
        anchors = torch.randn(n_heads, max_seq_len, self.d_osc)
        self.anchors_HLd = nn.Parameter(anchors / anchors.norm(dim=-1, keepdim=True))

    def anchors(self) -> torch.Tensor:
        if self.anchor_norm == "always":
            return self.anchors_HLd / self.anchors_HLd.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return self.anchors_HLd

    def forward(
        self, x_BTD: torch.Tensor, key_padding_BT: torch.Tensor | None = None, return_weights: bool = False
    ):
        q, k, v = (self.split_heads(w(x_BTD)) for w in (self.w_q, self.w_k, self.w_v))
        o_BHTK, a_BHTT = oscillator_attention(
            q,
            k,
            v,
            self.anchors(),
            causal=self.causal,
            key_padding_BT=key_padding_BT,
            p=self.p,
            readout_padding_mask=self.readout_padding_mask,
            return_weights=return_weights,
        )
        out = self.w_o(self.merge_heads(o_BHTK))
        return (out, a_BHTT) if return_weights else out

    def attention_flops_per_token(self, seq_len: int, d_model: int) -> float:
        context = (seq_len + 1) / 2 if self.causal else seq_len
        # q.k and a.v over D, plus w.r and z.r over H*d
        return 2 * context * (2 * d_model + 2 * self.n_heads * self.d_osc)
