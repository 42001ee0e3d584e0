"""Triton patch embedding: one implicit-GEMM kernel from the image to the token sequence.

Forward: ``_patch_embed_fwd_kernel`` reads the image [B, Cin, H, W] directly, one patch row per GEMM row
(M = B * Gh * Gw patches, K = Cin * ph * pw, N = E): each A element is gathered from the image,
normalized on load ((x * in_scale - mean) / std folded into one per-channel scale and shift; pixels past
H or W of a dynamically padded image are zero, as the reference pads the normalized image), and
multiplied by the conv weight [E, Cin, ph, pw] seen as [E, K]. A float image without mean or std
(timm's models get normalized images) skips the normalization (``HAS_AFFINE``); where a K block lies
within one input channel (patch area a multiple of BLOCK_K: patches of 8, 16, 32) the block's scale
and shift are one load each, not one per column. By the compiler's report (sm_90, Triton 3.6, ViT-B,
128x128x64 tiles) the loop took 254 instructions a step with the per-column normalization, and takes
94 without one (259 from a uint8 image). The epilogue adds the bias, applies the patch LayerNorm
(Swin; a tile then spans the whole E row), adds the position embedding and stores the row after the
prefix tokens. There is no unfold / im2col copy. The prefix rows ([B, P, E], prefix
token + its position embedding) are written by the host into the same output buffer.

Backward (:func:`patch_embed_bwd`): the pre-norm conv output is recomputed with the same kernel when a
patch norm is present, LN backward is the Triton kernel of layernorm_mlp, and the weight and image
gradients are torch convolution-backward calls (the GEMMs); those need the normalized image, which
backward builds in torch.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ... import aot
from .._triton import autotune_by_depth, dot, gemm_config, grouped_tile
from ..layernorm_mlp.triton_kernels import layernorm_bwd
from .reference import resample_pos_embed


def _configs() -> list:
    return [gemm_config(128, 128, 64, 8, 3), gemm_config(128, 64, 64, 4, 3), gemm_config(128, 128, 32, 8, 3),
            gemm_config(64, 64, 32, 4, 3)]


@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0,
                    "PADDED": lambda args: args["H"] % args["PATCH_H"] != 0 or args["W"] % args["PATCH_W"] != 0})
@triton.jit
def _patch_embed_fwd_kernel(x_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr, pos_ptr, norm_w_ptr, norm_b_ptr, out_ptr,
                            M, N, K, C_in, H, W, grid_w, patches, num_prefix, pos_start, eps,
                            PATCH_H: tl.constexpr, PATCH_W: tl.constexpr, HAS_AFFINE: tl.constexpr,
                            HAS_BIAS: tl.constexpr,
                            HAS_POS: tl.constexpr, PATCH_NORM: tl.constexpr, HAS_NORM_W: tl.constexpr,
                            HAS_NORM_B: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                            PADDED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # x_ptr: [B, C_in, H, W] (float or uint8); w_ptr: [N, K] = [E, C_in * PATCH_H * PATCH_W];
    # bias_ptr, norm_w_ptr, norm_b_ptr: [N]; scale_ptr, shift_ptr: [C_in] fp32 (read with HAS_AFFINE);
    # pos_ptr: [L, N] (row pos_start + p for patch p); out_ptr: [B, num_prefix + patches, N]; M = B * patches.
    # EVEN_K: K is a multiple of BLOCK_K. PADDED: the image is padded to whole patches, whose pixels
    # past H or W are zeros after normalization; without it no A element needs a mask beyond its
    # row (and a row past M or a k past K multiplies nothing that is stored or a zero weight).
    rows, cols = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row_ok = rows < M
    col_ok = cols < N
    image = rows // patches
    patch = rows % patches
    top = (patch // grid_w) * PATCH_H
    left = (patch % grid_w) * PATCH_W
    row_base = image.to(tl.int64) * C_in * H * W + top * W + left
    ks = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = (k < K) | EVEN_K
        channel = k // (PATCH_H * PATCH_W)
        dy = (k // PATCH_W) % PATCH_H
        dx = k % PATCH_W
        mask = row_ok[:, None] & k_ok[None, :]
        if PADDED:
            mask = mask & ((top[:, None] + dy[None, :]) < H) & ((left[:, None] + dx[None, :]) < W)
        pixels = tl.load(x_ptr + row_base[:, None] + (channel * H * W + dy * W + dx)[None, :], mask=mask, other=0)
        if HAS_AFFINE:
            if (PATCH_H * PATCH_W) % BLOCK_K == 0:  # the block lies in one channel
                a = pixels.to(tl.float32) * tl.load(scale_ptr + k0 // (PATCH_H * PATCH_W)) + tl.load(
                    shift_ptr + k0 // (PATCH_H * PATCH_W))
            else:
                scale = tl.load(scale_ptr + channel, mask=k_ok, other=0.0)
                shift = tl.load(shift_ptr + channel, mask=k_ok, other=0.0)
                a = pixels.to(tl.float32) * scale[None, :] + shift[None, :]
            if PADDED:
                a = tl.where(mask, a, 0.0)
            a = a.to(w_ptr.dtype.element_ty)
        else:
            a = pixels.to(w_ptr.dtype.element_ty)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot(a, w, acc, IEEE)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if PATCH_NORM:
        mean = tl.sum(tl.where(col_ok[None, :], acc, 0.0), axis=1) / N
        centered = tl.where(col_ok[None, :], acc - mean[:, None], 0.0)
        acc = centered * tl.math.rsqrt(tl.sum(centered * centered, axis=1) / N + eps)[:, None]
        if HAS_NORM_W:
            acc *= tl.load(norm_w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_NORM_B:
            acc += tl.load(norm_b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_POS:
        pos_rows = (pos_start + patch).to(tl.int64)
        acc += tl.load(pos_ptr + pos_rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    out_rows = image.to(tl.int64) * (num_prefix + patches) + num_prefix + patch
    tl.store(out_ptr + out_rows[:, None] * N + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


_patch_embed_fwd_tuned = autotune_by_depth(_configs(), "w_ptr")(_patch_embed_fwd_kernel)


def _norm_config(dim: int) -> dict:
    """Tile for the patch-norm path: BLOCK_N spans the whole embedding row."""
    block_n = triton.next_power_of_2(dim)
    return {"BLOCK_M": max(16, min(64, 8192 // block_n)), "BLOCK_N": block_n, "BLOCK_K": 32, "GROUP_M": 8,
            "num_warps": 4 if block_n <= 256 else 8, "num_stages": 3}


def _register_aot() -> None:
    base = {"w_ptr": "*bf16:16", "bias_ptr": "*bf16:16", "scale_ptr": "*fp32:16", "shift_ptr": "*fp32:16",
            "pos_ptr": "*bf16:16", "norm_w_ptr": "*bf16:16", "norm_b_ptr": "*bf16:16", "out_ptr": "*bf16:16",
            "M": "i32", "N": "i32:16", "K": "i32:16", "C_in": "i32", "H": "i32:16", "W": "i32:16",
            "grid_w": "i32", "patches": "i32", "num_prefix": "i32", "pos_start": "i32", "eps": "fp32"}
    flags = {"HAS_BIAS": True, "HAS_POS": True, "IEEE": False, "EVEN_K": True, "PADDED": False}
    for image, index, patch in (("bf16", 0, 16), ("bf16", 1, 16), ("u8", 0, 16), ("u8", 0, 14)):
        config = _configs()[index]
        affine = image == "u8"
        aot.register(_patch_embed_fwd_kernel, signature={"x_ptr": f"*{image}:16", **base},
                     constexprs={"PATCH_H": patch, "PATCH_W": patch, "HAS_AFFINE": affine, "PATCH_NORM": False,
                                 "HAS_NORM_W": False, "HAS_NORM_B": False, **flags, **config.kwargs,
                                 "EVEN_K": (3 * patch * patch) % config.kwargs["BLOCK_K"] == 0},
                     num_warps=config.num_warps, num_stages=config.num_stages,
                     name=f"_patch_embed_fwd_kernel[vit p{patch}, {image} image, bf16, config {index}]")
    swin = _norm_config(128)
    aot.register(_patch_embed_fwd_kernel, signature={"x_ptr": "*bf16:16", **base},
                 constexprs={"PATCH_H": 4, "PATCH_W": 4, "HAS_AFFINE": False, "PATCH_NORM": True, "HAS_NORM_W": True,
                             "HAS_NORM_B": True, **flags, **{k: v for k, v in swin.items() if k.isupper()}},
                 num_warps=swin["num_warps"], num_stages=swin["num_stages"],
                 name="_patch_embed_fwd_kernel[swin p4 E<=128, patch norm, bf16]")


_register_aot()


def input_affine(x: torch.Tensor, mean: Optional[torch.Tensor], std: Optional[torch.Tensor]):
    """Per-channel fp32 (scale, shift) with normalized = pixel * scale + shift."""
    channels = x.shape[1]
    scale = torch.full((channels,), 1 / 255 if x.dtype == torch.uint8 else 1.0, device=x.device)
    shift = torch.zeros(channels, device=x.device)
    if mean is not None:
        shift = shift - mean.float()
    if std is not None:
        scale, shift = scale / std.float(), shift / std.float()
    return scale.contiguous(), shift.contiguous()


def kernel_affine(x: torch.Tensor, mean: Optional[torch.Tensor], std: Optional[torch.Tensor],
                  affine: Optional[tuple] = None):
    """:func:`input_affine` (or ``affine``, its result already at hand) as the kernel takes it: (None,
    None) for a float image without mean and std, whose normalization the kernel then skips."""
    if x.is_floating_point() and mean is None and std is None:
        return None, None
    return affine if affine is not None else input_affine(x, mean, std)


def _grid(x: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    ph, pw = weight.shape[-2:]
    return -(-x.shape[-2] // ph), -(-x.shape[-1] // pw)


def conv_fwd(x, weight, bias, scale, shift, out, *, num_prefix=0, pos=None, pos_start=0, norm=None):
    """Writes the patch rows of ``out`` [B, num_prefix + Gh * Gw, E] from the image x [B, Cin, H, W].

    weight: [E, Cin, ph, pw]; bias: [E] or None; scale, shift: [Cin] fp32 input normalization, or
    None for none (a float image);
    pos: [L, E] or None, row pos_start + p added to patch p; norm: (weight [E] or None, bias [E] or
    None, eps) for the patch LayerNorm, or None. Rows before num_prefix are left untouched.
    """
    batch, channels, height, width = x.shape
    dim, _, ph, pw = weight.shape
    grid_h, grid_w = _grid(x, weight)
    patches = grid_h * grid_w
    rows, depth = batch * patches, channels * ph * pw
    if rows == 0:
        return out
    norm_w, norm_b, eps = norm if norm is not None else (None, None, 0.0)
    args = (x, weight, bias, scale, shift, pos, norm_w, norm_b, out, rows, dim, depth, channels, height, width,
            grid_w, patches, num_prefix, pos_start, eps)
    flags = {"PATCH_H": ph, "PATCH_W": pw, "HAS_AFFINE": scale is not None, "HAS_BIAS": bias is not None,
             "HAS_POS": pos is not None,
             "PATCH_NORM": norm is not None, "HAS_NORM_W": norm_w is not None, "HAS_NORM_B": norm_b is not None,
             "IEEE": weight.dtype == torch.float32}
    if norm is None:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(dim, meta["BLOCK_N"]),)

        _patch_embed_fwd_tuned[grid](*args, **flags)
    else:
        config = _norm_config(dim)
        _patch_embed_fwd_kernel[(triton.cdiv(rows, config["BLOCK_M"]),)](*args, **flags, **config)
    return out


def _pos_coverage(pos_embed, pos_embed_grid, grid) -> int:
    """How many prefix tokens pos_embed covers (0: patches only), as the reference derives it."""
    patches = grid[0] * grid[1] if pos_embed_grid is None else pos_embed_grid[0] * pos_embed_grid[1]
    return pos_embed.shape[-2] - patches


def position_table(pos_embed, pos_embed_grid, grid) -> torch.Tensor:
    """pos_embed as a contiguous [L', E] table, resampled to ``grid`` when pos_embed_grid differs."""
    pos = pos_embed.reshape(1, -1, pos_embed.shape[-1])
    if pos_embed_grid is not None:
        pos = resample_pos_embed(pos, grid, pos_embed_grid, _pos_coverage(pos_embed, pos_embed_grid, grid))
    return pos[0].contiguous()


def patch_embed_fwd(x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias, norm_eps,
                    patch_norm, mean, std, output_format):
    """The triton backend of ops.patch_embed (same arguments, all tensors contiguous); see its docstring."""
    dim = weight.shape[0]
    grid = _grid(x, weight)
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[-2]
    out = torch.empty((x.shape[0], num_prefix + grid[0] * grid[1], dim), device=x.device, dtype=weight.dtype)
    pos = None if pos_embed is None else position_table(pos_embed, pos_embed_grid, grid)
    covers_prefix = pos is not None and _pos_coverage(pos_embed, pos_embed_grid, grid) > 0
    if num_prefix:
        prefix = prefix_tokens.reshape(num_prefix, dim)
        out[:, :num_prefix] = prefix + pos[:num_prefix] if covers_prefix else prefix
    scale, shift = kernel_affine(x, mean, std)
    norm = (norm_weight, norm_bias, norm_eps) if patch_norm else None
    conv_fwd(x, weight, bias, scale, shift, out, num_prefix=num_prefix, pos=pos,
             pos_start=num_prefix if covers_prefix else 0, norm=norm)
    return out.view(x.shape[0], *grid, dim) if output_format == "map" else out


def _pos_embed_grad(dtable, pos_embed, pos_embed_grid, grid):
    """Gradient of pos_embed from that of its (resampled) table dtable [L', E].

    The resample is linear in the grid part: its matrix R [N', N] is the reference resample applied to
    an identity basis (one delta image per channel), and the gradient is R^T @ dtable's grid part.
    """
    if pos_embed_grid is None:
        return dtable.reshape(pos_embed.shape)
    covered = _pos_coverage(pos_embed, pos_embed_grid, grid)
    old = pos_embed_grid[0] * pos_embed_grid[1]
    compute = torch.float64 if dtable.dtype == torch.float64 else torch.float32
    basis = torch.eye(old, device=dtable.device, dtype=compute)[None]
    resample = resample_pos_embed(basis, grid, pos_embed_grid, 0)[0]  # [N', N]
    dgrid = resample.t() @ dtable[covered:].to(compute)
    return torch.cat([dtable[:covered].to(compute), dgrid]).to(pos_embed.dtype).reshape(pos_embed.shape)


def _patch_rows(image, ph, pw):
    """[B, C, Gh * ph, Gw * pw] -> [B * Gh * Gw, C * ph * pw]: one row per patch, in the conv weight's
    (C, ph, pw) order. The patches do not overlap (stride = kernel), so the conv is one GEMM on these
    rows, and its backward two: torch's GEMMs keep fp32 in IEEE precision unless the user allows TF32
    for matmuls, where cuDNN's convolutions use TF32 by default."""
    batch, channels, height, width = image.shape
    rows = image.reshape(batch, channels, height // ph, ph, width // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return rows.reshape(-1, channels * ph * pw)


def _image_grads(dz, grid, x, weight, scale, image, mean, std, needs):
    """(dx, dmean, dstd) through the conv and the input normalization; None where not needed."""
    dim, channels, ph, pw = weight.shape
    height, width = x.shape[-2:]
    drows = dz @ weight.reshape(dim, -1)  # [B * Gh * Gw, C * ph * pw]
    dimage = drows.view(x.shape[0], grid[0], grid[1], channels, ph, pw).permute(0, 3, 1, 4, 2, 5)
    dimage = dimage.reshape(x.shape[0], channels, grid[0] * ph, grid[1] * pw)[..., :height, :width].float()
    per_channel = (1, -1, 1, 1)
    dx = (dimage * scale.view(per_channel)).to(x.dtype) if needs[0] else None
    inv_std = 1.0 if std is None else 1.0 / std.float()
    dmean = (-dimage.sum((0, 2, 3)) * inv_std).to(mean.dtype) if needs[7] else None
    dstd = None
    if needs[8]:
        unpadded = image[..., :height, :width].float()
        dstd = (-(dimage * unpadded).sum((0, 2, 3)) * inv_std).to(std.dtype)
    return dx, dmean, dstd


def patch_embed_bwd(dout, x, weight, bias, prefix_tokens, pos_embed, pos_embed_grid, norm_weight, norm_bias,
                    norm_eps, patch_norm, mean, std, needs):
    """Gradients of patch_embed_fwd for dout [B, P + N, E] (or [B, Gh, Gw, E]).

    ``needs``: 9 bools for (x, weight, bias, prefix_tokens, pos_embed, norm_weight, norm_bias, mean, std).
    Returns their gradients in that order, None where not needed. The conv's weight and image
    gradients are torch GEMMs on the normalized (and padded) image's patch rows.
    """
    batch = x.shape[0]
    dim, _, ph, pw = weight.shape
    grid = _grid(x, weight)
    num_prefix = 0 if prefix_tokens is None else prefix_tokens.shape[-2]
    dout = dout.reshape(batch, num_prefix + grid[0] * grid[1], dim)
    grads = [None] * 9
    if needs[3]:
        grads[3] = dout[:, :num_prefix].sum(0).reshape(prefix_tokens.shape)
    if needs[4]:
        covered = _pos_coverage(pos_embed, pos_embed_grid, grid)
        grads[4] = _pos_embed_grad(dout[:, num_prefix - covered:].sum(0), pos_embed, pos_embed_grid, grid)
    dz = dout[:, num_prefix:].reshape(-1, dim).contiguous()
    scale, shift = input_affine(x, mean, std)
    if patch_norm:
        pre_norm = conv_fwd(x, weight, bias, *kernel_affine(x, mean, std, (scale, shift)),
                            dz.new_empty(batch, grid[0] * grid[1], dim))
        affine = needs[5] or needs[6]
        dz, dnw, dnb = layernorm_bwd(dz, None, pre_norm.view(-1, dim), norm_weight, norm_eps, affine)
        grads[5] = dnw.to(norm_weight.dtype) if needs[5] else None
        grads[6] = dnb.to(norm_bias.dtype) if needs[6] else None
    if needs[2]:
        grads[2] = dz.sum(0)
    per_channel = (1, -1, 1, 1)
    image = (x.float() * scale.view(per_channel) + shift.view(per_channel)).to(weight.dtype)
    image = F.pad(image, (0, grid[1] * pw - x.shape[-1], 0, grid[0] * ph - x.shape[-2]))
    if needs[1]:
        grads[1] = (dz.t() @ _patch_rows(image, ph, pw)).view(weight.shape)
    if needs[0] or needs[7] or needs[8]:
        grads[0], grads[7], grads[8] = _image_grads(dz, grid, x, weight, scale, image, mean, std, needs)
    return grads
