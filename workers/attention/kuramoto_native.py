"""A fused CPU kernel of the Kuramoto tangent update (`kuramoto.kuramoto_tangent`), forward and backward,
compiled on first use with the system C++ compiler and loaded with ctypes (no torch headers: it builds
in about a second). Absent a compiler, or when the build fails, `load()` returns None and the
pure-PyTorch `_FusedTangent` runs instead; tests/test_attention.py checks the two against each other
and against the reference.

Legend: N = B*H heads, T sequence, P phases per head, E = 2P features ([cos, sin]), G gate width (P, 1
or 0: no gate), W SIMD lanes, Tp / Ep: T / E rounded up to 2W.

Why a kernel: at the WikiText-2 preset shape (B 64, H 4, T 50, P 32) the op is six (T, T) x (T, 2P)
matrix products and some twenty elementwise passes over (N, T, P) and (N, T, T) tensors. With torch
ops each pass goes through memory and the batched products do not skip the causal upper triangle;
here one head at a time lives in the L1/L2 cache: the features are built once, the products are
register-blocked (4 rows x 2W columns) and skip the blocks above the diagonal, and every elementwise
step (rotation, gate, softmax, tangent, the softmax backward, the cross products of the backward) is
folded into the loops that produce its operands.

The math is `_FusedTangent`'s (kuramoto.py): e = [cos theta, sin theta], k = e rotated by the drift
tables, q = scale * gate * k, A = softmax(q k^T + bias) over the causal range, O = A e,
delta = c O_s - s O_c; the backward is dO = g (-s, c), dA = dO e^T, dS = A (dA - rowsum(g delta)),
dQ = dS k, dK = dS^T q, dV = A^T dO and the cross products into theta (and the gate).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading

import torch

SOURCE = r"""
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>

template <typename S> struct V;
template <> struct V<float> { typedef float v __attribute__((vector_size(32))); static const int W = 8; };
template <> struct V<double> { typedef double v __attribute__((vector_size(32))); static const int W = 4; };

#define INL inline __attribute__((always_inline))

static INL int roundup(int x, int m) { return (x + m - 1) / m * m; }

// C[r, 0:ncols] = sum_{kk in [k0, k1)} A[r, kk] B[kk, 0:ncols] for MR rows; ncols a multiple of 2W,
// B rows 32-byte aligned.
template <typename S, int MR>
static INL void gemm_rows(const S* A, int lda, const S* B, int ldb, S* C, int ldc, int k0, int k1, int ncols) {
  typedef typename V<S>::v vec;
  const int W = V<S>::W;
  for (int j = 0; j < ncols; j += 2 * W) {
    vec acc[MR][2];
    for (int r = 0; r < MR; ++r) { acc[r][0] = vec{} ; acc[r][1] = vec{}; }
    for (int kk = k0; kk < k1; ++kk) {
      const vec b0 = *(const vec*)(B + (size_t)kk * ldb + j);
      const vec b1 = *(const vec*)(B + (size_t)kk * ldb + j + W);
      for (int r = 0; r < MR; ++r) {
        const S a = A[(size_t)r * lda + kk];
        acc[r][0] += a * b0;
        acc[r][1] += a * b1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      *(vec*)(C + (size_t)r * ldc + j) = acc[r][0];
      *(vec*)(C + (size_t)r * ldc + j + W) = acc[r][1];
    }
  }
}

// Rows [0, M) of C = A B with a per-row-block contraction range and column count:
// kind 0: k in [0, K), columns Ncols (every row);
// kind 1 (causal "rows see keys <= row"): k in [0, min(K, r0 + MR)), columns Ncols;
// kind 2 (causal, transposed): k in [r0, K), columns Ncols;
// kind 3 (causal scores): k in [0, K), columns roundup(min(r0 + MR, Ncols_true), 2W) (at most Ncols).
template <typename S>
static void gemm(int kind, int M, int K, int Ncols, const S* A, int lda, const S* B, int ldb, S* C, int ldc) {
  const int W2 = 2 * V<S>::W;
  int r0 = 0;
  for (; r0 + 4 <= M; r0 += 4) {
    int k0 = 0, k1 = K, nc = Ncols;
    if (kind == 1) k1 = std::min(K, r0 + 4);
    else if (kind == 2) k0 = r0;
    else if (kind == 3) nc = std::min(Ncols, roundup(r0 + 4, W2));
    gemm_rows<S, 4>(A + (size_t)r0 * lda, lda, B, ldb, C + (size_t)r0 * ldc, ldc, k0, k1, nc);
  }
  for (; r0 < M; ++r0) {
    int k0 = 0, k1 = K, nc = Ncols;
    if (kind == 1) k1 = std::min(K, r0 + 1);
    else if (kind == 2) k0 = r0;
    else if (kind == 3) nc = std::min(Ncols, roundup(r0 + 1, W2));
    gemm_rows<S, 1>(A + (size_t)r0 * lda, lda, B, ldb, C + (size_t)r0 * ldc, ldc, k0, k1, nc);
  }
}

// exp(x) for x <= 0 (x - rowmax), 0 below -87 (and for -inf); float: Cephes' polynomial, ~1 ulp.
static INL void exp_nonpos(float* x, int n) {
  typedef V<float>::v vec;
  typedef int vi __attribute__((vector_size(32)));
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    vec v = *(vec*)(x + i);
    vi keep = v > -87.0f;
    v = keep ? v : vec{} - 87.0f;
    vec fx = v * 1.44269504088896341f + 0.5f;          // n = round(x / ln2): |r| <= ln2 / 2
    vi n_i = __builtin_convertvector(fx, vi);            // truncation toward 0
    vec n_f = __builtin_convertvector(n_i, vec);
    vi gt = n_f > fx;                                      // round toward -inf
    n_i += gt;                                             // gt is -1 where true: floor
    n_f = __builtin_convertvector(n_i, vec);
    // x - n ln2, ln2 in two parts (Cody-Waite), then |r| <= ln2: exp(r) = 1 + r + r^2 p(r)
    vec r = v - n_f * 0.693359375f;
    r = r - n_f * -2.12194440e-4f;
    vec p = vec{} + 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * r * r + r + 1.0f;
    vi bits = (n_i + 127) << 23;
    vec scale2;
    std::memcpy(&scale2, &bits, sizeof(vec));
    p = p * scale2;
    *(vec*)(x + i) = keep ? p : vec{};
  }
  for (; i < n; ++i) x[i] = x[i] > -87.0f ? std::exp(x[i]) : 0.0f;
}
static INL void exp_nonpos(double* x, int n) {
  for (int i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <typename S>
struct Strided {  // a (B, H, T, X) tensor with unit stride on X
  const S* p; int64_t sb, sh, st;
  INL const S* row(int b, int h, int t) const { return p + b * sb + h * sh + t * st; }
};

template <typename S>
struct Args {
  int N, H, T, P, G, causal;
  S scale;
  Strided<S> c, s, gate;           // gate.p null: no gate
  const S* rc; const S* rs;        // (T, P) drift tables, null: none
  const S* bias; int64_t bias_sb;  // (B?, T, T) additive bias, null: none
  S* delta; S* dot; S* A;          // forward outputs: (N, T, P), (N, T, P), (N, T, Tp)
  const S* grad;                   // backward: dL/d delta, (N, T, P)
  S* gtheta; S* ggate;             // backward outputs: (N, T, P), (N, T, G)
};

template <typename S>
static S* aligned(size_t n) {
  size_t bytes = (n * sizeof(S) + 63) / 64 * 64;
  S* p = (S*)std::aligned_alloc(64, bytes);
  std::memset(p, 0, bytes);
  return p;
}

// e, k, q rows (T x Ep, zero padded) of head n; eT / kT (Ep x Tp) when asked.
template <typename S>
static void features(const Args<S>& a, int n, int Ep, int Tp, S* e, S* k, S* q, S* eT, S* kT, S* gs) {
  const int b = n / a.H, h = n % a.H, P = a.P;
  for (int t = 0; t < a.T; ++t) {
    const S* c = a.c.row(b, h, t);
    const S* s = a.s.row(b, h, t);
    S* er = e + (size_t)t * Ep; S* kr = k + (size_t)t * Ep; S* qr = q + (size_t)t * Ep;
    S* gr = gs + (size_t)t * P;
    if (a.gate.p) {
      const S* g = a.gate.row(b, h, t);
      if (a.G == 1) for (int m = 0; m < P; ++m) gr[m] = a.scale * g[0];
      else for (int m = 0; m < P; ++m) gr[m] = a.scale * g[m];
    } else {
      for (int m = 0; m < P; ++m) gr[m] = a.scale;
    }
    if (a.rc) {
      const S* rc = a.rc + (size_t)t * P; const S* rs = a.rs + (size_t)t * P;
      for (int m = 0; m < P; ++m) {
        er[m] = c[m]; er[P + m] = s[m];
        const S kc = c[m] * rc[m] - s[m] * rs[m], ks = s[m] * rc[m] + c[m] * rs[m];
        kr[m] = kc; kr[P + m] = ks; qr[m] = gr[m] * kc; qr[P + m] = gr[m] * ks;
      }
    } else {
      for (int m = 0; m < P; ++m) {
        er[m] = c[m]; er[P + m] = s[m]; kr[m] = c[m]; kr[P + m] = s[m];
        qr[m] = gr[m] * c[m]; qr[P + m] = gr[m] * s[m];
      }
    }
    if (eT) for (int j = 0; j < 2 * P; ++j) eT[(size_t)j * Tp + t] = er[j];
    if (kT) for (int j = 0; j < 2 * P; ++j) kT[(size_t)j * Tp + t] = kr[j];
  }
}

template <typename S>
static void forward_heads(const Args<S>& a, int n0, int n1) {
  const int T = a.T, P = a.P, E = 2 * P, W2 = 2 * V<S>::W;
  const int Tp = roundup(T, W2), Ep = roundup(E, W2);
  S* e = aligned<S>((size_t)T * Ep); S* k = aligned<S>((size_t)T * Ep); S* q = aligned<S>((size_t)T * Ep);
  S* kT = aligned<S>((size_t)Ep * Tp); S* O = aligned<S>((size_t)T * Ep); S* gs = aligned<S>((size_t)T * P);
  for (int n = n0; n < n1; ++n) {
    const int b = n / a.H;
    features(a, n, Ep, Tp, e, k, q, (S*)nullptr, kT, gs);
    S* An = a.A + (size_t)n * T * Tp;
    gemm<S>(a.causal ? 3 : 0, T, E, Tp, q, Ep, kT, Tp, An, Tp);  // scores
    for (int t = 0; t < T; ++t) {
      S* row = An + (size_t)t * Tp;
      const int U = a.causal ? t + 1 : T;
      if (a.bias) {
        const S* br = a.bias + b * a.bias_sb + (size_t)t * T;
        for (int u = 0; u < U; ++u) row[u] += br[u];
      }
      S mx = row[0];
      for (int u = 1; u < U; ++u) mx = std::max(mx, row[u]);
      for (int u = 0; u < U; ++u) row[u] -= mx;
      exp_nonpos(row, U);
      S sum = 0;
      for (int u = 0; u < U; ++u) sum += row[u];
      const S inv = S(1) / sum;
      for (int u = 0; u < U; ++u) row[u] *= inv;
      for (int u = U; u < Tp; ++u) row[u] = 0;
    }
    gemm<S>(a.causal ? 1 : 0, T, T, Ep, An, Tp, e, Ep, O, Ep);  // circular mean (C, S)
    S* dl = a.delta + (size_t)n * T * P; S* dt = a.dot + (size_t)n * T * P;
    for (int t = 0; t < T; ++t) {
      const S* er = e + (size_t)t * Ep; const S* orow = O + (size_t)t * Ep;
      for (int m = 0; m < P; ++m) {
        const S c = er[m], s = er[P + m], C = orow[m], Sv = orow[P + m];
        dl[(size_t)t * P + m] = c * Sv - s * C;
        dt[(size_t)t * P + m] = c * C + s * Sv;
      }
    }
  }
  std::free(e); std::free(k); std::free(q); std::free(kT); std::free(O); std::free(gs);
}

template <typename S>
static void backward_heads(const Args<S>& a, int n0, int n1) {
  const int T = a.T, P = a.P, E = 2 * P, W2 = 2 * V<S>::W;
  const int Tp = roundup(T, W2), Ep = roundup(E, W2);
  S* e = aligned<S>((size_t)T * Ep); S* k = aligned<S>((size_t)T * Ep); S* q = aligned<S>((size_t)T * Ep);
  S* eT = aligned<S>((size_t)Ep * Tp); S* gs = aligned<S>((size_t)T * P);
  S* dO = aligned<S>((size_t)T * Ep); S* D = aligned<S>((size_t)T * Tp); S* AT = aligned<S>((size_t)T * Tp);
  S* DT = aligned<S>((size_t)T * Tp); S* dQ = aligned<S>((size_t)T * Ep); S* dK = aligned<S>((size_t)T * Ep);
  S* dV = aligned<S>((size_t)T * Ep); S* rowsum = aligned<S>(T);
  for (int n = n0; n < n1; ++n) {
    features(a, n, Ep, Tp, e, k, q, eT, (S*)nullptr, gs);
    const S* An = a.A + (size_t)n * T * Tp;
    const S* g = a.grad + (size_t)n * T * P;
    const S* dl = a.delta + (size_t)n * T * P;
    for (int t = 0; t < T; ++t) {  // dO = g (-s, c); rowsum(dA A) = rowsum(dO O) = sum_m g delta
      const S* er = e + (size_t)t * Ep; S* r = dO + (size_t)t * Ep;
      S acc = 0;
      for (int m = 0; m < P; ++m) {
        const S gm = g[(size_t)t * P + m];
        r[m] = -er[P + m] * gm; r[P + m] = er[m] * gm;
        acc += gm * dl[(size_t)t * P + m];
      }
      rowsum[t] = acc;
    }
    gemm<S>(a.causal ? 3 : 0, T, E, Tp, dO, Ep, eT, Tp, D, Tp);  // dA
    for (int t = 0; t < T; ++t) {  // dS = A (dA - rowsum), zero past the causal range
      const S* ar = An + (size_t)t * Tp; S* dr = D + (size_t)t * Tp;
      const int U = a.causal ? t + 1 : T;
      const S rs = rowsum[t];
      for (int u = 0; u < U; ++u) dr[u] = ar[u] * (dr[u] - rs);
      for (int u = U; u < Tp; ++u) dr[u] = 0;
    }
    for (int t = 0; t < T; ++t)
      for (int u = 0; u < T; ++u) { AT[(size_t)u * Tp + t] = An[(size_t)t * Tp + u]; DT[(size_t)u * Tp + t] = D[(size_t)t * Tp + u]; }
    gemm<S>(a.causal ? 1 : 0, T, T, Ep, D, Tp, k, Ep, dQ, Ep);
    gemm<S>(a.causal ? 2 : 0, T, T, Ep, DT, Tp, q, Ep, dK, Ep);
    gemm<S>(a.causal ? 2 : 0, T, T, Ep, AT, Tp, dO, Ep, dV, Ep);
    S* gt = a.gtheta + (size_t)n * T * P;
    const S* dt = a.dot + (size_t)n * T * P;
    for (int t = 0; t < T; ++t) {
      const S* er = e + (size_t)t * Ep; const S* kr = k + (size_t)t * Ep;
      const S* qg = dQ + (size_t)t * Ep; const S* kg = dK + (size_t)t * Ep; const S* vg = dV + (size_t)t * Ep;
      const S* gr = gs + (size_t)t * P;
      S gate_sum = 0;
      for (int m = 0; m < P; ++m) {
        const S c = er[m], s = er[P + m], kc = kr[m], ks = kr[P + m];
        const S gqc = qg[m], gqs = qg[P + m];
        const S gkc = kg[m] + gr[m] * gqc, gks = kg[P + m] + gr[m] * gqs;
        const S gg = a.scale * (gqc * kc + gqs * ks);
        if (a.ggate && a.G > 1) a.ggate[((size_t)n * T + t) * P + m] = gg;
        gate_sum += gg;
        gt[(size_t)t * P + m] = (c * vg[P + m] - s * vg[m]) + (kc * gks - ks * gkc)
                                - g[(size_t)t * P + m] * dt[(size_t)t * P + m];
      }
      if (a.ggate && a.G == 1) a.ggate[(size_t)n * T + t] = gate_sum;
    }
  }
  std::free(e); std::free(k); std::free(q); std::free(eT); std::free(gs); std::free(dO); std::free(D);
  std::free(AT); std::free(DT); std::free(dQ); std::free(dK); std::free(dV); std::free(rowsum);
}

template <typename S, bool FWD>
static void run(const Args<S>& a, int threads) {
  threads = std::max(1, std::min(threads, a.N));
  auto part = [&](int i) {
    const int n0 = (int)((int64_t)a.N * i / threads), n1 = (int)((int64_t)a.N * (i + 1) / threads);
    if (FWD) forward_heads(a, n0, n1); else backward_heads(a, n0, n1);
  };
  if (threads == 1) { part(0); return; }
  std::vector<std::thread> pool;
  for (int i = 1; i < threads; ++i) pool.emplace_back(part, i);
  part(0);
  for (auto& th : pool) th.join();
}

template <typename S>
static Args<S> make_args(int N, int H, int T, int P, int G, int causal, double scale,
                         const S* c, const int64_t* cst, const S* s, const int64_t* sst,
                         const S* gate, const int64_t* gst, const S* rc, const S* rs,
                         const S* bias, int64_t bias_sb, S* delta, S* dot, S* A,
                         const S* grad, S* gtheta, S* ggate) {
  Args<S> a;
  a.N = N; a.H = H; a.T = T; a.P = P; a.G = G; a.causal = causal; a.scale = (S)scale;
  a.c = {c, cst[0], cst[1], cst[2]}; a.s = {s, sst[0], sst[1], sst[2]};
  a.gate = {gate, gate ? gst[0] : 0, gate ? gst[1] : 0, gate ? gst[2] : 0};
  a.rc = rc; a.rs = rs; a.bias = bias; a.bias_sb = bias_sb;
  a.delta = delta; a.dot = dot; a.A = A; a.grad = grad; a.gtheta = gtheta; a.ggate = ggate;
  return a;
}

#define EXPORT(S, SUF) \
extern "C" void kuramoto_forward_##SUF(int N, int H, int T, int P, int G, int causal, double scale, \
    const S* c, const int64_t* cst, const S* s, const int64_t* sst, const S* gate, const int64_t* gst, \
    const S* rc, const S* rs, const S* bias, int64_t bias_sb, S* delta, S* dot, S* A, int threads) { \
  run<S, true>(make_args<S>(N, H, T, P, G, causal, scale, c, cst, s, sst, gate, gst, rc, rs, bias, bias_sb, \
                            delta, dot, A, nullptr, nullptr, nullptr), threads); } \
extern "C" void kuramoto_backward_##SUF(int N, int H, int T, int P, int G, int causal, double scale, \
    const S* c, const int64_t* cst, const S* s, const int64_t* sst, const S* gate, const int64_t* gst, \
    const S* rc, const S* rs, const S* delta, const S* dot, const S* A, const S* grad, S* gtheta, S* ggate, \
    int threads) { \
  run<S, false>(make_args<S>(N, H, T, P, G, causal, scale, c, cst, s, sst, gate, gst, rc, rs, nullptr, 0, \
                             (S*)delta, (S*)dot, (S*)A, grad, gtheta, ggate), threads); }

EXPORT(float, f32)
EXPORT(double, f64)
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_P, _I64P = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)


def _flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared", "-pthread"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "oscillator-scaling", "kernels")


def _build(compiler: str, flags: list[str]) -> str:
    key = hashlib.sha256("\0".join([SOURCE, compiler, *flags]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"kuramoto_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "kuramoto.cpp"), os.path.join(tmp, "kuramoto.so")
        with open(src, "w") as handle:
            handle.write(SOURCE)
        subprocess.run([compiler, *flags, src, "-o", out], check=True, capture_output=True, timeout=300)
        staged = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, staged)
        os.replace(staged, path)  # atomic: processes building at once each install a whole file
    return path


def load() -> ctypes.CDLL | None:
    """The compiled kernel, built once per machine and source (cached under ~/.cache/oscillator-scaling);
    None when disabled (`SCALING_NATIVE_KURAMOTO=0`), no C++ compiler is found, or the build fails."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SCALING_NATIVE_KURAMOTO", "1") == "0":
            return None
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if compiler is None:
            return None
        try:
            lib = ctypes.CDLL(_build(compiler, _flags()))
        except (OSError, subprocess.SubprocessError):
            return None
        common = [ctypes.c_int] * 6 + [ctypes.c_double] + [_P, _I64P, _P, _I64P, _P, _I64P, _P, _P]
        for suffix in ("f32", "f64"):
            fwd = getattr(lib, f"kuramoto_forward_{suffix}")
            fwd.argtypes = common + [_P, ctypes.c_int64, _P, _P, _P, ctypes.c_int]
            fwd.restype = None
            bwd = getattr(lib, f"kuramoto_backward_{suffix}")
            bwd.argtypes = common + [_P, _P, _P, _P, _P, _P, ctypes.c_int]
            bwd.restype = None
        _lib = lib
        return lib


def padded_len(T: int, dtype: torch.dtype) -> int:
    """T rounded up to 2W (the kernel's row length of the saved weights)."""
    w2 = 16 if dtype == torch.float32 else 8
    return (T + w2 - 1) // w2 * w2


def _ptr(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def _strides(x: torch.Tensor | None):
    """(b, h, t) element strides of a (B, H, T, X) tensor with unit stride on X."""
    if x is None:
        return None
    s = x.stride()
    return (ctypes.c_int64 * 3)(s[0], s[1], s[2])


def _rows(x: torch.Tensor | None) -> torch.Tensor | None:
    """A (B, H, T, X) tensor the kernel can read: unit stride on X (anything else is copied)."""
    if x is None or x.stride(-1) == 1 or x.shape[-1] == 1:
        return x
    return x.contiguous()


class NativeTangent(torch.autograd.Function):
    """`_FusedTangent` (kuramoto.py) on the compiled kernel. Inputs: theta (B, H, T, P), gate (B, H, T, G)
    or None (G = P or 1), the drift tables (T, P) or None, an additive score bias ((T, T) or (B, 1, T, T))
    or None, scale, causal. float32 / float64 on the CPU, T and P as the caller allows."""

    @staticmethod
    def forward(ctx, theta_BHTP, gate_BHTG, cos_TP, sin_TP, bias, scale, causal):
        lib = load()
        B, H, T, P = theta_BHTP.shape
        dtype = theta_BHTP.dtype
        c_BHTP, s_BHTP = _rows(theta_BHTP.cos()), _rows(theta_BHTP.sin())
        gate = _rows(gate_BHTG)
        G = 0 if gate is None else gate.shape[-1]
        if cos_TP is not None:
            cos_TP, sin_TP = (x.to(dtype).contiguous() for x in (cos_TP, sin_TP))
        if bias is not None:
            bias = bias.to(dtype).contiguous()
            bias_sb = 0 if bias.dim() == 2 else T * T
        else:
            bias_sb = 0
        delta = torch.empty(B, H, T, P, dtype=dtype)
        dot = torch.empty_like(delta)
        weights = torch.empty(B * H, T, padded_len(T, dtype), dtype=dtype)
        fwd = lib.kuramoto_forward_f32 if dtype == torch.float32 else lib.kuramoto_forward_f64
        fwd(B * H, H, T, P, G, int(causal), float(scale), _ptr(c_BHTP), _strides(c_BHTP), _ptr(s_BHTP),
            _strides(s_BHTP), _ptr(gate), _strides(gate), _ptr(cos_TP), _ptr(sin_TP), _ptr(bias), bias_sb,
            _ptr(delta), _ptr(dot), _ptr(weights), torch.get_num_threads())
        ctx.save_for_backward(c_BHTP, s_BHTP, gate, cos_TP, sin_TP, delta, dot, weights)
        ctx.meta = (G, int(causal), float(scale))
        return delta

    @staticmethod
    def backward(ctx, g_delta_BHTP):
        c_BHTP, s_BHTP, gate, cos_TP, sin_TP, delta, dot, weights = ctx.saved_tensors
        G, causal, scale = ctx.meta
        B, H, T, P = c_BHTP.shape
        dtype = c_BHTP.dtype
        grad = g_delta_BHTP.to(dtype).contiguous()
        g_theta = torch.empty(B, H, T, P, dtype=dtype)
        g_gate = None if gate is None else torch.empty(B, H, T, G, dtype=dtype)
        bwd = load().kuramoto_backward_f32 if dtype == torch.float32 else load().kuramoto_backward_f64
        bwd(B * H, H, T, P, G, causal, scale, _ptr(c_BHTP), _strides(c_BHTP), _ptr(s_BHTP), _strides(s_BHTP),
            _ptr(gate), _strides(gate), _ptr(cos_TP), _ptr(sin_TP), _ptr(delta), _ptr(dot), _ptr(weights),
            _ptr(grad), _ptr(g_theta), _ptr(g_gate), torch.get_num_threads())
        return g_theta, g_gate, None, None, None, None, None
