"""Loads the compiled extension ``vitkernels._C`` when it was built; warns, never breaks import.

The extension registers its kernels under ``torch.ops.vitkernels`` (schemas in
csrc/registration.cpp). Without it the "cpu" and "cuda" backends report why they are missing and
every other backend keeps working.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Optional

_module = None
_error: Optional[str] = None


def _load() -> None:
    global _module, _error
    try:
        _module = importlib.import_module("vitkernels._C")
    except ImportError as err:
        _error = (
            "the compiled extension vitkernels._C is not built "
            f"({err}); reinstall with `pip install --no-build-isolation -e .`"
        )
    except OSError as err:
        _error = f"the compiled extension vitkernels._C failed to load: {err}"
        warnings.warn(f"vitkernels: {_error}; the cpu and cuda backends are disabled", RuntimeWarning, stacklevel=3)


_load()


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, else why it is not."""
    return _error


def has_cuda() -> bool:
    """Whether the loaded extension carries CUDA kernels."""
    return _module is not None and bool(_module.has_cuda())


def build_info() -> dict:
    """What the extension was built with (empty when it is not loaded)."""
    return dict(_module.build_info()) if _module is not None else {}
