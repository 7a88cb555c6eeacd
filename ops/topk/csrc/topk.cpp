// Fused exact top-k attention (impl="cpu" of clusterfx.ops.topk; Python side: fused.py).
//
// Exact top-k needs every score q_i . k_j but only k columns of P V. Work items are blocks of
// 128 queries of one (batch, head) row, handed out one at a time on one OpenMP parallel
// region. An item streams the keys in blocks of 512: a BLAS GEMM gives the 128 x 512 scores,
// the additive mask (any broadcast, by strides) and causality are applied, and each query's
// streaming top-k (cfx_topk.h) keeps its k largest. Then, per query, a softmax over the k kept
// scores and a k-row weighted sum of V. Memory: O(128 x 512) scores per thread and O(N k) out.
// Causal items stop at the last key their queries can see.
//
// Backward (given the selection `idx` of a forward run): per query, the k scores are
// recomputed, a = softmax, o = sum a v, ds_l = a_l (g . v_l - g . o); dq = s sum ds_l k_l,
// dk_l += s ds_l q, dv_l += a_l g. Work items are whole (batch, query head) rows, so the
// per-query-head dK / dV rows each item writes are its own (the caller sums GQA groups).
#include "cfx_native.h"
#include "cfx_topk.h"

CFX_NATIVE_ENTRY()

namespace {

using cfx::i64;

struct TopkArgs {
  i64 B, H, Hk, Nq, Nk, D, Dv, topk, threads, is_double, causal;
  i64 mB, mH, mQ, mK;  // element strides of the additive mask (0 = broadcast)
  double scale;
  const void* q;         // (B, H, Nq, D)
  const void* k;         // (B, Hk, Nk, D)
  const void* v;         // (B, Hk, Nk, Dv)
  const void* mask;      // additive mask in the compute dtype, or null
  void* out;             // (B, H, Nq, Dv) or null (selection only)
  int64_t* idx;          // (B, H, Nq, topk): written by the forward if given, read by backward
  const void* grad_out;  // (B, H, Nq, Dv)
  void* dq;              // (B, H, Nq, D)
  void* dk;              // (B, H, Nk, D): per query head
  void* dv;              // (B, H, Nk, Dv)
};

constexpr i64 kQueries = 128, kKeys = 512;

template <typename T>
struct RowPtrs {
  const T *q, *k, *v, *mask;
  i64 b, h;
  RowPtrs(const TopkArgs& a, i64 r) {
    b = r / a.H;
    h = r % a.H;
    const i64 kv = b * a.Hk + h / (a.H / a.Hk);
    q = static_cast<const T*>(a.q) + r * a.Nq * a.D;
    k = static_cast<const T*>(a.k) + kv * a.Nk * a.D;
    v = static_cast<const T*>(a.v) + kv * a.Nk * a.Dv;
    mask = a.mask ? static_cast<const T*>(a.mask) + b * a.mB + h * a.mH : nullptr;
  }
};

// Softmax of the k selected scores in place (all -inf -> zeros).
template <typename T>
void softmax_selected(T* w, i64 kk) {
  T mx = -std::numeric_limits<T>::infinity();
  for (i64 t = 0; t < kk; ++t) mx = w[t] > mx ? w[t] : mx;
  if (mx == -std::numeric_limits<T>::infinity()) {
    std::fill(w, w + kk, T(0));
    return;
  }
  T sum = 0;
  for (i64 t = 0; t < kk; ++t) {
    w[t] = cfx::exp_approx(w[t] - mx);
    sum += w[t];
  }
  for (i64 t = 0; t < kk; ++t) w[t] /= sum;
}

template <typename T>
void forward_item(const TopkArgs& a, i64 item) {
  const i64 blocks = (a.Nq + kQueries - 1) / kQueries;
  const i64 r = item / blocks, q0 = (item % blocks) * kQueries;
  const i64 nq = std::min(kQueries, a.Nq - q0), D = a.D, Dv = a.Dv, kk = a.topk;
  RowPtrs<T> row(a, r);
  const T scale = T(a.scale);
  const i64 key_end = a.causal ? std::min(a.Nk, q0 + nq) : a.Nk;  // keys any query here sees
  // per-thread scratch, kept across items (a TopK's buffers are reused by init)
  thread_local std::vector<T> S;
  thread_local std::vector<cfx::TopK<T>> tops;
  S.resize(kQueries * kKeys);
  if (static_cast<i64>(tops.size()) < nq) tops.resize(nq);
  for (i64 i = 0; i < nq; ++i) tops[i].init(kk);
  std::vector<T> w(kk);
  for (i64 s = 0; s < key_end; s += kKeys) {
    const i64 n = std::min(kKeys, key_end - s);
    cfx::gemm(false, true, nq, n, D, scale, row.q + q0 * D, D, row.k + s * D, D, T(0),
              S.data(), kKeys);
    for (i64 i = 0; i < nq; ++i) {
      T* p = S.data() + i * kKeys;
      if (row.mask) {
        const T* m = row.mask + (q0 + i) * a.mQ + s * a.mK;
        if (a.mK == 1) {
#pragma omp simd
          for (i64 j = 0; j < n; ++j) p[j] += m[j];
        } else {
          for (i64 j = 0; j < n; ++j) p[j] += m[j * a.mK];
        }
      }
      i64 len = n;
      if (a.causal) len = std::max<i64>(0, std::min(n, q0 + i + 1 - s));  // key j <= query i
      if (s == 0) tops[i].seed(p, len);
      tops[i].scan(p, len, s);
      tops[i].settle();
    }
  }
  std::vector<uint8_t> taken;
  T* out = a.out ? static_cast<T*>(a.out) + (r * a.Nq + q0) * Dv : nullptr;
  for (i64 i = 0; i < nq; ++i) {
    cfx::TopK<T>& top = tops[i];
    top.finish(a.Nk, taken);
    if (a.idx)
      for (i64 t = 0; t < kk; ++t) a.idx[(r * a.Nq + q0 + i) * kk + t] = top.idx[t];
    if (!out) continue;
    for (i64 t = 0; t < kk; ++t) w[t] = top.val[t];
    softmax_selected(w.data(), kk);
    T* o = out + i * Dv;
    std::fill(o, o + Dv, T(0));
    for (i64 t = 0; t < kk; ++t) {
      if (w[t] == T(0)) continue;
      const T* vr = row.v + top.idx[t] * Dv;
#pragma omp simd
      for (i64 d = 0; d < Dv; ++d) o[d] += w[t] * vr[d];
    }
  }
}

template <typename T>
void backward_row(const TopkArgs& a, i64 r) {
  const i64 Nq = a.Nq, Nk = a.Nk, D = a.D, Dv = a.Dv, kk = a.topk;
  RowPtrs<T> row(a, r);
  const T scale = T(a.scale);
  const T* g = static_cast<const T*>(a.grad_out) + r * Nq * Dv;
  T* dq = static_cast<T*>(a.dq) + r * Nq * D;
  T* dk = static_cast<T*>(a.dk) + r * Nk * D;
  T* dv = static_cast<T*>(a.dv) + r * Nk * Dv;
  std::fill(dk, dk + Nk * D, T(0));
  std::fill(dv, dv + Nk * Dv, T(0));
  std::vector<T> w(kk), dp(kk), o(Dv);
  for (i64 i = 0; i < Nq; ++i) {
    const int64_t* idx = a.idx + (r * Nq + i) * kk;
    const T* qi = row.q + i * D;
    const T* gi = g + i * Dv;
    for (i64 t = 0; t < kk; ++t) {
      const i64 j = idx[t];
      const T* kj = row.k + j * D;
      T s = 0;
      for (i64 d = 0; d < D; ++d) s += qi[d] * kj[d];
      s *= scale;
      if (row.mask) s += row.mask[i * a.mQ + j * a.mK];
      if (a.causal && j > i) s = -std::numeric_limits<T>::infinity();
      w[t] = s;
    }
    softmax_selected(w.data(), kk);
    std::fill(o.begin(), o.end(), T(0));
    T go = 0;
    for (i64 t = 0; t < kk; ++t) {
      const T* vj = row.v + idx[t] * Dv;
      T s = 0;
      for (i64 d = 0; d < Dv; ++d) {
        o[d] += w[t] * vj[d];
        s += gi[d] * vj[d];
      }
      dp[t] = s;
    }
    for (i64 d = 0; d < Dv; ++d) go += gi[d] * o[d];
    T* dqi = dq + i * D;
    std::fill(dqi, dqi + D, T(0));
    for (i64 t = 0; t < kk; ++t) {
      if (w[t] == T(0)) continue;
      const i64 j = idx[t];
      const T ds = w[t] * (dp[t] - go) * scale;
      const T* kj = row.k + j * D;
      T* dkj = dk + j * D;
      T* dvj = dv + j * Dv;
      for (i64 d = 0; d < D; ++d) {
        dqi[d] += ds * kj[d];
        dkj[d] += ds * qi[d];
      }
      for (i64 d = 0; d < Dv; ++d) dvj[d] += w[t] * gi[d];
    }
  }
}

}  // namespace

extern "C" void cfx_topk_forward(const TopkArgs* args) {
  const TopkArgs& a = *args;
  const i64 items = a.B * a.H * ((a.Nq + kQueries - 1) / kQueries);
  cfx::parallel_items(items, static_cast<int>(a.threads), [&](i64 item) {
    a.is_double ? forward_item<double>(a, item) : forward_item<float>(a, item);
  });
}

extern "C" void cfx_topk_backward(const TopkArgs* args) {
  const TopkArgs& a = *args;
  cfx::parallel_items(a.B * a.H, static_cast<int>(a.threads), [&](i64 r) {
    a.is_double ? backward_row<double>(a, r) : backward_row<float>(a, r);
  });
}
