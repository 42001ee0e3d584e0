"""vitkernels.ops._library.custom_op: the op's own function in plain eager mode, the dispatcher elsewhere."""
from __future__ import annotations

import contextlib
import sys
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitkernels.ops import _library

CALLERS: list[tuple[str, str]] = []


@_library.custom_op("vitkernels_test::double")
def double(x: torch.Tensor, factor: float) -> torch.Tensor:
    CALLERS.append((sys._getframe(1).f_code.co_name, sys._getframe(2).f_code.co_name))
    return x * (2 * factor)


@double.register_fake
def _(x, factor):
    return torch.empty_like(x)


double.register_autograd(lambda ctx, grad: (grad * (2 * ctx.factor), None),
                         setup_context=lambda ctx, inputs, output: setattr(ctx, "factor", inputs[1]))


class Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class Subclass(torch.Tensor):
    pass


SITUATIONS = {
    "no_grad": (torch.no_grad, False),
    "inference_mode": (torch.inference_mode, False),
    "grad mode, nothing requires grad": (contextlib.nullcontext, False),
    "grad mode, an input requires grad": (contextlib.nullcontext, True),
    "a dispatch mode": (Passthrough, False),
    "the profiler": (torch.profiler.profile, False),
    "forward-mode AD": (torch.autograd.forward_ad.dual_level, False),
}
DIRECT = {"no_grad", "inference_mode", "grad mode, nothing requires grad"}


@pytest.mark.parametrize("situation", SITUATIONS)
def test_plain_eager_runs_the_function_and_nothing_else_does(situation):
    context, requires_grad = SITUATIONS[situation]
    x = torch.randn(5, requires_grad=requires_grad)
    CALLERS.clear()
    with context():
        assert _library.plain_eager((x, 1.5)) == (situation in DIRECT)
        out = double(x, 1.5)
    torch.testing.assert_close(out.detach(), x.detach() * 3)
    # called directly: from the device wrapper (on_tensor_device) in CustomOp.__call__
    assert (CALLERS == [("run", "__call__")]) == (situation in DIRECT), CALLERS
    if requires_grad:
        out.sum().backward()
        torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))


def test_plain_eager_refuses_subclasses_lists_of_them_and_functorch():
    plain, sub = torch.randn(3), torch.randn(3).as_subclass(Subclass)
    assert _library.plain_eager((plain, [plain, None], 2))
    assert not _library.plain_eager((sub,))
    assert not _library.plain_eager(([plain, sub],))
    assert _library.plain_eager((torch.nn.Parameter(plain),)) is False  # grad mode on, a parameter requires grad
    with torch.no_grad():
        assert _library.plain_eager((torch.nn.Parameter(plain),))
    seen = []
    torch.vmap(lambda t: seen.append(_library.plain_eager((t,))) or t)(torch.randn(2, 3))
    assert seen == [False]



def test_kernels_run_on_their_tensors_cuda_device(monkeypatch):
    """Triton launches on the current device: a call on cuda:1 tensors while cuda:0 is current runs
    with cuda:1 current, and other calls leave the device as it is."""
    current = []

    @contextlib.contextmanager
    def device(value):
        current.append(value)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    seen = []
    run = _library.on_tensor_device(lambda *args: seen.append(list(current)) or len(args))
    on_cuda = mock.Mock(spec=torch.Tensor, is_cuda=True)
    for index, expected in ((1, [torch.device("cuda", 1)]), (0, [])):
        on_cuda.device = torch.device("cuda", index)
        assert run(2, on_cuda, torch.randn(1)) == 3
        assert seen.pop() == expected
    assert run(torch.randn(2), on_cuda) == 2 and seen.pop() == []  # the first tensor decides: a CPU one
    assert run(1.0) == 1 and seen.pop() == []


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_triton_op_on_a_device_that_is_not_current(grad):
    """The Triton LayerNorm on cuda:1 tensors while cuda:0 is current, against the reference."""
    from vitkernels import ops
    from vitkernels.ops.layernorm_mlp.reference import layernorm_reference
    from vitkernels.testing import assert_close

    torch.manual_seed(0)
    x = torch.randn(64, 96, device="cuda:1", requires_grad=grad)
    weight, bias = torch.randn(96, device="cuda:1"), torch.randn(96, device="cuda:1")
    with torch.cuda.device(0):
        out = ops.layernorm(x, weight, bias, backend="triton")
        if grad:
            out.sum().backward()
    assert out.device == x.device
    expected = layernorm_reference(x.detach().double(), weight.double(), bias.double(), eps=1e-6)
    assert_close(out.detach(), expected, name="layernorm on cuda:1")
    if grad:
        ref = x.detach().double().requires_grad_()
        layernorm_reference(ref, weight.double(), bias.double(), eps=1e-6).sum().backward()
        assert_close(x.grad, ref.grad, grad=True, name="layernorm gradient on cuda:1")
