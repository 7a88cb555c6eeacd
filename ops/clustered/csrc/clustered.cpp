// Fused clustered and improved-clustered attention for given cluster assignments (impl="cpu"
// of clusterfx.ops.clustered; Python side: fused.py; the math: reference.py).
//
// One OpenMP parallel region per call, one (batch, query head) row per work item. A row:
//   centroids Q^c_j = mean of the member queries (empty clusters dropped);
//   A^c = softmax(s Q^c K^T + beta) and O^c = A^c V by blocks of keys with a running max and
//   sum (the C x Nk matrix is never stored), with BLAS GEMMs for both products;
//   clustered: O_i = O^c_{a(i)};
//   improved: the top-k keys T_j of every centroid row are kept while the blocks stream by,
//   then each cluster's members attend exactly to its k keys (two small GEMMs per cluster):
//   O_i = (O^c_j - sum_{l in T_j} A^c_jl v_l) + m_j softmax_{T_j}(s q_i . k_l + beta_l) V_T,
//   m_j = sum_{l in T_j} A^c_jl.
// Backward (clustered): the flash-attention backward of the C centroid rows (a first pass
// recomputes the softmax statistics and O^c), with dO^c_j = sum of the members' dO_i and
// dq_i = dQ^c_j / n_j. A batch element without any valid key gives zeros (and zero gradients).
// GQA: query head h reads key/value head h / (H / Hk); the backward writes per-query-head dK,
// dV (the caller sums the groups).
#include "cfx_native.h"
#include "cfx_topk.h"

CFX_NATIVE_ENTRY()

namespace {

using cfx::i64;

struct AttnArgs {
  i64 B, H, Hk, Nq, Nk, D, Dv, C, topk, threads, is_double;
  double scale;
  const void* q;          // (B, H, Nq, D)
  const void* k;          // (B, Hk, Nk, D)
  const void* v;          // (B, Hk, Nk, Dv)
  const int64_t* assign;  // (B, H, Nq) in [0, C)
  const uint8_t* mask;    // (B, Nk) or null: True = keep
  void* out;              // (B, H, Nq, Dv)
  int64_t* idx_out;       // (B, H, C, topk) (improved)
  const void* grad_out;   // (B, H, Nq, Dv) (backward)
  void* dq;               // (B, H, Nq, D)
  void* dk;               // (B, H, Nk, D): per query head
  void* dv;               // (B, H, Nk, Dv)
};

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Keys per block: the C x block score tile stays within about 256 KiB.
inline i64 key_block(i64 C, i64 Nk) {
  i64 bk = (65536 / std::max<i64>(C, 1)) / 16 * 16;
  bk = std::min<i64>(std::max<i64>(bk, 64), 512);
  return std::min(bk, Nk);
}

// One (batch, head) row: pointers and the clusters that have members.
template <typename T>
struct Row {
  const T *q, *k, *v;
  const int64_t* a;
  const uint8_t* mask;
  i64 Nq, Nk, D, Dv, C;
  std::vector<i64> count;  // members per cluster
  std::vector<int32_t> live;  // cluster ids with members, in order
  std::vector<int32_t> slot;  // cluster -> index in `live` (-1: empty)
  std::vector<T> qc;          // (live, D) centroids
  bool has_key = false;

  Row(const AttnArgs& a, i64 r) : Nq(a.Nq), Nk(a.Nk), D(a.D), Dv(a.Dv), C(a.C) {
    const i64 b = r / a.H, h = r % a.H, kv = b * a.Hk + h / (a.H / a.Hk);
    q = static_cast<const T*>(a.q) + r * Nq * D;
    k = static_cast<const T*>(a.k) + kv * Nk * D;
    v = static_cast<const T*>(a.v) + kv * Nk * Dv;
    this->a = a.assign + r * Nq;
    mask = a.mask ? a.mask + b * Nk : nullptr;
    has_key = mask == nullptr;
    for (i64 j = 0; mask && j < Nk && !has_key; ++j) has_key = mask[j] != 0;
    count.assign(C, 0);
    for (i64 i = 0; i < Nq; ++i) ++count[this->a[i]];
    slot.assign(C, -1);
    for (i64 c = 0; c < C; ++c)
      if (count[c] > 0) {
        slot[c] = static_cast<int32_t>(live.size());
        live.push_back(static_cast<int32_t>(c));
      }
    qc.assign(live.size() * D, T(0));
    for (i64 i = 0; i < Nq; ++i) {
      T* dst = qc.data() + slot[this->a[i]] * D;
      const T* src = q + i * D;
      for (i64 d = 0; d < D; ++d) dst[d] += src[d];
    }
    for (size_t j = 0; j < live.size(); ++j) {
      const T n = T(count[live[j]]);
      for (i64 d = 0; d < D; ++d) qc[j * D + d] /= n;
    }
  }
  i64 L() const { return static_cast<i64>(live.size()); }
};

// Scores of the live centroids against keys [s, s + n): S = scale Q^c K_blk^T, masked -> -inf.
template <typename T>
void block_scores(const Row<T>& row, T scale, i64 s, i64 n, T* S, i64 ldS) {
  cfx::gemm(false, true, row.L(), n, row.D, scale, row.qc.data(), row.D, row.k + s * row.D,
            row.D, T(0), S, ldS);
  if (row.mask) {
    for (i64 c = 0; c < row.L(); ++c)
      for (i64 j = 0; j < n; ++j)
        if (!row.mask[s + j]) S[c * ldS + j] = neg_inf<T>();
  }
}

// Softmax statistics and O^c = A^c V of the live centroids (running max m, sum l); with
// `tops`, also each row's top-k logits. On return O holds the normalised output.
template <typename T>
void centroid_attention(const Row<T>& row, T scale, std::vector<T>& m, std::vector<T>& l,
                        std::vector<T>& O, std::vector<cfx::TopK<T>>* tops) {
  const i64 L = row.L(), Nk = row.Nk, Dv = row.Dv;
  const i64 bk = key_block(L, Nk);
  std::vector<T> S(L * bk);
  m.assign(L, neg_inf<T>());
  l.assign(L, T(0));
  O.assign(L * Dv, T(0));
  for (i64 s = 0; s < Nk; s += bk) {
    const i64 n = std::min(bk, Nk - s);
    block_scores(row, scale, s, n, S.data(), bk);
    for (i64 c = 0; c < L; ++c) {
      T* p = S.data() + c * bk;
      if (tops) {
        if (s == 0) (*tops)[c].seed(p, n);
        (*tops)[c].scan(p, n, s);
        (*tops)[c].settle();
      }
      const T mnew = std::max(m[c], cfx::row_max(p, n));
      if (mnew == neg_inf<T>()) {  // no valid key yet in this row
        std::fill(p, p + n, T(0));
        continue;
      }
      const T alpha = cfx::exp_approx(m[c] - mnew);
      l[c] = l[c] * alpha + cfx::exp_shifted(p, n, mnew);
      m[c] = mnew;
      if (alpha != T(1))
        for (i64 d = 0; d < Dv; ++d) O[c * Dv + d] *= alpha;
    }
    cfx::gemm(false, false, L, Dv, n, T(1), S.data(), bk, row.v + s * Dv, Dv, T(1), O.data(),
              Dv);
  }
  for (i64 c = 0; c < L; ++c) {
    const T inv = l[c] > T(0) ? T(1) / l[c] : T(0);
    for (i64 d = 0; d < Dv; ++d) O[c * Dv + d] *= inv;
  }
}

template <typename T>
void clustered_row(const AttnArgs& a, i64 r) {
  Row<T> row(a, r);
  T* out = static_cast<T*>(a.out) + r * a.Nq * a.Dv;
  const i64 Dv = a.Dv;
  if (!row.has_key) {
    std::fill(out, out + a.Nq * Dv, T(0));
    return;
  }
  std::vector<T> m, l, O;
  centroid_attention<T>(row, T(a.scale), m, l, O, nullptr);
  for (i64 i = 0; i < a.Nq; ++i) {
    const T* src = O.data() + row.slot[row.a[i]] * Dv;
    std::copy(src, src + Dv, out + i * Dv);
  }
}

template <typename T>
void improved_row(const AttnArgs& a, i64 r) {
  Row<T> row(a, r);
  const i64 Nq = a.Nq, Nk = a.Nk, D = a.D, Dv = a.Dv, C = a.C, kk = a.topk, L = row.L();
  T* out = static_cast<T*>(a.out) + r * Nq * Dv;
  int64_t* idx_out = a.idx_out + r * C * kk;
  for (i64 c = 0; c < C; ++c)  // empty clusters (and rows without keys): any kk keys
    for (i64 t = 0; t < kk; ++t) idx_out[c * kk + t] = t;
  if (!row.has_key) {
    std::fill(out, out + Nq * Dv, T(0));
    return;
  }
  const T scale = T(a.scale);
  std::vector<cfx::TopK<T>> tops(L);
  for (auto& t : tops) t.init(kk);
  std::vector<T> m, l, O;
  centroid_attention<T>(row, scale, m, l, O, &tops);
  // members of each live cluster, contiguous (counting sort by slot)
  std::vector<i64> start(L + 1, 0), order(Nq);
  for (i64 i = 0; i < Nq; ++i) ++start[row.slot[row.a[i]] + 1];
  for (i64 c = 0; c < L; ++c) start[c + 1] += start[c];
  {
    std::vector<i64> fill(start.begin(), start.end() - 1);
    for (i64 i = 0; i < Nq; ++i) order[fill[row.slot[row.a[i]]]++] = i;
  }
  std::vector<T> kt(kk * D), vt(kk * Dv), qm, logits, wv, bottom(Dv);
  std::vector<uint8_t> keep(kk), taken;
  for (i64 c = 0; c < L; ++c) {
    cfx::TopK<T>& top = tops[c];
    top.finish(Nk, taken);
    const i64 cid = row.live[c];
    // bottom = O^c - sum_T A^c v, mass = sum_T A^c
    std::copy(O.data() + c * Dv, O.data() + (c + 1) * Dv, bottom.begin());
    T mass = 0;
    for (i64 t = 0; t < kk; ++t) {
      const i64 j = top.idx[t];
      idx_out[cid * kk + t] = j;
      keep[t] = row.mask ? row.mask[j] : 1;
      const T w = keep[t] ? cfx::exp_approx(top.val[t] - m[c]) / l[c] : T(0);
      mass += w;
      for (i64 d = 0; d < D; ++d) kt[t * D + d] = row.k[j * D + d];
      for (i64 d = 0; d < Dv; ++d) {
        vt[t * Dv + d] = row.v[j * Dv + d];
        bottom[d] -= w * row.v[j * Dv + d];
      }
    }
    const i64 n = start[c + 1] - start[c];
    qm.resize(n * D);
    logits.resize(n * kk);
    wv.resize(n * Dv);
    for (i64 u = 0; u < n; ++u)
      std::copy(row.q + order[start[c] + u] * D, row.q + (order[start[c] + u] + 1) * D,
                qm.data() + u * D);
    cfx::gemm(false, true, n, kk, D, scale, qm.data(), D, kt.data(), D, T(0), logits.data(), kk);
    for (i64 u = 0; u < n; ++u) {  // softmax over the valid top keys; none valid -> zeros
      T* p = logits.data() + u * kk;
      T mx = neg_inf<T>();
      for (i64 t = 0; t < kk; ++t) {
        if (!keep[t]) p[t] = neg_inf<T>();
        mx = p[t] > mx ? p[t] : mx;
      }
      T sum = 0;
      for (i64 t = 0; t < kk; ++t) {
        p[t] = mx == neg_inf<T>() ? T(0) : cfx::exp_approx(p[t] - mx);
        sum += p[t];
      }
      const T f = sum > T(0) ? mass / sum : T(0);
      for (i64 t = 0; t < kk; ++t) p[t] *= f;
    }
    cfx::gemm(false, false, n, Dv, kk, T(1), logits.data(), kk, vt.data(), Dv, T(0), wv.data(),
              Dv);
    for (i64 u = 0; u < n; ++u) {
      T* dst = out + order[start[c] + u] * Dv;
      for (i64 d = 0; d < Dv; ++d) dst[d] = bottom[d] + wv[u * Dv + d];
    }
  }
}

template <typename T>
void clustered_backward_row(const AttnArgs& a, i64 r) {
  Row<T> row(a, r);
  const i64 Nq = a.Nq, Nk = a.Nk, D = a.D, Dv = a.Dv, L = row.L();
  const T scale = T(a.scale);
  T* dq = static_cast<T*>(a.dq) + r * Nq * D;
  T* dk = static_cast<T*>(a.dk) + r * Nk * D;
  T* dv = static_cast<T*>(a.dv) + r * Nk * Dv;
  if (!row.has_key) {
    std::fill(dq, dq + Nq * D, T(0));
    std::fill(dk, dk + Nk * D, T(0));
    std::fill(dv, dv + Nk * Dv, T(0));
    return;
  }
  const T* g = static_cast<const T*>(a.grad_out) + r * Nq * Dv;
  std::vector<T> m, l, O;
  centroid_attention<T>(row, scale, m, l, O, nullptr);
  std::vector<T> dOc(L * Dv, T(0)), Dsum(L, T(0)), dqc(L * D, T(0));
  for (i64 i = 0; i < Nq; ++i) {
    T* dst = dOc.data() + row.slot[row.a[i]] * Dv;
    for (i64 d = 0; d < Dv; ++d) dst[d] += g[i * Dv + d];
  }
  for (i64 c = 0; c < L; ++c)
    for (i64 d = 0; d < Dv; ++d) Dsum[c] += dOc[c * Dv + d] * O[c * Dv + d];
  const i64 bk = key_block(L, Nk);
  std::vector<T> P(L * bk), dS(L * bk);
  for (i64 s = 0; s < Nk; s += bk) {
    const i64 n = std::min(bk, Nk - s);
    block_scores(row, scale, s, n, P.data(), bk);
    for (i64 c = 0; c < L; ++c) {
      T* p = P.data() + c * bk;
      const T inv = l[c] > T(0) ? T(1) / l[c] : T(0);
      for (i64 j = 0; j < n; ++j) p[j] = m[c] == neg_inf<T>() ? T(0)
                                                             : cfx::exp_approx(p[j] - m[c]) * inv;
    }
    // dV_blk = P^T dO^c ; dP = dO^c V_blk^T ; dS = P (dP - Dsum)
    cfx::gemm(true, false, n, Dv, L, T(1), P.data(), bk, dOc.data(), Dv, T(0), dv + s * Dv, Dv);
    cfx::gemm(false, true, L, n, Dv, T(1), dOc.data(), Dv, row.v + s * Dv, Dv, T(0), dS.data(),
              bk);
    for (i64 c = 0; c < L; ++c) {
      T* ds = dS.data() + c * bk;
      const T* p = P.data() + c * bk;
      for (i64 j = 0; j < n; ++j) ds[j] = p[j] * (ds[j] - Dsum[c]);
    }
    // dQ^c += s dS K_blk ; dK_blk = s dS^T Q^c
    cfx::gemm(false, false, L, D, n, scale, dS.data(), bk, row.k + s * D, D, T(1), dqc.data(), D);
    cfx::gemm(true, false, n, D, L, scale, dS.data(), bk, row.qc.data(), D, T(0), dk + s * D, D);
  }
  for (i64 i = 0; i < Nq; ++i) {
    const i64 c = row.slot[row.a[i]];
    const T inv = T(1) / T(row.count[row.a[i]]);
    for (i64 d = 0; d < D; ++d) dq[i * D + d] = dqc[c * D + d] * inv;
  }
}

template <typename F>
void rows(const AttnArgs& a, F&& fn) {
  cfx::parallel_items(a.B * a.H, static_cast<int>(a.threads), fn);
}

}  // namespace

extern "C" void cfx_clustered_forward(const AttnArgs* args) {
  const AttnArgs& a = *args;
  rows(a, [&](i64 r) {
    if (a.topk > 0) {
      a.is_double ? improved_row<double>(a, r) : improved_row<float>(a, r);
    } else {
      a.is_double ? clustered_row<double>(a, r) : clustered_row<float>(a, r);
    }
  });
}

extern "C" void cfx_clustered_backward(const AttnArgs* args) {
  const AttnArgs& a = *args;
  rows(a, [&](i64 r) {
    a.is_double ? clustered_backward_row<double>(a, r) : clustered_backward_row<float>(a, r);
  });
}
