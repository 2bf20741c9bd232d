// The whole ENN force field in one call (lattice_lab.native.enn): Q [B, L, L] -> F [B, L, L].
//
// The sites of the batch (flat index s = (b * L + x) * L + y) are cut into tiles of at most `tile`
// sites, spread over an OpenMP team (torch's own, see build.py). Per tile, everything stays in the
// thread's scratch (~0.1-0.3 MB, cache-resident):
//   1. gather the environment G[m][t] = Q[b, x + dx_m, y + dy_m] (periodic) for the offsets m used;
//   2. project on the packed, normalised input rows: X[r][t] = pbias[r] + sum_{e in row r} pcoef[e] G[poff[e]][t]
//      (the ENN's environment convolution as a sparse table: every irrep channel lives on one orbit);
//   3. every quadratic layer (quadratic_layer.h, fused tanh) and the readout, sites-last;
//   4. F = out_scale * y + out_shift - k Q - kappa (sum of the 4 nearest neighbours of Q).
// The same function as ENN.compute_forces (+ the elastic prior when k, kappa are given); only the order
// of floating-point sums differs.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "quadratic_layer.h"

namespace {

enum { L_DIMS, L_GROUPS, L_TERMS, L_COPIES, L_W, L_WC, L_BIAS, L_COEFS, L_STRIDE };
enum { S_OUT_SCALE, S_OUT_SHIFT, S_K, S_KAPPA, S_EPS };

inline int64_t wrap(int64_t v, int64_t L) { return v < 0 ? v + L : (v >= L ? v - L : v); }

template <typename R>
int enn_forces(const R* Q, int64_t B, int64_t L, R* F, int64_t n_off, const int64_t* off, int64_t rows_in,
               const int64_t* prow, const int64_t* poff, const R* pcoef, const R* pbias, int64_t n_layers,
               void* const* tables, const double* scalars, int64_t tile, int nthreads) {
  const int64_t N = B * L * L, LL = L * L;
  if (N <= 0) return 0;
  if (tile < 1 || n_layers < 1) return 3;
  int64_t width = rows_in;  // widest feature buffer (rows x padded channels) of any layer
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* d = static_cast<const int64_t*>(tables[l * L_STRIDE + L_DIMS]);
    const int64_t a = d[ll::D_RIN] * d[ll::D_CP], b = d[ll::D_ROUT] * d[ll::D_KP];
    width = a > width ? a : width;
    width = b > width ? b : width;
  }
  const R out_scale = R(scalars[S_OUT_SCALE]), out_shift = R(scalars[S_OUT_SHIFT]);
  const R k = R(scalars[S_K]), kappa = R(scalars[S_KAPPA]), eps = R(scalars[S_EPS]);
  const int64_t n_tiles = (N + tile - 1) / tile;
  int status = 0;
#pragma omp parallel num_threads(nthreads)
  {
    // scratch of this thread: gathered environment, two feature buffers, site coordinates
    const size_t bytes = sizeof(R) * (size_t(n_off) + 2 * size_t(width)) * size_t(tile) + 3 * sizeof(int64_t) * size_t(tile);
    char* scratch = static_cast<char*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64));
    if (!scratch) {
#pragma omp atomic write
      status = 2;
    }
#pragma omp for schedule(static)
    for (int64_t ti = 0; ti < n_tiles; ++ti) {
      if (!scratch) continue;
      R* G = reinterpret_cast<R*>(scratch);
      R* X = G + n_off * tile;
      R* Y = X + width * tile;
      int64_t* base = reinterpret_cast<int64_t*>(Y + width * tile);
      int64_t* xs = base + tile;
      int64_t* ys = xs + tile;
      const int64_t s0 = ti * tile, n = N - s0 < tile ? N - s0 : tile;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t s = s0 + t, b = s / LL, r = s - b * LL;
        base[t] = b * LL;
        xs[t] = r / L;
        ys[t] = r - xs[t] * L;
      }
      for (int64_t m = 0; m < n_off; ++m) {  // 1. environment
        const int64_t dx = off[2 * m], dy = off[2 * m + 1];
        R* g = G + m * tile;
        for (int64_t t = 0; t < n; ++t) g[t] = Q[base[t] + wrap(xs[t] + dx, L) * L + wrap(ys[t] + dy, L)];
      }
      for (int64_t r = 0; r < rows_in; ++r) {  // 2. packed normalised input rows
        R* x = X + r * tile;
        const R b0 = pbias[r];
        for (int64_t t = 0; t < n; ++t) x[t] = b0;
        for (int64_t e = prow[r]; e < prow[r + 1]; ++e) {
          const R c = pcoef[e];
          const R* g = G + poff[e] * tile;
          for (int64_t t = 0; t < n; ++t) x[t] += c * g[t];
        }
      }
      for (int64_t l = 0; l < n_layers; ++l) {  // 3. layers and readout
        void* const* tb = tables + l * L_STRIDE;
        const int rc = ll::dispatch<R>(X, tile, Y, tile, n, static_cast<const int64_t*>(tb[L_DIMS]),
                                       static_cast<const int64_t*>(tb[L_GROUPS]), static_cast<const int64_t*>(tb[L_TERMS]),
                                       static_cast<const int64_t*>(tb[L_COPIES]), static_cast<const R*>(tb[L_W]),
                                       static_cast<const R*>(tb[L_WC]), static_cast<const R*>(tb[L_BIAS]),
                                       static_cast<const R*>(tb[L_COEFS]), eps);
        if (rc) {
#pragma omp atomic write
          status = rc;
        }
        R* tmp = X;
        X = Y;
        Y = tmp;
      }
      for (int64_t t = 0; t < n; ++t) {  // 4. force scale and elastic force
        const int64_t x = xs[t], y = ys[t], row = base[t] + x * L;
        const R nn = Q[base[t] + wrap(x + 1, L) * L + y] + Q[base[t] + wrap(x - 1, L) * L + y] +
                     Q[row + wrap(y + 1, L)] + Q[row + wrap(y - 1, L)];
        F[s0 + t] = out_scale * X[t] + out_shift - k * Q[row + y] - kappa * nn;
      }
    }
    std::free(scratch);
  }
  return status;
}

}  // namespace

extern "C" {
int ll_enn_forces_f32(const float* Q, int64_t B, int64_t L, float* F, int64_t n_off, const int64_t* off,
                      int64_t rows_in, const int64_t* prow, const int64_t* poff, const float* pcoef, const float* pbias,
                      int64_t n_layers, void* const* tables, const double* scalars, int64_t tile, int nthreads) {
  return enn_forces<float>(Q, B, L, F, n_off, off, rows_in, prow, poff, pcoef, pbias, n_layers, tables, scalars,
                           tile, nthreads);
}
int ll_enn_forces_f64(const double* Q, int64_t B, int64_t L, double* F, int64_t n_off, const int64_t* off,
                      int64_t rows_in, const int64_t* prow, const int64_t* poff, const double* pcoef,
                      const double* pbias, int64_t n_layers, void* const* tables, const double* scalars, int64_t tile,
                      int nthreads) {
  return enn_forces<double>(Q, B, L, F, n_off, off, rows_in, prow, poff, pcoef, pbias, n_layers, tables, scalars,
                            tile, nthreads);
}
}
