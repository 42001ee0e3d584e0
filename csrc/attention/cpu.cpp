// Global attention kernels for CPU tensors: one (image, head) pair per task, queries in blocks
// whose logits row panel [block, N] stays in the thread's scratch; no [B, heads, N, N] tensor
// except the bias gradient's, which has that shape when it is asked for.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_math.h"
#include "common/cpu_tensor.h"

namespace vitkernels {
namespace {

constexpr int64_t kQueryBlock = 32;

struct Problem {
  int64_t batch, tokens, heads, head_dim, channels;
  // Row stride of logits panels and of transposed keys and values: N rounded up to whole gemm
  // tiles and softmax vectors; the extra key columns are zero and their probabilities 0.
  int64_t ld;
  float scale;
  // bias expanded to [B, heads, N, N] as fp32 strides (0 along broadcast dims); null without bias.
  const float* bias = nullptr;
  int64_t bias_stride[4] = {0, 0, 0, 0};

  const float* bias_row(int64_t b, int64_t h, int64_t i) const {
    return bias + b * bias_stride[0] + h * bias_stride[1] + i * bias_stride[2];
  }
};

Problem make_problem(const at::Tensor& qkv, int64_t num_heads, std::optional<double> scale) {
  check_device(qkv, "qkv", c10::DeviceType::CPU);
  check_dim(qkv, "qkv", 3);
  check_cpu_floating(qkv, "qkv");
  check_range(num_heads, "num_heads", 1, std::max<int64_t>(1, qkv.size(2)));
  TORCH_CHECK(qkv.size(2) % (3 * num_heads) == 0, "qkv's last dim ", qkv.size(2),
              " must be 3 * num_heads * head_dim with num_heads=", num_heads);
  Problem p;
  p.batch = qkv.size(0);
  p.tokens = qkv.size(1);
  p.heads = num_heads;
  p.channels = qkv.size(2) / 3;
  p.head_dim = p.channels / num_heads;
  p.ld = (p.tokens + cpu::kGemmTileCols - 1) / cpu::kGemmTileCols * cpu::kGemmTileCols;
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  return p;
}

// The bias as fp32 viewed at [B, heads, N, N]; the returned tensor owns the memory p.bias points to.
at::Tensor attach_bias(Problem& p, const std::optional<at::Tensor>& bias, const at::Tensor& qkv) {
  at::Tensor values = expanded_float_bias(bias, qkv, p.batch, p.heads, p.tokens, p.bias_stride);
  p.bias = values.defined() ? values.const_data_ptr<float>() : nullptr;
  return values;
}

// dst[t, e] = qkv[b, t, part * C + h * D + e] in fp32, for all N tokens.
template <typename scalar_t>
void load_head(const Problem& p, const scalar_t* qkv, int64_t b, int64_t part, int64_t h, float* dst) {
  const int64_t stride = 3 * p.channels;
  const scalar_t* src = qkv + b * p.tokens * stride + part * p.channels + h * p.head_dim;
  for (int64_t t = 0; t < p.tokens; ++t) {
    for (int64_t e = 0; e < p.head_dim; ++e) {
      dst[t * p.head_dim + e] = static_cast<float>(src[t * stride + e]);
    }
  }
}

// dst rows first.. of the map from src [rows, head_dim], row t multiplied by row_scale[t] when
// row_scale is not null.
template <typename scalar_t>
void store_head(const Problem& p, const float* src, int64_t rows, int64_t first, int64_t row_stride, int64_t offset,
                scalar_t* dst, const float* row_scale = nullptr) {
  for (int64_t t = 0; t < rows; ++t) {
    const float factor = row_scale != nullptr ? row_scale[t] : 1.0f;
    for (int64_t e = 0; e < p.head_dim; ++e) {
      dst[(first + t) * row_stride + offset + e] = static_cast<scalar_t>(src[t * p.head_dim + e] * factor);
    }
  }
}

struct Scratch {
  std::vector<float> q, k, kt, v, vt, s, dp, o, inv_sum, dout, dq, dk, dv;

  Scratch(const Problem& p, bool backward)
      : q(p.tokens * p.head_dim), k(q.size()), kt(p.head_dim * p.ld), v(q.size()), s(kQueryBlock * p.ld),
        o(kQueryBlock * p.head_dim), inv_sum(kQueryBlock) {
    if (backward) {
      vt.resize(kt.size());
      dp.resize(s.size());
      dout.resize(q.size());
      dq.resize(o.size());
      dk.resize(q.size());
      dv.resize(q.size());
    }
  }
};

// sc.s <- logits [rows, ld] of queries [i0, i0 + rows) of (b, h) against every key; query t is
// row t of q, ldq floats apart.
void block_logits(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, const float* q, int64_t ldq,
                  Scratch& sc) {
  const int64_t n = p.tokens;
  cpu::gemm(q + i0 * ldq, sc.kt.data(), sc.s.data(), rows, p.head_dim, p.ld, ldq, p.ld, p.ld, p.scale, false, false);
  if (p.bias == nullptr) {
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float* bias = p.bias_row(b, h, i0 + r);
    float* row = sc.s.data() + r * p.ld;
    for (int64_t j = 0; j < n; ++j) {
      row[j] += bias[j * p.bias_stride[3]];
    }
  }
}

// Where the forward reads q and v of (b, h): fp32 rows are read in place from the map (3C
// apart), other dtypes converted into the scratch; the keys land transposed in sc.kt.
struct HeadRows {
  const float* q;
  const float* v;
  int64_t ld;
};

template <typename scalar_t>
HeadRows forward_operands(const Problem& p, const scalar_t* qkv, int64_t b, int64_t h, Scratch& sc) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const int64_t stride = 3 * p.channels;
    const float* q = qkv + b * p.tokens * stride + h * p.head_dim;
    cpu::transpose(q + p.channels, sc.kt.data(), p.tokens, p.head_dim, stride, p.ld);
    return {q, q + 2 * p.channels, stride};
  }
  load_head(p, qkv, b, 0, h, sc.q.data());
  load_head(p, qkv, b, 1, h, sc.k.data());
  load_head(p, qkv, b, 2, h, sc.v.data());
  cpu::transpose(sc.k.data(), sc.kt.data(), p.tokens, p.head_dim, p.head_dim, p.ld);
  return {sc.q.data(), sc.v.data(), p.head_dim};
}

template <typename scalar_t>
void forward_task(const Problem& p, const scalar_t* qkv, scalar_t* out, float* lse, int64_t task, Scratch& sc) {
  const int64_t b = task / p.heads;
  const int64_t h = task % p.heads;
  const HeadRows head = forward_operands(p, qkv, b, h, sc);
  for (int64_t i0 = 0; i0 < p.tokens; i0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, p.tokens - i0);
    block_logits(p, b, h, i0, rows, head.q, head.ld, sc);
    cpu::softmax_rows_unnormalized(sc.s.data(), nullptr, lse + task * p.tokens + i0, sc.inv_sum.data(), rows,
                                   p.tokens, p.ld);
    cpu::gemm(sc.s.data(), head.v, sc.o.data(), rows, p.tokens, p.head_dim, p.ld, head.ld, p.head_dim, 1.0f, false,
              false);
    store_head(p, sc.o.data(), rows, b * p.tokens + i0, p.channels, h * p.head_dim, out, sc.inv_sum.data());
  }
}

// One query block of the backward: accumulates dK, dV; writes dQ rows and, when dbias is not
// null, the block's dS rows of (b, h).
void backward_block(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t rows, const float* lse, Scratch& sc,
                    float* dbias) {
  const int64_t n = p.tokens;
  const int64_t d = p.head_dim;
  const int64_t ld = p.ld;
  block_logits(p, b, h, i0, rows, sc.q.data(), d, sc);
  cpu::exp_rows_minus(sc.s.data(), nullptr, lse + i0, rows, n, ld);
  const float* dout = sc.dout.data() + i0 * d;
  cpu::gemm(sc.s.data(), dout, sc.dv.data(), n, rows, d, ld, d, d, 1.0f, true, true);
  cpu::gemm(dout, sc.vt.data(), sc.dp.data(), rows, d, ld, d, ld, ld, 1.0f, false, false);
  for (int64_t r = 0; r < rows; ++r) {
    const float* prob = sc.s.data() + r * ld;
    float* ds = sc.dp.data() + r * ld;
    const float total = cpu::dot(prob, ds, n);
    for (int64_t j = 0; j < n; ++j) {
      ds[j] = prob[j] * (ds[j] - total);
    }
  }
  if (dbias != nullptr) {
    for (int64_t r = 0; r < rows; ++r) {
      std::copy(sc.dp.data() + r * ld, sc.dp.data() + r * ld + n, dbias + (i0 + r) * n);
    }
  }
  cpu::gemm(sc.dp.data(), sc.k.data(), sc.dq.data(), rows, n, d, ld, d, d, p.scale, false, false);
  cpu::gemm(sc.dp.data(), sc.q.data() + i0 * d, sc.dk.data(), n, rows, d, ld, d, d, p.scale, true, true);
}

template <typename scalar_t>
void backward_task(const Problem& p, const scalar_t* qkv, const scalar_t* grad_out, const float* lse, int64_t task,
                   Scratch& sc, scalar_t* dqkv, float* dbias) {
  const int64_t b = task / p.heads;
  const int64_t h = task % p.heads;
  const int64_t n = p.tokens;
  const int64_t d = p.head_dim;
  load_head(p, qkv, b, 0, h, sc.q.data());
  load_head(p, qkv, b, 1, h, sc.k.data());
  load_head(p, qkv, b, 2, h, sc.v.data());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t e = 0; e < d; ++e) {
      sc.dout[t * d + e] = static_cast<float>(grad_out[(b * n + t) * p.channels + h * d + e]);
    }
  }
  cpu::transpose(sc.k.data(), sc.kt.data(), n, d, d, p.ld);
  cpu::transpose(sc.v.data(), sc.vt.data(), n, d, d, p.ld);
  std::fill(sc.dk.begin(), sc.dk.end(), 0.0f);
  std::fill(sc.dv.begin(), sc.dv.end(), 0.0f);
  const int64_t stride = 3 * p.channels;
  for (int64_t i0 = 0; i0 < n; i0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, n - i0);
    backward_block(p, b, h, i0, rows, lse + task * n, sc, dbias != nullptr ? dbias + task * n * n : nullptr);
    store_head(p, sc.dq.data(), rows, b * n + i0, stride, h * d, dqkv);
  }
  store_head(p, sc.dk.data(), n, b * n, stride, p.channels + h * d, dqkv);
  store_head(p, sc.dv.data(), n, b * n, stride, 2 * p.channels + h * d, dqkv);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& qkv_in, int64_t num_heads,
                                                     const std::optional<at::Tensor>& bias,
                                                     std::optional<double> scale) {
  Problem p = make_problem(qkv_in, num_heads, scale);
  const at::Tensor bias_values = attach_bias(p, bias, qkv_in);
  const at::Tensor qkv = qkv_in.contiguous();
  at::Tensor out = at::empty({p.batch, p.tokens, p.channels}, qkv.options());
  at::Tensor lse = at::empty({p.batch, p.heads, p.tokens}, qkv.options().dtype(at::kFloat));
  VITKERNELS_DISPATCH_FLOATING(qkv.scalar_type(), "attention_fwd_cpu", [&] {
    at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(p, /*backward=*/false);
      for (int64_t task = begin; task < end; ++task) {
        forward_task(p, qkv.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                     lse.mutable_data_ptr<float>(), task, sc);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_bwd_cpu(const at::Tensor& grad_out_in, const at::Tensor& qkv_in,
                                                     const at::Tensor& lse_in, int64_t num_heads,
                                                     const std::optional<at::Tensor>& bias,
                                                     std::optional<double> scale, bool bias_grad) {
  Problem p = make_problem(qkv_in, num_heads, scale);
  const at::Tensor bias_values = attach_bias(p, bias, qkv_in);
  TORCH_CHECK(!bias_grad || bias.has_value(), "bias_grad needs a bias");
  check_same_dtype(grad_out_in, "grad_out", qkv_in, "qkv");
  TORCH_CHECK(grad_out_in.sizes() == at::IntArrayRef({p.batch, p.tokens, p.channels}),
              "grad_out must have shape [B, N, C], got ", grad_out_in.sizes());
  check_dtype(lse_in, "lse", at::kFloat);
  TORCH_CHECK(lse_in.numel() == p.batch * p.heads * p.tokens, "lse must have shape [B, heads, N], got ",
              lse_in.sizes());
  const at::Tensor qkv = qkv_in.contiguous();
  const at::Tensor grad_out = grad_out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor dqkv = at::empty_like(qkv);
  at::Tensor dlogits;
  if (bias_grad) {
    dlogits = at::empty({p.batch, p.heads, p.tokens, p.tokens}, qkv.options().dtype(at::kFloat));
  }
  VITKERNELS_DISPATCH_FLOATING(qkv.scalar_type(), "attention_bwd_cpu", [&] {
    at::parallel_for(0, p.batch * p.heads, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(p, /*backward=*/true);
      for (int64_t task = begin; task < end; ++task) {
        backward_task(p, qkv.const_data_ptr<scalar_t>(), grad_out.const_data_ptr<scalar_t>(),
                      lse.const_data_ptr<float>(), task, sc, dqkv.mutable_data_ptr<scalar_t>(),
                      bias_grad ? dlogits.mutable_data_ptr<float>() : nullptr);
      }
    });
  });
  if (!bias_grad) {
    return {dqkv, at::empty({0}, qkv.options().dtype(at::kFloat))};
  }
  return {dqkv, dlogits.sum_to_size(bias->sizes()).to(bias->scalar_type()).contiguous()};
}

}  // namespace vitkernels
