"""Pieces shared by the fused module families."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .. import ops

ALL_PARTS = frozenset({"attention", "mlp", "patch_embed"})


# float attributes holding a drop rate: nn.Dropout.p, timm DropPath.drop_prob, torchvision
# StochasticDepth.p and ShiftedWindowAttention.attention_dropout / .dropout
_RATE_ATTRIBUTES = ("p", "drop_prob", "attention_dropout", "dropout")


def _rate(module: nn.Module) -> float:
    return max((v for v in (getattr(module, a, None) for a in _RATE_ATTRIBUTES) if isinstance(v, float)), default=0.0)


def active_dropout(module: nn.Module) -> list[str]:
    """Dropout, drop-path and stochastic-depth rates within ``module`` (itself included) above zero."""
    return [f"{type(m).__name__}({_rate(m):g})" for m in module.modules() if _rate(m) > 0]


def has_active_dropout(module: nn.Module) -> bool:
    """Whether :func:`active_dropout` finds any; formats nothing, so that it traces where a rate is a
    symbolic float (torch.compile with dynamic=True)."""
    return any(_rate(m) > 0 for m in module.modules())


def train_note(module: nn.Module, zoo: str) -> Optional[str]:
    active = sorted(set(active_dropout(module)))
    return f"runs {zoo}'s forward in training mode ({', '.join(active)} active)" if active else None


# activation classes of the zoos that compute GELU, and their flavour ("none": erf, "tanh")
GELU_FLAVOURS: dict[type, str] = {}


def gelu_approximate(act: nn.Module) -> Optional[str]:
    """"none" / "tanh" for a GELU (nn.GELU or a zoo's GELU class), None for any other activation."""
    return act.approximate if type(act) is nn.GELU else GELU_FLAVOURS.get(type(act))


def layernorm_unfusable(norm: nn.Module, allowed: tuple = (nn.LayerNorm,)) -> Optional[str]:
    if type(norm) not in allowed:
        return f"norm is {type(norm).__name__}, not LayerNorm"
    if len(norm.normalized_shape) != 1:
        return f"LayerNorm over {tuple(norm.normalized_shape)} dims"
    return None


def fused_mlp(x: torch.Tensor, norm: nn.LayerNorm, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear,
              gamma: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """x + gamma * fc2(act(fc1(norm(x)))) in one op."""
    return ops.layernorm_mlp(
        x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias,
        eps=norm.eps, gamma=gamma, approximate=gelu_approximate(act), backend=backend,
    )


class Fused:
    """Mixin of every fused module: which parts to fuse and with which backend."""

    vk_parts: frozenset = ALL_PARTS
    vk_backend: str = "auto"

    def _vk_dropout_scope(self) -> list[nn.Module]:
        """The modules whose active dropout sends a training forward back to the zoo's code."""
        return [self]

    def _vk(self, part: str) -> bool:
        if part not in self.vk_parts:
            return False
        return not (self.training and any(has_active_dropout(m) for m in self._vk_dropout_scope()))
