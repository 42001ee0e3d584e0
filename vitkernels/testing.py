"""Tolerance policy shared by tests, benchmarks and the demo, the check for a lost CUDA context, and
the narrowing of Triton's autotuners for test runs on a GPU.

* fp32 / fp64 against the reference computed in fp64: relative error max|a - b| / max|b| below
  1e-5 for forward values, 1e-4 for gradients.
* fp16 / bf16 (the flash-attention rule): the kernel's error against the fp64 reference is at most
  ``factor`` times the error of the same PyTorch computation in that low precision (2 forward,
  3 gradients), plus a small floor; that error is taken at least as large as the one rounding the
  inputs to the low precision causes, where the caller measures it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import torch

if TYPE_CHECKING:
    import pytest

FORWARD_RTOL = 1e-5
GRAD_RTOL = 1e-4
LOW_PRECISION = (torch.float16, torch.bfloat16)
# Relative errors divide by max(max|expected|, this): a gradient that is zero up to e^-100 (a key
# behind the -100 shift mask) is compared in absolute terms instead of amplifying denormal noise.
REL_SCALE_FLOOR = 1e-12


@dataclass(frozen=True)
class Errors:
    max_abs: float
    mean_abs: float
    rel: float

    def __str__(self) -> str:
        return f"max abs {self.max_abs:.3e}, mean abs {self.mean_abs:.3e}, rel {self.rel:.3e}"


def errors(actual: torch.Tensor, expected: torch.Tensor) -> Errors:
    """Errors of ``actual`` against ``expected``, both compared in float64."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    if a.numel() == 0:
        return Errors(0.0, 0.0, 0.0)
    diff = (a - e).abs()
    scale = e.abs().max().item()
    max_abs = diff.max().item()
    return Errors(max_abs, diff.mean().item(), max_abs / max(scale, REL_SCALE_FLOOR))


def assert_close(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    *,
    low_precision_reference: Optional[torch.Tensor] = None,
    rounded_input_reference: Optional[torch.Tensor] = None,
    grad: bool = False,
    floor: float = 1e-3,
    name: str = "output",
) -> Errors:
    """Asserts the tolerance policy; ``reference64`` is the reference evaluated in float64.

    For fp16/bf16 ``actual``, pass ``low_precision_reference``: the reference run in the same low
    precision on the same inputs. ``rounded_input_reference``, optional, is the reference in float64
    on those inputs (rounded to the low precision): what rounding the inputs alone costs. Where the
    output is ill-conditioned (cosine attention scales its logits by up to 100) that can exceed the
    low-precision run's own error, which then happens to be small, and the larger of the two is the
    base. Returns the measured errors.
    """
    err = errors(actual, reference64)
    if actual.dtype in LOW_PRECISION:
        if low_precision_reference is None:
            raise ValueError("fp16/bf16 results need low_precision_reference for the relative rule")
        base = errors(low_precision_reference, reference64)
        base_max, what = base.max_abs, f"low-precision torch ({base})"
        if rounded_input_reference is not None:
            rounding = errors(rounded_input_reference, reference64)
            if rounding.max_abs > base_max:
                base_max, what = rounding.max_abs, f"rounded inputs ({rounding}; low-precision torch {base})"
        factor = 3.0 if grad else 2.0
        bound = factor * base_max + floor * max(reference64.detach().abs().max().item(), 1.0)
        ok = err.max_abs <= bound
        detail = f"{name} ({actual.dtype}): {err}; bound {bound:.3e} = {factor} x {what} + floor"
    else:
        rtol = GRAD_RTOL if grad else FORWARD_RTOL
        ok = err.rel <= rtol
        detail = f"{name} ({actual.dtype}): {err}; relative tolerance {rtol:.0e}"
    if not ok or torch.isnan(actual).any() != torch.isnan(reference64).any():
        raise AssertionError(f"{name} differs from the reference: {detail}")
    return err


# Printed when a test or benchmark run stops because a kernel left the CUDA context unusable.
CUDA_CONTEXT_LOST = "CUDA context lost"


def cuda_fault() -> Optional[str]:
    """The first line of the error a device synchronize raises, or None.

    An asynchronous kernel fault (an illegal address, a device-side assert) surfaces at the next
    synchronizing call and leaves the process's CUDA context unusable: every later CUDA call fails
    too. Never initializes CUDA.
    """
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except RuntimeError as err:  # torch.AcceleratorError derives from it
        return (str(err).strip().splitlines() or [type(err).__name__])[0]
    return None


def stop_on_cuda_fault(item: pytest.Item) -> None:
    """For a pytest_runtest_teardown hook: once a kernel has faulted, nothing later in this
    process can use the GPU, so rather than fail every later test with the same error, the run
    stops, naming the test that was running. A pytest-xdist worker exits at once and xdist starts
    a fresh one for the remaining tests; a plain run ends, keeping what it measured so far."""
    fault = cuda_fault()
    if fault is None:
        return
    import pytest  # the package itself never needs pytest

    message = f"{CUDA_CONTEXT_LOST} during or before {item.nodeid}: {fault}"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stderr.write(f"{message}; ending this worker\n")
        sys.stderr.flush()
        os._exit(3)
    pytest.exit(message, returncode=3)


@contextlib.contextmanager
def first_tile_of_each_depth(tuners: Optional[Sequence] = None) -> Iterator[None]:
    """Within the block, each of ``tuners`` (default: every autotuned Triton kernel of vitkernels)
    keeps the first tile of each K depth of its list, so that it launches that tile without
    compiling and timing the others, as a test run on a GPU wants (each tile is then compared with
    the reference alone by the ops' each-tile tests)."""
    if tuners is None:
        from .ops import _triton

        tuners = _triton.autotuned_kernels()
    saved = [(tuner, tuner.configs) for tuner in tuners]
    for tuner, configs in saved:
        depths: dict = {}
        for config in configs:
            depths.setdefault(config.kwargs["BLOCK_K"], config)
        tuner.configs = list(depths.values())
    try:
        yield
    finally:
        for tuner, configs in saved:
            tuner.configs = configs
