"""Compiled CPU kernels, forward and backward, of two attention ops: the Kuramoto tangent update
(`kuramoto.kuramoto_tangent`, `NativeTangent`) and the fused analytic oscillator
(`oscillator._DenseOscillator`, `NativeOscillator`). The C++ source below is built on first use with
the system compiler (a few seconds; cached per machine, flags and source under
~/.cache/oscillator-scaling/kernels) and called through ctypes: no torch headers, no extension ABI.
Without a compiler, when the build fails, or with SCALING_NATIVE_KERNELS=0, `load()` returns None and
the callers run their pure-PyTorch paths (`_FusedTangent`, `_DenseOscillator`); tests/test_attention.py
checks each kernel against its PyTorch path (float32, value and gradients) and against finite
differences (float64).

Legend: N = B*H heads, T sequence, P phases per head, E = 2P features ([cos, sin]), G gate width (P, 1
or 0: no gate), K head width, d oscillator dimension, W SIMD lanes (8 float, 4 double), Tp / Ep / Kp /
dp: T / E / K / d rounded up to W.

Why kernels: at the WikiText-2 preset shape (B 64, H 4, T 50) each op is six (Kuramoto, 64 wide) or
twelve (oscillator d 32, 32 wide) (T, T)-sized matrix products plus some twenty elementwise passes over
(N, T, .) and (N, T, T) tensors. With torch ops each pass goes through memory and the batched products
do not skip the causal upper triangle. Here one (batch, head) at a time lives in the L1/L2 cache: its
operands are built once, the products are register-blocked (4 rows x 2W columns) and skip the blocks
above the diagonal, and every elementwise step (sin/cos, rotation, gate, softmax or softplus/sigmoid,
the tangent or the normalisations, and their backward) is folded into the loops next to the products.
Threads (torch.get_num_threads()) split the heads; the anchors' gradient is summed per thread, then in
thread order (deterministic for a given thread count).

Kuramoto (`_FusedTangent`'s math, kuramoto.py): e = [cos theta, sin theta], k = e rotated by the drift
tables, q = scale * gate * k, A = softmax(q k^T + bias) over the causal range, O = A e,
delta = c O_s - s O_c; the backward is dO = g (-s, c), dA = dO e^T, dS = A (dA - rowsum(g delta)),
dQ = dS k, dK = dS^T q, dV = A^T dO and the cross products into theta (and the gate).
Oscillator (`_DenseOscillator`'s math, oscillator.py): w = softplus(q k^T / sqrt K) on the coupling's
keys, h = w r, z = h / max(|h|, eps), A = max(0, 1 + z r^T) on the readout's keys, out = A v / rowsum(A);
w, sigmoid(scores) / sqrt K and A are kept for backward.
"""

from __future__ import annotations

import contextlib
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
typedef int vi8 __attribute__((vector_size(32)));

#define INL inline __attribute__((always_inline))
#define R __restrict

static INL int roundup(int x, int m) { return (x + m - 1) / m * m; }

// C[r, 0:ncols] = sum_{kk in [k0, k1)} A(r, kk) B[kk, 0:ncols] for MR rows, A(r, kk) = A[r lda + kk]
// (TA: A[kk lda + r], A transposed); ncols a multiple of W, B and C rows 32-byte aligned.
template <typename S, int MR, bool TA>
static INL void gemm_rows(const S* R A, int lda, const S* R B, int ldb, S* R C, int ldc, int k0, int k1, int ncols) {
  typedef typename V<S>::v vec;
  const int W = V<S>::W;
  int j = 0;
  for (; j + 2 * W <= ncols; j += 2 * W) {
    vec acc[MR][2];
    for (int r = 0; r < MR; ++r) { acc[r][0] = vec{}; acc[r][1] = vec{}; }
    for (int kk = k0; kk < k1; ++kk) {
      const vec b0 = *(const vec*)(B + (size_t)kk * ldb + j);
      const vec b1 = *(const vec*)(B + (size_t)kk * ldb + j + W);
      for (int r = 0; r < MR; ++r) {
        const S a = TA ? A[(size_t)kk * lda + r] : A[(size_t)r * lda + kk];
        acc[r][0] += a * b0;
        acc[r][1] += a * b1;
      }
    }
    for (int r = 0; r < MR; ++r) {
      *(vec*)(C + (size_t)r * ldc + j) = acc[r][0];
      *(vec*)(C + (size_t)r * ldc + j + W) = acc[r][1];
    }
  }
  if (j < ncols) {  // one last W-wide column chunk
    vec acc[MR];
    for (int r = 0; r < MR; ++r) acc[r] = vec{};
    for (int kk = k0; kk < k1; ++kk) {
      const vec b0 = *(const vec*)(B + (size_t)kk * ldb + j);
      for (int r = 0; r < MR; ++r) acc[r] += (TA ? A[(size_t)kk * lda + r] : A[(size_t)r * lda + kk]) * b0;
    }
    for (int r = 0; r < MR; ++r) *(vec*)(C + (size_t)r * ldc + j) = acc[r];
  }
}

// Rows [0, M) of C = op(A) B, op(A) (M x K) = A or (TA) A^T, B (K x Ncols), with a per-row-block
// contraction range and width:
// kind 0: k in [0, K), every column;
// kind 1 (causal, "row t sees keys u <= t"): k in [0, min(K, r0 + MR));
// kind 2 (causal, transposed: "row u gets queries t >= u"): k in [r0, K);
// kind 3 (causal scores): columns up to roundup(r0 + MR, W).
template <typename S, bool TA = false>
static void gemm(int kind, int M, int K, int Ncols, const S* A, int lda, const S* B, int ldb, S* C, int ldc) {
  const int W = V<S>::W;
  int r0 = 0;
  for (; r0 + 4 <= M; r0 += 4) {
    int k0 = 0, k1 = K, nc = Ncols;
    if (kind == 1) k1 = std::min(K, r0 + 4);
    else if (kind == 2) k0 = r0;
    else if (kind == 3) nc = std::min(Ncols, roundup(r0 + 4, W));
    gemm_rows<S, 4, TA>(TA ? A + r0 : A + (size_t)r0 * lda, lda, B, ldb, C + (size_t)r0 * ldc, ldc, k0, k1, nc);
  }
  for (; r0 < M; ++r0) {
    int k0 = 0, k1 = K, nc = Ncols;
    if (kind == 1) k1 = std::min(K, r0 + 1);
    else if (kind == 2) k0 = r0;
    else if (kind == 3) nc = std::min(Ncols, roundup(r0 + 1, W));
    gemm_rows<S, 1, TA>(TA ? A + r0 : A + (size_t)r0 * lda, lda, B, ldb, C + (size_t)r0 * ldc, ldc, k0, k1, nc);
  }
}

// exp(v) for v <= 0 (0 below -87 and at -inf). Cephes' expf, ~1 ulp.
static INL V<float>::v exp_vec(V<float>::v v) {
  typedef V<float>::v vec;
  vi8 keep = v > -87.0f;
  v = keep ? v : vec{} - 87.0f;
  vec fx = v * 1.44269504088896341f + 0.5f;  // n = round(x / ln2): |r| <= ln2 / 2
  vi8 n_i = __builtin_convertvector(fx, vi8);  // truncation toward 0 ...
  vec n_f = __builtin_convertvector(n_i, vec);
  n_i += (vi8)(n_f > fx);                      // ... then floor (a true comparison is -1)
  n_f = __builtin_convertvector(n_i, vec);
  vec r = v - n_f * 0.693359375f;             // x - n ln2, ln2 in two parts (Cody-Waite)
  r = r - n_f * -2.12194440e-4f;
  vec p = vec{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  vi8 bits = (n_i + 127) << 23;
  vec two_n;
  std::memcpy(&two_n, &bits, sizeof(vec));
  p = p * two_n;
  return keep ? p : vec{};
}

// x <- exp(x) on W-aligned chunks, x <= 0 (x - rowmax)
static INL void exp_nonpos(float* R x, int n) {
  typedef V<float>::v vec;
  for (int i = 0; i < n; i += 8) *(vec*)(x + i) = exp_vec(*(vec*)(x + i));
}
static INL void exp_nonpos(double* R x, int n) {
  for (int i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

// c, s <- cos x, sin x. float: Cephes' sinf / cosf (reduction by pi/4 in three parts, exact enough
// for |x| < 8192; larger |x|, rare, go through libm).
static void sincos_row(const float* R x, float* R c, float* R s, int n) {
  typedef V<float>::v vec;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    vec v; std::memcpy(&v, x + i, sizeof(vec));
    vec ax = v < 0 ? -v : v;
    vi8 big = ax > 8192.0f;
    vi8 j = __builtin_convertvector(ax * 1.27323954473516f, vi8);  // floor(|x| 4 / pi)
    j = (j + 1) & ~1;                                                 // even octant
    vec y = __builtin_convertvector(j, vec);
    vec z = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
    vec zz = z * z;
    vec ps = ((vec{} - 1.9515295891E-4f) * zz + 8.3321608736E-3f) * zz - 1.6666654611E-1f;
    ps = ps * zz * z + z;
    vec pc = ((vec{} + 2.443315711809948E-005f) * zz - 1.388731625493765E-003f) * zz + 4.166664568298827E-002f;
    pc = pc * zz * zz - 0.5f * zz + 1.0f;
    vi8 q = j & 7;                                  // 0, 2, 4, 6
    vi8 swap = (q == 2) | (q == 6);
    vec sv = swap ? pc : ps, cv = swap ? ps : pc;
    vi8 sneg = (q >= 4) ^ (v < 0);                  // sin: sign flips in octants 4, 6 and for x < 0
    vi8 cneg = (q == 2) | (q == 4);                 // cos: negative in octants 2, 4
    sv = sneg ? -sv : sv;
    cv = cneg ? -cv : cv;
    std::memcpy(c + i, &cv, sizeof(vec));
    std::memcpy(s + i, &sv, sizeof(vec));
    bool any_big = false;
    for (int l = 0; l < 8; ++l) any_big |= big[l] != 0;
    if (any_big)
      for (int l = 0; l < 8; ++l) if (big[l]) { c[i + l] = std::cos(x[i + l]); s[i + l] = std::sin(x[i + l]); }
  }
  for (; i < n; ++i) { c[i] = std::cos(x[i]); s[i] = std::sin(x[i]); }
}
static void sincos_row(const double* R x, double* R c, double* R s, int n) {
  for (int i = 0; i < n; ++i) { c[i] = std::cos(x[i]); s[i] = std::sin(x[i]); }
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
  Strided<S> theta, gate;          // gate.p null: no gate
  const S* rc; const S* rs;        // (T, P) drift tables, null: none
  const S* bias; int64_t bias_sb;  // (B?, T, T) additive bias, null: none
  S* c; S* s;                      // (N, T, P): cos, sin theta (forward writes, backward reads)
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

// Y[j][t0 + i] = X[i][j] for i < 8, j < ncols (a multiple of 8): eight feature rows into columns.
static INL void transpose8(const float* R X, int ldx, float* R Y, int ldy, int ncols) {
  typedef V<float>::v vec;
  for (int j = 0; j < ncols; j += 8) {
    vec r[8];
    for (int i = 0; i < 8; ++i) std::memcpy(&r[i], X + (size_t)i * ldx + j, sizeof(vec));
    vec t0 = __builtin_shufflevector(r[0], r[1], 0, 8, 1, 9, 4, 12, 5, 13);
    vec t1 = __builtin_shufflevector(r[0], r[1], 2, 10, 3, 11, 6, 14, 7, 15);
    vec t2 = __builtin_shufflevector(r[2], r[3], 0, 8, 1, 9, 4, 12, 5, 13);
    vec t3 = __builtin_shufflevector(r[2], r[3], 2, 10, 3, 11, 6, 14, 7, 15);
    vec t4 = __builtin_shufflevector(r[4], r[5], 0, 8, 1, 9, 4, 12, 5, 13);
    vec t5 = __builtin_shufflevector(r[4], r[5], 2, 10, 3, 11, 6, 14, 7, 15);
    vec t6 = __builtin_shufflevector(r[6], r[7], 0, 8, 1, 9, 4, 12, 5, 13);
    vec t7 = __builtin_shufflevector(r[6], r[7], 2, 10, 3, 11, 6, 14, 7, 15);
    vec u0 = __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13);
    vec u1 = __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
    vec u2 = __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13);
    vec u3 = __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
    vec u4 = __builtin_shufflevector(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13);
    vec u5 = __builtin_shufflevector(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
    vec u6 = __builtin_shufflevector(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13);
    vec u7 = __builtin_shufflevector(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
    vec o[8] = {__builtin_shufflevector(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11),
                __builtin_shufflevector(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11),
                __builtin_shufflevector(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11),
                __builtin_shufflevector(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11),
                __builtin_shufflevector(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15),
                __builtin_shufflevector(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15),
                __builtin_shufflevector(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15),
                __builtin_shufflevector(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15)};
    for (int i = 0; i < 8; ++i) std::memcpy(Y + (size_t)(j + i) * ldy, &o[i], sizeof(vec));
  }
}

// XT (Ep x Tp) = X (T x Ep) transposed
template <typename S>
static void transpose_rows(const S* R X, S* R XT, int T, int Ep, int Tp) {
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < Ep; ++j) XT[(size_t)j * Tp + t] = X[(size_t)t * Ep + j];
}
template <>
void transpose_rows<float>(const float* R X, float* R XT, int T, int Ep, int Tp) {
  int t = 0;
  for (; t + 8 <= T; t += 8) transpose8(X + (size_t)t * Ep, Ep, XT + t, Tp, Ep);
  for (; t < T; ++t)
    for (int j = 0; j < Ep; ++j) XT[(size_t)j * Tp + t] = X[(size_t)t * Ep + j];
}

// Head n's rows (T x Ep, zero padded): e = [c, s], k = e rotated by the drift, q = scale gate k, and
// gs = scale gate per phase; eT / kT (Ep x Tp) too when asked.
template <typename S>
static void features(const Args<S>& a, int n, int Ep, int Tp, S* e, S* k, S* R q, S* eT, S* kT, S* R gs) {
  const int b = n / a.H, h = n % a.H, P = a.P;
  const S* cn = a.c + (size_t)n * a.T * P;
  const S* sn = a.s + (size_t)n * a.T * P;
  for (int t = 0; t < a.T; ++t) {
    const S* R c = cn + (size_t)t * P;
    const S* R s = sn + (size_t)t * P;
    S* R er = e + (size_t)t * Ep; S* R kr = k + (size_t)t * Ep; S* R qr = q + (size_t)t * Ep;
    S* R gr = gs + (size_t)t * P;
    if (a.gate.p) {
      const S* R g = a.gate.row(b, h, t);
      if (a.G == 1) { const S g0 = a.scale * g[0]; for (int m = 0; m < P; ++m) gr[m] = g0; }
      else for (int m = 0; m < P; ++m) gr[m] = a.scale * g[m];
    } else {
      for (int m = 0; m < P; ++m) gr[m] = a.scale;
    }
    for (int m = 0; m < P; ++m) { er[m] = c[m]; er[P + m] = s[m]; }
    if (a.rc) {
      const S* R rc = a.rc + (size_t)t * P; const S* R rs = a.rs + (size_t)t * P;
      for (int m = 0; m < P; ++m) {
        kr[m] = c[m] * rc[m] - s[m] * rs[m];
        kr[P + m] = s[m] * rc[m] + c[m] * rs[m];
      }
    } else {
      for (int m = 0; m < P; ++m) { kr[m] = c[m]; kr[P + m] = s[m]; }
    }
    for (int m = 0; m < P; ++m) { qr[m] = gr[m] * kr[m]; qr[P + m] = gr[m] * kr[P + m]; }
  }
  if (eT) transpose_rows(e, eT, a.T, Ep, Tp);
  if (kT) transpose_rows(k, kT, a.T, Ep, Tp);
}

// softmax over row[0:U) (already biased), zeros on [U, Tp)
template <typename S>
static INL void softmax_row(S* R row, int U, int Tp) {
  const int W = V<S>::W;
  const int Uw = roundup(U, W);
  for (int u = U; u < Uw; ++u) row[u] = -INFINITY;
  S mx = row[0];
  for (int u = 1; u < U; ++u) mx = row[u] > mx ? row[u] : mx;
  for (int u = 0; u < Uw; ++u) row[u] -= mx;
  exp_nonpos(row, Uw);
  S sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int u = 0; u < Uw; ++u) sum += row[u];
  const S inv = S(1) / sum;
  for (int u = 0; u < Uw; ++u) row[u] *= inv;
  for (int u = Uw; u < Tp; ++u) row[u] = 0;
}

template <typename S>
static void forward_heads(const Args<S>& a, int n0, int n1) {
  const int T = a.T, P = a.P, E = 2 * P, W = V<S>::W;
  const int Tp = roundup(T, W), Ep = roundup(E, W);
  S* e = aligned<S>((size_t)T * Ep); S* k = aligned<S>((size_t)T * Ep); S* q = aligned<S>((size_t)T * Ep);
  S* kT = aligned<S>((size_t)Ep * Tp); S* O = aligned<S>((size_t)T * Ep); S* gs = aligned<S>((size_t)T * P);
  for (int n = n0; n < n1; ++n) {
    const int b = n / a.H, h = n % a.H;
    for (int t = 0; t < T; ++t)
      sincos_row(a.theta.row(b, h, t), a.c + ((size_t)n * T + t) * P, a.s + ((size_t)n * T + t) * P, P);
    features(a, n, Ep, Tp, e, k, q, (S*)nullptr, kT, gs);
    S* An = a.A + (size_t)n * T * Tp;
    gemm<S>(a.causal ? 3 : 0, T, E, Tp, q, Ep, kT, Tp, An, Tp);  // scores
    for (int t = 0; t < T; ++t) {
      S* R row = An + (size_t)t * Tp;
      const int U = a.causal ? t + 1 : T;
      if (a.bias) {
        const S* R br = a.bias + b * a.bias_sb + (size_t)t * T;
        for (int u = 0; u < U; ++u) row[u] += br[u];
      }
      softmax_row(row, U, Tp);
    }
    gemm<S>(a.causal ? 1 : 0, T, T, Ep, An, Tp, e, Ep, O, Ep);  // circular mean (C, S)
    S* R dl = a.delta + (size_t)n * T * P; S* R dt = a.dot + (size_t)n * T * P;
    for (int t = 0; t < T; ++t) {
      const S* R er = e + (size_t)t * Ep; const S* R orow = O + (size_t)t * Ep;
      S* R dlr = dl + (size_t)t * P; S* R dtr = dt + (size_t)t * P;
      for (int m = 0; m < P; ++m) {
        dlr[m] = er[m] * orow[P + m] - er[P + m] * orow[m];
        dtr[m] = er[m] * orow[m] + er[P + m] * orow[P + m];
      }
    }
  }
  std::free(e); std::free(k); std::free(q); std::free(kT); std::free(O); std::free(gs);
}

template <typename S>
static void backward_heads(const Args<S>& a, int n0, int n1) {
  const int T = a.T, P = a.P, E = 2 * P, W = V<S>::W;
  const int Tp = roundup(T, W), Ep = roundup(E, W);
  S* e = aligned<S>((size_t)T * Ep); S* k = aligned<S>((size_t)T * Ep); S* q = aligned<S>((size_t)T * Ep);
  S* eT = aligned<S>((size_t)Ep * Tp); S* gs = aligned<S>((size_t)T * P);
  S* dO = aligned<S>((size_t)T * Ep); S* D = aligned<S>((size_t)T * Tp); S* dQ = aligned<S>((size_t)T * Ep); S* dK = aligned<S>((size_t)T * Ep);
  S* dV = aligned<S>((size_t)T * Ep); S* rowsum = aligned<S>(T);
  for (int n = n0; n < n1; ++n) {
    features(a, n, Ep, Tp, e, k, q, eT, (S*)nullptr, gs);
    const S* An = a.A + (size_t)n * T * Tp;
    const S* g = a.grad + (size_t)n * T * P;
    const S* dl = a.delta + (size_t)n * T * P;
    for (int t = 0; t < T; ++t) {  // dO = g (-s, c); rowsum(dA A) = rowsum(dO O) = sum_m g delta
      const S* R er = e + (size_t)t * Ep; S* R r = dO + (size_t)t * Ep;
      const S* R gt = g + (size_t)t * P; const S* R dlt = dl + (size_t)t * P;
      S acc = 0;
      for (int m = 0; m < P; ++m) { r[m] = -er[P + m] * gt[m]; r[P + m] = er[m] * gt[m]; }
#pragma omp simd reduction(+ : acc)
      for (int m = 0; m < P; ++m) acc += gt[m] * dlt[m];
      rowsum[t] = acc;
    }
    gemm<S>(a.causal ? 3 : 0, T, E, Tp, dO, Ep, eT, Tp, D, Tp);  // dA
    for (int t = 0; t < T; ++t) {  // dS = A (dA - rowsum), zero past the causal range
      const S* R ar = An + (size_t)t * Tp; S* R dr = D + (size_t)t * Tp;
      const int Uw = a.causal ? std::min(Tp, roundup(t + 1, W)) : Tp;  // A is 0 on [t + 1, Uw)
      const S rs = rowsum[t];
      for (int u = 0; u < Uw; ++u) dr[u] = ar[u] * (dr[u] - rs);
      for (int u = Uw; u < Tp; ++u) dr[u] = 0;
    }
    gemm<S>(a.causal ? 1 : 0, T, T, Ep, D, Tp, k, Ep, dQ, Ep);
    gemm<S, true>(a.causal ? 2 : 0, T, T, Ep, D, Tp, q, Ep, dK, Ep);   // dS^T q
    gemm<S, true>(a.causal ? 2 : 0, T, T, Ep, An, Tp, dO, Ep, dV, Ep);  // A^T dO
    S* gth = a.gtheta + (size_t)n * T * P;
    const S* dt = a.dot + (size_t)n * T * P;
    for (int t = 0; t < T; ++t) {
      const S* R er = e + (size_t)t * Ep; const S* R kr = k + (size_t)t * Ep;
      const S* R qg = dQ + (size_t)t * Ep; const S* R kg = dK + (size_t)t * Ep; const S* R vg = dV + (size_t)t * Ep;
      const S* R gr = gs + (size_t)t * P; const S* R gt = g + (size_t)t * P; const S* R dtr = dt + (size_t)t * P;
      S* R out = gth + (size_t)t * P;
      for (int m = 0; m < P; ++m) {
        const S gkc = kg[m] + gr[m] * qg[m], gks = kg[P + m] + gr[m] * qg[P + m];
        out[m] = (er[m] * vg[P + m] - er[P + m] * vg[m]) + (kr[m] * gks - kr[P + m] * gkc) - gt[m] * dtr[m];
      }
      if (a.ggate && a.G > 1) {
        S* R gg = a.ggate + ((size_t)n * T + t) * P;
        for (int m = 0; m < P; ++m) gg[m] = a.scale * (qg[m] * kr[m] + qg[P + m] * kr[P + m]);
      } else if (a.ggate) {
        S acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int m = 0; m < P; ++m) acc += qg[m] * kr[m] + qg[P + m] * kr[P + m];
        a.ggate[(size_t)n * T + t] = a.scale * acc;
      }
    }
  }
  std::free(e); std::free(k); std::free(q); std::free(eT); std::free(gs); std::free(dO); std::free(D);
  std::free(dQ); std::free(dK); std::free(dV); std::free(rowsum);
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
                         const S* theta, const int64_t* tst, const S* gate, const int64_t* gst,
                         const S* rc, const S* rs, const S* bias, int64_t bias_sb, S* c, S* s,
                         S* delta, S* dot, S* A, const S* grad, S* gtheta, S* ggate) {
  Args<S> a;
  a.N = N; a.H = H; a.T = T; a.P = P; a.G = G; a.causal = causal; a.scale = (S)scale;
  a.theta = {theta, theta ? tst[0] : 0, theta ? tst[1] : 0, theta ? tst[2] : 0};
  a.gate = {gate, gate ? gst[0] : 0, gate ? gst[1] : 0, gate ? gst[2] : 0};
  a.rc = rc; a.rs = rs; a.bias = bias; a.bias_sb = bias_sb; a.c = c; a.s = s;
  a.delta = delta; a.dot = dot; a.A = A; a.grad = grad; a.gtheta = gtheta; a.ggate = ggate;
  return a;
}

#define EXPORT(S, SUF) \
extern "C" void kuramoto_forward_##SUF(int N, int H, int T, int P, int G, int causal, double scale, \
    const S* theta, const int64_t* tst, const S* gate, const int64_t* gst, const S* rc, const S* rs, \
    const S* bias, int64_t bias_sb, S* c, S* s, S* delta, S* dot, S* A, int threads) { \
  run<S, true>(make_args<S>(N, H, T, P, G, causal, scale, theta, tst, gate, gst, rc, rs, bias, bias_sb, \
                            c, s, delta, dot, A, nullptr, nullptr, nullptr), threads); } \
extern "C" void kuramoto_backward_##SUF(int N, int H, int T, int P, int G, int causal, double scale, \
    const S* gate, const int64_t* gst, const S* rc, const S* rs, const S* c, const S* s, \
    const S* delta, const S* dot, const S* A, const S* grad, S* gtheta, S* ggate, int threads) { \
  run<S, false>(make_args<S>(N, H, T, P, G, causal, scale, nullptr, nullptr, gate, gst, rc, rs, nullptr, 0, \
                             (S*)c, (S*)s, (S*)delta, (S*)dot, (S*)A, grad, gtheta, ggate), threads); }

EXPORT(float, f32)
EXPORT(double, f64)

// ---- the oscillator (paper A): the fused analytic p = 1 path ------------------------------------

// log u for u in [1, 2] (Cephes' logf)
static INL V<float>::v log_1_2(V<float>::v u) {
  typedef V<float>::v vec;
  vi8 big = u > 1.41421356f;
  vec x = big ? u * 0.5f : u;
  vec e = big ? vec{} + 1.0f : vec{};
  x = x - 1.0f;
  vec z = x * x;
  vec y = vec{} + 7.0376836292E-2f;
  y = y * x - 1.1514610310E-1f; y = y * x + 1.1676998740E-1f; y = y * x - 1.2420140846E-1f;
  y = y * x + 1.4249322787E-1f; y = y * x - 1.6668057665E-1f; y = y * x + 2.0000714765E-1f;
  y = y * x - 2.4999993993E-1f; y = y * x + 3.3333331174E-1f;
  y = y * x * z;
  y += e * -2.12194440e-4f;
  y += z * -0.5f;
  x = x + y;
  x += e * 0.693359375f;
  return x;
}

// s <- softplus(s), sl <- scale sigmoid(s) over W-aligned chunks (s = -inf: 0, 0)
static INL void softplus_slope(float* R s, float* R sl, int n, float scale) {
  typedef V<float>::v vec;
  for (int i = 0; i < n; i += 8) {
    vec x = *(vec*)(s + i);
    vec ax = x < 0 ? -x : x;
    vec y = exp_vec(-ax);  // exp(-|x|) in [0, 1]
    vec u = 1.0f + y;
    vec um1 = u - 1.0f;   // exact
    vec l1p = um1 == 0 ? y : log_1_2(u) * (y / (um1 == 0 ? vec{} + 1.0f : um1));  // log1p(y)
    *(vec*)(s + i) = (x > 0 ? x : vec{}) + l1p;
    vec inv = 1.0f / u;
    *(vec*)(sl + i) = (x >= 0 ? inv : y * inv) * scale;
  }
}
static INL void softplus_slope(double* R s, double* R sl, int n, double scale) {  // as torch
  for (int i = 0; i < n; ++i) {
    const double x = s[i];
    s[i] = x > 20.0 ? x : std::log1p(std::exp(x));
    sl[i] = scale / (1.0 + std::exp(-x));
  }
}

template <typename S>
struct OArgs {
  int N, H, T, K, d, causal;
  S scale, eps;
  Strided<S> q, k, v;                    // (B, H, T, K)
  const S* r; int64_t r_sh, r_st;         // (H, T, d) anchors
  const S* key_keep; const S* read_keep;  // (B, T) 1 / 0, null: every key
  S* out;                                 // (N, T, K)
  S* w; S* slope; S* A;                   // (N, T, Tp) saved
  S* z; S* norm; S* den;                  // (N, T, d), (N, T), (N, T) saved
  const S* gout;                          // (N, T, K)
  S* dq; S* dk; S* dv;                    // (N, T, K)
  S* dr;                                  // (H, T, d), accumulated over the batch
};

template <typename S>
static INL void load_rows(const Strided<S>& x, int b, int h, int T, int K, int Kp, S* R dst, S mul) {
  for (int t = 0; t < T; ++t) {
    const S* R src = x.row(b, h, t);
    S* R o = dst + (size_t)t * Kp;
    for (int j = 0; j < K; ++j) o[j] = mul * src[j];
  }
}

template <typename S>
static void osc_forward_heads(const OArgs<S>& a, int n0, int n1) {
  const int T = a.T, K = a.K, d = a.d, W = V<S>::W;
  const int Tp = roundup(T, W), Kp = roundup(K, W), dp = roundup(d, W);
  S* qb = aligned<S>((size_t)T * Kp); S* kb = aligned<S>((size_t)T * Kp); S* vb = aligned<S>((size_t)T * Kp);
  S* kT = aligned<S>((size_t)Kp * Tp); S* rb = aligned<S>((size_t)T * dp); S* rT = aligned<S>((size_t)dp * Tp);
  S* hb = aligned<S>((size_t)T * dp); S* ob = aligned<S>((size_t)T * Kp);
  int rh = -1;
  for (int n = n0; n < n1; ++n) {
    const int b = n / a.H, h = n % a.H;
    if (h != rh) {  // this head's anchors, rows and columns
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < d; ++j) rb[(size_t)t * dp + j] = a.r[h * a.r_sh + t * a.r_st + j];
      transpose_rows(rb, rT, T, dp, Tp);
      rh = h;
    }
    load_rows(a.q, b, h, T, K, Kp, qb, a.scale);
    load_rows(a.k, b, h, T, K, Kp, kb, S(1));
    load_rows(a.v, b, h, T, K, Kp, vb, S(1));
    transpose_rows(kb, kT, T, Kp, Tp);
    S* Wn = a.w + (size_t)n * T * Tp; S* Sl = a.slope + (size_t)n * T * Tp; S* An = a.A + (size_t)n * T * Tp;
    gemm<S>(a.causal ? 3 : 0, T, Kp, Tp, qb, Kp, kT, Tp, Wn, Tp);  // scale q k^T
    const S* kk = a.key_keep ? a.key_keep + (size_t)b * T : nullptr;
    const S* rk = a.read_keep ? a.read_keep + (size_t)b * T : nullptr;
    for (int t = 0; t < T; ++t) {
      S* R row = Wn + (size_t)t * Tp; S* R sl = Sl + (size_t)t * Tp;
      const int U = a.causal ? t + 1 : T, Uw = roundup(U, W);
      if (kk) for (int u = 0; u < U; ++u) if (kk[u] == 0) row[u] = -INFINITY;
      for (int u = U; u < Uw; ++u) row[u] = -INFINITY;
      softplus_slope(row, sl, Uw, a.scale);
      for (int u = Uw; u < Tp; ++u) { row[u] = 0; sl[u] = 0; }
    }
    gemm<S>(a.causal ? 1 : 0, T, T, dp, Wn, Tp, rb, dp, hb, dp);  // h = w r
    S* zn = a.z + (size_t)n * T * d; S* nn = a.norm + (size_t)n * T;
    for (int t = 0; t < T; ++t) {  // z = h / max(|h|, eps), in place (hb holds z from here)
      S* R hr = hb + (size_t)t * dp;
      S ss = 0;
      for (int j = 0; j < d; ++j) ss += hr[j] * hr[j];
      const S nrm = std::sqrt(ss), inv = S(1) / std::max(nrm, a.eps);
      for (int j = 0; j < d; ++j) { hr[j] *= inv; zn[(size_t)t * d + j] = hr[j]; }
      nn[t] = nrm;
    }
    gemm<S>(a.causal ? 3 : 0, T, dp, Tp, hb, dp, rT, Tp, An, Tp);  // z r^T
    S* dn = a.den + (size_t)n * T;
    for (int t = 0; t < T; ++t) {  // A = max(0, 1 + z.r) on the readout's keys, den = rowsum
      S* R row = An + (size_t)t * Tp;
      const int U = a.causal ? t + 1 : T;
      S sum = 0;
      if (rk) {
        for (int u = 0; u < U; ++u) { const S x = S(1) + row[u]; row[u] = x > 0 && rk[u] != 0 ? x : S(0); }
      } else {
        for (int u = 0; u < U; ++u) { const S x = S(1) + row[u]; row[u] = x > 0 ? x : S(0); }
      }
#pragma omp simd reduction(+ : sum)
      for (int u = 0; u < U; ++u) sum += row[u];
      for (int u = U; u < Tp; ++u) row[u] = 0;
      dn[t] = std::max(sum, S(1e-8));
    }
    gemm<S>(a.causal ? 1 : 0, T, T, Kp, An, Tp, vb, Kp, ob, Kp);  // A v
    S* on = a.out + (size_t)n * T * K;
    for (int t = 0; t < T; ++t) {
      const S inv = S(1) / dn[t];
      for (int j = 0; j < K; ++j) on[(size_t)t * K + j] = ob[(size_t)t * Kp + j] * inv;
    }
  }
  std::free(qb); std::free(kb); std::free(vb); std::free(kT); std::free(rb); std::free(rT); std::free(hb); std::free(ob);
}

template <typename S>
static void osc_backward_heads(const OArgs<S>& a, int n0, int n1, S* drloc) {
  const int T = a.T, K = a.K, d = a.d, W = V<S>::W;
  const int Tp = roundup(T, W), Kp = roundup(K, W), dp = roundup(d, W);
  S* qb = aligned<S>((size_t)T * Kp); S* kb = aligned<S>((size_t)T * Kp); S* vb = aligned<S>((size_t)T * Kp);
  S* vT = aligned<S>((size_t)Kp * Tp); S* rb = aligned<S>((size_t)T * dp); S* rT = aligned<S>((size_t)dp * Tp);
  S* gb = aligned<S>((size_t)T * Kp); S* zb = aligned<S>((size_t)T * dp); S* dzb = aligned<S>((size_t)T * dp);
  S* tmp = aligned<S>((size_t)T * std::max(Kp, dp)); S* D = aligned<S>((size_t)T * Tp); S* c = aligned<S>(T);
  int rh = -1;
  for (int n = n0; n < n1; ++n) {
    const int b = n / a.H, h = n % a.H;
    if (h != rh) {
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < d; ++j) rb[(size_t)t * dp + j] = a.r[h * a.r_sh + t * a.r_st + j];
      transpose_rows(rb, rT, T, dp, Tp);
      rh = h;
    }
    load_rows(a.q, b, h, T, K, Kp, qb, S(1));
    load_rows(a.k, b, h, T, K, Kp, kb, S(1));
    load_rows(a.v, b, h, T, K, Kp, vb, S(1));
    transpose_rows(vb, vT, T, Kp, Tp);
    const S* Wn = a.w + (size_t)n * T * Tp; const S* Sl = a.slope + (size_t)n * T * Tp;
    const S* An = a.A + (size_t)n * T * Tp;
    const S* on = a.out + (size_t)n * T * K; const S* go = a.gout + (size_t)n * T * K;
    const S* dn = a.den + (size_t)n * T; const S* nn = a.norm + (size_t)n * T; const S* zn = a.z + (size_t)n * T * d;
    S* drh = drloc + (size_t)h * T * dp;
    for (int t = 0; t < T; ++t) {  // g = dout / den, c = g.out
      const S inv = S(1) / dn[t];
      S acc = 0;
      for (int j = 0; j < K; ++j) {
        const S gj = go[(size_t)t * K + j] * inv;
        gb[(size_t)t * Kp + j] = gj;
        acc += gj * on[(size_t)t * K + j];
      }
      c[t] = acc;
      for (int j = 0; j < d; ++j) zb[(size_t)t * dp + j] = zn[(size_t)t * d + j];
    }
    gemm<S, true>(a.causal ? 2 : 0, T, T, Kp, An, Tp, gb, Kp, tmp, Kp);  // dv = A^T g
    S* dvn = a.dv + (size_t)n * T * K;
    for (int t = 0; t < T; ++t) for (int j = 0; j < K; ++j) dvn[(size_t)t * K + j] = tmp[(size_t)t * Kp + j];
    gemm<S>(a.causal ? 3 : 0, T, Kp, Tp, gb, Kp, vT, Tp, D, Tp);  // g v^T
    for (int t = 0; t < T; ++t) {  // dA = (g.v - c) where A > 0
      S* R dr = D + (size_t)t * Tp; const S* R ar = An + (size_t)t * Tp;
      const int Uw = a.causal ? std::min(Tp, roundup(t + 1, W)) : Tp;
      const S ct = c[t];
      for (int u = 0; u < Uw; ++u) dr[u] = ar[u] > 0 ? dr[u] - ct : S(0);
      for (int u = Uw; u < Tp; ++u) dr[u] = 0;
    }
    gemm<S>(a.causal ? 1 : 0, T, T, dp, D, Tp, rb, dp, dzb, dp);  // dz = dA r
    gemm<S, true>(a.causal ? 2 : 0, T, T, dp, D, Tp, zb, dp, tmp, dp);  // dA^T z
    for (size_t i = 0; i < (size_t)T * dp; ++i) drh[i] += tmp[i];
    for (int t = 0; t < T; ++t) {  // dh = (dz - z (z.dz) [|h| > eps]) / max(|h|, eps), in dzb
      S* R dz = dzb + (size_t)t * dp; const S* R z = zb + (size_t)t * dp;
      S rad = 0;
      for (int j = 0; j < d; ++j) rad += z[j] * dz[j];
      if (!(nn[t] > a.eps)) rad = 0;
      const S inv = S(1) / std::max(nn[t], a.eps);
      for (int j = 0; j < d; ++j) dz[j] = (dz[j] - z[j] * rad) * inv;
    }
    gemm<S>(a.causal ? 3 : 0, T, dp, Tp, dzb, dp, rT, Tp, D, Tp);  // dh r^T
    for (int t = 0; t < T; ++t) {  // ds = (dh.r) scale sigmoid(scores)
      S* R dr = D + (size_t)t * Tp; const S* R sl = Sl + (size_t)t * Tp;
      const int Uw = a.causal ? std::min(Tp, roundup(t + 1, W)) : Tp;
      for (int u = 0; u < Uw; ++u) dr[u] *= sl[u];
      for (int u = Uw; u < Tp; ++u) dr[u] = 0;
    }
    gemm<S>(a.causal ? 1 : 0, T, T, Kp, D, Tp, kb, Kp, tmp, Kp);  // dq = ds k
    S* dqn = a.dq + (size_t)n * T * K;
    for (int t = 0; t < T; ++t) for (int j = 0; j < K; ++j) dqn[(size_t)t * K + j] = tmp[(size_t)t * Kp + j];
    gemm<S, true>(a.causal ? 2 : 0, T, T, Kp, D, Tp, qb, Kp, tmp, Kp);  // dk = ds^T q
    S* dkn = a.dk + (size_t)n * T * K;
    for (int t = 0; t < T; ++t) for (int j = 0; j < K; ++j) dkn[(size_t)t * K + j] = tmp[(size_t)t * Kp + j];
    gemm<S, true>(a.causal ? 2 : 0, T, T, dp, Wn, Tp, dzb, dp, tmp, dp);  // w^T dh
    for (size_t i = 0; i < (size_t)T * dp; ++i) drh[i] += tmp[i];
  }
  std::free(qb); std::free(kb); std::free(vb); std::free(vT); std::free(rb); std::free(rT); std::free(gb);
  std::free(zb); std::free(dzb); std::free(tmp); std::free(D); std::free(c);
}

template <typename S, bool FWD>
static void osc_run(const OArgs<S>& a, int threads) {
  threads = std::max(1, std::min(threads, a.N));
  const int dp = roundup(a.d, V<S>::W);
  std::vector<S*> drloc(threads, nullptr);
  auto part = [&](int i) {
    const int n0 = (int)((int64_t)a.N * i / threads), n1 = (int)((int64_t)a.N * (i + 1) / threads);
    if (FWD) { osc_forward_heads(a, n0, n1); return; }
    drloc[i] = aligned<S>((size_t)a.H * a.T * dp);
    osc_backward_heads(a, n0, n1, drloc[i]);
  };
  if (threads == 1) part(0);
  else {
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i) pool.emplace_back(part, i);
    part(0);
    for (auto& th : pool) th.join();
  }
  if (FWD) return;
  for (int i = 0; i < threads; ++i) {
    for (int h = 0; h < a.H; ++h)
      for (int t = 0; t < a.T; ++t)
        for (int j = 0; j < a.d; ++j)
          a.dr[((size_t)h * a.T + t) * a.d + j] += drloc[i][((size_t)h * a.T + t) * dp + j];
    std::free(drloc[i]);
  }
}

template <typename S>
static OArgs<S> make_oargs(int N, int H, int T, int K, int d, int causal, double scale, double eps,
                           const S* q, const int64_t* qst, const S* k, const int64_t* kst, const S* v, const int64_t* vst,
                           const S* r, int64_t r_sh, int64_t r_st, const S* key_keep, const S* read_keep,
                           S* out, S* w, S* slope, S* A, S* z, S* norm, S* den,
                           const S* gout, S* dq, S* dk, S* dv, S* dr) {
  OArgs<S> a;
  a.N = N; a.H = H; a.T = T; a.K = K; a.d = d; a.causal = causal; a.scale = (S)scale; a.eps = (S)eps;
  a.q = {q, qst[0], qst[1], qst[2]}; a.k = {k, kst[0], kst[1], kst[2]}; a.v = {v, vst[0], vst[1], vst[2]};
  a.r = r; a.r_sh = r_sh; a.r_st = r_st; a.key_keep = key_keep; a.read_keep = read_keep;
  a.out = out; a.w = w; a.slope = slope; a.A = A; a.z = z; a.norm = norm; a.den = den;
  a.gout = gout; a.dq = dq; a.dk = dk; a.dv = dv; a.dr = dr;
  return a;
}

#define EXPORT_OSC(S, SUF) \
extern "C" void oscillator_forward_##SUF(int N, int H, int T, int K, int d, int causal, double scale, double eps, \
    const S* q, const int64_t* qst, const S* k, const int64_t* kst, const S* v, const int64_t* vst, \
    const S* r, int64_t r_sh, int64_t r_st, const S* key_keep, const S* read_keep, \
    S* out, S* w, S* slope, S* A, S* z, S* norm, S* den, int threads) { \
  osc_run<S, true>(make_oargs<S>(N, H, T, K, d, causal, scale, eps, q, qst, k, kst, v, vst, r, r_sh, r_st, \
                   key_keep, read_keep, out, w, slope, A, z, norm, den, nullptr, nullptr, nullptr, nullptr, nullptr), threads); } \
extern "C" void oscillator_backward_##SUF(int N, int H, int T, int K, int d, int causal, double scale, double eps, \
    const S* q, const int64_t* qst, const S* k, const int64_t* kst, const S* v, const int64_t* vst, \
    const S* r, int64_t r_sh, int64_t r_st, const S* out, const S* w, const S* slope, const S* A, const S* z, \
    const S* norm, const S* den, const S* gout, S* dq, S* dk, S* dv, S* dr, int threads) { \
  osc_run<S, false>(make_oargs<S>(N, H, T, K, d, causal, scale, eps, q, qst, k, kst, v, vst, r, r_sh, r_st, \
                    nullptr, nullptr, (S*)out, (S*)w, (S*)slope, (S*)A, (S*)z, (S*)norm, (S*)den, gout, dq, dk, dv, dr), threads); }

EXPORT_OSC(float, f32)
EXPORT_OSC(double, f64)
"""

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_P, _I64P = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)


def _flags() -> list[str]:
    flags = ["-O3", "-std=c++17", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared", "-pthread"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "oscillator-scaling", "kernels")


def _build(compiler: str, flags: list[str]) -> str:
    key = hashlib.sha256("\0".join([SOURCE, compiler, *flags]).encode()).hexdigest()[:16]
    path = os.path.join(_cache_dir(), f"attention_{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "attention.cpp"), os.path.join(tmp, "attention.so")
        with open(src, "w") as handle:
            handle.write(SOURCE)
        subprocess.run([compiler, *flags, src, "-o", out], check=True, capture_output=True, timeout=300)
        staged = f"{path}.{os.getpid()}.tmp"
        shutil.copyfile(out, staged)
        os.replace(staged, path)  # atomic: processes building at once each install a whole file
    return path


_off = [0]  # > 0 inside `pytorch_only()`


@contextlib.contextmanager
def pytorch_only():
    """The pure-PyTorch paths for the duration, even where the kernels build: for what must see every
    operation as torch ops (torch's FLOP counter, profilers, comparisons of the two paths)."""
    _off[0] += 1
    try:
        yield
    finally:
        _off[0] -= 1


def load() -> ctypes.CDLL | None:
    """The compiled kernels, built once per machine and source (cached under ~/.cache/oscillator-scaling);
    None when disabled (`SCALING_NATIVE_KERNELS=0`, or inside `pytorch_only()`), no C++ compiler is
    found, or the build fails."""
    global _lib, _tried
    if _off[0]:
        return None
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("SCALING_NATIVE_KERNELS", "1") == "0":
            return None
        compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
        if compiler is None:
            return None
        try:
            lib = ctypes.CDLL(_build(compiler, _flags()))
        except (OSError, subprocess.SubprocessError):
            return None
        shape = [ctypes.c_int] * 6 + [ctypes.c_double]
        for suffix in ("f32", "f64"):
            fwd = getattr(lib, f"kuramoto_forward_{suffix}")
            fwd.argtypes = shape + [_P, _I64P, _P, _I64P, _P, _P, _P, ctypes.c_int64] + [_P] * 5 + [ctypes.c_int]
            fwd.restype = None
            bwd = getattr(lib, f"kuramoto_backward_{suffix}")
            bwd.argtypes = shape + [_P, _I64P] + [_P] * 10 + [ctypes.c_int]
            bwd.restype = None
            ofwd = getattr(lib, f"oscillator_forward_{suffix}")
            oshape = [ctypes.c_int] * 6 + [ctypes.c_double] * 2 + [_P, _I64P] * 3 + [_P, ctypes.c_int64, ctypes.c_int64]
            ofwd.argtypes = oshape + [_P] * 9 + [ctypes.c_int]
            ofwd.restype = None
            obwd = getattr(lib, f"oscillator_backward_{suffix}")
            obwd.argtypes = oshape + [_P] * 12 + [ctypes.c_int]
            obwd.restype = None
        _lib = lib
        return lib


def padded_len(T: int, dtype: torch.dtype) -> int:
    """T rounded up to W lanes (the kernel's row length of the saved weights)."""
    w = 8 if dtype == torch.float32 else 4
    return (T + w - 1) // w * w


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
    or None, scale, causal (the kernel then skips the keys past each query). float32 / float64, CPU."""

    @staticmethod
    def forward(ctx, theta_BHTP, gate_BHTG, cos_TP, sin_TP, bias, scale, causal):
        lib = load()
        B, H, T, P = theta_BHTP.shape
        dtype = theta_BHTP.dtype
        theta, gate = _rows(theta_BHTP), _rows(gate_BHTG)
        G = 0 if gate is None else gate.shape[-1]
        if cos_TP is not None:
            cos_TP, sin_TP = (x.to(dtype).contiguous() for x in (cos_TP, sin_TP))
        bias_sb = 0
        if bias is not None:
            bias = bias.to(dtype).contiguous()
            bias_sb = 0 if bias.dim() == 2 else T * T
        c, s, delta, dot = (torch.empty(B, H, T, P, dtype=dtype) for _ in range(4))
        weights = torch.empty(B * H, T, padded_len(T, dtype), dtype=dtype)
        fwd = lib.kuramoto_forward_f32 if dtype == torch.float32 else lib.kuramoto_forward_f64
        fwd(B * H, H, T, P, G, int(causal), float(scale), _ptr(theta), _strides(theta), _ptr(gate), _strides(gate),
            _ptr(cos_TP), _ptr(sin_TP), _ptr(bias), bias_sb, _ptr(c), _ptr(s), _ptr(delta), _ptr(dot),
            _ptr(weights), torch.get_num_threads())
        ctx.save_for_backward(gate, cos_TP, sin_TP, c, s, delta, dot, weights)
        ctx.meta = (G, int(causal), float(scale))
        return delta

    @staticmethod
    def backward(ctx, g_delta_BHTP):
        gate, cos_TP, sin_TP, c, s, delta, dot, weights = ctx.saved_tensors
        G, causal, scale = ctx.meta
        B, H, T, P = c.shape
        dtype = c.dtype
        grad = g_delta_BHTP.to(dtype).contiguous()
        g_theta = torch.empty(B, H, T, P, dtype=dtype)
        g_gate = torch.empty(B, H, T, G, dtype=dtype) if gate is not None and ctx.needs_input_grad[1] else None
        lib = load()
        bwd = lib.kuramoto_backward_f32 if dtype == torch.float32 else lib.kuramoto_backward_f64
        bwd(B * H, H, T, P, G, causal, scale, _ptr(gate), _strides(gate), _ptr(cos_TP), _ptr(sin_TP), _ptr(c),
            _ptr(s), _ptr(delta), _ptr(dot), _ptr(weights), _ptr(grad), _ptr(g_theta), _ptr(g_gate),
            torch.get_num_threads())
        return g_theta, g_gate, None, None, None, None, None


class NativeOscillator(torch.autograd.Function):
    """`oscillator._DenseOscillator` (the analytic p = 1 oscillator over (T, T) tensors) on the compiled
    kernel: w = softplus(q k^T / sqrt K) on allowed keys, h = w r, z = h / max(|h|, eps),
    A = max(0, 1 + z r^T) on the readout's keys, out = A v / rowsum(A). Inputs: q, k, v (B, H, T, K),
    anchors r (H, T, d), `key_keep_BT` (float 1 / 0: the coupling's keys) and `read_keep_BT` (the
    readout's) or None, causal, eps. Saves w, sigmoid(scores) and A, so backward has no transcendental."""

    @staticmethod
    def forward(ctx, q_BHTK, k_BHTK, v_BHTK, r_HTd, key_keep_BT, read_keep_BT, causal, eps):
        lib = load()
        B, H, T, K = q_BHTK.shape
        d = r_HTd.shape[-1]
        dtype = q_BHTK.dtype
        q, k, v, r = (_rows(x) for x in (q_BHTK, k_BHTK, v_BHTK, r_HTd))
        key_keep, read_keep = (None if x is None else x.to(dtype).contiguous() for x in (key_keep_BT, read_keep_BT))
        Tp = padded_len(T, dtype)
        out = torch.empty(B, H, T, K, dtype=dtype)
        w, slope, weights = (torch.empty(B * H, T, Tp, dtype=dtype) for _ in range(3))
        z = torch.empty(B * H, T, d, dtype=dtype)
        norm, den = torch.empty(B * H, T, dtype=dtype), torch.empty(B * H, T, dtype=dtype)
        fwd = lib.oscillator_forward_f32 if dtype == torch.float32 else lib.oscillator_forward_f64
        fwd(B * H, H, T, K, d, int(causal), K ** -0.5, float(eps), _ptr(q), _strides(q), _ptr(k), _strides(k),
            _ptr(v), _strides(v), _ptr(r), r.stride(0), r.stride(1), _ptr(key_keep), _ptr(read_keep), _ptr(out),
            _ptr(w), _ptr(slope), _ptr(weights), _ptr(z), _ptr(norm), _ptr(den), torch.get_num_threads())
        ctx.save_for_backward(q, k, v, r, out, w, slope, weights, z, norm, den)
        ctx.meta = (int(causal), float(eps))
        return out

    @staticmethod
    def backward(ctx, g_out_BHTK):
        q, k, v, r, out, w, slope, weights, z, norm, den = ctx.saved_tensors
        causal, eps = ctx.meta
        B, H, T, K = q.shape
        dtype = q.dtype
        grad = g_out_BHTK.to(dtype).contiguous()
        dq, dk, dv = (torch.empty(B, H, T, K, dtype=dtype) for _ in range(3))
        dr = torch.zeros(r.shape, dtype=dtype)
        lib = load()
        bwd = lib.oscillator_backward_f32 if dtype == torch.float32 else lib.oscillator_backward_f64
        bwd(B * H, H, T, K, r.shape[-1], causal, K ** -0.5, eps, _ptr(q), _strides(q), _ptr(k), _strides(k),
            _ptr(v), _strides(v), _ptr(r), r.stride(0), r.stride(1), _ptr(out), _ptr(w), _ptr(slope), _ptr(weights),
            _ptr(z), _ptr(norm), _ptr(den), _ptr(grad), _ptr(dq), _ptr(dk), _ptr(dv), _ptr(dr), torch.get_num_threads())
        return dq, dk, dv, dr, None, None, None, None
