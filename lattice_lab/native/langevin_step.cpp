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
// normals of sites 64 c + 16 m + l, m = 0..3. Vectors are 16 lanes wide whatever the CPU (GCC lowers
// them to the widest registers there are), so every CPU draws the same numbers.
//
// The normals are computed in float32 (log and sin/cos by polynomials below, relative error < 1e-6),
// also for float64 states: the noise needs no more digits than that.
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));

namespace {

constexpr int64_t kChunk = 64;                 // sites per 16 Philox counters
constexpr int64_t kParallelMinSites = 1 << 12;  // below this one thread is faster than waking the team

// (a & 0xffffffff) * m in each 64-bit lane: one unsigned 32 x 32 -> 64 multiply (vpmuludq); written
// as plain vector code the compiler would use a full 64-bit multiply (vpmullq, 3x the cost).
inline u64x8 mul_low32(u64x8 a, uint32_t m) {
#if defined(__AVX512F__)
  return (u64x8)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64(m));
#elif defined(__AVX2__)
  typedef long long i64x4 __attribute__((vector_size(32)));
  i64x4 h[2];
  std::memcpy(h, &a, sizeof a);
  for (auto& v : h) v = (i64x4)_mm256_mul_epu32((__m256i)v, _mm256_set1_epi64x(m));
  std::memcpy(&a, h, sizeof a);
  return a;
#else
  return (a & 0xffffffffull) * uint64_t(m);
#endif
}

// 32 x 32 -> 64-bit products of the 16 lanes, computed as the even and the odd lanes of 8 64-bit lanes.
inline void mulhilo(uint32_t m, u32x16 x, u32x16& hi, u32x16& lo) {
  u64x8 a;
  std::memcpy(&a, &x, sizeof a);
  const u64x8 low = (u64x8){} + 0xffffffffull;
  const u64x8 even = mul_low32(a, m), odd = mul_low32(a >> 32, m);
  const u64x8 l = (even & low) | (odd << 32), h = (even >> 32) | (odd & ~low);
  std::memcpy(&lo, &l, sizeof lo);
  std::memcpy(&hi, &h, sizeof hi);
}

// Philox4x32-10 on 16 counters at once; c[0..3] in, random words out.
inline void philox(u32x16 c[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    u32x16 hi0, lo0, hi1, lo1;
    mulhilo(0xD2511F53u, c[0], hi0, lo0);
    mulhilo(0xCD9E8D57u, c[2], hi1, lo1);
    const u32x16 n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

inline f32x16 uniform_open(u32x16 x) {  // (x >> 8 + 1/2) / 2^24: in (0, 1), never 0 or 1
  return (__builtin_convertvector(x >> 8, f32x16) + 0.5f) * (1.0f / 16777216.0f);
}

inline f32x16 log_positive(f32x16 u) {  // ln u for normal positive floats
  i32x16 bits;
  std::memcpy(&bits, &u, sizeof bits);
  i32x16 e = ((bits >> 23) & 0xff) - 127;
  const i32x16 mbits = (bits & 0x7fffff) | 0x3f800000;  // mantissa in [1, 2)
  f32x16 m;
  std::memcpy(&m, &mbits, sizeof m);
  const i32x16 big = m > 1.41421356f;  // move to [sqrt(1/2), sqrt(2))
  m = big ? m * 0.5f : m;
  e = e - big;  // big is -1 where true
  const f32x16 s = (m - 1.0f) / (m + 1.0f), s2 = s * s;  // ln m = 2 atanh s, |s| <= 0.1716
  const f32x16 p = 1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9))));
  return __builtin_convertvector(e, f32x16) * 0.693147180559945f + 2.0f * s * p;
}

// cos and sin of 2 pi u for u in [0, 1): quadrant k = round(4 u), x = (4 u - k) pi / 2 in [-pi/4, pi/4].
inline void sincos_turns(f32x16 u, f32x16& c, f32x16& s) {
  const f32x16 t = u * 4.0f;
  const i32x16 k = __builtin_convertvector(t + 0.5f, i32x16);  // t >= 0: truncation rounds
  const f32x16 x = (t - __builtin_convertvector(k, f32x16)) * 1.57079632679490f, x2 = x * x;
  const f32x16 sx = x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880)))));
  const f32x16 cx = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320))));
  const i32x16 q = k & 3;
  const i32x16 swap = (q & 1) != 0, neg_c = (q == 1) | (q == 2), neg_s = q >= 2;
  f32x16 cc = swap ? sx : cx, ss = swap ? cx : sx;
  c = neg_c ? -cc : cc;
  s = neg_s ? -ss : ss;
}

// The 64 normals of chunk `chunk`, out[16 m + l].
inline void normals64(uint64_t seed, uint64_t step, int64_t chunk, float out[kChunk]) {
  u32x16 c[4];
  for (int l = 0; l < 16; ++l) c[0][l] = uint32_t(uint64_t(chunk) * 16 + l);
  c[1] = (u32x16){} + uint32_t(step);
  c[2] = (u32x16){} + uint32_t(step >> 32);
  c[3] = (u32x16){};
  // counters beyond 2^32 sites would repeat: chunk * 16 < 2^32 holds for n < 2^36 sites
  philox(c, uint32_t(seed), uint32_t(seed >> 32));
  for (int pair = 0; pair < 2; ++pair) {
    const f32x16 u1 = uniform_open(c[2 * pair]), u2 = uniform_open(c[2 * pair + 1]);
    f32x16 rad = -2.0f * log_positive(u1);
    for (int l = 0; l < 16; ++l) rad[l] = __builtin_sqrtf(rad[l]);
    f32x16 cs, sn;
    sincos_turns(u2, cs, sn);
    const f32x16 z0 = rad * cs, z1 = rad * sn;
    std::memcpy(out + 32 * pair, &z0, sizeof z0);
    std::memcpy(out + 32 * pair + 16, &z1, sizeof z1);
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
  u32x16 c[4];
  for (int w = 0; w < 4; ++w) c[w] = (u32x16){} + ctr[w];
  philox(c, key[0], key[1]);
  for (int w = 0; w < 4; ++w) out[w] = c[w][0];
}
}
