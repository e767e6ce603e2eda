// The bf16 decoder's step for one sequence (decode.py), as one C++ call: the same arithmetic as the Python
// step, without a Python-dispatched tensor operation for every norm, rotation, cache write and attention.
// The four matrix products per layer and the head stay ATen's (at::linear on the bf16 weights: torch's
// own matrix-vector kernel, oneDNN being switched off by the caller for one row); everything between them is
// a loop over a few hundred floats. Rounding follows the Python step: float32 residual, norms, rotary
// embedding, cache and attention; bf16 inputs and outputs of the products; SiLU and its product with the up
// projection rounded to bf16 as torch does for bf16 tensors.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

using at::BFloat16;
using at::Tensor;

namespace {

Tensor linear(const Tensor& x, const Tensor& w, const Tensor& b) {
  return b.numel() ? at::linear(x, w, b) : at::linear(x, w);
}

float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// x * rsqrt(mean(x^2) + eps) * w, rounded to bf16 (RMSNorm as transformers' Llama computes it in float32)
void norm_bf16(const float* x, const float* w, float eps, int64_t n, BFloat16* out) {
  const float r = 1.f / std::sqrt(dot(x, x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = BFloat16(x[i] * r * w[i]);
}

// t * cos + roll(t, dim/2) * sin, where sin's first half is negated (decode.py's `_signed`): rotate_half
void rotate(float* t, const float* cos, const float* sin, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < half; ++d) {  // each pair (d, d + half) rotates together: no copy of t needed
    const float a = t[d], b = t[d + half];
    t[d] = a * cos[d] + b * sin[d];
    t[d + half] = b * cos[d + half] + a * sin[d + half];
  }
}

struct Step {
  std::vector<Tensor> norm1, qkv_w, qkv_b, o_w, o_b, norm2, gate_up_w, gate_up_b, down_w, down_b;
  std::vector<double> eps1, eps2;
  Tensor final_norm, head;
  double final_eps;
  int64_t heads, kv_heads, dim, intermediate;

  // Logits (1, vocab) float32 for one sequence whose residual `x` (1, hidden) float32 is its new token's
  // embedding at position `pos`; the token's keys and values are written into `keys`/`values` (layers,
  // slots, kv heads, capacity, dim; contiguous float32) at slot `slot`, position `pos`, and it attends to
  // positions 0..pos of that slot. `cos`/`sin` (dim,): the rotary embedding at `pos`, sin signed.
  Tensor run(Tensor x, int64_t pos, Tensor keys, Tensor values, int64_t slot, Tensor cos, Tensor sin) {
    TORCH_CHECK(x.is_contiguous() && keys.is_contiguous() && values.is_contiguous(), "contiguous inputs");
    const int64_t hidden = x.size(1), slots = keys.size(1), capacity = keys.size(3);
    const int64_t width = pos + 1, group = heads / kv_heads, qk_rows = heads + kv_heads;
    const float scale = 1.f / std::sqrt(static_cast<float>(dim));
    const float* cosp = cos.data_ptr<float>();
    const float* sinp = sin.data_ptr<float>();
    float* xp = x.data_ptr<float>();
    const auto bf16 = x.options().dtype(at::kBFloat16);
    Tensor normed = at::empty({1, hidden}, bf16);
    Tensor attended = at::empty({1, heads * dim}, bf16);
    Tensor gated = at::empty({1, intermediate}, bf16);
    std::vector<float> qk(qk_rows * dim), out(heads * dim);
    BFloat16* normp = normed.data_ptr<BFloat16>();

    for (size_t layer = 0; layer < qkv_w.size(); ++layer) {
      norm_bf16(xp, norm1[layer].data_ptr<float>(), eps1[layer], hidden, normp);
      Tensor qkv = linear(normed, qkv_w[layer], qkv_b[layer]);
      const BFloat16* qkvp = qkv.data_ptr<BFloat16>();
      for (int64_t i = 0; i < qk_rows * dim; ++i) qk[i] = static_cast<float>(qkvp[i]);
      for (int64_t h = 0; h < qk_rows; ++h) rotate(qk.data() + h * dim, cosp, sinp, dim);

      const int64_t base = (static_cast<int64_t>(layer) * slots + slot) * kv_heads * capacity * dim;
      float* kc = keys.data_ptr<float>() + base;
      float* vc = values.data_ptr<float>() + base;
      for (int64_t g = 0; g < kv_heads; ++g) {
        std::memcpy(kc + (g * capacity + pos) * dim, qk.data() + (heads + g) * dim, dim * sizeof(float));
        const BFloat16* v = qkvp + (qk_rows + g) * dim;
        for (int64_t d = 0; d < dim; ++d) vc[(g * capacity + pos) * dim + d] = static_cast<float>(v[d]);
      }

      // each query head over its key/value head's positions 0..pos: softmax(q.k * scale) . v
      at::parallel_for(0, heads, width * dim >= 32768 ? 1 : heads, [&](int64_t begin, int64_t end) {
        std::vector<float> p(width);
        for (int64_t h = begin; h < end; ++h) {
          const int64_t g = h / group;
          const float* q = qk.data() + h * dim;
          const float* k = kc + g * capacity * dim;
          const float* v = vc + g * capacity * dim;
          float top = -INFINITY;
          for (int64_t t = 0; t < width; ++t) {
            p[t] = dot(q, k + t * dim, dim) * scale;
            top = std::max(top, p[t]);
          }
          float sum = 0.f;
          for (int64_t t = 0; t < width; ++t) sum += (p[t] = std::exp(p[t] - top));
          float* o = out.data() + h * dim;
          std::fill(o, o + dim, 0.f);
          for (int64_t t = 0; t < width; ++t) {
            const float w = p[t] / sum;
            const float* vt = v + t * dim;
            for (int64_t d = 0; d < dim; ++d) o[d] += w * vt[d];
          }
        }
      });
      BFloat16* attp = attended.data_ptr<BFloat16>();
      for (int64_t i = 0; i < heads * dim; ++i) attp[i] = BFloat16(out[i]);
      Tensor o = linear(attended, o_w[layer], o_b[layer]);
      const BFloat16* op = o.data_ptr<BFloat16>();
      for (int64_t i = 0; i < hidden; ++i) xp[i] += static_cast<float>(op[i]);

      norm_bf16(xp, norm2[layer].data_ptr<float>(), eps2[layer], hidden, normp);
      Tensor gate_up = linear(normed, gate_up_w[layer], gate_up_b[layer]);
      const BFloat16* gu = gate_up.data_ptr<BFloat16>();
      BFloat16* gp = gated.data_ptr<BFloat16>();
      for (int64_t i = 0; i < intermediate; ++i) {
        const float g = static_cast<float>(gu[i]);
        const BFloat16 silu = BFloat16(g / (1.f + std::exp(-g)));
        gp[i] = BFloat16(static_cast<float>(silu) * static_cast<float>(gu[intermediate + i]));
      }
      Tensor down = linear(gated, down_w[layer], down_b[layer]);
      const BFloat16* dp = down.data_ptr<BFloat16>();
      for (int64_t i = 0; i < hidden; ++i) xp[i] += static_cast<float>(dp[i]);
    }
    norm_bf16(xp, final_norm.data_ptr<float>(), final_eps, hidden, normp);
    return at::linear(normed, head).to(at::kFloat);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Step>(m, "Step")
      .def(pybind11::init<>())
      .def_readwrite("norm1", &Step::norm1)
      .def_readwrite("qkv_w", &Step::qkv_w)
      .def_readwrite("qkv_b", &Step::qkv_b)
      .def_readwrite("o_w", &Step::o_w)
      .def_readwrite("o_b", &Step::o_b)
      .def_readwrite("norm2", &Step::norm2)
      .def_readwrite("gate_up_w", &Step::gate_up_w)
      .def_readwrite("gate_up_b", &Step::gate_up_b)
      .def_readwrite("down_w", &Step::down_w)
      .def_readwrite("down_b", &Step::down_b)
      .def_readwrite("eps1", &Step::eps1)
      .def_readwrite("eps2", &Step::eps2)
      .def_readwrite("final_norm", &Step::final_norm)
      .def_readwrite("head", &Step::head)
      .def_readwrite("final_eps", &Step::final_eps)
      .def_readwrite("heads", &Step::heads)
      .def_readwrite("kv_heads", &Step::kv_heads)
      .def_readwrite("dim", &Step::dim)
      .def_readwrite("intermediate", &Step::intermediate)
      // without the GIL: a server's other threads (HTTP, streaming) run during the step
      .def("run", &Step::run, pybind11::call_guard<pybind11::gil_scoped_release>());
}
