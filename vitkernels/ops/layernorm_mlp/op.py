"""layernorm_mlp, layernorm and add_layernorm: boundary checks, backend tables, registered torch ops."""
from __future__ import annotations

from typing import Optional

import torch

from ... import backends
from .. import _checks
from .._library import define_reference_op
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

BACKENDS: dict[str, dict[str, backends.Capability]] = {
    "layernorm_mlp": {"torch": backends.reference_capability()},
    "layernorm": {"torch": backends.reference_capability()},
    "add_layernorm": {"torch": backends.reference_capability()},
}
IMPLEMENTATIONS = {
    "layernorm_mlp": {"torch": layernorm_mlp_torch},
    "layernorm": {"torch": layernorm_torch},
    "add_layernorm": {"torch": add_layernorm_torch},
}


def _check_input(x) -> int:
    _checks.tensor("x", x, ndim=(2, 3, 4))
    channels = x.shape[-1]
    if channels == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    return channels


def _check_eps(eps) -> float:
    eps = _checks.optional_float("eps", eps)
    if eps is None or eps <= 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return eps


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
