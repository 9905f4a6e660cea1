// The whole decoder stack of a few-row float32 pass in one call: per layer RMSNorm, the q/k/v product,
// rotary, the cache write, attention, o_proj, RMSNorm, the gate/up product, SiLU(gate) * up, down_proj;
// then the final norm. The lean forward (llama_forward.py) makes these same calls from Python, ~25 a layer,
// each paying ~2-10 us of Python and torch dispatch: at one row that was ~2 ms of a ~13 ms pass
// (docs/verify_profile.md). Here they are the same functions in the same order, so every float is the same.
//
// Only for weights held exactly in GGUF blocks (few_rows.pack: every product on packed_linear, as
// cpu_matmul.linear routes such a pass). kvcache.py's write_views hands each layer's keys and values and the
// column where each sequence's entries go: this file knows no cache layout.
#define DRAFTHEADS_NO_MODULE
#include "few_rows.cpp"
#include "layer_ops.cpp"
#undef DRAFTHEADS_NO_MODULE

#include <pybind11/stl.h>

namespace {

// A weight in few_rows.pack's tiles (q, d, m: m empty for Q8_0), its bias (or empty) and its output count.
struct Product {
  torch::Tensor q, d, m, bias;
  int64_t out;

  // x [rows, in] -> [rows, out], as few_rows.packed_linear computes it (int8: x rounded to 8 bits per block of 32).
  torch::Tensor operator()(const torch::Tensor& x, bool int8) const {
    return int8 ? packed_linear_q8(x, q, d, m, out, bias) : packed_linear(x, q, d, m, out, bias);
  }
};

Product product(const std::vector<torch::Tensor>& t, size_t at, int64_t out) {
  return Product{t.at(at), t.at(at + 1), t.at(at + 2), t.at(at + 3), out};
}

struct Layer {
  torch::Tensor in_norm, post_norm;
  double in_eps, post_eps;
  Product qkv, o, gate_up, down;
};

}  // namespace

class DecoderStack {
 public:
  // layers: per layer [in_norm, post_norm, then q, d, m, bias for each of qkv, o, gate_up, down] (18 tensors);
  // outs: per layer the four products' output counts; eps: per layer (in, post).
  DecoderStack(const std::vector<std::vector<torch::Tensor>>& layers, const std::vector<std::vector<int64_t>>& outs,
               const std::vector<std::vector<double>>& eps, torch::Tensor final_norm, double final_eps, int64_t heads,
               int64_t kv_heads, int64_t head_dim, double scale)
      : final_norm_(final_norm), final_eps_(final_eps), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim),
        scale_(scale) {
    TORCH_CHECK(layers.size() == outs.size() && layers.size() == eps.size() && !layers.empty(), "one entry per layer");
    for (size_t i = 0; i < layers.size(); ++i) {
      const auto& t = layers[i];
      TORCH_CHECK(t.size() == 18 && outs[i].size() == 4 && eps[i].size() == 2, "layer ", i, ": 18 tensors, 4 outs, 2 eps");
      TORCH_CHECK(outs[i][0] == (heads + 2 * kv_heads) * head_dim, "layer ", i, ": q/k/v's outputs");
      layers_.push_back(Layer{t[0], t[1], eps[i][0], eps[i][1], product(t, 2, outs[i][0]), product(t, 6, outs[i][1]),
                              product(t, 10, outs[i][2]), product(t, 14, outs[i][3])});
    }
  }

  // x [R, hidden]: the embeddings of a pass's real rows (updated in place); cos, sin [R, head_dim]; rows: their
  // places [R] in the pass's B x Q rows (int64), or empty where R = B * Q (no padding); keys/values per layer
  // [B, kv_heads, capacity, head_dim] (views of the cache: sequence b's Q entries are written at columns
  // starts[b]..); end: the columns attended; mask additive [1 or B, 1, Q, end] or empty; int8: the products round
  // x to 8 bits (few_rows.activations()) -> final-norm hidden states [R, hidden]. Padding rows enter attention as
  // zeros and write zeros, as the lean forward's unpack.
  torch::Tensor forward(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, torch::Tensor rows, int64_t B, int64_t Q,
                        const std::vector<torch::Tensor>& keys, const std::vector<torch::Tensor>& values,
                        const std::vector<int64_t>& starts, int64_t end, torch::Tensor mask, bool int8) const {
    const int64_t R = x.size(0), H = heads_, KVH = kv_heads_, D = head_dim_, W = (H + 2 * KVH) * D;
    TORCH_CHECK(keys.size() == layers_.size() && values.size() == layers_.size(), "keys and values: one per layer");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: [rows, hidden], contiguous");
    TORCH_CHECK(static_cast<int64_t>(starts.size()) == B && B > 0 && Q > 0, "one start per sequence");
    const bool padded = rows.numel() > 0;
    TORCH_CHECK(padded ? (rows.dim() == 1 && rows.numel() == R && rows.scalar_type() == torch::kLong && R <= B * Q) : R == B * Q,
                "rows: [R] int64 places of x's rows among B x Q, or empty for all of them");
    for (int64_t b = 0; b < B; ++b) TORCH_CHECK(starts[b] >= 0 && starts[b] + Q <= end, "sequence ", b, ": its entries past end");
    // sequence b sees its own columns only, [0, starts[b] + Q): attention skips the rest where a mask hides them
    std::vector<int64_t> limits;
    if (mask.numel() > 0)
      for (int64_t b = 0; b < B; ++b) limits.push_back(starts[b] + Q);
    torch::Tensor delta = EMPTY_;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      const torch::Tensor& k = keys[i];
      const torch::Tensor& v = values[i];
      TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == KVH && k.size(3) == D && v.sizes() == k.sizes() &&
                  end <= k.size(2), "layer ", i, ": keys/values [B, kv_heads, capacity >= end, head_dim]");
      torch::Tensor h = add_rms_norm(x, delta, l.in_norm, l.in_eps);  // [R, hidden]
      torch::Tensor qkv = l.qkv(h, int8);  // [R, (H + 2 KVH) D]
      rope_(qkv, cos, sin, H + KVH);
      if (padded) qkv = torch::zeros({B * Q, W}, qkv.options()).index_copy_(0, rows, qkv);  // [B * Q, W]
      const torch::Tensor all = qkv.view({B, Q, W});
      write_cache(all, k, v, starts);
      torch::Tensor o = attention(all.narrow(2, 0, H * D).view({B, Q, H, D}), k.narrow(2, 0, end), v.narrow(2, 0, end),
                                  mask, scale_, limits).view({B * Q, H * D});
      if (padded) o = o.index_select(0, rows);  // [R, H D]
      h = add_rms_norm(x, l.o(o, int8), l.post_norm, l.post_eps);
      torch::Tensor gate_up = l.gate_up(h, int8);  // [R, 2 I]
      const int64_t I = gate_up.size(1) / 2;
      delta = l.down(silu_mul(gate_up.narrow(1, 0, I), gate_up.narrow(1, I, I)), int8);
    }
    return add_rms_norm(x, delta, final_norm_, final_eps_);
  }

 private:
  // Sequence b's Q new keys and values (all [B, Q, W]: q, then k, then v per row) into k, v [B, KVH, capacity, D] at
  // columns starts[b]..: a row copy per kv head (as torch copy_ per sequence, 2 B calls a layer, they were ~15% of a
  // 48-sequence pass, one thread copying while the other waited).
  void write_cache(const torch::Tensor& all, const torch::Tensor& k, const torch::Tensor& v, const std::vector<int64_t>& starts) const {
    TORCH_CHECK(all.is_contiguous() && k.stride(3) == 1 && v.stride(3) == 1 && v.scalar_type() == k.scalar_type(), "contiguous rows");
    if (k.scalar_type() == torch::kHalf)
      write_rows<at::Half>(all, k, v, starts);
    else
      write_rows<float>(all, k, v, starts);
  }

  // Row copies into a float32 cache; into a float16 one, each float rounded to the nearest half (F16C).
  static void put(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
  static void put(at::Half* dst, const float* src, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = at::Half(src[i]);
  }

  template <typename T>
  void write_rows(const torch::Tensor& all, const torch::Tensor& k, const torch::Tensor& v, const std::vector<int64_t>& starts) const {
    const int64_t B = all.size(0), Q = all.size(1), W = all.size(2), H = heads_, KVH = kv_heads_, D = head_dim_;
    const float* src = all.data_ptr<float>();
    T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t h = 0; h < KVH; ++h) {
          const float* row = src + (b * Q + i) * W + (H + h) * D;
          put(kp + b * k.stride(0) + h * k.stride(1) + (starts[b] + i) * k.stride(2), row, D);
          put(vp + b * v.stride(0) + h * v.stride(1) + (starts[b] + i) * v.stride(2), row + KVH * D, D);
        }
  }

  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
  double final_eps_;
  int64_t heads_, kv_heads_, head_dim_;
  double scale_;
  const torch::Tensor EMPTY_ = torch::empty({0});
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecoderStack>(m, "DecoderStack")
      .def(pybind11::init<const std::vector<std::vector<torch::Tensor>>&, const std::vector<std::vector<int64_t>>&,
                          const std::vector<std::vector<double>>&, torch::Tensor, double, int64_t, int64_t, int64_t, double>())
      // The pass's tensors are held by the caller: the threads of a server may run Python meanwhile.
      .def("forward", &DecoderStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
