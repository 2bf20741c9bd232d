// The Langevin integrator's own work on the CPU, fused (lattice_lab.dynamics.langevin):
//
//   drift:  v <- v + half F;  Q <- Q + dt v                        (one pass over Q, V, F)
//   kick:   v <- a v + b F + c xi(seed, step, i)                  (one pass over V, F)
//
// xi is a standard normal variate from a counter-based generator: Philox4x32-10 (Salmon, Moraes,
// Dror & Shaw, SC'11), key = the 64-bit seed, counter = (j, step lo, step hi, 0), turned into four
// normals by two Box-Muller transforms. The noise of site i at step s is therefore a fixed function
// of (seed, s, i): independent of threads and tiling, with nothing to store for an exact resume but
// the step number. Sites come in chunks of 64: counter j = 16 c + l (l < 16) of chunk c gives the
// normals of sites 64 c + 16 m + l, m = 0..3, whatever the CPU's vector width (below).
//
// The normals are computed in float32 (log and sin/cos by polynomials below, relative error < 1e-6),
// also for float64 states: the noise needs no more digits than that.
#include <cstdint>
#include <cstring>

#include "simd.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// The generator works in vectors of the CPU's own width (simd.h: W = 16 lanes with AVX-512, 8 otherwise);
// a chunk's 16 counters are 16 / W such vectors. Written for 16 lanes everywhere, GCC split the
// comparisons, the unsigned conversion (AVX2 has none) and the per-lane sqrt of AVX2 builds into scalar
// code: 17 ns per site on an AVX2 EPYC, against 1.9 ns now. Every lane goes through the same operations in
// the same order at any width, so CPUs with FMA draw the same numbers (the AVX2 and the old 16-lane build
// agree bit for bit); without FMA the polynomials' products are rounded separately and the last bit can
// differ.
constexpr int W = LL_VBYTES / 4;
typedef uint32_t u32xW __attribute__((vector_size(LL_VBYTES)));
typedef uint64_t u64xH __attribute__((vector_size(LL_VBYTES)));
typedef int32_t i32xW __attribute__((vector_size(LL_VBYTES)));
typedef float f32xW __attribute__((vector_size(LL_VBYTES)));

namespace {

constexpr int64_t kChunk = 64;                 // sites per 16 Philox counters
constexpr int64_t kParallelMinSites = 1 << 12;  // below this one thread is faster than waking the team

// (a & 0xffffffff) * m in each 64-bit lane: one unsigned 32 x 32 -> 64 multiply (vpmuludq); written
// as plain vector code the compiler would use a full 64-bit multiply (vpmullq, 3x the cost).
inline u64xH mul_low32(u64xH a, uint32_t m) {
#if defined(__AVX512F__)
  return (u64xH)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64(m));
#elif defined(__AVX2__)
  return (u64xH)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x(m));
#else
  return (a & 0xffffffffull) * uint64_t(m);
#endif
}

// 32 x 32 -> 64-bit products of the W lanes, computed as the even and the odd lanes of W / 2 64-bit lanes.
inline void mulhilo(uint32_t m, u32xW x, u32xW& hi, u32xW& lo) {
  u64xH a;
  std::memcpy(&a, &x, sizeof a);
  const u64xH low = (u64xH){} + 0xffffffffull;
  const u64xH even = mul_low32(a, m), odd = mul_low32(a >> 32, m);
  const u64xH l = (even & low) | (odd << 32), h = (even >> 32) | (odd & ~low);
  std::memcpy(&lo, &l, sizeof lo);
  std::memcpy(&hi, &h, sizeof hi);
}

// Philox4x32-10 on W counters at once; c[0..3] in, random words out.
inline void philox(u32xW c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    u32xW hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c[0], hi0, lo0);
    mulhilo(0xCD9E8D57u, c[2], hi1, lo1);
    const u32xW n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

inline f32xW uniform_open(u32xW x) {  // (x >> 8 + 1/2) / 2^24 in float32: never 0 (the smallest is
  // 2^-25); from 2^23 on the + 1/2 rounds to even, so x >> 8 = 2^24 - 1 gives exactly 1 (a radius of 0)
  // x >> 8 < 2^24: the signed conversion (one instruction on every x86 vector ISA) is exact
  return (__builtin_convertvector((i32xW)(x >> 8), f32xW) + 0.5f) * (1.0f / 16777216.0f);
}

inline f32xW log_positive(f32xW u) {  // ln u for normal positive floats
  i32xW bits;
  std::memcpy(&bits, &u, sizeof bits);
  i32xW e = ((bits >> 23) & 0xff) - 127;
  const i32xW mbits = (bits & 0x7fffff) | 0x3f800000;  // mantissa in [1, 2)
  f32xW m;
  std::memcpy(&m, &mbits, sizeof m);
  const i32xW big = m > 1.41421356f;  // move to [sqrt(1/2), sqrt(2))
  m = big ? m * 0.5f : m;
  e = e - big;  // big is -1 where true
  const f32xW s = (m - 1.0f) / (m + 1.0f), s2 = s * s;  // ln m = 2 atanh s, |s| <= 0.1716
  const f32xW p = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  return __builtin_convertvector(e, f32xW) * 0.693147180559945f + 2.0f * s * p;
}

// cos and sin of 2 pi u for u in [0, 1): quadrant k = round(4 u), x = (4 u - k) pi / 2 in [-pi/4, pi/4].
inline void sincos_turns(f32xW u, f32xW& c, f32xW& s) {
  const f32xW t = u * 4.0f;
  const i32xW k = __builtin_convertvector(t + 0.5f, i32xW);  // t >= 0: truncation rounds
  const f32xW x = (t - __builtin_convertvector(k, f32xW)) * 1.57079632679490f, x2 = x * x;
  const f32xW sx = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880)))));
  const f32xW cx = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320))));
  const i32xW q = k & 3;
  const i32xW swap = (q & 1) != 0, neg_c = (q == 1) | (q == 2), neg_s = q >= 2;
  f32xW cc = swap ? sx : cx, ss = swap ? cx : sx;
  c = neg_c ? -cc : cc;
  s = neg_s ? -ss : ss;
}

// The 64 normals of chunk `chunk`, out[16 m + l]: counter 16 chunk + l gives the normals 16 m + l.
inline void normals64(uint64_t seed, uint64_t step, int64_t chunk, float out[kChunk]) {
  for (int g = 0; g < 16; g += W) {  // counters 16 chunk + g + [0, W)
    u32xW c[4];
    for (int l = 0; l < W; ++l) c[0][l] = uint32_t(uint64_t(chunk) * 16 + g + l);
    c[1] = (u32xW){} + uint32_t(step);
    c[2] = (u32xW){} + uint32_t(step >> 32);
    c[3] = (u32xW){};
    // counters beyond 2^32 sites would repeat: chunk * 16 < 2^32 holds for n < 2^36 sites
    philox(c, uint32_t(seed), uint32_t(seed >> 32));
    for (int pair = 0; pair < 2; ++pair) {
      const f32xW u1 = uniform_open(c[2 * pair]), u2 = uniform_open(c[2 * pair + 1]);
      const f32xW rad = ll::vsqrt<float>(-2.0f * log_positive(u1));
      f32xW cs, sn;
      sincos_turns(u2, cs, sn);
      const f32xW z0 = rad * cs, z1 = rad * sn;
      std::memcpy(out + 32 * pair + g, &z0, sizeof z0);
      std::memcpy(out + 32 * pair + 16 + g, &z1, sizeof z1);
    }
  }
}

template <typename R>
void drift(R* Q, R* V, const R* F, int64_t n, double half, double dt, int64_t threads) {
  const R h = R(half), d = R(dt);
#pragma omp parallel for schedule(static) num_threads(int(threads)) if (threads > 1 && n >= kParallelMinSites)
  for (int64_t i = 0; i < n; ++i) {
    const R v = V[i] + h * F[i];
    V[i] = v;
    Q[i] += d * v;
  }
}

template <typename R>
void kick(R* V, const R* F, int64_t n, double a, double b, double c, uint64_t seed, uint64_t step,
          int64_t threads) {
  const R ra = R(a), rb = R(b), rc = R(c);
  if (c == 0.0) {  // no bath (T = 0 or gamma = 0): nothing to draw
#pragma omp parallel for schedule(static) num_threads(int(threads)) if (threads > 1 && n >= kParallelMinSites)
    for (int64_t i = 0; i < n; ++i) V[i] = ra * V[i] + rb * F[i];
    return;
  }
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) num_threads(int(threads)) if (threads > 1 && n >= kParallelMinSites)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    float z[kChunk];
    normals64(seed, step, ch, z);
    const int64_t i0 = ch * kChunk, m = n - i0 < kChunk ? n - i0 : kChunk;
    for (int64_t k = 0; k < m; ++k) V[i0 + k] = ra * V[i0 + k] + rb * F[i0 + k] + rc * R(z[k]);
  }
}

template <typename R>
void normals(R* out, int64_t n, uint64_t seed, uint64_t step) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    float z[kChunk];
    normals64(seed, step, ch, z);
    const int64_t i0 = ch * kChunk, m = n - i0 < kChunk ? n - i0 : kChunk;
    for (int64_t k = 0; k < m; ++k) out[i0 + k] = R(z[k]);
  }
}

}  // namespace

extern "C" {

void ll_langevin_drift_f32(float* Q, float* V, const float* F, int64_t n, double half, double dt, int64_t t) {
  drift(Q, V, F, n, half, dt, t);
}
void ll_langevin_drift_f64(double* Q, double* V, const double* F, int64_t n, double half, double dt, int64_t t) {
  drift(Q, V, F, n, half, dt, t);
}
void ll_langevin_kick_f32(float* V, const float* F, int64_t n, double a, double b, double c, uint64_t seed,
                          uint64_t step, int64_t t) {
  kick(V, F, n, a, b, c, seed, step, t);
}
void ll_langevin_kick_f64(double* V, const double* F, int64_t n, double a, double b, double c, uint64_t seed,
                          uint64_t step, int64_t t) {
  kick(V, F, n, a, b, c, seed, step, t);
}
void ll_normal_f32(float* out, int64_t n, uint64_t seed, uint64_t step) { normals(out, n, seed, step); }
void ll_normal_f64(double* out, int64_t n, uint64_t seed, uint64_t step) { normals(out, n, seed, step); }

// Philox4x32-10 of one counter (known-answer tests).
void ll_philox4x32_10(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  u32xW c[4];
  for (int w = 0; w < 4; ++w) c[w] = (u32xW){} + ctr[w];
  philox(c, key[0], key[1]);
  for (int w = 0; w < 4; ++w) out[w] = c[w][0];
}
}
