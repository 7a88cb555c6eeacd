// Shared helpers of the clusterfx C++ kernels (see ops/common/native.py): row-major GEMM on
// torch's BLAS (or portable loops), a symmetric eigen-solver on torch's LAPACK, a vectorisable
// exp, and one parallel loop. Standard C++ and OpenMP only: no torch or Python headers.
//
// Each family's translation unit invokes CFX_NATIVE_ENTRY() once, which defines the exported
// `cfx_set_lapack(sgemm, dgemm, dsyevd)` that Python calls right after loading the library.
#pragma once

#include <omp.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace cfx {

using i64 = int64_t;

// Fortran BLAS / LAPACK signatures (column-major, arguments by pointer).
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const float*, const float*, const int*, const float*, const int*,
                          const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*,
                          const double*, const double*, const int*, const double*, const int*,
                          const double*, double*, const int*);
using dsyevd_fn = void (*)(const char*, const char*, const int*, double*, const int*, double*,
                           double*, const int*, int*, const int*, int*);

inline sgemm_fn g_sgemm = nullptr;
inline dgemm_fn g_dgemm = nullptr;
inline dsyevd_fn g_dsyevd = nullptr;

// C = alpha * op(A) * op(B) + beta * C, all row-major; op(A) is M x K, op(B) is K x N.
// Portable version: packs op(B) as K x N and runs an i-p-j loop the compiler vectorises.
template <typename T>
void gemm_loops(bool ta, bool tb, i64 M, i64 N, i64 K, T alpha, const T* A, i64 lda,
                const T* B, i64 ldb, T beta, T* C, i64 ldc) {
  std::vector<T> b(static_cast<size_t>(K * N)), row(static_cast<size_t>(N));
  for (i64 p = 0; p < K; ++p)
    for (i64 j = 0; j < N; ++j) b[p * N + j] = tb ? B[j * ldb + p] : B[p * ldb + j];
  for (i64 i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), T(0));
    for (i64 p = 0; p < K; ++p) {
      const T a = ta ? A[p * lda + i] : A[i * lda + p];
      const T* bp = b.data() + p * N;
      for (i64 j = 0; j < N; ++j) row[j] += a * bp[j];
    }
    T* c = C + i * ldc;
    if (beta == T(0)) {
      for (i64 j = 0; j < N; ++j) c[j] = alpha * row[j];
    } else {
      for (i64 j = 0; j < N; ++j) c[j] = alpha * row[j] + beta * c[j];
    }
  }
}

// Row-major GEMM through column-major BLAS: C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, i64 M, i64 N, i64 K, float alpha, const float* A, i64 lda,
                 const float* B, i64 ldb, float beta, float* C, i64 ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (i64 i = 0; i < M; ++i)
      for (i64 j = 0; j < N; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  if (g_sgemm == nullptr) return gemm_loops<float>(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta,
                                                   C, ldc);
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  g_sgemm(&tB, &tA, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

inline void gemm(bool ta, bool tb, i64 M, i64 N, i64 K, double alpha, const double* A, i64 lda,
                 const double* B, i64 ldb, double beta, double* C, i64 ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (i64 i = 0; i < M; ++i)
      for (i64 j = 0; j < N; ++j) C[i * ldc + j] = beta == 0. ? 0. : beta * C[i * ldc + j];
    return;
  }
  if (g_dgemm == nullptr) return gemm_loops<double>(ta, tb, M, N, K, alpha, A, lda, B, ldb,
                                                    beta, C, ldc);
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
  g_dgemm(&tB, &tA, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
}

// exp(x) for float, vectorisable (no libm call): Cody-Waite reduction x = k ln2 + r,
// |r| <= ln2/2, a degree-6 polynomial for e^r (relative error < 2e-7), scaled by 2^k.
// Underflows to exactly 0 below -87.3 (so exp(-inf) = 0); x > 88.7 is not expected (softmax
// arguments are <= 0) and saturates.
inline float exp_approx(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.7f);
  const float kf = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  const float r = (xc - kf * 0.693359375f) + kf * 2.12194440e-4f;
  float p = 1.3888889e-3f;
  p = p * r + 8.3333333e-3f;
  p = p * r + 4.1666667e-2f;
  p = p * r + 1.6666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.3f ? 0.f : p * scale;
}

inline double exp_approx(double x) { return std::exp(x); }

// max of p[0..n) (NaN entries may be skipped; -inf for n = 0), vectorised.
template <typename T>
inline T row_max(const T* p, i64 n) {
  T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
  for (i64 j = 0; j < n; ++j) mx = p[j] > mx ? p[j] : mx;
  return mx;
}

// p[j] = exp(p[j] - shift) in place; returns the sum (vectorised, lane-wise partial sums).
template <typename T>
inline T exp_shifted(T* p, i64 n, T shift) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (i64 j = 0; j < n; ++j) {
    const T e = exp_approx(p[j] - shift);
    p[j] = e;
    sum += e;
  }
  return sum;
}

// Index of the first minimum of p[0..n) (n >= 1); NaN entries never win (0 if all are NaN).
template <typename T>
inline int32_t first_argmin(const T* p, i64 n) {
  T best = std::numeric_limits<T>::infinity();
#pragma omp simd reduction(min : best)
  for (i64 j = 0; j < n; ++j) best = p[j] < best ? p[j] : best;
  for (i64 j = 0; j < n; ++j)
    if (p[j] == best) return static_cast<int32_t>(j);
  return 0;
}

#if defined(__AVX512F__)
template <>
inline int32_t first_argmin<float>(const float* p, i64 n) {
  __m512 lo = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (i64 j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __m512 v = _mm512_mask_loadu_ps(lo, m, p + j);
    lo = _mm512_min_ps(v, lo);  // a NaN in v yields lo
  }
  const __m512 best = _mm512_set1_ps(_mm512_reduce_min_ps(lo));
  for (i64 j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const __mmask16 eq = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, p + j), best,
                                                 _CMP_EQ_OQ);
    if (eq) return static_cast<int32_t>(j + __builtin_ctz(eq));
  }
  return 0;
}
#endif

// Bit b (b < bits <= 64) set where p[b] > t[b].
template <typename T>
inline uint64_t pack_greater(const T* p, const T* t, i64 bits) {
  uint64_t code = 0;
  for (i64 b = 0; b < bits; ++b) code |= static_cast<uint64_t>(p[b] > t[b]) << b;
  return code;
}

#if defined(__AVX512F__)
template <>
inline uint64_t pack_greater<float>(const float* p, const float* t, i64 bits) {
  uint64_t code = 0;
  for (i64 b = 0; b < bits; b += 16) {
    const __mmask16 m = bits - b >= 16 ? __mmask16(0xffff) : __mmask16((1u << (bits - b)) - 1);
    const __mmask16 gt = _mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, p + b),
                                                 _mm512_maskz_loadu_ps(m, t + b), _CMP_GT_OQ);
    code |= static_cast<uint64_t>(gt) << b;
  }
  return code;
}
#endif

// Symmetric positive semi-definite square root V sqrt(max(L, 0)) V^T of a D x D matrix
// (row-major; only symmetric input is meaningful), computed in float64. A matrix with a
// non-finite entry gets the identity (as clustering.metric_root). Needs LAPACK (g_dsyevd).
inline void psd_sqrt(const double* m, i64 D, double* root) {
  bool finite = true;
  for (i64 i = 0; i < D * D; ++i) finite = finite && std::isfinite(m[i]);
  if (!finite) {
    for (i64 i = 0; i < D; ++i)
      for (i64 j = 0; j < D; ++j) root[i * D + j] = i == j ? 1. : 0.;
    return;
  }
  std::vector<double> a(m, m + D * D), w(D);
  const int n = static_cast<int>(D), lwork = 1 + 6 * n + 2 * n * n, liwork = 3 + 5 * n;
  std::vector<double> work(lwork);
  std::vector<int> iwork(liwork);
  int info = 0;
  const char jobz = 'V', uplo = 'L';
  g_dsyevd(&jobz, &uplo, &n, a.data(), &n, w.data(), work.data(), &lwork, iwork.data(),
           &liwork, &info);
  // column-major eigenvectors: row e of `a` is eigenvector e
  std::vector<double> scaled(D * D);
  for (i64 e = 0; e < D; ++e) {
    const double s = std::sqrt(std::max(w[e], 0.));
    for (i64 i = 0; i < D; ++i) scaled[e * D + i] = a[e * D + i] * s;
  }
  // root = sum_e s_e v_e v_e^T = scaled^T a
  gemm(true, false, D, D, D, 1.0, scaled.data(), D, a.data(), D, 0.0, root, D);
}

// Run body(i) for i in [0, n) on `threads` OpenMP threads, handing out items one at a time:
// a thread that the OS preempts (a busy machine) then holds back at most one item, and the
// others take the rest, instead of the whole static share waiting at the barrier.
template <typename F>
void parallel_items(i64 n, int threads, F&& body) {
  if (n <= 0) return;
  const int t = static_cast<int>(std::max<i64>(1, std::min<i64>(threads, n)));
  if (t == 1) {
    for (i64 i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(t)
  for (i64 i = 0; i < n; ++i) body(i);
}

}  // namespace cfx

#define CFX_NATIVE_ENTRY()                                                   \
  extern "C" void cfx_set_lapack(void* sgemm, void* dgemm, void* dsyevd) {  \
    cfx::g_sgemm = reinterpret_cast<cfx::sgemm_fn>(sgemm);                   \
    cfx::g_dgemm = reinterpret_cast<cfx::dgemm_fn>(dgemm);                   \
    cfx::g_dsyevd = reinterpret_cast<cfx::dsyevd_fn>(dsyevd);                \
  }
