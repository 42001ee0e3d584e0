"""Plain PyTorch LayerNorm, residual-add + LayerNorm, and the pre-norm MLP branch with residual."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor, upcast: bool) -> torch.dtype:
    return torch.float32 if upcast and x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def layernorm_reference(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    upcast: bool = False,
) -> torch.Tensor:
    """LayerNorm over the last dim of x [..., C] with optional affine weight and bias [C]."""
    dtype = _compute_dtype(x, upcast)
    y = F.layer_norm(x.to(dtype), x.shape[-1:], _cast(weight, dtype), _cast(bias, dtype), eps)
    return y.to(x.dtype)


def add_layernorm_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    *,
    eps: float = 1e-6,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block boundary: s = x + residual, returns (s, LayerNorm(s)); both [..., C] in x's dtype."""
    dtype = _compute_dtype(x, upcast)
    s = x.to(dtype) + residual.to(dtype)
    y = F.layer_norm(s, s.shape[-1:], _cast(weight, dtype), _cast(bias, dtype), eps)
    return s.to(x.dtype), y.to(x.dtype)


def layernorm_mlp_reference(
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
    upcast: bool = False,
) -> torch.Tensor:
    """x + gamma * fc2(GELU(fc1(LayerNorm(x)))), as a pre-norm transformer block's second half.

    Args:
        x: [..., C]; ln_weight, ln_bias: [C] or None; fc1_weight: [hidden, C]; fc1_bias: [hidden];
        fc2_weight: [C, hidden]; fc2_bias: [C]; gamma: LayerScale [C] or None (timm's ls2).
        eps: LayerNorm epsilon (timm 1e-6, torchvision 1e-6, Hugging Face ViT 1e-12, Swin 1e-5).
        approximate: "none" for exact erf GELU (nn.GELU(), every zoo's default) or "tanh".
        upcast: compute in float32 and cast back for fp16/bf16 inputs.

    Returns:
        [..., C] in x's dtype.
    """
    dtype = _compute_dtype(x, upcast)
    xc = x.to(dtype)
    h = F.layer_norm(xc, xc.shape[-1:], _cast(ln_weight, dtype), _cast(ln_bias, dtype), eps)
    h = F.gelu(F.linear(h, fc1_weight.to(dtype), _cast(fc1_bias, dtype)), approximate=approximate)
    h = F.linear(h, fc2_weight.to(dtype), _cast(fc2_bias, dtype))
    if gamma is not None:
        h = h * gamma.to(dtype)
    return (xc + h).to(x.dtype)
