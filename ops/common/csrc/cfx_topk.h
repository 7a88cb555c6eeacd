// Streaming top-k selection of one row of scores (used by i-clustered's centroid rows and by
// top-k attention's query rows): the scores arrive in blocks; entries above the current k-th
// largest are appended to a buffer, which is cut back to the k largest (nth_element, no
// allocation) when it fills. After the first blocks almost no entry passes the threshold, so a
// block costs one vectorised compare per entry.
#pragma once

#include "cfx_native.h"

namespace cfx {

template <typename T>
struct TopK {
  struct Entry {
    T val;
    int64_t idx;
  };
  i64 k = 0, n = 0;
  T thr = -std::numeric_limits<T>::infinity();
  std::vector<Entry> buf;

  void init(i64 kk) {
    k = kk;
    n = 0;
    thr = -std::numeric_limits<T>::infinity();
    buf.resize(static_cast<size_t>(4 * kk + 64));
  }

  // Keep the k largest (ties: any of them); thr = the smallest kept.
  void cut() {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + n,
                     [](const Entry& x, const Entry& y) { return x.val > y.val; });
    n = k;
    T lo = buf[0].val;
    for (i64 i = 1; i < k; ++i) lo = buf[i].val < lo ? buf[i].val : lo;
    thr = lo;
  }

  void push(T v, int64_t j) {
    buf[n].val = v;
    buf[n].idx = j;
    if (++n == static_cast<i64>(buf.size())) cut();
  }

  // Offer s[0..len) as the scores of keys offset + j. -inf (masked) and NaN never enter.
  void scan(const T* s, i64 len, i64 offset) {
    i64 j = 0;
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

  // Exactly k entries at the front of buf: with fewer than k finite scores, the rest are other
  // keys of [0, nk) at -inf (they get no weight), as torch.topk would pick masked keys.
  void finish(i64 nk, std::vector<uint8_t>& taken) {
    if (n > k) cut();
    if (n < k) {
      taken.assign(static_cast<size_t>(nk), 0);
      for (i64 i = 0; i < n; ++i) taken[buf[i].idx] = 1;
      for (i64 j = 0; j < nk && n < k; ++j)
        if (!taken[j]) {
          buf[n].val = -std::numeric_limits<T>::infinity();
          buf[n++].idx = j;
        }
    }
  }
};

}  // namespace cfx
