// Fused patch-to-cluster attention layer, forward (Python side: ops/paca/fused.py). Two entry
// points, with the (tiny) cluster-token LayerNorm and kv projection in torch between them:
//
// cfx_paca_clusters: the cluster side. Per tile of patches (on one thread, in its cache): the
// clustering head -- optional depthwise k x k convolution on the patch grid + GELU, optional
// hidden linear + GELU, the linear to M logits (+ an optional (M, N) prior) -- written as
// L^T (N x M), exponentiated against the tile's own column maxima with the column sums and
// E^T X kept per tile; the merge rescales the tiles (online softmax over all N patches) into
// z x and normalises z^T in place.
// Outputs z^T (B, N, M) (normalised; the caller returns its transpose view) and z x (B, M, C).
//
// cfx_paca_queries: the query side.
//
// PaCa's N queries attend to only M cluster tokens (M ~ 100 << N), so a query's scores fit in a
// few hundred bytes and nothing needs streaming. A work item is a tile of queries of one batch
// row; per item, on one thread and in its cache:
//
//   Q  = scale (X Wq^T + bq)               (T x H D)   one GEMM
//   for each head h:
//     S  = Q_h K_h^T                       (T x M)     one GEMM
//     P  = exp(S - rowmax) ;  O_h = P V_h / rowsum     one GEMM, normalised on the T x Dv side
//   out = O Wo^T + bo                      (T x Cout)  one GEMM
//
// X and out are the layer's (B, N, C) tensors, used in place (no head transposes, no N-sized
// intermediate in memory); K and V are read by strides, so the layer passes the two halves of
// its fused kv projection (B, M, 2C) without a copy.
//
// float32, and float64 for the tests; BLAS through cfx::gemm. GELU is the exact (erf) one: in
// float64 through std::erf, in float32 through a vectorisable erf (Abramowitz-Stegun 7.1.26,
// absolute error < 1.5e-7, as torch's vectorised CPU erf). Forward only: the backward
// recomputes the torch form (ops/paca/layer.py).
#include "cfx_native.h"

#include <vector>

CFX_NATIVE_ENTRY()

namespace {

using cfx::i64;

// C = alpha op(A) op(B) + f bias (broadcast over the rows; bias may be null), row-major. With a
// bias, C is filled with it first and the GEMM accumulates (beta = 1): one pass over C instead
// of BLAS zeroing it (beta = 0) and a second pass adding the bias.
template <typename T>
void gemm_bias(bool ta, bool tb, i64 M, i64 N, i64 K, T alpha, const T* A, i64 lda, const T* B,
               i64 ldb, const T* bias, T f, T* C, i64 ldc) {
  if (bias == nullptr) return cfx::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, T(0), C, ldc);
  for (i64 i = 0; i < M; ++i) {
    T* row = C + i * ldc;
#pragma omp simd
    for (i64 c = 0; c < N; ++c) row[c] = f * bias[c];
  }
  cfx::gemm(ta, tb, M, N, K, alpha, A, lda, B, ldb, T(1), C, ldc);
}

struct ClusterArgs {
  i64 B, N, C, Hg, Wg, M, C1, K, tile, threads, is_double;
  const void* x;      // (B, N, C) contiguous, the patches on an Hg x Wg grid (row-major)
  const void* dw_w;   // (C, K, K) depthwise weights, or null (K = 0): no convolution
  const void* dw_b;   // (C) or null
  const void* w1;     // (C1, C) hidden linear, or null (C1 = 0)
  const void* b1;     // (C1) or null
  const void* w2;     // (M, C1 or C) linear to the logits
  const void* b2;     // (M) or null
  const void* prior;  // (M, N) additive logits prior, or null
  void* zt;           // (B, N, M) out: the assignment, transposed (columns sum to 1)
  void* zx;           // (B, M, C) out: z x
};

// 0.5 x (1 + erf(x / sqrt 2)), elementwise in place.
inline void gelu(double* p, i64 n) {
  for (i64 i = 0; i < n; ++i) p[i] = 0.5 * p[i] * (1.0 + std::erf(p[i] * 0.70710678118654752));
}

inline float gelu_one(float x) {
  const float u = x * 0.70710678f, a = std::fabs(u);
  const float t = 1.f / (1.f + 0.3275911f * a);
  float r = 1.061405429f;
  r = r * t - 1.453152027f;
  r = r * t + 1.421413741f;
  r = r * t - 0.284496736f;
  r = r * t + 0.254829592f;
  const float erf_a = 1.f - r * t * cfx::exp_approx(-a * a);
  return 0.5f * x * (1.f + (u < 0.f ? -erf_a : erf_a));
}

// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector merge
// argument (max_ps, roundscale_ps, scalef_ps); a known false positive
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
inline void gelu(float* p, i64 n) {
  i64 i = 0;
#if defined(__AVX512F__)
  // gelu_one 16 lanes at a time, the division as a reciprocal estimate refined by one Newton
  // step (relative error ~1e-7, below the erf approximation's) and 2^k by scalef
  const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(p + i);
    const __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678f));
    const __m512 a = _mm512_abs_ps(u);
    const __m512 den = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one);
    __m512 t = _mm512_rcp14_ps(den);
    t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, _mm512_set1_ps(2.f)));
    t = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), t,
                             _mm512_setzero_ps());  // 1 / inf = 0 (the Newton step gives NaN)
    __m512 r = _mm512_set1_ps(1.061405429f);
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-1.453152027f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(1.421413741f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(-0.284496736f));
    r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(0.254829592f));
    // exp(-a^2): as exp_approx (Cody-Waite, degree-6 polynomial), 0 below -87.3
    const __m512 e_in = _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), a), a),
                                      _mm512_set1_ps(-87.3f));
    const __m512 kf = _mm512_roundscale_ps(_mm512_mul_ps(e_in, _mm512_set1_ps(1.44269504f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 rr = _mm512_fmadd_ps(kf, _mm512_set1_ps(2.12194440e-4f),
                                      _mm512_fnmadd_ps(kf, _mm512_set1_ps(0.693359375f), e_in));
    __m512 e = _mm512_set1_ps(1.3888889e-3f);
    e = _mm512_fmadd_ps(e, rr, _mm512_set1_ps(8.3333333e-3f));
    e = _mm512_fmadd_ps(e, rr, _mm512_set1_ps(4.1666667e-2f));
    e = _mm512_fmadd_ps(e, rr, _mm512_set1_ps(1.6666667e-1f));
    e = _mm512_fmadd_ps(e, rr, half);
    e = _mm512_fmadd_ps(e, rr, one);
    e = _mm512_fmadd_ps(e, rr, one);
    e = _mm512_scalef_ps(e, kf);
    e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(e_in, _mm512_set1_ps(-87.2f), _CMP_LT_OQ), e,
                             _mm512_setzero_ps());
    const __m512 erf_a = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, one);
    const __m512 erf_u = _mm512_mask_sub_ps(erf_a, _mm512_cmp_ps_mask(u, _mm512_setzero_ps(),
                                            _CMP_LT_OQ), _mm512_setzero_ps(), erf_a);
    _mm512_storeu_ps(p + i, _mm512_mul_ps(_mm512_mul_ps(half, x), _mm512_add_ps(one, erf_u)));
  }
#endif
  for (; i < n; ++i) p[i] = gelu_one(p[i]);
}
#pragma GCC diagnostic pop

// One output patch of the depthwise convolution: out[c] = bias[c] + sum over the taps (rows
// r0..r1, columns q0..q1 of the grid; (rt, qt) = the patch of tap (0, 0)) of tap * x. Portable
// version (double, or no AVX-512): channels in blocks of 32 accumulated across the taps.
template <typename T>
void depthwise_patch(const T* x, const T* taps, i64 C, i64 W, i64 K, i64 rt, i64 qt, i64 r0,
                     i64 r1, i64 q0, i64 q1, const T* bias, T* out) {
  constexpr i64 kLanes = 32;
  for (i64 c0 = 0; c0 < C; c0 += kLanes) {
    const i64 w = std::min<i64>(kLanes, C - c0);
    T acc[kLanes];
    for (i64 c = 0; c < kLanes; ++c) acc[c] = c < w && bias ? bias[c0 + c] : T(0);
    for (i64 rr = r0; rr <= r1; ++rr)
      for (i64 qq = q0; qq <= q1; ++qq) {
        const T* src = x + (rr * W + qq) * C + c0;
        const T* tap = taps + ((rr - rt) * K + (qq - qt)) * C + c0;
        for (i64 c = 0; c < w; ++c) acc[c] += tap[c] * src[c];
      }
    for (i64 c = 0; c < w; ++c) out[c0 + c] = acc[c];
  }
}

// The depthwise convolution of tile rows [n0, n0 + t) of one image: y (t x C). Portable
// version: one output patch at a time.
template <typename T>
void depthwise_tile(const T* x, const T* taps, i64 C, i64 Hg, i64 Wg, i64 K, i64 n0, i64 t,
                    const T* bias, T* y) {
  const i64 half = K / 2;
  for (i64 i = 0; i < t; ++i) {
    const i64 n = n0 + i, r = n / Wg, q = n % Wg;
    const i64 r0 = std::max<i64>(0, r - half), r1 = std::min<i64>(Hg - 1, r + half);
    const i64 q0 = std::max<i64>(0, q - half), q1 = std::min<i64>(Wg - 1, q + half);
    depthwise_patch(x, taps, C, Wg, K, r - half, q - half, r0, r1, q0, q1, bias, y + i * C);
  }
}

#if defined(__AVX512F__)
// float with AVX-512: the tile's input rows (plus K/2 above and below) are copied once into a
// zero-padded buffer, so no tap needs a bounds check; then per 16-channel block and run of 8
// neighbouring outputs of one image row, 8 accumulators stay in registers across the K x K
// taps, each tap vector loaded once for the 8 (the per-patch loop above was bound by loads
// from L2: 0.88 ms per thread at N = 3136, C = 96).
template <>
void depthwise_tile<float>(const float* x, const float* taps, i64 C, i64 Hg, i64 Wg, i64 K,
                           i64 n0, i64 t, const float* bias, float* y) {
  constexpr i64 kRun = 8;
  const i64 half = K / 2, r_first = n0 / Wg, r_last = (n0 + t - 1) / Wg;
  const i64 rows = r_last - r_first + 1 + 2 * half, cols = Wg + 2 * half + kRun;
  thread_local std::vector<float> pad;
  pad.resize(rows * cols * C);
  for (i64 pr = 0; pr < rows; ++pr) {  // zero only what no input row fills
    const i64 rr = r_first - half + pr;
    float* row = pad.data() + pr * cols * C;
    if (rr < 0 || rr >= Hg) {
      std::fill(row, row + cols * C, 0.f);
      continue;
    }
    std::fill(row, row + half * C, 0.f);
    std::memcpy(row + half * C, x + rr * Wg * C, sizeof(float) * Wg * C);
    std::fill(row + (half + Wg) * C, row + cols * C, 0.f);
  }
  for (i64 r = r_first; r <= r_last; ++r) {
    const i64 qa = r == r_first ? n0 % Wg : 0;
    const i64 qb = r == r_last ? (n0 + t - 1) % Wg : Wg - 1;
    const float* prow = pad.data() + (r - r_first) * cols * C;  // pad row of input row r - half
    for (i64 c0 = 0; c0 < C; c0 += 16) {
      const i64 rem = C - c0;
      const __mmask16 mask = rem >= 16 ? __mmask16(0xffff) : __mmask16((1u << rem) - 1);
      const __m512 b0 = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
      for (i64 q0 = qa; q0 <= qb; q0 += kRun) {
        // eight named accumulators: as an array GCC keeps them in memory (a store per FMA)
        __m512 a0 = b0, a1 = b0, a2 = b0, a3 = b0, a4 = b0, a5 = b0, a6 = b0, a7 = b0;
        for (i64 dr = 0; dr < K; ++dr) {
          const float* src = prow + (dr * cols + q0) * C + c0;  // pad column q0 + dq
          const float* tap = taps + dr * K * C + c0;
          for (i64 dq = 0; dq < K; ++dq) {
            const __m512 w = _mm512_maskz_loadu_ps(mask, tap + dq * C);
            const float* p = src + dq * C;
#define CFX_DW_FMA(acc, j) acc = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(mask, p + (j) * C), acc)
            CFX_DW_FMA(a0, 0); CFX_DW_FMA(a1, 1); CFX_DW_FMA(a2, 2); CFX_DW_FMA(a3, 3);
            CFX_DW_FMA(a4, 4); CFX_DW_FMA(a5, 5); CFX_DW_FMA(a6, 6); CFX_DW_FMA(a7, 7);
#undef CFX_DW_FMA
          }
        }
        const __m512 acc[kRun] = {a0, a1, a2, a3, a4, a5, a6, a7};
        const i64 nq = std::min(kRun, qb - q0 + 1);
        for (i64 j = 0; j < nq; ++j)
          _mm512_mask_storeu_ps(y + (r * Wg + q0 + j - n0) * C + c0, mask, acc[j]);
      }
    }
  }
}
#endif

i64 cluster_tiles(const ClusterArgs& a) { return (a.N + a.tile - 1) / a.tile; }

// Tile rows [n0, n0 + t) of batch b: the clustering head into L^T = zt rows, and each logit
// column's maximum over the tile into mx (M). taps: the depthwise weights as (K*K, C).
template <typename T>
void cluster_logits_item(const ClusterArgs& a, const T* taps, i64 b, i64 n0, i64 t, T* mx) {
  const i64 C = a.C, M = a.M, K = a.K;
  const T* x = static_cast<const T*>(a.x) + b * a.N * C;
  thread_local std::vector<T> buf;
  buf.resize(t * (C + a.C1));
  T *y = buf.data(), *hid = y + t * C;
  const T* in = x + n0 * C;  // the rows the first linear reads
  if (K) {  // depthwise K x K, 'same' zero padding, then GELU
    const T* bias = static_cast<const T*>(a.dw_b);
    depthwise_tile(x, taps, C, a.Hg, a.Wg, K, n0, t, bias, y);
    gelu(y, t * C);
    in = y;
  }
  i64 width = C;
  if (a.C1) {  // hidden linear + GELU
    gemm_bias(false, true, t, a.C1, C, T(1), in, C, static_cast<const T*>(a.w1), C,
              static_cast<const T*>(a.b1), T(1), hid, a.C1);
    gelu(hid, t * a.C1);
    in = hid;
    width = a.C1;
  }
  T* lt = static_cast<T*>(a.zt) + (b * a.N + n0) * M;
  gemm_bias(false, true, t, M, width, T(1), in, width, static_cast<const T*>(a.w2), width,
            static_cast<const T*>(a.b2), T(1), lt, M);
  if (a.prior != nullptr) {
    const T* prior = static_cast<const T*>(a.prior);
    for (i64 i = 0; i < t; ++i)
      for (i64 m = 0; m < M; ++m) lt[i * M + m] += prior[m * a.N + n0 + i];
  }
  for (i64 m = 0; m < M; ++m) mx[m] = -std::numeric_limits<T>::infinity();
  for (i64 i = 0; i < t; ++i) {
    const T* row = lt + i * M;
#pragma omp simd
    for (i64 m = 0; m < M; ++m) mx[m] = row[m] > mx[m] ? row[m] : mx[m];  // NaN skipped
  }
}

// The softmax over all patches is merged tile by tile (as online softmax): each tile
// exponentiates its logits against its own column maxima m_j (E_j = exp(L_j - m_j), a column
// that is all -inf in the tile against 0, giving zeros), keeps its column sums and E_j^T X_j
// while the tile is in cache; the merge rescales tile j by f_j = exp(m_j - max_j m_j) (0 for an
// all -inf tile column). Non-finite logits end as torch's softmax does: a NaN or +inf makes
// its cluster's column NaN (inf - inf), an all -inf column NaN (0 / 0).
template <typename T>
void cluster_forward(const ClusterArgs& a) {
  const i64 per = cluster_tiles(a), items = a.B * per, M = a.M, C = a.C;
  std::vector<T> mx(items * M), sums(items * M), part(items * M * C), total(a.B * M);
  std::vector<T> taps(a.K * a.K * C);  // (K*K, C): channels contiguous per tap
  for (i64 c = 0; c < C; ++c)
    for (i64 j = 0; j < a.K * a.K; ++j)
      taps[j * C + c] = static_cast<const T*>(a.dw_w)[c * a.K * a.K + j];
  const auto rows = [&](i64 item, i64* b, i64* n0, i64* t) {
    *b = item / per;
    *n0 = (item % per) * a.tile;
    *t = std::min(a.tile, a.N - *n0);
  };
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  cfx::parallel_items(items, static_cast<int>(a.threads), [&](i64 item) {
    i64 b, n0, t;
    rows(item, &b, &n0, &t);
    T* top = mx.data() + item * M;
    cluster_logits_item<T>(a, taps.data(), b, n0, t, top);
    thread_local std::vector<T> shift;
    shift.resize(M);
    for (i64 m = 0; m < M; ++m) shift[m] = top[m] == kNegInf ? T(0) : top[m];
    T* e = static_cast<T*>(a.zt) + (b * a.N + n0) * M;
    T* sum = sums.data() + item * M;
    for (i64 m = 0; m < M; ++m) sum[m] = T(0);
    for (i64 i = 0; i < t; ++i) {
      T* row = e + i * M;
#pragma omp simd
      for (i64 m = 0; m < M; ++m) {
        row[m] = cfx::exp_approx(row[m] - shift[m]);  // NaN stays NaN; inf - inf = NaN
        sum[m] += row[m];
      }
    }
    const T* x = static_cast<const T*>(a.x) + (b * a.N + n0) * C;
    cfx::gemm(true, false, M, C, t, T(1), e, M, x, C, T(0), part.data() + item * M * C, C);
  });
  // f_j (into mx) and 1 / sum_j f_j sums_j (into total), per batch row and cluster
  for (i64 b = 0; b < a.B; ++b)
    for (i64 m = 0; m < M; ++m) {
      T top = kNegInf;
      for (i64 j = 0; j < per; ++j) {
        const T v = mx[(b * per + j) * M + m];
        top = v > top ? v : top;  // NaN maxima are skipped (their sums are NaN already)
      }
      T s = 0;
      for (i64 j = 0; j < per; ++j) {
        T& f = mx[(b * per + j) * M + m];
        f = f == kNegInf ? T(0) : std::exp(f - top);
        s += f * sums[(b * per + j) * M + m];
      }
      total[b * M + m] = T(1) / s;
    }
  // one parallel region: z x = sum over tiles f_j E_j^T X_j / column sum (items < B M), and
  // the z^T tiles normalised in place (the other items)
  cfx::parallel_items(a.B * M + items, static_cast<int>(a.threads), [&](i64 work) {
    if (work < a.B * M) {
      const i64 b = work / M, m = work % M;
      T* out = static_cast<T*>(a.zx) + work * C;
      for (i64 c = 0; c < C; ++c) out[c] = T(0);
      for (i64 j = 0; j < per; ++j) {
        const T* p = part.data() + ((b * per + j) * M + m) * C;
        const T f = mx[(b * per + j) * M + m];
#pragma omp simd
        for (i64 c = 0; c < C; ++c) out[c] += f * p[c];
      }
      const T inv = total[work];
#pragma omp simd
      for (i64 c = 0; c < C; ++c) out[c] *= inv;
      return;
    }
    const i64 item = work - a.B * M;
    i64 b, n0, t;
    rows(item, &b, &n0, &t);
    thread_local std::vector<T> scale;
    scale.resize(M);
    for (i64 m = 0; m < M; ++m) scale[m] = mx[item * M + m] * total[b * M + m];
    T* e = static_cast<T*>(a.zt) + (b * a.N + n0) * M;
    for (i64 i = 0; i < t; ++i) {
      T* row = e + i * M;
#pragma omp simd
      for (i64 m = 0; m < M; ++m) row[m] *= scale[m];
    }
  });
}

struct PacaArgs {
  i64 B, N, H, D, Dv, M, Cin, Cout, tile, threads, is_double;
  i64 xB, xN;      // element strides of x (B, N, Cin), unit channel stride
  i64 kB, kM;      // of k (B, M, H D): head h is columns h D .. h D + D
  i64 vB, vM;      // of v (B, M, H Dv)
  i64 oB, oN;      // of out (B, N, Cout)
  double scale;
  const void* x;
  const void* k;
  const void* v;
  const void* wq;  // (H D, Cin) row-major
  const void* bq;  // (H D) or null
  const void* wo;  // (Cout, H Dv) row-major
  const void* bo;  // (Cout) or null
  void* out;
};

i64 tiles(const PacaArgs& a) { return (a.N + a.tile - 1) / a.tile; }

template <typename T>
void forward_item(const PacaArgs& a, i64 item) {
  const i64 per = tiles(a), b = item / per, n0 = (item % per) * a.tile;
  const i64 t = std::min(a.tile, a.N - n0), H = a.H, D = a.D, Dv = a.Dv, M = a.M;
  const i64 HD = H * D, HDv = H * Dv;
  const T scale = T(a.scale);
  thread_local std::vector<T> buf;
  buf.resize(t * (HD + HDv + M + 1));
  T *q = buf.data(), *o = q + t * HD, *s = o + t * HDv, *sums = s + t * M;

  const T* x = static_cast<const T*>(a.x) + b * a.xB + n0 * a.xN;
  gemm_bias(false, true, t, HD, a.Cin, scale, x, a.xN, static_cast<const T*>(a.wq), a.Cin,
            static_cast<const T*>(a.bq), scale, q, HD);

  for (i64 h = 0; h < H; ++h) {
    const T* k = static_cast<const T*>(a.k) + b * a.kB + h * D;
    const T* v = static_cast<const T*>(a.v) + b * a.vB + h * Dv;
    cfx::gemm(false, true, t, M, D, T(1), q + h * D, HD, k, a.kM, T(0), s, M);
    // exp(s - rowmax) in place. Non-finite scores give a NaN row, as torch's softmax: a NaN
    // propagates through exp_approx, and +inf or an all -inf row make inf - inf = NaN.
    for (i64 i = 0; i < t; ++i) {
      T* row = s + i * M;
      sums[i] = cfx::exp_shifted(row, M, cfx::row_max(row, M));
    }
    T* oh = o + h * Dv;
    cfx::gemm(false, false, t, Dv, M, T(1), s, M, v, a.vM, T(0), oh, HDv);
    for (i64 i = 0; i < t; ++i) {
      const T inv = T(1) / sums[i];
      T* row = oh + i * HDv;
#pragma omp simd
      for (i64 d = 0; d < Dv; ++d) row[d] *= inv;
    }
  }

  T* out = static_cast<T*>(a.out) + b * a.oB + n0 * a.oN;
  gemm_bias(false, true, t, a.Cout, HDv, T(1), o, HDv, static_cast<const T*>(a.wo), HDv,
            static_cast<const T*>(a.bo), T(1), out, a.oN);
}

}  // namespace

extern "C" void cfx_paca_clusters(const ClusterArgs* args) {
  args->is_double ? cluster_forward<double>(*args) : cluster_forward<float>(*args);
}

extern "C" void cfx_paca_queries(const PacaArgs* args) {
  const PacaArgs& a = *args;
  cfx::parallel_items(a.B * tiles(a), static_cast<int>(a.threads), [&](i64 item) {
    a.is_double ? forward_item<double>(a, item) : forward_item<float>(a, item);
  });
}
