"""Shared harness for op tests: run one backend and the reference on the same random inputs."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import pytest
import torch

from vitkernels import backends, ops
from vitkernels.testing import LOW_PRECISION, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def launch_tile_alone(monkeypatch, autotuner, config) -> torch.dtype:
    """Makes Triton ``autotuner`` launch ``config`` alone, as if it had picked it; returns the dtype
    that config's depth is for (BLOCK_K 32: fp32, 64: fp16)."""
    monkeypatch.setattr(autotuner, "configs", [config])
    monkeypatch.setattr(autotuner, "cache", {})
    return torch.float32 if config.kwargs["BLOCK_K"] == 32 else torch.float16


def backend_params(op: str) -> list:
    """Every backend in the op's table, skipped with its reason where it cannot run here.

    The tests put their inputs on DEVICE, so on a GPU machine the cpu backend, which takes CPU
    tensors only, is skipped: the run without a GPU covers it (and tests/ops/test_cpu_backend.py
    runs everywhere).
    """
    params = []
    for name in ops.backend_table(op):
        reason = backends.unavailable_reason(name)
        if not reason and name == "cpu" and DEVICE != "cpu":
            reason = f"takes CPU tensors; these tests run on {DEVICE}"
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
    return a tensor or a tuple of tensors. For fp16/bf16 the reference also runs in that precision
    and in float64 on the rounded inputs: the tolerance's two bases (vitkernels.testing.assert_close). With ``grad``, gradients of a random projection of
    the outputs are compared for every floating input, under the gradient tolerances.
    """

    def prepare(cast: torch.dtype, rounded_to: Optional[torch.dtype] = None):
        out = []
        for t in inputs:
            if t is None or not t.is_floating_point():
                out.append(t)
            else:
                t = t.detach() if rounded_to is None else t.detach().to(rounded_to)
                out.append(t.to(cast).requires_grad_(grad))
        return out

    def outputs(result):
        return list(result) if isinstance(result, (tuple, list)) else [result]

    runs = {"kernel": (prepare(dtype), run), "ref64": (prepare(torch.float64), reference)}
    if dtype in LOW_PRECISION:
        runs["ref_low"] = (prepare(dtype), reference)
        runs["ref_rounded"] = (prepare(torch.float64, rounded_to=dtype), reference)
    results = {key: outputs(fn(*args)) for key, (args, fn) in runs.items()}

    def bases(found: dict, i: int) -> dict:
        if "ref_low" not in found:
            return {}
        return {"low_precision_reference": found["ref_low"][i], "rounded_input_reference": found["ref_rounded"][i]}

    for i, actual in enumerate(results["kernel"]):
        assert_close(actual, results["ref64"][i], **bases(results, i), name=f"{name}[{i}]")
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
        assert_close(actual, grads["ref64"][i], **bases(grads, i), grad=True, name=f"grad of input {i}")


def random(*shape: int, scale: float = 1.0, device: str = DEVICE) -> torch.Tensor:
    """A float64 master tensor, on the test device unless ``device`` says otherwise."""
    return torch.randn(*shape, dtype=torch.float64, device=device) * scale
