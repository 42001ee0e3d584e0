"""Hugging Face transformers (v5): the rule table, and the attention function of ViT and DeiT."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from transformers import AttentionInterface
from transformers.models.deit import modeling_deit
from transformers.models.swin import modeling_swin
from transformers.models.swinv2 import modeling_swinv2
from transformers.models.vit import modeling_vit

from .. import ops
from ..nn import transformers as fused
from ..nn._common import train_note
from . import Entry, Rule

AttentionInterface.register(fused.ATTENTION_NAME, fused.vitkernels_attention)
_FUNCTION_ATTENTION = (modeling_vit.ViTAttention, modeling_deit.DeiTAttention)


def _note(module: nn.Module) -> Optional[str]:
    return train_note(module, "transformers")


def _vit_mlp(layer: nn.Module) -> Optional[str]:
    return fused.mlp_unfusable(layer.layernorm_after, layer.mlp)


def _swin_attention(layer: nn.Module) -> Optional[str]:
    return None if type(layer.attention) is modeling_swin.SwinAttention else f"attention is {type(layer.attention).__name__}"


def _swinv2_attention(layer: nn.Module) -> Optional[str]:
    kind = type(layer.attention.self)
    return None if kind is modeling_swinv2.Swinv2SelfAttention else f"attention is {kind.__name__}"


RULES = [
    Rule(modeling_vit.ViTLayer, fused.ViTLayer, {"mlp": _vit_mlp}, _note, ops={"mlp": "layernorm_mlp"}),
    Rule(modeling_deit.DeiTLayer, fused.DeiTLayer, {"mlp": _vit_mlp}, _note, ops={"mlp": "layernorm_mlp"}),
    Rule(modeling_swin.SwinLayer, fused.SwinLayer, {"attention": _swin_attention, "mlp": _vit_mlp}, _note,
         requires={"mlp": "attention"}, ops={"attention": "window_attention", "mlp": "layernorm_mlp"}),
    Rule(modeling_swinv2.Swinv2Layer, fused.Swinv2Layer, {"attention": _swinv2_attention}, _note,
         ops={"attention": "window_attention"}),
]


def apply_functions(model: nn.Module, backend: str, enabled: dict) -> list[Entry]:
    """Selects the "vitkernels" attention function in the config of ViT / DeiT attention modules."""
    entries = []
    for name, module in model.named_modules():
        if type(module) not in _FUNCTION_ATTENTION:
            continue
        kind = type(module).__name__
        if not enabled["attention"]:
            entries.append(Entry(name, kind, "left", "attention: switched off"))
            continue
        if backend != "auto" and backend not in ops.backend_table("attention"):
            entries.append(Entry(name, kind, "left", f"attention: backend {backend!r} has no attention kernel"))
            continue
        config = module.config
        if "vk_backend" in module.__dict__:
            module.vk_backend = backend
            entries.append(Entry(name, kind, "already patched"))
            continue
        if config._attn_implementation != fused.ATTENTION_NAME:  # the config is shared by all layers
            config.vk_previous_attn_implementation = config._attn_implementation
            config._attn_implementation = fused.ATTENTION_NAME
        module.vk_backend = backend
        entries.append(Entry(name, kind, "replaced", "attention function 'vitkernels' (AttentionInterface)"))
    return entries


def revert_functions(model: nn.Module) -> int:
    count = 0
    for module in model.modules():
        if type(module) in _FUNCTION_ATTENTION and "vk_backend" in module.__dict__:
            config = module.config
            if config._attn_implementation == fused.ATTENTION_NAME:
                config._attn_implementation = getattr(config, "vk_previous_attn_implementation", "sdpa")
            del module.__dict__["vk_backend"]
            count += 1
    return count
