"""Backend registry: what each backend can run, declared as data, and how one is chosen.

Every op keeps a table ``{backend name: Capability}`` in its ``op.py``. A call builds a
:class:`Query` describing its inputs; :func:`select` answers with the backend that runs it:

* ``backend=`` argument, else the innermost :func:`use_backend`, else ``VITKERNELS_BACKEND``,
  else ``"auto"``;
* ``"auto"`` takes the first backend in the device's priority list that has no reason to refuse;
* an explicitly named backend that cannot run the inputs raises :class:`NotSupportedError` listing
  every reason. There is no silent fallback from an explicit request.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
CHOICES = BACKENDS + ("auto",)

# auto's order per device type: fused kernels first, the reference last.
PRIORITY = {
    "cuda": ("triton", "cuda", "torch"),
    "cpu": ("cpu", "torch"),
}

DESCRIPTIONS = {
    "torch": "plain PyTorch reference (vitkernels.ops.<op>.reference; fp16/bf16 computed in fp32)",
    "triton": "Triton kernels (GPU; CPU through TRITON_INTERPRET=1)",
    "cuda": "CUDA C++ kernels of the compiled extension",
    "cpu": "C++ CPU kernels of the compiled extension",
}


class NotSupportedError(ValueError):
    """An explicitly requested backend cannot run the given inputs."""


@dataclass(frozen=True)
class Query:
    """What a call needs from a backend."""

    device: str
    dtype: torch.dtype
    head_dim: Optional[int] = None
    window: Optional[tuple[int, int]] = None
    features: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Capability:
    """What one backend supports for one op.

    ``head_dims`` and ``window`` are inclusive ``(low, high)`` ranges (``window`` bounds each
    side of the window); ``features`` names the optional features it implements (``"backward"``,
    ``"shift"``, ``"cosine"``, ...). ``None`` means no restriction.
    """

    devices: frozenset[str]
    dtypes: frozenset[torch.dtype]
    head_dims: Optional[tuple[int, int]] = None
    window: Optional[tuple[int, int]] = None
    features: Optional[frozenset[str]] = None
    extra: Callable[[Query], list[str]] = field(default=lambda query: [], compare=False)

    def reasons(self, query: Query) -> list[str]:
        out = []
        if query.device not in self.devices:
            out.append(f"device {query.device!r} not in {sorted(self.devices)}")
        if query.dtype not in self.dtypes:
            names = sorted(str(d).replace("torch.", "") for d in self.dtypes)
            out.append(f"dtype {str(query.dtype).replace('torch.', '')} not in {names}")
        if self.head_dims is not None and query.head_dim is not None:
            low, high = self.head_dims
            if not low <= query.head_dim <= high:
                out.append(f"head_dim {query.head_dim} outside [{low}, {high}]")
        if self.window is not None and query.window is not None:
            low, high = self.window
            if not all(low <= side <= high for side in query.window):
                out.append(f"window {query.window} has a side outside [{low}, {high}]")
        if self.features is not None:
            missing = sorted(query.features - self.features)
            if missing:
                out.append(f"features not implemented: {', '.join(missing)}")
        out.extend(self.extra(query))
        return out


TORCH_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
ALL_DEVICES = frozenset({"cpu", "cuda"})


def reference_capability() -> Capability:
    """The "torch" backend: the reference runs everything PyTorch runs."""
    return Capability(devices=ALL_DEVICES, dtypes=TORCH_DTYPES)


def _triton_unavailable() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton cannot be imported ({err})"
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "no CUDA device (TRITON_INTERPRET=1 runs Triton kernels on CPU tensors, slowly)"


def _cpu_unavailable() -> Optional[str]:
    from . import _ext

    return _ext.unavailable_reason()


def _cuda_unavailable() -> Optional[str]:
    from . import _ext

    reason = _ext.unavailable_reason()
    if reason is not None:
        return reason
    if not _ext.has_cuda():
        return "the compiled extension was built without CUDA kernels (no nvcc or CPU-only torch at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


_AVAILABILITY: dict[str, Callable[[], Optional[str]]] = {
    "torch": lambda: None,
    "triton": _triton_unavailable,
    "cuda": _cuda_unavailable,
    "cpu": _cpu_unavailable,
}


_UNAVAILABLE: dict[str, Optional[str]] = {}


def unavailable_reason(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run at all on this machine, or None when it can (probed once)."""
    check_name(name, allow_auto=False)
    if name not in _UNAVAILABLE:
        _UNAVAILABLE[name] = _AVAILABILITY[name]()
    return _UNAVAILABLE[name]


def check_name(name: object, allow_auto: bool = True) -> str:
    choices = CHOICES if allow_auto else BACKENDS
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {choices}; got {type(name).__name__} {name!r}")
    if name not in choices:
        raise ValueError(f"unknown backend {name!r}; expected one of {choices}")
    return name


_STACK: list[str] = []


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls with backend ``name`` unless a call names its own ``backend=``."""
    _STACK.append(check_name(name))
    try:
        yield
    finally:
        _STACK.pop()


def requested(backend: Optional[str] = None) -> str:
    """The backend a call asks for: its argument, else use_backend, else VITKERNELS_BACKEND, else auto."""
    if backend is not None:
        return check_name(backend)
    if _STACK:
        return _STACK[-1]
    env = os.environ.get("VITKERNELS_BACKEND")
    if env:
        try:
            return check_name(env)
        except ValueError as err:
            raise ValueError(f"VITKERNELS_BACKEND: {err}") from None
    return "auto"


def not_supported_reasons(op: str, table: dict[str, Capability], name: str, query: Query) -> list[str]:
    """Every reason backend ``name`` cannot run ``op`` on ``query``; empty when it can."""
    reasons = []
    missing = unavailable_reason(name)
    if missing is not None:
        reasons.append(f"backend unavailable: {missing}")
    capability = table.get(name)
    if capability is None:
        reasons.append(f"no {name} implementation of {op}")
    else:
        reasons.extend(capability.reasons(query))
    return reasons


def select(op: str, table: dict[str, Capability], query: Query, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` on ``query``; raises NotSupportedError with every reason otherwise."""
    name = requested(backend)
    if name != "auto":
        reasons = not_supported_reasons(op, table, name, query)
        if reasons:
            lines = "\n".join(f"  - {r}" for r in reasons)
            raise NotSupportedError(f"backend {name!r} cannot run {op} for these inputs:\n{lines}")
        return name
    candidates = PRIORITY.get(query.device, ("torch",))
    refused = {}
    for candidate in candidates:
        reasons = not_supported_reasons(op, table, candidate, query)
        if not reasons:
            return candidate
        refused[candidate] = reasons
    lines = "\n".join(f"  - {n}: {'; '.join(r)}" for n, r in refused.items())
    raise NotSupportedError(f"no backend can run {op} for these inputs:\n{lines}")
