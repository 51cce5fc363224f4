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

from workers.attention import native
from workers.attention.softmax import apply_rotary, rotary_tables, softmax_attention
from workers.variants import KuramotoConfig


FUSED_MAX_T = 128  # up to here the (T, T) weights are kept for backward (fastest on CPU); beyond, fused SDPA


def kuramoto_tangent_reference(theta_BHTP, gate_BHTG, cos_TP, sin_TP, *, causal: bool,
                               key_padding_BT: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The tangent update as the reconstruction reads: features, RoPE, fused SDPA, tangent component.
    `gate_BHTG`: (B, H, T, P) per coordinate, (B, H, T, 1) per head, or None; `cos_TP`/`sin_TP`: the
    drift's rotary tables (None: no drift). The test oracle of `kuramoto_tangent`, and its path past
    FUSED_MAX_T."""
    cos_BHTP, sin_BHTP = theta_BHTP.cos(), theta_BHTP.sin()
    e_BHTE = torch.cat([cos_BHTP, sin_BHTP], dim=-1)  # half-split layout: RoPE rotates (cos, sin) pairs
    q_BHTE = e_BHTE
    if gate_BHTG is not None:  # one gate per phase multiplies its cos and its sin; a head gate all
        q_BHTE = e_BHTE * (torch.cat([gate_BHTG, gate_BHTG], dim=-1) if gate_BHTG.shape[-1] > 1 else gate_BHTG)
    k_BHTE = e_BHTE
    if cos_TP is not None:
        q_BHTE = apply_rotary(q_BHTE, cos_TP, sin_TP)
        k_BHTE = apply_rotary(k_BHTE, cos_TP, sin_TP)
    mean_BHTE = softmax_attention(q_BHTE, k_BHTE, e_BHTE, causal=causal, key_padding_BT=key_padding_BT, scale=scale)
    P = theta_BHTP.shape[-1]
    C_BHTP, S_BHTP = mean_BHTE[..., :P], mean_BHTE[..., P:]
    return cos_BHTP * S_BHTP - sin_BHTP * C_BHTP


def kuramoto_tangent(theta_BHTP, gate_BHTG, cos_TP, sin_TP, *, causal: bool,
                     key_padding_BT: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """The same function as `kuramoto_tangent_reference`; up to FUSED_MAX_T positions (float32/64) one
    autograd Function with a hand-written backward: on the CPU the compiled kernel
    (`native.NativeTangent`) where it builds, else `_FusedTangent` (pure PyTorch, any device);
    past FUSED_MAX_T the reference."""
    T = theta_BHTP.shape[-2]
    if T > FUSED_MAX_T or theta_BHTP.dtype not in (torch.float32, torch.float64):
        return kuramoto_tangent_reference(theta_BHTP, gate_BHTG, cos_TP, sin_TP, causal=causal,
                                          key_padding_BT=key_padding_BT, scale=scale)
    P = theta_BHTP.shape[-1]
    scale = (2 * P) ** -0.5 if scale is None else float(scale)
    if theta_BHTP.device.type == "cpu" and native.load() is not None:
        # causal without padding needs no bias: the kernel stops each query's keys at itself
        bias = None if key_padding_BT is None else _score_bias(T, causal, key_padding_BT, theta_BHTP)
        return native.NativeTangent.apply(theta_BHTP, gate_BHTG, cos_TP, sin_TP, bias, scale, causal)
    bias = _score_bias(T, causal, key_padding_BT, theta_BHTP)
    return _FusedTangent.apply(theta_BHTP, gate_BHTG, cos_TP, sin_TP, bias, scale)


def _score_bias(T: int, causal: bool, key_padding_BT, like: torch.Tensor) -> torch.Tensor | None:
    """0 where query t may use key u, -inf elsewhere, exactly as `softmax_attention` masks: (T, T)
    when causal without padding, else (B, 1, T, T) with a query whose keys are all padding using
    itself. None: every key allowed."""
    if key_padding_BT is None:
        if not causal:
            return None
        return torch.full((T, T), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)
    allowed_B1TT = ~key_padding_BT[:, None, None, :]
    if causal:
        allowed_B1TT = allowed_B1TT & torch.ones(T, T, dtype=torch.bool, device=like.device).tril()
    allowed_B1TT = allowed_B1TT | torch.eye(T, dtype=torch.bool, device=like.device)
    zeros = torch.zeros(allowed_B1TT.shape, dtype=like.dtype, device=like.device)
    return zeros.masked_fill_(~allowed_B1TT, float("-inf"))


class _FusedTangent(torch.autograd.Function):
    """delta = Im(conj(e) . sum_u A_tu e_u) with e = [cos theta, sin theta] (half-split real layout),
    k = e rotated by the drift, q = scale * gate * k, A = softmax(q k^T + bias).

    Why: the reference spends ~70% of its time outside SDPA (cos/sin, cat, gating, RoPE on q and k,
    and in backward the slices, cats and zero fills of their autograd graph), and the CPU's fused
    SDPA recomputes the scores in backward. Here forward keeps A (T <= 128: small) and backward is
    four batched GEMMs plus a few elementwise passes: the gradient through every (cos, sin) pair is
    a 2-D cross product, Im(conj(x) g) = x_c g_s - x_s g_c, and the score's 1/sqrt(2P) rides on the
    gate, so no pass over a (T, T) tensor is spent on it."""

    @staticmethod
    def forward(ctx, theta_BHTP, gate_BHTG, cos_TP, sin_TP, bias, scale):
        B, H, T, P = theta_BHTP.shape
        e_BHT2P = torch.empty(B, H, T, 2, P, dtype=theta_BHTP.dtype, device=theta_BHTP.device)
        c_BHTP, s_BHTP = e_BHT2P[..., 0, :], e_BHT2P[..., 1, :]
        torch.cos(theta_BHTP, out=c_BHTP)
        torch.sin(theta_BHTP, out=s_BHTP)
        if cos_TP is None:
            k_BHT2P = e_BHT2P
        else:  # the drift: rotate each (cos, sin) pair by t * omega_m (the tables RoPE uses)
            cos_TP, sin_TP = cos_TP.to(theta_BHTP.dtype), sin_TP.to(theta_BHTP.dtype)
            k_BHT2P = torch.empty_like(e_BHT2P)
            torch.mul(c_BHTP, cos_TP, out=k_BHT2P[..., 0, :]).addcmul_(s_BHTP, sin_TP, value=-1)
            torch.mul(s_BHTP, cos_TP, out=k_BHT2P[..., 1, :]).addcmul_(c_BHTP, sin_TP)
        gs_BHTG = gate_BHTG * scale if gate_BHTG is not None else None
        q_BHT2P = k_BHT2P * (gs_BHTG[..., None, :] if gs_BHTG is not None else scale)
        e_NTE, k_NTE, q_NTE = (x.view(B * H, T, 2 * P) for x in (e_BHT2P, k_BHT2P, q_BHT2P))
        if bias is None:
            scores_NTT = torch.bmm(q_NTE, k_NTE.transpose(1, 2))
        elif bias.dim() == 2:
            scores_NTT = torch.baddbmm(bias, q_NTE, k_NTE.transpose(1, 2))
        else:  # (B, 1, T, T): padding
            scores_NTT = torch.bmm(q_NTE, k_NTE.transpose(1, 2))
            scores_NTT.view(B, H, T, T).add_(bias)
        a_NTT = torch.softmax(scores_NTT, dim=-1)
        o_NTE = torch.bmm(a_NTT, e_NTE)
        o_BHT2P = o_NTE.view(B, H, T, 2, P)
        C_BHTP, S_BHTP = o_BHT2P[..., 0, :], o_BHT2P[..., 1, :]
        delta_BHTP = torch.mul(c_BHTP, S_BHTP).addcmul_(s_BHTP, C_BHTP, value=-1)
        ctx.save_for_backward(e_BHT2P, k_BHT2P if cos_TP is not None else None, q_BHT2P, gs_BHTG, a_NTT, o_BHT2P)
        ctx.gate_shape = None if gate_BHTG is None else gate_BHTG.shape
        ctx.scale = scale
        return delta_BHTP

    @staticmethod
    def backward(ctx, g_delta_BHTP):
        e_BHT2P, k_saved, q_BHT2P, gs_BHTG, a_NTT, o_BHT2P = ctx.saved_tensors
        k_BHT2P = e_BHT2P if k_saved is None else k_saved
        B, H, T, _, P = e_BHT2P.shape
        g_delta_BHTP = g_delta_BHTP.contiguous()
        c_BHTP, s_BHTP = e_BHT2P[..., 0, :], e_BHT2P[..., 1, :]
        # delta = c S - s C: grad of the mean (C, S) is g (-s, c)
        g_o_BHT2P = torch.empty_like(e_BHT2P)
        torch.mul(s_BHTP, g_delta_BHTP, out=g_o_BHT2P[..., 0, :]).neg_()
        torch.mul(c_BHTP, g_delta_BHTP, out=g_o_BHT2P[..., 1, :])
        e_NTE, k_NTE, q_NTE = (x.view(B * H, T, 2 * P) for x in (e_BHT2P, k_BHT2P, q_BHT2P))
        g_o_NTE = g_o_BHT2P.view(B * H, T, 2 * P)
        g_e_NTE = torch.bmm(a_NTT.transpose(1, 2), g_o_NTE)  # values
        g_a_NTT = torch.bmm(g_o_NTE, e_NTE.transpose(1, 2))
        # softmax backward: A (dA - rowsum(dA A)), and rowsum(dA A) = rowsum(dO O)
        row_NT1 = (g_o_BHT2P * o_BHT2P).view(B * H, T, 2 * P).sum(-1, keepdim=True)
        g_s_NTT = g_a_NTT.sub_(row_NT1).mul_(a_NTT)
        g_q_NTE = torch.bmm(g_s_NTT, k_NTE)
        g_k_NTE = torch.bmm(g_s_NTT.transpose(1, 2), q_NTE)
        g_q_BHT2P, g_k_BHT2P = g_q_NTE.view(B, H, T, 2, P), g_k_NTE.view(B, H, T, 2, P)
        g_gate = None
        if ctx.gate_shape is not None:  # q = scale g k: dL/dg = scale <dq, k> over each (cos, sin) pair
            g_gate = (g_q_BHT2P * k_BHT2P).sum(-2)
            if ctx.gate_shape[-1] == 1:
                g_gate = g_gate.sum(-1, keepdim=True)
            g_gate.mul_(ctx.scale)
            g_k_BHT2P.addcmul_(g_q_BHT2P, gs_BHTG[..., None, :])
        else:
            g_k_BHT2P.add_(g_q_BHT2P, alpha=ctx.scale)
        # theta reaches delta directly (d delta/d(c, s) = (S, -C): cross term -g <e, o>), through the
        # values e and through the keys and queries k (a rotation of e): cross products with their grads
        g_e_BHT2P = g_e_NTE.view(B, H, T, 2, P)
        g_theta = _cross(e_BHT2P, g_e_BHT2P)
        g_theta.add_(_cross(k_BHT2P, g_k_BHT2P))
        dot_BHTP = torch.mul(c_BHTP, o_BHT2P[..., 0, :]).addcmul_(s_BHTP, o_BHT2P[..., 1, :])
        g_theta.addcmul_(g_delta_BHTP, dot_BHTP, value=-1)
        return g_theta, g_gate, None, None, None, None


def _cross(x_BHT2P: torch.Tensor, g_BHT2P: torch.Tensor) -> torch.Tensor:
    """x_c g_s - x_s g_c: the gradient of an angle whose (cos, sin) is x, given the gradient g of x."""
    return torch.mul(x_BHT2P[..., 0, :], g_BHT2P[..., 1, :]).addcmul_(x_BHT2P[..., 1, :], g_BHT2P[..., 0, :], value=-1)


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
        cos_TP = sin_TP = None
        if self.drift:
            T = theta_BHTP.shape[-2]
            cos_TP, sin_TP = self.rope_cos_LP[:T], self.rope_sin_LP[:T]
        return kuramoto_tangent(theta_BHTP, gate_BHTP, cos_TP, sin_TP, causal=self.causal,
                                key_padding_BT=key_padding_BT, scale=self.scale)

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
