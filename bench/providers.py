"""What a user runs instead of vitkernels: the providers each op is compared with.

Each provider builds, for one op and shape, a function of the case's inputs (bench/cases.py) that
returns the op's output. The window-attention spans run from the qkv map to the map before proj
(roll, partition, attention, reverse, un-roll); the zoo modules get identity qkv and proj layers
so that the same span is timed.

* ``eager``: the zoo as it ships. Window attention: timm's ``WindowAttention`` (``fused_attn``
  off) between timm's roll and partition steps; attention: timm's ``Attention`` (``fused_attn``
  off); LayerNorm+MLP: ``nn.LayerNorm`` and timm's ``Mlp``; LayerNorm: ``nn.LayerNorm``. Where no
  zoo module holds exactly the op (SwinV2 windows, whose module applies its qkv projection inside
  forward; add+LayerNorm; patch embedding) the op's plain-PyTorch reference, which mirrors the zoo
  step by step.
* ``eager-sdpa``: the same timm modules with ``fused_attn`` on (F.scaled_dot_product_attention,
  the window bias and shift mask passed as ``attn_mask``).
* ``sdpa``: F.scaled_dot_product_attention called directly: over all tokens, or over the
  partitioned windows with the gathered bias (plus the shift mask) as an ``attn_mask``
  broadcast over the images (timm's fused path instead materializes it per window).
* ``flex``: FlexAttention (torch.nn.attention.flex_attention) with torch.compile: a ``score_mod``
  adding the relative-position bias read from the table at the computed index, and for shifted
  windows a block mask whose ``mask_mod`` compares region ids (the zoos add -100 instead of
  masking; the difference, e^-100, is below every tolerance). SwinV2's cosine logits are formed
  by normalizing q and k and folding the per-head scale into q. (With torch 2.14 on CPU the
  compiled cosine span comes out wrong while FlexAttention's eager path is right; the check
  before timing catches it and the case is skipped.)
* ``compile`` / ``compile-max-autotune``: torch.compile of the ``eager`` function (max-autotune
  on GPU only).

torchvision's and Hugging Face's attention code keeps its projections inside the span
(torchvision's ``shifted_window_attention`` takes the qkv and proj weights, Hugging Face Swin has
separate q, k, v Linears), so their spans cannot be timed alone; whole models of both zoos are
timed by ``python -m vitkernels bench --zoo torchvision|transformers``.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

import cases
import shapes
from vitkernels.ops.layernorm_mlp.reference import add_layernorm_reference
from vitkernels.ops.patch_embed.reference import patch_embed_reference
from vitkernels.ops.window_attention.reference import (
    LOGIT_SCALE_MAX, relative_position_bias, shift_mask, shift_regions, window_partition, window_reverse,
    window_attention_reference)

Fn = Callable[[cases.Inputs], object]
NAMES = ("eager", "eager-sdpa", "sdpa", "flex", "compile", "compile-max-autotune")
ATTENTION_OPS = {"window_attention", "attention"}


class Unsupported(Exception):
    """The provider cannot run this op or shape; the message says why."""


def skip_reason(name: str, op: str, device: str) -> Optional[str]:
    """Why provider ``name`` is not benchmarked for ``op`` on ``device``, or None."""
    if name in ("eager-sdpa", "sdpa", "flex") and op not in ATTENTION_OPS:
        return f"{name} is an attention provider; {op} is not attention"
    if name == "compile-max-autotune" and device != "cuda":
        return "max-autotune tunes GPU kernels; on CPU it is the default mode"
    if name == "flex":
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as err:
            return f"FlexAttention unavailable in torch {torch.__version__}: {err}"
    return None


# --- window attention spans ---------------------------------------------------------------------

def _windows(qkv: torch.Tensor, shape: shapes.WindowAttentionShape) -> torch.Tensor:
    """timm's steps before attention: roll by -shift, partition into [B * nW, N, 3C] (maps are whole windows)."""
    w, s = shape.window, shape.shift
    x = torch.roll(qkv, shifts=(-s, -s), dims=(1, 2)) if s else qkv
    return window_partition(x, w, w)


def _unwindows(out: torch.Tensor, shape: shapes.WindowAttentionShape) -> torch.Tensor:
    """[B * nW, N, C] back to the un-rolled map [B, H, W, C]."""
    x = window_reverse(out, shape.batch, shape.height, shape.width, shape.window, shape.window)
    return torch.roll(x, shifts=(shape.shift, shape.shift), dims=(1, 2)) if shape.shift else x


def _check_whole_windows(shape: shapes.WindowAttentionShape) -> None:
    if shape.height % shape.window or shape.width % shape.window:
        raise Unsupported(f"{shape.name}: the map {shape.height}x{shape.width} is not whole windows of "
                          f"{shape.window}; the benchmark spans do not pad")


def _mask(shape: shapes.WindowAttentionShape, device, dtype) -> Optional[torch.Tensor]:
    """The [nW, N, N] shift mask (-100 across regions) or None, as timm builds it once per block."""
    if not shape.shift:
        return None
    return shift_mask(shape.height, shape.width, (shape.window,) * 2, (shape.shift,) * 2, device).to(dtype)


def _scaled_q_k_v(windows: torch.Tensor, heads: int, logit_scale: Optional[torch.Tensor]):
    """q, k, v [B * nW, heads, N, d] and the softmax scale to pass (None: the default head_dim ** -0.5).

    Cosine attention normalizes q and k and folds exp(clamped logit_scale) per head into q (scale 1).
    """
    n = windows.shape[1]
    q, k, v = windows.reshape(windows.shape[0], n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    if logit_scale is None:
        return q, k, v, None
    per_head = torch.clamp(logit_scale, max=LOGIT_SCALE_MAX).exp().reshape(heads, 1, 1)
    return F.normalize(q, dim=-1) * per_head, F.normalize(k, dim=-1), v, 1.0


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def _timm_window_attention(shape: shapes.WindowAttentionShape, device, dtype, fused: bool) -> Fn:
    if shape.cosine:
        if fused:
            raise Unsupported("timm's SwinV2 WindowAttention applies its qkv projection inside forward; "
                              "its span cannot be isolated")
        return lambda t: window_attention_reference(t["qkv"], shape.heads, (shape.window,) * 2, (shape.shift,) * 2,
                                                    t["bias_table"], logit_scale=t["logit_scale"])
    from timm.models.swin_transformer import WindowAttention

    module = WindowAttention(shape.dim, shape.heads, window_size=shape.window).to(device, dtype).eval()
    module.qkv, module.proj, module.fused_attn = torch.nn.Identity(), torch.nn.Identity(), fused
    mask = _mask(shape, device, dtype)

    def span(t: cases.Inputs) -> torch.Tensor:
        windows = _windows(t["qkv"], shape)
        out = torch.func.functional_call(module, {"relative_position_bias_table": t["bias_table"]}, (windows, mask))
        return _unwindows(out, shape)

    return span


def _sdpa_window_attention(shape: shapes.WindowAttentionShape, device, dtype) -> Fn:
    mask = _mask(shape, device, dtype)
    n, heads = shape.window ** 2, shape.heads

    def span(t: cases.Inputs) -> torch.Tensor:
        q, k, v, scale = _scaled_q_k_v(_windows(t["qkv"], shape), heads, t["logit_scale"])
        bias = relative_position_bias(t["bias_table"], shape.window, shape.window)  # [heads, N, N]
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        else:
            # 4-D, as the fused SDPA kernels want: an image's windows and heads form one axis, and
            # the [nW * heads, N, N] bias plus mask broadcasts over the images.
            per_image = mask.shape[0] * heads
            q, k, v = (x.reshape(shape.batch, per_image, n, -1) for x in (q, k, v))
            attn_mask = (bias + mask[:, None]).reshape(per_image, n, n)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
            out = out.reshape(-1, heads, n, out.shape[-1])
        return _unwindows(_merge_heads(out), shape)

    return span


def _flex_window_attention(shape: shapes.WindowAttentionShape, device, dtype) -> Fn:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    w, heads = shape.window, shape.heads
    block_mask = None
    if shape.shift:
        rows = shift_regions(shape.height, w, shape.shift, device)
        cols = shift_regions(shape.width, w, shape.shift, device)
        region = (rows[:, None] * 3 + cols[None, :]).view(1, shape.height, shape.width, 1)
        region = window_partition(region, w, w).squeeze(-1)  # [nW, N]
        windows_per_image = region.shape[0]

        def same_region(b, h, q_idx, kv_idx):
            window = b % windows_per_image
            return region[window, q_idx] == region[window, kv_idx]

        block_mask = create_block_mask(same_region, shape.batch * windows_per_image, None, w * w, w * w,
                                       device=device)

    def span(t: cases.Inputs) -> torch.Tensor:
        table = t["bias_table"]
        q, k, v, scale = _scaled_q_k_v(_windows(t["qkv"], shape), heads, t["logit_scale"])

        def add_bias(score, b, h, q_idx, kv_idx):
            dy = q_idx // w - kv_idx // w + (w - 1)
            dx = q_idx % w - kv_idx % w + (w - 1)
            return score + table[dy * (2 * w - 1) + dx, h].to(score.dtype)

        out = flex_attention(q, k, v, score_mod=add_bias, block_mask=block_mask, scale=scale)
        return _unwindows(_merge_heads(out), shape)

    return torch.compile(span, dynamic=False)


# --- global attention ---------------------------------------------------------------------------

def _heads(qkv: torch.Tensor, heads: int):
    b, n, _ = qkv.shape
    return qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _timm_attention(shape: shapes.AttentionShape, device, dtype, fused: bool) -> Fn:
    from timm.layers import Attention

    module = Attention(shape.dim, shape.heads).to(device, dtype).eval()
    module.qkv, module.proj, module.fused_attn = torch.nn.Identity(), torch.nn.Identity(), fused
    return lambda t: module(t["qkv"])


def _sdpa_attention(shape: shapes.AttentionShape, device, dtype) -> Fn:
    return lambda t: _merge_heads(F.scaled_dot_product_attention(*_heads(t["qkv"], shape.heads)))


def _flex_attention(shape: shapes.AttentionShape, device, dtype) -> Fn:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(lambda t: _merge_heads(flex_attention(*_heads(t["qkv"], shape.heads))), dynamic=False)


# --- token ops and patch embedding ------------------------------------------------------------

def _timm_layernorm_mlp(shape: shapes.TokenShape, device, dtype) -> Fn:
    from timm.layers import Mlp

    norm = torch.nn.LayerNorm(shape.dim, eps=shape.eps).to(device, dtype)
    mlp = Mlp(shape.dim, shape.hidden).to(device, dtype)

    def half_block(t: cases.Inputs) -> torch.Tensor:
        normed = torch.func.functional_call(norm, {"weight": t["ln_weight"], "bias": t["ln_bias"]}, (t["x"],))
        mlp_params = {"fc1.weight": t["fc1_weight"], "fc1.bias": t["fc1_bias"], "fc2.weight": t["fc2_weight"],
                      "fc2.bias": t["fc2_bias"]}
        return t["x"] + torch.func.functional_call(mlp, mlp_params, (normed,))

    return half_block


def _eager(op: str, shape, device, dtype) -> Fn:
    if op == "window_attention":
        return _timm_window_attention(shape, device, dtype, fused=False)
    if op == "attention":
        return _timm_attention(shape, device, dtype, fused=False)
    if op == "layernorm_mlp":
        return _timm_layernorm_mlp(shape, device, dtype)
    if op == "layernorm":
        norm = torch.nn.LayerNorm(shape.dim, eps=shape.eps).to(device, dtype)
        return lambda t: torch.func.functional_call(norm, {"weight": t["weight"], "bias": t["bias"]}, (t["x"],))
    if op == "add_layernorm":
        return lambda t: add_layernorm_reference(t["x"], t["residual"], t["weight"], t["bias"], eps=shape.eps)
    if op == "patch_embed":
        return lambda t: patch_embed_reference(
            t["image"], t["weight"], t["bias"], prefix_tokens=t["prefix_tokens"], pos_embed=t["pos_embed"],
            patch_norm=shape.patch_norm, norm_weight=t["norm_weight"], norm_bias=t["norm_bias"],
            mean=t["mean"], std=t["std"], output_format=shape.output_format)
    raise Unsupported(f"no eager provider for {op}")


def _attention_provider(op: str, shape, device, dtype, window_fn, global_fn) -> Fn:
    if op == "window_attention":
        _check_whole_windows(shape)
        return window_fn(shape, device, dtype)
    return global_fn(shape, device, dtype)


def _compiled(op: str, shape, device, dtype, mode: Optional[str]) -> Fn:
    eager = _eager(op, shape, device, dtype)
    return torch.compile(eager, mode=mode, dynamic=False)


BUILDERS = {
    "eager": _eager,
    "eager-sdpa": lambda op, shape, device, dtype: _attention_provider(
        op, shape, device, dtype, lambda *a: _timm_window_attention(*a, fused=True),
        lambda *a: _timm_attention(*a, fused=True)),
    "sdpa": lambda op, shape, device, dtype: _attention_provider(
        op, shape, device, dtype, _sdpa_window_attention, _sdpa_attention),
    "flex": lambda op, shape, device, dtype: _attention_provider(
        op, shape, device, dtype, _flex_window_attention, _flex_attention),
    "compile": lambda op, shape, device, dtype: _compiled(op, shape, device, dtype, None),
    "compile-max-autotune": lambda op, shape, device, dtype: _compiled(op, shape, device, dtype, "max-autotune"),
}
assert set(BUILDERS) == set(NAMES)


_EAGER = {
    "window_attention": "timm WindowAttention, fused_attn off, between timm's roll and partition",
    "attention": "timm Attention, fused_attn off",
    "layernorm_mlp": "nn.LayerNorm and timm Mlp: x + mlp(norm(x))",
    "layernorm": "nn.LayerNorm",
    "add_layernorm": "plain PyTorch (x + residual, then F.layer_norm)",
    "patch_embed": "plain PyTorch reference (a uint8 image scaled and normalized first; conv, flatten, prefix "
                   "tokens, position embedding, norm)",
}


def describe(name: str, op: str, shape) -> str:
    """What provider ``name`` runs for ``op`` at ``shape``, in words (recorded with each result)."""
    eager = _EAGER.get(op, "the op's reference")
    if op == "window_attention" and getattr(shape, "cosine", False):
        eager = "plain PyTorch reference of timm's SwinV2 span"
    return {
        "eager": eager,
        "eager-sdpa": eager.replace("fused_attn off", "fused_attn on (F.scaled_dot_product_attention)"),
        "sdpa": "F.scaled_dot_product_attention" + (" over the windows, bias and mask as attn_mask"
                                                    if op == "window_attention" else ""),
        "flex": "torch.compile of FlexAttention" + (" (score_mod: relative-position bias; block mask: shift regions)"
                                                    if op == "window_attention" else ""),
        "compile": f"torch.compile of: {eager}",
        "compile-max-autotune": f"torch.compile(mode='max-autotune') of: {eager}",
    }.get(name, name)


def build(name: str, op: str, shape, device, dtype) -> Fn:
    """The function of provider ``name`` for ``op`` at ``shape``; raises Unsupported when it cannot run."""
    if name not in BUILDERS:
        raise ValueError(f"unknown provider {name!r}; expected one of {NAMES}")
    if name in ("flex", "compile", "compile-max-autotune"):
        torch._dynamo.reset()  # one compiled span per benchmark: never hit the recompile limit
    return BUILDERS[name](op, shape, device, dtype)
