"""Boundary checks shared by the functional API: each raises TypeError or ValueError naming the values."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def tensor(
    name: str,
    value: object,
    *,
    ndim: Optional[int | Sequence[int]] = None,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
    like: Optional[torch.Tensor] = None,
    shape: Optional[Sequence[int]] = None,
) -> torch.Tensor:
    """Checks a tensor argument's type, rank, dtype, device (that of ``like``) and exact shape."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name} must have {want} dims, got shape {tuple(value.shape)}")
    if value.dtype not in dtypes:
        raise TypeError(f"{name} dtype {_dtype_name(value.dtype)} not supported; expected one of "
                        f"{[_dtype_name(d) for d in dtypes]}")
    if like is not None and value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the input is on {like.device}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    return value


def optional_tensor(name: str, value: object, **kwargs) -> Optional[torch.Tensor]:
    return None if value is None else tensor(name, value, **kwargs)


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def pair(name: str, value: object, *, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints, each at least ``minimum``, as a tuple."""
    items = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(items, (tuple, list, torch.Size))
        or len(items) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) for v in items)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum} in each dimension, got {tuple(items)}")
    return int(items[0]), int(items[1])


def optional_float(name: str, value: object, *, finite: bool = False) -> Optional[float]:
    """None, or ``value`` as a float; with ``finite``, NaN and infinities are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} {value!r}")
    # value - value is NaN for NaN and infinities, else 0. Unlike math.isfinite, this also takes the
    # symbolic float that torch.compile(dynamic=True) makes of a module's float attribute without a
    # graph break; there it simplifies to 0, leaving the check to eager calls.
    if finite and value - value != 0:
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def positive_float(name: str, value: object) -> float:
    """A finite float above zero (an epsilon)."""
    value = optional_float(name, value, finite=True)
    if value is None or value <= 0:
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    return value


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def nonempty_dims(name: str, value: torch.Tensor, dims: Sequence[int], labels: str) -> None:
    """Refuses a tensor whose size is zero along any of ``dims`` (named by ``labels``)."""
    if any(value.shape[d] == 0 for d in dims):
        raise ValueError(f"{name} must have non-empty {labels}, got shape {tuple(value.shape)}")


def choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
