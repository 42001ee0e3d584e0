import pytest
import torch

from op_helpers import DEVICE, backend_params, compare_with_reference, random
from vitkernels import ops
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
    "map-norm-no-affine": (8, 12, 4, lambda: {"patch_norm": True, "output_format": "map"}),
    "tokens-norm-pos": (12, 8, 4, lambda: {"patch_norm": True, "norm_weight": 1 + random(DIM),
                                            "prefix_tokens": random(2, DIM), "pos_embed": random(1, 8, DIM)}),
}


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
def test_uint8_image_with_normalization(backend):
    image = torch.randint(0, 256, (2, CIN, 8, 12), dtype=torch.uint8, device=DEVICE)
    weight, bias = torch.randn(DIM, CIN, 4, 4, device=DEVICE), torch.randn(DIM, device=DEVICE)
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
@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("case", list(CASES))
def test_triton_bf16(backend, case):
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
@pytest.mark.parametrize("backend", TRITON)
def test_triton_bf16_vit_b16(backend):
    inputs = [random(4, CIN, 224, 224), random(768, CIN, 16, 16, scale=0.05), random(768), random(1, 768),
              random(1, 197, 768)]

    def bind(fn, **extra):
        def call(x, weight, bias, prefix, pos):
            return fn(x, weight, bias, prefix_tokens=prefix, pos_embed=pos, **extra)
        return call

    compare_with_reference(bind(ops.patch_embed, backend=backend), bind(patch_embed_reference), inputs,
                           torch.bfloat16)
