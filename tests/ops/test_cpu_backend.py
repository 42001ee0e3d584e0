"""The C++ "cpu" backend beyond the shared op tests: bf16, opcheck of each C++ op, reproducible
reductions and torch.compile. Every tensor is on the CPU, also on a machine with a GPU."""
import functools

import pytest
import torch

import op_helpers
from op_helpers import compare_with_reference
from vitkernels import backends, ops
from vitkernels.ops.attention.reference import attention_reference
from vitkernels.ops.layernorm_mlp.reference import (
    add_layernorm_reference,
    layernorm_mlp_reference,
    layernorm_reference,
)
from vitkernels.ops.patch_embed.reference import patch_embed_reference
from vitkernels.ops.window_attention.reference import window_attention_reference

random = functools.partial(op_helpers.random, device="cpu")

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=f"cpu: {backends.unavailable_reason('cpu')}"
)

# (batch, H, W, heads, head_dim, window, shift, pad_first): every index path of the kernels.
WINDOW_CASES = [
    pytest.param(2, 9, 11, 2, 8, (4, 4), (2, 2), False, id="padded-shifted-timm"),
    pytest.param(1, 10, 7, 3, 16, (3, 5), (1, 2), True, id="non-square-pad-first"),
    pytest.param(2, 14, 14, 3, 32, (7, 7), (3, 3), False, id="swin-t-like"),
]


def _window_inputs(batch, height, width, heads, head_dim, window):
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    channels = heads * head_dim
    return random(batch, height, width, 3 * channels), random(rows, heads), random(3 * channels)


def _window_args(qkv, heads, window, shift, table, qkv_bias, logit_scale=None, pad_first=False, mask_value=-100.0):
    return (qkv, heads, list(window), list(shift), table, qkv_bias, logit_scale, None, pad_first, mask_value)


@pytest.mark.parametrize("batch,height,width,heads,head_dim,window,shift,pad_first", WINDOW_CASES)
def test_window_attention_bf16(batch, height, width, heads, head_dim, window, shift, pad_first):
    qkv, table, qkv_bias = _window_inputs(batch, height, width, heads, head_dim, window)

    def run(qkv, table, qkv_bias):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first,
                                    backend="cpu")

    def reference(qkv, table, qkv_bias):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first)

    compare_with_reference(run, reference, [qkv, table, qkv_bias], torch.bfloat16)


def test_window_attention_cosine_bf16():
    heads, window, shift = 3, (4, 4), (2, 2)
    qkv, table, qkv_bias = _window_inputs(2, 9, 8, heads, 8, window)
    logit_scale = torch.tensor([5.0, 2.3, 3.9], dtype=torch.float64)

    def run(qkv, table, qkv_bias, logit_scale):
        return ops.window_attention(qkv, heads, window, shift, 16 * table.sigmoid(), qkv_bias=qkv_bias,
                                    logit_scale=logit_scale, pad_first=True, backend="cpu")

    def reference(qkv, table, qkv_bias, logit_scale):
        return window_attention_reference(qkv, heads, window, shift, 16 * table.sigmoid(), qkv_bias=qkv_bias,
                                          logit_scale=logit_scale, pad_first=True)

    compare_with_reference(run, reference, [qkv, table, qkv_bias, logit_scale], torch.bfloat16)


@pytest.mark.parametrize("height,width,window", [(7, 7, (7, 7)), (8, 4, (4, 4)), (6, 5, (3, 5))],
                         ids=["window-is-the-map", "window-as-wide-as-the-map", "non-square"])
def test_window_attention_consecutive_tokens_fp32(height, width, window):
    """Windows whose tokens are consecutive pixels are read in place in fp32 (no copies): same answer."""
    heads = 3
    qkv, table, qkv_bias = _window_inputs(2, height, width, heads, 16, window)

    def run(qkv, table, qkv_bias):
        return ops.window_attention(qkv, heads, window, 0, table, qkv_bias=qkv_bias, backend="cpu")

    def reference(qkv, table, qkv_bias):
        return window_attention_reference(qkv, heads, window, (0, 0), table, qkv_bias=qkv_bias)

    compare_with_reference(run, reference, [qkv, table, qkv_bias], torch.float32)


def test_window_attention_mask_value():
    """Hugging Face Swinv2 masks with -200; the mask value reaches the kernel."""
    qkv, table, qkv_bias = (t.float() for t in _window_inputs(1, 8, 8, 2, 8, (4, 4)))
    out = ops.window_attention(qkv, 2, 4, 2, table, qkv_bias=qkv_bias, mask_value=-2.0, backend="cpu")
    expected = window_attention_reference(qkv.double(), 2, (4, 4), (2, 2), table.double(),
                                          qkv_bias=qkv_bias.double(), mask_value=-2.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def _window_opcheck_args():
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _window_inputs(2, 9, 10, 2, 8, (4, 4)))
    logit_scale = torch.rand(2, requires_grad=True)
    return [
        _window_args(qkv, 2, (4, 4), (2, 2), table, qkv_bias),
        _window_args(qkv, 2, (4, 4), (2, 2), 16 * table.sigmoid(), qkv_bias, logit_scale, True, -200.0),
        _window_args(qkv.detach().bfloat16(), 2, (4, 4), (0, 0), None, None),
    ]


@pytest.mark.parametrize("case", range(3))
def test_window_attention_fwd_opcheck(case):
    args = _window_opcheck_args()[case]
    torch.library.opcheck(torch.ops.vitkernels.window_attention_fwd.default, args)


def test_window_attention_bwd_opcheck():
    qkv, table, qkv_bias = (t.float() for t in _window_inputs(2, 9, 10, 2, 8, (4, 4)))
    args = _window_args(qkv, 2, (4, 4), (2, 2), table, qkv_bias, torch.rand(2), True)
    out, lse = torch.ops.vitkernels.window_attention_fwd(*args)
    bwd_args = (torch.randn_like(out), qkv, lse, *args[1:])
    # the backward has no gradient of its own: the autograd checks do not apply
    torch.library.opcheck(torch.ops.vitkernels.window_attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_window_attention_reductions_are_reproducible():
    """The bias table, qkv_bias and logit_scale gradients are sums over windows: bitwise equal across runs."""
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _window_inputs(4, 23, 21, 3, 16, (7, 7)))
    logit_scale = torch.rand(3, requires_grad=True)
    upstream = torch.randn(4, 23, 21, 48)

    def grads():
        out = ops.window_attention(qkv, 3, 7, 3, 16 * table.sigmoid(), qkv_bias=qkv_bias, logit_scale=logit_scale,
                                   backend="cpu")
        return torch.autograd.grad((out * upstream).sum(), (table, qkv_bias, logit_scale))

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_window_attention_compile_fullgraph():
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _window_inputs(2, 9, 10, 2, 8, (4, 4)))

    def span(qkv, table, qkv_bias):
        return ops.window_attention(qkv, 2, 4, 2, table, qkv_bias=qkv_bias, pad_first=True, backend="cpu")

    eager = span(qkv, table, qkv_bias)
    compiled = torch.compile(span, fullgraph=True)(qkv, table, qkv_bias)
    torch.testing.assert_close(compiled, eager)
    g_eager = torch.autograd.grad(eager.sum(), (qkv, table, qkv_bias))
    g_compiled = torch.autograd.grad(compiled.sum(), (qkv, table, qkv_bias))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_window_attention_rejects_float64_with_reasons():
    qkv, table, _ = _window_inputs(1, 8, 8, 2, 8, (4, 4))
    with pytest.raises(backends.NotSupportedError, match="dtype float64"):
        ops.window_attention(qkv, 2, 4, 0, table, backend="cpu")


# --- layernorm and add_layernorm ------------------------------------------------------------------

def _layernorm_inputs(channels, *rows):
    return random(*rows, channels), 1 + random(channels, scale=0.1), random(channels, scale=0.1)


@pytest.mark.parametrize("channels", [96, 768, 1000])
def test_layernorm_bf16(channels):
    x, weight, bias = _layernorm_inputs(channels, 3, 17)

    def run(x, weight, bias):
        return ops.layernorm(x, weight, bias, eps=1e-6, backend="cpu")

    def reference(x, weight, bias):
        return layernorm_reference(x, weight, bias, eps=1e-6)

    compare_with_reference(run, reference, [x, weight, bias], torch.bfloat16)


def test_add_layernorm_bf16():
    x, weight, bias = _layernorm_inputs(384, 2, 49)
    residual = random(2, 49, 384)

    def run(x, residual, weight, bias):
        return ops.add_layernorm(x, residual, weight, bias, eps=1e-5, backend="cpu")

    def reference(x, residual, weight, bias):
        return add_layernorm_reference(x, residual, weight, bias, eps=1e-5)

    compare_with_reference(run, reference, [x, residual, weight, bias], torch.bfloat16)


def _layernorm_opcheck_args():
    x, weight, bias = (t.float().requires_grad_() for t in _layernorm_inputs(40, 2, 7))
    residual = torch.randn(2, 7, 40, requires_grad=True)
    return x, residual, weight, bias


def test_layernorm_ops_opcheck():
    x, residual, weight, bias = _layernorm_opcheck_args()
    torch.library.opcheck(torch.ops.vitkernels.layernorm_fwd.default, (x, weight, bias, 1e-6))
    torch.library.opcheck(torch.ops.vitkernels.layernorm_fwd.default, (x.detach().bfloat16(), None, None, 1e-5))
    torch.library.opcheck(torch.ops.vitkernels.add_layernorm_fwd.default, (x, residual, weight, bias, 1e-6))
    torch.library.opcheck(torch.ops.vitkernels.add_layernorm_fwd.default, (x, residual, None, bias, 1e-6))
    y, mean, rstd = torch.ops.vitkernels.layernorm_fwd(x.detach(), weight.detach(), bias.detach(), 1e-6)
    torch.library.opcheck(torch.ops.vitkernels.layernorm_bwd.default,
                          (torch.randn_like(y), torch.randn_like(y), x.detach(), mean, rstd, weight.detach(), True),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("with_weight", [False, True], ids=["no-weight", "weight"])
@pytest.mark.parametrize("bias_grad", [False, True], ids=["no-bias-grad", "bias-grad"])
def test_layernorm_bwd_fake_matches_for_absent_gradients(with_weight, bias_grad):
    """Absent gradients come back as empty tensors of x's dtype, distinct from each other."""
    x = torch.randn(2, 7, 40).bfloat16()
    weight = torch.randn(40) if with_weight else None
    y, mean, rstd = torch.ops.vitkernels.layernorm_fwd(x, weight, None, 1e-6)
    torch.library.opcheck(torch.ops.vitkernels.layernorm_bwd.default,
                          (torch.randn_like(y), None, x, mean, rstd, weight, bias_grad),
                          test_utils=("test_schema", "test_faketensor"))


def test_layernorm_parameter_gradients_are_reproducible():
    x, weight, bias = (t.float().requires_grad_() for t in _layernorm_inputs(192, 8, 197))
    upstream = torch.randn(8, 197, 192)

    def grads():
        return torch.autograd.grad((ops.layernorm(x, weight, bias, backend="cpu") * upstream).sum(), (weight, bias))

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_layernorm_ops_compile_fullgraph():
    x, residual, weight, bias = _layernorm_opcheck_args()

    def block(x, residual, weight, bias):
        total, y = ops.add_layernorm(x, residual, weight, bias, backend="cpu")
        return ops.layernorm(total + y, weight, bias, backend="cpu")

    eager = block(x, residual, weight, bias)
    compiled = torch.compile(block, fullgraph=True)(x, residual, weight, bias)
    torch.testing.assert_close(compiled, eager)
    g_eager = torch.autograd.grad(eager.sum(), (x, residual, weight, bias))
    g_compiled = torch.autograd.grad(compiled.sum(), (x, residual, weight, bias))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


# --- layernorm_mlp --------------------------------------------------------------------------------

def _mlp_inputs(channels, hidden, *rows):
    return [
        random(*rows, channels), 1 + random(channels, scale=0.1), random(channels, scale=0.1),
        random(hidden, channels, scale=channels ** -0.5), random(hidden, scale=0.1),
        random(channels, hidden, scale=hidden ** -0.5), random(channels, scale=0.1), random(channels, scale=0.1),
    ]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_layernorm_mlp_bf16(approximate):
    def run(*args):
        return ops.layernorm_mlp(*args[:7], eps=1e-6, gamma=args[7], approximate=approximate, backend="cpu")

    def reference(*args):
        return layernorm_mlp_reference(*args[:7], eps=1e-6, gamma=args[7], approximate=approximate)

    compare_with_reference(run, reference, _mlp_inputs(64, 256, 2, 13), torch.bfloat16)


def _mlp_op_args(gamma=True, approximate="none"):
    x, ln_w, ln_b, w1, b1, w2, b2, g = (t.float().requires_grad_() for t in _mlp_inputs(24, 40, 2, 5))
    return (x, ln_w, ln_b, w1, b1, w2, b2, 1e-6, g if gamma else None, approximate)


def test_layernorm_mlp_ops_opcheck():
    fwd = torch.ops.vitkernels.layernorm_mlp_fwd.default
    torch.library.opcheck(fwd, _mlp_op_args())
    torch.library.opcheck(fwd, _mlp_op_args(gamma=False, approximate="tanh"))
    x, ln_w, ln_b, w1, b1, w2, b2, eps, g, approximate = (
        a.detach() if isinstance(a, torch.Tensor) else a for a in _mlp_op_args())
    out, mean, rstd, pre, fc2_out = fwd(x, None, ln_b, w1, None, w2, b2, eps, g, approximate)
    torch.library.opcheck(torch.ops.vitkernels.layernorm_mlp_bwd.default,
                          (torch.randn_like(out), x, mean, rstd, pre, fc2_out, None, ln_b, w1, None, w2, b2, eps, g,
                           approximate),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("statistic", ["mean", "rstd"])
@pytest.mark.parametrize("bad", ["short", "fp16"])
def test_layernorm_mlp_bwd_checks_the_row_statistics(statistic, bad):
    x, ln_w, ln_b, w1, b1, w2, b2, eps, g, approximate = (
        a.detach() if isinstance(a, torch.Tensor) else a for a in _mlp_op_args())
    out, mean, rstd, pre, fc2_out = torch.ops.vitkernels.layernorm_mlp_fwd(x, ln_w, ln_b, w1, b1, w2, b2, eps, g,
                                                                           approximate)
    stats = {"mean": mean, "rstd": rstd}
    stats[statistic] = stats[statistic][:-1] if bad == "short" else stats[statistic].half()
    with pytest.raises(RuntimeError, match="mean and rstd"):
        torch.ops.vitkernels.layernorm_mlp_bwd(torch.randn_like(out), x, stats["mean"], stats["rstd"], pre, fc2_out,
                                               ln_w, ln_b, w1, b1, w2, b2, eps, g, approximate)


def test_layernorm_mlp_compile_fullgraph():
    args = _mlp_op_args()
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def block(x, ln_w, ln_b, w1, b1, w2, b2, g):
        return ops.layernorm_mlp(x, ln_w, ln_b, w1, b1, w2, b2, eps=1e-6, gamma=g, backend="cpu")

    eager = block(*tensors)
    compiled = torch.compile(block, fullgraph=True)(*tensors)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), tensors), torch.autograd.grad(eager.sum(), tensors)):
        torch.testing.assert_close(a, b)


# --- attention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias_shape", [None, (50, 50), (2, 1, 50, 50)], ids=["no-bias", "bias-NN", "bias-B1NN"])
def test_attention_bf16(bias_shape):
    qkv = random(2, 50, 3 * 3 * 16)
    bias = None if bias_shape is None else random(*bias_shape)

    def run(qkv, bias):
        return ops.attention(qkv, 3, bias=bias, backend="cpu")

    def reference(qkv, bias):
        return attention_reference(qkv, 3, bias=bias)

    compare_with_reference(run, reference, [qkv, bias], torch.bfloat16)


def test_attention_ops_opcheck():
    qkv = torch.randn(2, 37, 3 * 2 * 8, requires_grad=True)
    bias = torch.randn(1, 2, 37, 37, requires_grad=True)
    fwd = torch.ops.vitkernels.attention_fwd.default
    torch.library.opcheck(fwd, (qkv, 2, bias, None))
    torch.library.opcheck(fwd, (qkv, 2, None, 0.3))
    out, lse = fwd(qkv.detach(), 2, bias.detach(), None)
    torch.library.opcheck(torch.ops.vitkernels.attention_bwd.default,
                          (torch.randn_like(out), qkv.detach(), lse, 2, bias.detach(), None, True),
                          test_utils=("test_schema", "test_faketensor"))


def test_attention_compile_fullgraph():
    qkv = torch.randn(2, 37, 3 * 2 * 8, requires_grad=True)
    bias = torch.randn(37, 37, requires_grad=True)

    def span(qkv, bias):
        return ops.attention(qkv, 2, bias=bias, backend="cpu")

    eager = span(qkv, bias)
    compiled = torch.compile(span, fullgraph=True)(qkv, bias)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), (qkv, bias)), torch.autograd.grad(eager.sum(), (qkv, bias))):
        torch.testing.assert_close(a, b)


# --- patch_embed ----------------------------------------------------------------------------------

# (H, W, patch, keyword arguments from float64 masters): prefix and position layouts, padding, norm, map.
PATCH_CASES = [
    pytest.param(16, 16, 4, lambda: {"prefix_tokens": random(1, 24), "pos_embed": random(1, 17, 24)},
                 id="class-token"),
    pytest.param(18, 13, 4, lambda: {"prefix_tokens": random(2, 24), "pos_embed": random(1, 20, 24),
                                     "dynamic_pad": True}, id="no-embed-class-padded"),
    pytest.param(20, 24, 4, lambda: {"prefix_tokens": random(1, 24), "pos_embed": random(1, 17, 24),
                                     "pos_embed_grid": (4, 4)}, id="resample"),
    pytest.param(10, 14, 4, lambda: {"patch_norm": True, "norm_weight": 1 + random(24), "norm_bias": random(24),
                                     "mean": random(3), "std": 1 + random(3).abs(), "dynamic_pad": True,
                                     "output_format": "map"}, id="swin-map-norm-normalize-padded"),
]


def _patch_call(fn, tensor_keys, fixed, **extra):
    def call(x, weight, bias, *tensors):
        return fn(x, weight, bias, **dict(zip(tensor_keys, tensors)), **fixed, **extra)
    return call


@pytest.mark.parametrize("height,width,patch,make_kwargs", PATCH_CASES)
def test_patch_embed_bf16(height, width, patch, make_kwargs):
    kwargs = make_kwargs()
    tensor_keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in tensor_keys}
    inputs = [random(2, 3, height, width), random(24, 3, patch, patch, scale=0.2), random(24)]
    inputs += [kwargs[k] for k in tensor_keys]
    compare_with_reference(_patch_call(ops.patch_embed, tensor_keys, fixed, backend="cpu"),
                           _patch_call(patch_embed_reference, tensor_keys, fixed), inputs, torch.bfloat16)


def test_patch_embed_vit_b16_bf16():
    inputs = [random(2, 3, 224, 224), random(768, 3, 16, 16, scale=0.05), random(768), random(1, 768),
              random(1, 197, 768)]
    keys = ["prefix_tokens", "pos_embed"]
    compare_with_reference(_patch_call(ops.patch_embed, keys, {}, backend="cpu"),
                           _patch_call(patch_embed_reference, keys, {}), inputs, torch.bfloat16)


def test_patch_embed_reductions_are_reproducible():
    """Weight, bias, prefix, position and norm gradients are sums over the batch: bitwise equal across runs."""
    x = torch.randn(4, 3, 30, 30)
    params = [torch.randn(32, 3, 4, 4) * 0.2, torch.randn(32), torch.randn(1, 32), torch.randn(1, 65, 32),
              torch.randn(32), torch.randn(32)]
    params = [p.requires_grad_() for p in params]
    upstream = torch.randn(4, 65, 32)

    def grads():
        weight, bias, prefix, pos, norm_weight, norm_bias = params
        out = ops.patch_embed(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, patch_norm=True,
                              norm_weight=norm_weight, norm_bias=norm_bias, dynamic_pad=True, backend="cpu")
        return torch.autograd.grad((out * upstream).sum(), params)

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


def test_patch_embed_compile_fullgraph():
    x = torch.randn(2, 3, 18, 20, requires_grad=True)
    tensors = [x, torch.randn(16, 3, 4, 4), torch.randn(16), torch.randn(1, 16), torch.randn(1, 17, 16),
               torch.rand(3), 1 + torch.rand(3)]
    tensors = [t.requires_grad_() for t in tensors]

    def embed(x, weight, bias, prefix, pos, mean, std):
        return ops.patch_embed(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, pos_embed_grid=(4, 4),
                               mean=mean, std=std, dynamic_pad=True, backend="cpu")

    eager = embed(*tensors)
    compiled = torch.compile(embed, fullgraph=True)(*tensors)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), tensors), torch.autograd.grad(eager.sum(), tensors)):
        torch.testing.assert_close(a, b)


def test_patch_embed_rejects_float64_with_reasons():
    with pytest.raises(backends.NotSupportedError, match="dtype float64"):
        ops.patch_embed(random(1, 3, 8, 8), random(8, 3, 4, 4), backend="cpu")
