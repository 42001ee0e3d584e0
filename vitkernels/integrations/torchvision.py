"""torchvision: the rule table (vit_b_16 family, swin_t and swin_v2_t families)."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from torchvision.models import swin_transformer, vision_transformer

from ..nn import torchvision as fused
from ..nn._common import train_note
from . import Rule


def _note(module: nn.Module) -> Optional[str]:
    return train_note(module, "torchvision")


def _mha(block: nn.Module) -> Optional[str]:
    mha = block.self_attention
    if not (mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_weight is not None):
        return "MultiheadAttention is not batch-first with one packed in_proj"
    if mha.bias_k is not None or mha.add_zero_attn:
        return "MultiheadAttention has bias_k / add_zero_attn"
    return None


SWIN_OPS = {"attention": "window_attention", "mlp": "layernorm_mlp"}

RULES = [
    Rule(swin_transformer.ShiftedWindowAttention, fused.ShiftedWindowAttention,
         {"attention": lambda m: None}, _note, ops=SWIN_OPS),
    Rule(swin_transformer.ShiftedWindowAttentionV2, fused.ShiftedWindowAttentionV2,
         {"attention": lambda m: None}, _note, ops=SWIN_OPS),
    Rule(swin_transformer.SwinTransformerBlock, fused.SwinTransformerBlock,
         {"mlp": lambda b: fused.mlp_unfusable(b.norm2, b.mlp)}, _note, ops=SWIN_OPS),
    Rule(vision_transformer.EncoderBlock, fused.EncoderBlock,
         {"attention": _mha, "mlp": lambda b: fused.mlp_unfusable(b.ln_2, b.mlp)}, _note,
         ops={"mlp": "layernorm_mlp"}),
]
