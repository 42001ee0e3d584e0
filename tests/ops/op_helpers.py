"""Shared harness for op tests: run one backend and the reference on the same random inputs."""
from __future__ import annotations

from typing import Callable, Sequence

import pytest
import torch

from vitkernels import backends, ops
from vitkernels.testing import LOW_PRECISION, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_params(op: str) -> list:
    """Every backend in the op's table, skipped with its reason where it cannot run here."""
    params = []
    for name in ops.backend_table(op):
        reason = backends.unavailable_reason(name)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def compare_with_reference(
    run: Callable[..., object],
    reference: Callable[..., object],
    inputs: Sequence[torch.Tensor | None],
    dtype: torch.dtype,
    *,
    grad: bool = True,
    name: str = "output",
) -> None:
    """Checks ``run`` on ``inputs`` cast to ``dtype`` against ``reference`` in float64.

    ``inputs`` are float64 masters (None allowed); both callables take them positionally and
    return a tensor or a tuple of tensors. With ``grad``, gradients of a random projection of
    the outputs are compared for every floating input, under the gradient tolerances.
    """

    def prepare(cast: torch.dtype):
        out = []
        for t in inputs:
            if t is None or not t.is_floating_point():
                out.append(t)
            else:
                out.append(t.detach().to(cast).requires_grad_(grad))
        return out

    def outputs(result):
        return list(result) if isinstance(result, (tuple, list)) else [result]

    runs = {"kernel": (prepare(dtype), run), "ref64": (prepare(torch.float64), reference)}
    if dtype in LOW_PRECISION:
        runs["ref_low"] = (prepare(dtype), reference)
    results = {key: outputs(fn(*args)) for key, (args, fn) in runs.items()}

    for i, actual in enumerate(results["kernel"]):
        low = results["ref_low"][i] if "ref_low" in results else None
        assert_close(actual, results["ref64"][i], low_precision_reference=low, name=f"{name}[{i}]")
    if not grad:
        return

    upstream = [torch.randn_like(o, dtype=torch.float64) for o in results["ref64"]]
    grads = {}
    for key, (args, _) in runs.items():
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        outs = results[key]
        total = sum((o.double() * g).sum() for o, g in zip(outs, upstream))
        found = torch.autograd.grad(total, leaves, allow_unused=True)
        # an input the output does not depend on has gradient zero, whether or not autograd says None
        grads[key] = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(found, leaves)]
    for i, actual in enumerate(grads["kernel"]):
        expected = grads["ref64"][i]
        low = grads["ref_low"][i] if "ref_low" in grads else None
        assert_close(actual, expected, low_precision_reference=low, grad=True, name=f"grad of input {i}")


def random(*shape: int, scale: float = 1.0) -> torch.Tensor:
    """A float64 master tensor on the test device."""
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE) * scale
