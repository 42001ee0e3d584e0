"""vitkernels: fused kernels for vision transformers, checked against plain PyTorch references.

Public face:
    vitkernels.apply        patch a built timm model in place with fused modules; vitkernels.revert undoes it
    vitkernels.ops          functional ops (window_attention, attention, patch_embed, layernorm_mlp, ...)
    vitkernels.use_backend  context manager choosing the backend of the enclosed calls
    vitkernels.backends     what each backend supports and why one cannot run
"""
from . import backends, ops
from .backends import NotSupportedError, use_backend
from .integrations import Report, apply, revert

__version__ = "0.1.0"

__all__ = ["apply", "revert", "Report", "ops", "backends", "use_backend", "NotSupportedError", "__version__"]
