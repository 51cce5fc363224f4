"""Attention variants: causality through gradients, padding invariance, a naive reference, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from workers.attention import VARIANTS, build_attention, oscillator_attention

B, T, D, H = 2, 7, 16, 2


def make(name: str, causal: bool = True, **options):
    torch.manual_seed(0)
    if name == "oscillator":
        options.setdefault("d_osc", 4)
    return build_attention(name, d_model=D, n_heads=H, max_seq_len=T, causal=causal, **options).double()


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_causal_through_gradients(name):
    module = make(name)
    x = torch.randn(B, T, D, dtype=torch.float64, requires_grad=True)
    out = module(x)
    for t in range(T):
        (grad,) = torch.autograd.grad(out[:, t].sum(), x, retain_graph=True)
        assert torch.all(grad[:, t + 1 :] == 0), f"output {t} depends on a later input"
        assert grad[:, : t + 1].abs().sum() > 0


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("causal", [True, False])
def test_padding_keys_change_nothing(name, causal):
    module = make(name, causal=causal)
    x = torch.randn(B, T, D, dtype=torch.float64)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[:, 5:] = True
    out = module(x, pad)
    x_other = x.clone()
    x_other[:, 5:] = torch.randn(B, T - 5, D, dtype=torch.float64) * 10
    out_other = module(x_other, pad)
    torch.testing.assert_close(out[:, :5], out_other[:, :5], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_same_seed_bit_identical_outputs_and_gradients(name):
    def run():
        module = make(name).float()
        torch.manual_seed(1)
        x = torch.randn(B, T, D, requires_grad=True)
        out = module(x)
        out.square().sum().backward()
        return out.detach(), x.grad, [p.grad for p in module.parameters()]

    out1, gx1, gp1 = run()
    out2, gx2, gp2 = run()
    assert torch.equal(out1, out2) and torch.equal(gx1, gx2)
    assert all(torch.equal(a, b) for a, b in zip(gp1, gp2))


def naive_oscillator(q, k, v, anchors, p=1.0, pad=None):
    """Per-position loop straight from VARIANTS.md section 2 (causal)."""
    Bq, Hq, Tq, K = q.shape
    out = torch.zeros_like(v)
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Tq):
                keys = [j for j in range(i + 1) if pad is None or not pad[b, j]]
                hvec = torch.zeros(anchors.shape[-1], dtype=q.dtype)
                for j in keys:
                    w = math.log1p(math.exp(float(q[b, h, i] @ k[b, h, j]) / math.sqrt(K)))
                    hvec += w * anchors[h, j]
                z = hvec / max(float(hvec.norm()), 1e-8)
                s = torch.zeros(Tq, dtype=q.dtype)
                for j in keys:
                    s[j] = max(0.0, 1.0 + float(z @ anchors[h, j])) ** p
                a = s / max(float(s.sum()), 1e-8)
                out[b, h, i] = a @ v[b, h]
    return out


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("d_osc", [2, 5])
def test_oscillator_matches_naive_loop(p, d_osc):
    torch.manual_seed(3)
    q, k, v = (torch.randn(B, H, T, 4, dtype=torch.float64) for _ in range(3))
    anchors = torch.randn(H, T + 3, d_osc, dtype=torch.float64) * 0.7
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[1, 4:] = True
    fast, weights = oscillator_attention(q, k, v, anchors, causal=True, key_padding_BT=pad, p=p, return_weights=True)
    slow = naive_oscillator(q, k, v, anchors, p=p, pad=pad)
    valid = ~pad  # padded query rows are never read
    torch.testing.assert_close(fast[valid[:, None].expand(-1, H, -1)], slow[valid[:, None].expand(-1, H, -1)], atol=1e-5, rtol=0)
    assert torch.allclose(weights.sum(-1)[valid[:, None].expand(-1, H, -1)], torch.ones(1, dtype=torch.float64))


def test_oscillator_rank_bounded_by_d_plus_one():
    torch.manual_seed(0)
    d_osc = 3
    q, k, v = (torch.randn(1, 1, 24, 8, dtype=torch.float64) for _ in range(3))
    anchors = torch.nn.functional.normalize(torch.randn(1, 24, d_osc, dtype=torch.float64), dim=-1)
    _, weights = oscillator_attention(q, k, v, anchors, causal=False, return_weights=True)
    # unnormalised readout (1 + z.r) has rank <= d + 1; row normalisation keeps it
    assert torch.linalg.matrix_rank(weights[0, 0]).item() <= d_osc + 1


def test_fixed_point_is_stable_equilibrium_of_the_dynamics():
    """Integrate dz/dt = (I - z z^T) h by Euler from a random start: it reaches h/|h|."""
    torch.manual_seed(0)
    h = torch.randn(5, 6, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.randn(5, 6, dtype=torch.float64), dim=-1)
    for _ in range(4000):
        z = z + 0.01 * (h - (z * h).sum(-1, keepdim=True) * z)
        z = torch.nn.functional.normalize(z, dim=-1)
    torch.testing.assert_close(z, torch.nn.functional.normalize(h, dim=-1), atol=1e-6, rtol=0)


def test_unknown_variant_lists_known_ones():
    with pytest.raises(ValueError, match="known variants: \\['oscillator', 'softmax'\\]"):
        build_attention("linear", d_model=D, n_heads=H, max_seq_len=T, causal=True)


def test_d_osc_below_two_rejected():
    with pytest.raises(ValueError, match="d_osc=1 must be >= 2"):
        make("oscillator", d_osc=1)


def test_anchor_norm_always_renormalises():
    module = make("oscillator", anchor_norm="always")
    with torch.no_grad():
        module.anchors_HLd.mul_(3.0)
    assert torch.allclose(module.anchors().norm(dim=-1), torch.ones(1, dtype=torch.float64))
