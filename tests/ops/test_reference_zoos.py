"""The plain PyTorch references against the real model-zoo modules (timm, transformers, torchvision).

Each test builds the zoo's own module with random, non-trivial weights, runs it in fp32 or fp64,
cuts out exactly the span a reference covers, and compares it with the reference evaluated in
float64 on the same weights (relative error under 1e-5, see vitkernels.testing).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from vitkernels.ops.attention.reference import attention_reference
from vitkernels.ops.layernorm_mlp.reference import (
    add_layernorm_reference,
    layernorm_mlp_reference,
    layernorm_reference,
)
from vitkernels.ops.patch_embed.reference import patch_embed_reference
from vitkernels.ops.window_attention.reference import window_attention_reference
from vitkernels.testing import assert_close, errors

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")

from timm.layers import LayerScale, PatchEmbed  # noqa: E402
from timm.layers.attention import Attention as TimmAttention  # noqa: E402
from timm.layers.mlp import Mlp  # noqa: E402
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.swin_transformer import SwinTransformerBlock  # noqa: E402
from timm.models.swin_transformer_v2 import SwinTransformerV2Block  # noqa: E402
from timm.models.vision_transformer import Block as TimmBlock  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402
from torchvision.models import swin_transformer as tv_swin  # noqa: E402
from torchvision.models.vision_transformer import VisionTransformer as TvViT  # noqa: E402
from transformers import SwinConfig, Swinv2Config, ViTConfig  # noqa: E402
from transformers.models.swin.modeling_swin import SwinEmbeddings, SwinLayer  # noqa: E402
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer  # noqa: E402
from transformers.models.vit.modeling_vit import ViTAttention, ViTLayer  # noqa: E402

DTYPES = [torch.float32, torch.float64]


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter random values that exercise it: no zero bias, no all-ones norm weight.

    Matmul/conv weights get unit-gain Gaussian values; everything else (biases, norm weights, bias
    tables, tokens, position embeddings, LayerScale) gets randn * 0.5; SwinV2 log logit scales
    stay around log(10).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "logit_scale":
                value = math.log(10.0) + 0.5 * noise
            elif leaf.endswith("weight") and param.ndim >= 2:
                value = noise * param[0].numel() ** -0.5
            else:
                value = 0.5 * noise
            param.copy_(value.to(param.dtype))
    return module


def build(module: nn.Module, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    return randomize_(module, seed).to(dtype).eval()


def f64(t):
    return None if t is None else t.detach().double()


class Recorder(nn.Module):
    """Stands in for a module; keeps its input and passes it on unchanged."""

    def forward(self, x, *args, **kwargs):
        self.value = x
        return x


class Constant(nn.Module):
    """Stands in for a module; ignores its input and returns a fixed tensor."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value


def check(actual: torch.Tensor, reference64: torch.Tensor, name: str) -> None:
    assert reference64.dtype == torch.float64
    assert_close(actual, reference64, name=name)


# --------------------------------------------------------------------------- window attention


# (H, W, window, shift, batch, heads, qkv_bias)
TIMM_SWIN_CASES = {
    "unshifted": (14, 14, (7, 7), (0, 0), 1, 2, True),
    "shifted": (14, 14, (7, 7), (3, 3), 3, 4, True),
    "padded": (9, 11, (7, 7), (0, 0), 2, 2, True),
    "padded_shifted": (9, 11, (7, 7), (3, 3), 3, 2, True),
    "padded_shifted_no_qkv_bias": (9, 11, (7, 7), (3, 3), 1, 2, False),
    "non_square": (10, 13, (4, 6), (2, 3), 2, 4, True),
}


def _timm_swin_attn_span(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """block._attn with the proj Linear taken out: everything from qkv to proj's input."""
    block.attn.proj = nn.Identity()
    block.attn.proj_drop = nn.Identity()
    with torch.no_grad():
        return block._attn(x)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dynamic_mask", [False, True], ids=["static_mask", "dynamic_mask"])
@pytest.mark.parametrize("case", list(TIMM_SWIN_CASES))
def test_timm_swin_window_attention(case, dynamic_mask, dtype):
    h, w, window, shift, batch, heads, qkv_bias = TIMM_SWIN_CASES[case]
    dim = 8 * heads
    # input_resolution equal to the real map keeps timm from shrinking the window; the static mask
    # is then built on the map rounded up to window multiples, as _attn pads it.
    block = SwinTransformerBlock(
        dim, (h, w), num_heads=heads, window_size=window, shift_size=shift,
        dynamic_mask=dynamic_mask, qkv_bias=qkv_bias,
    )
    build(block, dtype)
    assert block.window_size == window and block.shift_size == shift
    x = torch.randn(batch, h, w, dim, dtype=dtype)
    qkv = block.attn.qkv
    expected = window_attention_reference(
        F.linear(f64(x), f64(qkv.weight), f64(qkv.bias)), heads, window, shift,
        f64(block.attn.relative_position_bias_table), qkv_bias=f64(qkv.bias), pad_first=False,
    )
    check(_timm_swin_attn_span(block, x), expected, f"timm swin {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_timm_swin_window_attention_fused_sdpa_path(dtype):
    h, w, window, shift, batch, heads, _ = TIMM_SWIN_CASES["padded_shifted"]
    block = build(SwinTransformerBlock(16, (h, w), num_heads=heads, window_size=window, shift_size=shift), dtype)
    block.attn.fused_attn = True  # what TIMM_FUSED_ATTN=2 selects
    x = torch.randn(batch, h, w, 16, dtype=dtype)
    qkv = block.attn.qkv
    expected = window_attention_reference(
        F.linear(f64(x), f64(qkv.weight), f64(qkv.bias)), heads, window, shift,
        f64(block.attn.relative_position_bias_table), qkv_bias=f64(qkv.bias), pad_first=False,
    )
    check(_timm_swin_attn_span(block, x), expected, "timm swin fused")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_timm_swin_window_clamped_to_small_map(dtype):
    # A map no taller than the window: timm uses the height as the window there and drops that
    # dimension's shift; the reference is handed the block's resolved window and shift.
    block = build(SwinTransformerBlock(16, (5, 11), num_heads=2, window_size=7, shift_size=3), dtype)
    assert block.window_size == (5, 7) and block.shift_size == (0, 3)
    x = torch.randn(2, 5, 11, 16, dtype=dtype)
    qkv = block.attn.qkv
    expected = window_attention_reference(
        F.linear(f64(x), f64(qkv.weight), f64(qkv.bias)), 2, block.window_size, block.shift_size,
        f64(block.attn.relative_position_bias_table), qkv_bias=f64(qkv.bias), pad_first=False,
    )
    check(_timm_swin_attn_span(block, x), expected, "timm swin clamped")


def _timm_v2_bias_table(attn64: nn.Module) -> torch.Tensor:
    """16 * sigmoid(cpb_mlp(coords)) as [(2Wh-1)(2Ww-1), heads], from an fp64 copy of the module."""
    with torch.no_grad():
        table = attn64.cpb_mlp(attn64.relative_coords_table).view(-1, attn64.num_heads)
    return 16 * torch.sigmoid(table)


# (H, W, window, shift, batch, heads)
TIMM_SWINV2_CASES = {
    "unshifted": (8, 8, (4, 4), (0, 0), 2, 2),
    "shifted": (8, 8, (4, 4), (2, 2), 2, 4),
    "padded_shifted": (9, 11, (4, 4), (2, 2), 3, 2),
    "non_square_padded_shifted": (10, 13, (4, 6), (2, 3), 1, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TIMM_SWINV2_CASES))
def test_timm_swinv2_window_attention(case, dtype):
    h, w, window, shift, batch, heads = TIMM_SWINV2_CASES[case]
    dim = 8 * heads
    block = SwinTransformerV2Block(dim, (h, w), num_heads=heads, window_size=window, shift_size=shift)
    build(block, dtype)
    with torch.no_grad():  # one head above log(100) exercises the clamp
        block.attn.logit_scale[0] = math.log(150.0)
    assert block.window_size == window and block.shift_size == shift
    attn64 = copy.deepcopy(block.attn).double()
    qkv_bias = torch.cat((attn64.q_bias, attn64.k_bias, attn64.v_bias)).detach()  # k part is zeros
    x = torch.randn(batch, h, w, dim, dtype=dtype)
    expected = window_attention_reference(
        F.linear(f64(x), attn64.qkv.weight.detach(), qkv_bias), heads, window, shift,
        _timm_v2_bias_table(attn64), qkv_bias=qkv_bias, logit_scale=attn64.logit_scale.detach(),
        pad_first=False,
    )
    check(_timm_swin_attn_span(block, x), expected, f"timm swinv2 {case}")


def _hf_swin_config(window: int, heads: int, attn_implementation: str) -> SwinConfig:
    config = SwinConfig(
        image_size=32, patch_size=4, embed_dim=8 * heads, depths=[1], num_heads=[heads],
        window_size=window, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = attn_implementation
    return config


def _hf_swin_attn_span(layer: SwinLayer, x: torch.Tensor) -> torch.Tensor:
    """SwinLayer.forward from the padded, shifted windows to the cropped map, o_proj taken out.

    layernorm_before hands the attention ``x`` while the layer's own input (its shortcut) is zero,
    so layernorm_after receives exactly the attention span, re-shaped to [B, H, W, C].
    """
    batch, h, w, c = x.shape
    layer.attention.o_proj = nn.Identity()
    layer.layernorm_before = Constant(x.reshape(batch, h * w, c))
    layer.layernorm_after = Recorder()
    with torch.no_grad():
        layer(torch.zeros(batch, h * w, c, dtype=x.dtype), (h, w))
    return layer.layernorm_after.value.reshape(batch, h, w, c)


# (H, W, window, shift, batch, heads)
HF_SWIN_CASES = {
    "unshifted": (8, 8, 4, 0, 2, 2),
    "shifted": (8, 8, 4, 2, 2, 4),
    "padded": (10, 9, 4, 0, 1, 2),
    "padded_shifted": (10, 9, 4, 2, 3, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("case", list(HF_SWIN_CASES))
def test_hf_swin_window_attention(case, attn_implementation, dtype):
    h, w, window, shift, batch, heads = HF_SWIN_CASES[case]
    config = _hf_swin_config(window, heads, attn_implementation)
    layer = build(SwinLayer(config, config.embed_dim, (h, w), heads, shift_size=shift), dtype)
    attn = layer.attention
    qkv_weight = torch.cat([f64(attn.q_proj.weight), f64(attn.k_proj.weight), f64(attn.v_proj.weight)])
    qkv_bias = torch.cat([f64(attn.q_proj.bias), f64(attn.k_proj.bias), f64(attn.v_proj.bias)])
    table = f64(attn.relative_position_bias.relative_position_bias_table)
    x = torch.randn(batch, h, w, config.embed_dim, dtype=dtype)
    expected = window_attention_reference(
        F.linear(f64(x), qkv_weight, qkv_bias), heads, (window, window), (shift, shift), table,
        qkv_bias=qkv_bias, pad_first=True,
    )
    check(_hf_swin_attn_span(layer, x), expected, f"HF swin {case} {attn_implementation}")


# (H, W, window, shift, batch, heads)
HF_SWINV2_CASES = {
    "shifted": (8, 8, 4, 2, 2, 2),
    "padded_shifted": (10, 9, 4, 2, 3, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(HF_SWINV2_CASES))
def test_hf_swinv2_window_attention(case, dtype):
    # Swinv2SelfAttention adds the shift mask twice: -200 across regions where timm, torchvision
    # and Hugging Face Swin add -100; the reference mirrors it with mask_value=-200.
    h, w, window, shift, batch, heads = HF_SWINV2_CASES[case]
    config = Swinv2Config(
        image_size=32, patch_size=4, embed_dim=8 * heads, depths=[1], num_heads=[heads],
        window_size=window, qkv_bias=True, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    layer = build(Swinv2Layer(config, config.embed_dim, (h, w), heads, shift_size=shift), dtype)
    assert (layer.window_size, layer.shift_size) == (window, shift)
    attn64 = copy.deepcopy(layer.attention.self).double()
    qkv_weight = torch.cat([attn64.query.weight, attn64.key.weight, attn64.value.weight]).detach()
    qkv_bias = torch.cat([attn64.query.bias, torch.zeros_like(attn64.query.bias), attn64.value.bias]).detach()
    with torch.no_grad():
        table = 16 * torch.sigmoid(attn64.continuous_position_bias_mlp(attn64.relative_coords_table).view(-1, heads))

    # Post-norm block: layernorm_before takes the attention span (after reverse, un-shift, crop).
    layer.attention.output.dense = nn.Identity()
    layer.layernorm_before = Recorder()
    x = torch.randn(batch, h, w, config.embed_dim, dtype=dtype)
    with torch.no_grad():
        layer(x.reshape(batch, h * w, -1), (h, w))
    actual = layer.layernorm_before.value.reshape(x.shape)

    expected = window_attention_reference(
        F.linear(f64(x), qkv_weight, qkv_bias), heads, (window, window), (shift, shift), table,
        qkv_bias=qkv_bias, logit_scale=attn64.logit_scale.detach(), pad_first=True, mask_value=-200.0,
    )
    check(actual, expected, f"HF swinv2 {case}")


def _torchvision_shift(h: int, w: int, window, shift) -> tuple[int, int]:
    """torchvision drops the shift along a dimension whose padded size is at most the window."""
    padded = (math.ceil(h / window[0]) * window[0], math.ceil(w / window[1]) * window[1])
    return tuple(0 if window[i] >= padded[i] else shift[i] for i in range(2))


# (H, W, window, shift, batch, heads)
TORCHVISION_SWIN_CASES = {
    "unshifted": (8, 8, (4, 4), (0, 0), 2, 2),
    "shifted": (8, 8, (4, 4), (2, 2), 2, 4),
    "padded_shifted": (10, 9, (4, 4), (2, 2), 3, 2),
    "non_square_padded_shifted": (10, 13, (4, 6), (2, 3), 1, 2),
    # padded height 7 == window: torchvision zeroes the height shift, keeps the width shift
    "shift_dropped_along_height": (5, 11, (7, 4), (3, 2), 2, 2),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2"])
@pytest.mark.parametrize("case", list(TORCHVISION_SWIN_CASES))
def test_torchvision_shifted_window_attention(case, v2, dtype):
    h, w, window, shift, batch, heads = TORCHVISION_SWIN_CASES[case]
    dim = 8 * heads
    cls = tv_swin.ShiftedWindowAttentionV2 if v2 else tv_swin.ShiftedWindowAttention
    module = build(cls(dim, list(window), list(shift), heads), dtype)
    x = torch.randn(batch, h, w, dim, dtype=dtype)
    with torch.no_grad():
        actual = tv_swin.shifted_window_attention(
            x, module.qkv.weight, torch.eye(dim, dtype=dtype), module.get_relative_position_bias(),
            list(window), heads, list(shift), attention_dropout=0.0, dropout=0.0,
            qkv_bias=module.qkv.bias, proj_bias=None,
            logit_scale=module.logit_scale if v2 else None, training=False,
        )

    module64 = copy.deepcopy(module).double()
    qkv_bias = module64.qkv.bias.detach().clone()
    if v2:
        # the functional zeroes the k third of qkv_bias whenever logit_scale is given
        qkv_bias[dim : 2 * dim] = 0
        with torch.no_grad():
            table = 16 * torch.sigmoid(module64.cpb_mlp(module64.relative_coords_table).view(-1, heads))
        logit_scale = module64.logit_scale.detach()
    else:
        table, logit_scale = module64.relative_position_bias_table.detach(), None
    expected = window_attention_reference(
        F.linear(f64(x), module64.qkv.weight.detach(), qkv_bias), heads, window,
        _torchvision_shift(h, w, window, shift), table,
        qkv_bias=qkv_bias, logit_scale=logit_scale, pad_first=True,
    )
    check(actual, expected, f"torchvision swin {'v2' if v2 else 'v1'} {case}")


# --------------------------------------------------------------------------- global attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "sdpa"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no_mask", "additive_mask"])
def test_timm_attention(with_mask, fused, dtype):
    batch, tokens, dim, heads = 2, 17, 64, 4
    attn = build(TimmAttention(dim, num_heads=heads, qkv_bias=True), dtype)
    attn.fused_attn = fused
    attn.proj = nn.Identity()
    x = torch.randn(batch, tokens, dim, dtype=dtype)
    mask = torch.randn(batch, heads, tokens, tokens, dtype=dtype) if with_mask else None
    with torch.no_grad():
        actual = attn(x, attn_mask=mask)
    expected = attention_reference(
        F.linear(f64(x), f64(attn.qkv.weight), f64(attn.qkv.bias)), heads, bias=f64(mask)
    )
    check(actual, expected, "timm attention")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_hf_vit_attention(attn_implementation, dtype):
    config = ViTConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128, qkv_bias=True)
    config._attn_implementation = attn_implementation
    attn = build(ViTAttention(config), dtype)
    attn.o_proj = nn.Identity()
    x = torch.randn(2, 17, 64, dtype=dtype)
    with torch.no_grad():
        actual, _ = attn(x)
    weight = torch.cat([f64(attn.q_proj.weight), f64(attn.k_proj.weight), f64(attn.v_proj.weight)])
    bias = torch.cat([f64(attn.q_proj.bias), f64(attn.k_proj.bias), f64(attn.v_proj.bias)])
    check(actual, attention_reference(F.linear(f64(x), weight, bias), 4), f"HF ViT attention {attn_implementation}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torchvision_multihead_attention(dtype):
    # nn.MultiheadAttention packs q, k, v rows in in_proj_weight with heads contiguous in each,
    # the same (3, heads, head_dim) layout; an identity out_proj leaves the attention output.
    mha = build(nn.MultiheadAttention(64, 4, batch_first=True), dtype)
    with torch.no_grad():
        mha.out_proj.weight.copy_(torch.eye(64, dtype=dtype))
        mha.out_proj.bias.zero_()
        x = torch.randn(2, 17, 64, dtype=dtype)
        actual, _ = mha(x, x, x, need_weights=False)
    expected = attention_reference(F.linear(f64(x), f64(mha.in_proj_weight), f64(mha.in_proj_bias)), 4)
    check(actual, expected, "torchvision MHA")


# --------------------------------------------------------------------------- LayerNorm + MLP


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("layer_scale", [False, True], ids=["no_ls", "layer_scale"])
def test_timm_block_mlp_half(layer_scale, approximate, dtype):
    dim = 32
    act = nn.GELU if approximate == "none" else (lambda: nn.GELU(approximate="tanh"))
    block = TimmBlock(dim, num_heads=4, mlp_ratio=3.0, init_values=1e-5 if layer_scale else None, act_layer=act)
    build(block, dtype)
    assert isinstance(block.mlp, Mlp) and isinstance(block.ls2, LayerScale if layer_scale else nn.Identity)
    assert block.norm2.eps == 1e-6
    with torch.no_grad():  # a zero attention branch makes Block.forward return x + ls2(mlp(norm2(x)))
        block.attn.proj.weight.zero_()
        block.attn.proj.bias.zero_()
        x = torch.randn(2, 9, dim, dtype=dtype)
        actual = block(x)
    expected = layernorm_mlp_reference(
        f64(x), f64(block.norm2.weight), f64(block.norm2.bias),
        f64(block.mlp.fc1.weight), f64(block.mlp.fc1.bias), f64(block.mlp.fc2.weight), f64(block.mlp.fc2.bias),
        eps=block.norm2.eps, gamma=f64(block.ls2.gamma) if layer_scale else None, approximate=approximate,
    )
    check(actual, expected, "timm block mlp")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "hidden_act,approximate", [("gelu", "none"), ("gelu_pytorch_tanh", "tanh"), ("gelu_new", "tanh")]
)
def test_hf_vit_layer_mlp_half(hidden_act, approximate, dtype):
    config = ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=96, hidden_act=hidden_act)
    config._attn_implementation = "eager"
    layer = build(ViTLayer(config), dtype)
    assert layer.layernorm_after.eps == 1e-12
    with torch.no_grad():
        layer.attention.o_proj.weight.zero_()
        layer.attention.o_proj.bias.zero_()
        x = torch.randn(2, 9, 32, dtype=dtype)
        actual = layer(x)
    expected = layernorm_mlp_reference(
        f64(x), f64(layer.layernorm_after.weight), f64(layer.layernorm_after.bias),
        f64(layer.mlp.fc1.weight), f64(layer.mlp.fc1.bias), f64(layer.mlp.fc2.weight), f64(layer.mlp.fc2.bias),
        eps=1e-12, approximate=approximate,
    )
    check(actual, expected, f"HF ViT mlp {hidden_act}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [1e-6, 1e-5, 1e-12])
def test_layernorm_and_add_layernorm(eps, dtype):
    norm = build(nn.LayerNorm(48, eps=eps), dtype)
    x = torch.randn(3, 7, 48, dtype=dtype)
    residual = torch.randn(3, 7, 48, dtype=dtype)
    with torch.no_grad():
        total = x + residual
        normed = norm(total)
    w, b = f64(norm.weight), f64(norm.bias)
    check(norm(x).detach(), layernorm_reference(f64(x), w, b, eps=eps), "layernorm")
    sum64, normed64 = add_layernorm_reference(f64(x), f64(residual), w, b, eps=eps)
    check(total, sum64, "add_layernorm sum")
    check(normed, normed64, "add_layernorm norm")


# --------------------------------------------------------------------------- patch embedding

TIMM_VIT_CASES = {
    "class_token": dict(),
    "class_and_registers": dict(reg_tokens=4),
    "no_embed_class": dict(no_embed_class=True, reg_tokens=2),
    "no_class_token": dict(class_token=False, global_pool="avg"),
    "dynamic_img_size": dict(dynamic_img_size=True),
    "dynamic_img_size_no_embed_class": dict(dynamic_img_size=True, no_embed_class=True),
    "dynamic_img_pad": dict(dynamic_img_size=True, dynamic_img_pad=True),
}
TIMM_VIT_INPUT = {
    "dynamic_img_size": (40, 48),
    "dynamic_img_size_no_embed_class": (40, 48),
    "dynamic_img_pad": (35, 42),  # padded to 40 x 48
}


def _timm_prefix_tokens(model: nn.Module):
    tokens = [getattr(model, name, None) for name in ("cls_token", "dist_token", "reg_token")]
    tokens = [f64(t).reshape(-1, t.shape[-1]) for t in tokens if t is not None]
    return torch.cat(tokens) if tokens else None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(TIMM_VIT_CASES) + ["deit_distilled"])
def test_timm_vit_patch_and_pos_embed(case, dtype):
    common = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=4, num_classes=10)
    if case == "deit_distilled":
        model = VisionTransformerDistilled(**common)
    else:
        model = TimmViT(**common, **TIMM_VIT_CASES[case])
    build(model, dtype)
    height, width = TIMM_VIT_INPUT.get(case, (32, 32))
    x = torch.randn(2, 3, height, width, dtype=dtype)
    with torch.no_grad():
        actual = model._pos_embed(model.patch_embed(x))
    expected = patch_embed_reference(
        f64(x), f64(model.patch_embed.proj.weight), f64(model.patch_embed.proj.bias),
        prefix_tokens=_timm_prefix_tokens(model), pos_embed=f64(model.pos_embed),
        pos_embed_grid=model.patch_embed.grid_size if model.dynamic_img_size else None,
        dynamic_pad=model.patch_embed.dynamic_img_pad,
    )
    check(actual, expected, f"timm ViT embed {case}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_timm_swin_patch_embed(dtype):
    embed = PatchEmbed(img_size=32, patch_size=4, in_chans=3, embed_dim=24, norm_layer=nn.LayerNorm,
                       output_fmt="NHWC", flatten=False)
    build(embed, dtype)
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        actual = embed(x)
    expected = patch_embed_reference(
        f64(x), f64(embed.proj.weight), f64(embed.proj.bias), norm_weight=f64(embed.norm.weight),
        norm_bias=f64(embed.norm.bias), norm_eps=embed.norm.eps, patch_norm=True, output_format="map",
    )
    check(actual, expected, "timm swin patch embed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torchvision_swin_patch_embed(dtype):
    model = tv_swin.SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2], num_heads=[2], window_size=[4, 4])
    embed = build(model.features[0], dtype)
    conv, norm = embed[0], embed[2]
    x = torch.randn(2, 3, 32, 28, dtype=dtype)
    with torch.no_grad():
        actual = embed(x)
    expected = patch_embed_reference(
        f64(x), f64(conv.weight), f64(conv.bias), norm_weight=f64(norm.weight), norm_bias=f64(norm.bias),
        norm_eps=norm.eps, patch_norm=True, output_format="map",
    )
    check(actual, expected, "torchvision swin patch embed")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("absolute,size", [(True, (32, 32)), (False, (30, 34))], ids=["pos_embed", "padded"])
def test_hf_swin_embeddings(absolute, size, dtype):
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=24, depths=[1], num_heads=[2], window_size=4,
                        use_absolute_embeddings=absolute, hidden_dropout_prob=0.0)
    embeddings = build(SwinEmbeddings(config), dtype)
    x = torch.randn(2, 3, *size, dtype=dtype)
    with torch.no_grad():
        actual, _ = embeddings(x)
    conv, norm = embeddings.patch_embeddings.projection, embeddings.norm
    expected = patch_embed_reference(
        f64(x), f64(conv.weight), f64(conv.bias), pos_embed=f64(embeddings.position_embeddings),
        norm_weight=f64(norm.weight), norm_bias=f64(norm.bias), norm_eps=norm.eps, patch_norm=True,
        dynamic_pad=True,
    )
    check(actual, expected, "HF swin embeddings")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torchvision_vit_patch_and_pos_embed(dtype):
    model = TvViT(image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=48, mlp_dim=96, num_classes=10)
    build(model, dtype)
    # The encoder adds pos_embedding to [class token, patches] and hands the sum to its layers.
    model.encoder.layers = Recorder()
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    with torch.no_grad():
        model(x)
    expected = patch_embed_reference(
        f64(x), f64(model.conv_proj.weight), f64(model.conv_proj.bias),
        prefix_tokens=f64(model.class_token), pos_embed=f64(model.encoder.pos_embedding),
    )
    check(model.encoder.layers.value, expected, "torchvision ViT embed")


# --------------------------------------------------------------------------- upcast


def test_upcast_brings_fp16_closer_to_fp64():
    torch.manual_seed(0)
    qkv = (torch.randn(2, 65, 3 * 64) * 2).half()
    exact = attention_reference(qkv.double(), 4)
    plain = errors(attention_reference(qkv, 4), exact)
    upcast = errors(attention_reference(qkv, 4, upcast=True), exact)
    assert upcast.max_abs < plain.max_abs and upcast.mean_abs < plain.mean_abs, f"upcast {upcast}; plain {plain}"
