// Window attention kernels for CPU tensors.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu_math.h"
#include "common/cpu_tensor.h"
#include "window_attention/cpu_window.h"
#include "window_attention/window_attention.h"

namespace vitkernels {
namespace {

// Output elements per parallel task: enough to amortize a task, as ATen's own CPU kernels use.
constexpr int64_t kElementsPerTask = 32768;

// Fills output rows [begin, end) of the [heads * N, N] view; row h * N + i holds query token i of head h.
template <typename scalar_t>
void gather_bias_rows(const scalar_t* table, int64_t stride_row, int64_t stride_head, scalar_t* out, int64_t begin,
                      int64_t end, int64_t window_h, int64_t window_w) {
  const int64_t n = window_h * window_w;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t head = row / n;
    const int64_t query = row % n;
    const int64_t ri = query / window_w;
    const int64_t ci = query % window_w;
    const scalar_t* column = table + head * stride_head;
    scalar_t* dst = out + row * n;
    for (int64_t rj = 0; rj < window_h; ++rj) {
      // Moving the key one column right moves one row up the table.
      const int64_t first = relative_position_row<int64_t>(ri, ci, rj, 0, window_h, window_w);
      for (int64_t cj = 0; cj < window_w; ++cj) {
        dst[rj * window_w + cj] = column[(first - cj) * stride_row];
      }
    }
  }
}

}  // namespace

at::Tensor gather_relative_position_bias_cpu(const at::Tensor& bias_table, int64_t window_h, int64_t window_w) {
  check_device(bias_table, "bias_table", c10::DeviceType::CPU);
  check_gather_relative_position_bias(bias_table, window_h, window_w);
  const int64_t n = window_h * window_w;
  const int64_t heads = bias_table.size(1);
  at::Tensor out = at::empty({heads, n, n}, bias_table.options());
  if (out.numel() == 0) {
    return out;
  }
  const int64_t rows_per_task = std::max<int64_t>(1, kElementsPerTask / n);
  VITKERNELS_DISPATCH_FLOATING(bias_table.scalar_type(), "gather_relative_position_bias_cpu", [&] {
    const scalar_t* table = bias_table.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t stride_row = bias_table.stride(0);
    const int64_t stride_head = bias_table.stride(1);
    at::parallel_for(0, heads * n, rows_per_task, [&](int64_t begin, int64_t end) {
      gather_bias_rows(table, stride_row, stride_head, dst, begin, end, window_h, window_w);
    });
  });
  return out;
}

namespace window_cpu {

Geometry make_geometry(const at::Tensor& qkv, int64_t num_heads, at::IntArrayRef window_size,
                       at::IntArrayRef shift_size, bool pad_first) {
  check_device(qkv, "qkv", c10::DeviceType::CPU);
  check_dim(qkv, "qkv", 4);
  check_cpu_floating(qkv, "qkv");
  TORCH_CHECK(window_size.size() == 2 && shift_size.size() == 2, "window_size and shift_size must be pairs, got ",
              window_size, " and ", shift_size);
  check_range(num_heads, "num_heads", 1, qkv.size(3));
  Geometry g{};
  g.batch = qkv.size(0);
  g.height = qkv.size(1);
  g.width = qkv.size(2);
  TORCH_CHECK(qkv.size(3) % (3 * num_heads) == 0, "qkv's last dim ", qkv.size(3),
              " must be 3 * num_heads * head_dim with num_heads=", num_heads);
  TORCH_CHECK(g.height > 0 && g.width > 0, "qkv map must be non-empty, got shape ", qkv.sizes());
  g.heads = num_heads;
  g.channels = qkv.size(3) / 3;
  g.head_dim = g.channels / num_heads;
  check_range(window_size[0], "window_size[0]", 1, kMaxWindowSide);
  check_range(window_size[1], "window_size[1]", 1, kMaxWindowSide);
  check_range(shift_size[0], "shift_size[0]", 0, window_size[0] - 1);
  check_range(shift_size[1], "shift_size[1]", 0, window_size[1] - 1);
  g.window_h = window_size[0];
  g.window_w = window_size[1];
  g.shift_h = shift_size[0];
  g.shift_w = shift_size[1];
  g.windows_h = (g.height + g.window_h - 1) / g.window_h;
  g.windows_w = (g.width + g.window_w - 1) / g.window_w;
  g.padded_h = g.windows_h * g.window_h;
  g.padded_w = g.windows_w * g.window_w;
  g.n = g.window_h * g.window_w;
  g.ld = (g.n + cpu::kGemmTileCols - 1) / cpu::kGemmTileCols * cpu::kGemmTileCols;
  g.pad_first = pad_first;
  return g;
}

void window_tokens(const Geometry& g, int64_t image, int64_t window, int64_t* pixel, int32_t* region) {
  const int64_t top = window / g.windows_w * g.window_h;
  const int64_t left = window % g.windows_w * g.window_w;
  for (int64_t r = 0; r < g.window_h; ++r) {
    const int64_t y = top + r;
    const int64_t row = source_coordinate(y, g.height, g.padded_h, g.shift_h, g.pad_first);
    const int32_t row_region = shift_region(y, g.padded_h, g.window_h, g.shift_h);
    for (int64_t c = 0; c < g.window_w; ++c) {
      const int64_t x = left + c;
      const int64_t col = source_coordinate(x, g.width, g.padded_w, g.shift_w, g.pad_first);
      const int64_t t = r * g.window_w + c;
      pixel[t] = row < 0 || col < 0 ? -1 : (image * g.height + row) * g.width + col;
      region[t] = row_region * 3 + shift_region(x, g.padded_w, g.window_w, g.shift_w);
    }
  }
}

}  // namespace window_cpu

namespace {

using window_cpu::Geometry;

// The optional inputs in fp32, and what the kernels derive from them once per call.
struct Options {
  // The relative position bias of head h, query (ri, ci), as one contiguous row of N keys:
  // bias_rows[h, ci, k, cj] = bias_table[relative row of (ri, ci) and (rj, cj), h] with
  // k = Wh - 1 - ri + rj, so the keys rj = 0 .. Wh-1 of query (ri, ci) are rows Wh-1-ri .. of
  // bias_rows[h, ci]: [heads, Ww, 2Wh-1, Ww] plus kGemmTileCols floats of slack (the softmax
  // reads whole vectors), a fraction of the [heads, N, N] gathered bias; or undefined.
  at::Tensor bias_rows;
  at::Tensor fill;      // [3C] q, k, v of padding tokens (the qkv Linear's bias), or undefined
  at::Tensor tau;       // [heads] exp(min(logit_scale, log 100)): cosine attention, or undefined
  at::Tensor relative;  // [N, N] int64 table rows, for the bias gradient, or undefined
  float scale = 1.0f;
  float mask_value = 0.0f;

  // Bias of head h for query token i (row-major in the window), N contiguous floats.
  const float* bias_row(const Geometry& g, int64_t h, int64_t i) const {
    const int64_t ri = i / g.window_w;
    const int64_t ci = i % g.window_w;
    const int64_t block = (2 * g.window_h - 1) * g.window_w;
    return bias_rows.const_data_ptr<float>() + (h * g.window_w + ci) * block + (g.window_h - 1 - ri) * g.window_w;
  }
  const float* fill_ptr() const { return data_or_null(fill); }
  // Multiplies q k^T: the softmax scale, or the cosine temperature of head h.
  float alpha(int64_t h) const { return tau.defined() ? tau.const_data_ptr<float>()[h] : scale; }
};

void check_optional(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& qkv, int64_t numel) {
  if (t.has_value()) {
    check_same_device(*t, name, qkv, "qkv");
    check_floating(*t, name);
    TORCH_CHECK(t->numel() == numel, name, " must hold ", numel, " values, got shape ", t->sizes());
  }
}

// Options::bias_rows from the fp32 [(2Wh-1)(2Ww-1), heads] table.
at::Tensor make_bias_rows(const Geometry& g, const at::Tensor& table) {
  const int64_t wh = g.window_h;
  const int64_t ww = g.window_w;
  const int64_t size = g.heads * ww * (2 * wh - 1) * ww;
  at::Tensor rows = at::zeros({size + cpu::kGemmTileCols}, table.options());
  const float* from = table.const_data_ptr<float>();
  float* to = rows.mutable_data_ptr<float>();
  for (int64_t h = 0; h < g.heads; ++h) {
    for (int64_t ci = 0; ci < ww; ++ci) {
      for (int64_t k = 0; k < 2 * wh - 1; ++k) {
        // ri - rj = Wh - 1 - k; the table row of (ri, ci), (rj, cj) is relative_position_row's.
        const int64_t first = (2 * wh - 2 - k) * (2 * ww - 1) + ci + ww - 1;
        for (int64_t cj = 0; cj < ww; ++cj) {
          to[((h * ww + ci) * (2 * wh - 1) + k) * ww + cj] = from[(first - cj) * g.heads + h];
        }
      }
    }
  }
  return rows;
}

Options make_options(const Geometry& g, const at::Tensor& qkv, const std::optional<at::Tensor>& bias_table,
                     const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& logit_scale,
                     std::optional<double> scale, double mask_value, bool need_relative) {
  check_optional(bias_table, "bias_table", qkv, (2 * g.window_h - 1) * (2 * g.window_w - 1) * g.heads);
  check_optional(qkv_bias, "qkv_bias", qkv, 3 * g.channels);
  check_optional(logit_scale, "logit_scale", qkv, g.heads);
  TORCH_CHECK(!(scale.has_value() && logit_scale.has_value()), "scale and logit_scale are exclusive");
  Options o;
  if (bias_table.has_value()) {
    o.bias_rows = make_bias_rows(g, bias_table->to(at::kFloat).contiguous());
    if (need_relative) {
      o.relative = at::empty({g.n, g.n}, qkv.options().dtype(at::kLong));
      int64_t* rows = o.relative.mutable_data_ptr<int64_t>();
      for (int64_t i = 0; i < g.n; ++i) {
        for (int64_t j = 0; j < g.n; ++j) {
          rows[i * g.n + j] = relative_position_row(i / g.window_w, i % g.window_w, j / g.window_w, j % g.window_w,
                                                    g.window_h, g.window_w);
        }
      }
    }
  }
  if (qkv_bias.has_value()) {
    o.fill = qkv_bias->to(at::kFloat).contiguous();
  }
  if (logit_scale.has_value()) {
    o.tau = logit_scale->to(at::kFloat).reshape({-1}).clamp_max(std::log(100.0)).exp().contiguous();
  }
  o.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(g.head_dim)));
  o.mask_value = static_cast<float>(mask_value);
  return o;
}

// An fp32 work buffer that is not zeroed on allocation (std::vector<float> would be, on every call).
class Floats {
 public:
  explicit Floats(int64_t size = 0) : data_(size > 0 ? new float[size] : nullptr) {}
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }

 private:
  std::unique_ptr<float[]> data_;
};

// One thread's working set: the current window's tokens and [N, ld] shift mask, and one (image,
// window, head) problem: q, k, v as [N, head_dim] rows, keys or values transposed [head_dim, ld],
// logits [N, ld]. The gemms compute ld >= N columns; t and mask start zeroed so that the columns
// past N stay finite.
struct Scratch {
  int64_t window = -1;
  bool masked = false;       // the current window spans several shift regions
  bool consecutive = false;  // its tokens are consecutive pixels: whole rows of an un-shifted map
  std::vector<int64_t> pixel;
  std::vector<int32_t> region;
  std::vector<const float*> add_rows;  // what each query row's logits get added, see head_addend
  Floats q, k, v, t, s, o, mask, add, inv_sum, dp, dout, dq, dk, dv, q_norm, k_norm;

  explicit Scratch(const Geometry& g, bool backward)
      : pixel(g.n), region(g.n), add_rows(g.n), q(g.n * g.head_dim), k(g.n * g.head_dim), v(g.n * g.head_dim),
        t(g.head_dim * g.ld), s(g.n * g.ld), o(g.n * g.head_dim), mask(g.shifted() ? g.n * g.ld : 0),
        add(g.shifted() ? g.n * g.ld : 0), inv_sum(g.n), q_norm(g.n), k_norm(g.n) {
    std::fill(t.data(), t.data() + g.head_dim * g.ld, 0.0f);
    if (g.shifted()) {
      std::fill(mask.data(), mask.data() + g.n * g.ld, 0.0f);
    }
    if (backward) {
      dp = Floats(g.n * g.ld);
      dout = Floats(g.n * g.head_dim);
      dq = Floats(g.n * g.head_dim);
      dk = Floats(g.n * g.head_dim);
      dv = Floats(g.n * g.head_dim);
    }
  }
};

// Makes `window` (image * nW + window index) the scratch's current window: its tokens, regions
// and, when they span several regions, its shift mask.
void enter_window(const Geometry& g, const Options& o, int64_t window, Scratch& sc) {
  if (window == sc.window) {
    return;
  }
  window_cpu::window_tokens(g, window / g.windows(), window % g.windows(), sc.pixel.data(), sc.region.data());
  sc.window = window;
  const int32_t* region = sc.region.data();
  sc.masked = g.shifted() && std::any_of(region, region + g.n, [&](int32_t r) { return r != region[0]; });
  const int64_t* pixel = sc.pixel.data();
  sc.consecutive = pixel[0] >= 0;
  for (int64_t t = 1; t < g.n && sc.consecutive; ++t) {
    sc.consecutive = pixel[t] == pixel[0] + t;
  }
  if (sc.masked) {
    for (int64_t i = 0; i < g.n; ++i) {
      for (int64_t j = 0; j < g.n; ++j) {
        sc.mask.data()[i * g.ld + j] = region[j] != region[i] ? o.mask_value : 0.0f;
      }
    }
  }
}

// Where the attention product reads one head's values: N rows, ld floats apart.
struct Values {
  const float* rows;
  int64_t ld;
};

// Reads q, k, v of head h of the current window straight from the qkv map (normalized for cosine
// attention) and leaves the scaled logits alpha * q k^T in sc.s. With in_place, an fp32 window of
// consecutive pixels (a window as wide as the map, e.g. Swin's last stage) is not copied: its q and
// v rows are read where they lie, 3C apart, and its keys are transposed straight from the map.
template <typename scalar_t>
Values load_and_score(const Geometry& g, const Options& o, const scalar_t* qkv, int64_t h, bool in_place,
                            Scratch& sc) {
  const int64_t n = g.n;
  const int64_t d = g.head_dim;
  const int64_t stride = 3 * g.channels;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (in_place && sc.consecutive && !o.tau.defined()) {
      const float* q = qkv + sc.pixel[0] * stride + h * d;
      cpu::transpose(q + g.channels, sc.t.data(), n, d, stride, g.ld);
      cpu::gemm(q, sc.t.data(), sc.s.data(), n, d, g.ld, stride, g.ld, g.ld, o.alpha(h), false, false);
      return {q + 2 * g.channels, stride};
    }
  }
  const int64_t* pixel = sc.pixel.data();
  window_cpu::load_rows(qkv, pixel, n, stride, h * d, d, o.fill_ptr(), sc.q.data());
  window_cpu::load_rows(qkv, pixel, n, stride, 2 * g.channels + h * d, d, o.fill_ptr(), sc.v.data());
  window_cpu::load_rows(qkv, pixel, n, stride, g.channels + h * d, d, o.fill_ptr(), sc.k.data());
  if (o.tau.defined()) {
    cpu::normalize_rows(sc.q.data(), sc.q_norm.data(), n, d);
    cpu::normalize_rows(sc.k.data(), sc.k_norm.data(), n, d);
  }
  cpu::transpose(sc.k.data(), sc.t.data(), n, d, d, g.ld);
  cpu::gemm(sc.q.data(), sc.t.data(), sc.s.data(), n, d, g.ld, d, g.ld, g.ld, o.alpha(h), false, false);
  return {sc.v.data(), d};
}

// What head h adds to the logits of each query row in the current window, as row pointers (each
// row readable to ld): the bias rows, plus the shift mask where the window is masked; null when
// nothing is added.
const float* const* head_addend(const Geometry& g, const Options& o, int64_t h, Scratch& sc) {
  const bool bias = o.bias_rows.defined();
  if (!bias && !sc.masked) {
    return nullptr;
  }
  for (int64_t i = 0; i < g.n; ++i) {
    if (!sc.masked) {
      sc.add_rows[i] = o.bias_row(g, h, i);
      continue;
    }
    const float* mask = sc.mask.data() + i * g.ld;
    if (!bias) {
      sc.add_rows[i] = mask;
    } else {
      const float* __restrict bias_row = o.bias_row(g, h, i);
      float* __restrict sum = sc.add.data() + i * g.ld;
      for (int64_t j = 0; j < g.ld; ++j) {
        sum[j] = bias_row[j] + mask[j];
      }
      sc.add_rows[i] = sum;
    }
  }
  return sc.add_rows.data();
}

template <typename scalar_t>
void forward_tasks(const Geometry& g, const Options& o, const scalar_t* qkv, scalar_t* out, float* lse,
                   int64_t begin, int64_t end) {
  Scratch sc(g, /*backward=*/false);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t h = task % g.heads;
    enter_window(g, o, task / g.heads, sc);
    const Values values = load_and_score(g, o, qkv, h, /*in_place=*/true, sc);
    cpu::softmax_rows_unnormalized(sc.s.data(), head_addend(g, o, h, sc), lse + task * g.n, sc.inv_sum.data(),
                                   g.n, g.n, g.ld);
    cpu::gemm(sc.s.data(), values.rows, sc.o.data(), g.n, g.n, g.head_dim, g.ld, values.ld, g.head_dim, 1.0f, false,
              false);
    window_cpu::store_rows(sc.o.data(), sc.pixel.data(), g.n, g.channels, h * g.head_dim, g.head_dim, out,
                           static_cast<float*>(nullptr), sc.inv_sum.data());
  }
}

// Per-block partial sums of the reduced gradients, summed in block order for bitwise-reproducible
// results: [table rows * heads] bias table, [3C] qkv_bias, [heads] logit_scale.
struct Partials {
  int64_t table_size, bias_size, heads;
  std::vector<float> data;

  Partials(const Geometry& g, int64_t blocks)
      : table_size((2 * g.window_h - 1) * (2 * g.window_w - 1) * g.heads),
        bias_size(3 * g.channels),
        heads(g.heads),
        data(blocks * (table_size + bias_size + heads), 0.0f) {}

  int64_t stride() const { return table_size + bias_size + heads; }
  float* table(int64_t block) { return data.data() + block * stride(); }
  float* bias(int64_t block) { return table(block) + table_size; }
  float* logit(int64_t block) { return bias(block) + bias_size; }

  void reduce_into_first(int64_t blocks) {
    for (int64_t b = 1; b < blocks; ++b) {
      for (int64_t e = 0; e < stride(); ++e) {
        data[e] += data[b * stride() + e];
      }
    }
  }
};

// sc.dp <- dS = P * (dP - rowsum(P * dP)) from P in sc.s and dP in sc.dp; dS is added to the
// partial bias table.
void softmax_backward(const Geometry& g, const Options& o, int64_t h, Scratch& sc, float* table) {
  const int64_t n = g.n;
  const int64_t* relative = o.relative.defined() ? o.relative.const_data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const float* p = sc.s.data() + i * g.ld;
    float* ds = sc.dp.data() + i * g.ld;
    const float total = cpu::dot(p, ds, n);
    for (int64_t j = 0; j < n; ++j) {
      ds[j] = p[j] * (ds[j] - total);
    }
    if (relative != nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        table[relative[i * n + j] * g.heads + h] += ds[j];
      }
    }
  }
}

template <typename scalar_t>
void backward_task(const Geometry& g, const Options& o, const scalar_t* qkv, const scalar_t* grad_out,
                   const float* lse, int64_t task, Scratch& sc, scalar_t* dqkv, Partials& part, int64_t block) {
  const int64_t n = g.n;
  const int64_t d = g.head_dim;
  const int64_t h = task % g.heads;
  const float alpha = o.alpha(h);
  enter_window(g, o, task / g.heads, sc);
  load_and_score(g, o, qkv, h, /*in_place=*/false, sc);
  const int64_t ld = g.ld;
  cpu::exp_rows_minus(sc.s.data(), head_addend(g, o, h, sc), lse + task * n, n, n, ld);
  window_cpu::load_rows(grad_out, sc.pixel.data(), n, g.channels, h * d, d, nullptr, sc.dout.data());
  cpu::gemm(sc.s.data(), sc.dout.data(), sc.dv.data(), n, n, d, ld, d, d, 1.0f, true, false);
  cpu::transpose(sc.v.data(), sc.t.data(), n, d, d, ld);
  cpu::gemm(sc.dout.data(), sc.t.data(), sc.dp.data(), n, d, ld, d, ld, ld, 1.0f, false, false);
  softmax_backward(g, o, h, sc, part.table(block));
  cpu::gemm(sc.dp.data(), sc.k.data(), sc.dq.data(), n, n, d, ld, d, d, alpha, false, false);
  cpu::gemm(sc.dp.data(), sc.q.data(), sc.dk.data(), n, n, d, ld, d, d, alpha, true, false);
  if (o.tau.defined()) {
    // d logit_scale = sum(dS * tau * cos) = sum_i q_i . dq_i while q, dq are the normalized
    // rows and their gradient; tau = exp(logit_scale) is its own derivative.
    part.logit(block)[h] += cpu::dot(sc.q.data(), sc.dq.data(), n * d);
    cpu::normalize_rows_backward(sc.dq.data(), sc.q.data(), sc.q_norm.data(), n, d);
    cpu::normalize_rows_backward(sc.dk.data(), sc.k.data(), sc.k_norm.data(), n, d);
  }
  const int64_t stride = 3 * g.channels;
  float* padding = o.fill.defined() ? part.bias(block) : nullptr;
  window_cpu::store_rows(sc.dq.data(), sc.pixel.data(), n, stride, h * d, d, dqkv, padding);
  window_cpu::store_rows(sc.dk.data(), sc.pixel.data(), n, stride, g.channels + h * d, d, dqkv, padding);
  window_cpu::store_rows(sc.dv.data(), sc.pixel.data(), n, stride, 2 * g.channels + h * d, d, dqkv, padding);
}

// The gradient of an optional input from its fp32 sum (the input's layout, row-major); empty when absent.
at::Tensor reduced_gradient(const std::optional<at::Tensor>& input, const float* sum) {
  if (!input.has_value()) {
    return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  }
  at::Tensor grad = at::empty(input->sizes(), input->options().dtype(at::kFloat));
  std::copy(sum, sum + grad.numel(), grad.mutable_data_ptr<float>());
  return grad.to(input->scalar_type());
}

// Clamping at log(100) passes no gradient to a logit scale above it.
at::Tensor logit_scale_gradient(const std::optional<at::Tensor>& logit_scale, float* sum) {
  if (logit_scale.has_value()) {
    const at::Tensor values = logit_scale->to(at::kFloat).reshape({-1}).contiguous();
    for (int64_t h = 0; h < values.numel(); ++h) {
      if (!(values.const_data_ptr<float>()[h] <= std::log(100.0f))) {
        sum[h] = 0.0f;
      }
    }
  }
  return reduced_gradient(logit_scale, sum);
}

// A fixed block count, independent of the thread count, so the reduction order never changes.
constexpr int64_t kGradientBlocks = 64;

}  // namespace

std::tuple<at::Tensor, at::Tensor> window_attention_fwd_cpu(
    const at::Tensor& qkv_in, int64_t num_heads, at::IntArrayRef window_size, at::IntArrayRef shift_size,
    const std::optional<at::Tensor>& bias_table, const std::optional<at::Tensor>& qkv_bias,
    const std::optional<at::Tensor>& logit_scale, std::optional<double> scale, bool pad_first, double mask_value) {
  const Geometry g = window_cpu::make_geometry(qkv_in, num_heads, window_size, shift_size, pad_first);
  const Options o = make_options(g, qkv_in, bias_table, qkv_bias, logit_scale, scale, mask_value, false);
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({g.batch, g.height, g.width, g.channels}, qkv.options());
  at::Tensor lse = at::empty({g.batch, g.windows(), g.heads, g.n}, qkv.options().dtype(at::kFloat));
  VITKERNELS_DISPATCH_FLOATING(qkv.scalar_type(), "window_attention_fwd_cpu", [&] {
    const scalar_t* src = qkv.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    float* stats = lse.mutable_data_ptr<float>();
    at::parallel_for(0, g.tasks(), 1, [&](int64_t begin, int64_t end) {
      forward_tasks(g, o, src, dst, stats, begin, end);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& qkv_in, const at::Tensor& lse_in, int64_t num_heads,
    at::IntArrayRef window_size, at::IntArrayRef shift_size, const std::optional<at::Tensor>& bias_table,
    const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& logit_scale,
    std::optional<double> scale, bool pad_first, double mask_value) {
  const Geometry g = window_cpu::make_geometry(qkv_in, num_heads, window_size, shift_size, pad_first);
  const Options o = make_options(g, qkv_in, bias_table, qkv_bias, logit_scale, scale, mask_value, true);
  check_same_dtype(grad_out_in, "grad_out", qkv_in, "qkv");
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({g.batch, g.height, g.width, g.channels}),
              "grad_out must have shape [B, H, W, C] = ", at::IntArrayRef({g.batch, g.height, g.width, g.channels}),
              ", got ", grad_out_in.sizes());
  check_dtype(lse_in, "lse", at::kFloat);
  TORCH_CHECK(lse_in.numel() == g.tasks() * g.n, "lse must have shape [B, nW, heads, N] = [", g.batch, ", ",
              g.windows(), ", ", g.heads, ", ", g.n, "], got ", lse_in.sizes());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dqkv = at::empty_like(qkv);
  // At least one (zeroed) block, so an empty batch reduces to zero gradients.
  const int64_t blocks = std::max<int64_t>(1, std::min(g.tasks(), kGradientBlocks));
  const int64_t per_block = (g.tasks() + blocks - 1) / blocks;
  Partials part(g, blocks);
  VITKERNELS_DISPATCH_FLOATING(qkv.scalar_type(), "window_attention_bwd_cpu", [&] {
    const scalar_t* src = qkv.const_data_ptr<scalar_t>();
    const scalar_t* dout = grad_out.const_data_ptr<scalar_t>();
    const float* stats = lse.const_data_ptr<float>();
    scalar_t* dst = dqkv.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t first, int64_t last) {
      Scratch sc(g, /*backward=*/true);
      for (int64_t block = first; block < last; ++block) {
        for (int64_t task = block * per_block; task < std::min(g.tasks(), (block + 1) * per_block); ++task) {
          backward_task(g, o, src, dout, stats, task, sc, dst, part, block);
        }
      }
    });
  });
  part.reduce_into_first(blocks);
  return {dqkv, reduced_gradient(bias_table, part.table(0)), reduced_gradient(qkv_bias, part.bias(0)),
          logit_scale_gradient(logit_scale, part.logit(0))};
}

}  // namespace vitkernels
