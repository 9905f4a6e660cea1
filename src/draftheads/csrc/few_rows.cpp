// y = x @ w.T (+ b) for a few rows of x on a CPU with AVX2 and FMA, each weight row read once for up to 8
// rows of x. Used by cpu_matmul.linear for decode-time products (1 to ~32 rows), which are bound by
// reading the weights: BLAS GEMMs pack the weights first when x has more than a few rows, which reads them
// twice (docs/verify_profile.md). Each output element is one dot product summed in the same order
// whatever the row count, so a row's result does not depend on the rows beside it.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__)
#error "few_rows.cpp needs AVX2 and FMA (compiled with -march=native)"
#endif

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// y[r, o] = x[r] . w[o] for r < R <= 8 and o in [o0, o1). Accumulators are named registers, not an array:
// GCC kept an array on the stack and stored it every iteration (2.6x slower).
template <int R>
static void dots(const float* x, const float* w, float* y, int64_t K, int64_t O, int64_t o0, int64_t o1) {
  for (int64_t o = o0; o < o1; ++o) {
    const float* wr = w + o * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 wv = _mm256_loadu_ps(wr + k);
      const float* xk = x + k;
      a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk), a0);
      if constexpr (R > 1) a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + K), a1);
      if constexpr (R > 2) a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + 2 * K), a2);
      if constexpr (R > 3) a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + 3 * K), a3);
      if constexpr (R > 4) a4 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + 4 * K), a4);
      if constexpr (R > 5) a5 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + 5 * K), a5);
      if constexpr (R > 6) a6 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + 6 * K), a6);
      if constexpr (R > 7) a7 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xk + 7 * K), a7);
    }
    const __m256 acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[r]);
      for (int64_t j = k; j < K; ++j) s += wr[j] * x[r * K + j];
      y[r * O + o] = s;
    }
  }
}

static void dots_upto8(int64_t R, const float* x, const float* w, float* y, int64_t K, int64_t O, int64_t o0, int64_t o1) {
  switch (R) {
    case 1: return dots<1>(x, w, y, K, O, o0, o1);
    case 2: return dots<2>(x, w, y, K, O, o0, o1);
    case 3: return dots<3>(x, w, y, K, O, o0, o1);
    case 4: return dots<4>(x, w, y, K, O, o0, o1);
    case 5: return dots<5>(x, w, y, K, O, o0, o1);
    case 6: return dots<6>(x, w, y, K, O, o0, o1);
    case 7: return dots<7>(x, w, y, K, O, o0, o1);
    default: return dots<8>(x, w, y, K, O, o0, o1);
  }
}

// x [R, K], w [O, K], b [O] or undefined -> y [R, O], all float32 and contiguous.
torch::Tensor few_rows_linear(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [rows, in] and w [out, in]");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kFloat, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(),
              "contiguous CPU tensors only");
  const int64_t R = x.size(0), K = x.size(1), O = w.size(0);
  auto y = torch::empty({R, O}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Blocks of weight rows (~96 KB) stay in the core's L2 while each group of 8 rows of x passes over them.
  const int64_t block = std::max<int64_t>(16, (96 * 1024) / std::max<int64_t>(1, K * 4));
  at::parallel_for(0, (O + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t o0 = blk * block, o1 = std::min(O, o0 + block);
      for (int64_t r0 = 0; r0 < R; r0 += 8)
        dots_upto8(std::min<int64_t>(8, R - r0), xp + r0 * K, wp, yp + r0 * O, K, O, o0, o1);
    }
  });
  if (b.has_value() && b->defined()) y.add_(*b);
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_linear", &few_rows_linear, "x @ w.T (+ b) for few rows of x (float32, CPU, AVX2)");
}
