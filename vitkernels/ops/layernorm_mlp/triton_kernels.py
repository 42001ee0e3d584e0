"""Triton kernels of layernorm, add_layernorm and layernorm_mlp.

Rows are the flattened leading dims: x is [M, C] (contiguous), the MLP hidden width is H.

layernorm_mlp forward, y = x + gamma * fc2(GELU(fc1(LN(x)))):
  1. ``_layernorm_fwd_kernel`` (STORE_Y=False): row statistics mean, rstd [M] in fp32.
  2. ``_mlp_fwd_kernel`` as fc1, LN(x) never going through memory, in one of two ways:
     - fp16 and bf16 (:data:`FOLD_LAYERNORM`): LN folded into the GEMM. With W' = W * ln_w (W's
       dtype), s = the row sums of W' and c = b + W ln_b (fp32, ``_fold_layernorm_kernel``, one pass
       over W), fc1(LN(x)) = rstd * (x W'^T - mean * s) + c: the loop is a plain GEMM of x, and
       the epilogue scales and shifts each row. W's rounding to W' errs as much as the reference's
       rounding of LN(x) does, and s sums the rounded W', so the mean cancels exactly but for fp32
       accumulation.
     - fp32, and FOLD_LAYERNORM off: the x tile is normalized as it is loaded (LN prologue). By
       the compiler's report (sm_90, Triton 3.6, bf16, 128x128x64 tiles, 8 warps) the prologue
       makes the loop 290 instructions a step against the plain GEMM's 82: the warps' issue,
       not the tensor cores, then bounds it.
     Bias and GELU in the epilogue; the hidden activation [M, H] is written once.
  3. ``_mlp_fwd_kernel`` as fc2: bias, LayerScale gamma and the residual x in the epilogue.

layernorm_mlp backward (see :func:`layernorm_mlp_bwd`) saves nothing but the op's inputs and recomputes
LN(x) and the fc1 pre-activation; GELU backward and LN backward (with the residual gradient added) are
Triton kernels, the four big GEMMs are torch matmuls.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ... import aot
from .._triton import autotune_by_depth, dot, gemm_config, grouped_tile, multiprocessors

GELU_MODES = {"none": 1, "tanh": 2}  # 0: no activation
# Module-level constants of a jitted function must be constexprs; keep a tensor on the left of each
# product with them (constexpr * tensor breaks the interpreter).
_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_K = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_TANH_C = tl.constexpr(0.044715)

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# fc1 of fp16 and bf16 inputs with LN folded into its weights (the module docstring); False: the LN
# prologue, as fp32 always takes it.
FOLD_LAYERNORM = True
FOLD_BLOCK_N, FOLD_BLOCK_K = 32, 128  # W rows and columns of a step of _fold_layernorm_kernel


# Elements of the row tiles of the LayerNorm kernels (BLOCK_M rows of BLOCK_N columns): a program
# takes as many rows as fill its tile, so Swin's 96-channel rows go 32 to a forward program (16 to a
# backward one, which holds more per element) instead of one program per 192-byte row, whose
# launches, not the memory, would bound the kernel.
FORWARD_TILE = 4096
BACKWARD_TILE = 2048


def _row_tile(rows: int, channels: int, elements: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a LayerNorm kernel's row tile: whole rows, padded to a power of two."""
    block_n = triton.next_power_of_2(channels)
    return max(1, min(elements // block_n, triton.next_power_of_2(max(rows, 1)))), block_n


def _num_programs(device: torch.device, tiles: int) -> int:
    """Programs for a tile-looping reduction kernel: a few per SM on a GPU, few under the interpreter."""
    if device.type == "cuda":
        return max(1, min(tiles, 4 * multiprocessors(device)))
    return max(1, min(tiles, 4))


def _row_warps(tile: int) -> int:
    """Warps of a LayerNorm kernel whose tile holds ``tile`` elements (16 to 32 per thread from 1024 up)."""
    return 4 if tile <= 1024 else 8


@triton.jit
def _tanh(u):
    # 1 - 2 / (e^{2u} + 1): exact at both tails (e^{2u} overflowing to inf gives 1).
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _gelu(z, MODE: tl.constexpr):
    if MODE == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT_HALF))
    else:
        return 0.5 * z * (1.0 + _tanh((z + z * z * z * _TANH_C) * _TANH_K))


@triton.jit
def _gelu_grad(z, MODE: tl.constexpr):
    if MODE == 1:
        return 0.5 * (1.0 + tl.math.erf(z * _SQRT_HALF)) + z * _INV_SQRT_2PI * tl.exp(-0.5 * z * z)
    else:
        t = _tanh((z + z * z * z * _TANH_C) * _TANH_K)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _TANH_K * (1.0 + z * z * (3.0 * _TANH_C))


@triton.jit
def _layernorm_fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, sum_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps,
                          HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          STORE_Y: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # x_ptr, res_ptr, sum_ptr, y_ptr: [M, N]; w_ptr, b_ptr: [N]; mean_ptr, rstd_ptr: [M] fp32.
    # A program normalizes rows BLOCK_M * pid ... BLOCK_M * pid + BLOCK_M - 1.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None] * N + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        # the sum is rounded to the storage dtype first, as the reference normalizes the stored sum
        s = (x + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32))
        s = s.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + offsets, s, mask=mask)
        x = s.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)
    if STORE_Y:
        y = xc * rstd[:, None]
        if HAS_W:
            y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layernorm_bwd_kernel(dy_ptr, dres_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, db_ptr, M, N, eps, tiles_per_program,
                          HAS_DRES: tl.constexpr, HAS_W: tl.constexpr, COMPUTE_DWB: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dy_ptr, dres_ptr, x_ptr, dx_ptr: [M, N]; w_ptr: [N]; dw_ptr, db_ptr: [programs, N] fp32 partial sums.
    # A program walks tiles_per_program tiles of BLOCK_M rows. The row statistics are recomputed
    # from x (the row is loaded anyway), so forward saves none. Rows past M load as zeros and add
    # nothing to the partial sums.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.where(col_ok, 1.0, 0.0)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tile_start = pid * tiles_per_program
    rows = tile_start.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    for _ in range(tile_start, tl.minimum(tile_start + tiles_per_program, (M + BLOCK_M - 1) // BLOCK_M)):
        mask = (rows < M)[:, None] & col_ok[None, :]
        offsets = rows[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(xc * xc, axis=1) / N + eps)
        xhat = xc * rstd[:, None]
        dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        wdy = dy * w[None, :]
        c1 = tl.sum(xhat * wdy, axis=1) / N
        c2 = tl.sum(wdy, axis=1) / N
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(dres_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DWB:
            dw_acc += tl.sum(dy * xhat, axis=0)
            db_acc += tl.sum(dy, axis=0)
        rows += BLOCK_M
    if COMPUTE_DWB:
        tl.store(dw_ptr + pid * N + cols, dw_acc, mask=col_ok)
        tl.store(db_ptr + pid * N + cols, db_acc, mask=col_ok)


@triton.jit
def _fold_layernorm_kernel(w_ptr, ln_w_ptr, ln_b_ptr, bias_ptr, folded_ptr, colsum_ptr, shift_ptr, N, K,
                           HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, HAS_BIAS: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # w_ptr, folded_ptr: [N, K]; ln_w_ptr, ln_b_ptr: [K]; bias_ptr, colsum_ptr, shift_ptr: [N] (the last two
    # fp32). folded = w * ln_w in w's dtype (stored with HAS_LN_W), colsum = its row sums (of the rounded
    # values), shift = bias + w @ ln_b. A program takes BLOCK_N rows of w.
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    colsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    shift = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        offsets = rows.to(tl.int64)[:, None] * K + k[None, :]
        mask = row_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_LN_W:
            folded = (w * tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :])
            folded = folded.to(folded_ptr.dtype.element_ty)
            tl.store(folded_ptr + offsets, folded, mask=mask)
            colsum += tl.sum(folded.to(tl.float32), axis=1)
        else:
            colsum += tl.sum(w, axis=1)
        if HAS_LN_B:
            shift += tl.sum(w * tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        shift += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(colsum_ptr + rows, colsum, mask=row_ok)
    tl.store(shift_ptr + rows, shift, mask=row_ok)


@triton.jit
def _gelu_bwd_kernel(dz_ptr, z_ptr, numel, MODE: tl.constexpr, BLOCK: tl.constexpr):
    # dz_ptr, z_ptr: [M, H]; dz holds dL/dGELU(z) on entry and dL/dz on exit
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    da = tl.load(dz_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(dz_ptr + offsets, (da * _gelu_grad(z, MODE)).to(dz_ptr.dtype.element_ty), mask=mask)


def _gemm_configs() -> list:
    """The autotuner's tiles. 128x256 (one CTA of two warpgroups per multiprocessor) spreads the LN
    prologue, whose cost grows with the A tile alone, over twice the products: by the compiler's
    report (sm_90, Triton 3.6, bf16) fc1's loop is 8 warps x 315 instructions per 128x256x64 step
    against 8 x 290 per 128x128x64, at 255 registers with no spill in the loop (22 spill
    instructions outside it). That is fc1 with the LN prologue, which fp32 takes; with LN folded,
    fc1's loop is a plain GEMM as fc2's is."""
    return [
        gemm_config(128, 128, 64, 8, 3), gemm_config(128, 64, 64, 4, 4), gemm_config(64, 128, 64, 4, 4),  # 16-bit
        gemm_config(128, 256, 64, 8, 3),
        gemm_config(128, 128, 32, 8, 3), gemm_config(64, 64, 32, 4, 3),  # fp32: half the K depth for shared memory
    ]


@autotune_by_depth(_gemm_configs(), "a_ptr")
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _mlp_fwd_kernel(a_ptr, w_ptr, bias_ptr, mean_ptr, rstd_ptr, ln_w_ptr, ln_b_ptr, colsum_ptr, res_ptr, gamma_ptr,
                    pre_ptr, out_ptr, M, N, K,
                    HAS_BIAS: tl.constexpr, LN_PROLOGUE: tl.constexpr, LN_FOLDED: tl.constexpr,
                    HAS_LN_W: tl.constexpr, HAS_LN_B: tl.constexpr, GELU: tl.constexpr, STORE_PRE: tl.constexpr,
                    RESIDUAL: tl.constexpr, HAS_GAMMA: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # a_ptr: [M, K]; w_ptr: [N, K] (nn.Linear weight); bias_ptr, gamma_ptr: [N]; mean_ptr, rstd_ptr: [M] fp32;
    # ln_w_ptr, ln_b_ptr: [K]; colsum_ptr: [N] fp32; res_ptr, pre_ptr, out_ptr: [M, N].
    # out = epilogue(prologue(a) @ w^T). LN_FOLDED: w is W * ln_w with row sums colsum, and the bias
    # the folded shift (the module docstring), so the epilogue normalizes the rows of the product.
    # EVEN_K: K is a multiple of BLOCK_K (every ViT and Swin width), so no K step needs a mask.
    rows, cols = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * K
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * K
    if LN_PROLOGUE:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        # (a - mean) * rstd as one multiply-add in the 16-bit path; fp32 keeps the subtraction first
        shift = -mean * rstd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = (k < K) | EVEN_K
        a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        if LN_PROLOGUE:
            if IEEE:
                a = (a - mean[:, None]) * rstd[:, None]
            else:
                a = a.to(tl.float32) * rstd[:, None] + shift[:, None]
            if HAS_LN_W:
                a = a * tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_LN_B:
                a = a + tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            a = a.to(w_ptr.dtype.element_ty)
        w = tl.load(w_cols + k[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot(a, w, acc, IEEE)

    if LN_FOLDED:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        colsum = tl.load(colsum_ptr + cols, mask=col_ok, other=0.0)
        acc = acc * rstd[:, None] - (mean * rstd)[:, None] * colsum[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + offsets, acc.to(pre_ptr.dtype.element_ty), mask=mask)
    if GELU != 0:
        acc = _gelu(acc, GELU)
    if HAS_GAMMA:
        acc *= tl.load(gamma_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        acc += tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _register_aot() -> None:
    for dtype in ("bf16", "fp16"):
        ptr = f"*{dtype}:16"
        ln_signature = {"x_ptr": ptr, "res_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "sum_ptr": ptr, "y_ptr": ptr,
                        "mean_ptr": "*fp32:16", "rstd_ptr": "*fp32:16", "M": "i32", "N": "i32:16", "eps": "fp32"}
        # ViT-B's 768 channels, Swin's 96, and the statistics of the widest LayerNorm+MLP rows
        for on, channels, what in ((True, 768, "C=768"), (True, 96, "C=96"), (False, 1536, "statistics only")):
            block_m, block_n = _row_tile(1 << 20, channels, FORWARD_TILE)
            aot.register(_layernorm_fwd_kernel, signature=ln_signature,
                         constexprs={"HAS_RES": on, "HAS_W": on, "HAS_B": on, "STORE_Y": on, "BLOCK_M": block_m,
                                     "BLOCK_N": block_n},
                         num_warps=_row_warps(block_m * block_n), name=f"_layernorm_fwd_kernel[{dtype}, {what}]")
        for channels in (96, 768, 1536):
            block_m, block_n = _row_tile(1 << 20, channels, BACKWARD_TILE)
            aot.register(_layernorm_bwd_kernel, signature={
                "dy_ptr": ptr, "dres_ptr": ptr, "x_ptr": ptr, "w_ptr": ptr, "dx_ptr": ptr, "dw_ptr": "*fp32:16",
                "db_ptr": "*fp32:16", "M": "i32", "N": "i32:16", "eps": "fp32", "tiles_per_program": "i32"},
                constexprs={"HAS_DRES": True, "HAS_W": True, "COMPUTE_DWB": True, "BLOCK_M": block_m,
                            "BLOCK_N": block_n},
                num_warps=_row_warps(block_m * block_n), name=f"_layernorm_bwd_kernel[{dtype}, C={channels}]")
        aot.register(_gelu_bwd_kernel, signature={"dz_ptr": ptr, "z_ptr": ptr, "numel": "i32"},
                     constexprs={"MODE": 1, "BLOCK": 1024}, name=f"_gelu_bwd_kernel[{dtype}, erf]")
        aot.register(_fold_layernorm_kernel, signature={
            "w_ptr": ptr, "ln_w_ptr": ptr, "ln_b_ptr": ptr, "bias_ptr": ptr, "folded_ptr": ptr,
            "colsum_ptr": "*fp32:16", "shift_ptr": "*fp32:16", "N": "i32:16", "K": "i32:16"},
            constexprs={"HAS_LN_W": True, "HAS_LN_B": True, "HAS_BIAS": True, "BLOCK_N": FOLD_BLOCK_N,
                        "BLOCK_K": FOLD_BLOCK_K}, name=f"_fold_layernorm_kernel[{dtype}]")
    plain = {"LN_PROLOGUE": False, "LN_FOLDED": False}
    stages = {"fc1 folded": {**plain, "LN_FOLDED": True, "GELU": 1, "STORE_PRE": False, "RESIDUAL": False},
              "fc1 prologue": {**plain, "LN_PROLOGUE": True, "GELU": 1, "STORE_PRE": False, "RESIDUAL": False},
              "fc2": {**plain, "GELU": 0, "STORE_PRE": False, "RESIDUAL": True},
              "fc1 recompute": {**plain, "GELU": 1, "STORE_PRE": True, "RESIDUAL": False}}
    launches = [(stage, "bf16", config) for stage in ("fc1 folded", "fc2") for config in (0, 1, 2, 3)]
    launches += [("fc1 prologue", "bf16", 0), ("fc1 prologue", "bf16", 3), ("fc1 recompute", "bf16", 0),
                 ("fc1 prologue", "fp32", 4), ("fc2", "fp32", 4)]
    for stage, dtype, config in launches:
        ptr = f"*{dtype}:16"
        chosen = _gemm_configs()[config]
        folded = stages[stage]["LN_FOLDED"]
        aot.register(_mlp_fwd_kernel, signature={
            "a_ptr": ptr, "w_ptr": ptr, "bias_ptr": "*fp32:16" if folded else ptr, "mean_ptr": "*fp32:16",
            "rstd_ptr": "*fp32:16", "ln_w_ptr": ptr, "ln_b_ptr": ptr, "colsum_ptr": "*fp32:16", "res_ptr": ptr,
            "gamma_ptr": ptr, "pre_ptr": ptr, "out_ptr": ptr, "M": "i32", "N": "i32:16", "K": "i32:16"},
            constexprs={"HAS_BIAS": True, "HAS_LN_W": True, "HAS_LN_B": True, "HAS_GAMMA": stage == "fc2",
                        "IEEE": dtype == "fp32", "EVEN_K": True, **stages[stage], **chosen.kwargs},
            num_warps=chosen.num_warps, num_stages=chosen.num_stages,
            name=f"_mlp_fwd_kernel[{stage}, {dtype}, config {config}]")


_register_aot()


def layernorm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
                  bias: Optional[torch.Tensor], eps: float, store_y: bool = True):
    """LayerNorm of the rows of x (+ residual) [M, C], fp32 statistics.

    Returns (y [M, C] or None without ``store_y``, x + residual [M, C] or None without a residual,
    mean [M] fp32, rstd [M] fp32).
    """
    rows, channels = x.shape
    block_m, block_n = _row_tile(rows, channels, FORWARD_TILE)
    y = torch.empty_like(x) if store_y else None
    total = torch.empty_like(x) if residual is not None else None
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if rows:
        _layernorm_fwd_kernel[(triton.cdiv(rows, block_m),)](
            x, residual, weight, bias, total, y, mean, rstd, rows, channels, eps,
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, STORE_Y=store_y,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_row_warps(block_m * block_n), num_stages=aot.NUM_STAGES)
    return y, total, mean, rstd


def layernorm_bwd(dy: torch.Tensor, dres: Optional[torch.Tensor], x: torch.Tensor, weight: Optional[torch.Tensor],
                  eps: float, weight_grads: bool):
    """Backward of y = LayerNorm(x) [M, C]; dres [M, C] (or None) is a gradient added to dx as is.

    Returns (dx [M, C], dweight [C] fp32 or None, dbias [C] fp32 or None); the last two only with
    ``weight_grads``.
    """
    rows, channels = x.shape
    block_m, block_n = _row_tile(rows, channels, BACKWARD_TILE)
    tiles = triton.cdiv(rows, block_m)
    programs = _num_programs(x.device, tiles)
    per_program = triton.cdiv(max(tiles, 1), programs)
    dx = torch.empty_like(x)
    shape = (programs, channels) if weight_grads else (0,)
    dw = torch.zeros(shape, device=x.device, dtype=torch.float32)
    db = torch.zeros_like(dw)
    if rows:
        _layernorm_bwd_kernel[(programs,)](
            dy, dres, x, weight, dx, dw, db, rows, channels, eps, per_program,
            HAS_DRES=dres is not None, HAS_W=weight is not None, COMPUTE_DWB=weight_grads, BLOCK_M=block_m,
            BLOCK_N=block_n, num_warps=_row_warps(block_m * block_n), num_stages=aot.NUM_STAGES)
    if not weight_grads:
        return dx, None, None
    return dx, dw.sum(0), db.sum(0)


def linear_fwd(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *,
               ln: Optional[tuple] = None, folded: Optional[tuple] = None, gelu: Optional[str] = None,
               store_pre: bool = False, residual: Optional[torch.Tensor] = None,
               gamma: Optional[torch.Tensor] = None):
    """out = residual + gamma * GELU(LN(a) @ weight^T + bias), each stage optional.

    a: [M, K]; weight: [N, K]; bias, gamma: [N]; residual: [M, N]; ln: (mean [M] fp32, rstd [M] fp32,
    ln_weight [K] or None, ln_bias [K] or None) normalizes a's rows as they are loaded; folded: (mean,
    rstd, colsum [N] fp32) normalizes the product's rows instead, for weight and bias from
    :func:`fold_layernorm`; gelu: "none" (erf) or "tanh". Returns (out [M, N], the pre-activation
    [M, N] with ``store_pre`` else None).
    """
    rows, depth = a.shape
    width = weight.shape[0]
    out = torch.empty((rows, width), device=a.device, dtype=a.dtype)
    pre = torch.empty_like(out) if store_pre else None
    mean, rstd, ln_w, ln_b = ln if ln is not None else (None,) * 4
    colsum = None
    if folded is not None:
        mean, rstd, colsum = folded
    if rows:
        def grid(meta):
            return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]),)

        _mlp_fwd_kernel[grid](
            a, weight, bias, mean, rstd, ln_w, ln_b, colsum, residual, gamma, pre, out, rows, width, depth,
            HAS_BIAS=bias is not None, LN_PROLOGUE=ln is not None, LN_FOLDED=folded is not None,
            HAS_LN_W=ln_w is not None, HAS_LN_B=ln_b is not None, GELU=GELU_MODES[gelu] if gelu is not None else 0,
            STORE_PRE=store_pre, RESIDUAL=residual is not None, HAS_GAMMA=gamma is not None,
            IEEE=a.dtype == torch.float32)
    return out, pre


def fold_layernorm(weight: torch.Tensor, ln_weight: Optional[torch.Tensor], ln_bias: Optional[torch.Tensor],
                   bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LN's affine folded into the Linear after it (the module docstring): (weight * ln_weight [N, K]
    in weight's dtype, or weight itself without ln_weight; its row sums [N] fp32; bias + weight @
    ln_bias [N] fp32)."""
    width, depth = weight.shape
    folded = torch.empty_like(weight) if ln_weight is not None else weight
    colsum = torch.empty(width, device=weight.device, dtype=torch.float32)
    shift = torch.empty_like(colsum)
    if width:
        _fold_layernorm_kernel[(triton.cdiv(width, FOLD_BLOCK_N),)](
            weight, ln_weight, ln_bias, bias, folded, colsum, shift, width, depth, HAS_LN_W=ln_weight is not None,
            HAS_LN_B=ln_bias is not None, HAS_BIAS=bias is not None, BLOCK_N=FOLD_BLOCK_N, BLOCK_K=FOLD_BLOCK_K,
            num_stages=aot.NUM_STAGES)
    return folded, colsum, shift


def gelu_bwd_(grad: torch.Tensor, pre: torch.Tensor, approximate: str) -> torch.Tensor:
    """In place: grad [M, H] of GELU(pre) becomes the gradient of pre [M, H]; returns grad."""
    numel = grad.numel()
    block = 1024
    if numel:
        _gelu_bwd_kernel[(triton.cdiv(numel, block),)](grad, pre, numel, MODE=GELU_MODES[approximate], BLOCK=block,
                                                       num_stages=aot.NUM_STAGES)
    return grad


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result: G = dy^T @ GELU(...) is formed before LayerScale (often 1e-5) shrinks it,
    so fp16 storage could overflow where the scaled product would not."""
    if a.device.type == "cuda" and a.dtype != torch.float32:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def layernorm_mlp_fwd(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma, approximate):
    """y = x + gamma * fc2(GELU(fc1(LN(x)))) for x [M, C]; see the module docstring for the kernels."""
    _, _, mean, rstd = layernorm_fwd(x, None, None, None, eps, store_y=False)
    if FOLD_LAYERNORM and x.dtype != torch.float32:
        weight, colsum, shift = fold_layernorm(fc1_weight, ln_weight, ln_bias, fc1_bias)
        hidden, _ = linear_fwd(x, weight, shift, folded=(mean, rstd, colsum), gelu=approximate)
    else:
        hidden, _ = linear_fwd(x, fc1_weight, fc1_bias, ln=(mean, rstd, ln_weight, ln_bias), gelu=approximate)
    y, _ = linear_fwd(hidden, fc2_weight, fc2_bias, residual=x, gamma=gamma)
    return y


def layernorm_mlp_bwd(dy, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps, gamma,
                      approximate):
    """Gradients of layernorm_mlp for x, dy [M, C], recomputing LN(x) and the fc1 pre-activation.

    Activation memory: nothing is saved beyond the op's inputs, where eager autograd keeps LN(x) [M, C],
    fc1's output and GELU's output [M, H] each, and fc2's output [M, C] with gamma: 2C + 2H values per
    row (10 C at mlp ratio 4). The price is one more [M, C] x [C, H] GEMM (fc1 again) in backward.
    Fused: fc1 recompute with bias and GELU (writing both pre- and post-activation), GELU backward, and
    LN backward with the residual's gradient dy added. dgamma comes from G = dy^T @ GELU(...) [C, H]
    (fp32), which also gives dfc2_weight = gamma * G, so fc2's output is never recomputed.

    Returns [dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma], an entry
    None where its input is None.
    """
    normed, _, _, _ = layernorm_fwd(x, None, ln_weight, ln_bias, eps)
    hidden, pre = linear_fwd(normed, fc1_weight, fc1_bias, gelu=approximate, store_pre=True)
    dgamma = None
    if gamma is not None:
        g = _mm_fp32(dy.t(), hidden)  # [C, H]
        dgamma = (g * fc2_weight.float()).sum(1)
        if fc2_bias is not None:
            dgamma += fc2_bias.float() * dy.float().sum(0)
        dgamma = dgamma.to(gamma.dtype)
        dy_branch = dy * gamma
        dfc2_weight = (g * gamma.float()[:, None]).to(fc2_weight.dtype)
    else:
        dy_branch = dy
        dfc2_weight = dy.t() @ hidden
    dfc2_bias = None if fc2_bias is None else dy_branch.sum(0)
    dpre = gelu_bwd_(dy_branch @ fc2_weight, pre, approximate)
    dfc1_bias = None if fc1_bias is None else dpre.sum(0)
    dfc1_weight = dpre.t() @ normed
    affine = ln_weight is not None or ln_bias is not None
    dx, dln_weight, dln_bias = layernorm_bwd(dpre @ fc1_weight, dy, x, ln_weight, eps, affine)
    dln_weight = None if ln_weight is None else dln_weight.to(ln_weight.dtype)
    dln_bias = None if ln_bias is None else dln_bias.to(ln_bias.dtype)
    return [dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias, dgamma]
