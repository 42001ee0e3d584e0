"""layernorm_mlp, layernorm and add_layernorm: boundary checks, backend tables, registered torch ops."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ... import backends
from .. import _checks
from .._library import custom_op, define_reference_op
from .reference import add_layernorm_reference, layernorm_mlp_reference, layernorm_reference

MLP_SCHEMA = (
    "(Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, "
    "Tensor? fc2_bias, float eps, Tensor? gamma, str approximate) -> Tensor"
)
LN_SCHEMA = "(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor"
ADD_LN_SCHEMA = "(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor)"


def _mlp_torch(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate):
    return layernorm_mlp_reference(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                   eps=eps, gamma=gamma, approximate=approximate, upcast=True)


def _ln_torch(x, weight, bias, eps):
    return layernorm_reference(x, weight, bias, eps=eps, upcast=True)


def _add_ln_torch(x, residual, weight, bias, eps):
    return add_layernorm_reference(x, residual, weight, bias, eps=eps, upcast=True)


layernorm_mlp_torch = define_reference_op("layernorm_mlp_torch", MLP_SCHEMA, _mlp_torch)
layernorm_torch = define_reference_op("layernorm_torch", LN_SCHEMA, _ln_torch)
add_layernorm_torch = define_reference_op("add_layernorm_torch", ADD_LN_SCHEMA, _add_ln_torch)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [M, C], contiguous (the Triton kernels index rows as row * C)."""
    return t.reshape(-1, t.shape[-1]).contiguous()


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _empty_or(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def _grad_for(grad: torch.Tensor, source: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The backward op's gradient for ``source``; None for an absent (None) input."""
    return None if source is None else grad


# --- Triton: layernorm and add_layernorm --------------------------------------------------------------

LN_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor? dres, Tensor x, Tensor? weight, float eps, bool weight_grads) -> (Tensor, Tensor, Tensor)"
)


@custom_op("vitkernels::layernorm_triton", schema=LN_SCHEMA)
def layernorm_triton(x, weight, bias, eps):
    from .triton_kernels import layernorm_fwd

    y, _, _, _ = layernorm_fwd(_rows(x), None, _contiguous(weight), _contiguous(bias), eps)
    return y.view(x.shape)


@custom_op("vitkernels::add_layernorm_triton", schema=ADD_LN_SCHEMA)
def add_layernorm_triton(x, residual, weight, bias, eps):
    from .triton_kernels import layernorm_fwd

    y, total, _, _ = layernorm_fwd(_rows(x), _rows(residual), _contiguous(weight), _contiguous(bias), eps)
    return total.view(x.shape), y.view(x.shape)


@custom_op("vitkernels::layernorm_triton_backward", schema=LN_BACKWARD_SCHEMA)
def layernorm_triton_backward(dy, dres, x, weight, eps, weight_grads):
    """(dx, dweight, dbias) of LayerNorm(x); dres is added to dx; fp32 [C] weight grads or empty."""
    from .triton_kernels import layernorm_bwd

    dres = None if dres is None else _rows(dres)
    dx, dw, db = layernorm_bwd(_rows(dy), dres, _rows(x), _contiguous(weight), eps, weight_grads)
    empty = dx.new_empty(0, dtype=torch.float32)
    return dx.view(x.shape), _empty_or(dw, empty), _empty_or(db, empty)


@layernorm_triton.register_fake
def _(x, weight, bias, eps):
    return x.new_empty(x.shape)


@add_layernorm_triton.register_fake
def _(x, residual, weight, bias, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape)


@layernorm_triton_backward.register_fake
def _(dy, dres, x, weight, eps, weight_grads):
    size = x.shape[-1] if weight_grads else 0
    return x.new_empty(x.shape), x.new_empty(size, dtype=torch.float32), x.new_empty(size, dtype=torch.float32)


def _layernorm_grads(ctx, dy, dres, x):
    """(dx, dweight, dbias) for the saved weight and bias, None where not needed."""
    weight, bias = ctx.saved_tensors[-2:]
    wants = ctx.needs_input_grad[-3:-1]
    dx, dw, db = layernorm_triton_backward(dy, dres, x, weight, ctx.eps, any(wants))
    dw = dw.to(weight.dtype) if wants[0] and weight is not None else None
    db = db.to(bias.dtype) if wants[1] and bias is not None else None
    return dx, dw, db


def _layernorm_setup(ctx, inputs, output):
    x, weight, bias, eps = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.eps = eps


def _layernorm_backward(ctx, dy):
    dx, dw, db = _layernorm_grads(ctx, dy, None, ctx.saved_tensors[0])
    return dx, dw, db, None


def _add_layernorm_setup(ctx, inputs, output):
    _, _, weight, bias, eps = inputs
    ctx.save_for_backward(output[0], weight, bias)  # the sum is an output: backward needs nothing else
    ctx.eps = eps


def _add_layernorm_backward(ctx, dsum, dy):
    dx, dw, db = _layernorm_grads(ctx, dy, dsum, ctx.saved_tensors[0])
    return dx, dx, dw, db, None


layernorm_triton.register_autograd(_layernorm_backward, setup_context=_layernorm_setup)
add_layernorm_triton.register_autograd(_add_layernorm_backward, setup_context=_add_layernorm_setup)


# --- Triton: layernorm_mlp ---------------------------------------------------------------------------

MLP_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor fc1_weight, Tensor? fc1_bias, "
    "Tensor fc2_weight, Tensor? fc2_bias, float eps, Tensor? gamma, str approximate) -> Tensor[]"
)


@custom_op("vitkernels::layernorm_mlp_triton", schema=MLP_SCHEMA)
def layernorm_mlp_triton(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma,
                         approximate):
    from .triton_kernels import layernorm_mlp_fwd

    params = [_contiguous(t) for t in (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
    y = layernorm_mlp_fwd(_rows(x), *params, eps, _contiguous(gamma), approximate)
    return y.view(x.shape)


@custom_op("vitkernels::layernorm_mlp_triton_backward", schema=MLP_BACKWARD_SCHEMA)
def layernorm_mlp_triton_backward(dy, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps,
                                  gamma, approximate):
    """[dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma]; empty for None inputs."""
    from .triton_kernels import layernorm_mlp_bwd

    params = [_contiguous(t) for t in (ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)]
    grads = layernorm_mlp_bwd(_rows(dy), _rows(x), *params, eps, _contiguous(gamma), approximate)
    grads[0] = grads[0].view(x.shape)
    return [_empty_or(g, x).contiguous() for g in grads]


@layernorm_mlp_triton.register_fake
def _(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate):
    return x.new_empty(x.shape)


@layernorm_mlp_triton_backward.register_fake
def _(dy, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate):
    inputs = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma)
    return [x.new_empty(0) if t is None else t.new_empty(t.shape) for t in inputs]


def _mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*(inputs[i] for i in range(7)), inputs[8])
    ctx.eps, ctx.approximate = inputs[7], inputs[9]


def _mlp_backward(ctx, dy):
    saved = ctx.saved_tensors
    grads = layernorm_mlp_triton_backward(dy, *saved[:7], ctx.eps, saved[7], ctx.approximate)
    out = [_grad_for(g, t) for g, t in zip(grads, saved)]
    return (*out[:7], None, out[7], None)


layernorm_mlp_triton.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def _triton_capability(features: frozenset[str]) -> backends.Capability:
    devices = {"cuda"} | ({"cpu"} if os.environ.get("TRITON_INTERPRET") == "1" else set())
    return backends.Capability(devices=frozenset(devices),
                               dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}), features=features)


BACKENDS: dict[str, dict[str, backends.Capability]] = {
    "layernorm_mlp": {"torch": backends.reference_capability(),
                      "triton": _triton_capability(frozenset({"backward", "gamma", "tanh"}))},
    "layernorm": {"torch": backends.reference_capability(), "triton": _triton_capability(frozenset({"backward"}))},
    "add_layernorm": {"torch": backends.reference_capability(),
                      "triton": _triton_capability(frozenset({"backward"}))},
}
IMPLEMENTATIONS = {
    "layernorm_mlp": {"torch": layernorm_mlp_torch, "triton": layernorm_mlp_triton},
    "layernorm": {"torch": layernorm_torch, "triton": layernorm_triton},
    "add_layernorm": {"torch": add_layernorm_torch, "triton": add_layernorm_triton},
}


def _check_input(x) -> int:
    _checks.tensor("x", x, ndim=(2, 3, 4))
    channels = x.shape[-1]
    if channels == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    return channels


def _check_eps(eps) -> float:
    return _checks.positive_float("eps", eps)


def _query(x, *tensors, features=()) -> backends.Query:
    features = set(features) | ({"backward"} if _checks.needs_grad(x, *tensors) else set())
    return backends.Query(device=x.device.type, dtype=x.dtype, features=frozenset(features))


def _dispatch(op: str, query: backends.Query, backend: Optional[str], args: tuple):
    name = backends.select(op, BACKENDS[op], query, backend)
    return IMPLEMENTATIONS[op][name](*args)


def layernorm_mlp(
    x: torch.Tensor,
    ln_weight: Optional[torch.Tensor],
    ln_bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    gamma: Optional[torch.Tensor] = None,
    approximate: str = "none",
    backend: Optional[str] = None,
) -> torch.Tensor:
    """x + gamma * fc2(GELU(fc1(LayerNorm(x)))), the second half of a pre-norm transformer block.

    Args:
        x: [..., C] (2 to 4 dims), fp16, bf16, fp32 or fp64.
        ln_weight, ln_bias: [C] or None. fc1_weight: [hidden, C], fc1_bias: [hidden] or None.
        fc2_weight: [C, hidden], fc2_bias: [C] or None. gamma: LayerScale [C] or None.
        eps: LayerNorm epsilon (timm 1e-6, Hugging Face ViT 1e-12, Swin 1e-5).
        approximate: GELU flavour, "none" (exact erf, the zoos' default) or "tanh".
        backend: "torch", "triton", "cuda", "cpu" or "auto".

    Returns:
        [..., C] in x's dtype.
    """
    channels = _check_input(x)
    _checks.tensor("fc1_weight", fc1_weight, ndim=2, like=x)
    hidden = fc1_weight.shape[0]
    _checks.tensor("fc1_weight", fc1_weight, shape=(hidden, channels))
    _checks.tensor("fc2_weight", fc2_weight, ndim=2, like=x, shape=(channels, hidden))
    for name, value, size in (("ln_weight", ln_weight, channels), ("ln_bias", ln_bias, channels),
                              ("fc1_bias", fc1_bias, hidden), ("fc2_bias", fc2_bias, channels),
                              ("gamma", gamma, channels)):
        _checks.optional_tensor(name, value, ndim=1, like=x, shape=(size,))
    eps = _check_eps(eps)
    approximate = _checks.choice("approximate", approximate, ("none", "tanh"))
    features = {f for f, on in (("gamma", gamma is not None), ("tanh", approximate == "tanh")) if on}
    query = _query(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma, features=features)
    args = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate)
    return _dispatch("layernorm_mlp", query, backend, args)


def layernorm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """LayerNorm over the last dim of x [..., C] with optional weight and bias [C]; x's dtype out."""
    channels = _check_input(x)
    _checks.optional_tensor("weight", weight, ndim=1, like=x, shape=(channels,))
    _checks.optional_tensor("bias", bias, ndim=1, like=x, shape=(channels,))
    eps = _check_eps(eps)
    return _dispatch("layernorm", _query(x, weight, bias), backend, (x, weight, bias, eps))


def add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then LayerNorm at a block boundary.

    Args:
        x, residual: [..., C] of the same shape and dtype.
        weight, bias: [C] or None.

    Returns:
        (x + residual, LayerNorm(x + residual)), both [..., C] in x's dtype.
    """
    channels = _check_input(x)
    _checks.tensor("residual", residual, like=x, shape=x.shape, dtypes=(x.dtype,))
    _checks.optional_tensor("weight", weight, ndim=1, like=x, shape=(channels,))
    _checks.optional_tensor("bias", bias, ndim=1, like=x, shape=(channels,))
    eps = _check_eps(eps)
    query = _query(x, residual, weight, bias)
    return _dispatch("add_layernorm", query, backend, (x, residual, weight, bias, eps))


# --- Compiled ops of vitkernels._C (schemas in csrc/registration.cpp): fake kernels, autograd ----
import dataclasses  # noqa: E402

from ... import _ext  # noqa: E402

if _ext.unavailable_reason() is None:

    def _row_stats(x):
        rows = x.numel() // x.shape[-1]
        return x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)

    @torch.library.register_fake("vitkernels::layernorm_fwd")
    def _layernorm_fwd_fake(x, weight, bias, eps):
        return (torch.empty_like(x), *_row_stats(x))

    @torch.library.register_fake("vitkernels::add_layernorm_fwd")
    def _add_layernorm_fwd_fake(x, residual, weight, bias, eps):
        return (torch.empty_like(x), torch.empty_like(x), *_row_stats(x))

    @torch.library.register_fake("vitkernels::layernorm_bwd")
    def _layernorm_bwd_fake(grad_y, grad_extra, x, mean, rstd, weight, bias_grad):
        # the kernels return absent gradients as (distinct) empty tensors of x's dtype
        return (torch.empty_like(x), x.new_empty(0) if weight is None else torch.empty_like(weight),
                x.new_empty(x.shape[-1] if bias_grad else 0))

    def _layernorm_cpu_setup_context(ctx, inputs, output):
        x, weight, bias, _eps = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    def _layernorm_cpu_backward(ctx, grad_y, _grad_mean, _grad_rstd):
        x, weight, mean, rstd = ctx.saved_tensors
        bias_grad = ctx.has_bias and ctx.needs_input_grad[2]
        dx, dweight, dbias = torch.ops.vitkernels.layernorm_bwd(grad_y, None, x, mean, rstd, weight, bias_grad)
        return dx, dweight if weight is not None else None, dbias if bias_grad else None, None

    def _add_layernorm_cpu_setup_context(ctx, inputs, output):
        _x, _residual, weight, bias, _eps = inputs
        total, _y, mean, rstd = output
        ctx.save_for_backward(total, weight, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, rstd)

    def _add_layernorm_cpu_backward(ctx, grad_total, grad_y, _grad_mean, _grad_rstd):
        total, weight, mean, rstd = ctx.saved_tensors
        bias_grad = ctx.has_bias and ctx.needs_input_grad[3]
        dx, dweight, dbias = torch.ops.vitkernels.layernorm_bwd(grad_y, grad_total, total, mean, rstd, weight,
                                                                bias_grad)
        return dx, dx, dweight if weight is not None else None, dbias if bias_grad else None, None

    torch.library.register_autograd("vitkernels::layernorm_fwd", _layernorm_cpu_backward,
                                    setup_context=_layernorm_cpu_setup_context)
    torch.library.register_autograd("vitkernels::add_layernorm_fwd", _add_layernorm_cpu_backward,
                                    setup_context=_add_layernorm_cpu_setup_context)

    @torch.library.register_fake("vitkernels::layernorm_mlp_fwd")
    def _layernorm_mlp_fwd_fake(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma,
                                approximate):
        rows = x.numel() // x.shape[-1]
        fc2_out = x.new_empty((rows, x.shape[-1]) if gamma is not None else (0,), dtype=torch.float32)
        return (torch.empty_like(x), *_row_stats(x), x.new_empty(rows, fc1_weight.shape[0], dtype=torch.float32),
                fc2_out)

    @torch.library.register_fake("vitkernels::layernorm_mlp_bwd")
    def _layernorm_mlp_bwd_fake(grad_out, x, mean, rstd, pre, fc2_out, ln_weight, ln_bias, fc1_weight, fc1_bias,
                                fc2_weight, fc2_bias, eps, gamma, approximate):
        inputs = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma)
        return [x.new_empty(0, dtype=torch.float32) if t is None else torch.empty_like(t) for t in inputs]

    def _layernorm_mlp_cpu_setup_context(ctx, inputs, output):
        x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate = inputs
        _out, mean, rstd, pre, fc2_out = output
        ctx.save_for_backward(x, mean, rstd, pre, fc2_out, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight,
                              fc2_bias, gamma)
        ctx.arguments = (eps, approximate)
        ctx.mark_non_differentiable(mean, rstd, pre, fc2_out)

    def _layernorm_mlp_cpu_backward(ctx, grad_out, *_grad_saved):
        x, mean, rstd, pre, fc2_out, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma = (
            ctx.saved_tensors)
        eps, approximate = ctx.arguments
        grads = torch.ops.vitkernels.layernorm_mlp_bwd(grad_out, x, mean, rstd, pre, fc2_out, ln_weight, ln_bias,
                                                       fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma,
                                                       approximate)
        tensors = (x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        out = [g if t is not None and ctx.needs_input_grad[i] else None for i, (g, t) in enumerate(zip(grads, tensors))]
        dgamma = grads[7] if gamma is not None and ctx.needs_input_grad[8] else None
        return (*out, None, dgamma, None)

    torch.library.register_autograd("vitkernels::layernorm_mlp_fwd", _layernorm_mlp_cpu_backward,
                                    setup_context=_layernorm_mlp_cpu_setup_context)


def _layernorm_cpu(x, weight, bias, eps):
    return torch.ops.vitkernels.layernorm_fwd(x, weight, bias, eps)[0]


def _layernorm_mlp_cpu(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate):
    return torch.ops.vitkernels.layernorm_mlp_fwd(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                  eps, gamma, approximate)[0]


def _add_layernorm_cpu(x, residual, weight, bias, eps):
    total, y, _mean, _rstd = torch.ops.vitkernels.add_layernorm_fwd(x, residual, weight, bias, eps)
    return total, y


def _register_compiled(device: str) -> None:
    """The compiled ops as the ``device`` backend; they dispatch on the tensors' device."""
    capability = backends.Capability(
        devices=frozenset({device}),
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        features=frozenset({"backward"}),
    )
    BACKENDS["layernorm_mlp"][device] = dataclasses.replace(
        capability, features=frozenset({"backward", "gamma", "tanh"})
    )
    BACKENDS["layernorm"][device] = capability
    BACKENDS["add_layernorm"][device] = capability
    IMPLEMENTATIONS["layernorm_mlp"][device] = _layernorm_mlp_cpu
    IMPLEMENTATIONS["layernorm"][device] = _layernorm_cpu
    IMPLEMENTATIONS["add_layernorm"][device] = _add_layernorm_cpu


# The C++ kernels of csrc/layernorm_mlp/cpu.cpp: fp16 and bf16 are computed in fp32 (the MLP's
# matrix products too, by ATen's fp32 GEMM).
_register_compiled("cpu")
# The CUDA kernels of csrc/layernorm_mlp/cuda.cu: fp32 statistics; the MLP's matrix products run
# in x's dtype through cuBLASLt (tensor cores for fp16 and bf16, fp32 accumulation, no TF32 for
# fp32).
_register_compiled("cuda")
