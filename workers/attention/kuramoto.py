"""Kuramoto attention on the torus (paper B), reconstructed as in VARIANTS.md section 3.

Legend: B batch, T sequence, D model width, H heads, M phase coordinates (all heads), P = M / H
phase coordinates per head, E = 2P (a head's [cos, sin] features), G gate width (M or H), L max length.

Paper B publishes only its abstract, so every choice below is an option with a documented default:

1. read-in: theta_t = W_in x_t, angles in R^M (no wrapping needed). The block's pre-norm supplies the
   LN(x_t) of the reconstruction.
2. score: e_t = [cos theta_t, sin theta_t] per head, gate g_t = softplus(W_g x_t) >= 0 (`gate`:
   softplus | none; `gate_per`: coordinate (one gate per phase, so the score is the gated cosine
   similarity sum_m g_tm cos(theta_tm - theta_um)) | head), query q_t = g_t * e_t, key k_u = e_u,
   rotary phase drift on both (`phase_drift`: rope | none; RoPE rotates each (cos, sin) pair, i.e.
   adds omega_m * t to theta_tm), scaled by 1/sqrt(E) (`score_scale`: sqrt | none), softmax over
   u <= t: a dot product, so fused causal SDPA computes it.
3. values v_u = e_u (raw phases, no drift); SDPA returns the weighted circular mean (C_t, S_t).
4. tangent update: delta_t = cos theta_t * S_t - sin theta_t * C_t = sum_u A_tu sin(theta_u - theta_t).
5. phase step: theta'_t = theta_t + kappa * delta_t, kappa a learned per-coordinate coupling
   initialised at `kappa_init` (1.0); `steps` > 1 repeats 2-5 from theta' (default 1).
6. read-out: x_t += W_out [cos theta'_t, sin theta'_t] (`readout`: phase) or W_out delta_t
   (`readout`: delta); W_out has a bias, as the softmax W_o.
`phase_dim` M defaults to D, which makes the layer's parameters 4D^2 + 2D against softmax's
4D^2 + D (W_in D x M, W_g D x M, W_out 2M x D + D, kappa M).
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from workers.attention.softmax import apply_rotary, rotary_tables, softmax_attention
from workers.variants import KuramotoConfig


class KuramotoAttention(nn.Module):
    def __init__(self, cfg: KuramotoConfig, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool,
                 rotary: bool = False) -> None:  # `rotary`, the backbone's RoPE flag: unused, the phase drift is this variant's
        super().__init__()
        M = d_model if cfg.phase_dim is None else int(cfg.phase_dim)
        if M < n_heads or M % n_heads:
            raise ValueError(f"kuramoto phase_dim={M} must be a positive multiple of n_heads={n_heads}")
        gate, gate_per, readout = cfg.gate, cfg.gate_per, cfg.readout
        self.n_heads, self.causal, self.phase_dim, self.steps = n_heads, causal, M, int(cfg.steps)
        self.gate, self.gate_per, self.readout = gate, gate_per, readout
        self.scale = None if cfg.score_scale == "sqrt" else 1.0
        self.w_in = nn.Linear(d_model, M, bias=False)
        self.w_g = None
        if gate != "none":
            self.w_g = nn.Linear(d_model, M if gate_per == "coordinate" else n_heads, bias=False)
        self.kappa_M = nn.Parameter(torch.full((M,), float(cfg.kappa_init)))
        self.w_out = nn.Linear(2 * M if readout == "phase" else M, d_model, bias=True)
        self.drift = cfg.phase_drift == "rope"
        if self.drift:
            cos_LP, sin_LP = rotary_tables(max_seq_len, 2 * (M // n_heads), base=float(cfg.rope_base))
            self.register_buffer("rope_cos_LP", cos_LP, persistent=False)
            self.register_buffer("rope_sin_LP", sin_LP, persistent=False)

    def heads(self, x_BTM: torch.Tensor) -> torch.Tensor:
        B, T, M = x_BTM.shape
        return x_BTM.view(B, T, self.n_heads, M // self.n_heads).transpose(1, 2)

    def forward(self, x_BTD: torch.Tensor, key_padding_BT: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        theta_BHTP = self.heads(self.w_in(x_BTD))
        gate_BHTP = None
        if self.w_g is not None:
            g = F.softplus(self.w_g(x_BTD))
            gate_BHTP = self.heads(g) if self.gate_per == "coordinate" else g.transpose(1, 2)[..., None]
        kappa_1HP = self.kappa_M.view(self.n_heads, -1)[None, :, None, :]
        for _ in range(self.steps):
            delta_BHTP = self.tangent_update(theta_BHTP, gate_BHTP, key_padding_BT)
            theta_BHTP = theta_BHTP + kappa_1HP * delta_BHTP
        if self.readout == "phase":
            feats_BHTE = torch.cat([theta_BHTP.cos(), theta_BHTP.sin()], dim=-1)
            out = feats_BHTE.transpose(1, 2).reshape(B, T, 2 * self.phase_dim)
        else:
            out = delta_BHTP.transpose(1, 2).reshape(B, T, self.phase_dim)
        return self.w_out(out)

    def tangent_update(self, theta_BHTP, gate_BHTP, key_padding_BT) -> torch.Tensor:
        """delta_t = sum_u A_tu sin(theta_u - theta_t), A the softmax of the gated, drifted cosine score."""
        cos_BHTP, sin_BHTP = theta_BHTP.cos(), theta_BHTP.sin()
        e_BHTE = torch.cat([cos_BHTP, sin_BHTP], dim=-1)  # half-split layout: RoPE rotates (cos, sin) pairs
        q_BHTE = e_BHTE
        if gate_BHTP is not None:  # one gate per phase multiplies its cos and its sin; a head gate all
            q_BHTE = e_BHTE * (torch.cat([gate_BHTP, gate_BHTP], dim=-1) if gate_BHTP.shape[-1] > 1 else gate_BHTP)
        k_BHTE = e_BHTE
        if self.drift:
            q_BHTE = apply_rotary(q_BHTE, self.rope_cos_LP, self.rope_sin_LP)
            k_BHTE = apply_rotary(k_BHTE, self.rope_cos_LP, self.rope_sin_LP)
        mean_BHTE = softmax_attention(q_BHTE, k_BHTE, e_BHTE, causal=self.causal, key_padding_BT=key_padding_BT,
                                      scale=self.scale)
        P = theta_BHTP.shape[-1]
        C_BHTP, S_BHTP = mean_BHTE[..., :P], mean_BHTE[..., P:]
        return cos_BHTP * S_BHTP - sin_BHTP * C_BHTP

    def projection_flops_per_token(self, d_model: int) -> float:
        M = self.phase_dim
        gate = 0 if self.w_g is None else self.w_g.out_features
        out = 2 * M if self.readout == "phase" else M
        return 2 * d_model * (M + gate + out)

    def attention_flops_per_token(self, seq_len: int, d_model: int) -> float:
        """SDPA over E = 2M/H features per head, scores and values, full context, per step."""
        return self.steps * 2 * 2 * (2 * self.phase_dim) * seq_len


def bench_op(case, B: int, T: int, D: int, H: int, device, leaf):
    """The benchmark's case (workers/bench.py): fwd + bwd of the tangent update from the phases and gates."""
    from workers.variants import get_variant

    module = get_variant("kuramoto").build(d_model=D, n_heads=H, max_seq_len=T, causal=True, **case.options).to(device)
    P = module.phase_dim // H
    theta, gate = leaf(B, H, T, P), leaf(B, H, T, P)
    return (theta, gate), lambda: module.tangent_update(theta, F.softplus(gate), None)
