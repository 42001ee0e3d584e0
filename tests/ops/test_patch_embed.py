import pytest
import torch

from op_helpers import DEVICE, backend_params, compare_with_reference, launch_tile_alone, random
from vitkernels import backends, ops
from vitkernels.ops.patch_embed import triton_kernels as patch_kernels
from vitkernels.ops.patch_embed.reference import patch_embed_reference
from vitkernels.testing import assert_close

DIM, CIN = 24, 3

# name -> (image H, W, patch, keyword arguments built from float64 masters)
CASES = {
    "class-token": (16, 16, 4, lambda: {"prefix_tokens": random(1, DIM), "pos_embed": random(1, 17, DIM)}),
    "class-and-registers": (16, 12, 4, lambda: {"prefix_tokens": random(5, DIM), "pos_embed": random(1, 17, DIM)}),
    "no-embed-class": (16, 16, 8, lambda: {"prefix_tokens": random(2, DIM), "pos_embed": random(1, 4, DIM)}),
    "no-prefix": (12, 16, 4, lambda: {"pos_embed": random(12, DIM)}),
    "resample": (20, 24, 4, lambda: {"prefix_tokens": random(1, DIM), "pos_embed": random(1, 17, DIM),
                                      "pos_embed_grid": (4, 4)}),
    "dynamic-pad": (18, 13, 4, lambda: {"prefix_tokens": random(1, DIM), "dynamic_pad": True}),
    "swin-map-norm": (16, 20, 4, lambda: {"patch_norm": True, "norm_weight": 1 + random(DIM),
                                           "norm_bias": random(DIM), "output_format": "map"}),
    "normalize": (8, 8, 4, lambda: {"mean": random(CIN), "std": 1 + torch.rand(CIN, dtype=torch.float64,
                                                                                  device=DEVICE)}),
    # padded pixels are zeros of the normalized image, not normalized zeros
    "normalize-dynamic-pad": (10, 7, 4, lambda: {"mean": random(CIN), "std": 1 + torch.rand(
        CIN, dtype=torch.float64, device=DEVICE), "dynamic_pad": True, "pos_embed": random(6, DIM)}),
    # patches of 8: a K block within one channel, whose scale and shift the Triton kernel loads once
    "normalize-p8-dynamic-pad": (20, 13, 8, lambda: {"mean": random(CIN), "std": 1 + torch.rand(
        CIN, dtype=torch.float64, device=DEVICE), "dynamic_pad": True, "pos_embed": random(6, DIM)}),
    "map-norm-no-affine": (8, 12, 4, lambda: {"patch_norm": True, "output_format": "map"}),
    "tokens-norm-pos": (12, 8, 4, lambda: {"patch_norm": True, "norm_weight": 1 + random(DIM),
                                            "prefix_tokens": random(2, DIM), "pos_embed": random(1, 8, DIM)}),
}


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", backend_params("patch_embed"))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(backend, case, batch, dtype):
    height, width, patch = CASES[case][:3]
    kwargs = CASES[case][3]()
    tensor_keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in tensor_keys}
    inputs = [random(batch, CIN, height, width), random(DIM, CIN, patch, patch, scale=0.2), random(DIM)]
    inputs += [kwargs[k] for k in tensor_keys]

    def bind(fn, **extra):
        def call(x, weight, bias, *tensors):
            return fn(x, weight, bias, **dict(zip(tensor_keys, tensors)), **fixed, **extra)
        return call

    compare_with_reference(bind(ops.patch_embed, backend=backend), bind(patch_embed_reference), inputs, dtype)


@pytest.mark.parametrize("backend", backend_params("patch_embed"))
@pytest.mark.parametrize("patch", [4, 8])
def test_uint8_image_with_normalization(backend, patch):
    image = torch.randint(0, 256, (2, CIN, 16, 24), dtype=torch.uint8, device=DEVICE)
    weight, bias = torch.randn(DIM, CIN, patch, patch, device=DEVICE), torch.randn(DIM, device=DEVICE)
    mean = torch.tensor([0.485, 0.456, 0.406], device=DEVICE)
    std = torch.tensor([0.229, 0.224, 0.225], device=DEVICE)
    out = ops.patch_embed(image, weight, bias, mean=mean, std=std, backend=backend)
    normalized = (image.double() / 255 - mean.double().view(1, -1, 1, 1)) / std.double().view(1, -1, 1, 1)
    expected = patch_embed_reference(normalized, weight.double(), bias.double())
    assert_close(out, expected)


def test_opcheck_and_compile():
    x = torch.randn(2, CIN, 8, 12, device=DEVICE, requires_grad=True)
    weight = torch.randn(DIM, CIN, 4, 4, device=DEVICE, requires_grad=True)
    bias, prefix = torch.randn(DIM, device=DEVICE), torch.randn(1, DIM, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 7, DIM, device=DEVICE, requires_grad=True)
    op = torch.ops.vitkernels.patch_embed_torch.default
    torch.library.opcheck(op, (x, weight, bias, prefix, pos, None, None, None, 1e-5, False, None, None, False,
                               "tokens"))

    def embed(x):
        return ops.patch_embed(x, weight, bias, prefix_tokens=prefix, pos_embed=pos)

    torch.testing.assert_close(torch.compile(embed, fullgraph=True)(x), embed(x))


@pytest.mark.parametrize("backend", backend_params("patch_embed"))
@pytest.mark.parametrize("patch", [4, 8, 14, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_patch_sizes(backend, patch, dtype):
    height, width = 2 * patch, patch + patch // 2  # the width needs dynamic padding
    inputs = [random(2, CIN, height, width), random(DIM, CIN, patch, patch, scale=patch**-1), random(DIM),
              random(1, DIM), random(1, 1 + 4, DIM)]

    def bind(fn, **extra):
        def call(x, weight, bias, prefix, pos):
            return fn(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, dynamic_pad=True, **extra)
        return call

    compare_with_reference(bind(ops.patch_embed, backend=backend), bind(patch_embed_reference), inputs, dtype)


@pytest.mark.parametrize("backend", backend_params("patch_embed"))
def test_uint8_image_padded_into_swin_map(backend):
    image = torch.randint(0, 256, (2, CIN, 9, 14), dtype=torch.uint8, device=DEVICE)
    weight, bias = torch.randn(DIM, CIN, 4, 4, device=DEVICE), torch.randn(DIM, device=DEVICE)
    mean = torch.tensor([0.485, 0.456, 0.406], device=DEVICE)
    std = torch.tensor([0.229, 0.224, 0.225], device=DEVICE)
    norm_weight, norm_bias = torch.randn(DIM, device=DEVICE), torch.randn(DIM, device=DEVICE)
    kwargs = {"dynamic_pad": True, "patch_norm": True, "output_format": "map"}
    out = ops.patch_embed(image, weight, bias, mean=mean, std=std, norm_weight=norm_weight, norm_bias=norm_bias,
                          backend=backend, **kwargs)
    normalized = (image.double() / 255 - mean.double().view(1, -1, 1, 1)) / std.double().view(1, -1, 1, 1)
    expected = patch_embed_reference(normalized, weight.double(), bias.double(), norm_weight=norm_weight.double(),
                                     norm_bias=norm_bias.double(), **kwargs)
    assert_close(out, expected)


TRITON = [p for p in backend_params("patch_embed") if p.id == "triton"]
GPU_BACKENDS = [p for p in backend_params("patch_embed") if p.id in ("triton", "cuda")]


# The autotuner picks a tile by speed alone, and under the interpreter it has the last one only:
# each tile it may pick, launched alone, against the reference (ViT's token layout, 2 images of 5x6
# patches: 60 rows, partial tiles in M and N).
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("index", range(len(patch_kernels._configs())))
def test_triton_each_gemm_tile(backend, index, monkeypatch):
    dtype = launch_tile_alone(monkeypatch, patch_kernels._patch_embed_fwd_tuned, patch_kernels._configs()[index])
    inputs = [random(2, CIN, 20, 24), random(DIM, CIN, 4, 4, scale=0.2), random(DIM), random(1, 1, DIM),
              random(1, 31, DIM)]

    def bind(fn, **extra):
        def call(x, weight, bias, prefix, pos):
            return fn(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, **extra)
        return call

    compare_with_reference(bind(ops.patch_embed, backend=backend), bind(patch_embed_reference), inputs, dtype)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_opcheck_and_compile(backend):
    x = torch.randn(2, CIN, 8, 12, device=DEVICE, requires_grad=True)
    weight = torch.randn(DIM, CIN, 4, 4, device=DEVICE, requires_grad=True)
    bias, prefix = torch.randn(DIM, device=DEVICE), torch.randn(1, DIM, device=DEVICE, requires_grad=True)
    pos = torch.randn(1, 7, DIM, device=DEVICE, requires_grad=True)
    norm_weight = torch.randn(DIM, device=DEVICE, requires_grad=True)
    op = torch.ops.vitkernels.patch_embed_triton.default
    torch.library.opcheck(op, (x, weight, bias, prefix, pos, None, None, None, 1e-5, False, None, None, False,
                               "tokens"))
    torch.library.opcheck(op, (x, weight, None, None, pos[:, 1:5], [2, 2], norm_weight, None, 1e-5, True, None,
                               None, True, "map"))

    def embed(x):
        return ops.patch_embed(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, backend=backend)

    compiled, eager = torch.compile(embed, fullgraph=True)(x), embed(x)
    torch.testing.assert_close(compiled, eager)
    upstream = torch.randn_like(eager)
    grads = [torch.autograd.grad(out, (x, weight, prefix, pos), upstream) for out in (compiled, eager)]
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_bf16(backend, case):
    height, width, patch = CASES[case][:3]
    kwargs = CASES[case][3]()
    tensor_keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in tensor_keys}
    inputs = [random(2, CIN, height, width), random(DIM, CIN, patch, patch, scale=0.2), random(DIM)]
    inputs += [kwargs[k] for k in tensor_keys]

    def bind(fn, **extra):
        def call(x, weight, bias, *tensors):
            return fn(x, weight, bias, **dict(zip(tensor_keys, tensors)), **fixed, **extra)
        return call

    compare_with_reference(bind(ops.patch_embed, backend=backend), bind(patch_embed_reference), inputs,
                           torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_bf16_vit_b16(backend):
    inputs = [random(4, CIN, 224, 224), random(768, CIN, 16, 16, scale=0.05), random(768), random(1, 768),
              random(1, 197, 768)]

    def bind(fn, **extra):
        def call(x, weight, bias, prefix, pos):
            return fn(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, **extra)
        return call

    compare_with_reference(bind(ops.patch_embed, backend=backend), bind(patch_embed_reference), inputs,
                           torch.bfloat16)


# --- the "cuda" backend (csrc/patch_embed/cuda.cu) beyond the shared tests ------------------------------

CUDA_BACKEND = [p for p in backend_params("patch_embed") if p.id == "cuda"]
# (batch, image size, E, patch, dtype, keyword arguments built from float64 masters): the model zoo's sizes
MODEL_SIZES = {
    "vit-b16-bf16": (2, 224, 768, 16, torch.bfloat16, lambda: {"prefix_tokens": random(1, 768),
                                                              "pos_embed": random(1, 197, 768)}),
    "vit-h14-fp16": (1, 224, 1280, 14, torch.float16, lambda: {"prefix_tokens": random(1, 1280),
                                                              "pos_embed": random(1, 257, 1280)}),
    "vit-b32-fp32": (2, 224, 768, 32, torch.float32, lambda: {"prefix_tokens": random(1, 768),
                                                             "pos_embed": random(1, 50, 768)}),
    "deit3-registers-p8-fp16": (2, 64, 384, 8, torch.float16, lambda: {"prefix_tokens": random(5, 384),
                                                                      "pos_embed": random(1, 64, 384)}),
    "swin-t-bf16": (2, 224, 96, 4, torch.bfloat16, lambda: {"patch_norm": True, "norm_weight": 1 + random(96),
                                                            "norm_bias": random(96), "output_format": "map"}),
    "swin-b-fp32": (2, 224, 128, 4, torch.float32, lambda: {"patch_norm": True, "norm_weight": 1 + random(128),
                                                            "norm_bias": random(128), "output_format": "map"}),
}


def _call(fn, tensor_keys, fixed, **extra):
    def call(x, weight, bias, *tensors):
        return fn(x, weight, bias, **dict(zip(tensor_keys, tensors)), **fixed, **extra)
    return call


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("size", list(MODEL_SIZES))
def test_cuda_model_sizes(backend, size):
    batch, image, dim, patch, dtype, make_kwargs = MODEL_SIZES[size]
    kwargs = make_kwargs()
    keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in keys}
    inputs = [random(batch, CIN, image, image), random(dim, CIN, patch, patch, scale=patch**-1), random(dim)]
    compare_with_reference(_call(ops.patch_embed, keys, fixed, backend=backend),
                           _call(patch_embed_reference, keys, fixed), inputs + [kwargs[k] for k in keys], dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_cuda_uint8_image_at_vit_b16_size(backend, dtype):
    image = torch.randint(0, 256, (2, CIN, 224, 224), dtype=torch.uint8, device=DEVICE)
    weight, bias = random(768, CIN, 16, 16, scale=0.05), random(768)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64, device=DEVICE)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64, device=DEVICE)
    low = [t.to(dtype) for t in (weight, bias, mean, std)]
    out = ops.patch_embed(image, low[0], low[1], mean=low[2], std=low[3], backend=backend)
    expected = patch_embed_reference(image, weight, bias, mean=mean, std=std)
    low_reference = patch_embed_reference(image, *low[:2], mean=low[2], std=low[3])
    assert_close(out, expected, low_precision_reference=low_reference if dtype != torch.float32 else None)


def _op_args(device=DEVICE):
    """Arguments of patch_embed_fwd: prefix and pos, normalization and patch norm, a uint8 image, bf16."""
    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(dtype.is_floating_point)

    x, weight, bias = leaf(2, CIN, 10, 13), leaf(16, CIN, 4, 4), leaf(16)
    prefix, pos = leaf(1, 2, 16), leaf(1, 14, 16)
    norm_weight, norm_bias = leaf(16), leaf(16)
    mean, std = leaf(CIN), (1 + torch.rand(CIN, device=device)).requires_grad_()
    image = torch.randint(0, 256, (2, CIN, 8, 12), dtype=torch.uint8, device=device)
    return [
        (x, weight, bias, prefix, pos, None, None, 1e-5, False, None, None),
        (x, weight, None, None, pos[0, 2:], norm_weight, norm_bias, 1e-6, True, mean, std),
        (image, weight, bias, prefix, None, norm_weight, None, 1e-5, True, mean, std),
        (x.detach().bfloat16(), weight.detach().bfloat16(), None, prefix.detach().bfloat16(), pos[0].detach(),
         None, None, 1e-5, False, None, None),
    ]


@pytest.mark.parametrize("backend", [p for p in backend_params("patch_embed") if p.id in ("cpu", "cuda")])
@pytest.mark.parametrize("case", range(4))
def test_compiled_opcheck(backend, case):
    """The compiled ops on the backend's device: patch_embed_fwd fully, patch_embed_bwd's schema and fake kernel."""
    args = _op_args("cuda" if backend == "cuda" else "cpu")[case]
    torch.library.opcheck(torch.ops.vitkernels.patch_embed_fwd.default, args)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out = torch.ops.vitkernels.patch_embed_fwd(*detached)
    # the backward has no gradient of its own: the autograd checks do not apply
    torch.library.opcheck(torch.ops.vitkernels.patch_embed_bwd.default, (torch.randn_like(out), *detached, [True] * 9),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("needs", [[True] * 9, [False, True, False, True, False, True, False, False, True]],
                         ids=["all", "some"])
def test_cuda_backward_matches_cpu_op(backend, case, needs):
    """Same gradients as the CPU op, and empty tensors in the same places (fp32)."""
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args()[case]]
    grad_out = torch.randn_like(torch.ops.vitkernels.patch_embed_fwd(*args))
    on_cpu = [a.cpu() if isinstance(a, torch.Tensor) else a for a in (grad_out, *args)]
    grads = torch.ops.vitkernels.patch_embed_bwd(grad_out, *args, needs)
    expected = torch.ops.vitkernels.patch_embed_bwd(*on_cpu, needs)
    for i, (actual, want) in enumerate(zip(grads, expected)):
        assert actual.shape == want.shape and actual.dtype == want.dtype, (i, actual.shape, want.shape)
        torch.testing.assert_close(actual.cpu(), want, rtol=1e-4, atol=1e-4 * max(want.abs().max().item(), 1.0)
                                   if want.numel() else 0.0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cuda_backward_is_deterministic(backend, dtype):
    """Every gradient, the weight's and the reductions over the batch included, is bitwise equal across runs."""
    x = torch.randn(8, CIN, 62, 62, device=DEVICE, dtype=dtype).requires_grad_()
    params = [torch.randn(96, CIN, 4, 4) * 0.2, torch.randn(96), torch.randn(1, 96), torch.randn(1, 257, 96),
              torch.randn(96), torch.randn(96)]
    params = [p.to(device=DEVICE, dtype=dtype).requires_grad_() for p in params]
    upstream = torch.randn(8, 257, 96, device=DEVICE, dtype=dtype)

    def grads():
        weight, bias, prefix, pos, norm_weight, norm_bias = params
        out = ops.patch_embed(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, patch_norm=True,
                              norm_weight=norm_weight, norm_bias=norm_bias, dynamic_pad=True, backend=backend)
        return torch.autograd.grad((out * upstream).sum(), [x, *params])

    first = grads()
    for _ in range(3):
        for a, b in zip(first, grads()):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
def test_cuda_empty_batch(backend):
    x = torch.randn(0, CIN, 32, 32, device=DEVICE, requires_grad=True)
    weight = torch.randn(64, CIN, 16, 16, device=DEVICE, requires_grad=True)
    bias, prefix = torch.randn(64, device=DEVICE, requires_grad=True), torch.randn(1, 64, device=DEVICE)
    pos = torch.randn(1, 5, 64, device=DEVICE, requires_grad=True)
    out = ops.patch_embed(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, backend=backend)
    assert out.shape == (0, 5, 64)
    grads = torch.autograd.grad(out.sum(), (x, weight, bias, pos))
    assert grads[0].shape == x.shape
    for g in grads[1:]:
        assert torch.count_nonzero(g) == 0


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("backend", CUDA_BACKEND)
def test_cuda_image_past_2_31_elements(backend):
    """Pixel offsets beyond 2^31: the last grid row of a 3 x 27008 x 27008 uint8 image."""
    side, patch, dim = 27008, 16, 96
    image = torch.randint(0, 256, (1, CIN, side, side), dtype=torch.uint8, device=DEVICE)
    assert image.numel() > 2**31
    weight, bias = torch.randn(dim, CIN, patch, patch, device=DEVICE) * 0.05, torch.randn(dim, device=DEVICE)
    out = ops.patch_embed(image, weight, bias, backend=backend)
    grid = side // patch
    assert_close(out[:, -grid:], patch_embed_reference(image[:, :, -patch:], weight.double(), bias.double()))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKEND)
def test_cuda_rejects_float64_with_reasons(backend):
    with pytest.raises(backends.NotSupportedError, match="dtype float64"):
        ops.patch_embed(random(1, CIN, 8, 8), random(8, CIN, 4, 4), backend=backend)
