"""timm: the rule table. ViT, DeiT (distilled too) and MobileViT share vision_transformer.Block."""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.layers import LayerScale
from timm.models import deit, swin_transformer, swin_transformer_v2, vision_transformer

from ..nn import timm as fused
from ..nn._common import train_note
from . import Rule


def _train_note(module: nn.Module) -> Optional[str]:
    return train_note(module, "timm")


def _block_mlp(block: nn.Module) -> Optional[str]:
    if not isinstance(block.ls2, (LayerScale, nn.Identity)):
        return f"ls2 is {type(block.ls2).__name__}"
    return fused.mlp_unfusable(block.norm2, block.mlp)


def _swin_attention(block: nn.Module) -> Optional[str]:
    if type(block.attn) is not swin_transformer.WindowAttention:
        return f"attention is {type(block.attn).__name__}"
    return None


def _swinv2_attention(block: nn.Module) -> Optional[str]:
    if type(block.attn) is not swin_transformer_v2.WindowAttention:
        return f"attention is {type(block.attn).__name__}"
    if block.attn.qkv.bias is not None:
        return "qkv Linear has its own bias"
    return None


def _embedding_note(model: nn.Module) -> Optional[str]:
    return train_note(nn.ModuleList([model.pos_drop, model.patch_embed]), "timm")


SWIN_OPS = {"attention": "window_attention", "mlp": "layernorm_mlp"}

RULES = [
    Rule(vision_transformer.VisionTransformer, fused.VisionTransformer,
         {"patch_embed": fused.patch_embed_unfusable}, _embedding_note),
    Rule(deit.VisionTransformerDistilled, fused.VisionTransformerDistilled,
         {"patch_embed": fused.patch_embed_unfusable}, _embedding_note),
    Rule(vision_transformer.Block, fused.Block,
         {"attention": lambda b: fused.attention_unfusable(b.attn), "mlp": _block_mlp}, _train_note,
         ops={"mlp": "layernorm_mlp"}),
    Rule(swin_transformer.SwinTransformerBlock, fused.SwinTransformerBlock,
         {"attention": _swin_attention, "mlp": lambda b: fused.mlp_unfusable(b.norm2, b.mlp)}, _train_note,
         ops=SWIN_OPS),
    Rule(swin_transformer_v2.SwinTransformerV2Block, fused.SwinTransformerV2Block,
         {"attention": _swinv2_attention}, _train_note, ops=SWIN_OPS),
]
