// SIMD helpers shared by the native kernels of lattice_lab (GCC / Clang vector extensions).
//
// Sites are the SIMD lanes: a vector holds LL_VBYTES / sizeof(R) consecutive sites (16 floats or 8
// doubles with AVX-512, half that otherwise). Vec<R>::V is the vector type of scalar R; vexp, vtanh,
// vsqrt and vsigmoid act lane by lane with the accuracy stated at each.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#define LL_VBYTES 64
#else
#define LL_VBYTES 32
#endif

typedef float vf_t __attribute__((vector_size(LL_VBYTES)));
typedef double vd_t __attribute__((vector_size(LL_VBYTES)));
template <typename R> struct Vec;
template <> struct Vec<float> { typedef vf_t V; };
template <> struct Vec<double> { typedef vd_t V; };

namespace ll {

// exp(x) for |x| <= max_arg: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series (degree 7 for
// float: relative error < 1e-8; 13 for double: < 1e-17), times 2^n built in the exponent bits.
template <typename R> struct ExpTraits;
template <> struct ExpTraits<float> {
  typedef int32_t I __attribute__((vector_size(LL_VBYTES)));
  static constexpr int degree = 7, mantissa = 23, bias = 127;
  static constexpr float max_arg = 87.0f;
};
template <> struct ExpTraits<double> {
  typedef int64_t I __attribute__((vector_size(LL_VBYTES)));
  static constexpr int degree = 13, mantissa = 52, bias = 1023;
  static constexpr double max_arg = 708.0;
};

template <typename R>
inline typename Vec<R>::V vexp(typename Vec<R>::V x) {
  typedef typename Vec<R>::V V;
  typedef ExpTraits<R> E;
  typedef typename E::I I;
  const R hi = E::max_arg;
  x = x > hi ? (V){} + hi : x;
  x = x < -hi ? (V){} - hi : x;
  const V magic = (V){} + R(1.5) * R(int64_t(1) << E::mantissa);  // round to nearest integer
  const V n = (x * R(1.4426950408889634) + magic) - magic;
  const V r = (x - n * R(0.693145751953125)) - n * R(1.4286068203094172e-06);  // ln2 split hi + lo
  V p = (V){} + R(1);
  for (int k = E::degree; k >= 1; --k) p = p * r * (R(1) / k) + R(1);  // 1 + r (1 + r/2 (1 + r/3 (...)))
  const I bits = (__builtin_convertvector(n, I) + E::bias) << E::mantissa;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename R>
inline typename Vec<R>::V vsqrt(typename Vec<R>::V v) {  // lane by lane; compiled to one vector sqrt
  const int N = sizeof(v) / sizeof(R);
  for (int l = 0; l < N; ++l) v[l] = __builtin_sqrt(v[l]);
  return v;
}

template <typename R>
inline typename Vec<R>::V vtanh(typename Vec<R>::V y) {  // copysign(1 - 2 / (exp(2|y|) + 1), y)
  typedef typename Vec<R>::V V;
  const V a = y < 0 ? -y : y;
  const V t = R(1) - R(2) / (vexp<R>(a + a) + R(1));
  return y < 0 ? -t : t;
}

template <typename R>
inline typename Vec<R>::V vsigmoid(typename Vec<R>::V y) {  // 1 / (1 + exp(-y)), both tails exact
  typedef typename Vec<R>::V V;
  const V a = y < 0 ? -y : y;
  const V e = vexp<R>(-a);  // in (0, 1]: no overflow
  const V s = R(1) / (R(1) + e);
  return y < 0 ? e * s : s;
}

}  // namespace ll
