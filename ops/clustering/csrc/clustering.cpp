// Fused query clustering (impl="cpu" of clusterfx.ops.clustering; Python side: fused.py).
//
// One OpenMP parallel region per call, one (batch, head) row per work item, handed out one at a
// time. A row runs its whole pipeline in one thread, in cache:
//   1. codes: LSH hash of the queries (bit b = [x . A_b > t_b], A and t from the planes, or the
//      centred SimHash of x M^1/2 when a metric root is given: A = root P^T, t = centre . A);
//   2. k-means: Hamming k-means on the packed 64-bit codes (popcount distance, ties to the
//      lowest index, majority vote with a tie giving 0, empty active clusters re-seeded from
//      the drawn query), or Euclidean k-means on x (or x root) with GEMM distances;
//   3. `refine` Lloyd steps in float32 (centroid = member mean, distance (x-m)^T M (x-m)).
// Same contract and same random plan as reference.py / cpu.py (see clustering/__init__.py).
#include "cfx_native.h"

#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

CFX_NATIVE_ENTRY()

namespace {

using cfx::i64;

enum Mode : i64 { HAMMING = 0, EUCLIDEAN = 1, HASH_ONLY = 2, CODES_KMEANS = 3 };

struct ClusterArgs {
  i64 R, N, D, C, bits, iterations, refine, threads, mode, is_double;
  const void* x;              // (R, N, D) T: queries (modes 0, 1, 2)
  const float* x32;           // (R, N, D) float32 copy for the Lloyd steps (refine > 0)
  const void* planes;         // (bits, D + 1) T (modes 0, 2)
  const void* root;           // (R, D, D) T or null: metric root, given
  const void* metric_src;     // (R, D, D) T or null: take its root here (LAPACK)
  const float* metric;        // (R, D, D) float32 or null: the Lloyd steps' metric
  const uint8_t* centre_mask; // (R, N) or null: queries that set the hash's centre
  const uint8_t* valid;       // (R, N) or null: queries taking part in k-means
  const int64_t* init_idx;    // (R, C)
  const int64_t* reseed_idx;  // (iterations - 1, R, C)
  const uint8_t* active;      // (R, C)
  const int64_t* codes_in;    // (R, N) (mode 3)
  int64_t* codes_out;         // (R, N) or null
  int64_t* assign_out;        // (R, N) or null
  int64_t* counts_out;        // (R, C) or null
};

constexpr i64 kBlock = 1024;  // query rows per GEMM block

// The metric root of row r: given, or computed here from metric_src (float64 eigh), or null.
template <typename T>
const T* row_root(const ClusterArgs& a, i64 r, std::vector<T>& buf) {
  const i64 D = a.D;
  if (a.root != nullptr) return static_cast<const T*>(a.root) + r * D * D;
  if (a.metric_src == nullptr) return nullptr;
  const T* m = static_cast<const T*>(a.metric_src) + r * D * D;
  std::vector<double> md(m, m + D * D), rd(D * D);
  cfx::psd_sqrt(md.data(), D, rd.data());
  buf.assign(rd.begin(), rd.end());
  return buf.data();
}

// The D x bits projection A and thresholds t of one row's hash.
template <typename T>
void hash_projection(const ClusterArgs& a, i64 r, const T* x, std::vector<T>& A,
                     std::vector<T>& thr) {
  const i64 D = a.D, bits = a.bits, N = a.N;
  const T* planes = static_cast<const T*>(a.planes);
  A.assign(D * bits, T(0));
  thr.assign(bits, T(0));
  std::vector<T> root_buf;
  const T* root = row_root<T>(a, r, root_buf);
  if (root == nullptr) {  // A = P^T, t = bias column
    for (i64 b = 0; b < bits; ++b) {
      for (i64 d = 0; d < D; ++d) A[d * bits + b] = planes[b * (D + 1) + d];
      thr[b] = planes[b * (D + 1) + D];
    }
    return;
  }
  // A = root P^T (planes rotated into the metric); t = centre . A (the centring folded in)
  cfx::gemm(false, true, D, bits, D, T(1), root, D, planes, D + 1, T(0), A.data(), bits);
  std::vector<T> centre(D, T(0));
  i64 marked = 0;
  const uint8_t* cm = a.centre_mask ? a.centre_mask + r * N : nullptr;
  for (i64 i = 0; i < N; ++i) {
    if (cm && !cm[i]) continue;
    ++marked;
    for (i64 d = 0; d < D; ++d) centre[d] += x[i * D + d];
  }
  if (marked > 0)
    for (i64 d = 0; d < D; ++d) centre[d] /= T(marked);
  for (i64 d = 0; d < D; ++d)
    for (i64 b = 0; b < bits; ++b) thr[b] += centre[d] * A[d * bits + b];
}

template <typename T>
void hash_row(const ClusterArgs& a, i64 r, const T* x, uint64_t* codes) {
  const i64 N = a.N, D = a.D, bits = a.bits;
  std::vector<T> A, thr;
  hash_projection<T>(a, r, x, A, thr);
  // GEMMs run faster on a multiple of 16 columns: pad A with zero columns (bits not kept)
  const i64 W = (bits + 15) / 16 * 16;
  std::vector<T> Aw(D * W, T(0)), proj(kBlock * W);
  for (i64 d = 0; d < D; ++d) std::copy(&A[d * bits], &A[d * bits] + bits, &Aw[d * W]);
  for (i64 s = 0; s < N; s += kBlock) {
    const i64 n = std::min(kBlock, N - s);
    cfx::gemm(false, false, n, W, D, T(1), x + s * D, D, Aw.data(), W, T(0), proj.data(), W);
    for (i64 i = 0; i < n; ++i) codes[s + i] = cfx::pack_greater(proj.data() + i * W, thr.data(),
                                                                 bits);
  }
}

// Nearest centroid by popcount distance; ties go to the lowest index (the key packs the
// distance above the index, so the smallest key wins).
inline int32_t nearest_code(uint64_t h, const uint64_t* cent, i64 C) {
  uint64_t best = ~uint64_t(0);
  for (i64 c = 0; c < C; ++c) {
    const uint64_t key = (static_cast<uint64_t>(__builtin_popcountll(h ^ cent[c])) << 32) |
                         static_cast<uint64_t>(c);
    best = key < best ? key : best;
  }
  return static_cast<int32_t>(best & 0xffffffffu);
}

// o[b] += bit b of h, for the 64 bits (the majority vote's counters).
inline void add_bits(uint64_t h, int32_t* o) {
#if defined(__AVX512BW__)
  const __m512i bytes = _mm512_movm_epi8(static_cast<__mmask64>(h));  // 0 / -1 per bit
  for (int q = 0; q < 4; ++q) {
    const __m512i m = _mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(bytes, q));
    __m512i* dst = reinterpret_cast<__m512i*>(o + 16 * q);
    _mm512_storeu_si512(dst, _mm512_sub_epi32(_mm512_loadu_si512(dst), m));
  }
#else
  const uint32_t lo = static_cast<uint32_t>(h), hi = static_cast<uint32_t>(h >> 32);
  for (int b = 0; b < 32; ++b) o[b] += static_cast<int32_t>((lo >> b) & 1u);
  for (int b = 0; b < 32; ++b) o[32 + b] += static_cast<int32_t>((hi >> b) & 1u);
#endif
}

void hamming_kmeans_row(const ClusterArgs& a, i64 r, const uint64_t* codes, int32_t* assign) {
  const i64 N = a.N, C = a.C, bits = a.bits;
  const int64_t* init = a.init_idx + r * C;
  const uint8_t* act = a.active + r * C;
  const uint8_t* ok = a.valid ? a.valid + r * N : nullptr;
  std::vector<uint64_t> cent(C);
  std::vector<int32_t> ones(C * 64), count(C);
  for (i64 c = 0; c < C; ++c) cent[c] = codes[init[c]];
  for (i64 t = 0; t < a.iterations; ++t) {
    for (i64 c = 0; c < C; ++c)
      if (!act[c]) cent[c] = cent[0];  // copies of cluster 0 lose every tie to it
    for (i64 i = 0; i < N; ++i)
      assign[i] = (ok && !ok[i]) ? 0 : nearest_code(codes[i], cent.data(), C);
    if (t == a.iterations - 1) break;
    std::fill(ones.begin(), ones.end(), 0);
    std::fill(count.begin(), count.end(), 0);
    for (i64 i = 0; i < N; ++i) {
      if (ok && !ok[i]) continue;
      const i64 c = assign[i];
      ++count[c];
      add_bits(codes[i], ones.data() + c * 64);
    }
    const int64_t* reseed = a.reseed_idx + (t * a.R + r) * C;
    for (i64 c = 0; c < C; ++c) {
      if (!act[c]) continue;
      if (count[c] == 0) {
        cent[c] = codes[reseed[c]];
        continue;
      }
      uint64_t code = 0;
      for (i64 b = 0; b < bits; ++b)
        code |= static_cast<uint64_t>(2 * ones[c * 64 + b] > count[c]) << b;  // tie -> 0
      cent[c] = code;
    }
  }
}

// argmin_c (cst[c] - 2 x_i . cent_c) for every row of x (n x D), ties to the lowest c; a NaN
// distance never wins (index 0 if all are NaN or +inf).
template <typename T>
void nearest_rows(const T* x, i64 n, i64 D, const T* cent, const T* cst, i64 C, int32_t* out,
                  std::vector<T>& dots) {
  dots.resize(kBlock * C);
  for (i64 s = 0; s < n; s += kBlock) {
    const i64 m = std::min(kBlock, n - s);
    cfx::gemm(false, true, m, C, D, T(1), x + s * D, D, cent, D, T(0), dots.data(), C);
    for (i64 i = 0; i < m; ++i) {
      T* g = dots.data() + i * C;
#pragma omp simd
      for (i64 c = 0; c < C; ++c) g[c] = cst[c] - T(2) * g[c];
      out[s + i] = cfx::first_argmin(g, C);
    }
  }
}

// Member sums and counts of x by assignment (all rows, or the `ok` ones).
template <typename T>
void member_sums(const T* x, i64 N, i64 D, const int32_t* assign, const uint8_t* ok, i64 C,
                 std::vector<T>& sums, std::vector<i64>& count) {
  sums.assign(C * D, T(0));
  count.assign(C, 0);
  for (i64 i = 0; i < N; ++i) {
    if (ok && !ok[i]) continue;
    const i64 c = assign[i];
    ++count[c];
    T* s = sums.data() + c * D;
    const T* xi = x + i * D;
    for (i64 d = 0; d < D; ++d) s[d] += xi[d];
  }
}

template <typename T>
void euclidean_kmeans_row(const ClusterArgs& a, i64 r, const T* y, int32_t* assign) {
  const i64 N = a.N, C = a.C, D = a.D;
  const int64_t* init = a.init_idx + r * C;
  const uint8_t* act = a.active + r * C;
  const uint8_t* ok = a.valid ? a.valid + r * N : nullptr;
  std::vector<T> cent(C * D), cst(C), sums, dots;
  std::vector<i64> count;
  for (i64 c = 0; c < C; ++c) std::copy(y + init[c] * D, y + init[c] * D + D, &cent[c * D]);
  for (i64 t = 0; t < a.iterations; ++t) {
    for (i64 c = 0; c < C; ++c) {
      T s = 0;
      for (i64 d = 0; d < D; ++d) s += cent[c * D + d] * cent[c * D + d];
      cst[c] = act[c] ? s : std::numeric_limits<T>::infinity();
    }
    nearest_rows<T>(y, N, D, cent.data(), cst.data(), C, assign, dots);
    if (t == a.iterations - 1) break;
    member_sums<T>(y, N, D, assign, ok, C, sums, count);
    const int64_t* reseed = a.reseed_idx + (t * a.R + r) * C;
    for (i64 c = 0; c < C; ++c) {
      if (count[c] == 0 && act[c]) {
        std::copy(y + reseed[c] * D, y + reseed[c] * D + D, &cent[c * D]);
      } else {
        const T n = T(std::max<i64>(count[c], 1));
        for (i64 d = 0; d < D; ++d) cent[c * D + d] = sums[c * D + d] / n;
      }
    }
  }
  if (ok)
    for (i64 i = 0; i < N; ++i)
      if (!ok[i]) assign[i] = 0;
}

// `steps` Lloyd iterations in float32 from `assign`; empty clusters stay empty.
void lloyd_row(const ClusterArgs& a, i64 r, int32_t* assign) {
  const i64 N = a.N, C = a.C, D = a.D;
  const float* x = a.x32 + r * N * D;
  const float* M = a.metric ? a.metric + r * D * D : nullptr;
  std::vector<float> sums, mapped(C * D), cst(C), dots;
  std::vector<i64> count;
  for (i64 s = 0; s < a.refine; ++s) {
    member_sums<float>(x, N, D, assign, nullptr, C, sums, count);
    for (i64 c = 0; c < C; ++c) {
      const float n = static_cast<float>(std::max<i64>(count[c], 1));
      for (i64 d = 0; d < D; ++d) sums[c * D + d] /= n;  // the means
    }
    if (M) {
      cfx::gemm(false, false, C, D, D, 1.f, sums.data(), D, M, D, 0.f, mapped.data(), D);
    } else {
      mapped = sums;
    }
    for (i64 c = 0; c < C; ++c) {
      float v = 0;
      for (i64 d = 0; d < D; ++d) v += sums[c * D + d] * mapped[c * D + d];
      cst[c] = count[c] == 0 ? std::numeric_limits<float>::infinity() : v;
    }
    nearest_rows<float>(x, N, D, mapped.data(), cst.data(), C, assign, dots);
  }
}

template <typename T>
void cluster_row(const ClusterArgs& a, i64 r) {
  const i64 N = a.N, D = a.D, C = a.C;
  const T* x = a.x ? static_cast<const T*>(a.x) + r * N * D : nullptr;
  std::vector<uint64_t> codes;
  if (a.mode == HAMMING || a.mode == HASH_ONLY) {
    codes.resize(N);
    hash_row<T>(a, r, x, codes.data());
  } else if (a.mode == CODES_KMEANS) {
    const uint64_t keep = a.bits >= 64 ? ~uint64_t(0) : ((uint64_t(1) << a.bits) - 1);
    codes.resize(N);
    for (i64 i = 0; i < N; ++i) codes[i] = static_cast<uint64_t>(a.codes_in[r * N + i]) & keep;
  }
  if (a.codes_out)
    for (i64 i = 0; i < N; ++i) a.codes_out[r * N + i] = static_cast<int64_t>(codes[i]);
  if (a.mode == HASH_ONLY) return;
  std::vector<int32_t> assign(N);
  if (a.mode == EUCLIDEAN) {
    std::vector<T> root_buf;
    const T* root = row_root<T>(a, r, root_buf);
    if (root) {  // k-means on y = x root
      std::vector<T> y(N * D);
      cfx::gemm(false, false, N, D, D, T(1), x, D, root, D, T(0), y.data(), D);
      euclidean_kmeans_row<T>(a, r, y.data(), assign.data());
    } else {
      euclidean_kmeans_row<T>(a, r, x, assign.data());
    }
  } else {
    hamming_kmeans_row(a, r, codes.data(), assign.data());
  }
  if (a.refine > 0) lloyd_row(a, r, assign.data());
  const uint8_t* ok = (a.valid && a.refine == 0) ? a.valid + r * N : nullptr;
  if (a.assign_out)
    for (i64 i = 0; i < N; ++i) a.assign_out[r * N + i] = assign[i];
  if (a.counts_out) {
    int64_t* cnt = a.counts_out + r * C;
    std::fill(cnt, cnt + C, 0);
    for (i64 i = 0; i < N; ++i)
      if (!ok || ok[i]) ++cnt[assign[i]];
  }
}

}  // namespace

extern "C" void cfx_cluster(const ClusterArgs* args) {
  const ClusterArgs& a = *args;
  cfx::parallel_items(a.R, static_cast<int>(a.threads), [&](i64 r) {
    if (a.is_double) {
      cluster_row<double>(a, r);
    } else {
      cluster_row<float>(a, r);
    }
  });
}
