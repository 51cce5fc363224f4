"""The dense formula of fixed-query oscillator attention (paper A, VARIANTS.md section 2), line by
line: the oracle the fast kernels in `workers/attention/oscillator.py` are tested against, and the
readout they use where they have no kernel (p != 1, attention weights requested).

Legend: B batch, T sequence, H heads, K head width, d oscillator dimension (d_osc), L max length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def allowed_keys(T: int, *, causal: bool, key_padding_BT: torch.Tensor | None, device) -> torch.Tensor | None:
    """Boolean mask broadcastable to (B, H, T, T): True where query i may use key j."""
    allowed = None
    if causal:
        allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]
    if key_padding_BT is not None:
        keys = ~key_padding_BT[:, None, None, :]
        allowed = keys if allowed is None else allowed & keys
    return allowed


# ---- reference (dense) implementation --------------------------------------------------------


def oscillator_attention_reference(
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
    """The dense formula of VARIANTS.md section 2, analytic fixed point. Returns (out, weights|None)."""
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
    out_BHTK, a_BHTT = readout_dense(
        z_BHTd, anchors_HLd, v_BHTK, causal=causal, key_padding_BT=key_padding_BT, p=p,
        readout_padding_mask=readout_padding_mask,
    )
    return out_BHTK, (a_BHTT if return_weights else None)


def readout_dense(
    z_BHTd: torch.Tensor,
    anchors_HLd: torch.Tensor,
    v_BHTK: torch.Tensor,
    *,
    causal: bool,
    key_padding_BT: torch.Tensor | None,
    p: float,
    readout_padding_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Items 5-6 as a (T, T) matrix: any p, any |z|. Returns (out, attention weights)."""
    T = z_BHTd.shape[-2]
    r_1HTd = anchors_HLd[None, :, :T]
    s_BHTT = (1.0 + z_BHTd @ r_1HTd.transpose(-1, -2)).clamp_min(0.0)
    if p != 1:
        s_BHTT = s_BHTT.pow(p)
    # the reference code masks the readout only causally; the padding mask is on by default
    pad = key_padding_BT if readout_padding_mask else None
    readout_allowed = allowed_keys(T, causal=causal, key_padding_BT=pad, device=z_BHTd.device)
    if readout_allowed is not None:
        s_BHTT = s_BHTT.masked_fill(~readout_allowed, 0.0)
    a_BHTT = s_BHTT / s_BHTT.sum(dim=-1, keepdim=True).clamp_min(1e-8)
    return a_BHTT @ v_BHTK, a_BHTT
