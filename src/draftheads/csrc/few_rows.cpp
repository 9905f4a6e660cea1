// y = x @ w.T (+ b) for a few rows of x on a CPU with AVX2 and FMA, each weight row read once for up to 8
// rows of x. Used by cpu_matmul.linear for decode-time products (1 to ~32 rows), which are bound by
// reading the weights: BLAS GEMMs pack the weights first when x has more than a few rows, which reads them
// twice (docs/verify_profile.md). Each output element is one dot product summed in the same order
// whatever the row count, so a row's result does not depend on the rows beside it.
//
// packed_linear takes the weights in a block format (few_rows.pack: Q4_1 or Q8_0 blocks of 32 inputs, as
// the GGUF files the default model comes from store them), decodes them into exactly the float32 values
// they were packed from and multiplies: 6 (Q4_1) or 4 (Q8_0) times fewer bytes read. packed_linear_q8 (below)
// multiplies the same blocks by x rounded to 8 bits per block of 32 inputs, in integers, as llama.cpp does.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "avx2.h"

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

// packed_linear: weights in tiles of 16 output rows, one Q4_1 or Q8_0 scale (and offset) per 32 inputs, the
// 16 rows' values for one input side by side (few_rows.pack lays them out). Per block of 32 inputs it sums
// x[r, k] * q (the integer values, exact in float32) in input order, one lane per output, then folds the block
// into the output as GGUF's dot products do: y += d * sum (Q8_0), then y += m * sum_k x[r, k] (Q4_1, w = d * q + m).
// The scales then cost a multiply-add per block instead of one per weight, and the block sums round less than
// one running sum did (within 6e-8 of the sum of |x w| against float64, F.linear 1.1e-7, the per-weight
// decoding 2.8e-7). Each output's result is one lane's sequence of the same operations whatever the row count
// or tiling, so a row's result never depends on the rows beside it (the order differs from few_rows_linear's,
// so the two differ by float rounding). 30 layers of the default model's shapes, 2 threads, AVX2 EPYC
// (scripts/compare_packed_revisions.py, stop 46): 1 row 6.24 -> 5.38 ms, 2 rows 7.31 -> 6.09, 4 rows 10.23 -> 8.73,
// 8 rows 16.50 -> 15.60, but 64 rows 95.1 -> 102.8 (the fold is per row; the decoding it replaced was shared by
// every row); the LM head (Q8_0) at 1 row 1.61 -> 1.38.
// 1-4 rows of x take the values decoded in registers; more share a 2 KB buffer per block of 32 inputs.
constexpr int TILE = 16, BK = 32, GROUP = 6;  // outputs per tile, inputs per scale, rows of x per pass

// One input's 16 values of a tile, as floats. Q4_1 holds a block's 32 inputs as 4 groups of 8, each 16 dwords
// (one an output) of 8 nibbles (nibble s: input 8 g + s), so an input's 16 values are two shifts (of loads) and
// two masks away; Q8_0 as 8 groups of 4, 16 dwords of 4 bytes (the order packed_linear_q8's byte products take).
// The callers unroll their k-loops, so k is a constant and each shift an immediate.
template <bool Q4>
static inline void decode_step(const uint8_t* q, int k, __m256& w0, __m256& w1) {
  if constexpr (Q4) {
    const __m256i* g = reinterpret_cast<const __m256i*>(q + 64 * (k / 8));
    asm("" : "+r"(g));  // loaded again for each input, into its shift: kept in registers, they spilled others
    const __m256i low = _mm256_set1_epi32(0x0F);
    const int s = 4 * (k % 8);
    const __m256i v0 = _mm256_srli_epi32(_mm256_loadu_si256(g), s), v1 = _mm256_srli_epi32(_mm256_loadu_si256(g + 1), s);
    w0 = _mm256_cvtepi32_ps(s == 28 ? v0 : _mm256_and_si256(v0, low));
    w1 = _mm256_cvtepi32_ps(s == 28 ? v1 : _mm256_and_si256(v1, low));
  } else {  // Q8_0: per 4 inputs 16 dwords (one an output), byte s holding input 4 g + s: shifted up, then down with its sign
    const __m256i* g = reinterpret_cast<const __m256i*>(q + 64 * (k / 4));
    const int s = 8 * (3 - k % 4);
    w0 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(_mm256_loadu_si256(g), s), 24));
    w1 = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(_mm256_loadu_si256(g + 1), s), 24));
  }
}

// The block PREFETCH_BLOCKS ahead of q (its values, scales and Q4_1 offsets) asked into L1 while this one multiplies.
// A tile's values are 4.6-12 KB, so its stream crosses a 4 KB page every few blocks, where the hardware's prefetcher
// stops; the weights of a pass (~66 MB for the default model's layers) come from memory every step, since the LM head
// and the cache pass through the caches in between. Past the end of the weights a prefetch is a no-op (it never faults).
// Measured (stop 54, an Intel Xeon, `scripts/compare_packed_revisions.py --against 4924597`, 30 layers of Q4_1, VNNI):
// 1 row 3.67 -> 2.83 ms, 2 rows 3.72 -> 2.87, 4 rows 4.48 -> 3.22, 8 rows 5.79 -> 4.39 at 8 blocks ahead (the AVX2 body
// 0.73-0.85x); 4 ahead gained less (0.80-0.84x), 16 about as much (0.73-0.82x). On the AMD EPYC (Zen 5) of stop 57, 16
// ahead against 8 (the same script, `--against` the 8-ahead commit, two runs): 30 layers 0.95-0.99x at 1 row, 0.85-0.88x
// at 8, the LM head 0.81-0.88x at 8; 24 or 32 ahead no better than 16. The same floats: a prefetch changes no operation.
constexpr int PREFETCH_BLOCKS = 16;

static inline void prefetch_lines(const void* p, int bytes) {
  for (int l = 0; l < bytes; l += 64) _mm_prefetch(static_cast<const char*>(p) + l, _MM_HINT_T0);
}

template <bool Q4>
static inline void prefetch_block(const uint8_t* q, const float* d, const float* m) {
  constexpr int QB = BK * (Q4 ? TILE / 2 : TILE);  // bytes of a block's values: 256 (Q4_1) or 512 (Q8_0)
  prefetch_lines(q + PREFETCH_BLOCKS * QB, QB);
  _mm_prefetch(reinterpret_cast<const char*>(d + PREFETCH_BLOCKS * TILE), _MM_HINT_T0);
  if constexpr (Q4) _mm_prefetch(reinterpret_cast<const char*>(m + PREFETCH_BLOCKS * TILE), _MM_HINT_T0);
}

// A tile's block of 32 inputs: q its values, d (and m) its 16 scales (and offsets).
struct Block {
  const uint8_t* q;
  const float* d;
  const float* m;
};

// The block's values as floats into buf [32][16], for groups of rows of x to share.
template <bool Q4>
static inline void decode_block(const Block& b, float* buf) {
  __m256 w0, w1;
#pragma GCC unroll 32
  for (int k = 0; k < BK; ++k) {
    decode_step<Q4>(b.q, k, w0, w1);
    _mm256_storeu_ps(buf + TILE * k, w0);
    _mm256_storeu_ps(buf + TILE * k + 8, w1);
  }
}

// acc [G][32] += the blocks of 32 inputs of N (1 or 2) tiles times x[r, k0 .. k0 + 32] for G rows of x (tile i's
// outputs at 16 i of each row), two chains a row and tile; weights(i, k, w0, w1) gives tile i's input k's 16
// values (from a decoded buffer or decoded in registers: the same floats, so the same sums); xs[r * KB]: the sum
// of row r's 32 inputs (Q4_1's offsets). Each output lane: zero, a multiply-add per input in order, then d, then m.
template <bool Q4, int N, int G, class Weights>
static inline void tile_dots(const float* x, int64_t K, const float* xs, int64_t KB, const Block* b, float* acc, Weights weights) {
  __m256 a[N][G][2];
#pragma GCC unroll 2
  for (int i = 0; i < N; ++i)
#pragma GCC unroll 8
    for (int r = 0; r < G; ++r) a[i][r][0] = a[i][r][1] = _mm256_setzero_ps();
#pragma GCC unroll 32
  for (int k = 0; k < BK; ++k) {
#pragma GCC unroll 2
    for (int i = 0; i < N; ++i) {
      __m256 w0, w1;
      weights(i, k, w0, w1);
#pragma GCC unroll 8
      for (int r = 0; r < G; ++r) {
        const __m256 xb = _mm256_broadcast_ss(x + r * K + k);
        a[i][r][0] = _mm256_fmadd_ps(w0, xb, a[i][r][0]);
        a[i][r][1] = _mm256_fmadd_ps(w1, xb, a[i][r][1]);
      }
    }
  }
  asm volatile("" ::: "memory");  // the scales loaded only now: hoisted above the loop, they spilled accumulators
#pragma GCC unroll 2
  for (int i = 0; i < N; ++i) {
    const __m256 d0 = _mm256_loadu_ps(b[i].d), d1 = _mm256_loadu_ps(b[i].d + 8);
#pragma GCC unroll 8
    for (int r = 0; r < G; ++r) {
      float* y = acc + 32 * r + TILE * i;
      __m256 y0 = _mm256_fmadd_ps(d0, a[i][r][0], _mm256_loadu_ps(y)), y1 = _mm256_fmadd_ps(d1, a[i][r][1], _mm256_loadu_ps(y + 8));
      if constexpr (Q4) {
        const __m256 s = _mm256_broadcast_ss(xs + r * KB);
        y0 = _mm256_fmadd_ps(_mm256_loadu_ps(b[i].m), s, y0);
        y1 = _mm256_fmadd_ps(_mm256_loadu_ps(b[i].m + 8), s, y1);
      }
      _mm256_storeu_ps(y, y0), _mm256_storeu_ps(y + 8, y1);
    }
  }
}

// tile_dots over a decoded block buf [32][16] of one tile, for G <= GROUP rows of x.
template <bool Q4, int G>
static inline void block_dots(const float* x, int64_t K, const float* xs, int64_t KB, const Block& b, const float* buf, float* acc) {
  tile_dots<Q4, 1, G>(x, K, xs, KB, &b, acc, [buf](int, int k, __m256& w0, __m256& w1) {
    w0 = _mm256_loadu_ps(buf + TILE * k), w1 = _mm256_loadu_ps(buf + TILE * k + 8);
    // Held in registers: below 5 rows GCC folded the loads into every multiply-add (3 loads per 2 FMAs,
    // bound by the load ports: 4 + 4 rows then ran slower than 6 + 2)
    if constexpr (G < 5) asm("" : "+x"(w0), "+x"(w1));
  });
}

template <bool Q4>
static void group_dots(int64_t G, const float* x, int64_t K, const float* xs, int64_t KB, const Block& b, const float* buf, float* acc) {
  switch (G) {
    case 1: return block_dots<Q4, 1>(x, K, xs, KB, b, buf, acc);
    case 2: return block_dots<Q4, 2>(x, K, xs, KB, b, buf, acc);
    case 3: return block_dots<Q4, 3>(x, K, xs, KB, b, buf, acc);
    case 4: return block_dots<Q4, 4>(x, K, xs, KB, b, buf, acc);
    case 5: return block_dots<Q4, 5>(x, K, xs, KB, b, buf, acc);
    default: return block_dots<Q4, 6>(x, K, xs, KB, b, buf, acc);
  }
}

// N tiles' blocks decoded in registers for G (one to four) rows of x: no buffer. Two tiles at once for one or two
// rows (four or eight chains hide the multiply-add's latency); one at a time past that (registers). Not inlined:
// inlined into tiles_pass, two tiles of two rows spilled (30 layers, 2 rows: 6.1 -> 8.1 ms).
template <bool Q4, int N, int G>
__attribute__((noinline)) static void fused_dots(const Block* b, const float* x, int64_t K, const float* xs, int64_t KB, float* acc) {
  tile_dots<Q4, N, G>(x, K, xs, KB, b, acc, [b](int i, int k, __m256& w0, __m256& w1) { decode_step<Q4>(b[i].q, k, w0, w1); });
}

// y [R, T * 16] for all tiles, two at a time (the last alone where T is odd): acc [R][2 tiles][16]. (Four tiles at
// once for one row, eight chains, ran slower: 5.2 -> 6.6 ms.) xs [R, K / 32]: each row's sum per block of 32
// inputs (Q4_1).
template <bool Q4>
static void tiles_pass(const float* xp, const float* xs, const uint8_t* qp, const float* dp, const float* mp, float* yp,
                       int64_t R, int64_t K, int64_t T) {
  const int64_t qstep = Q4 ? TILE / 2 : TILE, KB = K / BK, YO = T * TILE;
  // Past 4 rows, groups of rows as even as GROUP allows: 8 = 4 + 4, not 6 + 2 (30 layers: 17.7 -> 17.1 ms).
  const int64_t groups = (R + GROUP - 1) / GROUP;
  at::parallel_for(0, (T + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    alignas(32) float buf[2][BK * TILE];
    std::vector<float> acc(R * 2 * TILE);
    for (int64_t t = 2 * p0; t < std::min(T, 2 * p1); t += 2) {
      const int64_t n = std::min<int64_t>(2, T - t);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t j = 0; j < KB; ++j) {
        Block b[2];
        for (int64_t i = 0; i < n; ++i) {
          const int64_t dm = ((t + i) * KB + j) * TILE;
          b[i] = {qp + ((t + i) * K + j * BK) * qstep, dp + dm, Q4 ? mp + dm : nullptr};
        }
        for (int64_t i = 0; i < n; ++i) prefetch_block<Q4>(b[i].q, b[i].d, b[i].m);
        const float* xj = xp + j * BK;
        const float* sj = xs + j;
        if (n == 2 && R == 1)
          fused_dots<Q4, 2, 1>(b, xj, K, sj, KB, acc.data());
        else if (n == 2 && R == 2)
          fused_dots<Q4, 2, 2>(b, xj, K, sj, KB, acc.data());
        else if (R <= 4)
          for (int64_t i = 0; i < n; ++i) {
            float* a = acc.data() + i * TILE;
            if (R == 1) fused_dots<Q4, 1, 1>(b + i, xj, K, sj, KB, a);
            else if (R == 2) fused_dots<Q4, 1, 2>(b + i, xj, K, sj, KB, a);
            else if (R == 3) fused_dots<Q4, 1, 3>(b + i, xj, K, sj, KB, a);
            else fused_dots<Q4, 1, 4>(b + i, xj, K, sj, KB, a);
          }
        else
          for (int64_t i = 0; i < n; ++i) {
            decode_block<Q4>(b[i], buf[i]);
            for (int64_t g = 0; g < groups; ++g) {  // tile i's outputs at 16 * i of each acc row
              const int64_t r0 = g * R / groups, r1 = (g + 1) * R / groups;
              group_dots<Q4>(r1 - r0, xj + r0 * K, K, sj + r0 * KB, KB, b[i], buf[i], acc.data() + r0 * 2 * TILE + i * TILE);
            }
          }
      }
      for (int64_t r = 0; r < R; ++r) std::copy_n(acc.data() + r * 2 * TILE, n * TILE, yp + r * YO + t * TILE);
    }
  });
}

// The sum of a block's 32 inputs at v, in one fixed order (both kernels' Q4_1 offsets take it).
static inline float block_sum(const float* v) {
  return hsum(_mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(v), _mm256_loadu_ps(v + 8)),
                            _mm256_add_ps(_mm256_loadu_ps(v + 16), _mm256_loadu_ps(v + 24))));
}

// The arguments packed_linear and packed_linear_q8 share, checked; whether q is Q4_1 (else Q8_0).
static bool check_packed(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d, const torch::Tensor& m,
                         int64_t out, const torch::Tensor& bias) {
  const bool q4 = q.scalar_type() == torch::kByte;
  TORCH_CHECK(q4 || q.scalar_type() == torch::kChar, "q: uint8 (Q4_1) or int8 (Q8_0)");
  TORCH_CHECK(x.dim() == 2 && q.dim() == 3 && d.dim() == 3 && x.scalar_type() == torch::kFloat && d.scalar_type() == torch::kFloat,
              "x [rows, in] float32, q [tiles, in, 8 or 16], d [tiles, in / 32, 16] float32");
  const int64_t K = x.size(1), T = q.size(0);
  TORCH_CHECK(K % BK == 0 && q.size(1) == K && q.size(2) == (q4 ? TILE / 2 : TILE) && d.size(0) == T && d.size(1) == K / BK
              && d.size(2) == TILE, "shapes disagree");
  TORCH_CHECK(!q4 || (m.scalar_type() == torch::kFloat && m.sizes() == d.sizes()), "Q4_1 needs m like d");
  TORCH_CHECK(0 < out && out <= T * TILE && (bias.numel() == 0 || bias.numel() == out), "out: within the tiles; bias: [out]");
  TORCH_CHECK(x.is_contiguous() && q.is_contiguous() && d.is_contiguous() && (!q4 || m.is_contiguous()) && x.device().is_cpu(),
              "contiguous CPU tensors only");
  return q4;
}

// x [R, K] float32; q uint8 [T, K, 8] (Q4_1, as decode_step reads it) or int8 [T, K, 16] (Q8_0); d, m float32 [T, K / 32, 16] (m:
// Q4_1 only, else empty); T = ceil(out / 16) tiles; bias [out] or empty -> y [R, out] = x @ w.T (+ bias) for the w
// they decode to.
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d, const torch::Tensor& m,
                            int64_t out, const torch::Tensor& bias) {
  const bool q4 = check_packed(x, q, d, m, out, bias);
  const int64_t R = x.size(0), K = x.size(1), T = q.size(0);
  auto y = torch::empty({R, T * TILE}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* dp = d.data_ptr<float>();
  const float* mp = q4 ? m.data_ptr<float>() : nullptr;
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  float* yp = y.data_ptr<float>();
  // each row's sum per block of 32 inputs, in one fixed order (read by Q4_1's offsets only; allocated either way,
  // so that the pointers into it stay valid ones)
  std::vector<float> xs(R * (K / BK));
  for (int64_t i = 0; q4 && i < static_cast<int64_t>(xs.size()); ++i) xs[i] = block_sum(xp + i * BK);
  if (q4) tiles_pass<true>(xp, xs.data(), qp, dp, mp, yp, R, K, T);
  else tiles_pass<false>(xp, xs.data(), qp, dp, mp, yp, R, K, T);
  if (y.size(1) != out) y = y.narrow(1, 0, out).contiguous();  // the last tile's padding rows
  if (bias.numel() > 0) y.add_(bias);
  return y;
}

// packed_linear_q8: the same tiles (Q4_1 or Q8_0) times x rounded to 8-bit integers per row and block of 32 inputs,
// as llama.cpp's dot products on AVX2 do (Q4_1 x Q8_1, Q8_0 x Q8_0): dx = max |x| / 127 and xq = round(x / dx). A
// block's 16 x 32 products are then exact integer sums (vpmaddubsw: 32 byte products a instruction, where the float path converts
// each weight to a float and multiplies 8 a instruction); the block folds in as y += (d dx) * sum (+ m * the block's
// float sum of x, exact as in packed_linear). Each row's rounding of x is its own and each output lane runs the same
// operations in the same order whatever the row count, so rows stay independent of the rows beside them; the result
// is not packed_linear's (x is rounded to ~2.5 significant digits), which is why it is a setting, not a route.

// Which body of q8_tile (below) this CPU compiles: AVX-512 VNNI reads a tile for 4 rows at once, AVX2 for 2 (or 3-4, below).
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define DRAFTHEADS_VNNI512 1
#define DRAFTHEADS_Q8_ROWS 4
#else
#define DRAFTHEADS_VNNI512 0
#define DRAFTHEADS_Q8_ROWS 2
#endif
// And where the CPU has AMX tiles (Intel Xeon since Sapphire Rapids), passes of enough rows take them
// (tiles_pass_amx, below): the same integer block sums, the same fold, so again the same floats.
#if DRAFTHEADS_VNNI512 && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define DRAFTHEADS_AMX 1
#else
#define DRAFTHEADS_AMX 0
#endif

// Row r's blocks of 32 inputs rounded: xq [K] int8 (for Q4_1, per 8 inputs the even then the odd ones, 0 2 4 6 1 3 5 7:
// the order of a dword's low then high nibbles; for Q8_0 in input order, and on AVX-512 VNNI as x + 128 in unsigned
// bytes, the top bit flipped where `unsigned_q8`: q8_tile's operand there), dx [K / 32] the scales, xs [K / 32] the float
// sums (Q4_1's offsets).
template <bool Q4>
static void quantize_row(const float* x, int64_t K, int8_t* xq, float* dx, float* xs, bool unsigned_q8) {
  const int32_t flip = !Q4 && unsigned_q8 ? 0x80 : 0;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t j = 0; j < K / BK; ++j) {
    const float* v = x + j * BK;
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16), v3 = _mm256_loadu_ps(v + 24);
    xs[j] = block_sum(v);
    __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    const float amax = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    dx[j] = amax / 127.0f;
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    alignas(32) int32_t qi[BK];
    _mm256_store_si256(reinterpret_cast<__m256i*>(qi), _mm256_cvtps_epi32(_mm256_mul_ps(v0, inv)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(qi + 8), _mm256_cvtps_epi32(_mm256_mul_ps(v1, inv)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(qi + 16), _mm256_cvtps_epi32(_mm256_mul_ps(v2, inv)));
    _mm256_store_si256(reinterpret_cast<__m256i*>(qi + 24), _mm256_cvtps_epi32(_mm256_mul_ps(v3, inv)));
    int8_t* o = xq + j * BK;
    for (int g = 0; g < 4; ++g)
      for (int s = 0; s < 4; ++s) {
        o[8 * g + s] = static_cast<int8_t>(qi[8 * g + (Q4 ? 2 * s : s)] ^ flip);
        o[8 * g + 4 + s] = static_cast<int8_t>(qi[8 * g + (Q4 ? 2 * s + 1 : 4 + s)] ^ flip);
      }
  }
}

// 4 int8 values at p, as one dword repeated in every lane
static inline __m256i broadcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// q8_tile<Q4, G>: one tile's 16 outputs over all K inputs for G rounded rows, the outputs held in registers from block
// to block (folded through memory instead, the load-add-store chain bound one row). q: the tile's first block; xq, dx,
// xs: row 0's (row r's at r * K, r * KB); y: row 0's 16 outputs (row r's at r * ystride). Two bodies, the same floats.
#if DRAFTHEADS_VNNI512
// q8_tile on a CPU with AVX-512 VNNI: vpdpbusd adds 4 byte products per int32 lane, 64 per instruction, so a tile's 16
// outputs sit in one register and a row takes 1 (Q8_0) or 2 (Q4_1) instructions per 4 (8) inputs, where AVX2 takes 3;
// with 32 registers four rows (a pass's last five or six) share each load of the tile. The block sums are the same
// integers, folded in the same order lane by lane, so the outputs are q8_tile's, bit for bit. vpdpbusd multiplies
// unsigned by signed bytes: Q4_1's nibbles are the unsigned ones; for Q8_0 x comes as x + 128 (quantize_row flips its
// top bit) and 128 times each output's block weight sum (one more vpdpbusd per 4 inputs, shared by the rows) is taken off.
template <bool Q4, int G>
static inline void q8_tile(const uint8_t* q, const int8_t* xq, int64_t K, const float* dx, const float* xs, int64_t KB,
                           const float* d, const float* m, float* y, int64_t ystride) {
  const __m512i low = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi8(1);
  __m512 a[G];
#pragma GCC unroll 8
  for (int r = 0; r < G; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t j = 0; j < KB; ++j, q += BK * (Q4 ? TILE / 2 : TILE), d += TILE, m += Q4 ? TILE : 0) {
    __m512i s[G];
#pragma GCC unroll 8
    for (int r = 0; r < G; ++r) s[r] = _mm512_setzero_si512();
    prefetch_block<Q4>(q, d, m);
    const __m512 d0 = _mm512_loadu_ps(d);
    if constexpr (!Q4) {
      __m512i sw = _mm512_setzero_si512();
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const __m512i v = _mm512_loadu_si512(q + 64 * g);
        sw = _mm512_dpbusd_epi32(sw, one, v);
#pragma GCC unroll 8
        for (int r = 0; r < G; ++r) {
          int32_t x4;
          std::memcpy(&x4, xq + r * K + j * BK + 4 * g, 4);
          s[r] = _mm512_dpbusd_epi32(s[r], _mm512_set1_epi32(x4), v);
        }
      }
      const __m512i off = _mm512_slli_epi32(sw, 7);
#pragma GCC unroll 8
      for (int r = 0; r < G; ++r) {
        const __m512 sx = _mm512_set1_ps(dx[r * KB + j]);
        a[r] = _mm512_fmadd_ps(_mm512_mul_ps(d0, sx), _mm512_cvtepi32_ps(_mm512_sub_epi32(s[r], off)), a[r]);
      }
    } else {
#pragma GCC unroll 8
      for (int g = 0; g < 4; ++g) {
        const __m512i v = _mm512_loadu_si512(q + 64 * g);
        const __m512i e = _mm512_and_si512(v, low), o = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 8
        for (int r = 0; r < G; ++r) {
          int32_t xe, xo;
          std::memcpy(&xe, xq + r * K + j * BK + 8 * g, 4);
          std::memcpy(&xo, xq + r * K + j * BK + 8 * g + 4, 4);
          s[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[r], e, _mm512_set1_epi32(xe)), o, _mm512_set1_epi32(xo));
        }
      }
      const __m512 m0 = _mm512_loadu_ps(m);
#pragma GCC unroll 8
      for (int r = 0; r < G; ++r) {
        const __m512 sx = _mm512_set1_ps(dx[r * KB + j]), sm = _mm512_set1_ps(xs[r * KB + j]);
        a[r] = _mm512_fmadd_ps(m0, sm, _mm512_fmadd_ps(_mm512_mul_ps(d0, sx), _mm512_cvtepi32_ps(s[r]), a[r]));
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < G; ++r) _mm512_storeu_ps(y + r * ystride, a[r]);
}
#else
// q8_tile on AVX2: each output half (8 lanes) its own registers. One or two rows keep their outputs in registers from
// block to block; three or four rows' block sums take the registers, so their outputs fold through y (each row its own
// load-fold-store chain, which more rows than one hide). The sums are named registers, finished per group of 4 (Q8_0)
// or 8 (Q4_1) inputs before the next group starts (the empty asm): in an array, left to itself, GCC computed a block's
// products first and summed them after: ~30 stack spills and reloads a block at two rows (objdump -d of the build).
template <bool Q4, int G>
static inline void q8_tile(const uint8_t* q, const int8_t* xq, int64_t K, const float* dx, const float* xs, int64_t KB,
                           const float* d, const float* m, float* y, int64_t ystride) {
  static_assert(1 <= G && G <= 4);
  constexpr bool in_y = G > 2;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256 zero = _mm256_setzero_ps();
  __m256 a00 = zero, a01 = zero, a10 = zero, a11 = zero;  // rows 0 and 1's outputs (G <= 2)
  if constexpr (in_y)
#pragma GCC unroll 4
    for (int r = 0; r < G; ++r) _mm256_storeu_ps(y + r * ystride, zero), _mm256_storeu_ps(y + r * ystride + 8, zero);
  for (int64_t j = 0; j < KB; ++j, q += BK * (Q4 ? TILE / 2 : TILE), d += TILE, m += Q4 ? TILE : 0) {
    __m256i s00, s01, s10, s11, s20, s21, s30, s31;  // row r's block sums, each output half
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = _mm256_setzero_si256();
    prefetch_block<Q4>(q, d, m);
    const int8_t* xj = xq + j * BK;
    if constexpr (!Q4) {
      // Q8_0: |w| times x with w's sign (vpmaddubsw multiplies unsigned by signed bytes); a pair of products reaches
      // 2 * 127 * 127, so each goes to int32 at once (vpmaddwd)
#pragma GCC unroll 8
      for (int g = 0; g < 8; ++g) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * g));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * g + 32));
        const __m256i u0 = _mm256_abs_epi8(v0), u1 = _mm256_abs_epi8(v1);
        const auto row = [&](int r, __m256i& t0, __m256i& t1) {
          const __m256i xb = broadcast4(xj + r * K + 4 * g);
          t0 = _mm256_add_epi32(t0, _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(xb, v0)), ones));
          t1 = _mm256_add_epi32(t1, _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(xb, v1)), ones));
          asm("" : "+x"(t0), "+x"(t1));
        };
        row(0, s00, s01);
        if constexpr (G > 1) row(1, s10, s11);
        if constexpr (G > 2) row(2, s20, s21);
        if constexpr (G > 3) row(3, s30, s31);
      }
    } else {
      // Q4_1: the nibbles as unsigned bytes; 8 products a lane reach 8 * 2 * 15 * 127 < 2^15, so int16 sums
#pragma GCC unroll 4
      for (int g = 0; g < 4; ++g) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * g));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 64 * g + 32));
        const __m256i e0 = _mm256_and_si256(v0, low), o0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
        const __m256i e1 = _mm256_and_si256(v1, low), o1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
        const auto row = [&](int r, __m256i& t0, __m256i& t1) {
          const __m256i xe = broadcast4(xj + r * K + 8 * g), xo = broadcast4(xj + r * K + 8 * g + 4);
          t0 = _mm256_add_epi16(t0, _mm256_add_epi16(_mm256_maddubs_epi16(e0, xe), _mm256_maddubs_epi16(o0, xo)));
          t1 = _mm256_add_epi16(t1, _mm256_add_epi16(_mm256_maddubs_epi16(e1, xe), _mm256_maddubs_epi16(o1, xo)));
          asm("" : "+x"(t0), "+x"(t1));
        };
        row(0, s00, s01);
        if constexpr (G > 1) row(1, s10, s11);
        if constexpr (G > 2) row(2, s20, s21);
        if constexpr (G > 3) row(3, s30, s31);
      }
    }
    const __m256 d0 = _mm256_loadu_ps(d), d1 = _mm256_loadu_ps(d + 8);
    // row r's fold: y += (d dx) * sum, then (Q4_1) y += m * the block's float sum of x
    const auto fold = [&](int r, __m256i t0, __m256i t1, __m256& y0, __m256& y1) {
      const __m256 sx = _mm256_broadcast_ss(dx + r * KB + j);
      y0 = _mm256_fmadd_ps(_mm256_mul_ps(d0, sx), _mm256_cvtepi32_ps(Q4 ? _mm256_madd_epi16(t0, ones) : t0), y0);
      y1 = _mm256_fmadd_ps(_mm256_mul_ps(d1, sx), _mm256_cvtepi32_ps(Q4 ? _mm256_madd_epi16(t1, ones) : t1), y1);
      if constexpr (Q4) {
        const __m256 sm = _mm256_broadcast_ss(xs + r * KB + j);
        y0 = _mm256_fmadd_ps(_mm256_loadu_ps(m), sm, y0);
        y1 = _mm256_fmadd_ps(_mm256_loadu_ps(m + 8), sm, y1);
      }
    };
    const auto fold_y = [&](int r, __m256i t0, __m256i t1) {
      __m256 y0 = _mm256_loadu_ps(y + r * ystride), y1 = _mm256_loadu_ps(y + r * ystride + 8);
      fold(r, t0, t1, y0, y1);
      _mm256_storeu_ps(y + r * ystride, y0), _mm256_storeu_ps(y + r * ystride + 8, y1);
    };
    if constexpr (in_y) {
      fold_y(0, s00, s01), fold_y(1, s10, s11), fold_y(2, s20, s21);
      if constexpr (G > 3) fold_y(3, s30, s31);
    } else {
      fold(0, s00, s01, a00, a01);
      if constexpr (G > 1) fold(1, s10, s11, a10, a11);
    }
  }
  if constexpr (!in_y) {
    _mm256_storeu_ps(y, a00), _mm256_storeu_ps(y + 8, a01);
    if constexpr (G > 1) _mm256_storeu_ps(y + ystride, a10), _mm256_storeu_ps(y + ystride + 8, a11);
  }
}

#endif

// y [R, T * 16] from the rounded rows: each task's tiles one at a time, for DRAFTHEADS_Q8_ROWS rows at a time; on AVX-512
// past 4 rows in groups of 5-8 as even as they go (9 = 5 + 4, 16 = 8 + 8), each group one read of the tile. The last 5
// or 6 in one read gained on the Xeon of stop 55 (30 layers of Q4_1 at 5 / 6 / 10 rows 0.94 / 0.91 / 0.95x the time of
// 4 + 1, 4 + 2, 4 + 4 + 2; eight rows a read ran slower there, stop 48). On the Zen 5 EPYC of stop 62, groups of up to 8
// against 4s and a last 5-6 (scripts/compare_packed_revisions.py, both kernels on the same packed weights, two runs):
// 30 layers at 7 / 12 / 16 rows 0.95 / 0.96-0.97 / 0.96x, the LM head 0.73-0.78 / 0.93-0.95 / 0.88x; the same floats (a
// row's sums never depend on its group).
// AVX2: one or two rows, or past two groups of 3-4 as even as they go (5 = 3 + 2, 8 = 4 + 4), whose outputs fold through
// y. Half tiles for four rows at a time ran slower (stop 47, 8 rows 8.6 -> 10.3 ms; also, stop 65, with named sums: the
// four rows' sums spilled); so did folding one or two rows through y (the chain bound them). Against pairs with the sums
// in an array (stop 65, AVX2 EPYC, scripts/compare_packed_revisions.py --against 80c3e44, two runs): 30 layers at 3 / 4 /
// 8 / 16 / 32 rows 0.90-0.94 / 0.90-0.91 / 0.76-0.89 / 0.86-0.87 / 0.83-0.84x, the LM head 0.83-0.93 / 0.80-0.96 /
// 0.79-0.92 / 0.82-0.96 / 0.89-1.01x, 1-2 rows 0.95-1.01x; the same floats.
template <bool Q4>
static void tiles_pass_q8(const int8_t* xq, const float* dx, const float* xs, const uint8_t* qp, const float* dp,
                          const float* mp, float* yp, int64_t R, int64_t K, int64_t T) {
  const int64_t KB = K / BK, YO = T * TILE;
  at::parallel_for(0, (T + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t t = 2 * p0; t < std::min(T, 2 * p1); ++t) {
      const uint8_t* q = qp + t * K * (Q4 ? TILE / 2 : TILE);
      const float *d = dp + t * KB * TILE, *m = Q4 ? mp + t * KB * TILE : nullptr;
      for (int64_t r = 0, g; r < R; r += g) {
        const int8_t* x = xq + r * K;
        const float *sx = dx + r * KB, *sm = xs + r * KB;
        float* o = yp + r * YO + t * TILE;
        // rows a read of the tile; on AVX-512 past 4 rows groups of 5-8 as even as they go (32 registers hold 8 rows' sums)
        const int64_t left = R - r;
        g = DRAFTHEADS_Q8_ROWS > 2 && left > 4 ? (left + (left + 7) / 8 - 1) / ((left + 7) / 8)
            : !DRAFTHEADS_VNNI512 && left > 2 ? (left + (left + 3) / 4 - 1) / ((left + 3) / 4)
            : std::min<int64_t>(left, DRAFTHEADS_Q8_ROWS);
        switch (g) {
          case 1: q8_tile<Q4, 1>(q, x, K, sx, sm, KB, d, m, o, YO); break;
#if !DRAFTHEADS_VNNI512
          case 3: q8_tile<Q4, 3>(q, x, K, sx, sm, KB, d, m, o, YO); break;
          case 4: q8_tile<Q4, 4>(q, x, K, sx, sm, KB, d, m, o, YO); break;
#endif
#if DRAFTHEADS_Q8_ROWS > 2
          case 2: q8_tile<Q4, 2>(q, x, K, sx, sm, KB, d, m, o, YO); break;
          case 3: q8_tile<Q4, 3>(q, x, K, sx, sm, KB, d, m, o, YO); break;
          case 5: q8_tile<Q4, 5>(q, x, K, sx, sm, KB, d, m, o, YO); break;
          case 6: q8_tile<Q4, 6>(q, x, K, sx, sm, KB, d, m, o, YO); break;
          case 7: q8_tile<Q4, 7>(q, x, K, sx, sm, KB, d, m, o, YO); break;
          case 8: q8_tile<Q4, 8>(q, x, K, sx, sm, KB, d, m, o, YO); break;
#endif
          default: q8_tile<Q4, DRAFTHEADS_Q8_ROWS>(q, x, K, sx, sm, KB, d, m, o, YO);
        }
      }
    }
  });
}

#if DRAFTHEADS_AMX
// tiles_pass_amx: tiles_pass_q8's products on AMX. One tdpbssd (Q8_0: signed x signed bytes) or tdpbsud (Q4_1: signed x
// unsigned nibbles) gives a block of 32 inputs' int32 sums for 16 rows x 16 outputs at once, where the VNNI body takes 8
// vpdpbusd per row; the sums are the same integers, folded into the outputs with the same float operations in the
// same order, so each output is q8_tile's, bit for bit. The fold (a load, a conversion and one or two multiply-adds per
// row and block) is what remains per row. Tile state is requested from Linux once per process, configured per task and
// released after it (oneDNN's AMX kernels configure their own).
#include <sys/syscall.h>
#include <unistd.h>

constexpr int AMX_ROWS = 16;  // rows of x a tile holds
// Fewer rows take the VNNI body: below them AMX did not beat it (docs/verify_profile.md, "AMX"); Q4_1's nibbles are
// unpacked for the tiles first, which a few rows do not repay.
constexpr int64_t AMX_MIN_ROWS_Q8_0 = 4, AMX_MIN_ROWS_Q4_1 = 16;

// Whether Linux lets this process use AMX's tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), asked once.
static bool amx_permitted() {
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return permitted;
}

// Palette 1: tmm0, tmm1 a block's int32 sums, 16 rows x 16 outputs (two blocks in flight); tmm2, tmm3 16 rows' 32 bytes
// of x; tmm4, tmm5 the block's weights, 8 rows of 4 inputs x 16 outputs (the packed Q8_0 block's own layout).
static void amx_configure() {
  struct alignas(64) {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
  } config{};
  config.palette = 1;
  for (int t = 0; t < 6; ++t) config.rows[t] = t < 4 ? AMX_ROWS : BK / 4, config.colsb[t] = t == 2 || t == 3 ? BK : 64;
  _tile_loadconfig(&config);
}

// Q4_1: a tile's nibbles as bytes in the B layout, per block 8 rows of 64 bytes: per 8 inputs the low nibbles (inputs
// 0 2 4 6) then the high ones (1 3 5 7), the order quantize_row gives x. q [K / 8][64] -> out [K / 8][2][64].
static inline void unpack_nibbles(const uint8_t* q, int64_t K, uint8_t* out) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t i = 0; i < K / 8; ++i) {
    if (i % 4 == 0) prefetch_lines(q + 64 * i + PREFETCH_BLOCKS * 256, 256);  // a Q4_1 block: 4 of these lines
    const __m512i v = _mm512_loadu_si512(q + 64 * i);
    _mm512_storeu_si512(out + 128 * i, _mm512_and_si512(v, low));
    _mm512_storeu_si512(out + 128 * i + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
  }
}

// Block j's sums for the 16 rows at x (row stride K) into tmm C (0 or 1), weights w [8][64]. Tile numbers are
// immediates, hence a macro.
#define DRAFTHEADS_AMX_BLOCK(C, A, B, Q4, x, K, w) \
  do {                                             \
    _tile_zero(C);                                 \
    _tile_loadd(A, x, K);                          \
    _tile_loadd(B, w, 64);                         \
    if constexpr (Q4) _tile_dpbsud(C, A, B);       \
    else _tile_dpbssd(C, A, B);                    \
  } while (0)

// Row r's fold of a block, q8_tile's operations: y += (d dx) * sum, then (Q4_1) y += m * the block's float sum of x.
#define AMX_FOLD_ROW(r)                                                                                          \
  if constexpr (G > r) {                                                                                         \
    const __m512 sum = _mm512_cvtepi32_ps(_mm512_load_si512(s + r * TILE));                                     \
    a##r = _mm512_fmadd_ps(_mm512_mul_ps(d0, _mm512_set1_ps(sxj[r])), sum, a##r);                               \
    if constexpr (Q4) a##r = _mm512_fmadd_ps(m0, _mm512_set1_ps(smj[r]), a##r);                                 \
  }
#define AMX_STORE_ROW(r) \
  if constexpr (G > r) if (r < rows) _mm512_storeu_ps(y + r * ystride, a##r);

// One tile's 16 outputs for the G (of 16 loaded) rows at xq: w the tile's blocks in B layout (512 bytes each); sx, sm
// [KB][16] the rows' scales and float sums per block (transposed, so one pointer walks them). Block j + 1's product
// runs and block j's sums are stored while block j - 1 folds (read at once after the store, the loads waited for it).
// The accumulators are named registers: in an array, the tile instructions' memory clobber kept them on the stack
// (30 layers at 48 rows 23.0 -> 19.3 ms).
template <bool Q4, int G>
static inline void amx_tile(const uint8_t* w, const int8_t* xq, int64_t K, const float* sx, const float* sm, int64_t KB,
                            const float* d, const float* m, float* y, int64_t ystride, int64_t rows) {
  alignas(64) int32_t sums[2][AMX_ROWS * TILE];
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
         a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0, a15 = a0;
  DRAFTHEADS_AMX_BLOCK(0, 2, 4, Q4, xq, K, w);
  for (int64_t j = 0; j <= KB; ++j) {
    if constexpr (!Q4) prefetch_lines(w + (j + PREFETCH_BLOCKS) * 512, 512);  // Q4_1's values: unpacked, in L1 already
    _mm_prefetch(reinterpret_cast<const char*>(d + (j + PREFETCH_BLOCKS) * TILE), _MM_HINT_T0);
    if constexpr (Q4) _mm_prefetch(reinterpret_cast<const char*>(m + (j + PREFETCH_BLOCKS) * TILE), _MM_HINT_T0);
    if (j < KB) {
      if (j % 2 == 0) {
        if (j + 1 < KB) DRAFTHEADS_AMX_BLOCK(1, 3, 5, Q4, xq + (j + 1) * BK, K, w + (j + 1) * 512);
        _tile_stored(0, sums[0], 64);
      } else {
        if (j + 1 < KB) DRAFTHEADS_AMX_BLOCK(0, 2, 4, Q4, xq + (j + 1) * BK, K, w + (j + 1) * 512);
        _tile_stored(1, sums[1], 64);
      }
    }
    if (j > 0) {  // block j - 1's fold
      const int64_t i = j - 1;
      const int32_t* s = sums[i % 2];
      const float *sxj = sx + i * AMX_ROWS, *smj = sm + i * AMX_ROWS;
      const __m512 d0 = _mm512_loadu_ps(d + i * TILE);
      const __m512 m0 = Q4 ? _mm512_loadu_ps(m + i * TILE) : d0;
      AMX_FOLD_ROW(0) AMX_FOLD_ROW(1) AMX_FOLD_ROW(2) AMX_FOLD_ROW(3) AMX_FOLD_ROW(4) AMX_FOLD_ROW(5)
      AMX_FOLD_ROW(6) AMX_FOLD_ROW(7) AMX_FOLD_ROW(8) AMX_FOLD_ROW(9) AMX_FOLD_ROW(10) AMX_FOLD_ROW(11)
      AMX_FOLD_ROW(12) AMX_FOLD_ROW(13) AMX_FOLD_ROW(14) AMX_FOLD_ROW(15)
    }
  }
  AMX_STORE_ROW(0) AMX_STORE_ROW(1) AMX_STORE_ROW(2) AMX_STORE_ROW(3) AMX_STORE_ROW(4) AMX_STORE_ROW(5)
  AMX_STORE_ROW(6) AMX_STORE_ROW(7) AMX_STORE_ROW(8) AMX_STORE_ROW(9) AMX_STORE_ROW(10) AMX_STORE_ROW(11)
  AMX_STORE_ROW(12) AMX_STORE_ROW(13) AMX_STORE_ROW(14) AMX_STORE_ROW(15)
}

// tiles_pass_q8 on AMX: xq [ceil(R / 16) * 16, K] signed bytes (padding rows zero), per task a tile at a time for 16 rows
// at a time.
template <bool Q4>
static void tiles_pass_amx(const int8_t* xq, const float* dx, const float* xs, const uint8_t* qp, const float* dp,
                           const float* mp, float* yp, int64_t R, int64_t K, int64_t T) {
  const int64_t KB = K / BK, YO = T * TILE, groups = (R + AMX_ROWS - 1) / AMX_ROWS;
  // per group of 16 rows, per block: the 16 rows' scales (and sums) side by side
  std::vector<float> sxt(groups * KB * AMX_ROWS, 0.0f), smt(groups * KB * AMX_ROWS, 0.0f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < KB; ++j) {
      const int64_t at = (r / AMX_ROWS * KB + j) * AMX_ROWS + r % AMX_ROWS;
      sxt[at] = dx[r * KB + j], smt[at] = xs[r * KB + j];
    }
  at::parallel_for(0, (T + 1) / 2, 1, [&](int64_t p0, int64_t p1) {
    amx_configure();
    std::vector<uint8_t> nibbles(Q4 ? K * TILE : 0);
    for (int64_t t = 2 * p0; t < std::min(T, 2 * p1); ++t) {
      const uint8_t* q = qp + t * K * (Q4 ? TILE / 2 : TILE);
      if constexpr (Q4) unpack_nibbles(q, K, nibbles.data()), q = nibbles.data();
      const float *d = dp + t * KB * TILE, *m = Q4 ? mp + t * KB * TILE : nullptr;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t rows = std::min<int64_t>(AMX_ROWS, R - g * AMX_ROWS);
        const int8_t* x = xq + g * AMX_ROWS * K;
        const float *sx = sxt.data() + g * KB * AMX_ROWS, *sm = smt.data() + g * KB * AMX_ROWS;
        float* o = yp + g * AMX_ROWS * YO + t * TILE;
        if (rows <= 4) amx_tile<Q4, 4>(q, x, K, sx, sm, KB, d, m, o, YO, rows);
        else if (rows <= 8) amx_tile<Q4, 8>(q, x, K, sx, sm, KB, d, m, o, YO, rows);
        else if (rows <= 12) amx_tile<Q4, 12>(q, x, K, sx, sm, KB, d, m, o, YO, rows);
        else amx_tile<Q4, 16>(q, x, K, sx, sm, KB, d, m, o, YO, rows);
      }
    }
    _tile_release();
  });
}
#else
constexpr int AMX_ROWS = 16;
constexpr int64_t AMX_MIN_ROWS_Q8_0 = 0, AMX_MIN_ROWS_Q4_1 = 0;
static bool amx_permitted() { return false; }
template <bool Q4>
static void tiles_pass_amx(const int8_t*, const float*, const float*, const uint8_t*, const float*, const float*, float*,
                           int64_t, int64_t, int64_t) {}
#endif

// packed_linear's arguments -> y [R, out] with x rounded to 8 bits per block of 32 inputs.
torch::Tensor packed_linear_q8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& d, const torch::Tensor& m,
                               int64_t out, const torch::Tensor& bias) {
  const bool q4 = check_packed(x, q, d, m, out, bias);
  const int64_t R = x.size(0), K = x.size(1), T = q.size(0);
  auto y = torch::empty({R, T * TILE}, x.options());
  const bool amx = DRAFTHEADS_AMX && R >= (q4 ? AMX_MIN_ROWS_Q4_1 : AMX_MIN_ROWS_Q8_0) && amx_permitted();
  // AMX loads 16 rows a tile: the rounded rows padded with zeros to a multiple of 16 (tiles_pass_amx pads the scales)
  const int64_t padded = amx ? (R + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS : R;
  std::vector<int8_t> xq(padded * K, 0);
  std::vector<float> dx(R * (K / BK)), xs(R * (K / BK));
  const float* xp = x.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r)
    (q4 ? quantize_row<true> : quantize_row<false>)(xp + r * K, K, xq.data() + r * K, dx.data() + r * (K / BK), xs.data() + r * (K / BK),
                                                    DRAFTHEADS_VNNI512 && !amx);
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const float* mp = q4 ? m.data_ptr<float>() : nullptr;
  if (amx) (q4 ? tiles_pass_amx<true> : tiles_pass_amx<false>)(xq.data(), dx.data(), xs.data(), qp, d.data_ptr<float>(), mp, y.data_ptr<float>(), R, K, T);
  else (q4 ? tiles_pass_q8<true> : tiles_pass_q8<false>)(xq.data(), dx.data(), xs.data(), qp, d.data_ptr<float>(), mp, y.data_ptr<float>(), R, K, T);
  if (y.size(1) != out) y = y.narrow(1, 0, out).contiguous();
  if (bias.numel() > 0) y.add_(bias);
  return y;
}

// Medusa heads' draft in one call: for each head h, y = x, then per block y = y + silu(y @ W.T + b), then its LM head,
// then each row's top k ids -> [heads, R, k] int64, through `vocab` (VocabTrim's map to full ids) where it is not
// empty, and with `probs` their softmax probabilities [heads, R, k] float32 (exp(value - logsumexp of the row), as
// medusa.top_probs; else an empty tensor: they cost ~10 us, which a draft of the whole tree does not need).
// Every product is packed_linear's (int8: packed_linear_q8's) and silu, the sum, topk and logsumexp are ATen's, so the
// ids and probabilities are the ones medusa.py's Python path computes; in the decoding loop that path's ~6 Python ops
// a head cost ~10-20 us each, a verify pass having just pushed the interpreter out of the caches.
// Per head the lists hold, in order: each block's q, d, m (empty: Q8_0), bias; then the LM head's q, d, m, and out
// [heads] the LM heads' output widths. x [R, H] float32.
std::tuple<torch::Tensor, torch::Tensor> heads_top(const torch::Tensor& x, const std::vector<torch::Tensor>& blocks, int64_t layers,
                                                   const std::vector<torch::Tensor>& lm, const std::vector<int64_t>& out, int64_t k,
                                                   bool int8, const torch::Tensor& vocab, bool probs) {
  const int64_t heads = static_cast<int64_t>(out.size()), H = x.size(1);
  TORCH_CHECK(x.dim() == 2 && layers >= 0 && static_cast<int64_t>(blocks.size()) == heads * layers * 4
              && static_cast<int64_t>(lm.size()) == heads * 3 && k >= 1, "heads_top: lists of the wrong length");
  const auto product = int8 ? packed_linear_q8 : packed_linear;
  std::vector<torch::Tensor> tops, chances;
  for (int64_t h = 0; h < heads; ++h) {
    torch::Tensor y = x;
    for (int64_t l = 0; l < layers; ++l) {
      const torch::Tensor* b = &blocks[(h * layers + l) * 4];
      y = y + at::silu(product(y, b[0], b[1], b[2], H, b[3]));
    }
    const torch::Tensor* p = &lm[h * 3];
    const torch::Tensor logits = product(y, p[0], p[1], p[2], out[h], torch::empty({0}));  // [R, out]
    const auto top = at::topk(logits, k, -1);
    tops.push_back(std::get<1>(top));
    if (probs) chances.push_back((std::get<0>(top) - at::logsumexp(logits, {-1}, true)).exp());
  }
  const torch::Tensor ids = at::stack(tops);
  return {vocab.numel() > 0 ? vocab.index({ids}) : ids, probs ? at::stack(chances) : torch::empty({0})};
}

// Hydra heads' draft of a chain in one call: head d reads x = [h, E(x_1), ..., E(x_{d+1})] (x_1 = root, the later
// ones the heads' own top-1 above it) -> its first block, res + silu(x @ W.T + b) with res h itself (grounded residual
// "hidden") or x @ R.T ("projection"), then its ResBlocks and LM head, as hydra.py's HydraHeads.head computes them with
// linear() on packed weights -> the top-1 full ids [depth] int64 and their softmax probabilities [depth] float32
// (medusa.top_probs'). embed [vocab, H] float32: the backbone's input embedding. Per head the lists hold, in order: the
// first block's q, d, m, bias, then (projection) the residual's q, d, m; then each further block's q, d, m, bias; lm:
// the LM head's q, d, m per head (shared heads repeat the one) and out its width. h [H] float32.
std::tuple<torch::Tensor, torch::Tensor> hydra_chain(const torch::Tensor& h, int64_t root, const torch::Tensor& embed,
                                                     const std::vector<torch::Tensor>& blocks, int64_t layers, bool projection,
                                                     const std::vector<torch::Tensor>& lm, int64_t out, int64_t depth, bool int8,
                                                     const torch::Tensor& vocab) {
  const int64_t H = h.size(0), per_head = 4 + (projection ? 3 : 0) + (layers - 1) * 4;
  TORCH_CHECK(h.dim() == 1 && embed.dim() == 2 && embed.size(1) == H && layers >= 1 && depth >= 1
              && static_cast<int64_t>(blocks.size()) == depth * per_head && static_cast<int64_t>(lm.size()) == depth * 3,
              "hydra_chain: lists of the wrong length");
  const auto product = int8 ? packed_linear_q8 : packed_linear;
  const torch::Tensor none = torch::empty({0});
  std::vector<torch::Tensor> parts{h.view({1, H}), embed.narrow(0, root, 1)};
  auto ids = torch::empty({depth}, torch::kLong), chances = torch::empty({depth}, torch::kFloat);
  for (int64_t d = 0; d < depth; ++d) {
    const torch::Tensor x = at::cat(parts, 1);  // [1, (d + 2) H]
    const torch::Tensor* b = &blocks[d * per_head];
    const torch::Tensor res = projection ? product(x, b[4], b[5], b[6], H, none) : x.narrow(1, 0, H);
    torch::Tensor y = res + at::silu(product(x, b[0], b[1], b[2], H, b[3]));
    for (int64_t l = 1; l < layers; ++l) {
      const torch::Tensor* r = b + 4 + (projection ? 3 : 0) + (l - 1) * 4;
      y = y + at::silu(product(y, r[0], r[1], r[2], H, r[3]));
    }
    const torch::Tensor* p = &lm[d * 3];
    const torch::Tensor logits = product(y, p[0], p[1], p[2], out, none);  // [1, out]
    const auto top = at::topk(logits, 1, -1);
    const torch::Tensor id = vocab.numel() > 0 ? vocab.index({std::get<1>(top)}) : std::get<1>(top);  // [1, 1]
    ids[d] = id.item<int64_t>();
    chances[d] = (std::get<0>(top) - at::logsumexp(logits, {-1}, true)).exp().item<float>();
    parts.push_back(embed.narrow(0, ids[d].item<int64_t>(), 1));
  }
  return {ids, chances};
}

#ifndef DRAFTHEADS_NO_MODULE  // decoder_stack.cpp includes this file and calls its functions
// Whether modules' parameters are still what they were when watched (weight_state.py): each still the object in
// its module's _parameters (no parameter replaced, added or removed), holding the same tensor (torch's
// swap_tensors exchanges them), at the same address with the same sizes and strides (`.data =` re-points it), and
// not written in place since (its version counter; an inference tensor keeps none). ~50 ns a parameter with the
// call, where asking each from Python took ~1 us.
struct Watch {
  std::vector<py::object> dicts, keys, objects;
  std::vector<Py_ssize_t> entries;  // each dict's size
  std::vector<const c10::TensorImpl*> impls;
  std::vector<const void*> addresses;
  std::vector<int64_t> versions;
  std::vector<std::vector<int64_t>> layouts;  // sizes, then strides

  static int64_t version(const at::Tensor& t) { return t.is_inference() ? -1 : static_cast<int64_t>(t._version()); }

  // parameters: [(a module's _parameters, name, the tensor there)]
  explicit Watch(const py::list& parameters) {
    for (const py::handle& h : parameters) {
      const py::tuple entry = py::reinterpret_borrow<py::tuple>(h);
      TORCH_CHECK(entry.size() == 3 && PyDict_Check(entry[0].ptr()) && THPVariable_Check(entry[2].ptr()),
                  "Watch takes (dict, name, tensor) triples");
      const at::Tensor& t = THPVariable_Unpack(entry[2].ptr());
      dicts.push_back(entry[0]);
      keys.push_back(entry[1]);
      objects.push_back(entry[2]);
      entries.push_back(PyDict_Size(entry[0].ptr()));
      impls.push_back(t.unsafeGetTensorImpl());
      addresses.push_back(t.data_ptr());
      versions.push_back(version(t));
      std::vector<int64_t> layout(t.sizes().begin(), t.sizes().end());
      layout.insert(layout.end(), t.strides().begin(), t.strides().end());
      layouts.push_back(std::move(layout));
    }
  }

  bool same() const {
    for (size_t i = 0; i < objects.size(); ++i) {
      PyObject* now = PyDict_GetItem(dicts[i].ptr(), keys[i].ptr());  // borrowed; NULL where it is gone
      if (now != objects[i].ptr() || PyDict_Size(dicts[i].ptr()) != entries[i]) return false;
      const at::Tensor& t = THPVariable_Unpack(now);
      if (t.unsafeGetTensorImpl() != impls[i] || t.data_ptr() != addresses[i] || version(t) != versions[i]) return false;
      const std::vector<int64_t>& l = layouts[i];
      const size_t n = static_cast<size_t>(t.dim());
      if (l.size() != 2 * n || !std::equal(t.sizes().begin(), t.sizes().end(), l.begin()) ||
          !std::equal(t.strides().begin(), t.strides().end(), l.begin() + n))
        return false;
    }
    return true;
  }
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("few_rows_linear", &few_rows_linear, "x @ w.T (+ b) for few rows of x (float32, CPU, AVX2)");
  m.def("packed_linear", &packed_linear, "x @ w.T for few rows of x and w in tiles of Q4_1 or Q8_0 blocks (float32)");
  m.def("packed_linear_q8", &packed_linear_q8, "packed_linear with x rounded to 8 bits per block of 32 inputs");
  m.def("heads_top", &heads_top, "Medusa heads' top-k ids and their probabilities for rows of x, their weights packed");
  m.def("hydra_chain", &hydra_chain, "Hydra heads' top-1 chain and its probabilities for one hidden state, their weights packed");
  py::class_<Watch>(m, "Watch").def(py::init<const py::list&>()).def("same", &Watch::same,
      "whether every watched parameter is what it was: the same object, tensor, address, layout and version");
}
#endif
