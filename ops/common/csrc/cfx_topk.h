// Streaming top-k selection of one row of scores (used by i-clustered's centroid rows and by
// top-k attention's query rows): the scores arrive in blocks and one vectorised compare per
// entry against a threshold (a lower bound of the k-th largest so far) lets almost every entry
// pass by untouched. Entries above it are inserted: for k <= 64 into a sorted array of the k
// best (exact threshold, ~k (1 + ln(N/k)) insertions per row); for larger k appended to a
// buffer that is cut back to the k largest (nth_element, one compaction pass) after a block
// that left 2k candidates.
#pragma once

#include <type_traits>

#include "cfx_native.h"

namespace cfx {

// a[from + 1 .. end + 1) = a[from .. end): open a slot at `from`.
template <typename E>
inline void shift_up(E* a, i64 from, i64 end) {
  if (end > from) std::copy_backward(a + from, a + end, a + end + 1);
}

template <typename T>
struct TopK {
  static constexpr i64 kSortedMax = 64;
  i64 k = 0, n = 0;
  T thr = -std::numeric_limits<T>::infinity();
  std::vector<T> val, scratch;
  std::vector<int64_t> idx;

  // Start a row (buffers are kept across rows, so a reused TopK allocates once).
  void init(i64 kk) {
    k = kk;
    n = 0;
    thr = -std::numeric_limits<T>::infinity();
    const size_t cap = static_cast<size_t>(2 * kk + 1024);
    if (val.size() < cap) {
      val.resize(cap);
      idx.resize(cap);
      scratch.resize(cap);
    }
  }

  // Keep the k largest (ties: the earliest pushed); thr = the k-th largest.
  void cut() {
    std::copy(val.begin(), val.begin() + n, scratch.begin());
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.begin() + n,
                     [](T x, T y) { return x > y; });
    const T kth = scratch[k - 1];
    i64 above = 0;
    for (i64 i = 0; i < n; ++i) above += val[i] > kth;
    i64 m = 0, ties = k - above;
    for (i64 i = 0; i < n; ++i) {
      const bool keep = val[i] > kth || (val[i] == kth && ties-- > 0);
      if (keep) {
        val[m] = val[i];
        idx[m++] = idx[i];
      }
    }
    n = m;
    thr = kth;
  }

  i64 count_at_least(T v) const {
    i64 p = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      const __m512 t = _mm512_set1_ps(v);
      for (i64 i = 0; i < n; i += 16) {
        const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
        p += __builtin_popcount(_mm512_mask_cmp_ps_mask(m, _mm512_maskz_loadu_ps(m, &val[i]), t,
                                                        _CMP_GE_OQ));
      }
      return p;
    }
#endif
    for (i64 i = 0; i < n; ++i) p += val[i] >= v;
    return p;
  }

  // Small k: val[0..n) is kept sorted (descending) and exactly the k best so far, so the
  // threshold is always exact and an insertion costs a vectorised count and a short shift.
  bool sorted() const { return k <= kSortedMax; }

  void push(T v, int64_t j) {
    if (sorted()) {
      const i64 p = count_at_least(v);  // entries >= v stay in front (ties: earlier key)
      const i64 end = n < k ? n : k - 1;  // the last entry falls off when full
      shift_up(val.data(), p, end);
      shift_up(idx.data(), p, end);
      val[p] = v;
      idx[p] = j;
      if (n < k) ++n;
      if (n == k) thr = val[k - 1];
      return;
    }
    val[n] = v;
    idx[n] = j;
    if (++n == static_cast<i64>(val.size())) cut();
  }

  // After a block: tighten the threshold once enough candidates piled up.
  void settle() {
    if (!sorted() && n >= 2 * k) cut();
  }

  // Before the first scan: a threshold no higher than the k-th largest of s[0..len), so that
  // the first block does not push every entry. Split s into k groups; each group's maximum
  // is a distinct entry, so the smallest of the k maxima has at least k entries at or above
  // it. (No-op when len < k.)
  void seed(const T* s, i64 len) {
    if (sorted() || n > 0 || len < k) return;
    T lo = std::numeric_limits<T>::infinity();
    for (i64 g = 0; g < k; ++g) {
      const i64 b = g * len / k, e = (g + 1) * len / k;
      T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
      for (i64 j = b; j < e; ++j) mx = s[j] > mx ? s[j] : mx;
      lo = mx < lo ? mx : lo;
    }
    // entries equal to `lo` must pass `s > thr`
    thr = lo == -std::numeric_limits<T>::infinity()
              ? lo
              : std::nextafter(lo, -std::numeric_limits<T>::infinity());
  }

  // Offer s[0..len) as the scores of keys offset + j. -inf (masked) and NaN never enter.
  void scan(const T* s, i64 len, i64 offset) {
    i64 j = 0;
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) {
      __m512 t = _mm512_set1_ps(thr);
      for (; j + 16 <= len; j += 16) {
        __mmask16 m = _mm512_cmp_ps_mask(_mm512_loadu_ps(s + j), t, _CMP_GT_OQ);
        while (m) {  // rare after the first blocks
          const int u = __builtin_ctz(m);
          m &= m - 1;
          if (s[j + u] > thr) push(s[j + u], offset + j + u);
        }
        t = _mm512_set1_ps(thr);
      }
    }
#endif
    for (; j + 16 <= len; j += 16) {
      int any = 0;
      const T t = thr;
#pragma omp simd reduction(| : any)
      for (i64 u = 0; u < 16; ++u) any |= s[j + u] > t;
      if (!any) continue;
      for (i64 u = 0; u < 16; ++u)
        if (s[j + u] > thr) push(s[j + u], offset + j + u);
    }
    for (; j < len; ++j)
      if (s[j] > thr) push(s[j], offset + j);
  }

  // Exactly k entries at the front of val / idx: with fewer than k finite scores, the rest
  // are other keys of [0, nk) at -inf (they get no weight), as torch.topk picks masked keys.
  void finish(i64 nk, std::vector<uint8_t>& taken) {
    if (n > k) cut();
    if (n < k) {
      taken.assign(static_cast<size_t>(nk), 0);
      for (i64 i = 0; i < n; ++i) taken[idx[i]] = 1;
      for (i64 j = 0; j < nk && n < k; ++j)
        if (!taken[j]) {
          val[n] = -std::numeric_limits<T>::infinity();
          idx[n++] = j;
        }
    }
  }
};

}  // namespace cfx
