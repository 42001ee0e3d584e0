"""vitkernels.ops._library.custom_op: the op's own function in plain eager mode, the dispatcher elsewhere."""
from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitkernels.ops import _library

CALLERS: list[str] = []


@_library.custom_op("vitkernels_test::double")
def double(x: torch.Tensor, factor: float) -> torch.Tensor:
    CALLERS.append(sys._getframe(1).f_code.co_name)
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
    assert (CALLERS == ["__call__"]) == (situation in DIRECT), CALLERS
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

