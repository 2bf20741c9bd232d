// C entry points of the fused quadratic irrep layer (quadratic_layer.h), called by
// lattice_lab.native.quadratic through ctypes.
#include "quadratic_layer.h"

using namespace ll;

extern "C" {
int ll_quadratic_f32(const float* X, int64_t ldx, float* Y, int64_t ldy, int64_t n, const int64_t* dims,
                     const int64_t* groups, const int64_t* terms, const int64_t* copies, const float* W,
                     const float* Wc, const float* bias, const float* coefs, double eps) {
  return dispatch<float>(X, ldx, Y, ldy, n, dims, groups, terms, copies, W, Wc, bias, coefs, float(eps));
}
int ll_quadratic_f64(const double* X, int64_t ldx, double* Y, int64_t ldy, int64_t n, const int64_t* dims,
                     const int64_t* groups, const int64_t* terms, const int64_t* copies, const double* W,
                     const double* Wc, const double* bias, const double* coefs, double eps) {
  return dispatch<double>(X, ldx, Y, ldy, n, dims, groups, terms, copies, W, Wc, bias, coefs, eps);
}
int ll_vector_bytes(void) { return LL_VBYTES; }
}
