"""Fixed-query oscillator attention (paper A), VARIANTS.md section 2.

Legend: B batch, T sequence (query positions), S key positions (S = T; S_blk a block of them),
H heads, K head width, d oscillator dimension (d_osc), L max length, F = d + 1 readout features,
V = K + 1 values plus the readout denominator, C chunk length, N chunks, U anchors with norm > 1.

Each query position i holds one oscillator z_i on the sphere S^(d-1) driven by per-position anchors
r_j with positive couplings w_ij = softplus(q_i.k_j / sqrt K). Its stable equilibrium is
z_i* = h_i/|h_i|, h_i = sum_j w_ij r_j; the readout s_ij = max(0, 1 + <z_i*, r_j>)^p normalised over
j weights the values. With p = 1 the attention matrix has rank <= d + 1 per head.

Two implementations of the same function:
- `oscillator_attention_reference` (workers/attention/oscillator_reference.py): the dense formula,
  line by line (the test oracle; also what `return_weights=True` and p != 1 use for the readout).
- `oscillator_attention` (fast paths, chosen in one place: `choose_path`): the quadratic coupling stage is one autograd Function that
  keeps two (T, S) tensors per block for backward (the couplings and their slope, so backward has
  no transcendental and no mask) and, past T = 128, skips key blocks above the causal diagonal.
  The readout and value stage (p = 1) is either one autograd Function over a (T, T) matrix with a
  hand-written backward and the normalisation of h folded in (T <= 128: fastest on CPU), or
  linear in T: with phi_i = [1, z_i] and psi_j = [1, r_j], s_ij = phi_i . psi_j, so
  sum_j s_ij [v_j, 1] is causal linear attention with feature dimension d + 1, computed in chunks
  with prefix sums over chunk states. The clamp at 0 is inactive when |z_i| <= 1 and |r_j| <= 1;
  anchors may grow past norm 1 (anchor_norm=init never re-normalises them), so those keys are
  checked exactly and, where the clamp is active, a sparse correction max(0, -1 - <z_i, r_j>) is
  added. Both equal the dense formula to float rounding, gradients included (tests/test_attention.py).
  For T <= 128, coupling and readout are instead one autograd Function (the "fused" path): on CPU
  float32/64 tensors the compiled kernel (`native.NativeOscillator`, workers/attention/native.py: one
  (batch, head) at a time in cache, causal blocks skipped), at every d_osc, where it builds; else, for
  d_osc > 8 only, `_DenseOscillator` in (H, B, T, .) layout, where every product with the anchors,
  which the batch shares, is one large GEMM per head (for d_osc <= 8 the two Functions above beat it).
  `_DenseOscillator` is also the kernel's test partner.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from workers.attention import native
from workers.attention.dynamics import MODES, integrate_fixed_points
from workers.attention.oscillator_reference import oscillator_attention_reference, readout_dense
from workers.attention.softmax import SoftmaxAttention
from workers.variants import OscillatorConfig

READOUTS = ("auto", "dense", "linear")
DENSE_READOUT_MAX_T = 128  # up to here one (T, T) readout matrix beats chunked prefix sums on CPU
SPARSE_CORRECTION_PER_QUERY = 32  # clamp corrections gathered pair by pair up to this many per query
NARROW_D = 8  # d_osc up to here: products with the anchors go narrow operand first; above: _DenseOscillator
LINEAR_CHUNK = 32  # keys per chunk of the linear readout: best or near it on CPU at T 256 and 1024, d 2 and 32


# ---- fast path: coupling stage ---------------------------------------------------------------


def _coupling_blocks(T: int, causal: bool, block_size: int | None) -> list[tuple[int, int, int]]:
    """(query start, query end, key end) per block. Causal blocks skip keys above the diagonal."""
    if not causal:
        return [(0, T, T)]
    if block_size is None:  # measured on CPU: one block while T is small, then 64-query blocks
        block_size = T if T <= DENSE_READOUT_MAX_T else 64
    return [(a, min(a + block_size, T), min(a + block_size, T)) for a in range(0, T, block_size)]


def _times_anchors(w_BHTS: torch.Tensor, r_bHSd: torch.Tensor) -> torch.Tensor:
    """w @ r with the layout that CPU GEMM handles well: for small d the narrow operand goes first."""
    B, H = w_BHTS.shape[:2]
    if r_bHSd.shape[-1] <= NARROW_D:
        rt_BHdS = r_bHSd.transpose(-1, -2).expand(B, H, -1, -1)
        return (rt_BHdS @ w_BHTS.transpose(-1, -2)).transpose(-1, -2)
    return w_BHTS @ r_bHSd.expand(B, H, -1, -1)


def _minus_inf_above_diagonal(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n, n), -math.inf, dtype=like.dtype, device=like.device).triu_(1)


class _CouplingField(torch.autograd.Function):
    """h = softplus(q k^T / sqrt K) @ r with the causal mask.

    Forward keeps, per block, the couplings w and sigmoid(scores) / sqrt K (the softplus derivative
    with the score scale folded in), so backward needs no transcendental and no mask: masked
    scores are -inf, where both are 0."""

    @staticmethod
    def forward(ctx, q_BHTK, k_BHTK, r_bHTd, causal: bool, block_size: int | None):
        B, H, T, K = q_BHTK.shape
        scale = 1.0 / math.sqrt(K)
        blocks = _coupling_blocks(T, causal, block_size)
        q_scaled_BHTK = q_BHTK * scale
        h_parts, saved = [], []
        for start, end, key_end in blocks:
            scores_BHTS = q_scaled_BHTK[:, :, start:end] @ k_BHTK[:, :, :key_end].transpose(-1, -2)
            if causal:  # adding a float -inf mask is ~10x faster on CPU than masked_fill_ with a bool one
                scores_BHTS[..., start:end].add_(_minus_inf_above_diagonal(end - start, scores_BHTS))
            w_BHTS = F.softplus(scores_BHTS)
            dw_dscore_BHTS = torch.sigmoid(scores_BHTS).mul_(scale)
            del scores_BHTS
            h_parts.append(_times_anchors(w_BHTS, r_bHTd[:, :, :key_end]))
            saved += [w_BHTS, dw_dscore_BHTS]
        ctx.blocks = blocks
        ctx.save_for_backward(q_BHTK, k_BHTK, r_bHTd, *saved)
        return h_parts[0] if len(h_parts) == 1 else torch.cat(h_parts, dim=2)

    @staticmethod
    def backward(ctx, dh_BHTd):
        q_BHTK, k_BHTK, r_bHTd, *saved = ctx.saved_tensors
        B, H, T, d = dh_BHTd.shape
        narrow = d <= NARROW_D
        r_BHTd = r_bHTd.expand(B, H, T, d)
        if not narrow:
            r_BHTd = r_BHTd.contiguous()  # a broadcast operand makes matmul copy it per call anyway
        if len(ctx.blocks) == 1:  # the common short-sequence case: no accumulation buffers
            w_BHTS, dw_dscore_BHTS = saved
            ds_BHTS = (dh_BHTd @ r_BHTd.transpose(-1, -2)).mul_(dw_dscore_BHTS)  # dL/dscores
            dq_BHTK = ds_BHTS @ k_BHTK
            dk_BHTK = ds_BHTS.transpose(-1, -2) @ q_BHTK
            dr_BHTd = _anchor_grad(w_BHTS, dh_BHTd, narrow)
        else:
            dq_BHTK = torch.empty_like(q_BHTK)
            dk_BHTK = torch.zeros_like(k_BHTK)
            dr_BHTd = torch.zeros(B, H, T, d, dtype=dh_BHTd.dtype, device=dh_BHTd.device)
            for i, (start, end, key_end) in enumerate(ctx.blocks):
                w_BHTS, dw_dscore_BHTS = saved[2 * i], saved[2 * i + 1]
                dh_blk = dh_BHTd[:, :, start:end]
                ds_BHTS = (dh_blk @ r_BHTd[:, :, :key_end].transpose(-1, -2)).mul_(dw_dscore_BHTS)
                torch.matmul(ds_BHTS, k_BHTK[:, :, :key_end], out=dq_BHTK[:, :, start:end])
                dk_BHTK[:, :, :key_end] += ds_BHTS.transpose(-1, -2) @ q_BHTK[:, :, start:end]
                dr_BHTd[:, :, :key_end] += _anchor_grad(w_BHTS, dh_blk, narrow)
        dr_bHTd = dr_BHTd.sum(0, keepdim=True) if r_bHTd.shape[0] == 1 and B != 1 else dr_BHTd
        return dq_BHTK, dk_BHTK, dr_bHTd, None, None


def _anchor_grad(w_BHTS: torch.Tensor, dh_BHTd: torch.Tensor, narrow: bool) -> torch.Tensor:
    """w^T @ dh, (B, H, S, d); for small d as (dh^T w)^T, the layout CPU GEMM handles well."""
    if narrow:
        return (dh_BHTd.transpose(-1, -2) @ w_BHTS).transpose(-1, -2)
    return w_BHTS.transpose(-1, -2) @ dh_BHTd


def coupling_field(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    r_bHTd: torch.Tensor,
    *,
    causal: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """h_i = sum_j softplus(q_i.k_j / sqrt K) r_j over allowed j (padding keys: pass r_j = 0)."""
    return _CouplingField.apply(q_BHTK, k_BHTK, r_bHTd.contiguous(), causal, block_size)


# ---- fast path: dense readout (p = 1, short sequences) ---------------------------------------


def _batch_heads(x_bHTX: torch.Tensor, B: int) -> torch.Tensor:
    """(1 or B, H, T, X) -> (B*H, T, X), materialising the batch broadcast (small tensors only)."""
    return x_bHTX.expand(B, *x_bHTX.shape[1:]).reshape(-1, *x_bHTX.shape[2:])


def _narrow_first_bmm(a_NTS: torch.Tensor, b_NSd: torch.Tensor) -> torch.Tensor:
    """a @ b for a narrow b (d columns): computed as (b^T a^T)^T, the layout CPU GEMM handles well."""
    if b_NSd.shape[-1] <= NARROW_D:
        return torch.bmm(b_NSd.transpose(1, 2), a_NTS.transpose(1, 2)).transpose(1, 2)
    return torch.bmm(a_NTS, b_NSd)


class _DenseReadout(torch.autograd.Function):
    """o = A v / rowsum(A), A_ij = max(0, 1 + z_i.r_j) on allowed (i, j), z_i = h_i / max(|h_i|, eps):
    the exact p = 1 readout (fixed point included) as one (T, T) tensor with a hand-written
    backward: one saved matrix, no autograd bookkeeping. eps = 0: z is given (no normalisation)."""

    @staticmethod
    def forward(ctx, h_BHTd, r_bHTd, v_BHTK, keep_bT, causal: bool, eps: float):
        B, H, T, K = v_BHTK.shape
        h_NTd, r_NTd, v_NTK = h_BHTd.reshape(B * H, T, -1), _batch_heads(r_bHTd, B), v_BHTK.reshape(B * H, T, K)
        if eps > 0:
            norm_NT1 = h_NTd.square().sum(-1, keepdim=True).sqrt_()
            z_NTd = h_NTd / norm_NT1.clamp_min(eps)
        else:
            norm_NT1, z_NTd = None, h_NTd
        one = torch.ones(1, 1, 1, dtype=z_NTd.dtype, device=z_NTd.device)
        a_NTT = torch.baddbmm(one, z_NTd, r_NTd.transpose(1, 2)).clamp_min_(0.0)
        if causal:
            a_NTT.tril_()
        if keep_bT is not None:
            a_NTT.mul_(keep_bT[:, None, None, :].expand(B, H, 1, T).reshape(B * H, 1, T))
        den_NT1 = a_NTT.sum(-1, keepdim=True).clamp_min_(1e-8)
        out_NTK = torch.bmm(a_NTT, v_NTK).div_(den_NT1)
        ctx.save_for_backward(a_NTT, z_NTd, r_NTd, v_NTK, den_NT1, out_NTK, norm_NT1)
        ctx.shape, ctx.r_batch, ctx.eps = (B, H, T, K), r_bHTd.shape[0], eps
        return out_NTK.view(B, H, T, K)

    @staticmethod
    def backward(ctx, dout_BHTK):
        a_NTT, z_NTd, r_NTd, v_NTK, den_NT1, out_NTK, norm_NT1 = ctx.saved_tensors
        B, H, T, K = ctx.shape
        g_NTK = dout_BHTK.reshape(B * H, T, K) / den_NT1
        c_NT1 = (g_NTK * out_NTK).sum(-1, keepdim=True)
        # d/dA_ij of (A v)_i / rowsum_i = g_i.v_j - g_i.o_i; zero where A_ij = 0 (masked or clamped)
        da_NTT = torch.baddbmm(c_NT1.neg_(), g_NTK, v_NTK.transpose(1, 2)).mul_(a_NTT.sign())  # A >= 0
        dv_NTK = torch.bmm(a_NTT.transpose(1, 2), g_NTK)
        dz_NTd = _narrow_first_bmm(da_NTT, r_NTd)
        dr_NTd = _narrow_first_bmm(da_NTT.transpose(1, 2), z_NTd)
        if ctx.eps > 0:  # through z = h / max(|h|, eps): the tangent part of dz over |h|
            radial_NT1 = (z_NTd * dz_NTd).sum(-1, keepdim=True) * (norm_NT1 > ctx.eps)
            dz_NTd = (dz_NTd - z_NTd * radial_NT1) / norm_NT1.clamp_min(ctx.eps)
        dr_bHTd = dr_NTd.view(B, H, T, -1)
        if ctx.r_batch == 1 and B != 1:
            dr_bHTd = dr_bHTd.sum(0, keepdim=True)
        return dz_NTd.view(B, H, T, -1), dr_bHTd, dv_NTK.view(B, H, T, K), None, None, None


# ---- fast path: the whole variant over (T, T) tensors (p = 1, short sequences) ------------------


def _bmm_heads(x_HBij, y_HBjk, out_HBik, add_HBik=None, *, alpha: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """out[h] = beta add[h] + alpha x[h] y[h], head by head. An operand may be a (B, H, ...) tensor
    seen heads first (`transpose(0, 1)`): its [h] is a strided (B, ., .) view that the batched GEMM
    reads in place, so q, k and v are never copied into (H, B) order (that copy was 5% of the op)."""
    for h in range(out_HBik.shape[0]):
        if add_HBik is None:
            torch.bmm(x_HBij[h], y_HBjk[h], out=out_HBik[h])
        else:
            torch.baddbmm(add_HBik[h], x_HBij[h], y_HBjk[h], alpha=alpha, beta=beta, out=out_HBik[h])
    return out_HBik


class _DenseOscillator(torch.autograd.Function):
    """The analytic p = 1 variant in one autograd Function, over (T, T) tensors:

        w = softplus(q k^T / sqrt K) on allowed keys,  h = w r,  z = h / max(|h|, eps),
        A = max(0, 1 + z r^T) on readout keys,  out = A v / rowsum(A).

    Layout (H, B, T, .): the anchors are shared by the batch, so the six products with them
    (h = w r, z r^T and their gradients) are one GEMM per head with M = B * T rows instead of B * H
    small ones (at d_osc 32 and the WikiText-2 preset shape, fwd+bwd 1.7x -> 1.5x fused softmax on
    CPU). The products with q, k and v run head by head on strided views (`_bmm_heads`), so the
    inputs are not copied. For d_osc <= NARROW_D the small products are cheap and the two-Function
    path is faster. Passes over (T, T) tensors are memory-bound and fused where torch allows: the score GEMM writes
    scale q k^T on top of the mask bias (-inf above the diagonal and at padding keys: w = 0 and
    softplus' = 0 there, the same as zeroing their anchors), the readout mask M (causal, and
    `keep_bT`, float 0/1) is one pass A <- M + M A, the readout gradient's GEMM starts from -c, and
    the score scale rides on r in backward. Forward keeps w, sigmoid(scores) (the softplus slope)
    and A, so backward has no transcendental."""

    @staticmethod
    def forward(ctx, q_BHTK, k_BHTK, v_BHTK, r_HTd, bias_bTT, keep_bT, causal: bool, eps: float):
        B, H, T, K = q_BHTK.shape
        N = H * B
        scale = 1.0 / math.sqrt(K)
        q_HBTK, v_HBTK = q_BHTK.transpose(0, 1), v_BHTK.transpose(0, 1)  # views, not copies
        kt_HBKT = k_BHTK.transpose(0, 1).transpose(2, 3)
        scores_HBTT = q_BHTK.new_empty(H, B, T, T)
        if bias_bTT is None:
            _bmm_heads(q_HBTK, kt_HBKT, scores_HBTT).mul_(scale)
        else:  # the GEMM writes bias + scale q k^T: -inf above the diagonal and at padding keys
            _bmm_heads(q_HBTK, kt_HBKT, scores_HBTT, bias_bTT.expand(H, *bias_bTT.shape), alpha=scale)
        scores_NTT = scores_HBTT.view(N, T, T)
        w_NTT = F.softplus(scores_NTT)
        slope_NTT = torch.sigmoid_(scores_NTT)
        h_HMd = torch.bmm(w_NTT.view(H, B * T, T), r_HTd)
        norm_HM1 = torch.linalg.vector_norm(h_HMd, dim=-1, keepdim=True)
        z_HMd = h_HMd.div_(norm_HM1.clamp_min(eps))
        # |z| <= 1, so 1 + z.r > 0 wherever |r| < 1: then only the masks zero A (rounding: see _clamp_correction)
        clamp_inactive = (r_HTd * r_HTd).sum(-1).max().item() <= 1.0 + 16 * torch.finfo(r_HTd.dtype).eps
        a_NTT = torch.bmm(z_HMd, r_HTd.transpose(1, 2)).view(N, T, T)
        mask = _readout_mask(T, causal, keep_bT, a_NTT)
        if mask is None:
            a_NTT.add_(1.0)
        else:  # M (1 + z.r) in one pass, as M + A M
            a_HBTT = a_NTT.view(H, B, T, T)
            torch.addcmul(mask, a_HBTT, mask, out=a_HBTT)
        if not clamp_inactive:
            a_NTT.clamp_min_(0.0)
        den_NT1 = a_NTT.sum(-1, keepdim=True).clamp_min_(1e-8)
        out_HBTK = _bmm_heads(a_NTT.view(H, B, T, T), v_HBTK, q_BHTK.new_empty(H, B, T, K))
        out_NTK = out_HBTK.view(N, T, K).div_(den_NT1)
        ctx.save_for_backward(q_BHTK, k_BHTK, v_BHTK, r_HTd, w_NTT, slope_NTT, a_NTT, z_HMd, norm_HM1, den_NT1, out_NTK)
        ctx.eps, ctx.scale, ctx.shape, ctx.causal = eps, scale, (B, H, T, K), causal
        ctx.only_causal_zeros = clamp_inactive and keep_bT is None
        return out_NTK.view(H, B, T, K).transpose(0, 1)

    @staticmethod
    def backward(ctx, dout_BHTK):
        q_BHTK, k_BHTK, v_BHTK, r_HTd, w_NTT, slope_NTT, a_NTT, z_HMd, norm_HM1, den_NT1, out_NTK = ctx.saved_tensors
        B, H, T, K = ctx.shape
        N = H * B
        eps = ctx.eps
        # readout: d/dA_ij of (A v)_i / rowsum_i = g_i.v_j - g_i.o_i, zero where A_ij = 0 (masked or clamped)
        g_NTK = torch.div(dout_BHTK.transpose(0, 1), den_NT1.view(H, B, T, 1), out=torch.empty_like(out_NTK).view(H, B, T, K)
                          ).view(N, T, K)
        c_NT1 = (g_NTK * out_NTK).sum(-1, keepdim=True)
        a_HBTT, g_HBTK, c_HBT1 = a_NTT.view(H, B, T, T), g_NTK.view(H, B, T, K), c_NT1.view(H, B, T, 1)
        dv_HBTK = _bmm_heads(a_HBTT.transpose(2, 3), g_HBTK, torch.empty_like(g_HBTK))
        vt_HBKT = v_BHTK.transpose(0, 1).transpose(2, 3)
        da_NTT = _bmm_heads(g_HBTK, vt_HBKT, torch.empty_like(a_HBTT), c_HBT1.expand(H, B, T, T), beta=-1.0).view(N, T, T)
        if ctx.only_causal_zeros:  # A > 0 exactly on the allowed pairs
            if ctx.causal:
                da_NTT.tril_()
        else:
            da_NTT.mul_(a_NTT.sign())  # A >= 0: zero where masked or clamped
        da_HMS = da_NTT.view(H, B * T, T)
        dz_HMd = torch.bmm(da_HMS, r_HTd)
        dr_HTd = torch.bmm(da_HMS.transpose(1, 2), z_HMd)  # summed over the batch
        # through z = h / max(|h|, eps): the tangent part of dz over |h|
        radial_HM1 = (z_HMd * dz_HMd).sum(-1, keepdim=True).mul_(norm_HM1 > eps)
        dh_HMd = dz_HMd.addcmul_(z_HMd, radial_HM1, value=-1.0).div_(norm_HM1.clamp_min(eps))
        # coupling: dL/dscores = (dh r^T) * softplus' (0 at masked keys); the score scale rides on r
        ds_NTT = torch.bmm(dh_HMd, r_HTd.transpose(1, 2) * ctx.scale).view(N, T, T).mul_(slope_NTT)
        ds_HBTT = ds_NTT.view(H, B, T, T)
        dq_HBTK = _bmm_heads(ds_HBTT, k_BHTK.transpose(0, 1), torch.empty_like(g_HBTK))
        dk_HBTK = _bmm_heads(ds_HBTT.transpose(2, 3), q_BHTK.transpose(0, 1), torch.empty_like(g_HBTK))
        dr_HTd.baddbmm_(w_NTT.view(H, B * T, T).transpose(1, 2), dh_HMd)
        dq, dk, dv = (x.transpose(0, 1) for x in (dq_HBTK, dk_HBTK, dv_HBTK))
        return dq, dk, dv, dr_HTd, None, None, None, None


def _readout_mask(T: int, causal: bool, keep_bT: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """1 where query i reads key j, else 0, broadcastable to (H, B, T, T): (T, T), (B, T, T) or (B, 1, T);
    None: every key."""
    mask = torch.ones(T, T, dtype=like.dtype, device=like.device).tril_() if causal else None
    if keep_bT is not None:
        keep_B1T = keep_bT[:, None, :]
        mask = keep_B1T if mask is None else mask * keep_B1T
    return mask


def _score_bias(T: int, causal: bool, key_padding_BT: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """(1 or B, T, T): -inf where query i may not use key j (above the diagonal, padding keys), else 0."""
    bias = _minus_inf_above_diagonal(T, like)[None] if causal else None
    if key_padding_BT is not None:
        pad_B1T = torch.zeros(key_padding_BT.shape, dtype=like.dtype, device=like.device).masked_fill_(
            key_padding_BT, -math.inf)[:, None, :]
        bias = pad_B1T.expand(-1, T, -1) if bias is None else bias + pad_B1T
    return bias


# ---- fast path: linear readout (p = 1) -------------------------------------------------------


def _chunk(x: torch.Tensor, C: int) -> torch.Tensor:
    """(..., T, X) -> (..., N, C, X), zero-padding T up to N * C."""
    T = x.shape[-2]
    N = -(-T // C)
    if N * C != T:
        x = F.pad(x, (0, 0, 0, N * C - T))
    return x.unflatten(-2, (N, C))


def readout_linear(
    z_BHTd: torch.Tensor,
    r_bHTd: torch.Tensor,
    v_BHTK: torch.Tensor,
    keep_bT: torch.Tensor | None,
    *,
    causal: bool,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """o_i = sum_j max(0, 1 + z_i.r_j) v_j / sum_j max(0, 1 + z_i.r_j) over allowed j, in linear time.

    Split s_ij = 1 + z_i.r_j: the "1" part is a prefix sum of the values (and of the key count);
    the z part, z_i . sum_j r_j v_j^T, is causal linear attention with feature dimension d, in
    chunks of C keys: quadratic within a chunk, prefix sums of the (d, K) chunk states between
    chunks. Where an anchor has norm > 1 the clamp can bite; `_clamp_correction` adds it back.
    `keep_bT` (float 0/1, batch 1 or B) drops padding keys; r must already be zero there."""
    B, H, T, K = v_BHTK.shape
    if keep_bT is not None:
        keep_b1T1 = keep_bT[:, None, :, None]
        v_BHTK = v_BHTK * keep_b1T1
        count_bHT1 = keep_b1T1.expand(-1, H, -1, -1)
    else:
        count_bHT1 = torch.ones_like(r_bHTd[..., :1])
    if not causal:
        num_BHTK = v_BHTK.sum(2, keepdim=True) + z_BHTd @ (r_bHTd.transpose(-1, -2) @ v_BHTK)
        den_BHT1 = count_bHT1.sum(2, keepdim=True) + z_BHTd @ r_bHTd.sum(2).unsqueeze(-1)
    else:
        den_BHT1 = count_bHT1.cumsum(2) + (z_BHTd * r_bHTd.cumsum(2)).sum(-1, keepdim=True)
        num_BHTK = v_BHTK.cumsum(2) + _causal_linear(z_BHTd, r_bHTd, v_BHTK, chunk_size)
    num_den_BHTV = _clamp_correction(z_BHTd, r_bHTd, v_BHTK, keep_bT, causal=causal)
    if num_den_BHTV is not None:
        num_BHTK = num_BHTK + num_den_BHTV[..., :K]
        den_BHT1 = den_BHT1 + num_den_BHTV[..., K:]
    return num_BHTK / den_BHT1.clamp_min(1e-8)


def _causal_linear(z_BHTd, r_bHTd, v_BHTK, chunk_size: int | None) -> torch.Tensor:
    """sum_{j <= i} (z_i . r_j) v_j."""
    T = v_BHTK.shape[2]
    if chunk_size is None:
        chunk_size = LINEAR_CHUNK
    if chunk_size == 0:  # prefix sums of the (d, K) outer products (chunk_size=0)
        outer_BHTdK = r_bHTd[..., :, None] * v_BHTK[..., None, :]
        return (z_BHTd[..., None] * outer_BHTdK.cumsum(2)).sum(-2)
    C = min(chunk_size, T)
    z_BHNCd, r_bHNCd, v_BHNCK = _chunk(z_BHTd, C), _chunk(r_bHTd, C), _chunk(v_BHTK, C)
    causal_CC = torch.ones(C, C, dtype=z_BHTd.dtype, device=z_BHTd.device).tril()
    out_BHNCK = ((z_BHNCd @ r_bHNCd.transpose(-1, -2)) * causal_CC) @ v_BHNCK
    if z_BHNCd.shape[2] > 1:  # earlier chunks: exclusive prefix sum of the chunk states sum_j r_j v_j^T
        state_BHNdK = r_bHNCd.transpose(-1, -2) @ v_BHNCK
        out_BHNCK = out_BHNCK + z_BHNCd @ (state_BHNdK.cumsum(2) - state_BHNdK)
    return out_BHNCK.flatten(2, 3)[:, :, :T]


def _clamp_correction(z_BHTd, r_bHTd, v_BHTK, keep_bT, *, causal: bool) -> torch.Tensor | None:
    """max(0, 1 + m) - (1 + m) = max(0, -1 - m) for m = z.r: non-zero only where m < -1, which needs
    |r_j| > 1 (as |z| <= 1). Finds those pairs exactly and returns sum_j excess_ij [v_j, 1] as
    (B, H, T, K + 1), or None where the clamp is inactive everywhere (then nothing quadratic runs
    beyond the no-grad check of the anchors with norm > 1).

    Active pairs are few (for d = 2 and anchors a little past norm 1, about 1 in 100; rarer as d
    grows), so they are gathered and scattered one by one; past an average of 32 per query the
    correction is computed densely over the anchors involved instead.
    Anchors within 8 float eps of norm 1 (unit anchors after rounding) are not checked: their
    excess is at most that, below the rounding of the sums it would enter."""
    B, H, T, K = v_BHTK.shape
    with torch.no_grad():
        limit = 1.0 + 16 * torch.finfo(r_bHTd.dtype).eps  # on |r|^2
        big_S = (r_bHTd.detach().square().sum(-1) > limit).flatten(0, 1).any(0)
        if not bool(big_S.any()):
            return None
        cols_U = big_S.nonzero().squeeze(1)
        active_BHTU = (z_BHTd.detach() @ r_bHTd.detach()[:, :, cols_U].transpose(-1, -2)) < -1.0
        if causal:
            active_BHTU &= cols_U[None, :] <= torch.arange(T, device=z_BHTd.device)[:, None]
        if keep_bT is not None:
            active_BHTU &= keep_bT[:, None, None, cols_U] > 0
        pairs = active_BHTU.nonzero()  # (n, 4): b, h, i, u
        if len(pairs) == 0:
            return None
    if len(pairs) <= SPARSE_CORRECTION_PER_QUERY * B * H * T:
        b, h, i, j = pairs[:, 0], pairs[:, 1], pairs[:, 2], cols_U[pairs[:, 3]]
        r_nd = r_bHTd[b if r_bHTd.shape[0] > 1 else torch.zeros_like(b), h, j]
        excess_n = (-1.0 - (z_BHTd[b, h, i] * r_nd).sum(-1)).clamp_min(0.0)
        vals_nV = torch.cat([v_BHTK[b, h, j], torch.ones_like(excess_n)[:, None]], dim=-1)
        rows_n = (b * H + h) * T + i
        out = torch.zeros(B * H * T, K + 1, dtype=v_BHTK.dtype, device=v_BHTK.device)
        return out.index_add(0, rows_n, excess_n[:, None] * vals_nV).view(B, H, T, K + 1)
    with torch.no_grad():
        used_U = active_BHTU.flatten(0, 2).any(0)
        cols_U, active_BHTU = cols_U[used_U], active_BHTU[..., used_U]
    r_bHUd = r_bHTd[:, :, cols_U]
    excess_BHTU = (-1.0 - z_BHTd @ r_bHUd.transpose(-1, -2)).clamp_min(0.0) * active_BHTU
    v_BHUK = v_BHTK[:, :, cols_U]
    vals_BHUV = torch.cat([v_BHUK, torch.ones_like(v_BHUK[..., :1]) if keep_bT is None
                           else keep_bT[:, None, cols_U, None].expand(*v_BHUK.shape[:-1], 1)], dim=-1)
    return excess_BHTU @ vals_BHUV


# ---- the variant ------------------------------------------------------------------------------

PATHS = ("fused", "dense", "linear", "reference")


def choose_path(T: int, d_osc: int, *, causal: bool, mode: str = "analytic", p: float = 1.0,
                return_weights: bool = False, readout: str = "auto", block_size: int | None = None,
                kernel: bool = False) -> str:
    """Which implementation computes the variant, the one place that decides (the forward pass and
    the FLOP count both ask here):

    - `reference`: coupling kernel, then the dense formula's readout (p != 1, or weights requested);
    - `linear`: coupling kernel, then the chunked linear-time readout (p = 1, T > 128 by default);
    - `fused`: the whole analytic variant as one (T, T) autograd Function when the coupling is one
      block (T <= 128 by default): the compiled kernel at any d_osc where `kernel` (it runs for these
      tensors: `kernel_runs`), else `_DenseOscillator` for d_osc > 8;
    - `dense`: coupling kernel, then the (T, T) readout Function (`_DenseReadout`).
    `readout` (auto | dense | linear) forces the readout form; auto takes the linear one only past
    T = 128 in the analytic mode (its clamp check assumes |z| <= 1, exact only for the closed form).

    Measured on CPU, one thread, fwd+bwd (tools/oscillator_paths.py): the kernel takes 0.35-0.66x the
    dense path's time at d_osc 2-8 for every T from 2 to 128 and batch 4 to 64, so with the kernel
    small d_osc goes fused too; without it `_DenseOscillator` only wins past d_osc 8."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {list(MODES)}")
    if readout not in READOUTS:
        raise ValueError(f"readout={readout!r}; allowed: {list(READOUTS)}")
    if readout == "auto":
        readout = "dense" if T <= DENSE_READOUT_MAX_T or mode != "analytic" else "linear"
    if return_weights or p != 1:
        return "reference"
    if readout == "linear":
        return "linear"
    if mode == "analytic" and (kernel or d_osc > NARROW_D) and len(_coupling_blocks(T, causal, block_size)) == 1:
        return "fused"
    return "dense"


def kernel_runs(*tensors: torch.Tensor) -> bool:
    """Whether the fused path runs on the compiled kernel (workers/attention/native.py) for these
    inputs: CPU float32/64 tensors of one dtype, where the kernel builds (and outside
    `native.pytorch_only()`); else it runs on `_DenseOscillator`."""
    dtype = tensors[0].dtype
    return (dtype in (torch.float32, torch.float64) and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and native.load() is not None)


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
    mode: str = "analytic",
    init: str = "random",
    t_max: float = 30.0,
    dt: float = 0.05,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    jitter: float = 0.05,
    converge_tol: float = 0.01,
    antipodal_angle: float = 0.1,
    stats: dict | None = None,
    generator: torch.Generator | None = None,
    block_size: int | None = None,
    chunk_size: int | None = None,
    readout: str = "auto",
    path: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (output_BHTK, attention_BHTT or None). `key_padding_BT` is True at padding keys.

    `path` (default: `choose_path`) is the implementation that runs; with a `stats` dict it is
    recorded there as stats["path"].

    mode: `analytic` uses the closed-form fixed point; `euler` / `rk45` integrate the dynamics to
    `t_max` from `init` starts (random | sequential) and use z(t_max); then the gradient is the
    fixed point's (implicit-function) gradient, exact where the oscillator converged. In ODE modes
    the convergence statistics are written into `stats` when a dict is given."""
    T = q_BHTK.shape[-2]
    if path is None:
        path = choose_path(T, anchors_HLd.shape[-1], causal=causal, mode=mode, p=p, return_weights=return_weights,
                           readout=readout, block_size=block_size, kernel=kernel_runs(q_BHTK, k_BHTK, v_BHTK, anchors_HLd))
    if path not in PATHS:
        raise ValueError(f"path={path!r}; allowed: {list(PATHS)}")
    if stats is not None:
        stats["path"] = path
    r_1HTd = anchors_HLd[None, :, :T]
    keep_BT = None if key_padding_BT is None else (~key_padding_BT).to(q_BHTK.dtype)
    keep_read = keep_BT if readout_padding_mask else None  # False: the reference code's readout
    if path == "fused":
        if kernel_runs(q_BHTK, k_BHTK, v_BHTK, anchors_HLd):
            return native.NativeOscillator.apply(q_BHTK, k_BHTK, v_BHTK, r_1HTd[0], keep_BT, keep_read, causal, eps), None
        bias_bTT = _score_bias(T, causal, key_padding_BT, q_BHTK)
        return _DenseOscillator.apply(q_BHTK, k_BHTK, v_BHTK, r_1HTd[0], bias_bTT, keep_read, causal, eps), None
    r_coupling = r_1HTd if keep_BT is None else r_1HTd * keep_BT[:, None, :, None]  # padding keys: r = 0
    r_read = r_coupling if readout_padding_mask else r_1HTd
    h_BHTd = coupling_field(q_BHTK, k_BHTK, r_coupling, causal=causal, block_size=block_size)
    if path == "dense" and mode == "analytic":
        return _DenseReadout.apply(h_BHTd, r_read, v_BHTK, keep_read, causal, eps), None  # normalises h itself
    z_BHTd = h_BHTd / h_BHTd.square().sum(-1, keepdim=True).clamp_min(eps * eps).sqrt()  # no NaN grad at h = 0
    if mode != "analytic":
        valid_1BT = None if key_padding_BT is None else ~key_padding_BT[:, None, :]
        z_ode, ode_stats = integrate_fixed_points(
            h_BHTd, z_BHTd, mode=mode, init=init, t_max=t_max, dt=dt, rtol=rtol, atol=atol, jitter=jitter,
            tol=converge_tol, antipodal_angle=antipodal_angle, valid_NT=valid_1BT, generator=generator,
        )
        if stats is not None:
            stats.update(ode_stats)
        z_BHTd = z_ode + (z_BHTd - z_BHTd.detach())  # value z(t_max), gradient of the fixed point
    if path == "reference":
        out, a_BHTT = readout_dense(z_BHTd, anchors_HLd, v_BHTK, causal=causal, key_padding_BT=key_padding_BT, p=p,
                                    readout_padding_mask=readout_padding_mask)
        return out, (a_BHTT if return_weights else None)
    if path == "dense":
        return _DenseReadout.apply(z_BHTd, r_read, v_BHTK, keep_read, causal, 0.0), None
    return readout_linear(z_BHTd, r_read, v_BHTK, keep_read, causal=causal, chunk_size=chunk_size), None


class OscillatorAttention(SoftmaxAttention):
    """The softmax projections plus learned anchors r of shape (H, max_seq_len, d_osc)."""

    def __init__(self, cfg: OscillatorConfig, *, d_model: int, n_heads: int, max_seq_len: int, causal: bool,
                 rotary: bool = False) -> None:
        super().__init__(d_model=d_model, n_heads=n_heads, max_seq_len=max_seq_len, causal=causal, rotary=rotary)
        self.d_osc, self.p = int(cfg.d_osc), float(cfg.p)
        self.anchor_norm, self.readout_padding_mask = cfg.anchor_norm, bool(cfg.readout_padding_mask)
        self.ode = {"mode": cfg.mode, "init": cfg.init, "t_max": float(cfg.t_max), "dt": float(cfg.dt),
                    "rtol": float(cfg.rtol), "atol": float(cfg.atol), "jitter": float(cfg.jitter)}
        self.last_stats: dict[str, Any] | None = None  # ODE modes: convergence statistics of the last forward
        self.last_path: str | None = None  # the implementation the last forward took (`choose_path`)
        anchors = torch.randn(n_heads, max_seq_len, self.d_osc)
        self.anchors_HLd = nn.Parameter(anchors / anchors.norm(dim=-1, keepdim=True))

    def anchors(self) -> torch.Tensor:
        if self.anchor_norm == "always":
            return self.anchors_HLd / self.anchors_HLd.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return self.anchors_HLd

    def forward(
        self, x_BTD: torch.Tensor, key_padding_BT: torch.Tensor | None = None, return_weights: bool = False
    ):
        q, k, v = self.project(x_BTD)
        anchors = self.anchors()
        stats: dict[str, Any] | None = {} if self.ode["mode"] != "analytic" else None
        self.last_path = self.path(x_BTD.shape[1], return_weights, kernel=kernel_runs(q, k, v, anchors))
        o_BHTK, a_BHTT = oscillator_attention(
            q, k, v, anchors, causal=self.causal, key_padding_BT=key_padding_BT, p=self.p,
            readout_padding_mask=self.readout_padding_mask, return_weights=return_weights, stats=stats, **self.ode,
            path=self.last_path,
        )
        self.last_stats = stats
        out = self.w_o(self.merge_heads(o_BHTK))
        return (out, a_BHTT) if return_weights else out

    def path(self, seq_len: int, return_weights: bool = False, kernel: bool | None = None) -> str:
        """The implementation a forward pass at this length takes (`choose_path`). `kernel`: whether the
        compiled kernel runs for the inputs (`kernel_runs`); None: for inputs on the module's own device
        and dtype (its anchors')."""
        if kernel is None:
            kernel = kernel_runs(self.anchors_HLd)
        return choose_path(seq_len, self.d_osc, causal=self.causal, mode=self.ode["mode"], p=self.p,
                           return_weights=return_weights, kernel=kernel)

    def attention_flops_per_token(self, seq_len: int, d_model: int) -> float:
        """Forward matmul FLOPs of the mixing per token, for the path `oscillator_attention` takes,
        counting the full context even when causal (as `SoftmaxAttention`).

        Coupling: q.k over K and w.r over d: 2 T (D + H d). Readout: dense (T <= 128, p != 1, or an
        ODE mode): z.r and a.v, 2 T (H d + D); linear (p = 1, T > 128): causal, chunks of C = 32 keys
        over d and K plus building and reading the (d, K) chunk states, 2 C H (d + K) + 4 H d K;
        bidirectional, one (d, K) state, 4 H d K + 2 H d. The clamp correction (only where anchors
        outgrew norm 1) depends on the data and is not counted."""
        T, H, d = seq_len, self.n_heads, self.d_osc
        K = d_model // H
        coupling = 2 * T * (d_model + H * d)
        # fused (kernel or not), dense and reference readouts alike: (T, T) products; kernel=False
        # gives the same answer here without building the kernel
        if self.path(T, kernel=False) != "linear":
            readout = 2 * T * (H * d + d_model)
        elif self.causal:
            readout = 2 * min(T, LINEAR_CHUNK) * H * (d + K) + 4 * H * d * K
        else:
            readout = 4 * H * d * K + 2 * H * d
        return coupling + readout


def bench_op(case, B: int, T: int, D: int, H: int, device, leaf):
    """The benchmark's case (workers/bench.py): fwd + bwd of the mixing from q, k, v and the anchors;
    `case.naive` times the dense reference formula instead of the fast path."""
    K = D // H
    q, k, v = leaf(B, H, T, K), leaf(B, H, T, K), leaf(B, H, T, K)
    anchors = F.normalize(leaf(H, T, case.options["d_osc"]).detach(), dim=-1).requires_grad_()
    attend = oscillator_attention_reference if case.naive else oscillator_attention
    return (q, k, v, anchors), lambda: attend(q, k, v, anchors, causal=True)[0]
