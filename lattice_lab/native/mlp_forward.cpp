// The whole descriptor + MLP force field (lattice_lab.models.mlp.DescriptorMLP) in one call, for CPU
// inference: lattice_lab.native.mlp builds the plan and calls ll_mlp_forces_f32 / _f64 through ctypes.
//
//   F = MLP((descriptor(Q) - feat_mean) / feat_std) * out_scale + out_shift - k Q - kappa nn_sum(Q)
//
// Every site is independent, so the lattice is cut into *slots* of N consecutive sites of one row
// (N = SIMD lanes: 16 floats / 8 doubles with AVX-512; the last slot of a row may hold fewer sites,
// its extra lanes compute periodic copies and are not stored) and TS consecutive slots form a tile
// (TS a multiple of TV; the plan's choice: TV for mlp_small). One OpenMP region runs the tiles (static
// schedule); a tile goes through the whole model in a per-thread scratch buffer (17 kB for mlp_small:
// L1), sites as SIMD lanes, features sites-last (X[channel * TS + slot] is one vector):
//
//   1. gather: per slot, the 2R+1 periodic rows [j0 - R, j0 + N + R) around it (R = environment radius);
//   2. projection: irrep channel c = sum_e coef[e] Q(site + offset[e]) over the non-zeros of the
//      EnvironmentProjection kernel of channel c (213 for sqrt(13)), one unaligned load per non-zero;
//   3. descriptor: A1 coefficients, sqrt(y^2 + eps_n) and y y_ref / (sqrt(y_ref^2 + eps_n) + eps_p) for
//      A2, B1, B2, and for E the amplitude and the two phases v . r_k / (|r_k| + eps_p) (D4Descriptor);
//   4. MLP: hidden layers as register-blocked small matmuls, KO outputs x TV slots of accumulators
//      (weights pre-arranged as [out / KO][in][KO] and broadcast from memory, each block reused for
//      all slots of the tile), ReLU written so that NaN propagates; the feature standardisation is
//      folded into the first layer's weights by the Python side, hidden widths are zero-padded to a
//      multiple of KO;
//   5. the width-1 output layer, out_scale / out_shift and the elastic force, stored.
//
// The result equals the torch path up to the order of floating-point sums.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "simd.h"

#ifndef LL_MLP_KO  // hidden-layer outputs per accumulator block: KO x TV accumulators in registers
#if LL_VBYTES == 64
#define LL_MLP_KO 8  // 32 vector registers; 8 x 2 measured fastest (AVX-512, float32 and float64)
#else
#define LL_MLP_KO 4  // AVX2: 16 vector registers
#endif
#endif
#ifndef LL_MLP_TV
#define LL_MLP_TV 2  // slots (vectors of sites) per accumulator block
#endif

namespace {

constexpr int KO = LL_MLP_KO;
constexpr int TV = LL_MLP_TV;

// plan (int64) layout, filled by lattice_lab.native.mlp.MLPForces
enum {
  P_M, P_RADIUS, P_NENT, P_DYDX, P_CHPTR, P_COEF,   // projection: channels, radius, non-zeros, tables
  P_NA1, P_SA1,                                    // A1 count, start
  P_1D,                                            // 3 x (start, count, ref) for A2, B1, B2
  P_SE = P_1D + 9, P_NE, P_RE1, P_RE2,             // E start, doublets, the two reference doublets
  P_NFEAT, P_NLAYERS, P_LAYERS, P_W, P_SCAL,       // features, layers table [nl][4], weights, scalars
  P_ROWS_A, P_ROWS_B, P_KO, P_TV, P_TS, P_SIZE  // TS: slots per tile (a multiple of TV)
};
enum { L_NIN, L_NOUT, L_WOFF, L_BOFF, L_STRIDE };
enum { S_NORM_EPS, S_PHASE_EPS, S_SCALE, S_SHIFT };

template <typename R>
struct Plan {
  typedef typename Vec<R>::V V;
  int64_t M, radius, n_entries, na1, sa1, one_d[9], se, ne, re1, re2, nfeat, nlayers, rows_a, rows_b, ts;
  const int64_t* chptr;
  const int64_t* layers;
  const R* coef;
  const R* W;
  R norm_eps, phase_eps, scale, shift;
  std::vector<int64_t> offset;  // per non-zero: its position in a slot's row buffer
};

template <typename R>
inline typename Vec<R>::V loadu(const R* p) {
  typename Vec<R>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[o][v] = act(b[o] + sum_i w[o][i] in[i][v]) for o < nout (a multiple of K) and slots v < ns (a
// multiple of TV); rows of in / out hold ld slots. Per block of K outputs its weights (nin x K, from
// L1 / L2) are reused for every group of TV slots of the tile.
template <typename R, int K>
inline void dense(const typename Vec<R>::V* in, int64_t nin, const R* w, const R* b, int64_t nout,
                  typename Vec<R>::V* out, bool relu, int64_t ns, int64_t ld) {
  typedef typename Vec<R>::V V;
  for (int64_t o = 0; o < nout; o += K) {
    const R* wo = w + o * nin;  // block [o / K][i][K]
    for (int64_t v0 = 0; v0 < ns; v0 += TV) {
      V acc[K][TV];
      for (int k = 0; k < K; ++k)
        for (int v = 0; v < TV; ++v) acc[k][v] = (V){} + b[o + k];
      const V* x = in + v0;
      for (int64_t i = 0; i < nin; ++i, x += ld) {
        for (int k = 0; k < K; ++k) {
          const R wk = wo[i * K + k];
          for (int v = 0; v < TV; ++v) acc[k][v] += wk * x[v];
        }
      }
      for (int k = 0; k < K; ++k)
        for (int v = 0; v < TV; ++v) {
          V y = acc[k][v];
          if (relu) y = y < R(0) ? (V){} : y;  // max(y, 0) that keeps NaN (the comparison is false)
          out[(o + k) * ld + v0 + v] = y;
        }
    }
  }
}

struct Scratch {  // one per thread (torch's OpenMP team is persistent): grown, never shrunk
  void* p = nullptr;
  size_t n = 0;
  ~Scratch() { std::free(p); }
  void* get(size_t bytes) {
    if (bytes > n) {
      std::free(p);
      bytes = (bytes + 63) / 64 * 64;
      p = std::aligned_alloc(64, bytes);
      n = p ? bytes : 0;
    }
    return p;
  }
};
thread_local Scratch scratch;

template <typename R>
void run_tile(const Plan<R>& P, const R* Q, R* F, int64_t B, int64_t L, int64_t tile, R* rows,
              typename Vec<R>::V* A, typename Vec<R>::V* Bv, R mk, R kappa) {
  typedef typename Vec<R>::V V;
  constexpr int N = sizeof(V) / sizeof(R);
  const int64_t rad = P.radius, H = 2 * rad + 1, RS = N + 2 * rad, SS = H * RS, ld = P.ts;
  const int64_t spr = (L + N - 1) / N, nslots = B * L * spr, first = tile * ld;
  const int64_t valid = nslots - first < ld ? nslots - first : ld;
  const int64_t ns = (valid + TV - 1) / TV * TV;  // slots computed (a multiple of TV; extras not stored)
  // 1. gather the periodic rows around every slot
  for (int64_t v = 0; v < ns; ++v) {
    const int64_t s = first + (v < valid ? v : valid - 1);
    const int64_t b = s / (L * spr), rem = s % (L * spr), i = rem / spr, j0 = rem % spr * N;
    R* rv = rows + v * SS;
    const int64_t j = j0 - rad;
    const bool inside = j >= 0 && j + RS <= L;
    int64_t jw = j % L;  // first column, wrapped
    if (jw < 0) jw += L;
    int64_t r = (i - rad) % L;
    if (r < 0) r += L;
    for (int64_t dy = 0; dy < H; ++dy, r = r + 1 == L ? 0 : r + 1) {
      const R* src = Q + (b * L + r) * L;
      R* dst = rv + dy * RS;
      if (inside) {
        std::memcpy(dst, src + j, sizeof(R) * RS);
      } else {  // periodic: contiguous pieces up to the end of the row (several when L < RS)
        int64_t p = 0, jj = jw;
        while (p < RS) {
          const int64_t n = L - jj < RS - p ? L - jj : RS - p;
          std::memcpy(dst + p, src + jj, sizeof(R) * n);
          p += n;
          jj = 0;
        }
      }
    }
  }
  // 2. projection onto the irrep channels: X = Bv [M][ld]
  V* X = Bv;
  for (int64_t c = 0; c < P.M; ++c) {
    for (int64_t v0 = 0; v0 < ns; v0 += TV) {
      V acc[TV];
      for (int v = 0; v < TV; ++v) acc[v] = (V){};
      for (int64_t e = P.chptr[c]; e < P.chptr[c + 1]; ++e) {
        const R w = P.coef[e];
        const R* src = rows + v0 * SS + P.offset[e];
        for (int v = 0; v < TV; ++v) acc[v] += w * loadu<R>(src + v * SS);
      }
      for (int v = 0; v < TV; ++v) X[c * ld + v0 + v] = acc[v];
    }
  }
  // 3. invariant features: A [nfeat][ld]
  const R ne = P.norm_eps, pe = P.phase_eps;
  for (int64_t v = 0; v < ns; ++v) {
    int64_t f = 0;
    for (int64_t c = 0; c < P.na1; ++c) A[(f + c) * ld + v] = X[(P.sa1 + c) * ld + v];
    f += P.na1;
    for (int g = 0; g < 3; ++g) {
      const int64_t s = P.one_d[3 * g], n = P.one_d[3 * g + 1], ref = P.one_d[3 * g + 2];
      if (!n) continue;
      const V yr = X[(s + ref) * ld + v];
      const V inv = R(1) / (ll::vsqrt<R>(yr * yr + ne) + pe);
      for (int64_t c = 0; c < n; ++c) {
        const V y = X[(s + c) * ld + v];
        A[(f + c) * ld + v] = ll::vsqrt<R>(y * y + ne);
        A[(f + n + c) * ld + v] = y * yr * inv;
      }
      f += 2 * n;
    }
    if (P.ne) {
      const int64_t s = P.se, n = P.ne;
      const V r1a = X[(s + 2 * P.re1) * ld + v], r1b = X[(s + 2 * P.re1 + 1) * ld + v];
      const V r2a = X[(s + 2 * P.re2) * ld + v], r2b = X[(s + 2 * P.re2 + 1) * ld + v];
      const V inv1 = R(1) / (ll::vsqrt<R>(r1a * r1a + r1b * r1b + ne) + pe);
      const V inv2 = R(1) / (ll::vsqrt<R>(r2a * r2a + r2b * r2b + ne) + pe);
      for (int64_t c = 0; c < n; ++c) {
        const V a = X[(s + 2 * c) * ld + v], bb = X[(s + 2 * c + 1) * ld + v];
        A[(f + c) * ld + v] = ll::vsqrt<R>(a * a + bb * bb + ne);
        A[(f + n + 2 * c) * ld + v] = (a * r1a + bb * r1b) * inv1;
        A[(f + n + 2 * c + 1) * ld + v] = (a * r2a + bb * r2b) * inv2;
      }
    }
  }
  // 4. hidden layers, ping-pong A -> Bv -> A ...
  V* in = A;
  V* out = Bv;
  const int64_t nl = P.nlayers;
  for (int64_t l = 0; l + 1 < nl; ++l) {
    const int64_t* lt = P.layers + l * L_STRIDE;
    dense<R, KO>(in, lt[L_NIN], P.W + lt[L_WOFF], P.W + lt[L_BOFF], lt[L_NOUT], out, true, ns, ld);
    V* t = in;
    in = out;
    out = t;
  }
  // 5. output layer (width 1) into the free buffer, then scale, shift and the elastic force
  const int64_t* lt = P.layers + (nl - 1) * L_STRIDE;
  dense<R, 1>(in, lt[L_NIN], P.W + lt[L_WOFF], P.W + lt[L_BOFF], 1, out, false, ns, ld);
  for (int64_t v = 0; v < valid; ++v) {
    const int64_t s = first + v;
    const int64_t b = s / (L * spr), rem = s % (L * spr), i = rem / spr, j0 = rem % spr * N;
    const int64_t m = L - j0 < N ? L - j0 : N;
    const R* c = rows + v * SS + rad * RS + rad;  // the slot's own sites
    const V q = loadu<R>(c);
    const V nn = ((loadu<R>(c - RS) + loadu<R>(c + RS)) + loadu<R>(c - 1)) + loadu<R>(c + 1);
    const V net = out[v] * P.scale + P.shift;
    const V tot = net + (mk * q - kappa * nn);
    std::memcpy(F + (b * L + i) * L + j0, &tot, sizeof(R) * m);
  }
}

template <typename R>
int forces(const R* Q, R* F, int64_t B, int64_t L, const int64_t* plan, double k, double kappa, int64_t nt) {
  typedef typename Vec<R>::V V;
  constexpr int N = sizeof(V) / sizeof(R);
  if (plan[P_KO] != KO || plan[P_TV] != TV || plan[P_TS] < TV || plan[P_TS] % TV) return 3;
  if (B <= 0 || L <= 0) return 0;
  Plan<R> P;
  P.M = plan[P_M];
  P.radius = plan[P_RADIUS];
  P.n_entries = plan[P_NENT];
  P.na1 = plan[P_NA1];
  P.sa1 = plan[P_SA1];
  for (int g = 0; g < 9; ++g) P.one_d[g] = plan[P_1D + g];
  P.se = plan[P_SE];
  P.ne = plan[P_NE];
  P.re1 = plan[P_RE1];
  P.re2 = plan[P_RE2];
  P.nfeat = plan[P_NFEAT];
  P.nlayers = plan[P_NLAYERS];
  P.rows_a = plan[P_ROWS_A];
  P.rows_b = plan[P_ROWS_B];
  P.ts = plan[P_TS];
  P.chptr = reinterpret_cast<const int64_t*>(plan[P_CHPTR]);
  P.layers = reinterpret_cast<const int64_t*>(plan[P_LAYERS]);
  P.coef = reinterpret_cast<const R*>(plan[P_COEF]);
  P.W = reinterpret_cast<const R*>(plan[P_W]);
  const double* scal = reinterpret_cast<const double*>(plan[P_SCAL]);
  P.norm_eps = R(scal[S_NORM_EPS]);
  P.phase_eps = R(scal[S_PHASE_EPS]);
  P.scale = R(scal[S_SCALE]);
  P.shift = R(scal[S_SHIFT]);
  if (P.nlayers < 1 || P.radius < 1) return 4;
  const int64_t rad = P.radius, H = 2 * rad + 1, RS = N + 2 * rad, SS = H * RS;
  const int64_t* dydx = reinterpret_cast<const int64_t*>(plan[P_DYDX]);
  P.offset.resize(P.n_entries);
  for (int64_t e = 0; e < P.n_entries; ++e) P.offset[e] = (dydx[2 * e] + rad) * RS + dydx[2 * e + 1] + rad;
  const int64_t spr = (L + N - 1) / N, nslots = B * L * spr, ntiles = (nslots + P.ts - 1) / P.ts;
  const size_t rows_bytes = ((sizeof(R) * P.ts * SS + 63) / 64) * 64;
  const size_t bytes = rows_bytes + sizeof(V) * P.ts * (P.rows_a + P.rows_b);
  const R mk = R(-k), kap = R(kappa);
  int64_t threads = nt < ntiles ? nt : ntiles;
  if (threads < 1) threads = 1;
  int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    char* buf = static_cast<char*>(scratch.get(bytes));
    if (!buf) {
#pragma omp atomic write
      failed = 1;
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < ntiles; ++t) {
      if (!buf) continue;
      R* rows = reinterpret_cast<R*>(buf);
      V* A = reinterpret_cast<V*>(buf + rows_bytes);
      run_tile<R>(P, Q, F, B, L, t, rows, A, A + P.ts * P.rows_a, mk, kap);
    }
  }
  return failed ? 2 : 0;
}

}  // namespace

extern "C" {
int ll_mlp_forces_f32(const float* Q, float* F, int64_t B, int64_t L, const int64_t* plan, double k, double kappa,
                      int64_t nt) {
  return forces<float>(Q, F, B, L, plan, k, kappa, nt);
}
int ll_mlp_forces_f64(const double* Q, double* F, int64_t B, int64_t L, const int64_t* plan, double k,
                      double kappa, int64_t nt) {
  return forces<double>(Q, F, B, L, plan, k, kappa, nt);
}
int ll_mlp_block(void) { return KO; }   // hidden widths are padded to a multiple of this
int ll_mlp_group(void) { return TV; }   // slots per accumulator block (tiles hold a multiple)
int ll_mlp_vector_bytes(void) { return LL_VBYTES; }
}
