import pytest
import torch

from op_helpers import DEVICE, backend_params, compare_with_reference, launch_tile_alone, random
from vitkernels import ops
from vitkernels.ops.layernorm_mlp import triton_kernels
from vitkernels.ops.layernorm_mlp.reference import (
    add_layernorm_reference,
    layernorm_mlp_reference,
    layernorm_reference,
)


def _mlp_inputs(shape, channels, hidden, affine=True, biases=True, gamma=True):
    maybe = lambda cond, t: t if cond else None  # noqa: E731
    return [
        random(*shape, channels),
        maybe(affine, 1 + 0.5 * random(channels)), maybe(affine, random(channels)),
        random(hidden, channels, scale=channels**-0.5), maybe(biases, random(hidden)),
        random(channels, hidden, scale=hidden**-0.5), maybe(biases, random(channels)),
        maybe(gamma, random(channels)),
    ]


def _float_leaves(*shape_channels_hidden):
    """_mlp_inputs as fp32 leaves that require grad."""
    return [None if t is None else t.float().requires_grad_() for t in _mlp_inputs(*shape_channels_hidden)]


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", backend_params("layernorm_mlp"))
@pytest.mark.parametrize("shape,channels,hidden", [((2, 13), 24, 96), ((37,), 16, 40), ((1, 3, 5), 8, 32)])
@pytest.mark.parametrize("variant", ["full", "no-gamma", "no-affine-no-bias", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layernorm_mlp(backend, shape, channels, hidden, variant, dtype):
    inputs = _mlp_inputs(shape, channels, hidden, affine=variant != "no-affine-no-bias",
                         biases=variant != "no-affine-no-bias", gamma=variant != "no-gamma")
    approximate = "tanh" if variant == "tanh" else "none"
    eps = 1e-5 if variant == "tanh" else 1e-6

    def run(x, lw, lb, w1, b1, w2, b2, gamma):
        return ops.layernorm_mlp(x, lw, lb, w1, b1, w2, b2, eps=eps, gamma=gamma, approximate=approximate,
                                 backend=backend)

    def reference(x, lw, lb, w1, b1, w2, b2, gamma):
        return layernorm_mlp_reference(x, lw, lb, w1, b1, w2, b2, eps=eps, gamma=gamma, approximate=approximate)

    compare_with_reference(run, reference, inputs, dtype)


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", backend_params("layernorm"))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layernorm(backend, affine, dtype):
    x, w, b = random(3, 7, 40), 1 + random(40) if affine else None, random(40) if affine else None

    def run(x, w, b):
        return ops.layernorm(x, w, b, eps=1e-12, backend=backend)

    compare_with_reference(run, lambda x, w, b: layernorm_reference(x, w, b, eps=1e-12), [x, w, b], dtype)


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", backend_params("add_layernorm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_add_layernorm(backend, dtype):
    inputs = [random(5, 11, 24), random(5, 11, 24), 1 + random(24), random(24)]

    def run(x, r, w, b):
        return ops.add_layernorm(x, r, w, b, eps=1e-5, backend=backend)

    compare_with_reference(run, lambda x, r, w, b: add_layernorm_reference(x, r, w, b, eps=1e-5), inputs, dtype)


def test_opcheck_and_compile():
    x, lw, lb, w1, b1, w2, b2, gamma = _float_leaves((2, 9), 16, 64)
    torch.library.opcheck(torch.ops.vitkernels.layernorm_mlp_torch.default,
                          (x, lw, lb, w1, b1, w2, b2, 1e-6, gamma, "none"))
    torch.library.opcheck(torch.ops.vitkernels.layernorm_torch.default, (x, lw, lb, 1e-6))
    torch.library.opcheck(torch.ops.vitkernels.add_layernorm_torch.default, (x, x.detach() * 2, lw, None, 1e-6))

    def block_end(x, r):
        s, h = ops.add_layernorm(x, r, lw, lb)
        return ops.layernorm_mlp(h, lw, lb, w1, b1, w2, b2, gamma=gamma) + s

    r = torch.randn_like(x)
    torch.testing.assert_close(torch.compile(block_end, fullgraph=True)(x, r), block_end(x, r))


@pytest.mark.parametrize("backend", backend_params("layernorm_mlp"))
@pytest.mark.parametrize("channels", [96, 192], ids=["swin-t", "vit-ti"])
def test_layernorm_mlp_model_widths(backend, channels):
    # token counts that are not multiples of any block size (a ViT's 197 = 196 patches + class token)
    inputs = _mlp_inputs((1, 197 if channels == 192 else 49), channels, 4 * channels)
    compare_with_reference(lambda *t: ops.layernorm_mlp(*t[:7], gamma=t[7], backend=backend),
                           lambda *t: layernorm_mlp_reference(*t[:7], gamma=t[7]), inputs, torch.float32)


@pytest.mark.parametrize("backend", backend_params("layernorm"))
@pytest.mark.parametrize("channels", [96, 192, 768, 1280, 1536])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layernorm_widths(backend, channels, dtype):
    x, r, w, b = random(2, 9, channels), random(2, 9, channels), 1 + random(channels), random(channels)
    compare_with_reference(lambda x, w, b: ops.layernorm(x, w, b, backend=backend),
                           lambda x, w, b: layernorm_reference(x, w, b), [x, w, b], dtype)
    compare_with_reference(lambda x, r, w, b: ops.add_layernorm(x, r, w, b, backend=backend),
                           lambda x, r, w, b: add_layernorm_reference(x, r, w, b), [x, r, w, b], dtype)


@pytest.mark.parametrize("backend", backend_params("add_layernorm"))
@pytest.mark.parametrize("affine", ["none", "weight-only", "bias-only"])
def test_add_layernorm_optional_affine(backend, affine):
    inputs = [random(3, 24), random(3, 24), 1 + random(24) if affine == "weight-only" else None,
              random(24) if affine == "bias-only" else None]
    compare_with_reference(lambda x, r, w, b: ops.add_layernorm(x, r, w, b, backend=backend),
                           lambda x, r, w, b: add_layernorm_reference(x, r, w, b), inputs, torch.float32)


TRITON = [p for p in backend_params("layernorm_mlp") if p.id == "triton"]


def _check_compiled_block_end(backend, x, lw, lb, w1, b1, w2, b2, gamma):
    """A block's end (add + LayerNorm, LayerNorm, LayerNorm + MLP) under torch.compile(fullgraph=True)
    gives the eager outputs and gradients."""

    def block_end(x, r):
        s, h = ops.add_layernorm(x, r, lw, lb, backend=backend)
        h = ops.layernorm(h, lw, None, backend=backend)
        return ops.layernorm_mlp(h, lw, lb, w1, b1, w2, b2, gamma=gamma, backend=backend) + s

    r = torch.randn_like(x)
    compiled = torch.compile(block_end, fullgraph=True)(x, r)
    eager = block_end(x, r)
    torch.testing.assert_close(compiled, eager)
    upstream = torch.randn_like(eager)
    grads = [torch.autograd.grad(out, (x, w1, gamma), upstream) for out in (compiled, eager)]
    torch.testing.assert_close(grads[0], grads[1])


def _compare_layernorms(backend, shape, channels, dtype):
    """add_layernorm and layernorm on [*shape, channels] against their references."""
    inputs = [random(*shape, channels), random(*shape, channels), 1 + random(channels), random(channels)]
    compare_with_reference(lambda x, r, w, b: ops.add_layernorm(x, r, w, b, backend=backend),
                           lambda x, r, w, b: add_layernorm_reference(x, r, w, b), inputs, dtype)
    compare_with_reference(lambda x, w, b: ops.layernorm(x, w, b, backend=backend),
                           lambda x, w, b: layernorm_reference(x, w, b), inputs[:1] + inputs[2:], dtype)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_ops_opcheck_and_compile(backend):
    x, lw, lb, w1, b1, w2, b2, gamma = _float_leaves((2, 9), 16, 64)
    torch.library.opcheck(torch.ops.vitkernels.layernorm_mlp_triton.default,
                          (x, lw, lb, w1, b1, w2, b2, 1e-6, gamma, "none"))
    torch.library.opcheck(torch.ops.vitkernels.layernorm_mlp_triton.default,
                          (x, None, None, w1, None, w2, None, 1e-6, None, "tanh"))
    torch.library.opcheck(torch.ops.vitkernels.layernorm_triton.default, (x.transpose(0, 1), lw, lb, 1e-6))
    torch.library.opcheck(torch.ops.vitkernels.add_layernorm_triton.default, (x, x.detach() * 2, lw, None, 1e-6))
    _check_compiled_block_end(backend, x, lw, lb, w1, b1, w2, b2, gamma)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("shape,channels", [((4, 197), 192), ((2, 197), 768), ((2, 50), 1280), ((2, 49), 1536)])
def test_triton_bf16(backend, shape, channels):
    hidden = 4 * channels
    compare_with_reference(lambda *t: ops.layernorm_mlp(*t[:7], gamma=t[7], backend=backend),
                           lambda *t: layernorm_mlp_reference(*t[:7], gamma=t[7]),
                           _mlp_inputs(shape, channels, hidden), torch.bfloat16)
    _compare_layernorms(backend, shape, channels, torch.bfloat16)


# The autotuner picks a tile by speed alone, and under the interpreter it has the last (fp32) one
# only: each tile it may pick, launched alone, against the reference (fc1 with the LN prologue, fc2
# with LayerScale and the residual, and fc1 again in the backward). 74 rows leave a partial tile in
# M, fc2's 64 columns one in N.
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("index", range(len(triton_kernels._gemm_configs())))
def test_triton_each_gemm_tile(backend, index, monkeypatch):
    dtype = launch_tile_alone(monkeypatch, triton_kernels._mlp_fwd_kernel, triton_kernels._gemm_configs()[index])
    compare_with_reference(lambda *t: ops.layernorm_mlp(*t[:7], gamma=t[7], backend=backend),
                           lambda *t: layernorm_mlp_reference(*t[:7], gamma=t[7]),
                           _mlp_inputs((2, 37), 64, 256), dtype)


# fp16 and bf16 fold LN into fc1 (triton_kernels.FOLD_LAYERNORM); the LN prologue is the benchmarks'
# other schedule, and what fp32 takes. Rows far from zero mean (an offset 30 standard deviations away)
# are where the folded GEMM cancels the mean from x @ W'^T.
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "prologue"])
@pytest.mark.parametrize("variant", ["full", "no-affine-no-bias", "offset-rows"])
def test_triton_fc1_layernorm_schedules(backend, fold, variant, monkeypatch):
    monkeypatch.setattr(triton_kernels, "FOLD_LAYERNORM", fold)
    plain = variant == "no-affine-no-bias"
    inputs = _mlp_inputs((3, 29), 48, 192, affine=not plain, biases=not plain)
    if variant == "offset-rows":
        inputs[0] = inputs[0] + 30.0
    compare_with_reference(lambda *t: ops.layernorm_mlp(*t[:7], gamma=t[7], backend=backend),
                           lambda *t: layernorm_mlp_reference(*t[:7], gamma=t[7]), inputs, torch.float16)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("offset", [0.0, 30.0, -300.0])
def test_triton_folded_fc1_alone(backend, offset):
    """fc1 with LN folded, GELU(LN(x) W^T + b), against the reference with no residual to hide its
    error: offsets from zero mean are where x W'^T and mean * colsum cancel. The inputs are fp16
    values already, so that no rounding of them widens the tolerance: the kernel's error is held to
    fp16 torch's on the same inputs (a colsum of the unrounded W * ln_w fails it from offset 30 on)."""
    def run(x, lw, lb, w, b):
        _, _, mean, rstd = triton_kernels.layernorm_fwd(x, None, None, None, 1e-6, store_y=False)
        folded, colsum, shift = triton_kernels.fold_layernorm(w, lw, lb, b)
        return triton_kernels.linear_fwd(x, folded, shift, folded=(mean, rstd, colsum), gelu="none")[0]

    def reference(x, lw, lb, w, b):
        return torch.nn.functional.gelu(torch.nn.functional.linear(
            torch.nn.functional.layer_norm(x, (x.shape[-1],), lw, lb, 1e-6), w, b))

    x, lw, lb, w1, b1 = _mlp_inputs((87,), 64, 256)[:5]
    inputs = [t.half().double() for t in (x + offset, lw, lb, w1, b1)]
    compare_with_reference(run, reference, inputs, torch.float16, grad=False)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("affine", ["both", "weight-only", "bias-only", "none"])
def test_fold_layernorm(backend, affine):
    weight = random(70, 160, device=DEVICE).half()  # a partial block of rows and of columns
    ln_weight = (1 + random(160)).half() if affine in ("both", "weight-only") else None
    ln_bias = random(160).half() if affine in ("both", "bias-only") else None
    bias = random(70).half() if affine != "none" else None
    folded, colsum, shift = triton_kernels.fold_layernorm(weight, ln_weight, ln_bias, bias)
    expected = weight if ln_weight is None else (weight.float() * ln_weight.float()).half()
    assert torch.equal(folded, expected)
    assert colsum.dtype == shift.dtype == torch.float32
    torch.testing.assert_close(colsum, expected.double().sum(1).float(), rtol=1e-5, atol=1e-4)
    expected_shift = torch.zeros(70, dtype=torch.float64, device=DEVICE)
    if ln_bias is not None:
        expected_shift += weight.double() @ ln_bias.double()
    if bias is not None:
        expected_shift += bias.double()
    torch.testing.assert_close(shift, expected_shift.float(), rtol=1e-5, atol=1e-4)


# --- the cuda backend (csrc/layernorm_mlp/cuda.cu) ----------------------------------------------

CUDA_BACKEND = [p for p in backend_params("layernorm_mlp") if p.id == "cuda"]
LOW = [torch.bfloat16, torch.float16]


def _misaligned(t):
    """t's values in a contiguous tensor whose data starts one element past an aligned address."""
    return torch.cat([t.new_zeros(1), t.flatten()])[1:].view(t.shape)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("shape,channels", [((4, 197), 192), ((2, 197), 768), ((2, 50), 1280), ((2, 49), 1536)])
@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_cuda_model_sizes(backend, shape, channels, dtype):
    for approximate, gamma in (("none", True), ("tanh", False)):
        inputs = _mlp_inputs(shape, channels, 4 * channels, gamma=gamma)
        compare_with_reference(
            lambda *t: ops.layernorm_mlp(*t[:7], gamma=t[7], approximate=approximate, backend=backend),
            lambda *t: layernorm_mlp_reference(*t[:7], gamma=t[7], approximate=approximate), inputs, dtype)
    _compare_layernorms(backend, shape, channels, dtype)


# Rows held by 4, 8, 16 or 32 lanes or by a whole block (the forward holds 32 elements per thread,
# the backward 16): 8 (one 16-bit pack, lanes without one), 96, 192, 384 and 512 in part of a
# warp, 768 a warp (the backward: a block), 2048 a block; 21 rows leave groups of the last block
# without a row. 100 (not a multiple of the 16-byte pack of 16-bit types), 2056 (over the
# backward's register budget) and 4104 (over the forward's) take the general path, as does a
# misaligned row.
@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("channels", [8, 96, 100, 192, 384, 512, 768, 2048, 2056, 4104])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_layernorm_paths(backend, channels, misaligned, dtype):
    move = _misaligned if misaligned else (lambda t: t)
    x, r, w, b = random(3, 7, channels), random(3, 7, channels), 1 + random(channels), random(channels)
    compare_with_reference(lambda x, w, b: ops.layernorm(move(x), w, b, eps=1e-5, backend=backend),
                           lambda x, w, b: layernorm_reference(x, w, b, eps=1e-5), [x, w, b], dtype)
    compare_with_reference(lambda x, r, w, b: ops.add_layernorm(move(x), move(r), w, b, backend=backend),
                           lambda x, r, w, b: add_layernorm_reference(x, r, w, b), [x, r, w, b], dtype)


# A single row takes the ATen fallback of the cuBLASLt product; 100 x 37 gives operands whose rows
# are not 16-byte aligned and element counts that are not multiples of a pack.
@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("shape,channels,hidden", [((3, 11), 100, 37), ((3, 11), 64, 256), ((1,), 64, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_mlp_odd_sizes_and_misaligned(backend, shape, channels, hidden, dtype):
    inputs = _mlp_inputs(shape, channels, hidden)
    compare_with_reference(lambda x, *t: ops.layernorm_mlp(_misaligned(x), *t[:6], gamma=t[6], backend=backend),
                           lambda *t: layernorm_mlp_reference(*t[:7], gamma=t[7]), inputs, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
def test_cuda_ops_opcheck_and_compile(backend):
    x, lw, lb, w1, b1, w2, b2, gamma = _float_leaves((2, 9), 16, 64)
    mlp_fwd = torch.ops.vitkernels.layernorm_mlp_fwd.default
    torch.library.opcheck(mlp_fwd, (x, lw, lb, w1, b1, w2, b2, 1e-6, gamma, "none"))
    torch.library.opcheck(mlp_fwd, (x, None, None, w1, None, w2, None, 1e-6, None, "tanh"))
    torch.library.opcheck(mlp_fwd, (x.detach().bfloat16(), lw, lb, w1, b1, w2, b2, 1e-6, gamma, "none"))
    backward_checks = ("test_schema", "test_faketensor")  # the backward ops have no autograd of their own
    xd, lwd, lbd, w1d, b1d, w2d, b2d, gd = (t.detach() for t in (x, lw, lb, w1, b1, w2, b2, gamma))
    _out, mean, rstd, pre, fc2_out = mlp_fwd(xd, lwd, lbd, w1d, b1d, w2d, b2d, 1e-6, gd, "none")
    torch.library.opcheck(torch.ops.vitkernels.layernorm_mlp_bwd.default,
                          (torch.randn_like(xd), xd, mean, rstd, pre, fc2_out, None, lbd, w1d, None, w2d, b2d, 1e-6,
                           gd, "none"), test_utils=backward_checks)
    torch.library.opcheck(torch.ops.vitkernels.layernorm_fwd.default, (x, lw, lb, 1e-6))
    torch.library.opcheck(torch.ops.vitkernels.add_layernorm_fwd.default, (x, x.detach() * 2, lw, lb, 1e-6))
    _y, mean, rstd = torch.ops.vitkernels.layernorm_fwd(xd, lwd, lbd, 1e-6)
    torch.library.opcheck(torch.ops.vitkernels.layernorm_bwd.default,
                          (torch.randn_like(xd), torch.randn_like(xd), xd, mean, rstd, lwd, True),
                          test_utils=backward_checks)
    _check_compiled_block_end(backend, x, lw, lb, w1, b1, w2, b2, gamma)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("channels", [192, 1536, 2056])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_backward_is_deterministic(backend, channels, dtype):
    x, lw, lb, w1, b1, w2, b2, gamma = (t.to(dtype).requires_grad_() for t in _mlp_inputs((8, 197), channels, 256))
    upstream = torch.randn_like(x)
    leaves = (x, lw, lb, w1, b1, w2, b2, gamma)

    def grads():
        y = ops.layernorm(x, lw, lb, backend=backend) + ops.layernorm_mlp(x, lw, lb, w1, b1, w2, b2, gamma=gamma,
                                                                          backend=backend)
        return torch.autograd.grad(y, leaves, upstream)

    first, second = grads(), grads()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"gradient {i} differs between runs: max diff {(a - b).abs().max().item()}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
def test_cuda_empty_batch(backend):
    x, lw, lb, w1, b1, w2, b2, gamma = _float_leaves((0,), 192, 768)
    outputs = [ops.layernorm_mlp(x, lw, lb, w1, b1, w2, b2, gamma=gamma, backend=backend),
               ops.layernorm(x, lw, lb, backend=backend), *ops.add_layernorm(x, x, lw, lb, backend=backend)]
    assert all(o.shape == x.shape for o in outputs)
    leaves = (x, lw, lb, w1, b1, w2, b2, gamma)
    grads = torch.autograd.grad(sum(o.sum() for o in outputs), leaves)
    for leaf, grad in zip(leaves, grads):
        assert grad.shape == leaf.shape and not grad.any(), f"gradient of a {tuple(leaf.shape)} input: {grad}"
