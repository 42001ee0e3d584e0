"""Hugging Face transformers (v5): an attention function for AttentionInterface and fused layers.

ViT and DeiT select their attention function through ``config._attn_implementation``;
``vitkernels_attention`` is registered there under the name "vitkernels". Swin's attention
function sees windows already partitioned, so Swin and Swinv2 layers are replaced as modules
instead: the fused layer runs pad, shift, partition, attention and reverse as one window_attention
call.
As elsewhere, the fused classes add no parameter or buffer to the classes they extend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import activations
from transformers.models.deit import modeling_deit
from transformers.models.swin import modeling_swin
from transformers.models.swinv2 import modeling_swinv2
from transformers.models.vit import modeling_vit
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .. import ops
from ._common import GELU_FLAVOURS, Fused, fused_mlp, gelu_approximate, layernorm_unfusable

ATTENTION_NAME = "vitkernels"

# "gelu" is exact erf GELU; "gelu_pytorch_tanh" and "gelu_new" are the tanh approximation
GELU_FLAVOURS.update({activations.GELUActivation: "none", activations.GELUTanh: "tanh",
                      activations.NewGELUActivation: "tanh"})


def vitkernels_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                         dropout: float = 0.0, **kwargs):
    """AttentionInterface function: q, k, v [B, heads, N, D] -> ([B, N, heads, D], None).

    Runs ops.attention with the backend ``vitkernels.apply`` set on the module; with attention
    dropout in training it runs transformers' sdpa function instead.
    """
    if dropout > 0:
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                              dropout=dropout, **kwargs)
    batch, heads, tokens, head_dim = query.shape
    qkv = torch.stack((query, key, value), dim=2).permute(0, 3, 2, 1, 4).reshape(batch, tokens, 3 * heads * head_dim)
    out = ops.attention(qkv, heads, bias=attention_mask, scale=scaling, backend=getattr(module, "vk_backend", "auto"))
    return out.view(batch, tokens, heads, head_dim), None


def mlp_unfusable(norm: nn.Module, mlp: nn.Module) -> Optional[str]:
    """Why layernorm_after -> fc1 -> activation -> fc2 cannot be one layernorm_mlp call, or None."""
    return layernorm_unfusable(norm) or (
        None if gelu_approximate(mlp.activation_fn) is not None
        else f"activation is {type(mlp.activation_fn).__name__}, not GELU")


def _mlp(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    mlp = layer.mlp
    return fused_mlp(x, layer.layernorm_after, mlp.fc1, mlp.activation_fn, mlp.fc2, None, layer.vk_backend)


class _ViTLikeLayer(Fused):
    """ViT / DeiT layer with layernorm_after + MLP + residual fused (attention goes through AttentionInterface)."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        if not self._vk("mlp"):
            return super().forward(hidden_states, attention_mask, **kwargs)
        attended, _ = self.attention(self.layernorm_before(hidden_states), attention_mask, **kwargs)
        return _mlp(self, self.dropout(attended) + hidden_states)


class ViTLayer(_ViTLikeLayer, modeling_vit.ViTLayer):
    pass


class DeiTLayer(_ViTLikeLayer, modeling_deit.DeiTLayer):
    pass


class SwinLayer(Fused, modeling_swin.SwinLayer):
    """Swin layer: pad-then-shift window attention and layernorm_after + MLP fused."""

    def _attention(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        attn = self.attention
        qkv_bias = None
        if attn.q_proj.bias is not None:
            qkv_bias = torch.cat((attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias))
        weight = torch.cat((attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight))
        qkv = F.linear(x.view(x.shape[0], height, width, -1), weight, qkv_bias)
        out = ops.window_attention(
            qkv, attn.num_attention_heads, self.window_size, self.shift_size,
            attn.relative_position_bias.relative_position_bias_table, qkv_bias=qkv_bias, scale=attn.scaling,
            pad_first=True, backend=self.vk_backend,
        )
        return attn.o_proj(out).view(x.shape)

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                **kwargs):
        """The MLP is fused only together with the attention (the unfused span is one HF forward)."""
        if not self._vk("attention") or kwargs.get("output_attentions"):
            return super().forward(hidden_states, input_dimensions, always_partition=always_partition, **kwargs)
        if not always_partition:
            self.set_shift_and_window_size(input_dimensions)
        attended = self._attention(self.layernorm_before(hidden_states), *input_dimensions)
        hidden_states = hidden_states + self.drop_path(self.dropout(attended))
        if self._vk("mlp"):
            return _mlp(self, hidden_states), None
        return hidden_states + self.dropout(self.mlp(self.layernorm_after(hidden_states))), None


# Swinv2SelfAttention adds its shift mask twice
SWINV2_MASK_VALUE = -200.0


class Swinv2Layer(Fused, modeling_swinv2.Swinv2Layer):
    """Swinv2 layer with the cosine window attention fused (its post-norm MLP is left as is)."""

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], output_attentions=False):
        if not self._vk("attention") or output_attentions:
            return super().forward(hidden_states, input_dimensions, output_attentions=output_attentions)
        attn = self.attention.self
        qkv_bias = None
        if attn.query.bias is not None:
            qkv_bias = torch.cat((attn.query.bias, torch.zeros_like(attn.query.bias), attn.value.bias))
        weight = torch.cat((attn.query.weight, attn.key.weight, attn.value.weight))
        qkv = F.linear(hidden_states.view(hidden_states.shape[0], *input_dimensions, -1), weight, qkv_bias)
        table = 16 * torch.sigmoid(attn.continuous_position_bias_mlp(attn.relative_coords_table).view(
            -1, attn.num_attention_heads))
        out = ops.window_attention(
            qkv, attn.num_attention_heads, self.window_size, self.shift_size, table, qkv_bias=qkv_bias,
            logit_scale=attn.logit_scale.flatten(), pad_first=True, mask_value=SWINV2_MASK_VALUE,
            backend=self.vk_backend,
        )
        attended = self.attention.output(out, None).view(hidden_states.shape)
        hidden_states = hidden_states + self.drop_path(self.layernorm_before(attended))
        layer_output = self.output(self.intermediate(hidden_states))
        return (hidden_states + self.drop_path(self.layernorm_after(layer_output)),)
