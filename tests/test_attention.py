"""Attention variants: causality through gradients, padding invariance, the fast oscillator path
against a naive loop and the dense formula, the ODE modes, the Kuramoto reconstruction against an
explicit loop, determinism, and learning a tiny task. Every test runs in seconds on a CPU.

Legend: B batch, T sequence, D model width, H heads, K head width, d oscillator dimension.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from workers.attention import (
    VARIANTS,
    build_attention,
    oscillator_attention,
    oscillator_attention_reference,
)
from workers.attention.dynamics import antipodal_probability, integrate_euler, integrate_rk45
from workers.attention.softmax import apply_rotary, rotary_tables

B, T, D, H = 2, 7, 16, 2


def make(name: str, causal: bool = True, rotary: bool = False, **options):
    torch.manual_seed(0)
    if name == "oscillator":
        options.setdefault("d_osc", 4)
    return build_attention(name, d_model=D, n_heads=H, max_seq_len=T, causal=causal, rotary=rotary, **options).double()


def test_registry_holds_the_built_in_variants_with_their_option_defaults():
    assert {"softmax", "oscillator", "kuramoto"} <= set(VARIANTS)
    assert VARIANTS["oscillator"].defaults()["mode"] == "analytic" and VARIANTS["oscillator"].defaults()["p"] == 1.0
    assert VARIANTS["kuramoto"].defaults()["gate"] == "softplus"
    assert [n for n, v in VARIANTS.items() if v.uses_d_osc] == ["oscillator"]
    for name, variant in VARIANTS.items():  # every default builds
        build_attention(name, d_model=D, n_heads=H, max_seq_len=T, causal=True, **variant.defaults())


# Causality through gradients, padding invariance, determinism and learning a tiny task are the
# variant contract: tests/test_contracts.py runs them on every registered variant.


# ---- oscillator: the fast path against a naive loop and the dense formula ---------------------


def naive_oscillator(q, k, v, anchors, p=1.0, pad=None, causal=True, readout_pad=True):
    """Per-position loop straight from VARIANTS.md section 2."""
    Bq, Hq, Tq, K = q.shape
    out = torch.zeros_like(v)
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Tq):
                span = range(i + 1) if causal else range(Tq)
                keys = [j for j in span if pad is None or not pad[b, j]]
                readout_keys = keys if readout_pad else list(span)
                hvec = torch.zeros(anchors.shape[-1], dtype=q.dtype)
                for j in keys:
                    w = math.log1p(math.exp(float(q[b, h, i] @ k[b, h, j]) / math.sqrt(K)))
                    hvec += w * anchors[h, j]
                z = hvec / max(float(hvec.norm()), 1e-8)
                s = torch.zeros(Tq, dtype=q.dtype)
                for j in readout_keys:
                    s[j] = max(0.0, 1.0 + float(z @ anchors[h, j])) ** p
                a = s / max(float(s.sum()), 1e-8)
                out[b, h, i] = a @ v[b, h]
    return out


def qkv_anchors(d_osc, T_=T, anchor_scale=0.7, seed=3, Bq=B):
    torch.manual_seed(seed)
    q, k, v = (torch.randn(Bq, H, T_, 4, dtype=torch.float64) for _ in range(3))
    anchors = F.normalize(torch.randn(H, T_ + 3, d_osc, dtype=torch.float64), dim=-1)
    anchors = anchors * anchor_scale * (0.5 + torch.rand(H, T_ + 3, 1, dtype=torch.float64))
    return q, k, v, anchors


@pytest.fixture(params=["default", "pytorch"])
def kernels(request):
    """Each test twice: as it runs by default (the short-sequence analytic variant on the compiled
    kernel where it builds) and with the pure-PyTorch paths (`native.pytorch_only()`: the
    two-Function dense path at d_osc <= 8, `_DenseOscillator` above)."""
    from workers.attention import native

    if request.param == "default":
        yield request.param
    else:
        with native.pytorch_only():
            yield request.param


@pytest.mark.parametrize("readout", ["auto", "dense", "linear"])
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("d_osc", [2, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_oscillator_matches_naive_loop(readout, p, d_osc, causal, kernels):
    # anchors up to norm 1.6: the readout clamp at 0 is active for some pairs
    q, k, v, anchors = qkv_anchors(d_osc, anchor_scale=1.1)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True
    fast, _ = oscillator_attention(q, k, v, anchors, causal=causal, key_padding_BT=pad, p=p, readout=readout)
    slow = naive_oscillator(q, k, v, anchors, p=p, pad=pad, causal=causal)
    valid = (~pad)[:, None].expand(-1, H, -1)  # padded query rows are never read
    torch.testing.assert_close(fast[valid], slow[valid], atol=1e-5, rtol=0)


def test_reference_readout_flag_keeps_padding_keys_in_the_readout():
    q, k, v, anchors = qkv_anchors(3)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, 2] = True
    for readout in ("dense", "linear"):
        fast, _ = oscillator_attention(q, k, v, anchors, causal=True, key_padding_BT=pad, readout_padding_mask=False,
                                       readout=readout)
        slow = naive_oscillator(q, k, v, anchors, pad=pad, readout_pad=False)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=0)
    masked, _ = oscillator_attention(q, k, v, anchors, causal=True, key_padding_BT=pad)
    assert not torch.allclose(masked[0, :, 3:], fast[0, :, 3:])  # the flag changes the result


def clamp_is_active(q, k, v, anchors, causal=True):
    _, weights = oscillator_attention_reference(q, k, v, anchors, causal=causal, return_weights=True)
    Tq = q.shape[-2]
    h = torch.einsum("bhij,hjd->bhid", F.softplus(q @ k.transpose(-1, -2) / 2).tril(), anchors[:, :Tq])
    z = F.normalize(h, dim=-1)
    raw = 1 + z @ anchors[:, :Tq].transpose(-1, -2)
    return bool((raw.tril() < 0).any())


@pytest.mark.parametrize("anchor_scale", [1.0, 1.6])
@pytest.mark.parametrize("causal", [True, False])
def test_fast_path_equals_dense_formula_with_gradients_at_long_sequences(anchor_scale, causal):
    """T = 300 runs the blocked coupling and the chunked linear readout (T > 128), including the
    exact correction where anchors outgrew norm 1 and the clamp bites."""
    q, k, v, anchors = qkv_anchors(3, T_=300, anchor_scale=anchor_scale, Bq=1)
    q, k = q * 2, k * 2
    if anchor_scale > 1 and causal:
        assert clamp_is_active(q, k, v, anchors)
    pad = torch.zeros(1, 300, dtype=torch.bool)
    pad[0, 250:] = True
    tensors = [t.requires_grad_() for t in (q, k, v, anchors)]
    fast, _ = oscillator_attention(*tensors, causal=causal, key_padding_BT=pad)
    dense, _ = oscillator_attention_reference(*tensors, causal=causal, key_padding_BT=pad)
    torch.testing.assert_close(fast, dense, atol=1e-12, rtol=0)
    upstream = torch.randn_like(fast)
    for g_fast, g_dense in zip(torch.autograd.grad(fast, tensors, upstream), torch.autograd.grad(dense, tensors, upstream)):
        torch.testing.assert_close(g_fast, g_dense, atol=1e-10, rtol=0)


@pytest.mark.parametrize("readout_padding_mask", [True, False])
@pytest.mark.parametrize("anchor_scale", [0.9, 1.6])
@pytest.mark.parametrize("d_osc", [3, 16])  # the kernel at both; without it: d 3 dense, d 16 _DenseOscillator
@pytest.mark.parametrize("causal", [True, False])
def test_short_sequence_paths_equal_dense_formula_with_gradients(causal, d_osc, anchor_scale, readout_padding_mask,
                                                                 kernels):
    q, k, v, anchors = qkv_anchors(d_osc, T_=40, anchor_scale=anchor_scale, Bq=3)
    q, k = q * 2, k * 2
    if anchor_scale > 1 and causal:
        assert clamp_is_active(q, k, v, anchors)
    pad = torch.zeros(3, 40, dtype=torch.bool)
    pad[1, 30:] = True
    pad[2, :5] = True  # left padding too
    tensors = [t.requires_grad_() for t in (q, k, v, anchors)]
    options = dict(causal=causal, key_padding_BT=pad, readout_padding_mask=readout_padding_mask)
    fast, _ = oscillator_attention(*tensors, **options)
    dense, _ = oscillator_attention_reference(*tensors, **options)
    torch.testing.assert_close(fast, dense, atol=1e-12, rtol=0)
    upstream = torch.randn_like(fast)
    for g_fast, g_dense in zip(torch.autograd.grad(fast, tensors, upstream), torch.autograd.grad(dense, tensors, upstream)):
        torch.testing.assert_close(g_fast, g_dense, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding,readout_padding", [(False, False), (True, True), (True, False)])
@pytest.mark.parametrize("anchor_scale", [1.0, 1.6])
def test_oscillator_compiled_kernel_matches_the_pytorch_path_in_float32(causal, padding, readout_padding, anchor_scale,
                                                                      native_kernel):
    """The compiled kernel (`NativeOscillator`) against `_DenseOscillator` at the preset's head shape
    (T 50, K 32, d 32) and at odd sizes (T 19, K 6, d 12), anchors at and past norm 1 (the clamp),
    value and gradients, on two threads (the kernel splits the heads and sums the anchors' gradient)."""
    import workers.attention.oscillator as osc

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for Bq, Hq, Tq, K, d in ((3, 4, 50, 32, 32), (2, 2, 19, 6, 12)):
            torch.manual_seed(4)
            q, k, v = ((torch.randn(Bq, Hq, Tq, K) * 1.5).requires_grad_() for _ in range(3))
            anchors = (F.normalize(torch.randn(Hq, Tq + 2, d), dim=-1) * anchor_scale).requires_grad_()
            pad = keep = None
            if padding:
                pad = torch.zeros(Bq, Tq, dtype=torch.bool)
                pad[0, -4:] = True
                pad[-1, :3] = True
                keep = (~pad).float()
            keep_read = keep if readout_padding else None
            r = anchors[:, :Tq]
            native = native_kernel.NativeOscillator.apply(q, k, v, r, keep, keep_read, causal, 1e-8)
            torch_path = osc._DenseOscillator.apply(q, k, v, r, osc._score_bias(Tq, causal, pad, q), keep_read, causal, 1e-8)
            torch.testing.assert_close(native, torch_path, atol=2e-6, rtol=1e-5)
            upstream = torch.randn_like(native)
            for got, want in zip(torch.autograd.grad(native, (q, k, v, anchors), upstream),
                                 torch.autograd.grad(torch_path, (q, k, v, anchors), upstream)):
                torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("causal", [True, False])
def test_oscillator_compiled_kernel_passes_gradcheck_in_float64(causal, native_kernel, one_thread):
    q, k, v, anchors = qkv_anchors(5, T_=6, anchor_scale=1.4, Bq=2)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    keep = (~pad).double()
    tensors = [t.requires_grad_() for t in (q, k, v, anchors)]
    assert torch.autograd.gradcheck(
        lambda q_, k_, v_, r_: native_kernel.NativeOscillator.apply(q_, k_, v_, r_[:, :6], keep, keep, causal, 1e-8),
        tensors)


@pytest.mark.parametrize("d_osc,fallback", [(16, "fused"), (4, "dense")])
def test_oscillator_layer_is_the_same_with_and_without_the_compiled_kernel(d_osc, fallback, native_kernel, monkeypatch,
                                                                           one_thread):
    """The module in float32 on the fused path (the kernel, at any d_osc) against the path taken when
    the kernel is unavailable: `_DenseOscillator` at d_osc 16, the two-Function dense path at d_osc 4."""
    torch.manual_seed(0)
    module = build_attention("oscillator", d_model=D, n_heads=H, max_seq_len=T, causal=True, d_osc=d_osc)
    paths = _layer_with_and_without_the_kernel(module, native_kernel, monkeypatch)
    assert paths == ["fused", fallback] and module.path(T) == fallback  # `load` stays off after the call


def _layer_with_and_without_the_kernel(module, native_kernel, monkeypatch) -> list:
    """Run `module` (padded batch) with the kernel, then with `load()` None (no compiler, a failed build
    or SCALING_NATIVE_KERNELS=0); outputs and every parameter's gradient agree at float32 tolerance.
    Returns the paths taken (`last_path`, where the module has one)."""
    x = torch.randn(3, T, D)
    pad = torch.zeros(3, T, dtype=torch.bool)
    pad[1, -2:] = True
    results, paths = [], []
    for available in (True, False):
        if not available:
            monkeypatch.setattr(native_kernel, "load", lambda: None)
        out = module(x, pad)
        results.append((out, torch.autograd.grad(out.square().sum(), list(module.parameters()), allow_unused=True)))
        paths.append(getattr(module, "last_path", None))
    (out_native, grads_native), (out_torch, grads_torch) = results
    torch.testing.assert_close(out_native, out_torch, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_native, grads_torch):  # kuramoto's kappa is unused with the delta read-out
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    return paths


@pytest.mark.parametrize("per_query", [32, 0], ids=["sparse-pairs", "dense-columns"])
def test_clamp_correction_both_ways(per_query, monkeypatch):
    import workers.attention.oscillator as osc

    monkeypatch.setattr(osc, "SPARSE_CORRECTION_PER_QUERY", per_query)
    q, k, v, anchors = qkv_anchors(2, T_=160, anchor_scale=1.6, Bq=2)
    assert clamp_is_active(q[:1], k[:1], v[:1], anchors)
    pad = torch.zeros(2, 160, dtype=torch.bool)
    pad[1, 100:] = True
    tensors = [t.requires_grad_() for t in (q, k, v, anchors)]
    fast, _ = oscillator_attention(*tensors, causal=True, key_padding_BT=pad, readout="linear")
    dense, _ = oscillator_attention_reference(*tensors, causal=True, key_padding_BT=pad)
    torch.testing.assert_close(fast, dense, atol=1e-12, rtol=0)
    upstream = torch.randn_like(fast)
    for g_fast, g_dense in zip(torch.autograd.grad(fast, tensors, upstream), torch.autograd.grad(dense, tensors, upstream)):
        torch.testing.assert_close(g_fast, g_dense, atol=1e-10, rtol=0)


def test_fast_path_float32_stays_close_to_float64():
    q, k, v, anchors = qkv_anchors(8, T_=512, anchor_scale=1.0, Bq=1)
    exact, _ = oscillator_attention_reference(q, k, v, anchors, causal=True)
    fast, _ = oscillator_attention(q.float(), k.float(), v.float(), anchors.float(), causal=True)
    assert (fast.double() - exact).abs().max() < 1e-4


def test_oscillator_rank_bounded_by_d_plus_one():
    torch.manual_seed(0)
    d_osc = 3
    q, k, v = (torch.randn(1, 1, 24, 8, dtype=torch.float64) for _ in range(3))
    anchors = F.normalize(torch.randn(1, 24, d_osc, dtype=torch.float64), dim=-1)
    _, weights = oscillator_attention(q, k, v, anchors, causal=False, return_weights=True)
    # unnormalised readout (1 + z.r) has rank <= d + 1; row normalisation keeps it
    assert torch.linalg.matrix_rank(weights[0, 0]).item() <= d_osc + 1
    assert torch.linalg.matrix_rank(weights[0, 0]).item() == d_osc + 1


@pytest.mark.parametrize("d_osc", [3, 16])
def test_all_padding_row_has_finite_gradients(d_osc, kernels):
    q, k, v, anchors = qkv_anchors(d_osc)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, :3] = True  # left padding: queries 0-2 of batch 1 have no key at all
    tensors = [t.requires_grad_() for t in (q, k, v, anchors)]
    out, _ = oscillator_attention(*tensors, causal=True, key_padding_BT=pad)
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), tensors))


# ---- oscillator: the dynamics -----------------------------------------------------------------


def test_euler_and_rk45_follow_the_exact_trajectory():
    """tan(psi(t)/2) = tan(psi(0)/2) exp(-|h| t) for the angle psi between z and z* = h/|h|."""
    torch.manual_seed(0)
    h = torch.randn(200, 5, dtype=torch.float64) * 0.5
    z0 = F.normalize(torch.randn(200, 5, dtype=torch.float64), dim=-1)
    z_star = F.normalize(h, dim=-1)
    t = 1.5
    psi0 = torch.acos((z0 * z_star).sum(-1).clamp(-1, 1))
    psi_t = 2 * torch.atan(torch.tan(psi0 / 2) * torch.exp(-h.norm(dim=-1) * t))
    z_rk, _ = integrate_rk45(z0, h, t_max=t, rtol=1e-8, atol=1e-8)
    z_eu, _ = integrate_euler(z0, h, t_max=t, dt=1e-3)
    for z, tol in ((z_rk, 1e-6), (z_eu, 2e-3)):
        psi = torch.acos((F.normalize(z, dim=-1) * z_star).sum(-1).clamp(-1, 1))
        assert (psi - psi_t).abs().max() < tol


def ode_run(d_osc, mode, init, scale=1.0, t_max=30.0, seed=0):
    torch.manual_seed(seed)
    Tq = 24
    q, k, v = (torch.randn(4, 4, Tq, 8, dtype=torch.float64) for _ in range(3))
    q = q * scale
    anchors = F.normalize(torch.randn(4, Tq, d_osc, dtype=torch.float64), dim=-1)
    stats: dict = {}
    out, _ = oscillator_attention(q, k, v, anchors, causal=True, mode=mode, init=init, t_max=t_max, stats=stats)
    exact, _ = oscillator_attention(q, k, v, anchors, causal=True)
    return stats, out, exact


@pytest.mark.parametrize("mode", ["euler", "rk45"])
def test_ode_from_sequential_starts_converges_to_the_fixed_point(mode):
    stats, out, exact = ode_run(32, mode, "sequential")
    assert stats["oscillators"] == 4 * 4 * 24 and stats["mode"] == mode and stats["init"] == "sequential"
    assert stats["converged_fraction"] >= 0.99
    torch.testing.assert_close(out, exact, atol=1e-2, rtol=0)


def test_ode_convergence_rate_rises_with_d_osc():
    """Weak couplings (|h| small) from uniform starts: near-antipodal starts do not escape by t_max,
    and they are rarer in higher dimension (Proposition 4)."""
    rates = [ode_run(d, "euler", "random", scale=-4.0, t_max=5.0)[0]["converged_fraction"] for d in (2, 8, 32)]
    assert rates[0] < rates[1] < rates[2] or rates[0] < rates[1] == rates[2] == 1.0
    assert rates[0] < 0.95


def test_ode_stats_report_near_antipodal_starts():
    stats, _, _ = ode_run(2, "rk45", "random", scale=-4.0, t_max=5.0)
    assert 0 < stats["unconverged_near_antipodal"] <= stats["unconverged"]
    expected = stats["near_antipodal_expected_uniform"]
    assert expected == pytest.approx(stats["antipodal_angle"] / math.pi)  # d = 2: alpha / pi
    assert abs(stats["near_antipodal_fraction"] - expected) < 0.05


def test_proposition_4_matches_monte_carlo():
    torch.manual_seed(0)
    for d, alpha in ((3, 0.5), (8, 1.0)):
        z = F.normalize(torch.randn(200_000, d, dtype=torch.float64), dim=-1)
        empirical = float((torch.acos(z[:, 0].clamp(-1, 1)) < alpha).double().mean())
        assert abs(empirical - antipodal_probability(alpha, d)) < 3e-3


def test_ode_module_records_last_stats_and_trains():
    module = make("oscillator", d_osc=8, mode="rk45", init="sequential")
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    module(x).sum().backward()
    assert module.last_stats["mode"] == "rk45" and 0 <= module.last_stats["converged_fraction"] <= 1
    assert module.w_q.weight.grad.abs().sum() > 0  # the fixed point's gradient reaches q and k


# ---- kuramoto: the reconstruction against an explicit loop --------------------------------------


def naive_kuramoto_delta(theta, gate, causal=True, drift=True, base=10000.0, scale=None):
    """delta_t = sum_u A_tu sin(theta_u - theta_t), A = softmax_u of sum_m g_tm cos(theta_tm + w_m t - theta_um - w_m u)."""
    Bq, Hq, Tq, P = theta.shape
    omega = base ** (-torch.arange(P, dtype=theta.dtype) / P) if drift else torch.zeros(P, dtype=theta.dtype)
    scale = 1 / math.sqrt(2 * P) if scale is None else scale
    delta = torch.zeros_like(theta)
    for b in range(Bq):
        for h in range(Hq):
            for t in range(Tq):
                us = range(t + 1) if causal else range(Tq)
                scores = torch.stack([(gate[b, h, t] * torch.cos(theta[b, h, t] + omega * t - theta[b, h, u] - omega * u)).sum()
                                      for u in us]) * scale
                a = torch.softmax(scores, 0)
                delta[b, h, t] = sum(a[i] * torch.sin(theta[b, h, u] - theta[b, h, t]) for i, u in enumerate(us))
    return delta


@pytest.mark.parametrize("drift", ["rope", "none"])
@pytest.mark.parametrize("causal", [True, False])
def test_kuramoto_tangent_update_matches_explicit_loop(drift, causal):
    module = make("kuramoto", causal=causal, phase_drift=drift)
    torch.manual_seed(2)
    theta = torch.randn(B, H, T, D // H, dtype=torch.float64) * 2
    gate = F.softplus(torch.randn(B, H, T, D // H, dtype=torch.float64))
    fast = module.tangent_update(theta, gate, None)
    slow = naive_kuramoto_delta(theta, gate, causal=causal, drift=drift == "rope")
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)  # the rotary tables are float32


@pytest.mark.parametrize("gate_per", ["coordinate", "head", None])
@pytest.mark.parametrize("drift", [True, False])
@pytest.mark.parametrize("causal,padding", [(True, False), (True, True), (False, False), (False, True)])
def test_kuramoto_fused_tangent_matches_the_reference_in_value_and_gradient(gate_per, drift, causal, padding, one_thread):
    """The hand-written backward (`_FusedTangent`) against autograd through the reference (SDPA)
    formula, and against finite differences (gradcheck), with every option that reaches it."""
    from workers.attention.kuramoto import _FusedTangent, _score_bias, kuramoto_tangent, kuramoto_tangent_reference

    torch.manual_seed(3)
    P = D // H
    theta = (torch.randn(B, H, T, P, dtype=torch.float64) * 2).requires_grad_()
    gate = None if gate_per is None else F.softplus(
        torch.randn(B, H, T, P if gate_per == "coordinate" else 1, dtype=torch.float64)).requires_grad_()
    cos, sin = (t.double() for t in rotary_tables(T, 2 * P)) if drift else (None, None)
    pad = None
    if padding:
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[0, -3:] = True
        pad[1, :] = True  # every key padding: each query keeps itself, as softmax_attention
    inputs = (theta,) if gate is None else (theta, gate)
    fast = kuramoto_tangent(theta, gate, cos, sin, causal=causal, key_padding_BT=pad)
    slow = kuramoto_tangent_reference(theta, gate, cos, sin, causal=causal, key_padding_BT=pad)
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)
    upstream = torch.randn_like(fast)
    for got, want in zip(torch.autograd.grad(fast, inputs, upstream), torch.autograd.grad(slow, inputs, upstream)):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    if gate_per == "coordinate" and drift:  # finite differences once per mask (slow on a busy machine)
        bias = _score_bias(T, causal, pad, theta)
        assert torch.autograd.gradcheck(
            lambda th, *g: _FusedTangent.apply(th, g[0] if g else None, cos, sin, bias, 0.3), inputs)


@pytest.fixture
def native_kernel():
    from workers.attention import native

    if native.load() is None:
        pytest.skip("no C++ compiler: the compiled attention kernels are not built (the PyTorch paths run)")
    return native


def _tangent_case(dtype, Bq, Hq, Tq, P, gate_per, drift, padding, seed=5, theta_scale=2.0):
    torch.manual_seed(seed)
    theta = (torch.randn(Bq, Hq, Tq, P, dtype=dtype) * theta_scale).requires_grad_()
    gate = None if gate_per is None else F.softplus(
        torch.randn(Bq, Hq, Tq, P if gate_per == "coordinate" else 1, dtype=dtype)).requires_grad_()
    cos, sin = (t.to(dtype) for t in rotary_tables(Tq, 2 * P)) if drift else (None, None)
    pad = None
    if padding:
        pad = torch.zeros(Bq, Tq, dtype=torch.bool)
        pad[0, -3:] = True
        pad[-1, :] = True
    return theta, gate, cos, sin, pad


@pytest.mark.parametrize("gate_per", ["coordinate", "head", None])
@pytest.mark.parametrize("drift", [True, False])
@pytest.mark.parametrize("causal,padding", [(True, False), (True, True), (False, False), (False, True)])
def test_kuramoto_compiled_kernel_matches_the_pytorch_path_in_float32(gate_per, drift, causal, padding, native_kernel):
    """The compiled kernel (`NativeTangent`) against the pure-PyTorch `_FusedTangent` at the preset's
    head shape (T 50, P 32: the kernel's vector tails and causal blocks) and at odd sizes (T 13, P 3),
    value and gradients, on two threads (the kernel splits the heads between them)."""
    from workers.attention.kuramoto import _FusedTangent, _score_bias

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape in ((3, 4, 50, 32), (2, 3, 13, 3)):
            theta, gate, cos, sin, pad = _tangent_case(torch.float32, *shape, gate_per, drift, padding)
            scale = (2 * shape[-1]) ** -0.5
            inputs = (theta,) if gate is None else (theta, gate)
            bias = _score_bias(shape[2], causal, pad, theta)
            native = native_kernel.NativeTangent.apply(theta, gate, cos, sin, None if pad is None else bias, scale, causal)
            torch_path = _FusedTangent.apply(theta, gate, cos, sin, bias, scale)
            torch.testing.assert_close(native, torch_path, atol=2e-6, rtol=0)
            upstream = torch.randn_like(native)
            for got, want in zip(torch.autograd.grad(native, inputs, upstream),
                                 torch.autograd.grad(torch_path, inputs, upstream)):
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("causal,padding", [(True, False), (True, True), (False, True)])
def test_kuramoto_compiled_kernel_passes_gradcheck_in_float64(causal, padding, native_kernel, one_thread):
    from workers.attention.kuramoto import _score_bias

    theta, gate, cos, sin, pad = _tangent_case(torch.float64, 2, 2, 6, 3, "coordinate", True, padding, seed=7)
    bias = None if pad is None else _score_bias(6, causal, pad, theta)
    assert torch.autograd.gradcheck(
        lambda th, g: native_kernel.NativeTangent.apply(th, g, cos, sin, bias, 0.3, causal), (theta, gate))
    head_gate = F.softplus(torch.randn(2, 2, 6, 1, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda th, g: native_kernel.NativeTangent.apply(th, g, None, None, bias, 0.3, causal), (theta, head_gate))


def test_kuramoto_compiled_kernel_handles_large_phases_and_strided_inputs(native_kernel, one_thread):
    """Angles past the kernel's fast sine range (|theta| > 8192) and heads read in place from a
    (B, T, H, P) layout give what the PyTorch path gives."""
    from workers.attention.kuramoto import _FusedTangent

    torch.manual_seed(11)
    Bq, Tq, Hq, P = 2, 21, 2, 9
    theta_BTHP = torch.randn(Bq, Tq, Hq, P) * 3
    theta_BTHP[0, 3, 1, 2] = 9000.5
    theta_BTHP[1, 7, 0, :] = -20000.25
    theta = theta_BTHP.transpose(1, 2).requires_grad_()  # (B, H, T, P), strided
    gate = F.softplus(torch.randn(Bq, Tq, Hq, P)).transpose(1, 2).requires_grad_()
    cos, sin = rotary_tables(Tq, 2 * P)
    bias = torch.full((Tq, Tq), float("-inf")).triu_(1)
    native = native_kernel.NativeTangent.apply(theta, gate, cos, sin, None, 0.25, True)
    torch_path = _FusedTangent.apply(theta, gate, cos, sin, bias, 0.25)
    torch.testing.assert_close(native, torch_path, atol=2e-6, rtol=0)
    upstream = torch.randn_like(native)
    for got, want in zip(torch.autograd.grad(native, (theta, gate), upstream),
                         torch.autograd.grad(torch_path, (theta, gate), upstream)):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("options", [{}, {"gate_per": "head", "steps": 2}, {"gate": "none", "phase_drift": "none",
                                                                          "readout": "delta"}])
def test_kuramoto_layer_is_the_same_with_and_without_the_compiled_kernel(options, native_kernel, monkeypatch, one_thread):
    """The whole layer (steps > 1 included) in float32, kernel against the PyTorch fallback taken when
    the kernel is unavailable (`load()` None: no compiler, a failed build or SCALING_NATIVE_KERNELS=0)."""
    torch.manual_seed(0)
    module = build_attention("kuramoto", d_model=D, n_heads=H, max_seq_len=T, causal=True, **options)
    _layer_with_and_without_the_kernel(module, native_kernel, monkeypatch)


def test_kuramoto_long_sequences_take_the_sdpa_path_with_the_same_result():
    from workers.attention import kuramoto as km

    module = make("kuramoto")
    x = torch.randn(B, T, D, dtype=torch.float64)
    fused = module(x)
    limit, km.FUSED_MAX_T = km.FUSED_MAX_T, T - 1  # T past the limit: the reference (fused SDPA) runs
    try:
        torch.testing.assert_close(module(x), fused, atol=1e-12, rtol=0)
    finally:
        km.FUSED_MAX_T = limit


def test_kuramoto_layer_is_the_phase_step_then_read_out():
    module = make("kuramoto", kappa_init=0.7)
    x = torch.randn(B, T, D, dtype=torch.float64)
    theta = module.heads(module.w_in(x))
    gate = module.heads(F.softplus(module.w_g(x)))
    theta_new = theta + 0.7 * naive_kuramoto_delta(theta, gate)
    feats = torch.cat([theta_new.cos(), theta_new.sin()], -1).transpose(1, 2).reshape(B, T, 2 * D)
    torch.testing.assert_close(module(x), module.w_out(feats), atol=1e-6, rtol=0)  # float32 rotary tables
    assert module.kappa_M.shape == (D,) and module.w_out.in_features == 2 * D


def test_kuramoto_rejects_bad_options():
    with pytest.raises(ValueError, match="gate='relu'; allowed"):
        make("kuramoto", gate="relu")
    with pytest.raises(ValueError, match="phase_dim=3 must be a positive multiple of n_heads=2"):
        make("kuramoto", phase_dim=3)


def test_rotary_scores_depend_on_relative_position_only():
    cos, sin = rotary_tables(32, 8)
    torch.manual_seed(0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(i, j):
        qs = apply_rotary(q.expand(1, 1, 32, 8), cos, sin)[0, 0, i]
        ks = apply_rotary(k.expand(1, 1, 32, 8), cos, sin)[0, 0, j]
        return float(qs @ ks)

    assert score(5, 2) == pytest.approx(score(20, 17), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)



# ---- errors -------------------------------------------------------------------------------------


def test_unknown_variant_lists_known_ones():
    with pytest.raises(ValueError, match="known variants: \\['kuramoto', 'oscillator', 'softmax'\\]"):
        build_attention("linear", d_model=D, n_heads=H, max_seq_len=T, causal=True)


def test_unknown_option_lists_allowed_ones():
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['temperature'\\]; allowed"):
        build_attention("oscillator", d_model=D, n_heads=H, max_seq_len=T, causal=True, temperature=2)


def test_d_osc_below_two_rejected():
    with pytest.raises(ValueError, match="d_osc=1 must be an integer >= 2"):
        make("oscillator", d_osc=1)


@pytest.mark.parametrize("option,value,message", [("mode", "rk4", "mode='rk4'; allowed"), ("init", "zeros", "init='zeros'"),
                                                  ("anchor_norm", "never", "anchor_norm='never'"), ("t_max", 0, "t_max=0")])
def test_bad_oscillator_options_rejected(option, value, message):
    with pytest.raises(ValueError, match=message):
        make("oscillator", **{option: value})


def test_anchor_norm_always_renormalises():
    module = make("oscillator", anchor_norm="always")
    with torch.no_grad():
        module.anchors_HLd.mul_(3.0)
    assert torch.allclose(module.anchors().norm(dim=-1), torch.ones(1, dtype=torch.float64))


# ---- oscillator: which path runs --------------------------------------------------------------


PATH_CASES = [  # T, d_osc, p, return_weights, readout, mode, causal -> path without / with the compiled kernel
    (16, 2, 1.0, False, "auto", "analytic", True, "dense", "fused"),
    (2, 2, 1.0, False, "auto", "analytic", False, "dense", "fused"),
    (128, 8, 1.0, False, "auto", "analytic", True, "dense", "fused"),
    (129, 8, 1.0, False, "dense", "analytic", True, "dense", "dense"),  # two coupling blocks
    (16, 2, 1.0, False, "dense", "analytic", True, "dense", "fused"),
    (16, 16, 1.0, False, "auto", "analytic", True, "fused", "fused"),
    (200, 16, 1.0, False, "auto", "analytic", True, "linear", "linear"),
    (200, 2, 1.0, False, "auto", "analytic", False, "linear", "linear"),
    (16, 2, 2.0, False, "auto", "analytic", True, "reference", "reference"),
    (16, 16, 1.0, True, "auto", "analytic", True, "reference", "reference"),
    (200, 2, 1.0, False, "auto", "euler", True, "dense", "dense"),
    (16, 16, 1.0, False, "auto", "euler", True, "dense", "dense"),
    (16, 2, 1.0, False, "linear", "analytic", True, "linear", "linear"),
]


@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "kernel"])
@pytest.mark.parametrize("T_,d,p,weights,readout,mode,causal,without,with_kernel", PATH_CASES)
def test_the_chosen_path_is_the_one_that_runs(T_, d, p, weights, readout, mode, causal, without, with_kernel, kernel,
                                              monkeypatch):
    """`choose_path` decides, given whether the compiled kernel runs for the inputs (CPU float32/64,
    built, not `pytorch_only()`); spies on the implementations show that exactly that one ran (the
    fused path on the kernel where it runs, else on `_DenseOscillator`)."""
    import workers.attention.oscillator as osc

    if kernel and osc.native.load() is None:
        pytest.skip("no C++ compiler: the compiled attention kernels are not built (the PyTorch paths run)")
    expected = with_kernel if kernel else without
    ran = []
    spies = [("fused", osc._DenseOscillator, "apply"), ("fused kernel", osc.native.NativeOscillator, "apply"),
             ("dense", osc._DenseReadout, "apply"), ("linear", osc, "readout_linear"), ("reference", osc, "readout_dense")]
    for path, owner, name in spies:
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _p=path, **k: (ran.append(_p), _f(*a, **k))[1])
    assert osc.choose_path(T_, d, causal=causal, mode=mode, p=p, return_weights=weights, readout=readout,
                           kernel=kernel) == expected
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T_, 4, generator=g) for _ in range(3))
    anchors = F.normalize(torch.randn(1, T_, d, generator=g), dim=-1)
    stats: dict = {}
    with contextlib.nullcontext() if kernel else osc.native.pytorch_only():
        assert osc.kernel_runs(q, k, v, anchors) == kernel
        osc.oscillator_attention(q, k, v, anchors, causal=causal, p=p, return_weights=weights, readout=readout,
                                 mode=mode, t_max=1.0, stats=stats)
    implementation = "fused kernel" if expected == "fused" and kernel else expected
    assert ran == [implementation] and stats["path"] == expected


def test_the_kernel_runs_only_for_cpu_float32_or_float64_tensors_of_one_dtype(native_kernel):
    import workers.attention.oscillator as osc

    x32, x64 = torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    assert osc.kernel_runs(x32, x32) and osc.kernel_runs(x64, x64)
    assert not osc.kernel_runs(x32, x64) and not osc.kernel_runs(x32.bfloat16())
    assert not osc.kernel_runs(torch.zeros(1, 1, 2, 2, device="meta"))
    with native_kernel.pytorch_only():
        assert not osc.kernel_runs(x32)


def test_module_records_its_path_and_counts_the_flops_of_that_path():
    short = make("oscillator", d_osc=16)
    short(torch.randn(B, T, D, dtype=torch.float64))
    assert short.last_path == "fused" == short.path(T)
    long_ = build_attention("oscillator", d_model=D, n_heads=H, max_seq_len=256, causal=False, d_osc=2)
    assert long_.path(256) == "linear" and long_.path(100, kernel=False) == "dense"
    assert long_.path(100, kernel=True) == "fused"
    assert long_.attention_flops_per_token(100, D) == 2 * 100 * (D + H * 2) + 2 * 100 * (H * 2 + D)  # either way
    # the linear readout's cost does not grow with T; the dense one's does
    per_T = [long_.attention_flops_per_token(t, D) - 2 * t * (D + H * 2) for t in (160, 256)]
    assert per_T[0] == per_T[1]
