// Forces F = -dE/dQ of the energy-based graph network (lattice_lab.models.gnn_energy.EnergyGNN, SiLU
// activation) in one call: the forward pass and a hand-written backward pass, called by
// lattice_lab.native.gnn_energy through ctypes.
//
// Tiles. The lattices are cut into tiles of own sites (rows r0 .. r0+h, columns c0 .. c0+w of one
// lattice); a tile that spans all L rows (columns) is periodic in that direction, otherwise it carries
// a halo of `nb` rows (columns) on each side: nb = blocks = the reach of a site energy. A tile computes
// the site energies of its own sites only and the gradient of their sum on all its sites, halo
// included: own sites are written to F, halo sites to the tile's part of a halo buffer that the calling
// thread adds into F, tile by tile in a fixed order, after the parallel loop. Summed over tiles every
// site energy is counted once, so the result is exactly -dE/dQ (the scheme of
// EnergyGNN._chunked_forces) and does not depend on which thread ran which tile. Tiles are independent
// (one thread each, taken from an atomic counter): no barrier inside a call, and the team waits for
// its last member yielding the core rather than spinning, which keeps a call cheap when a thread is late
// (other work on the cores). The tile plan (lattice_lab.native.gnn_energy.tile_plan) keeps a tile's
// stored activations cache-sized.
//
// Layout. Within a tile, features are sites-last planes X[channel * plane + (k + 1) * Wp + 1 + j] for
// tile row k, column j, with one ghost row / column on each side: left / right / up / down neighbours
// are plain loads. Sites are the SIMD lanes (16 floats / 8 doubles with AVX-512): every per-site map
// works on one vector of sites with all its channels in a local array (L1), weights broadcast from
// memory. Loads and stores are whole vectors: lanes past a row's last column (room for them in Wp) hold
// whatever is there and are never used. In a periodic direction the ghosts are copies (columns) or the
// row index wraps.
//
// Stages, each over the tile's rows and columns that are valid (a periodic direction: all; otherwise
// [s, D - s) for the stage's shrink s, D = own + 2 nb):
//   A_0   h_0 = embed(x); self / neighbour MLPs of h_0 -> ms, u (silu' of both stored)        s = 0
//   B_b   m = ms + s nn_sum(u); r = h P + MLP_u(m); h_{b+1} = LN(r)                            s = b + 1
//         b < nb-1: store silu'(MLP_u), LN xhat and 1/std, then A_{b+1} on h_{b+1} (fused)
//         b = nb-1 (s = nb: the own sites): readout forward + backward -> dE/dh (times e_scale), LN
//         backward, MLP_u backward -> gm = dE/dm, ghres = gr P (the residual path)
//   G_b   gu = s nn_sum(gm) (the stencil is its own adjoint); dE/dh_b = ghres + MLP_self^T(gm)     s = b
//         + MLP_nn^T(gu); b > 0: LN and MLP_u backward of block b-1 -> gm, ghres
//         b = 0: dE/dQ (network part) = (dE/dh_0 . W_embed) / q_std -> halo buffer
//   own sites: F = -(dE/dQ - f_mean + k Q + kappa nn_sum(Q))
// gm and ghres of block b are valid on [b+1, D-b-1) only; the sites around that G_b reads are zeroed.
// Only what the backward pass needs is stored (silu'(a) of every hidden layer, LN xhat and 1/std); that
// of the last block and of the readout stays in L1. NaN in Q propagates (no max/min; vexp keeps NaN).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <initializer_list>

#include <sched.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

namespace {

constexpr int MAX_BLOCKS = 16, MAX_READOUT = 16;

template <typename R>
struct Net {
  int64_t C, H, nb, nr, rw[MAX_READOUT + 1], wmax, rsum;
  bool ln;
  R qm, iqs, fm, es, k, kappa, s, eps;
  const R *We, *be;
  struct Mlp { const R *W1T, *b1, *W2T, *b2, *W1, *W2; };
  struct Blk { Mlp mlp[3]; const R *PT, *P, *gam, *bet; } blk[MAX_BLOCKS];
  const R *RT[MAX_READOUT], *Rb[MAX_READOUT], *RW[MAX_READOUT], *wl;

  // dims: C, H, blocks, layer_norm, n_readout, readout widths...; returns -1 for bad dims
  int64_t parse(const int64_t* dims) {
    C = dims[0]; H = dims[1]; nb = dims[2]; ln = dims[3] != 0; nr = dims[4];
    if (C < 1 || H < 1 || nb < 1 || nb > MAX_BLOCKS || nr < 0 || nr > MAX_READOUT) return -1;
    rw[0] = C;
    wmax = C > H ? C : H;
    rsum = 0;
    for (int64_t l = 0; l < nr; ++l) {
      rw[l + 1] = dims[5 + l];
      if (rw[l + 1] < 1) return -1;
      if (rw[l + 1] > wmax) wmax = rw[l + 1];
      rsum += rw[l + 1];
    }
    int64_t n = 2 * C + nb * (3 * (4 * C * H + H + C) + 2 * C * C + 2 * C) + rw[nr];
    for (int64_t l = 0; l < nr; ++l) n += 2 * rw[l] * rw[l + 1] + rw[l + 1];
    return n;
  }

  // parameter layout (lattice_lab.native.gnn_energy.pack_parameters):
  //   W_embed [C], b_embed [C];
  //   per block, per MLP (self, neighbour, update): W1^T [C][H], b1 [H], W2^T [H][C], b2 [C], W1 [H][C], W2 [C][H];
  //     then P^T [C][C], P [C][C], LN weight [C], LN bias [C];
  //   per readout hidden layer (in -> out): W^T [in][out], b [out], W [out][in]; last weight [in]
  void bind(const R* p) {
    const R* q = p;
    auto take = [&q](int64_t n) { const R* r = q; q += n; return r; };
    We = take(C); be = take(C);
    for (int64_t b = 0; b < nb; ++b) {
      for (int j = 0; j < 3; ++j) {
        Mlp& m = blk[b].mlp[j];
        m.W1T = take(C * H); m.b1 = take(H); m.W2T = take(H * C); m.b2 = take(C);
        m.W1 = take(H * C); m.W2 = take(C * H);
      }
      blk[b].PT = take(C * C); blk[b].P = take(C * C); blk[b].gam = take(C); blk[b].bet = take(C);
    }
    for (int64_t l = 0; l < nr; ++l) {
      RT[l] = take(rw[l] * rw[l + 1]); Rb[l] = take(rw[l + 1]); RW[l] = take(rw[l] * rw[l + 1]);
    }
    wl = take(rw[nr]);
  }
};

// scratch planes of a tile: q, hbuf, ms, u0, u1, gm0, gm1, ghres (C each but q: 1), then per block
// ds, dn (H each) and, but for the last block, du (H) [+ xhat (C) + rstd (1) with LayerNorm]
inline int64_t n_planes(int64_t C, int64_t H, int64_t nb, bool ln) {
  return 1 + 7 * C + nb * 2 * H + (nb - 1) * (H + (ln ? C + 1 : 0));
}
// row stride of a tile plane: one ghost column on each side, and room for whole-vector loads and
// stores past the last column (lanes beyond a row's end are computed on whatever is there, never used)
inline int64_t row_stride(int64_t Dc, bool colper, int lanes) {
  return colper && Dc % lanes == 0 ? Dc + 2 : Dc + lanes + 1;
}
inline int64_t plane_size(int64_t Dr, int64_t Wp, int lanes) { return ((Dr + 2) * Wp + lanes + 15) / 16 * 16; }

// the tiles of a lattice: n_rt x n_ct, own rows [rb[rt], rb[rt + 1]), own columns [cb[ct], cb[ct + 1]);
// tiles: {n_rt, n_ct, rb[0 .. n_rt], cb[0 .. n_ct]} with rb[0] = cb[0] = 0, rb[n_rt] = cb[n_ct] = L
struct TilePlan {
  int64_t B, L, nrt, nct, nb;
  const int64_t *rb, *cb;
  TilePlan(int64_t B_, int64_t L_, const int64_t* tiles, int64_t nb_)
      : B(B_), L(L_), nrt(tiles[0]), nct(tiles[1]), nb(nb_), rb(tiles + 2), cb(tiles + 3 + tiles[0]) {}
  bool valid() const {
    if (B < 1 || L < 1 || nrt < 1 || nct < 1 || nrt > L || nct > L) return false;
    if (rb[0] != 0 || rb[nrt] != L || cb[0] != 0 || cb[nct] != L) return false;
    for (int64_t i = 0; i < nrt; ++i)
      if (rb[i + 1] <= rb[i]) return false;
    for (int64_t i = 0; i < nct; ++i)
      if (cb[i + 1] <= cb[i]) return false;
    return true;
  }
  int64_t n_tiles() const { return B * nrt * nct; }
  int64_t halo(int64_t n) const { return n > 1 ? nb : 0; }
  static int64_t widest(const int64_t* b, int64_t n) {
    int64_t w = 0;
    for (int64_t i = 0; i < n; ++i) w = b[i + 1] - b[i] > w ? b[i + 1] - b[i] : w;
    return w;
  }
  int64_t max_rows() const { return widest(rb, nrt) + 2 * halo(nrt); }
  int64_t max_cols() const { return widest(cb, nct) + 2 * halo(nct); }
  int64_t plane(int lanes) const { return plane_size(max_rows(), row_stride(max_cols(), nct == 1, lanes), lanes); }
  int64_t sum_extent(int64_t n) const { return L + n * 2 * halo(n); }  // sum over tiles of own + 2 halo
  int64_t halo_buffer() const { return B * sum_extent(nrt) * sum_extent(nct); }
  // tile t: item, own rows [r0, r1), own columns [c0, c1), offset of its part of the halo buffer
  void tile(int64_t t, int64_t& item, int64_t& r0, int64_t& r1, int64_t& c0, int64_t& c1, int64_t& hoff) const {
    item = t / (nrt * nct);
    const int64_t rt = (t / nct) % nrt, ct = t % nct;
    r0 = rb[rt]; r1 = rb[rt + 1];
    c0 = cb[ct]; c1 = cb[ct + 1];
    const int64_t rows_before = r0 + rt * 2 * halo(nrt), cols_before = c0 + ct * 2 * halo(nct);
    const int64_t Dr = r1 - r0 + 2 * halo(nrt);
    hoff = item * sum_extent(nrt) * sum_extent(nct) + rows_before * sum_extent(nct) + Dr * cols_before;
  }
};

template <typename V>
V* workspace(int64_t n) {  // per-thread local arrays, kept between calls
  struct WS {
    void* p = nullptr;
    int64_t n = 0;
    ~WS() { std::free(p); }
  };
  static thread_local WS ws;
  if (ws.n < n) {
    std::free(ws.p);
    ws.p = std::aligned_alloc(sizeof(V), sizeof(V) * n);
    ws.n = ws.p ? n : 0;
  }
  return static_cast<V*>(ws.p);
}

template <typename R>
struct Tile {
  typedef typename Vec<R>::V V;
  static constexpr int N = sizeof(V) / sizeof(R);
  const Net<R>& net;
  V* ws;
  int64_t ps;  // plane size
  R *qd, *hbuf, *ms, *u[2], *gm[2], *ghres;
  R *ds[MAX_BLOCKS], *dn[MAX_BLOCKS], *du[MAX_BLOCKS], *xh[MAX_BLOCKS], *rs[MAX_BLOCKS];
  // current tile
  bool rowper = false, colper = false;
  int64_t Dr = 0, Dc = 0, Wp = 0;
  R* hb = nullptr;  // gradient (network part, -dE/dQ) of the tile's sites, dense Dr x Dc

  Tile(const Net<R>& n, R* scratch, int64_t ps_, V* ws_) : net(n), ws(ws_), ps(ps_) {
    const int64_t C = net.C, H = net.H;
    R* p = scratch;
    auto take = [&p, this](int64_t planes) { R* r = p; p += planes * ps; return r; };
    qd = take(1); hbuf = take(C); ms = take(C); u[0] = take(C); u[1] = take(C); gm[0] = take(C); gm[1] = take(C);
    ghres = take(C);
    for (int64_t b = 0; b < net.nb; ++b) {
      ds[b] = take(H); dn[b] = take(H);
      if (b < net.nb - 1) {
        du[b] = take(H);
        if (net.ln) { xh[b] = take(C); rs[b] = take(1); }
      }
    }
  }

  // -- loads and stores of m <= N consecutive sites --------------------------------------------------
  static inline V ldv(const R* p, int m) {
    V v;
    if (m == N) {
      std::memcpy(&v, p, sizeof(V));
    } else {
      v = (V){};
      std::memcpy(&v, p, sizeof(R) * m);
    }
    return v;
  }
  static inline void stv(R* p, const V& v, int m) {
    if (m == N) {
      std::memcpy(p, &v, sizeof(V));
    } else {
      std::memcpy(p, &v, sizeof(R) * m);
    }
  }
  // whole vectors within a tile plane (see row_stride)
  static inline V ldw(const R* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static inline void stw(R* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
  // lattice rows (periodic): row[(s0 + l -+ 1) mod L]
  static inline V ld_left(const R* row, int64_t L, int64_t s0, int m) {
    if (s0 > 0) return ldv(row + s0 - 1, m);
    V v = (V){};
    v[0] = row[L - 1];
    std::memcpy(reinterpret_cast<R*>(&v) + 1, row, sizeof(R) * (m - 1));
    return v;
  }
  static inline V ld_right(const R* row, int64_t L, int64_t s0, int m) {
    if (s0 + m < L) return ldv(row + s0 + 1, m);
    V v = (V){};
    std::memcpy(&v, row + s0 + 1, sizeof(R) * (m - 1));
    v[m - 1] = row[0];
    return v;
  }

  // -- dense maps on local arrays: y[o] = init[o] + bias[o] + sum_i x[i] Wt[i][o] --------------------
  template <int KC>
#if defined(__GNUC__) && !defined(__clang__)
  __attribute__((optimize("no-tree-loop-distribute-patterns")))  // accumulators in registers, no memcpy
#endif
  static inline void dchunk(const V* __restrict x, int64_t nin, const R* __restrict Wt, int64_t nout, int64_t o,
                            const R* bias, const V* init, V* y) {
    V acc[KC];
    for (int k = 0; k < KC; ++k) {
      acc[k] = init ? init[o + k] : (V){};
      if (bias) acc[k] += bias[o + k];
    }
    const R* w = Wt + o;
    for (int64_t i = 0; i < nin; ++i, w += nout) {
      const V xv = x[i];
      for (int k = 0; k < KC; ++k) acc[k] += xv * w[k];
    }
    for (int k = 0; k < KC; ++k) y[o + k] = acc[k];
  }
  static inline void dense(const V* x, int64_t nin, const R* Wt, int64_t nout, const R* bias, const V* init, V* y) {
    int64_t o = 0;
    for (; o + 16 <= nout; o += 16) dchunk<16>(x, nin, Wt, nout, o, bias, init, y);
    if (o + 8 <= nout) { dchunk<8>(x, nin, Wt, nout, o, bias, init, y); o += 8; }
    if (o + 4 <= nout) { dchunk<4>(x, nin, Wt, nout, o, bias, init, y); o += 4; }
    if (o + 2 <= nout) { dchunk<2>(x, nin, Wt, nout, o, bias, init, y); o += 2; }
    if (o < nout) dchunk<1>(x, nin, Wt, nout, o, bias, init, y);
  }
  static inline void silu(const V* a, V* z, V* d, int64_t n) {  // z = a sigma(a), d = silu'(a)
    for (int64_t j = 0; j < n; ++j) {
      const V sg = ll::vsigmoid<R>(a[j]);
      const V zj = a[j] * sg;
      d[j] = sg + zj * (R(1) - sg);
      z[j] = zj;
    }
  }

  // -- geometry --------------------------------------------------------------------------------------
  int64_t at(int64_t k, int64_t j) const { return (k + 1) * Wp + 1 + j; }
  int64_t row_up(int64_t k) const { return rowper ? (k + Dr - 1) % Dr : k - 1; }
  int64_t row_down(int64_t k) const { return rowper ? (k + 1) % Dr : k + 1; }
  void lo_hi(bool per, int64_t D, int64_t s, int64_t& lo, int64_t& hi) const {
    lo = per ? 0 : s;
    hi = per ? D : D - s;
  }
  V nn_plane(const R* X, int64_t k, int64_t up, int64_t down, int64_t j) const {
    return ldw(X + at(up, j)) + ldw(X + at(down, j)) + ldw(X + at(k, j - 1)) + ldw(X + at(k, j + 1));
  }
  void ghost_columns(R* X, int64_t nplanes, int64_t k0, int64_t k1) const {  // periodic columns
    for (int64_t c = 0; c < nplanes; ++c)
      for (int64_t k = k0; k < k1; ++k) {
        R* row = X + c * ps + (k + 1) * Wp;
        row[0] = row[Dc];
        row[Dc + 1] = row[1];
      }
  }
  void zero_rows(R* X, int64_t nplanes, int64_t k) const {
    for (int64_t c = 0; c < nplanes; ++c) std::memset(X + c * ps + (k + 1) * Wp, 0, sizeof(R) * Wp);
  }
  void zero_col(R* X, int64_t nplanes, int64_t j, int64_t k0, int64_t k1) const {
    for (int64_t c = 0; c < nplanes; ++c)
      for (int64_t k = k0; k < k1; ++k) X[c * ps + at(k, j)] = R(0);
  }
  // after gm / ghres of block b were computed on their valid sites: ghosts (periodic columns), or zeros
  // on the sites around the valid region that G_b reads
  void fix_gradient(int64_t b) {
    const int64_t C = net.C;
    R* g = gm[b % 2];
    int64_t k0, k1;
    lo_hi(rowper, Dr, b + 1, k0, k1);
    if (colper) {
      ghost_columns(g, C, k0, k1);
    } else {
      for (int64_t j : {b - 1, b, Dc - b - 1, Dc - b}) zero_col(g, C, j, k0, k1);
      for (int64_t j : {b, Dc - b - 1}) zero_col(ghres, C, j, k0, k1);
    }
    if (!rowper) {
      for (int64_t k : {b - 1, b, Dr - b - 1, Dr - b}) zero_rows(g, C, k);
      for (int64_t k : {b, Dr - b - 1}) zero_rows(ghres, C, k);
    }
  }

  // -- per-site pieces -------------------------------------------------------------------------------
  // self and neighbour MLPs of h (block b): ms, u[b % 2], silu' -> ds[b], dn[b]
  void message_mlps(int64_t b, const V* h, int64_t pos, V* a, V* z, V* d, V* o) {
    const int64_t C = net.C, H = net.H;
    for (int j = 0; j < 2; ++j) {
      const typename Net<R>::Mlp& p = net.blk[b].mlp[j];
      dense(h, C, p.W1T, H, p.b1, nullptr, a);
      silu(a, z, d, H);
      R* dp = (j == 0 ? ds[b] : dn[b]) + pos;
      for (int64_t c = 0; c < H; ++c) stw(dp + c * ps, d[c]);
      dense(z, H, p.W2T, C, p.b2, nullptr, o);
      R* op = (j == 0 ? ms : u[b % 2]) + pos;
      for (int64_t c = 0; c < C; ++c) stw(op + c * ps, o[c]);
    }
  }
  // backward of the update MLP and residual of block b from gr = dE/dr: gm[b % 2], ghres
  void update_backward(int64_t b, const V* gr, const V* d, int64_t pos, V* t, V* o) {
    const int64_t C = net.C, H = net.H;
    const typename Net<R>::Mlp& p = net.blk[b].mlp[2];
    dense(gr, C, p.W2, H, nullptr, nullptr, t);
    for (int64_t j = 0; j < H; ++j) t[j] *= d[j];
    dense(t, H, p.W1, C, nullptr, nullptr, o);
    R* g = gm[b % 2] + pos;
    for (int64_t c = 0; c < C; ++c) stw(g + c * ps, o[c]);
    dense(gr, C, net.blk[b].P, C, nullptr, nullptr, o);
    R* gh = ghres + pos;
    for (int64_t c = 0; c < C; ++c) stw(gh + c * ps, o[c]);
  }
  void ln_backward(int64_t b, const V* gh, const V* xhat, V rstd, V* gr) const {
    const int64_t C = net.C;
    const R* gam = net.blk[b].gam;
    V A = (V){}, Bm = (V){};
    for (int64_t c = 0; c < C; ++c) {
      const V g = gh[c] * gam[c];
      gr[c] = g;
      A += g;
      Bm += g * xhat[c];
    }
    const R ic = R(1) / R(C);
    A *= ic;
    Bm *= ic;
    for (int64_t c = 0; c < C; ++c) gr[c] = rstd * (gr[c] - A - xhat[c] * Bm);
  }

  // -- stages (one tile row k, columns [j0, j1)) -------------------------------------------------------
  void stage_embed(int64_t k, int64_t j0, int64_t j1) {
    const int64_t C = net.C, W = net.wmax;
    V* h = ws;
    V* a = h + W;
    V* z = a + W;
    V* d = z + W;
    V* o = d + W;
    for (int64_t s0 = j0; s0 < j1; s0 += N) {
      const int64_t pos = at(k, s0);
      const V x = (ldw(qd + pos) - net.qm) * net.iqs;
      for (int64_t c = 0; c < C; ++c) {
        h[c] = x * net.We[c] + net.be[c];
        stw(hbuf + c * ps + pos, h[c]);
      }
      message_mlps(0, h, pos, a, z, d, o);
    }
  }

  void stage_block(int64_t b, int64_t k, int64_t j0, int64_t j1) {
    const int64_t C = net.C, H = net.H, W = net.wmax, up = row_up(k), down = row_down(k);
    const typename Net<R>::Blk& blk = net.blk[b];
    const typename Net<R>::Mlp& U = blk.mlp[2];
    const bool last = b == net.nb - 1;
    V* h = ws;
    V* mm = h + W;
    V* a = mm + W;
    V* z = a + W;
    V* d = z + W;
    V* v = d + W;
    V* r = v + W;
    V* xhat = r + W;
    V* hn = xhat + W;
    V* t = hn + W;
    V* o = t + W;
    V* gr = o + W;
    V* ra = gr + W;  // readout: pre-activations
    V* rz = ra + W;
    V* gy = rz + W;
    V* gy2 = gy + W;
    V* rd = gy2 + W;  // readout silu' of every hidden layer (rsum)
    const R* ub = u[b % 2];
    for (int64_t s0 = j0; s0 < j1; s0 += N) {
      const int64_t pos = at(k, s0);
      for (int64_t c = 0; c < C; ++c) {
        h[c] = ldw(hbuf + c * ps + pos);
        mm[c] = ldw(ms + c * ps + pos) + net.s * nn_plane(ub + c * ps, k, up, down, s0);
      }
      dense(mm, C, U.W1T, H, U.b1, nullptr, a);
      silu(a, z, d, H);
      dense(z, H, U.W2T, C, U.b2, nullptr, v);
      dense(h, C, blk.PT, C, nullptr, v, r);  // r = h P^T + MLP_u(m)
      V rstd = (V){} + R(1);
      if (net.ln) {
        V mu = (V){};
        for (int64_t c = 0; c < C; ++c) mu += r[c];
        mu *= R(1) / R(C);
        V var = (V){};
        for (int64_t c = 0; c < C; ++c) {
          xhat[c] = r[c] - mu;
          var += xhat[c] * xhat[c];
        }
        rstd = R(1) / ll::vsqrt<R>(var * (R(1) / R(C)) + net.eps);
        for (int64_t c = 0; c < C; ++c) {
          xhat[c] *= rstd;
          hn[c] = xhat[c] * blk.gam[c] + blk.bet[c];
        }
      } else {
        for (int64_t c = 0; c < C; ++c) hn[c] = r[c];
      }
      if (!last) {
        for (int64_t j = 0; j < H; ++j) stw(du[b] + j * ps + pos, d[j]);
        if (net.ln) {
          for (int64_t c = 0; c < C; ++c) stw(xh[b] + c * ps + pos, xhat[c]);
          stw(rs[b] + pos, rstd);
        }
        for (int64_t c = 0; c < C; ++c) stw(hbuf + c * ps + pos, hn[c]);
        message_mlps(b + 1, hn, pos, a, z, t, o);
        continue;
      }
      // readout forward (silu' kept) and backward: g = e_scale d readout / d h
      const V* y = hn;
      V* dl = rd;
      for (int64_t l = 0; l < net.nr; ++l) {
        dense(y, net.rw[l], net.RT[l], net.rw[l + 1], net.Rb[l], nullptr, ra);
        V* zl = (l % 2) ? gy : rz;  // gy is free until the backward pass
        silu(ra, zl, dl, net.rw[l + 1]);
        y = zl;
        dl += net.rw[l + 1];
      }
      V* g = gy2;
      for (int64_t j = 0; j < net.rw[net.nr]; ++j) g[j] = (V){} + net.es * net.wl[j];
      for (int64_t l = net.nr - 1; l >= 0; --l) {
        dl -= net.rw[l + 1];
        for (int64_t j = 0; j < net.rw[l + 1]; ++j) g[j] *= dl[j];
        V* gnext = (g == gy2) ? gy : gy2;
        dense(g, net.rw[l + 1], net.RW[l], net.rw[l], nullptr, nullptr, gnext);
        g = gnext;
      }
      if (net.ln) {
        ln_backward(b, g, xhat, rstd, gr);
      } else {
        for (int64_t c = 0; c < C; ++c) gr[c] = g[c];
      }
      update_backward(b, gr, d, pos, t, o);
    }
  }

  void stage_back(int64_t b, int64_t k, int64_t j0, int64_t j1) {
    const int64_t C = net.C, H = net.H, W = net.wmax, up = row_up(k), down = row_down(k);
    const typename Net<R>::Blk& blk = net.blk[b];
    const R* g = gm[b % 2];
    V* gs = ws;
    V* gu = gs + W;
    V* gh = gu + W;
    V* t = gh + W;
    V* xhat = t + W;
    V* gr = xhat + W;
    V* dd = gr + W;
    V* o = dd + W;
    for (int64_t s0 = j0; s0 < j1; s0 += N) {
      const int m = int(j1 - s0 < N ? j1 - s0 : N);
      const int64_t pos = at(k, s0);
      for (int64_t c = 0; c < C; ++c) {
        gs[c] = ldw(g + c * ps + pos);
        gh[c] = ldw(ghres + c * ps + pos);
        gu[c] = net.s * nn_plane(g + c * ps, k, up, down, s0);
      }
      for (int j = 0; j < 2; ++j) {  // self MLP (gs), neighbour MLP (gu)
        const typename Net<R>::Mlp& p = blk.mlp[j];
        dense(j == 0 ? gs : gu, C, p.W2, H, nullptr, nullptr, t);
        const R* dp = (j == 0 ? ds[b] : dn[b]) + pos;
        for (int64_t q = 0; q < H; ++q) t[q] *= ldw(dp + q * ps);
        dense(t, H, p.W1, C, nullptr, gh, gh);
      }
      if (b > 0) {
        const int64_t pb = b - 1;
        V rstd = (V){} + R(1);
        if (net.ln) {
          for (int64_t c = 0; c < C; ++c) xhat[c] = ldw(xh[pb] + c * ps + pos);
          rstd = ldw(rs[pb] + pos);
          ln_backward(pb, gh, xhat, rstd, gr);
        } else {
          for (int64_t c = 0; c < C; ++c) gr[c] = gh[c];
        }
        for (int64_t q = 0; q < H; ++q) dd[q] = ldw(du[pb] + q * ps + pos);
        update_backward(pb, gr, dd, pos, t, o);
        continue;
      }
      V gx = (V){};
      for (int64_t c = 0; c < C; ++c) gx += gh[c] * net.We[c];
      stv(hb + k * Dc + s0, -(gx * net.iqs), m);
    }
  }

  // -- one tile ----------------------------------------------------------------------------------------
  void setup(int64_t L, int64_t r0, int64_t r1, int64_t c0, int64_t c1, R* hbuf_tile) {
    rowper = r1 - r0 == L;
    colper = c1 - c0 == L;
    Dr = r1 - r0 + 2 * (rowper ? 0 : net.nb);
    Dc = c1 - c0 + 2 * (colper ? 0 : net.nb);
    Wp = row_stride(Dc, colper, N);
    hb = hbuf_tile;
  }
  // tile rows [k0, k1) of the configuration (periodic wrap: up to 3 pieces of a row)
  void load_q(const R* Qi, int64_t L, int64_t r0, int64_t c0, int64_t k0, int64_t k1) {
    const int64_t hr = rowper ? 0 : net.nb, hc = colper ? 0 : net.nb;
    for (int64_t k = k0; k < k1; ++k) {
      const R* row = Qi + ((r0 - hr + k + L) % L) * L;
      R* dst = qd + at(k, 0);
      for (int64_t j = 0, c = (c0 - hc + L) % L; j < Dc;) {
        const int64_t n = Dc - j < L - c ? Dc - j : L - c;
        std::memcpy(dst + j, row + c, sizeof(R) * n);
        j += n;
        c = 0;
      }
    }
  }
  // own rows [ra, rb) of the lattice: F = network part + the local terms f_mean - k Q - kappa nn_sum(Q)
  void write_own(const R* Qi, R* Fi, int64_t L, int64_t r0, int64_t ra, int64_t rb, int64_t c0, int64_t c1) const {
    const int64_t hr = rowper ? 0 : net.nb, hc = colper ? 0 : net.nb;
    for (int64_t r = ra; r < rb; ++r) {
      const R* q = Qi + r * L;
      const R* qu = Qi + ((r + L - 1) % L) * L;
      const R* qdn = Qi + ((r + 1) % L) * L;
      const R* src = hb + (r - r0 + hr) * Dc + hc - c0;
      for (int64_t s0 = c0; s0 < c1; s0 += N) {
        const int m = int(c1 - s0 < N ? c1 - s0 : N);
        const V qv = ldv(q + s0, m);
        const V nq = ldv(qu + s0, m) + ldv(qdn + s0, m) + ld_left(q, L, s0, m) + ld_right(q, L, s0, m);
        stv(Fi + r * L + s0, ldv(src + s0, m) + net.fm - net.k * qv - net.kappa * nq, m);
      }
    }
  }

  // -- one tile on one thread ------------------------------------------------------------------------
  void run(const R* Q, R* F, int64_t L, int64_t item, int64_t r0, int64_t r1, int64_t c0, int64_t c1, R* hbuf_tile) {
    const int64_t nb = net.nb;
    setup(L, r0, r1, c0, c1, hbuf_tile);
    const R* Qi = Q + item * L * L;
    load_q(Qi, L, r0, c0, 0, Dr);
    int64_t k0, k1, j0, j1;
    lo_hi(rowper, Dr, 0, k0, k1);
    lo_hi(colper, Dc, 0, j0, j1);
    for (int64_t k = k0; k < k1; ++k) stage_embed(k, j0, j1);
    if (colper) ghost_columns(u[0], net.C, k0, k1);
    for (int64_t b = 0; b < nb; ++b) {
      lo_hi(rowper, Dr, b + 1, k0, k1);
      lo_hi(colper, Dc, b + 1, j0, j1);
      for (int64_t k = k0; k < k1; ++k) stage_block(b, k, j0, j1);
      if (b < nb - 1) {
        if (colper) ghost_columns(u[(b + 1) % 2], net.C, k0, k1);
      } else {
        fix_gradient(b);
      }
    }
    for (int64_t b = nb - 1; b >= 0; --b) {
      lo_hi(rowper, Dr, b, k0, k1);
      lo_hi(colper, Dc, b, j0, j1);
      for (int64_t k = k0; k < k1; ++k) stage_back(b, k, j0, j1);
      if (b > 0) fix_gradient(b - 1);
    }
    write_own(Qi, F + item * L * L, L, r0, r0, r1, c0, c1);
  }
};

// add the halo sites of every tile into F (fixed order: the same result for any thread count)
template <typename R>
void add_halos(const TilePlan& tp, const R* hbuf, R* F) {
  const int64_t L = tp.L;
  for (int64_t t = 0; t < tp.n_tiles(); ++t) {
    int64_t item, r0, r1, c0, c1, hoff;
    tp.tile(t, item, r0, r1, c0, c1, hoff);
    const int64_t hr = tp.halo(tp.nrt), hc = tp.halo(tp.nct);
    if (!hr && !hc) continue;
    const int64_t Dr = r1 - r0 + 2 * hr, Dc = c1 - c0 + 2 * hc;
    const R* h = hbuf + hoff;
    R* Fi = F + item * L * L;
    for (int64_t k = 0; k < Dr; ++k) {
      R* row = Fi + ((r0 - hr + k + L) % L) * L;
      const bool own_row = k >= hr && k < Dr - hr;
      int64_t c = (c0 - hc + L) % L;
      for (int64_t j = 0; j < Dc; ++j, c = c + 1 == L ? 0 : c + 1) {
        if (own_row && j == hc) {  // own sites: written by the tile itself
          j = Dc - hc - 1;
          c = (c0 - hc + j + L) % L;
          continue;
        }
        row[c] += h[k * Dc + j];
      }
    }
  }
}

inline int64_t scratch_size(const Net<float>& net, const TilePlan& tp, int64_t nt, int64_t itemsize) {
  const int lanes = int(LL_VBYTES / itemsize);
  const int64_t per_thread = n_planes(net.C, net.H, net.nb, net.ln) * tp.plane(lanes);
  return nt * per_thread + tp.halo_buffer();
}

template <typename R>
int forces(const R* Q, R* F, int64_t B, int64_t L, const int64_t* dims, const R* params, int64_t n_params,
           const double* sc, R* scratch, int64_t scratch_len, const int64_t* tiles, int nt) {
  typedef typename Vec<R>::V V;
  Net<R> net;
  if (net.parse(dims) != n_params) return 1;
  net.bind(params);
  net.qm = R(sc[0]); net.iqs = R(sc[1]); net.fm = R(sc[2]); net.es = R(sc[3]);
  net.k = R(sc[4]); net.kappa = R(sc[5]); net.s = R(sc[6]); net.eps = R(sc[7]);
  if (nt < 1) nt = 1;
  const TilePlan tp(B, L, tiles, net.nb);
  if (!tp.valid()) return 3;
  const int64_t ps = tp.plane(Tile<R>::N);
  const int64_t per_thread = n_planes(net.C, net.H, net.nb, net.ln) * ps;
  if (scratch_len < nt * per_thread + tp.halo_buffer()) return 2;
  R* halo = scratch + nt * per_thread;
  const int64_t n_ws = 20 * net.wmax + net.rsum + 4, n_tiles = tp.n_tiles();
  int failed = 0;
  std::atomic<int64_t> next{0};
  std::atomic<int> arrived{0};
#pragma omp parallel num_threads(nt) if (nt > 1 && n_tiles > 1)
  {
    int tid = 0, team = 1;
#ifdef _OPENMP
    tid = omp_get_thread_num();
    team = omp_get_num_threads();
#endif
    V* ws = workspace<V>(n_ws);
    if (!ws) {
#pragma omp atomic write
      failed = 1;
    } else {
      Tile<R> tile(net, scratch + tid * per_thread, ps, ws);
      for (int64_t t = next++; t < n_tiles; t = next++) {  // dynamic schedule: whoever is running takes the next tile
        int64_t item, r0, r1, c0, c1, hoff;
        tp.tile(t, item, r0, r1, c0, c1, hoff);
        tile.run(Q, F, L, item, r0, r1, c0, c1, halo + hoff);
      }
    }
    // wait for the team yielding the core, not spinning in the closing barrier: a team thread that has
    // not started yet (woken late, or queued on this core) then gets to run, finds no tile and leaves
    arrived++;
    while (arrived.load() < team) sched_yield();
  }
  if (failed) return 4;
  add_halos(tp, halo, F);
  return 0;
}

}  // namespace

extern "C" {
// scratch elements for [B, L, L] in tiles n_rt x n_ct per lattice and nt threads
int64_t ll_gnn_energy_scratch(const int64_t* dims, int64_t B, int64_t L, const int64_t* tiles, int64_t nt,
                              int64_t itemsize) {
  Net<float> net;
  if (net.parse(dims) < 0 || (itemsize != 4 && itemsize != 8)) return -1;
  const TilePlan tp(B, L, tiles, net.nb);
  if (!tp.valid()) return -1;
  return scratch_size(net, tp, nt < 1 ? 1 : nt, itemsize);
}
int64_t ll_gnn_energy_lanes(int64_t itemsize) { return LL_VBYTES / itemsize; }
int64_t ll_gnn_energy_n_params(const int64_t* dims) {
  Net<float> net;
  return net.parse(dims);
}
int ll_gnn_energy_forces_f32(const float* Q, float* F, int64_t B, int64_t L, const int64_t* dims, const float* params,
                             int64_t n_params, const double* scalars, float* scratch, int64_t scratch_len,
                             const int64_t* tiles, int nt) {
  return forces<float>(Q, F, B, L, dims, params, n_params, scalars, scratch, scratch_len, tiles, nt);
}
int ll_gnn_energy_forces_f64(const double* Q, double* F, int64_t B, int64_t L, const int64_t* dims,
                             const double* params, int64_t n_params, const double* scalars, double* scratch,
                             int64_t scratch_len, const int64_t* tiles, int nt) {
  return forces<double>(Q, F, B, L, dims, params, n_params, scalars, scratch, scratch_len, tiles, nt);
}
}
