// The small ops of a decoder layer between its products, for the few rows of a decoding pass (float32,
// CPU, AVX2; attention on 16 lanes where the CPU has AVX-512): RMSNorm (with the residual add before it),
// rotary embedding in place, attention over the cache with an additive mask and grouped kv heads, and
// SiLU(gate) * up. At one row each torch op costs 15-90 us of dispatch for ~1 us of arithmetic
// (docs/verify_profile.md); here each is one call.
//
// Every row is computed alone, in an order that depends on nothing but that row: its keys' columns, never
// the row count or the columns masked out. So a tree node's hidden state equals, bit for bit, what a plain
// step at its position computes (with products that are row-independent too: few_rows.cpp).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <cstdint>
#include <vector>

#include "avx2.h"

// e^x, 8 lanes (Cephes' expf: a degree-6 polynomial on x - n ln 2, times 2^n; ~1 ulp). Exactly 0 below
// -87 (masked keys: their weight must be 0, not a denormal, for a row to sum what it sums unmasked).
static inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), lo);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}

static void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32, name, ": float32 CPU tensor expected");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": [rows, width] with contiguous rows expected");
}

// y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, as transformers' LlamaRMSNorm in float32.
static void norm_row(const float* x, const float* w, float* y, int64_t H, float eps) {
  __m256 a = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= H; k += 8) {
    const __m256 v = _mm256_loadu_ps(x + k);
    a = _mm256_fmadd_ps(v, v, a);
  }
  float s = hsum(a);
  for (; k < H; ++k) s += x[k] * x[k];
  const float inv = 1.0f / std::sqrt(s / static_cast<float>(H) + eps);
  for (k = 0; k < H; ++k) y[k] = w[k] * (x[k] * inv);
}

// x [rows, H] += d [rows, H] in place (unless d is empty), then returns RMSNorm(x) [rows, H].
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor d, torch::Tensor w, double eps) {
  check_rows(x, "x");
  const int64_t R = x.size(0), H = x.size(1);
  TORCH_CHECK(w.is_contiguous() && w.numel() == H && w.scalar_type() == torch::kFloat32, "w: [H] float32");
  const bool add = d.numel() > 0;
  if (add) {
    check_rows(d, "d");
    TORCH_CHECK(d.size(0) == R && d.size(1) == H, "d: the shape of x");
  }
  auto y = torch::empty({R, H}, x.options());
  float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    float* xr = xp + r * x.stride(0);
    if (add) {
      const float* dr = d.data_ptr<float>() + r * d.stride(0);
      for (int64_t k = 0; k < H; ++k) xr[k] += dr[k];
    }
    norm_row(xr, w.data_ptr<float>(), y.data_ptr<float>() + r * H, H, static_cast<float>(eps));
  }
  return y;
}

// Rotary embedding in place on heads [0, heads) of each row of t [rows, >= heads * D], as transformers'
// apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, cos and sin [rows, D] per row's position.
void rope_(torch::Tensor t, torch::Tensor cos, torch::Tensor sin, int64_t heads) {
  check_rows(t, "t");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.dim() == 2 &&
              cos.size(0) == t.size(0) && cos.scalar_type() == torch::kFloat32, "cos, sin: [rows, D] float32");
  const int64_t R = t.size(0), D = cos.size(1), half = D / 2;
  TORCH_CHECK(D % 2 == 0 && heads * D <= t.size(1), "heads * D exceeds a row");
  for (int64_t r = 0; r < R; ++r) {
    const float* c = cos.data_ptr<float>() + r * D;
    const float* s = sin.data_ptr<float>() + r * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* x = t.data_ptr<float>() + r * t.stride(0) + h * D;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  }
}

// SiLU(gate) * up, gate and up [rows, I] (views of one product's halves allowed) -> [rows, I].
torch::Tensor silu_mul(torch::Tensor gate, torch::Tensor up) {
  check_rows(gate, "gate");
  check_rows(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up: the same shape");
  const int64_t R = gate.size(0), I = gate.size(1);
  auto y = torch::empty({R, I}, gate.options());
  for (int64_t r = 0; r < R; ++r) {
    const float* g = gate.data_ptr<float>() + r * gate.stride(0);
    const float* u = up.data_ptr<float>() + r * up.stride(0);
    float* o = y.data_ptr<float>() + r * I;
    int64_t k = 0;
    for (; k + 8 <= I; k += 8) {
      const __m256 gv = _mm256_loadu_ps(g + k);
      const __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
      _mm256_storeu_ps(o + k, _mm256_mul_ps(sig, _mm256_loadu_ps(u + k)));
    }
    for (; k < I; ++k) o[k] = g[k] / (1.0f + std::exp(-g[k])) * u[k];
  }
  return y;
}

// hsum of each of a[0, 4) into out[0, 4), the same additions in the same order as hsum, for four vectors at once
// (lanes i and i + 4, then (0 + 2) and (1 + 3), then their sum): 14 shuffles and adds where four hsums take 24.
static inline void hsum4(const __m256* a, float* out) {
  const __m256 x01 = _mm256_add_ps(_mm256_permute2f128_ps(a[0], a[1], 0x20), _mm256_permute2f128_ps(a[0], a[1], 0x31));
  const __m256 x23 = _mm256_add_ps(_mm256_permute2f128_ps(a[2], a[3], 0x20), _mm256_permute2f128_ps(a[2], a[3], 0x31));
  // per 128-bit lane [s0 + s2, s1 + s3] of a[0] (a[1] in the high lane) then of a[2] (a[3])
  const __m256 w = _mm256_add_ps(_mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(x01, x23, _MM_SHUFFLE(3, 2, 3, 2)));
  // [a0, a2, a0, a2 | a1, a3, a1, a3]
  const __m256 u = _mm256_add_ps(_mm256_shuffle_ps(w, w, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(w, w, _MM_SHUFFLE(3, 1, 3, 1)));
  const __m128 lo = _mm256_castps256_ps128(u), hi = _mm256_extractf128_ps(u, 1);
  _mm_storeu_ps(out, _mm_unpacklo_ps(lo, hi));  // [a0, a1, a2, a3]
}

// The float lanes the attention sums run on, W at a time: 8 (AVX2), or 16 where the CPU has AVX-512 and a head's dims
// are whole 16s (the default model's 64): half the loads, float16 conversions and FMAs per key. Each query's sums are
// the same operations in the same order whatever the rows and queries beside it, on either width (a 16-lane sum has
// its halves added, then hsum / hsum4), so the row independence above holds; the two widths' floats differ, so a head
// width takes one of them on a given CPU.
struct Lanes8 {
  using V = __m256;
  static constexpr int W = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  // keys and values stored as float16 (F16C converts exactly: every half is a float)
  static V load(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static __m256 halves(V v) { return v; }  // 8 lanes for hsum
};

#if defined(__AVX512F__)
#define DRAFTHEADS_ATTENTION512 1
struct Lanes16 {
  using V = __m512;
  static constexpr int W = 16;
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __m256 halves(V v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  }
};

// exp8 on 16 lanes: the same operations lane by lane, so the same floats
static inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), lo);
  __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                  _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, _mm512_mul_ps(x, x), x), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(y, _mm512_castsi512_ps(e)));
}
#else
#define DRAFTHEADS_ATTENTION512 0
#endif

// M query heads against N keys of D floats each: per query and key X::W lanes over the dims in order, then hsum. The
// queries share each load (and float16 conversion) of a key's floats, and the M x N sums are independent chains,
// so that the FMAs do not wait on one another; each query's sums are the ones it makes alone (M = 1), bit for bit.
template <class X, int M, int N, typename T>
static inline void dots(const float* const* q, const T* const* k, float* const* out, int64_t j, int64_t D) {
  typename X::V a[M][N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) a[m][n] = X::zero();
  for (int64_t d = 0; d < D; d += X::W) {
    typename X::V qv[M];
    for (int m = 0; m < M; ++m) qv[m] = X::load(q[m] + d);
    for (int n = 0; n < N; ++n) {
      const typename X::V kv = X::load(k[n] + d);
      for (int m = 0; m < M; ++m) a[m][n] = X::fma(qv[m], kv, a[m][n]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m256 h[N];
    for (int n = 0; n < N; ++n) h[n] = X::halves(a[m][n]);
    if constexpr (N == 4) hsum4(h, out[m] + j);
    else
      for (int n = 0; n < N; ++n) out[m][j + n] = hsum(h[n]);
  }
}

// The scores of queries q[0, n) against keys [0, L) of a kv head (rows `stride` apart) into out[x][j]: the queries in
// groups of up to 3, keys 4 at a time, then one at a time.
template <class X, typename T>
static void scores(const float* const* q, int64_t n, const T* kb, int64_t stride, int64_t L, float* const* out, int64_t D) {
  for (int64_t x = 0; x < n; x += 3) {
    const float* const* qx = q + x;
    float* const* ox = out + x;
    const int64_t m = std::min<int64_t>(3, n - x);
    int64_t j = 0;
    for (; j + 4 <= L; j += 4) {
      const T* ks[4] = {kb + j * stride, kb + (j + 1) * stride, kb + (j + 2) * stride, kb + (j + 3) * stride};
      if (m == 3) dots<X, 3, 4>(qx, ks, ox, j, D);
      else if (m == 2) dots<X, 2, 4>(qx, ks, ox, j, D);
      else dots<X, 1, 4>(qx, ks, ox, j, D);
    }
    for (; j < L; ++j) {
      const T* ks[1] = {kb + j * stride};
      if (m == 3) dots<X, 3, 1>(qx, ks, ox, j, D);
      else if (m == 2) dots<X, 2, 1>(qx, ks, ox, j, D);
      else dots<X, 1, 1>(qx, ks, ox, j, D);
    }
  }
}

// M queries' weighted sums acc[m][0, W C) += sum_j p[m][j] v[j][0, W C) and totals total[m] += sum_j p[m][j] over keys
// j0 <= j < j1, v's rows `stride` apart (W = X::W): M x C independent chains, so that no FMA waits on the one before
// it, sharing each load (and float16 conversion) of a value row; the sums of p along them in column order, which cost
// no time beside them. In column order, not in lanes: a tree node's masked columns (exact zeros) then leave its sums
// as a plain step's, whatever columns its path's keys sit at. Blocks of keys in order, the sums carried in acc and
// total: the same additions in the same order as one pass over all keys. Each query's chains are the ones it runs
// alone (M = 1), so the same floats. count: add p to the totals (a query's later dims read the same keys: its total
// is already there).
template <class X, int M, int C, bool count, typename T>
static inline void weighted_sums(const float* const* p, const T* v, int64_t stride, int64_t j0, int64_t j1,
                                 float* const* acc, float* total) {
  typename X::V a[M][C];
  float t[M];
  for (int m = 0; m < M; ++m) {
    t[m] = total[m];
    for (int c = 0; c < C; ++c) a[m][c] = X::load(acc[m] + X::W * c);
  }
  for (int64_t j = j0; j < j1; ++j) {
    typename X::V pj[M];
    for (int m = 0; m < M; ++m) {
      pj[m] = X::set1(p[m][j]);
      if (count) t[m] += p[m][j];
    }
    const T* vr = v + j * stride;
    for (int c = 0; c < C; ++c) {
      const typename X::V vv = X::load(vr + X::W * c);
      for (int m = 0; m < M; ++m) a[m][c] = X::fma(pj[m], vv, a[m][c]);
    }
  }
  for (int m = 0; m < M; ++m) {
    total[m] = t[m];
    for (int c = 0; c < C; ++c) X::store(acc[m] + X::W * c, a[m][c]);
  }
}

// weighted_sums for C = 1..4 chains a query, 1..8 for one query alone (its chains fit the registers; group_sums)
template <class X, int M, bool count, typename T>
static void weighted_sums(int C, const float* const* p, const T* v, int64_t stride, int64_t j0, int64_t j1,
                          float* const* acc, float* total) {
  if constexpr (M == 1) {
    if (C > 4) {
      switch (C) {
        case 5: weighted_sums<X, 1, 5, count, T>(p, v, stride, j0, j1, acc, total); break;
        case 6: weighted_sums<X, 1, 6, count, T>(p, v, stride, j0, j1, acc, total); break;
        case 7: weighted_sums<X, 1, 7, count, T>(p, v, stride, j0, j1, acc, total); break;
        default: weighted_sums<X, 1, 8, count, T>(p, v, stride, j0, j1, acc, total);
      }
      return;
    }
  }
  switch (C) {
    case 1: weighted_sums<X, M, 1, count, T>(p, v, stride, j0, j1, acc, total); break;
    case 2: weighted_sums<X, M, 2, count, T>(p, v, stride, j0, j1, acc, total); break;
    case 3: weighted_sums<X, M, 3, count, T>(p, v, stride, j0, j1, acc, total); break;
    default: weighted_sums<X, M, 4, count, T>(p, v, stride, j0, j1, acc, total);
  }
}

// The weighted sums of queries [x, x + m) (m <= 3) over dims [0, W C) from v: one query all C chains at once; two or
// three 4 x W dims at a time (with their chains, AVX2's registers hold no more), sharing the value rows' loads.
template <class X, typename T>
static void group_sums(int64_t m, int C, const float* const* p, const T* v, int64_t stride, int64_t j0, int64_t j1,
                       float* const* acc, float* total) {
  if (m == 1) return weighted_sums<X, 1, true, T>(C, p, v, stride, j0, j1, acc, total);
  for (int c = 0; c < C; c += 4) {
    float* part[3] = {acc[0] + X::W * c, acc[1] + X::W * c, m == 3 ? acc[2] + X::W * c : nullptr};
    const int Cc = std::min(4, C - c);
    if (m == 3) (c == 0 ? weighted_sums<X, 3, true, T> : weighted_sums<X, 3, false, T>)(Cc, p, v + X::W * c, stride, j0, j1, part, total);
    else (c == 0 ? weighted_sums<X, 2, true, T> : weighted_sums<X, 2, false, T>)(Cc, p, v + X::W * c, stride, j0, j1, part, total);
  }
}

// Value rows a block of the weighted sums reads while every query of a task uses them: 64 rows of 64 floats
// are 16 KB, which stay in L1 between the queries.
constexpr int64_t VALUE_BLOCK = 64;

// softmax(q k^T * scale + mask) v for q [B, Q, H, D], k, v [B, KVH, L, D] (query head h reads kv head
// h / (H / KVH)), mask [1 or B, 1, Q, L] additive or empty; every last dim contiguous. -> [B, Q, H * D].
// limits [B] or empty: batch row b's queries see no column at or past limits[b] (its mask hides them), so those
// are neither read nor summed: each would add an exact zero (exp of the mask's minimum), so the floats are the
// same, and a batch of sequences of different lengths reads each one's own keys, not the longest one's.
template <class X, typename T>
static torch::Tensor attention_of(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& mask, double scale, const std::vector<int64_t>& limits) {
  const int64_t B = q.size(0), Q = q.size(1), H = q.size(2), D = q.size(3), KVH = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && KVH > 0 && H % KVH == 0 && D % 8 == 0 && L > 0, "shapes");
  const bool masked = mask.numel() > 0;
  TORCH_CHECK(limits.empty() || (masked && static_cast<int64_t>(limits.size()) == B), "limits: one per batch row, with a mask");
  for (int64_t lim : limits) TORCH_CHECK(lim > 0, "limits: at least one column each");
  if (masked)
    TORCH_CHECK(mask.dim() == 4 && (mask.size(0) == 1 || mask.size(0) == B) && mask.size(2) == Q && mask.size(3) == L &&
                mask.stride(3) == 1 && mask.scalar_type() == torch::kFloat32, "mask: [1 or B, 1, Q, L] float32");
  const int64_t G = H / KVH, Lp = (L + 7) / 8 * 8;
  auto out = torch::empty({B, Q, H * D}, q.options());
  const float* qp = q.data_ptr<float>();
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const float* mp = masked ? mask.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // One task: a batch row's kv head and the queries that read it (its G query heads at each of the Q rows),
  // so that each key and value row is read once a task, not once a query head and row (at one row, 9 query
  // heads on 3 kv heads, the reads bounded it). Each kv head's queries are split in parts where the batch
  // alone gives the threads too few tasks; short passes run on one thread.
  const int64_t S = Q * G, units = B * KVH;
  const int64_t parts = std::min<int64_t>(S, std::max<int64_t>(1, (2 * at::get_num_threads() + units - 1) / units));
  const int64_t per = (S + parts - 1) / parts;
  const int64_t grain = std::max<int64_t>(1, 512 / (L * per)), tasks = units * parts;
  // Each thread takes the next task when it is done with one (batch rows of different lengths cost differently:
  // halves of the list fixed in advance left one thread waiting), the longest rows first.
  std::vector<int64_t> order(B);
  std::iota(order.begin(), order.end(), 0);
  if (!limits.empty()) std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return limits[x] > limits[y]; });
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (tasks + grain - 1) / grain);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> s(per * Lp), acc(per * 64), total(per);
    std::vector<const float*> qs(per), ms(per);
    std::vector<float*> os(per), ss(per), accs(per);
    for (int64_t x = 0; x < per; ++x) ss[x] = s.data() + x * Lp, accs[x] = acc.data() + x * 64;
    for (int64_t t = next++; t < tasks; t = next++) {
      const int64_t b = order[t / (KVH * parts)], kh = (t / parts) % KVH, s0 = t % parts * per;
      const int64_t n = std::min(S, s0 + per) - s0;
      if (n <= 0) continue;
      const int64_t Lb = limits.empty() ? L : std::min(L, limits[b]), Lbp = (Lb + 7) / 8 * 8;
      const T* kb = kp + b * k.stride(0) + kh * k.stride(1);
      const T* vb = vp + b * v.stride(0) + kh * v.stride(1);
      for (int64_t x = 0; x < n; ++x) {
        const int64_t i = (s0 + x) / G, h = kh * G + (s0 + x) % G;
        qs[x] = qp + b * q.stride(0) + i * q.stride(1) + h * q.stride(2);
        ms[x] = masked ? mp + (mask.size(0) == 1 ? 0 : b) * mask.stride(0) + i * mask.stride(2) : nullptr;
        os[x] = op + ((b * Q + i) * H + h) * D;
      }
      scores<X>(qs.data(), n, kb, k.stride(2), Lb, ss.data(), D);
      int64_t j = 0;
      for (int64_t x = 0; x < n; ++x) {
        float* sx = s.data() + x * Lp;
        const float* m = ms[x];
        float mx = -INFINITY;
        j = 0;
#if DRAFTHEADS_ATTENTION512
        {  // the scalar loop's operations 16 lanes at a time (a product, then a sum: no FMA), so the same floats
          const __m512 scale16 = _mm512_set1_ps(sc), zero = _mm512_setzero_ps();
          __m512 top = _mm512_set1_ps(-INFINITY);
          for (; j + 16 <= Lb; j += 16) {
            const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(sx + j), scale16), m ? _mm512_loadu_ps(m + j) : zero);
            _mm512_storeu_ps(sx + j, v);
            top = _mm512_max_ps(top, v);
          }
          mx = _mm512_reduce_max_ps(top);
        }
#endif
        for (; j < Lb; ++j) {
          sx[j] = sx[j] * sc + (m ? m[j] : 0.0f);
          mx = std::max(mx, sx[j]);
        }
        for (j = Lb; j < Lbp; ++j) sx[j] = -INFINITY;  // padding to whole vectors: weight 0
        const __m256 mv = _mm256_set1_ps(mx);
        j = 0;
#if DRAFTHEADS_ATTENTION512
        for (const __m512 mv16 = _mm512_set1_ps(mx); j + 16 <= Lbp; j += 16)
          _mm512_storeu_ps(sx + j, exp16(_mm512_sub_ps(_mm512_loadu_ps(sx + j), mv16)));
#endif
        for (; j < Lbp; j += 8) _mm256_storeu_ps(sx + j, exp8(_mm256_sub_ps(_mm256_loadu_ps(sx + j), mv)));
      }
      for (int64_t d = 0; d < D; d += 64) {
        const int C = static_cast<int>(std::min<int64_t>(64, D - d) / X::W);  // chains of W lanes a query
        std::fill(acc.begin(), acc.end(), 0.0f);
        std::fill(total.begin(), total.end(), 0.0f);
        for (int64_t j0 = 0; j0 < Lb; j0 += VALUE_BLOCK)
          for (int64_t x = 0; x < n; x += 3)
            group_sums<X>(std::min<int64_t>(3, n - x), C, ss.data() + x, vb + d, v.stride(2), j0, std::min(Lb, j0 + VALUE_BLOCK),
                          accs.data() + x, total.data() + x);
        for (int64_t x = 0; x < n; ++x) {
          const __m256 inv = _mm256_set1_ps(1.0f / total[x]);
          for (int c = 0; c < C * X::W / 8; ++c)
            _mm256_storeu_ps(os[x] + d + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(acc.data() + x * 64 + 8 * c), inv));
        }
      }
    }
  });
  return out;
}

// softmax(q k^T * scale + mask) v for q [B, Q, H, D] float32, k, v [B, KVH, L, D] float32 or float16 (a cache in 16
// bits: each value converted to float32 as it is read; the sums are float32 either way) -> [B, Q, H * D] float32.
torch::Tensor attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale,
                        const std::vector<int64_t>& limits = {}) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), "q [B, Q, H, D], k and v [B, KVH, L, D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && (k.scalar_type() == torch::kFloat32 || k.scalar_type() == torch::kHalf) &&
              v.scalar_type() == k.scalar_type(), "q float32; k and v both float32 or both float16");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->device().is_cpu() && t->stride(3) == 1, "q, k, v: CPU tensors with contiguous last dims");
#if DRAFTHEADS_ATTENTION512
  if (q.size(3) % 16 == 0)
    return k.scalar_type() == torch::kHalf ? attention_of<Lanes16, at::Half>(q, k, v, mask, scale, limits)
                                           : attention_of<Lanes16, float>(q, k, v, mask, scale, limits);
#endif
  return k.scalar_type() == torch::kHalf ? attention_of<Lanes8, at::Half>(q, k, v, mask, scale, limits)
                                         : attention_of<Lanes8, float>(q, k, v, mask, scale, limits);
}

#ifndef DRAFTHEADS_NO_MODULE  // decoder_stack.cpp includes this file and calls its functions
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("add_rms_norm", &add_rms_norm, "x += d in place (d may be empty), then RMSNorm(x) (float32 rows)");
  m.def("rope_", &rope_, "rotary embedding in place on a row's first heads (float32)");
  m.def("silu_mul", &silu_mul, "SiLU(gate) * up (float32 rows)");
  m.def("attention", &attention, "attention over a cache with an additive mask, one row at a time (float32)", pybind11::arg("q"),
        pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask"), pybind11::arg("scale"),
        pybind11::arg("limits") = std::vector<int64_t>{});
}
#endif
