// Fused CPU kernel of one quadratic irrep layer of the ENN (lattice_lab.native.quadratic).
//
// Features are stored sites-last: X[(row * cp + i) * ldx + site], Y[(row * kp + k) * ldy + site].
// Sites are the SIMD lanes: a block of N sites (one vector register) is copied into a local buffer and
// every output is accumulated in registers, so no intermediate ever leaves the core. Per output irrep
// group (d = 1 or 2 components, output rows r0 .. r0 + d) and chunk of KC output channels:
//
//   y[g][k] = bias[r0+g][k] + sum_i Wc[r0+g][i][k] x[copy_row][i]
//   kind 0 (one left component a, shared by the d output components):
//     T[k] = sum_{i < imax(j)} W[j][i][k] x[lr][i]            (imax = j for a == b, pairs i < j)
//     y[g][k] += (zc[g] x[zr[g]][j]) T[k]                        for every j < cb
//   kind 1 (E x E -> one-dimensional irrep, two left components, d = 1):
//     p = c0 x[l0][i] x[r0][j] + c1 x[l1][i] x[r1][j]           (pairs i < j)
//     y[0][k] += W[i][j][k] p
//
// With act = 1 the layer's tanh activation is applied before the store: tanh(y) on one-dimensional
// irreps and v tanh(|v|) / |v| (|v| = sqrt(v0^2 + v1^2 + eps)) on E, tanh(y) evaluated as
// copysign(1 - 2 / (exp(2|y|) + 1), y) like layers_equivariant.odd_tanh.
//
// This is exactly the layer of QuadraticIrrepLayer (same weights, Clebsch-Gordan coefficients folded
// into zc / c); only the order of the floating-point sums differs.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "simd.h"

namespace ll {

// table layouts (int64): dims, groups [G][4], terms [T][9], copies [Rout][2]
enum { D_RIN, D_CP, D_ROUT, D_KP, D_KC, D_G, D_ACT, D_NDIMS };
enum { G_D, G_R0, G_T0, G_T1, G_STRIDE };
enum { T_KIND, T_TRI, T_CA, T_CB, T_WOFF, T_P0, T_P1, T_P2, T_P3, T_STRIDE };

template <typename R, int KC>
void run_block(const typename Vec<R>::V* xv, typename Vec<R>::V* yv, const int64_t* dims, const int64_t* groups,
               const int64_t* terms, const int64_t* copies, const R* W, const R* Wc, const R* bias,
               const R* coefs, R eps) {
  typedef typename Vec<R>::V V;
  const int64_t cp = dims[D_CP], kp = dims[D_KP], n_groups = dims[D_G], act = dims[D_ACT];
  for (int64_t gi = 0; gi < n_groups; ++gi) {
    const int64_t* g = groups + gi * G_STRIDE;
    const int64_t d = g[G_D], r0 = g[G_R0];
    for (int64_t kc = 0; kc < kp; kc += KC) {
      const int64_t chunk = kc / KC;
      V y0[KC], y1[KC];
      for (int k = 0; k < KC; ++k) {
        y0[k] = (V){} + bias[r0 * kp + kc + k];
        y1[k] = (V){} + (d == 2 ? bias[(r0 + 1) * kp + kc + k] : R(0));
      }
      for (int64_t c = 0; c < d; ++c) {  // copies of the same irrep component
        const int64_t row = copies[2 * (r0 + c)], cnt = copies[2 * (r0 + c) + 1];
        const R* w = Wc + (r0 + c) * cp * kp + kc;
        V* y = c ? y1 : y0;
        for (int64_t i = 0; i < cnt; ++i) {
          const V x = xv[row * cp + i];
          for (int k = 0; k < KC; ++k) y[k] += x * w[i * kp + k];
        }
      }
      for (int64_t t = g[G_T0]; t < g[G_T1]; ++t) {
        const int64_t* tm = terms + t * T_STRIDE;
        const int64_t tri = tm[T_TRI], ca = tm[T_CA], cb = tm[T_CB];
        const R c0 = coefs[2 * t], c1 = coefs[2 * t + 1];
        if (tm[T_KIND] == 0) {
          const R* w = W + tm[T_WOFF] + chunk * cb * ca * KC;
          const V* xl = xv + tm[T_P0] * cp;
          const V* z0 = xv + tm[T_P1] * cp;
          const V* z1 = xv + (d == 2 ? tm[T_P2] : tm[T_P1]) * cp;
          for (int64_t j = 0; j < cb; ++j) {
            const int64_t imax = tri ? (j < ca ? j : ca) : ca;
            const R* wj = w + j * ca * KC;
            V T[KC];
            for (int k = 0; k < KC; ++k) T[k] = (V){};
            for (int64_t i = 0; i < imax; ++i) {
              const V x = xl[i];
              for (int k = 0; k < KC; ++k) T[k] += x * wj[i * KC + k];
            }
            const V za = z0[j] * c0;
            for (int k = 0; k < KC; ++k) y0[k] += za * T[k];
            if (d == 2) {
              const V zb = z1[j] * c1;
              for (int k = 0; k < KC; ++k) y1[k] += zb * T[k];
            }
          }
        } else {
          const R* w = W + tm[T_WOFF] + chunk * ca * cb * KC;
          const V* l0 = xv + tm[T_P0] * cp;
          const V* q0 = xv + tm[T_P1] * cp;
          const V* l1 = xv + tm[T_P2] * cp;
          const V* q1 = xv + tm[T_P3] * cp;
          for (int64_t i = 0; i < ca; ++i) {
            const V a0 = l0[i] * c0, a1 = l1[i] * c1;
            const R* wi = w + i * cb * KC;
            for (int64_t j = tri ? i + 1 : 0; j < cb; ++j) {
              const V p = a0 * q0[j] + a1 * q1[j];
              for (int k = 0; k < KC; ++k) y0[k] += p * wi[j * KC + k];
            }
          }
        }
      }
      if (act == 1) {
        for (int k = 0; k < KC; ++k) {
          if (d == 2) {
            const V norm = vsqrt<R>(y0[k] * y0[k] + y1[k] * y1[k] + eps);
            const V f = vtanh<R>(norm) / norm;
            y0[k] *= f;
            y1[k] *= f;
          } else {
            y0[k] = vtanh<R>(y0[k]);
          }
        }
      }
      for (int k = 0; k < KC; ++k) {
        yv[r0 * kp + kc + k] = y0[k];
        if (d == 2) yv[(r0 + 1) * kp + kc + k] = y1[k];
      }
    }
  }
}

template <typename R, int KC>
int run_layer(const R* X, int64_t ldx, R* Y, int64_t ldy, int64_t n, const int64_t* dims, const int64_t* groups,
              const int64_t* terms, const int64_t* copies, const R* W, const R* Wc, const R* bias, const R* coefs, R eps) {
  typedef typename Vec<R>::V V;
  const int N = sizeof(V) / sizeof(R);
  const int64_t rows_in = dims[D_RIN] * dims[D_CP], rows_out = dims[D_ROUT] * dims[D_KP];
  V* xv = static_cast<V*>(std::aligned_alloc(sizeof(V), sizeof(V) * (rows_in + rows_out)));
  if (!xv) return 2;
  V* yv = xv + rows_in;
  for (int64_t s0 = 0; s0 < n; s0 += N) {
    const int64_t m = n - s0 < N ? n - s0 : N;
    if (m == N) {
      for (int64_t q = 0; q < rows_in; ++q) std::memcpy(&xv[q], X + q * ldx + s0, sizeof(V));
    } else {  // last partial block: zero lanes beyond the sites
      std::memset(xv, 0, sizeof(V) * rows_in);
      for (int64_t q = 0; q < rows_in; ++q) std::memcpy(&xv[q], X + q * ldx + s0, sizeof(R) * m);
    }
    run_block<R, KC>(xv, yv, dims, groups, terms, copies, W, Wc, bias, coefs, eps);
    if (m == N) {  // a constant size: one vector store (a variable one compiles to rep movs, ~20 cycles)
      for (int64_t q = 0; q < rows_out; ++q) std::memcpy(Y + q * ldy + s0, &yv[q], sizeof(V));
    } else {
      for (int64_t q = 0; q < rows_out; ++q) std::memcpy(Y + q * ldy + s0, &yv[q], sizeof(R) * m);
    }
  }
  std::free(xv);
  return 0;
}

template <typename R>
int dispatch(const R* X, int64_t ldx, R* Y, int64_t ldy, int64_t n, const int64_t* dims, const int64_t* groups,
             const int64_t* terms, const int64_t* copies, const R* W, const R* Wc, const R* bias, const R* coefs,
             R eps) {
  switch (dims[D_KC]) {
    case 8: return run_layer<R, 8>(X, ldx, Y, ldy, n, dims, groups, terms, copies, W, Wc, bias, coefs, eps);
    case 4: return run_layer<R, 4>(X, ldx, Y, ldy, n, dims, groups, terms, copies, W, Wc, bias, coefs, eps);
    case 2: return run_layer<R, 2>(X, ldx, Y, ldy, n, dims, groups, terms, copies, W, Wc, bias, coefs, eps);
    case 1: return run_layer<R, 1>(X, ldx, Y, ldy, n, dims, groups, terms, copies, W, Wc, bias, coefs, eps);
    default: return 1;
  }
}

}  // namespace ll
