"""Plain PyTorch window attention: everything between a Swin block's qkv Linear and its proj Linear.

Mirrors the model zoos step by step (roll, pad, partition, bias, mask, softmax, reverse) so that it
can be read against them; the fused backends reproduce it with index arithmetic instead of copies.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

MASK_VALUE = -100.0  # what every zoo adds to logits across shifted-window regions (not -inf)
LOGIT_SCALE_MAX = math.log(100.0)  # SwinV2 clamps its per-head logit scale here before exp


def relative_position_index(window_h: int, window_w: int, device=None) -> torch.Tensor:
    """[N, N] index into the [(2Wh-1)(2Ww-1), heads] bias table, N = Wh*Ww (row-major tokens)."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_h, device=device), torch.arange(window_w, device=device), indexing="ij")
    ).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + window_h - 1) * (2 * window_w - 1) + (rel[1] + window_w - 1)


def relative_position_bias(bias_table: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
    """[heads, N, N] bias gathered from the [(2Wh-1)(2Ww-1), heads] table."""
    n = window_h * window_w
    index = relative_position_index(window_h, window_w, bias_table.device)
    return bias_table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def shift_regions(size: int, window: int, shift: int, device=None) -> torch.Tensor:
    """Region id (0, 1 or 2) of each row (or column) of the padded, shifted map.

    Tokens of different regions were not neighbours before the cyclic shift; a zero shift makes
    one region, as in every zoo.
    """
    index = torch.arange(size, device=device)
    if shift == 0:
        return torch.zeros_like(index)
    return (index >= size - window).long() + (index >= size - shift).long()


def window_partition(x: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
    """[B, Hp, Wp, D] -> [B * nW, Wh * Ww, D], windows in row-major order."""
    b, hp, wp, d = x.shape
    x = x.view(b, hp // window_h, window_h, wp // window_w, window_w, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b * (hp // window_h) * (wp // window_w), window_h * window_w, d)


def window_reverse(windows: torch.Tensor, batch: int, hp: int, wp: int, window_h: int, window_w: int) -> torch.Tensor:
    """Inverse of window_partition: [B * nW, Wh * Ww, D] -> [B, Hp, Wp, D]."""
    d = windows.shape[-1]
    x = windows.view(batch, hp // window_h, wp // window_w, window_h, window_w, d)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, d)


def shift_mask(
    hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int], device=None, mask_value: float = MASK_VALUE
) -> torch.Tensor:
    """[nW, N, N] additive mask: 0 within a region, ``mask_value`` across regions."""
    rows = shift_regions(hp, window[0], shift[0], device)
    cols = shift_regions(wp, window[1], shift[1], device)
    region = (rows[:, None] * 3 + cols[None, :]).view(1, hp, wp, 1)
    region = window_partition(region, *window).squeeze(-1)
    differs = region[:, None, :] != region[:, :, None]
    return torch.zeros(differs.shape, device=device).masked_fill(differs, mask_value)


def _pad(x: torch.Tensor, pad_h: int, pad_w: int, fill: Optional[torch.Tensor]) -> torch.Tensor:
    """Pad [B, H, W, 3C] at the bottom and right with rows equal to ``fill`` (zeros when None)."""
    padded = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    if fill is None or (pad_h == 0 and pad_w == 0):
        return padded
    h, w = x.shape[1:3]
    outside = torch.ones(padded.shape[1:3], dtype=torch.bool, device=x.device)
    outside[:h, :w] = False
    return torch.where(outside[None, :, :, None], fill.to(padded.dtype), padded)


def window_attention_reference(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: tuple[int, int],
    shift_size: tuple[int, int] = (0, 0),
    bias_table: Optional[torch.Tensor] = None,
    *,
    qkv_bias: Optional[torch.Tensor] = None,
    logit_scale: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    pad_first: bool = False,
    mask_value: float = MASK_VALUE,
    upcast: bool = False,
) -> torch.Tensor:
    """Swin (shifted) window attention on the qkv map.

    Args:
        qkv: [B, H, W, 3*C], the qkv Linear's output on the un-shifted, un-padded map; the last dim
            is ordered (3, heads, head_dim) as timm's.
        num_heads: heads; head_dim = C // num_heads.
        window_size: (Wh, Ww).
        shift_size: (sh, sw), cyclic shift of SW-MSA, 0 <= s < window; a zero disables the shift
            (and its mask) along that dimension.
        bias_table: [(2Wh-1)(2Ww-1), heads] relative position bias table (SwinV2: already
            16 * sigmoid(cpb_mlp(coords))); None for no bias.
        qkv_bias: [3C] the qkv Linear's bias. Padding positions are zero rows *before* that
            Linear in every zoo, so their q, k, v equal this bias (zeros when None); keys of padding
            are attended to, not masked.
        logit_scale: SwinV2 cosine attention when given: [heads] (or any shape with heads elements)
            log-scales, clamped at log(100) then exponentiated; logits are cos(q, k) * scale.
        scale: softmax scale of dot-product attention; head_dim ** -0.5 when None.
        pad_first: False for timm (shift, then pad the shifted map); True for the original Swin,
            Hugging Face and torchvision (pad, then shift the padded map).
        mask_value: added to logits across shifted-window regions: -100 in timm, torchvision, the
            original Swin and Hugging Face Swin; Hugging Face Swinv2 adds its mask twice (-200).
        upcast: compute in float32 (or the input dtype if wider) and cast the result back.

    Returns:
        [B, H, W, C] in qkv's dtype.
    """
    batch, height, width, three_c = qkv.shape
    channels = three_c // 3
    head_dim = channels // num_heads
    out_dtype = qkv.dtype
    if upcast and qkv.dtype in (torch.float16, torch.bfloat16):
        qkv = qkv.float()
    (wh, ww), (sh, sw) = window_size, shift_size
    pad_h, pad_w = (wh - height % wh) % wh, (ww - width % ww) % ww
    fill = None if qkv_bias is None else qkv_bias.to(qkv.dtype)

    if pad_first:
        x = torch.roll(_pad(qkv, pad_h, pad_w, fill), shifts=(-sh, -sw), dims=(1, 2))
    else:
        x = _pad(torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2)), pad_h, pad_w, fill)
    hp, wp = x.shape[1:3]

    windows = window_partition(x, wh, ww)  # [B*nW, N, 3C]
    n = wh * ww
    q, k, v = windows.reshape(windows.shape[0], n, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale.to(qkv.dtype), max=LOGIT_SCALE_MAX).exp().reshape(num_heads, 1, 1)
    else:
        attn = (q * (head_dim**-0.5 if scale is None else scale)) @ k.transpose(-2, -1)
    if bias_table is not None:
        attn = attn + relative_position_bias(bias_table.to(qkv.dtype), wh, ww)
    if sh or sw:
        mask = shift_mask(hp, wp, (wh, ww), (sh, sw), qkv.device, mask_value).to(qkv.dtype)
        attn = (attn.view(batch, mask.shape[0], num_heads, n, n) + mask[None, :, None]).view(attn.shape)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(windows.shape[0], n, channels)

    x = window_reverse(out, batch, hp, wp, wh, ww)
    if pad_first:
        x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))[:, :height, :width]
    else:
        x = torch.roll(x[:, :height, :width], shifts=(sh, sw), dims=(1, 2))
    return x.to(out_dtype).contiguous()
