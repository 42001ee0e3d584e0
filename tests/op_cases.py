"""One small, representative call of every public op, shared by the robustness tests.

A case holds float64 master tensors (fresh random values, never zeros) and a function that calls
the op on them with a given backend. ``run`` casts the masters, calls, and returns the outputs and
the gradients of a fixed random projection of the outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch

from vitkernels import backends, ops
from vitkernels.testing import GRAD_RTOL, LOW_PRECISION, assert_close, errors


@dataclass(frozen=True)
class Case:
    op: str
    make: Callable[[int], dict]  # batch -> {name: float64 master tensor}
    call: Callable[..., object]  # (backend, **tensors) -> tensor or tuple of tensors
    shared: frozenset = frozenset()  # tensors without a batch dim (weights, tables)


def _r(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


WINDOW, SHIFT, HEADS = (4, 4), (2, 2), 2


def _window(batch):
    return {"qkv": _r(batch, 7, 9, 3 * HEADS * 8), "bias_table": _r(49, HEADS), "qkv_bias": _r(3 * HEADS * 8)}


def _attention(batch):
    return {"qkv": _r(batch, 10, 3 * HEADS * 8), "bias": _r(HEADS, 10, 10)}


def _layernorm(batch):
    return {"x": _r(batch, 5, 24), "weight": 1 + _r(24), "bias": _r(24)}


def _add_layernorm(batch):
    return {**_layernorm(batch), "residual": _r(batch, 5, 24)}


def _mlp(batch):
    return {"x": _r(batch, 5, 16), "ln_weight": 1 + _r(16), "ln_bias": _r(16), "fc1_weight": _r(40, 16) / 4,
            "fc1_bias": _r(40), "fc2_weight": _r(16, 40) / 6, "fc2_bias": _r(16), "gamma": _r(16)}


def _patch(batch):
    return {"x": _r(batch, 3, 8, 12), "weight": _r(16, 3, 4, 4) / 7, "bias": _r(16), "prefix_tokens": _r(1, 16),
            "pos_embed": _r(1, 7, 16)}


CASES = {
    "window_attention": Case(
        "window_attention", _window,
        lambda backend, qkv, bias_table, qkv_bias: ops.window_attention(
            qkv, HEADS, WINDOW, SHIFT, bias_table, qkv_bias=qkv_bias, backend=backend),
        shared=frozenset({"bias_table", "qkv_bias"})),
    "attention": Case(
        "attention", _attention,
        lambda backend, qkv, bias: ops.attention(qkv, HEADS, bias=bias, backend=backend),
        shared=frozenset({"bias"})),
    "layernorm": Case(
        "layernorm", _layernorm,
        lambda backend, x, weight, bias: ops.layernorm(x, weight, bias, eps=1e-5, backend=backend),
        shared=frozenset({"weight", "bias"})),
    "add_layernorm": Case(
        "add_layernorm", _add_layernorm,
        lambda backend, x, residual, weight, bias: ops.add_layernorm(x, residual, weight, bias, backend=backend),
        shared=frozenset({"weight", "bias"})),
    "layernorm_mlp": Case(
        "layernorm_mlp", _mlp,
        lambda backend, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma: ops.layernorm_mlp(
            x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=gamma, backend=backend),
        shared=frozenset({"ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma"})),
    "patch_embed": Case(
        "patch_embed", _patch,
        lambda backend, x, weight, bias, prefix_tokens, pos_embed: ops.patch_embed(
            x, weight, bias, prefix_tokens=prefix_tokens, pos_embed=pos_embed, backend=backend),
        shared=frozenset({"weight", "bias", "prefix_tokens", "pos_embed"})),
}


def batch_for(backend: str) -> int:
    """Batch of a case: 2, or 1 under the slow Triton interpreter (one sample still spans many programs)."""
    return 1 if backend == "triton" else 2


def op_backend_params(backend_names=None) -> list:
    """(op, backend) pairs for every op and every backend in its table; the cases hold CPU tensors, so a
    backend unavailable here or without CPU support (Triton outside the interpreter, CUDA) is skipped."""
    params = []
    for op in ops.OPS:
        for name, capability in ops.backend_table(op).items():
            if backend_names is not None and name not in backend_names:
                continue
            reason = backends.unavailable_reason(name)
            if reason is None and "cpu" not in capability.devices:
                reason = "runs CUDA tensors only; these cases are CPU tensors"
            marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
            params.append(pytest.param(op, name, marks=marks, id=f"{op}-{name}"))
    return params


def gpu_op_backend_params() -> list:
    """(op, backend) pairs of every op with each compiled GPU backend (triton, cuda) available here."""
    return [pytest.param(op, name, id=f"{op}-{name}") for op in ops.OPS for name in ops.backend_table(op)
            if name in ("cuda", "triton") and backends.unavailable_reason(name) is None]


def outputs_of(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def run(case: Case, backend: str, tensors: dict, dtype: Optional[torch.dtype] = None, *, grad: bool = True,
        upstream: Optional[list] = None):
    """(outputs, {name: gradient}) of ``case`` on ``tensors`` (cast to ``dtype`` when given).

    Gradients are of sum(output * upstream) over the outputs; ``upstream`` defaults to ones.
    """
    leaves = {k: (t if dtype is None else t.to(dtype)).detach().requires_grad_(grad) for k, t in tensors.items()}
    outs = outputs_of(case.call(backend, **leaves))
    if not grad:
        return outs, {}
    upstream = upstream or [torch.ones_like(o) for o in outs]
    total = sum((o * u.to(o.dtype)).sum() for o, u in zip(outs, upstream))
    found = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), found)}
    return outs, grads


def compare(case: Case, backend: str, tensors: dict, dtype: Optional[torch.dtype] = None):
    """Outputs and gradients of ``backend`` against the reference in float64 on the same values.

    ``dtype`` casts the tensors first (None: as given). fp16 / bf16 results follow the relative rule
    against the reference run in that precision and, where rounding the inputs alone costs more, in
    float64 on the rounded inputs (the policy's two bases: vitkernels.testing.assert_close). Returns
    the backend's (outputs, gradients).
    """
    upstream = [torch.randn_like(o) for o in run(case, "torch", tensors, torch.float64, grad=False)[0]]
    outs, grads = run(case, backend, tensors, dtype, upstream=upstream)
    ref_outs, ref_grads = run(case, "torch", tensors, torch.float64, upstream=upstream)
    low_outs, low_grads = rounded_outs, rounded_grads = [None] * len(outs), {}
    if outs[0].dtype in LOW_PRECISION:
        low_outs, low_grads = run(case, "torch", tensors, dtype, upstream=upstream)
        rounded_outs, rounded_grads = run(case, "torch", _rounded(tensors, dtype), torch.float64, upstream=upstream)
    for i, out in enumerate(outs):
        assert_close(out, ref_outs[i], low_precision_reference=low_outs[i], rounded_input_reference=rounded_outs[i],
                     name=f"{case.op} output {i}")
    for name, grad in grads.items():
        if name in case.shared and grad.dtype not in LOW_PRECISION:
            _assert_reduced_close(grad, ref_grads[name], outs[0].numel() // grad.numel(), f"{case.op} grad of {name}")
        else:
            assert_close(grad, ref_grads[name], low_precision_reference=low_grads.get(name),
                         rounded_input_reference=rounded_grads.get(name), grad=True, name=f"{case.op} grad of {name}")
    return outs, grads


def _rounded(tensors: dict, dtype: torch.dtype) -> dict:
    """The tensors rounded to ``dtype``, in float64."""
    return {k: t.to(dtype).double() for k, t in tensors.items()}


def _assert_reduced_close(actual, expected, rows: int, name: str) -> None:
    """A weight's gradient sums about ``rows`` terms per element; its fp32 rounding error may grow with
    sqrt(rows), which DESIGN.md's tolerance policy allows for."""
    err, bound = errors(actual, expected), GRAD_RTOL * max(1.0, rows) ** 0.5
    same_nan = torch.equal(actual.isnan(), expected.isnan())
    assert err.rel <= bound and same_nan, (f"{name} differs from the reference: {err}; "
                                           f"bound {bound:.1e} (sqrt of {rows} rows)")
