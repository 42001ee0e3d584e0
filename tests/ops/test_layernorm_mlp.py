import pytest
import torch

from op_helpers import backend_params, compare_with_reference, random
from vitkernels import ops
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


@pytest.mark.parametrize("backend", backend_params("layernorm"))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layernorm(backend, affine, dtype):
    x, w, b = random(3, 7, 40), 1 + random(40) if affine else None, random(40) if affine else None

    def run(x, w, b):
        return ops.layernorm(x, w, b, eps=1e-12, backend=backend)

    compare_with_reference(run, lambda x, w, b: layernorm_reference(x, w, b, eps=1e-12), [x, w, b], dtype)


@pytest.mark.parametrize("backend", backend_params("add_layernorm"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_add_layernorm(backend, dtype):
    inputs = [random(5, 11, 24), random(5, 11, 24), 1 + random(24), random(24)]

    def run(x, r, w, b):
        return ops.add_layernorm(x, r, w, b, eps=1e-5, backend=backend)

    compare_with_reference(run, lambda x, r, w, b: add_layernorm_reference(x, r, w, b, eps=1e-5), inputs, dtype)


def test_opcheck_and_compile():
    x, lw, lb, w1, b1, w2, b2, gamma = (t.float().requires_grad_() for t in _mlp_inputs((2, 9), 16, 64))
    torch.library.opcheck(torch.ops.vitkernels.layernorm_mlp_torch.default,
                          (x, lw, lb, w1, b1, w2, b2, 1e-6, gamma, "none"))
    torch.library.opcheck(torch.ops.vitkernels.layernorm_torch.default, (x, lw, lb, 1e-6))
    torch.library.opcheck(torch.ops.vitkernels.add_layernorm_torch.default, (x, x.detach() * 2, lw, None, 1e-6))

    def block_end(x, r):
        s, h = ops.add_layernorm(x, r, lw, lb)
        return ops.layernorm_mlp(h, lw, lb, w1, b1, w2, b2, gamma=gamma) + s

    r = torch.randn_like(x)
    torch.testing.assert_close(torch.compile(block_end, fullgraph=True)(x, r), block_end(x, r))
