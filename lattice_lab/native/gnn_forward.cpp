// The whole direct-force GNN (lattice_lab.models.gnn) in one call: F = net(Q) - k Q - kappa nn_sum(Q).
// Called by lattice_lab.native.gnn through ctypes.
//
// Layer l (1 .. nl): h_l = act(h_{l-1} W_self + nn_sum(h_{l-1}) (s W_nn) + b), h_0 = (Q - q_mean) / q_std,
// F = f_std h_nl + f_mean - k Q - kappa nn_sum(Q), no activation after the last layer.
//
// Layout: one lattice row of a layer's features is stored sites-last, channel c at row[c * ld + P + x]
// (P = one vector of lanes, so site 0 is aligned), with the periodic wrap in the pads:
// row[c * ld + P - 1] = site L - 1 and row[c * ld + P + L] = site 0. Sites are the SIMD lanes; a layer
// row is computed from three input rows (up, mid, down), the left / right neighbours are unaligned
// loads at x - 1 / x + 1 of the mid row. Lanes past L compute garbage (from a zeroed workspace) that
// no real site reads: a real site's only neighbour there is the pad at P + L, rewritten after every row.
//
// Order of work (no halo recomputation, no whole-lattice intermediates): the rows are split into
// nc chunks [a, b) (one per thread, each >= 2 nl rows).
//  Phase 1, per chunk, a wavefront: layer l computes rows [a + l, b - l) (everything that needs no
//   row of another chunk); at step s layer l computes row a + s - l, so each layer only keeps a ring
//   of its last 3 rows (plus its first 2 rows, which the previous chunk's seam needs).
//  Phase 2 (after one barrier), per seam b between two chunks, layer by layer: layer l computes the
//   2 l rows [b - l, b + l) from the seam's own rows of layer l - 1 and the 2 + 2 rows the two chunks
//   left (their last rows in the ring, their first rows in the head).
// Every row of every layer is computed exactly once; the features in flight per thread are
// ~5 rows per layer (L2 sized up to L ~ 1000 for gnn_small). One OpenMP parallel region per call,
// one barrier per configuration (and one between configurations of a batch). A batch of B >= nt
// configurations instead gives each thread whole configurations (nc = 1), without barriers, for its
// first B - B mod nt configurations (the rest row-parallel).
//
// The neighbour sum is (up + down) + (left + right): the same rounding under all D4 operations, so the
// kernel is exactly (bitwise) D4- and translation-equivariant. relu is written y < 0 ? 0 : y so that
// a NaN input stays NaN (divergence detection relies on it).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

using namespace ll;

namespace {

enum Act { ACT_IDENTITY = 0, ACT_RELU = 1, ACT_TANH = 2, ACT_SILU = 3, ACT_SOFTPLUS = 4 };
// dims = [nl, act, w_0, ..., w_nl, then per layer: sk, sc, packed chunk (0: the parameters' own memory)]
enum { D_NL = 0, D_ACT = 1, D_W0 = 2 };
// ptrs = [q_mean, q_std, f_mean, f_std, then per layer w_self [c_in][c_out], w_nn [c_in][c_out], bias [c_out]]
enum { S_QM = 0, S_QS = 1, S_FM = 2, S_FS = 3, S_HEAD = 4 };
constexpr int NB_MAX = 8;  // vector blocks of sites per pass (narrow outputs)
// Output channels per register chunk at most: 16 with AVX-512 (16 accumulators of one vector of sites in
// its 32 vector registers), 8 with 16 registers (AVX2, SSE: 8 outputs x 2 vectors of sites read each
// weight twice; 16 x 1 spilled its accumulators to the stack and was 10-25% slower, docs/bench.md).
constexpr int KC_MAX = LL_VBYTES >= 64 ? 16 : 8;

template <typename R>
struct Traits;
template <>
struct Traits<float> {
  static constexpr int log_terms = 6;  // log1p series: relative error < 1e-9
};
template <>
struct Traits<double> {
  static constexpr int log_terms = 12;  // < 1e-18
};

template <typename R>
inline typename Vec<R>::V load(const R* p) {
  typename Vec<R>::V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename R>
inline void store(R* p, typename Vec<R>::V v) {
  std::memcpy(p, &v, sizeof v);
}

// log1p(t) for t in [0, 1] (and NaN): 2 atanh(z) by its odd series, z = t / (2 + t) for t <= sqrt 2 - 1,
// else ln 2 + 2 atanh((t - 1) / (t + 3)); |z| <= 0.1716 either way.
template <typename R>
inline typename Vec<R>::V vlog1p_unit(typename Vec<R>::V t) {
  typedef typename Vec<R>::V V;
  const auto big = t > R(0.41421356237309503);
  const V z = big ? (t - R(1)) / (t + R(3)) : t / (t + R(2));
  const V z2 = z * z;
  V p = (V){} + R(1) / (2 * Traits<R>::log_terms + 1);
  for (int j = Traits<R>::log_terms - 1; j >= 0; --j) p = p * z2 + R(1) / (2 * j + 1);
  const V off = big ? (V){} + R(0.6931471805599453) : (V){};
  return off + R(2) * z * p;
}

template <typename R, int ACT>
inline typename Vec<R>::V activate(typename Vec<R>::V y) {
  typedef typename Vec<R>::V V;
  if (ACT == ACT_RELU) return y < 0 ? (V){} : y;  // NaN stays NaN
  if (ACT == ACT_TANH) return vtanh<R>(y);
  if (ACT == ACT_SILU) return y * vsigmoid<R>(y);
  if (ACT == ACT_SOFTPLUS) {  // torch: y > 20 ? y : log1p(exp(y)) = max(y, 0) + log1p(exp(-|y|))
    const V a = y < 0 ? -y : y;
    const V s = (y < 0 ? (V){} : y) + vlog1p_unit<R>(vexp<R>(-a));
    return y > R(20) ? y : s;
  }
  return y;
}

// One output row of one layer: out[k][x] = act(b[k] + sum_c mid[c][x] Ws[c][k] + s nsum[c][x] Wn[c][k]),
// KC output channels at a time in registers, NB vector blocks of sites at once (more independent
// accumulators for narrow outputs; SPLIT: separate self / neighbour accumulators when there are few, so
// that the latency of the multiply-add chains does not limit; chosen once per layer for its widest NB,
// so that every site of a row is summed in the same order: the same rounding at every site, which makes
// the kernel exactly equivariant).
// Weight (c, k) at Ws + (k0 * sk + c * sc + k) for output chunk k0 (self) and the same from Wn (neighbour):
// the parameters' own memory [c_in][c_out] (sk = 1, sc = c_out) or a copy packed per chunk of KC outputs,
// [c_out / KC][c_in][2][KC] (sk = 2 c_in, sc = 2 KC: one contiguous stream; used for wide layers, whose
// weights do not stay in L2 and would otherwise be read with a stride of c_out).
template <typename R, int KC, int NB, int ACT, bool SPLIT>
void row_blocks(const R* up, const R* mid, const R* dn, R* out, int64_t ld, int64_t x_begin, int64_t x_end,
                int64_t c_in, int64_t c_out, const R* Ws, const R* Wn, int64_t sk, int64_t sc, const R* bias,
                R scale, typename Vec<R>::V* nbuf) {
  typedef typename Vec<R>::V V;
  constexpr int N = sizeof(V) / sizeof(R);
  for (int64_t x0 = x_begin; x0 + NB * N <= x_end; x0 += NB * N) {
    for (int64_t c = 0; c < c_in; ++c) {
      const int64_t o = c * ld + x0;
      for (int j = 0; j < NB; ++j) {
        const int64_t p = o + j * N;
        nbuf[c * NB + j] = scale * ((load(up + p) + load(dn + p)) + (load(mid + p - 1) + load(mid + p + 1)));
      }
    }
    for (int64_t k0 = 0; k0 < c_out; k0 += KC) {
      V acc[NB][KC], acc2[NB][KC];
      for (int j = 0; j < NB; ++j)
        for (int k = 0; k < KC; ++k) {
          acc[j][k] = (V){} + bias[k0 + k];
          if (SPLIT) acc2[j][k] = (V){};
        }
      for (int64_t c = 0; c < c_in; ++c) {
        const R* ws = Ws + k0 * sk + c * sc;
        const R* wn = Wn + k0 * sk + c * sc;
        V m[NB];
        for (int j = 0; j < NB; ++j) m[j] = load(mid + c * ld + x0 + j * N);
        for (int k = 0; k < KC; ++k) {
          const R a = ws[k], b = wn[k];
          for (int j = 0; j < NB; ++j) {
            if (SPLIT) {
              acc[j][k] += m[j] * a;
              acc2[j][k] += nbuf[c * NB + j] * b;
            } else {
              acc[j][k] += m[j] * a + nbuf[c * NB + j] * b;
            }
          }
        }
      }
      for (int j = 0; j < NB; ++j)
        for (int k = 0; k < KC; ++k) {
          const V y = SPLIT ? acc[j][k] + acc2[j][k] : acc[j][k];
          store(out + (k0 + k) * ld + x0 + j * N, activate<R, ACT>(y));
        }
    }
  }
}

// the vector blocks [x, x_end) of a row, NB at a time, the rest with fewer
template <typename R, int KC, int NB, int ACT, bool SPLIT>
void row_tail(const R* up, const R* mid, const R* dn, R* out, int64_t ld, int64_t x, int64_t x_end,
              int64_t c_in, int64_t c_out, const R* Ws, const R* Wn, int64_t sk, int64_t sc, const R* bias,
              R scale, typename Vec<R>::V* nbuf) {
  constexpr int N = sizeof(typename Vec<R>::V) / sizeof(R);
  row_blocks<R, KC, NB, ACT, SPLIT>(up, mid, dn, out, ld, x, x_end, c_in, c_out, Ws, Wn, sk, sc, bias, scale, nbuf);
  if constexpr (NB > 1) {
    x += (x_end - x) / (NB * N) * (NB * N);
    row_tail<R, KC, NB / 2, ACT, SPLIT>(up, mid, dn, out, ld, x, x_end, c_in, c_out, Ws, Wn, sk, sc, bias, scale, nbuf);
  }
}

template <typename R, int KC, int ACT>
void layer_row_kc(const R* up, const R* mid, const R* dn, R* out, int64_t ld, int64_t L, int64_t c_in,
                  int64_t c_out, const R* Ws, const R* Wn, int64_t sk, int64_t sc, const R* bias, R scale,
                  typename Vec<R>::V* nbuf) {
  constexpr int N = sizeof(typename Vec<R>::V) / sizeof(R);
  constexpr int NB = 16 / KC < NB_MAX ? 16 / KC : NB_MAX;
  constexpr bool SPLIT = KC * NB <= 8;
  const int64_t n_vec = (L + N - 1) / N;
  row_tail<R, KC, NB, ACT, SPLIT>(up, mid, dn, out, ld, N, N + n_vec * N, c_in, c_out, Ws, Wn, sk, sc, bias, scale, nbuf);
}

// output channels per register chunk of a layer read in the parameters' own layout
inline int64_t out_chunk(int64_t c_out) {
  for (int64_t kc : {16, 8, 4, 2}) if (kc <= KC_MAX && c_out % kc == 0) return kc;
  return 1;
}

template <typename R, int ACT>
void layer_row_act(const R* up, const R* mid, const R* dn, R* out, int64_t ld, int64_t L, int64_t c_in,
                   int64_t c_out, const R* Ws, const R* Wn, int64_t sk, int64_t sc, int64_t kc, const R* bias,
                   R scale, typename Vec<R>::V* nbuf) {
#define LL_ROW(KC) layer_row_kc<R, KC, ACT>(up, mid, dn, out, ld, L, c_in, c_out, Ws, Wn, sk, sc, bias, scale, nbuf)
  switch (kc) {
    case 16: LL_ROW(16); break;
    case 8: LL_ROW(8); break;
    case 4: LL_ROW(4); break;
    case 2: LL_ROW(2); break;
    default: LL_ROW(1); break;
  }
#undef LL_ROW
}

template <typename R>
struct Net {
  typedef typename Vec<R>::V V;
  static constexpr int N = sizeof(V) / sizeof(R);
  int64_t nl, act, L, ld, nc;
  const int64_t* w;       // widths [nl + 1]
  R qm, qs, fm, fs;       // input / output normalisation
  const R* ws[64];        // per layer 1 .. nl: self weight, neighbour weight, their strides, bias
  const R* wn[64];
  int64_t sk[64], sc[64], kc[64];  // kc: output channels per register chunk
  const R* bias[64];
  R scale, k, kappa;      // neighbour weight of the aggregation (1 or 1/4), elastic constants
  // workspace of one chunk
  int64_t chunk_elems;
  int64_t off_ring[64], off_head[64], off_seam[64], off_tmp, off_nbuf;
  R* work;

  void plan(const int64_t* dims, const R* const* ptrs, int64_t L_, int64_t nc_) {
    nl = dims[D_NL];
    act = dims[D_ACT];
    w = dims + D_W0;
    L = L_;
    nc = nc_;
    ld = N + (L + N - 1) / N * N + N;
    if (ptrs) {
      qm = *ptrs[S_QM];
      qs = *ptrs[S_QS];
      fm = *ptrs[S_FM];
      fs = *ptrs[S_FS];
      for (int64_t l = 1; l <= nl; ++l) {
        ws[l] = ptrs[S_HEAD + 3 * (l - 1)];
        wn[l] = ptrs[S_HEAD + 3 * (l - 1) + 1];
        bias[l] = ptrs[S_HEAD + 3 * (l - 1) + 2];
      }
    }
    for (int64_t l = 1; l <= nl; ++l) {
      sk[l] = dims[D_W0 + nl + 1 + 3 * (l - 1)];
      sc[l] = dims[D_W0 + nl + 1 + 3 * (l - 1) + 1];
      const int64_t kcp = dims[D_W0 + nl + 1 + 3 * (l - 1) + 2];
      kc[l] = kcp ? kcp : out_chunk(w[l]);
    }
    int64_t o = 0, cmax = 1;
    for (int64_t l = 0; l < nl; ++l) {
      off_ring[l] = o;
      o += 3 * w[l] * ld;
      off_head[l] = o;
      o += 2 * w[l] * ld;
      off_seam[l] = o;
      o += 2 * l * w[l] * ld;
      cmax = std::max(cmax, w[l]);
    }
    off_tmp = o;
    o += ld;
    off_nbuf = o;
    o += NB_MAX * cmax * N;
    chunk_elems = o;
  }

  R* chunk_base(int64_t c) const { return work + c * chunk_elems; }
  int64_t chunk_start(int64_t c) const { return c * L / nc; }
  int64_t chunk_rows(int64_t c) const { return chunk_start(c + 1) - chunk_start(c); }

  // row i (relative to the chunk start) of layer l computed in phase 1 by chunk c: i in [l, m - l)
  R* phase1_row(int64_t c, int64_t l, int64_t i) const {
    R* base = chunk_base(c);
    const int64_t j = i - l;
    if (j < 2) return base + off_head[l] + j * w[l] * ld;
    return base + off_ring[l] + (i % 3) * w[l] * ld;
  }

  void fix_pads(R* row, int64_t channels) const {
    for (int64_t c = 0; c < channels; ++c) {
      R* r = row + c * ld + N;
      r[-1] = r[L - 1];
      r[L] = r[0];
    }
  }

  void input_row(const R* Qb, int64_t r, R* out) const {
    const R* q = Qb + r * L;
    R* o = out + N;
    for (int64_t x = 0; x < L; ++x) o[x] = (q[x] - qm) / qs;
    o[-1] = o[L - 1];
    o[L] = o[0];
  }

  void layer_row(int64_t l, const R* up, const R* mid, const R* dn, R* out, R* nbuf_r) const {
    V* nbuf = reinterpret_cast<V*>(nbuf_r);
    const int64_t ci = w[l - 1], co = w[l];
    const int a = l == nl ? ACT_IDENTITY : int(act);
#define LL_ACT(A) \
  layer_row_act<R, A>(up, mid, dn, out, ld, L, ci, co, ws[l], wn[l], sk[l], sc[l], kc[l], bias[l], scale, nbuf)
    switch (a) {
      case ACT_RELU: LL_ACT(ACT_RELU); break;
      case ACT_TANH: LL_ACT(ACT_TANH); break;
      case ACT_SILU: LL_ACT(ACT_SILU); break;
      case ACT_SOFTPLUS: LL_ACT(ACT_SOFTPLUS); break;
      default: LL_ACT(ACT_IDENTITY); break;
    }
#undef LL_ACT
    if (l < nl) fix_pads(out, co);
  }

  // F row r (mod L) from the last layer's output row y (padded)
  void output_row(const R* Qb, R* Fb, int64_t r, const R* yrow) const {
    r = ((r % L) + L) % L;
    const R* y = yrow + N;
    const R* q = Qb + r * L;
    const R* qu = Qb + ((r + L - 1) % L) * L;
    const R* qd = Qb + ((r + 1) % L) * L;
    R* f = Fb + r * L;
    auto site = [&](int64_t x, R left, R right) {
      const R nn = (qu[x] + qd[x]) + (left + right);
      f[x] = (y[x] * fs + fm) + (-k * q[x] - kappa * nn);
    };
    site(0, q[L - 1], q[1]);
    for (int64_t x = 1; x < L - 1; ++x) site(x, q[x - 1], q[x + 1]);
    site(L - 1, q[L - 2], q[0]);
  }

  void phase1(const R* Qb, R* Fb, int64_t c) const {
    const int64_t a = chunk_start(c), m = chunk_rows(c);
    R* base = chunk_base(c);
    R* tmp = base + off_tmp;
    R* nbuf = base + off_nbuf;
    for (int64_t s = 0; s < m; ++s) {
      input_row(Qb, a + s, phase1_row(c, 0, s));
      for (int64_t l = 1; l <= nl; ++l) {
        const int64_t i = s - l;
        if (i < l || i >= m - l) continue;
        const R* up = phase1_row(c, l - 1, i - 1);
        const R* mid = phase1_row(c, l - 1, i);
        const R* dn = phase1_row(c, l - 1, i + 1);
        if (l < nl) {
          layer_row(l, up, mid, dn, phase1_row(c, l, i), nbuf);
        } else {
          layer_row(l, up, mid, dn, tmp, nbuf);
          output_row(Qb, Fb, a + i, tmp);
        }
      }
    }
  }

  // seam between chunk c and chunk c + 1 (mod nc), at row b = start of chunk c + 1
  const R* seam_input(int64_t c, int64_t l, int64_t d) const {  // layer l, row b + d
    const int64_t cn = (c + 1) % nc;
    if (l >= 1 && d >= -l && d < l) return chunk_base(c) + off_seam[l] + (d + l) * w[l] * ld;
    if (d < 0) return phase1_row(c, l, chunk_rows(c) + d);
    return phase1_row(cn, l, d);
  }

  void phase2(const R* Qb, R* Fb, int64_t c) const {
    const int64_t b = chunk_start(c) + chunk_rows(c);
    R* base = chunk_base(c);
    R* tmp = base + off_tmp;
    R* nbuf = base + off_nbuf;
    for (int64_t l = 1; l <= nl; ++l) {
      for (int64_t d = -l; d < l; ++d) {
        const R* up = seam_input(c, l - 1, d - 1);
        const R* mid = seam_input(c, l - 1, d);
        const R* dn = seam_input(c, l - 1, d + 1);
        if (l < nl) {
          layer_row(l, up, mid, dn, base + off_seam[l] + (d + l) * w[l] * ld, nbuf);
        } else {
          layer_row(l, up, mid, dn, tmp, nbuf);
          output_row(Qb, Fb, b + d, tmp);
        }
      }
    }
  }
};

template <typename R>
int64_t n_chunks(const int64_t* dims, int64_t L, int64_t nt) {
  const int64_t most = L / (2 * dims[D_NL]);
  return std::max<int64_t>(1, std::min<int64_t>(nt, most));
}

template <typename R>
int64_t workspace(const int64_t* dims, int64_t L, int64_t nt) {
  const int64_t nl = dims[D_NL];
  if (nl < 1 || nl >= 64 || L < 2 * nl + 1) return -1;
  for (int64_t l = 1; l <= nl; ++l) {  // a packed layer's chunk: one the kernel has, dividing c_out
    const int64_t kcp = dims[D_W0 + nl + 1 + 3 * (l - 1) + 2];
    if (kcp != 0 && (kcp & (kcp - 1) || kcp > 16 || dims[D_W0 + l] % kcp)) return -1;
  }
  Net<R> net;
  net.plan(dims, nullptr, L, n_chunks<R>(dims, L, nt));
  return std::max<int64_t>(1, nt) * net.chunk_elems;  // nt chunks: one per thread for whole configurations
}

struct Args {  // the per-(model, L, threads) arguments, prepared once by the Python side
  int64_t L, nt, n_work;
  void* work;
  const int64_t* dims;
  const void* const* ptrs;
  double scale;
};

template <typename R>
int forward(const R* Q, R* F, int64_t B, const Args* args, double k, double kappa) {
  const int64_t L = args->L, nt = args->nt;
  const int64_t* dims = args->dims;
  const int64_t need = workspace<R>(dims, L, nt);
  if (need < 0) return 1;
  if (args->n_work < need) return 2;
  Net<R> net;
  net.plan(dims, reinterpret_cast<const R* const*>(args->ptrs), L, n_chunks<R>(dims, L, nt));
  net.scale = R(args->scale);
  net.work = static_cast<R*>(args->work);
  net.k = R(k);
  net.kappa = R(kappa);
  const int64_t nc = net.nc, LL = L * L;
  // Batches: whole configurations, one per thread at a time (one chunk each, its seam is the periodic
  // wrap: no barrier), for the largest multiple of nt; the rest row-parallel, one barrier per step.
  // Every row is computed by the same code either way, so the forces are bitwise the same.
  const int64_t B_whole = nt > 1 ? B / nt * nt : 0;
  const int team = int(B_whole > 0 ? nt : std::min(nt, nc));
#pragma omp parallel num_threads(team) if (team > 1)
  {
    const int64_t t = omp_get_thread_num(), nth = omp_get_num_threads();
    if (B_whole > 0) {
      Net<R> own = net;
      own.nc = 1;
      own.work = net.work + t * net.chunk_elems;
      for (int64_t bi = t; bi < B_whole; bi += nth) {
        own.phase1(Q + bi * LL, F + bi * LL, 0);
        own.phase2(Q + bi * LL, F + bi * LL, 0);
      }
      if (B_whole < B) {  // the row-parallel rest reuses the chunks
#pragma omp barrier
      }
    }
    for (int64_t bi = B_whole; bi < B; ++bi) {
      for (int64_t c = t; c < nc; c += nth) net.phase1(Q + bi * LL, F + bi * LL, c);
#pragma omp barrier
      for (int64_t c = t; c < nc; c += nth) net.phase2(Q + bi * LL, F + bi * LL, c);
      if (bi + 1 < B) {  // the next configuration overwrites the rings the seams read
#pragma omp barrier
      }
    }
  }
  return 0;
}

}  // namespace

extern "C" {
int64_t ll_gnn_max_chunk() { return KC_MAX; }  // the widest packed chunk worth using on this CPU
int64_t ll_gnn_workspace_f32(const int64_t* dims, int64_t L, int64_t nt) { return workspace<float>(dims, L, nt); }
int64_t ll_gnn_workspace_f64(const int64_t* dims, int64_t L, int64_t nt) { return workspace<double>(dims, L, nt); }
int ll_gnn_forces_f32(const float* Q, float* F, int64_t B, const Args* args, double k, double kappa) {
  return forward<float>(Q, F, B, args, k, kappa);
}
int ll_gnn_forces_f64(const double* Q, double* F, int64_t B, const Args* args, double k, double kappa) {
  return forward<double>(Q, F, B, args, k, kappa);
}
}
