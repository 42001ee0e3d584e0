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
