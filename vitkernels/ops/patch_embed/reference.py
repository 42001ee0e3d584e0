"""Plain PyTorch patch embedding: conv (kernel = stride = patch), norm, prefix tokens, position embedding.

Mirrors timm's PatchEmbed followed by VisionTransformer._pos_embed, and Swin's PatchEmbed with its
patch norm and NHWC output.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: Sequence[int], old_grid: Sequence[int], num_prefix: int
) -> torch.Tensor:
    """Resample a [1, num_prefix + Gh*Gw, E] table to another grid as timm's dynamic_img_size does.

    Prefix entries are kept; the grid part is resized bicubically with antialiasing in float32.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def patch_embed_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    prefix_tokens: Optional[torch.Tensor] = None,
    pos_embed: Optional[torch.Tensor] = None,
    pos_embed_grid: Optional[Sequence[int]] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
    patch_norm: bool = False,
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    dynamic_pad: bool = False,
    output_format: str = "tokens",
    upcast: bool = False,
) -> torch.Tensor:
    """Image to tokens.

    Args:
        x: [B, Cin, H, W] float image, or uint8 image (scaled by 1/255) when ``mean``/``std`` fold
            the preprocessing in.
        weight: [E, Cin, ph, pw] conv weight, kernel = stride = (ph, pw); bias: [E] or None.
        prefix_tokens: [P, E] (or [1, P, E]) class, distillation and register tokens in timm's
            order, written before the patch tokens; None for none.
        pos_embed: [1, L, E] (or [L, E]); L = P + N adds it after the prefix concat (timm's
            default), L = N adds it to the patches only (timm's no_embed_class).
        pos_embed_grid: the (Gh, Gw) grid pos_embed was made for; when it differs from the input's
            grid the table is resampled as timm's dynamic_img_size (bicubic, antialias).
        patch_norm: apply LayerNorm(norm_weight, norm_bias, norm_eps) over E after the conv (Swin).
        mean, std: [Cin] per-channel normalization applied before the conv, (x - mean) / std.
        dynamic_pad: pad H and W at the bottom/right to patch multiples (timm's dynamic_img_pad);
            otherwise they must divide.
        output_format: "tokens" for [B, P + N, E], "map" for [B, H', W', E] (no prefix tokens).
        upcast: compute in float32 for fp16/bf16 and cast back.

    Returns:
        [B, P + N, E] or [B, H', W', E], in the weight's dtype.
    """
    out_dtype = weight.dtype
    dtype = torch.float32 if upcast and out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    img = x.to(dtype)
    if x.dtype == torch.uint8:
        img = img / 255.0
    if mean is not None:
        img = img - mean.to(dtype).view(1, -1, 1, 1)
    if std is not None:
        img = img / std.to(dtype).view(1, -1, 1, 1)
    ph, pw = weight.shape[-2:]
    if dynamic_pad:
        img = F.pad(img, (0, (pw - img.shape[-1] % pw) % pw, 0, (ph - img.shape[-2] % ph) % ph))
    bias_c = None if bias is None else bias.to(dtype)
    y = F.conv2d(img, weight.to(dtype), bias_c, stride=(ph, pw))  # [B, E, H', W']
    batch, dim, gh, gw = y.shape
    y = y.permute(0, 2, 3, 1)  # [B, H', W', E]
    if patch_norm:
        nw = None if norm_weight is None else norm_weight.to(dtype)
        nb = None if norm_bias is None else norm_bias.to(dtype)
        y = F.layer_norm(y, (dim,), nw, nb, norm_eps)
    y = y.reshape(batch, gh * gw, dim)

    if pos_embed is not None:
        pos = pos_embed.reshape(1, -1, dim).to(dtype)
        covers_prefix = pos.shape[1] - (gh * gw if pos_embed_grid is None else pos_embed_grid[0] * pos_embed_grid[1])
        if pos_embed_grid is not None:
            pos = resample_pos_embed(pos, (gh, gw), pos_embed_grid, covers_prefix)
    if pos_embed is not None and covers_prefix == 0:
        y = y + pos
    if prefix_tokens is not None:
        prefix = prefix_tokens.reshape(1, -1, dim).to(dtype).expand(batch, -1, -1)
        y = torch.cat([prefix, y], dim=1)
    if pos_embed is not None and covers_prefix:
        y = y + pos
    if output_format == "map":
        y = y.reshape(batch, gh, gw, dim)
    return y.to(out_dtype)
