"""Triton kernels of window attention: from the qkv map straight to the map before proj.

A window wider than one tile takes one program per (window, head, block of BLOCK_M query tokens),
which loops over the window's keys in blocks of BLOCK_N with an online softmax; a window of up to
64 tokens (Swin's 7x7 = 49) is one tile, and its programs walk many windows each (the schedule
below). Everything the reference builds with copies is index arithmetic here:

* frame position ``t`` of window ``w`` sits at row ``r``, column ``c`` of the shifted, padded map;
  :func:`_frame` maps it to the source token of the un-shifted, un-padded qkv map (the same token
  the output is stored to) or marks it as padding, whose q, k, v are the qkv Linear's bias;
* the relative position bias is gathered from the table with the index computed from the two
  tokens' coordinates, and the shift mask compares region ids computed from frame rows / columns.

Global attention (``vitkernels.ops.attention``) runs the same kernels with one window covering the
whole sequence (window (1, N) on a [B, 1, N, 3C] view) and an additive bias read through strides:
the key-block kernels in their SEQUENCE mode (token t is token t), or the one-tile kernels when N
is at most 64 and there is no bias.

Backward is flash attention's: P is recomputed from the saved log-sum-exp, and D = rowsum(P * dP)
/ rowsum(P), which is rowsum(dO * O) without O's rounding to the input dtype (global attention,
which sums no dS over windows, takes rowsum(dO * O) itself). A one-tile window takes one pass
(:func:`_window_attention_bwd_tile_kernel`, scheduled as the one-tile forward): P, dP and dS of
the window give its dq, dk and dv together. Wider windows and global attention take a dq kernel,
which also stores D, and a dk/dv kernel. The bias-table gradient is deterministic (no
atomics): dS is summed over a chunk of windows per program into a [chunks, heads, N, N] buffer (by
the one-tile kernel over the windows each program walks; by a kernel of its own for wider
windows), then a last kernel reduces the chunks in order and gathers each table row's pairs. The
qkv bias gradient (padding tokens' dk, dv) and the logit-scale gradient go through small
per-program partial sums that torch reduces.

Accepted layout: qkv [B, H, W, 3C] with any batch / row / column strides and a contiguous last dim
(the launchers make it so); out [B, H, W, C] is allocated contiguous.

Schedule of small windows. Swin's 7x7 window is 49 tokens, which a 64x64 tile holds at 77% of its
rows (59% of its logits). Packing several windows into one tile would not help: their logits form
a block-diagonal matrix, so a tile of k windows does k times the useful products. What a window of
one tile costs beyond its two products is index and bias arithmetic on the [64, 64] logits, and
that is the same for every window of a head: the relative position bias (a gather from the table),
the -inf of keys past the window. So a one-tile window runs :func:`_window_attention_fwd_tile_kernel`,
where program (p, h) walks windows p, p + P, p + 2P, ... of head h, P = :func:`window_programs`:
as many programs over all heads as the device holds at once, read from the compiled kernel's
registers and shared memory, so that they run in one wave. A 64-token tile takes one warpgroup
(:func:`launch_warps`). The head's bias tile and the tokens' window rows and columns are computed
once, before the loop; each window adds its source pixels, its loads and the shift mask, which
only the windows of the last window row or column need (the others' tokens all lie in one shift
region, so they skip it). A map that needs no padding (every Swin stage at 224) is launched as
such (``PADDING``): its tokens are all real and the qkv bias, which only padding tokens read, is
left out. The loop over windows is what Triton's software pipeliner overlaps: the next window's
q, k and v are copied to shared memory while the current one is computed (:data:`HALF_STAGES` in
fp16 and bf16; fp32 runs :data:`FP32_STAGES`), and on sm_90 the registers are capped so that three
programs share a multiprocessor (:data:`TILE_FORWARD_MAX_REGISTERS`).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from ... import aot
from .._triton import compute_capability, multiprocessors, resident_programs

LOG_SCALE_MAX = tl.constexpr(math.log(100.0))  # SwinV2 clamps its logit scale here before exp
NORM_EPS = tl.constexpr(1e-12)  # F.normalize's eps in cosine attention
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
FAST_EXP2 = tl.constexpr(not aot.interpreter_on())  # PTX ex2 where compiled; the interpreter cannot run PTX
# Elements of fp32 dS the bias-table gradient may buffer ([chunks, heads, N, N]).
DTABLE_BUFFER_ELEMENTS = 1 << 22
GATHER_TILE = 4096  # table rows x window tokens gathered per program of the table-gradient kernel
WARPGROUP, WARPGROUP_TILE = 4, 64  # one warpgroup's warps, and the tile rows it takes (launch_warps)
# Pipeline depth of the fp32 launches, whose IEEE products run on FMA units: with 2 stages, ptxas
# (Triton 3.6, sm_90) keeps 32 registers and a 5.9 KB stack per thread for the 64x32 wide-head
# forward and spills in most other fp32 kernels (the one-tile backward of a padded map 128 bytes, the
# dq kernel 96); with 1 stage the forward takes 128 registers and 48 bytes of stack, and the others
# none but the one-tile backward of an unpadded map (336 bytes; 16 with 2 stages).
FP32_STAGES = 1
# Pipeline depth of the fp16 and bf16 launches. With 2 stages Triton 3.6 issues the copies of a loop
# step's tiles at the end of the step before and waits for all of them at its top (sm_90: each
# loop opens with "DEPBAR.LE SB0, 0x0"), so every window or key block waits out its own loads; with
# 3 the copies of step i + 1 are in flight through all of step i ("DEPBAR.LE SB0, 0x3" in the
# one-tile forward, whose q, k and v are three groups). By the compiler's report (sm_90 and sm_80)
# the third stage costs the forward kernels shared memory (12 KiB for the 64x64 head_dim-32 tile)
# and registers (TILE_FORWARD_MAX_REGISTERS) but no spill; the backward kernels' stack per thread
# moves by -56 to +16 bytes on sm_90 (the one-tile backward 32 -> 40, the head_dim-128 dq kernel
# 0 -> 8) and by up to +64 on sm_80, where they spilled more already (the one-tile backward 304).
HALF_STAGES = 3
# The kernels' PADDING: the map is a whole number of windows, or padded to one after the cyclic shift
# (timm) or before it (the original Swin, Hugging Face, torchvision).
NO_PADDING, SHIFT_THEN_PAD, PAD_THEN_SHIFT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _frame(win, t, H, W, Wh, Ww, sh, sw, PADDING: tl.constexpr, SEQUENCE: tl.constexpr = False):
    """Frame tokens ``t`` of window ``win`` -> (row, column in the window, source row, column,
    is a real token, shift region id). SEQUENCE: the map is one row of W tokens and the window all
    of it (global attention), so frame token t is token t."""
    if SEQUENCE:
        zero = tl.zeros_like(t)
        return zero, t, zero, t, t < W, zero
    # t // Ww and t % Ww without an integer division per token (some 25 instructions each): the
    # float quotient of t + 0.5 lies at least 0.5 / Ww from an integer, so it truncates to the row
    # for every t below 2^20 (the reciprocal and the product err by a few 2^-24); windows hold at
    # most 32 x 32 tokens.
    inv_ww = 1.0 / (Ww * 1.0)
    i = (t.to(tl.float32) * inv_ww + 0.5 * inv_ww).to(tl.int32)
    j = t - i * Ww
    windows_per_row = tl.cdiv(W, Ww)
    row0 = (win // windows_per_row) * Wh
    col0 = (win % windows_per_row) * Ww
    y, x, real, region = _frame_at(row0, col0, t, i, j, H, W, Wh, Ww, sh, sw, PADDING)
    return i, j, y, x, real, region


@triton.jit
def _frame_at(row0, col0, t, i, j, H, W, Wh, Ww, sh, sw, PADDING: tl.constexpr):
    """:func:`_frame` of tokens ``t`` at window rows and columns ``i``, ``j`` of the window whose
    first frame row and column are ``row0``, ``col0``: (source row, column, is a real token, shift
    region id)."""
    hp = tl.cdiv(H, Wh) * Wh
    wp = tl.cdiv(W, Ww) * Ww
    r = row0 + i
    c = col0 + j
    # The cyclic shifts as one conditional subtraction: r + sh < 2 hp (sh < Wh <= hp), and for a
    # real row r + sh % H < 2 H; the same for columns. Without padding, hp = H and wp = W.
    if PADDING == NO_PADDING:
        y = _wrap(r + sh, H)
        x = _wrap(c + sw, W)
        real = t < Wh * Ww
    else:
        if PADDING == PAD_THEN_SHIFT:
            y = _wrap(r + sh, hp)
            x = _wrap(c + sw, wp)
        else:
            y = tl.where(r < H, _wrap(r + sh % H, H), r)
            x = tl.where(c < W, _wrap(c + sw % W, W), c)
        real = (t < Wh * Ww) & (y < H) & (x < W)
    return y, x, real, _region(r, c, hp, wp, Wh, Ww, sh, sw)


@triton.jit
def _region(r, c, hp, wp, Wh, Ww, sh, sw):
    """Shift region ids of frame rows ``r``, columns ``c`` of the shifted map padded to hp x wp."""
    region_r = tl.where(sh > 0, (r >= hp - Wh).to(tl.int32) + (r >= hp - sh).to(tl.int32), 0)
    region_c = tl.where(sw > 0, (c >= wp - Ww).to(tl.int32) + (c >= wp - sw).to(tl.int32), 0)
    return region_r * 3 + region_c


@triton.jit
def _wrap(v, size):
    """v % size for 0 <= v < 2 * size."""
    return tl.where(v >= size, v - size, v)


@triton.jit
def _exp2(x):
    """2^x in fp32 by one ex2.approx.ftz (results under 2^-126 flush to 0, which no softmax numerator
    needs); Triton's own exp adds a multiply and, without ftz, a range fix-up of three instructions."""
    if FAST_EXP2:
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x):
    """log2(x) in fp32 by one lg2.approx.ftz (absolute error under 2^-22 on [0.5, 2], relative
    elsewhere); Triton's own log2 is a polynomial of some 25 instructions. The forward takes it for
    the log-sum-exp of each row, whose sum of probabilities is at least 1."""
    if FAST_EXP2:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _exp(x):
    """e^x in fp32 through :func:`_exp2`."""
    return _exp2(x * LOG2E)


@triton.jit
def _map_offsets(y, x, stride_qh, stride_qw):
    """Offsets of pixels (y, x) within one image of the qkv map, in int64: a strided view's row
    stride times the row can pass 2^31 even when each stride fits in 32 bits."""
    return y.to(tl.int64) * stride_qh + x.to(tl.int64) * stride_qw


@triton.jit
def _load_rows(base_ptr, offsets, real, in_window, d, d_mask, fill_ptr, HAS_FILL: tl.constexpr):
    """[BLOCK, BLOCK_D] rows of one q/k/v part; padding rows hold ``fill`` (the qkv bias) or zeros."""
    x = tl.load(base_ptr + offsets[:, None] + d[None, :], mask=real[:, None] & d_mask[None, :], other=0.0)
    if HAS_FILL:
        fill = tl.load(fill_ptr + d, mask=d_mask, other=0.0).to(x.dtype)
        x = tl.where((in_window & ~real)[:, None], fill[None, :], x)
    return x


@triton.jit
def _key_block(win, start, n, H, W, Wh, Ww, sh, sw, qkv_base, stride_qh, stride_qw, channels, d, d_mask, fill_base,
               PADDING: tl.constexpr, HAS_FILL: tl.constexpr, BLOCK_N: tl.constexpr, SEQUENCE: tl.constexpr = False):
    """Keys ``start`` .. ``start + BLOCK_N`` of window ``win``: the tokens, their frame row, column and
    shift region, and their k and v rows."""
    tk = start + tl.arange(0, BLOCK_N)
    ki, kj, ky, kx, k_real, k_region = _frame(win, tk, H, W, Wh, Ww, sh, sw, PADDING, SEQUENCE)
    k_offsets = _map_offsets(ky, kx, stride_qh, stride_qw)
    k = _load_rows(qkv_base + channels, k_offsets, k_real, tk < n, d, d_mask, fill_base + channels, HAS_FILL)
    v = _load_rows(qkv_base + 2 * channels, k_offsets, k_real, tk < n, d, d_mask, fill_base + 2 * channels, HAS_FILL)
    return tk, ki, kj, k_region, k, v


@triton.jit
def _key_block_scores(qn, do, lse, scale, win, start, n, H, W, Wh, Ww, sh, sw, qkv_base, stride_qh, stride_qw, channels,
                      d, d_mask, fill_base, tq, qi, qj, q_region, table_ptr, heads, mask_value, bias_base, stride_bq,
                      stride_bk, PADDING: tl.constexpr, HAS_FILL: tl.constexpr, COSINE: tl.constexpr,
                      HAS_TABLE: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_N: tl.constexpr, SEQUENCE: tl.constexpr):
    """The query rows' view of keys ``start`` .. ``start + BLOCK_N``: (tokens, normalized keys, P, dP =
    dO V^T, q.k), P and dP fp32 [BLOCK_M, BLOCK_N]."""
    tk, ki, kj, k_region, k, v = _key_block(win, start, n, H, W, Wh, Ww, sh, sw, qkv_base, stride_qh, stride_qw,
                                            channels, d, d_mask, fill_base, PADDING, HAS_FILL, BLOCK_N, SEQUENCE)
    kn = _unit_rows(k) if COSINE else k
    raw, s = _logits(qn, kn, scale, tq, qi, qj, q_region, tk, ki, kj, k_region, n, table_ptr, heads, Wh, Ww,
                     mask_value, bias_base, stride_bq, stride_bk, HAS_TABLE, SHIFTED, HAS_BIAS, IEEE)
    return tk, kn, _exp(s - lse[:, None]), _dot(do, tl.trans(v), IEEE), raw


@triton.jit
def _unit_rows(x):
    """F.normalize(x, dim=-1, eps=1e-12), computed in fp32, returned in x's dtype."""
    xf = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(xf * xf, 1))
    return (xf / tl.maximum(norm, NORM_EPS)[:, None]).to(x.dtype)


@triton.jit
def _unit_rows_bwd(x, grad):
    """Gradient through F.normalize(x, eps=1e-12) of ``grad`` (fp32) at rows x."""
    xf = x.to(tl.float32)
    norm = tl.sqrt(tl.sum(xf * xf, 1))
    denom = tl.maximum(norm, NORM_EPS)
    unit = xf / denom[:, None]
    proj = tl.where(norm > NORM_EPS, tl.sum(unit * grad, 1) / denom, 0.0)
    return grad / denom[:, None] - proj[:, None] * unit


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in fp32, ``a`` cast to b's dtype; exact fp32 products (no TF32) when IEEE."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _window_bases(bw, h, num_windows, head_dim, qkv_ptr, stride_qb, bias_ptr, stride_bb, stride_bh):
    """Image and window of flat window index bw, and the bases of head h in the qkv map and the bias."""
    b = bw // num_windows
    qkv_base = qkv_ptr + b.to(tl.int64) * stride_qb + h * head_dim
    bias_base = bias_ptr + b.to(tl.int64) * stride_bb + h * stride_bh
    return b, bw % num_windows, qkv_base, bias_base


@triton.jit
def _head_scale(logit_scale_ptr, h, scale, COSINE: tl.constexpr):
    if COSINE:
        return tl.exp(tl.minimum(tl.load(logit_scale_ptr + h).to(tl.float32), LOG_SCALE_MAX))
    return scale


@triton.jit
def _relative_bias(table_ptr, heads, qi, qj, ki, kj, Wh, Ww, pair):
    """[queries, keys] fp32 relative position bias of one head (``table_ptr`` at its column), gathered
    from the table with the index of each pair's row and column offsets; 0 outside ``pair``. The
    index (qi - ki + Wh - 1) (2 Ww - 1) + qj - kj + Ww - 1 is a query term minus a key term, so a
    pair costs one subtraction."""
    q_offset = ((qi + Wh - 1) * (2 * Ww - 1) + qj + Ww - 1) * heads
    k_offset = (ki * (2 * Ww - 1) + kj) * heads
    return tl.load(table_ptr + (q_offset[:, None] - k_offset[None, :]), mask=pair, other=0.0).to(tl.float32)


@triton.jit
def _logits(qn, kn, scale, tq, qi, qj, q_region, tk, ki, kj, k_region, n, table_ptr, heads, Wh, Ww, mask_value,
            bias_ptr, stride_bq, stride_bk,
            HAS_TABLE: tl.constexpr, SHIFTED: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
            MASK_KEYS: tl.constexpr = True, LOG2: tl.constexpr = False):
    """(q.k, logits) [BLOCK_M, BLOCK_N] fp32; keys past the window are -inf (unless not MASK_KEYS:
    the caller masks them). LOG2: the logits in log2 units (times log2(e)) for :func:`_exp2`, which
    saves a multiply per logit: ``scale`` and ``mask_value`` come so scaled, the biases are scaled here."""
    raw = _dot(qn, tl.trans(kn), IEEE)
    s = raw * scale
    pair = (tq < n)[:, None] & (tk < n)[None, :]
    if HAS_TABLE:
        table_bias = _relative_bias(table_ptr, heads, qi, qj, ki, kj, Wh, Ww, pair)
        s += table_bias * LOG2E if LOG2 else table_bias
    if HAS_BIAS:
        bias = tl.load(bias_ptr + tq[:, None] * stride_bq + tk[None, :] * stride_bk, mask=pair, other=0.0)
        s += bias.to(tl.float32) * LOG2E if LOG2 else bias.to(tl.float32)
    if SHIFTED:
        s += tl.where(q_region[:, None] != k_region[None, :], mask_value, 0.0)
    if MASK_KEYS:
        s = tl.where((tk < n)[None, :], s, float("-inf"))
    return raw, s


@triton.jit
def _window_attention_fwd_kernel(
    qkv_ptr,  # [B, H, W, 3C], last dim contiguous
    out_ptr,  # [B, H, W, C] contiguous
    lse_ptr,  # [B * nW, heads, N] fp32
    table_ptr,  # [(2Wh-1)(2Ww-1), heads] contiguous (HAS_TABLE)
    fill_ptr,  # [3C] qkv bias, the q/k/v of padding (HAS_FILL)
    logit_scale_ptr,  # [heads] (COSINE)
    bias_ptr,  # additive bias, [B, heads, N, N] through strides, 0 on broadcast dims (HAS_BIAS)
    stride_qb, stride_qh, stride_qw, stride_bb, stride_bh, stride_bq, stride_bk,
    H, W, Wh, Ww, sh, sw, num_windows, heads, head_dim, scale, mask_value,
    PADDING: tl.constexpr, SEQUENCE: tl.constexpr, SHIFTED: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_FILL: tl.constexpr, COSINE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Windows wider than one tile, and global attention: one program per (window, head, query block).
    bw = tl.program_id(0)
    h = tl.program_id(1)
    n = Wh * Ww
    channels = heads * head_dim
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    tq = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    image, win, qkv_base, bias_base = _window_bases(bw, h, num_windows, head_dim, qkv_ptr, stride_qb,
                                                    bias_ptr, stride_bb, stride_bh)
    qi, qj, qy, qx, q_real, q_region = _frame(win, tq, H, W, Wh, Ww, sh, sw, PADDING, SEQUENCE)
    fill_base = fill_ptr + h * head_dim
    head_scale = _head_scale(logit_scale_ptr, h, scale, COSINE)
    q = _load_rows(qkv_base, _map_offsets(qy, qx, stride_qh, stride_qw), q_real, tq < n, d, d_mask, fill_base,
                   HAS_FILL)
    if COSINE:
        q = _unit_rows(q)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, n, BLOCK_N):
        tk, ki, kj, k_region, k, v = _key_block(win, start, n, H, W, Wh, Ww, sh, sw, qkv_base, stride_qh, stride_qw,
                                                channels, d, d_mask, fill_base, PADDING, HAS_FILL, BLOCK_N, SEQUENCE)
        if COSINE:
            k = _unit_rows(k)
        _, s = _logits(q, k, head_scale * LOG2E, tq, qi, qj, q_region, tk, ki, kj, k_region, n, table_ptr + h, heads,
                       Wh, Ww, mask_value * LOG2E, bias_base, stride_bq, stride_bk, HAS_TABLE, SHIFTED, HAS_BIAS, IEEE,
                       False, True)
        if start + BLOCK_N > n:  # the last key block alone has keys past the window
            s = tl.where((tk < n)[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # in log2 units, as s
        alpha = _exp2(m - m_new)
        p = _exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE)
        m = m_new
    _store_rows(out_ptr, lse_ptr, acc * (1.0 / l)[:, None], (m + _log2(l)) * LN2, image, bw, h, tq, qy, qx, q_real, d,
                d_mask, H, W, n, heads, head_dim)


@triton.jit
def _store_rows(out_ptr, lse_ptr, out, lse, image, bw, h, t, y, x, real, d, d_mask, H, W, n, heads, head_dim):
    """Stores one head's output rows at their map pixels (y, x) and their log-sum-exp."""
    channels = heads * head_dim
    offsets = (image.to(tl.int64) * H * W + y * W + x) * channels + h * head_dim
    tl.store(out_ptr + offsets[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=real[:, None] & d_mask[None, :])
    tl.store(lse_ptr + (bw * heads + h) * n + t, lse, mask=t < n)


@triton.jit
def _shared_logits(table_ptr, heads, i, j, in_window, Wh, Ww, HAS_TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """What a one-tile window's [BLOCK, BLOCK] logits add to q.k * scale, the same in every window of
    a head: the relative position bias (``table_ptr`` at the head's column), -inf past the window's keys."""
    shared = tl.where(in_window[None, :], tl.zeros((BLOCK, BLOCK), tl.float32), float("-inf"))
    if HAS_TABLE:
        shared += _relative_bias(table_ptr, heads, i, j, i, j, Wh, Ww, in_window[:, None] & in_window[None, :])
    return shared


@triton.jit
def _tile_head(table_ptr, fill_ptr, logit_scale_ptr, h, heads, head_dim, scale, Wh, Ww, HAS_TABLE: tl.constexpr,
               COSINE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """What a one-tile program of head ``h`` computes once: its tokens, their window rows and columns,
    which lie in the window, the head-dim lanes and their mask, the head's :func:`_shared_logits`,
    its qkv-bias fill and its scale; the shared logits in log2 units (times log2(e)), for
    :func:`_exp2`."""
    t = tl.arange(0, BLOCK)
    i = t // Ww
    j = t % Ww
    in_window = t < Wh * Ww
    d = tl.arange(0, BLOCK_D)
    shared = _shared_logits(table_ptr + h, heads, i, j, in_window, Wh, Ww, HAS_TABLE, BLOCK) * LOG2E
    return (t, i, j, in_window, d, d < head_dim, shared, fill_ptr + h * head_dim,
            _head_scale(logit_scale_ptr, h, scale, COSINE))


@triton.jit
def _walk_start(first, step, num_windows, windows_per_row):
    """(image, window row, window column) of window ``first`` of the flattened [B * nW] windows, then
    the same three of ``step`` windows, for :func:`_walk_next`."""
    win = first % num_windows
    step_win = step % num_windows
    return (first // num_windows, win // windows_per_row, win % windows_per_row, step // num_windows,
            step_win // windows_per_row, step_win % windows_per_row)


@triton.jit
def _walk_next(image, wrow, wcol, step_image, step_row, step_col, window_rows, windows_per_row):
    """The window ``step`` windows after (image, wrow, wcol), by adds with carries: a one-tile program
    walks its windows so, where dividing each window's index by nW and by the windows per row took
    three integer divisions by run-time values, some 70 instructions a window (sm_90)."""
    wcol += step_col
    carry = wcol >= windows_per_row
    wcol = tl.where(carry, wcol - windows_per_row, wcol)
    wrow += step_row + carry.to(tl.int32)
    carry = wrow >= window_rows
    wrow = tl.where(carry, wrow - window_rows, wrow)
    return image + step_image + carry.to(tl.int32), wrow, wcol


@triton.jit
def _tile_window(qkv_base, fill_base, row0, col0, t, i, j, in_window, d, d_mask, stride_qh, stride_qw, H, W, Wh, Ww, sh,
                 sw, channels, PADDING: tl.constexpr, HAS_FILL: tl.constexpr):
    """The window of a one-tile program at frame row and column ``row0``, ``col0`` (``qkv_base`` at
    its image and head): its tokens' source rows, columns and reality, and their q, k, v rows."""
    y, x, real, _ = _frame_at(row0, col0, t, i, j, H, W, Wh, Ww, sh, sw, PADDING)
    offsets = _map_offsets(y, x, stride_qh, stride_qw)
    q = _load_rows(qkv_base, offsets, real, in_window, d, d_mask, fill_base, HAS_FILL)
    k = _load_rows(qkv_base + channels, offsets, real, in_window, d, d_mask, fill_base + channels, HAS_FILL)
    v = _load_rows(qkv_base + 2 * channels, offsets, real, in_window, d, d_mask, fill_base + 2 * channels, HAS_FILL)
    return y, x, real, q, k, v


@triton.jit
def _shift_masked(s, wrow, wcol, i, j, H, W, Wh, Ww, sh, sw, mask_value, SHIFTED: tl.constexpr):
    """One-tile logits ``s`` of the window at window row and column ``wrow``, ``wcol`` (tokens at
    window rows ``i``, columns ``j``) with the shift mask added; only windows of the last window row
    or column have tokens in more than one shift region, so only they add it. Within such a window a
    token's :func:`_region` id, less what is the same for the whole window, is whether its row is
    one the shift wrapped (i >= Wh - sh, in the last window row) and whether its column is (j >= Ww
    - sw, in the last window column). By the compiler's report (sm_90, Triton 3.6, Swin-T stage
    1's forward) that takes 189 instructions an edge window, where the ids from frame rows and
    columns took 382."""
    if SHIFTED:
        bottom = wrow == tl.cdiv(H, Wh) - 1
        right = wcol == tl.cdiv(W, Ww) - 1
        if bottom | right:
            region = tl.where(bottom & (i >= Wh - sh), 2, 0) + tl.where(right & (j >= Ww - sw), 1, 0)
            s += tl.where(region[:, None] != region[None, :], mask_value, 0.0)
    return s


@triton.jit
def _window_attention_fwd_tile_kernel(
    qkv_ptr, out_ptr, lse_ptr, table_ptr, fill_ptr, logit_scale_ptr,  # as in _window_attention_fwd_kernel
    stride_qb, stride_qh, stride_qw,
    H, W, Wh, Ww, sh, sw, num_windows, total_windows, heads, head_dim, scale, mask_value,
    PADDING: tl.constexpr, SHIFTED: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_FILL: tl.constexpr,
    COSINE: tl.constexpr, IEEE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Windows of one tile: program (p, h) walks windows p, p + P, ... of head h (see the schedule in
    # the module's docstring); what every window of the head shares is computed before the loop.
    h = tl.program_id(1)
    n = Wh * Ww
    channels = heads * head_dim
    t, i, j, in_window, d, d_mask, shared, fill_base, head_scale = _tile_head(
        table_ptr, fill_ptr, logit_scale_ptr, h, heads, head_dim, scale, Wh, Ww, HAS_TABLE, COSINE, BLOCK, BLOCK_D)
    window_rows = tl.cdiv(H, Wh)
    windows_per_row = tl.cdiv(W, Ww)
    image, wrow, wcol, step_image, step_row, step_col = _walk_start(tl.program_id(0), tl.num_programs(0),
                                                                    num_windows, windows_per_row)
    for bw in range(tl.program_id(0), total_windows, tl.num_programs(0)):
        y, x, real, q, k, v = _tile_window(
            qkv_ptr + image.to(tl.int64) * stride_qb + h * head_dim, fill_base, wrow * Wh, wcol * Ww, t, i, j,
            in_window, d, d_mask, stride_qh, stride_qw, H, W, Wh, Ww, sh, sw, channels, PADDING, HAS_FILL)
        if COSINE:
            q = _unit_rows(q)
            k = _unit_rows(k)
        s = _shift_masked(_dot(q, tl.trans(k), IEEE) * (head_scale * LOG2E) + shared, wrow, wcol, i, j, H, W, Wh, Ww,
                          sh, sw, mask_value * LOG2E, SHIFTED)
        m = tl.max(s, 1)
        p = _exp2(s - m[:, None])
        l = tl.sum(p, 1)
        _store_rows(out_ptr, lse_ptr, _dot(p, v, IEEE) * (1.0 / l)[:, None], (m + _log2(l)) * LN2, image, bw, h, t, y,
                    x, real, d, d_mask, H, W, n, heads, head_dim)
        image, wrow, wcol = _walk_next(image, wrow, wcol, step_image, step_row, step_col, window_rows,
                                       windows_per_row)


@triton.jit
def _window_attention_bwd_dq_kernel(
    qkv_ptr,  # [B, H, W, 3C], last dim contiguous
    out_ptr,  # [B, H, W, C] contiguous, forward output
    dout_ptr,  # [B, H, W, C] contiguous
    lse_ptr,  # [B * nW, heads, N] fp32
    delta_ptr,  # [B * nW, heads, N] fp32, written: D (below)
    dqkv_ptr,  # [B, H, W, 3C] contiguous, q slots written
    dscale_ptr,  # [B * nW, cdiv(N, BLOCK_M), heads] fp32 partial sums of dS * q.k (COSINE)
    dbias_ptr,  # [B, heads, N, N] contiguous fp32, dS (BIAS_GRAD)
    table_ptr, fill_ptr, logit_scale_ptr, bias_ptr,  # as in the forward
    stride_qb, stride_qh, stride_qw, stride_bb, stride_bh, stride_bq, stride_bk,
    H, W, Wh, Ww, sh, sw, num_windows, heads, head_dim, scale, mask_value,
    PADDING: tl.constexpr, SEQUENCE: tl.constexpr, SHIFTED: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_FILL: tl.constexpr, COSINE: tl.constexpr, HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr,
    IEEE: tl.constexpr, ONE_KEY_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (window, head, block of query rows): windows wider than one tile, and global
    # attention (whose N may also fit one key block: ONE_KEY_BLOCK).
    bw = tl.program_id(0)
    h = tl.program_id(1)
    n = Wh * Ww
    channels = heads * head_dim
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    fill_base = fill_ptr + h * head_dim
    scale = _head_scale(logit_scale_ptr, h, scale, COSINE)
    tq = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    b, win, qkv_base, bias_base = _window_bases(bw, h, num_windows, head_dim, qkv_ptr, stride_qb, bias_ptr,
                                                stride_bb, stride_bh)
    qi, qj, qy, qx, q_real, q_region = _frame(win, tq, H, W, Wh, Ww, sh, sw, PADDING, SEQUENCE)
    q = _load_rows(qkv_base, _map_offsets(qy, qx, stride_qh, stride_qw), q_real, tq < n, d, d_mask, fill_base, HAS_FILL)
    qn = _unit_rows(q) if COSINE else q
    map_offsets = (b.to(tl.int64) * H * W + qy * W + qx) * channels + h * head_dim
    rows_mask = q_real[:, None] & d_mask[None, :]
    do = tl.load(dout_ptr + map_offsets[:, None] + d[None, :], mask=rows_mask, other=0.0)
    row_stats = (bw * heads + h) * n + tq
    lse = tl.load(lse_ptr + row_stats, mask=tq < n, other=float("inf"))
    # delta = rowsum(P * dP) / rowsum(P) in fp32: rowsum(dO * O), but for O's rounding to the
    # input dtype, which the logit-scale gradient (dS * q.k summed over every window, scaled by
    # up to 100) magnifies several times over; dividing by rowsum(P) cancels the rounding of
    # lse, which is as large as the logits. A window wider than one key block takes a pass of
    # its own; one key block computes it in the pass below. Global attention (SEQUENCE) has no
    # logit scale nor table to sum dS into: it takes rowsum(dO * O), as flash attention does.
    delta = tl.zeros((BLOCK_M,), tl.float32)
    if SEQUENCE and not ONE_KEY_BLOCK:
        o = tl.load(out_ptr + map_offsets[:, None] + d[None, :], mask=rows_mask, other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    elif not ONE_KEY_BLOCK:
        p_sum = tl.zeros((BLOCK_M,), tl.float32)
        for start in range(0, n, BLOCK_N):
            _, _, p, dp, _ = _key_block_scores(
                qn, do, lse, scale, win, start, n, H, W, Wh, Ww, sh, sw, qkv_base, stride_qh, stride_qw, channels,
                d, d_mask, fill_base, tq, qi, qj, q_region, table_ptr + h, heads, mask_value, bias_base,
                stride_bq, stride_bk, PADDING, HAS_FILL, COSINE, HAS_TABLE, SHIFTED, HAS_BIAS, IEEE, BLOCK_N,
                SEQUENCE)
            delta += tl.sum(p * dp, 1)
            p_sum += tl.sum(p, 1)
        delta = tl.where(p_sum > 0, delta / p_sum, 0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dscale = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, n, BLOCK_N):
        tk, kn, p, dp, raw = _key_block_scores(
            qn, do, lse, scale, win, start, n, H, W, Wh, Ww, sh, sw, qkv_base, stride_qh, stride_qw, channels,
            d, d_mask, fill_base, tq, qi, qj, q_region, table_ptr + h, heads, mask_value, bias_base,
            stride_bq, stride_bk, PADDING, HAS_FILL, COSINE, HAS_TABLE, SHIFTED, HAS_BIAS, IEEE, BLOCK_N,
            SEQUENCE)
        if ONE_KEY_BLOCK:
            p_sum = tl.sum(p, 1)
            delta = tl.where(p_sum > 0, tl.sum(p * dp, 1) / p_sum, 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds, kn, IEEE)
        if COSINE:
            dscale += tl.sum(ds * raw, 1)
        if BIAS_GRAD:
            pair = (tq < n)[:, None] & (tk < n)[None, :]
            tl.store(dbias_ptr + ((b * heads + h).to(tl.int64) * n + tq[:, None]) * n + tk[None, :], ds, mask=pair)
    tl.store(delta_ptr + row_stats, delta, mask=tq < n)
    dq = dq * scale
    if COSINE:
        dq = _unit_rows_bwd(q, dq)
        tl.store(dscale_ptr + (bw * tl.num_programs(2) + tl.program_id(2)) * heads + h, tl.sum(dscale, 0))
    dqkv_offsets = (b.to(tl.int64) * H * W + qy * W + qx) * (3 * channels) + h * head_dim
    tl.store(dqkv_ptr + dqkv_offsets[:, None] + d[None, :], dq.to(dqkv_ptr.dtype.element_ty), mask=rows_mask)


@triton.jit
def _window_attention_bwd_dkdv_kernel(
    qkv_ptr, out_ptr, dout_ptr, lse_ptr,  # as in the dq kernel
    delta_ptr,  # [B * nW, heads, N] fp32, read
    dqkv_ptr,  # [B, H, W, 3C] contiguous, k and v slots written
    dfill_ptr,  # [B * nW, cdiv(N, BLOCK_N), 2, C] fp32: dk, dv summed over the block's padding tokens
    table_ptr, fill_ptr, logit_scale_ptr, bias_ptr,
    stride_qb, stride_qh, stride_qw, stride_bb, stride_bh, stride_bq, stride_bk,
    H, W, Wh, Ww, sh, sw, num_windows, heads, head_dim, scale, mask_value,
    PADDING: tl.constexpr, SEQUENCE: tl.constexpr, SHIFTED: tl.constexpr, HAS_TABLE: tl.constexpr,
    HAS_FILL: tl.constexpr, COSINE: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bw = tl.program_id(0)
    h = tl.program_id(1)
    b, win, qkv_base, bias_base = _window_bases(bw, h, num_windows, head_dim, qkv_ptr, stride_qb, bias_ptr,
                                                stride_bb, stride_bh)
    n = Wh * Ww
    channels = heads * head_dim
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    fill_base = fill_ptr + h * head_dim
    scale = _head_scale(logit_scale_ptr, h, scale, COSINE)

    tk = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    ki, kj, ky, kx, k_real, k_region = _frame(win, tk, H, W, Wh, Ww, sh, sw, PADDING, SEQUENCE)
    k_offsets = _map_offsets(ky, kx, stride_qh, stride_qw)
    k = _load_rows(qkv_base + channels, k_offsets, k_real, tk < n, d, d_mask, fill_base + channels, HAS_FILL)
    v = _load_rows(qkv_base + 2 * channels, k_offsets, k_real, tk < n, d, d_mask, fill_base + 2 * channels, HAS_FILL)
    kn = _unit_rows(k) if COSINE else k

    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, n, BLOCK_M):
        tq = start + tl.arange(0, BLOCK_M)
        qi, qj, qy, qx, q_real, q_region = _frame(win, tq, H, W, Wh, Ww, sh, sw, PADDING, SEQUENCE)
        q = _load_rows(qkv_base, _map_offsets(qy, qx, stride_qh, stride_qw), q_real, tq < n, d, d_mask, fill_base, HAS_FILL)
        qn = _unit_rows(q) if COSINE else q
        map_offsets = (b.to(tl.int64) * H * W + qy * W + qx) * channels + h * head_dim
        do = tl.load(dout_ptr + map_offsets[:, None] + d[None, :], mask=q_real[:, None] & d_mask[None, :], other=0.0)
        row_stats = (bw * heads + h) * n + tq
        lse = tl.load(lse_ptr + row_stats, mask=tq < n, other=float("inf"))
        delta = tl.load(delta_ptr + row_stats, mask=tq < n, other=0.0)
        _, s = _logits(qn, kn, scale, tq, qi, qj, q_region, tk, ki, kj, k_region, n, table_ptr + h, heads, Wh, Ww,
                       mask_value, bias_base, stride_bq, stride_bk, HAS_TABLE, SHIFTED, HAS_BIAS, IEEE)
        p = _exp(s - lse[:, None])
        dv += _dot(tl.trans(p), do, IEEE)
        ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
        dk += _dot(tl.trans(ds), qn, IEEE)
    dk = dk * scale
    if COSINE:
        dk = _unit_rows_bwd(k, dk)
    dqkv_offsets = (b.to(tl.int64) * H * W + ky * W + kx) * (3 * channels) + h * head_dim
    rows_mask = k_real[:, None] & d_mask[None, :]
    tl.store(dqkv_ptr + dqkv_offsets[:, None] + channels + d[None, :], dk.to(dqkv_ptr.dtype.element_ty), mask=rows_mask)
    tl.store(dqkv_ptr + dqkv_offsets[:, None] + 2 * channels + d[None, :], dv.to(dqkv_ptr.dtype.element_ty),
             mask=rows_mask)
    if HAS_FILL:
        padding = ((tk < n) & ~k_real)[:, None]
        dfill_base = dfill_ptr + (bw * tl.num_programs(2) + tl.program_id(2)) * 2 * channels + h * head_dim + d
        tl.store(dfill_base, tl.sum(tl.where(padding, dk, 0.0), 0), mask=d_mask)
        tl.store(dfill_base + channels, tl.sum(tl.where(padding, dv, 0.0), 0), mask=d_mask)


@triton.jit
def _window_attention_bwd_tile_kernel(
    qkv_ptr, dout_ptr, lse_ptr,  # as in the dq kernel
    dqkv_ptr,  # [B, H, W, 3C] contiguous, written
    dscale_ptr,  # [programs along axis 0, 1, heads] fp32: dS * q.k summed over the program's windows (COSINE)
    dsum_ptr,  # [programs along axis 0, heads, N, N] fp32: dS summed over the program's windows (TABLE_GRAD)
    dfill_ptr,  # [programs along axis 0, 1, 2, C] fp32: dk, dv summed over the program's padding tokens (HAS_FILL)
    table_ptr, fill_ptr, logit_scale_ptr,
    stride_qb, stride_qh, stride_qw,
    H, W, Wh, Ww, sh, sw, num_windows, total_windows, heads, head_dim, scale, mask_value,
    PADDING: tl.constexpr, SHIFTED: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_FILL: tl.constexpr,
    COSINE: tl.constexpr, TABLE_GRAD: tl.constexpr, IEEE: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # The backward of one-tile windows in one pass: a window's P, dP and dS give its dq, dk and dv at
    # once, walked as the one-tile forward walks them.
    h = tl.program_id(1)
    n = Wh * Ww
    channels = heads * head_dim
    t, i, j, in_window, d, d_mask, shared, fill_base, scale = _tile_head(
        table_ptr, fill_ptr, logit_scale_ptr, h, heads, head_dim, scale, Wh, Ww, HAS_TABLE, COSINE, BLOCK, BLOCK_D)
    dsum = tl.zeros((BLOCK, BLOCK), tl.float32)
    dscale = tl.zeros((BLOCK,), tl.float32)
    dfill_k = tl.zeros((BLOCK_D,), tl.float32)
    dfill_v = tl.zeros((BLOCK_D,), tl.float32)
    window_rows = tl.cdiv(H, Wh)
    windows_per_row = tl.cdiv(W, Ww)
    image, wrow, wcol, step_image, step_row, step_col = _walk_start(tl.program_id(0), tl.num_programs(0),
                                                                    num_windows, windows_per_row)
    for bw in range(tl.program_id(0), total_windows, tl.num_programs(0)):
        y, x, real, q, k, v = _tile_window(
            qkv_ptr + image.to(tl.int64) * stride_qb + h * head_dim, fill_base, wrow * Wh, wcol * Ww, t, i, j,
            in_window, d, d_mask, stride_qh, stride_qw, H, W, Wh, Ww, sh, sw, channels, PADDING, HAS_FILL)
        qn = _unit_rows(q) if COSINE else q
        kn = _unit_rows(k) if COSINE else k
        rows = (image.to(tl.int64) * H * W + y * W + x) * channels + h * head_dim
        rows_mask = real[:, None] & d_mask[None, :]
        do = tl.load(dout_ptr + rows[:, None] + d[None, :], mask=rows_mask, other=0.0)
        lse = tl.load(lse_ptr + (bw * heads + h) * n + t, mask=in_window, other=float("inf"))
        raw = _dot(qn, tl.trans(kn), IEEE)
        s = _shift_masked(raw * (scale * LOG2E) + shared, wrow, wcol, i, j, H, W, Wh, Ww, sh, sw, mask_value * LOG2E,
                          SHIFTED)
        p = _exp2(s - lse[:, None] * LOG2E)
        dp = _dot(do, tl.trans(v), IEEE)
        p_sum = tl.sum(p, 1)
        delta = tl.where(p_sum > 0, tl.sum(p * dp, 1) / p_sum, 0.0)  # D as the dq kernel computes it
        ds = p * (dp - delta[:, None])
        dq = _dot(ds, kn, IEEE) * scale
        dk = _dot(tl.trans(ds), qn, IEEE) * scale
        dv = _dot(tl.trans(p), do, IEEE)
        if COSINE:
            dscale += tl.sum(ds * raw, 1)
            dq = _unit_rows_bwd(q, dq)
            dk = _unit_rows_bwd(k, dk)
        if TABLE_GRAD:
            dsum += ds
        if HAS_FILL:
            padding = (in_window & ~real)[:, None]
            dfill_k += tl.sum(tl.where(padding, dk, 0.0), 0)
            dfill_v += tl.sum(tl.where(padding, dv, 0.0), 0)
        dqkv_rows = (image.to(tl.int64) * H * W + y * W + x) * (3 * channels) + h * head_dim
        dqkv = dqkv_ptr + dqkv_rows[:, None] + d[None, :]
        tl.store(dqkv, dq.to(dqkv_ptr.dtype.element_ty), mask=rows_mask)
        tl.store(dqkv + channels, dk.to(dqkv_ptr.dtype.element_ty), mask=rows_mask)
        tl.store(dqkv + 2 * channels, dv.to(dqkv_ptr.dtype.element_ty), mask=rows_mask)
        image, wrow, wcol = _walk_next(image, wrow, wcol, step_image, step_row, step_col, window_rows,
                                       windows_per_row)
    program = tl.program_id(0)
    if COSINE:
        tl.store(dscale_ptr + program * heads + h, tl.sum(dscale, 0))
    if TABLE_GRAD:
        pair = in_window[:, None] & in_window[None, :]
        dsum_rows = (program * heads + h).to(tl.int64) * n + t
        tl.store(dsum_ptr + dsum_rows[:, None] * n + t[None, :], dsum, mask=pair)
    if HAS_FILL:
        dfill_base = dfill_ptr + program * 2 * channels + h * head_dim + d
        tl.store(dfill_base, dfill_k, mask=d_mask)
        tl.store(dfill_base + channels, dfill_v, mask=d_mask)


@triton.jit
def _window_attention_bwd_dtable_kernel(
    qkv_ptr, out_ptr, dout_ptr, lse_ptr, delta_ptr,  # as in the dk/dv kernel
    dsum_ptr,  # [chunks, heads, N, N] fp32: dS summed over the chunk's windows
    table_ptr, fill_ptr, logit_scale_ptr,
    stride_qb, stride_qh, stride_qw,
    H, W, Wh, Ww, sh, sw, num_windows, total_windows, windows_per_chunk, heads, head_dim, scale, mask_value,
    PADDING: tl.constexpr, SHIFTED: tl.constexpr, HAS_FILL: tl.constexpr, COSINE: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    h = tl.program_id(1)
    n = Wh * Ww
    key_blocks = tl.cdiv(n, BLOCK_N)
    tq = (tl.program_id(2) // key_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    key_start = (tl.program_id(2) % key_blocks) * BLOCK_N
    tk = key_start + tl.arange(0, BLOCK_N)
    channels = heads * head_dim
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    fill_base = fill_ptr + h * head_dim
    scale = _head_scale(logit_scale_ptr, h, scale, COSINE)
    total = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    first = chunk * windows_per_chunk
    for bw in range(first, tl.minimum(first + windows_per_chunk, total_windows)):
        b = bw // num_windows
        win = bw % num_windows
        qkv_base = qkv_ptr + b.to(tl.int64) * stride_qb + h * head_dim
        qi, qj, qy, qx, q_real, q_region = _frame(win, tq, H, W, Wh, Ww, sh, sw, PADDING)
        q = _load_rows(qkv_base, _map_offsets(qy, qx, stride_qh, stride_qw), q_real, tq < n, d, d_mask, fill_base, HAS_FILL)
        tk, ki, kj, k_region, k, v = _key_block(win, key_start, n, H, W, Wh, Ww, sh, sw, qkv_base, stride_qh, stride_qw,
                                                channels, d, d_mask, fill_base, PADDING, HAS_FILL, BLOCK_N)
        if COSINE:
            q = _unit_rows(q)
            k = _unit_rows(k)
        map_offsets = (b.to(tl.int64) * H * W + qy * W + qx) * channels + h * head_dim
        do = tl.load(dout_ptr + map_offsets[:, None] + d[None, :], mask=q_real[:, None] & d_mask[None, :], other=0.0)
        row_stats = (bw * heads + h) * n + tq
        lse = tl.load(lse_ptr + row_stats, mask=tq < n, other=float("inf"))
        delta = tl.load(delta_ptr + row_stats, mask=tq < n, other=0.0)
        _, s = _logits(q, k, scale, tq, qi, qj, q_region, tk, ki, kj, k_region, n, table_ptr + h, heads, Wh, Ww,
                       mask_value, table_ptr, 0, 0, True, SHIFTED, False, IEEE)
        total += _exp(s - lse[:, None]) * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
    pair = (tq < n)[:, None] & (tk < n)[None, :]
    tl.store(dsum_ptr + ((chunk * heads + h).to(tl.int64) * n + tq[:, None]) * n + tk[None, :], total, mask=pair)


@triton.jit
def _relative_bias_grad_kernel(
    dsum_ptr,  # [chunks, heads, N, N] fp32
    dtable_ptr,  # [(2Wh-1)(2Ww-1), heads] fp32
    chunks, heads, Wh, Ww, BLOCK_E: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Table row e holds offset (di, dj): its pairs are query (i, j) with key (i - di, j - dj), so
    # each row gathers one masked diagonal of the [N, N] sums.
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)[:, None]
    h = tl.program_id(1)
    n = Wh * Ww
    query = tl.arange(0, BLOCK_P)[None, :]
    ki = query // Ww - (e // (2 * Ww - 1) - (Wh - 1))
    kj = query % Ww - (e % (2 * Ww - 1) - (Ww - 1))
    mask = (e < (2 * Wh - 1) * (2 * Ww - 1)) & (query < n) & (ki >= 0) & (ki < Wh) & (kj >= 0) & (kj < Ww)
    offsets = query * n + ki * Ww + kj
    total = tl.zeros((BLOCK_E, BLOCK_P), tl.float32)
    for chunk in range(0, chunks):
        total += tl.load(dsum_ptr + (chunk * heads + h).to(tl.int64) * n * n + offsets, mask=mask, other=0.0)
    rows = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    tl.store(dtable_ptr + rows * heads + h, tl.sum(total, 1), mask=rows < (2 * Wh - 1) * (2 * Ww - 1))


@dataclass(frozen=True)
class Config:
    """Tile sizes of one launch: BLOCK_M query rows by BLOCK_N key rows, and its warps."""

    block_m: int
    block_n: int
    num_warps: int


# Single-tile configs for windows up to 64 tokens first, then the tiled ones. Warps are chosen by the
# compiler's resource report (``python -m vitkernels aot``; ptxas for sm_90 through Triton 3.6,
# head_dim 32): the one-tile forward of a 64x64 tile takes 219 registers with 4 warps (bf16; fp32
# spills 312 bytes of stack per thread) and 125 with 8 (bf16 and fp16; 148 to 152 with fp32 inputs
# or parameters; no stack), so with 8 warps two CTAs of the 16-bit forward share a multiprocessor:
# 16 warps to hide the window loads' latency, against 8 with 4 warps.
CONFIGS = (Config(16, 16, 1), Config(32, 32, 2), Config(64, 64, 8), Config(128, 64, 8))
MAX_WARPS = 8  # 16 warps would cap a thread at 128 registers, which these kernels exceed
# Registers per thread the fp16 and bf16 one-tile forward may use on sm_90 (ptxas's maxnreg) for a
# map that needs no padding, BLOCK_D at most 32 and the parameters in the input's dtype, None for
# the compiler's choice. With HALF_STAGES = 3 Swin-T stage 1's shifted forward takes 199 registers,
# two programs of 4 warps per multiprocessor (65536 / (200 x 128)); capped at 168 it takes 167 with
# no spill, and three programs fit (the cosine variant too). At 168 a padded map spills 32 bytes
# per thread and fp32 parameters (autocast) 56; sm_80 spills at 168 (24 bytes for the unpadded map)
# and keeps two programs either way, as does head_dim 64, whose three stages take 80 KiB of shared
# memory. The benchmarks time the compiler's choice beside the cap.
TILE_FORWARD_MAX_REGISTERS: Optional[int] = 168
# The backward of head dims above 64 (BLOCK_D 128; ViT-H's 80 too) beyond 32 tokens: bytes of stack
# per thread of the dq, dk/dv and table kernels 176 / 144 / 264, against 1592 / 1568 / 1568 for a
# 64x64 tile with 8 warps (bf16, cosine attention, same report).
WIDE_HEAD_BACKWARD = Config(32, 32, 8)
# The fp32 forward of those head dims beyond 32 tokens (FP32_STAGES): a 64x64 tile takes 96 KiB of
# shared memory and spills 216 bytes per thread on sm_90, a 64x32 tile 64 KiB and 48 bytes.
WIDE_HEAD_FP32_FORWARD = Config(64, 32, 8)


def prune_configs(tokens: int, head_dim: int, backward: bool = False, fp32: bool = False) -> Config:
    """The one config launched for windows of ``tokens`` tokens (no autotuning: it cannot run under
    the interpreter, and every launched config is compiled ahead of time).

    The backward kernels hold dS, P and their index tensors beside the gradient accumulators: with
    the forward's warps they spill (bf16 with cosine attention, bytes of stack per thread of the dq,
    dk/dv and table kernels: 16x16 tiles 16 / 40 / 160, 32x32 tiles 80 / 160 / 352), with twice
    as many not, so they launch with twice the forward's warps, up to :data:`MAX_WARPS` (64x64
    tiles: 24 / 0 / 0 with 8 warps, 240 / 280 / 688 with 4); since then the dq and dk/dv kernels have
    shrunk, and :func:`launch_warps` gives them one warpgroup in fp16 and bf16. ``fp32``: the
    forward's inputs are fp32.
    """
    if head_dim > 64 and tokens > CONFIGS[1].block_n and (backward or fp32):
        return WIDE_HEAD_BACKWARD if backward else WIDE_HEAD_FP32_FORWARD
    for config in CONFIGS[:3]:
        if tokens <= config.block_n:
            break
    else:
        config = CONFIGS[2] if backward or head_dim > 64 else CONFIGS[3]
    return replace(config, num_warps=min(2 * config.num_warps, MAX_WARPS)) if backward else config


@dataclass(frozen=True)
class _Launch:
    """Sizes, strides and flags every kernel of one call takes."""

    grid_windows: int
    tokens: int
    head_dim: int
    strides: tuple
    sizes: tuple
    flags: dict
    stages: int  # software pipeline depth of the attention kernels


def _prepare(qkv, num_heads, window, shift, bias_table, qkv_bias, logit_scale, scale, pad_first, mask_value, bias):
    batch, height, width, three_c = qkv.shape
    head_dim = three_c // 3 // num_heads
    (wh, ww), (sh, sw) = window, shift
    num_windows = -(-height // wh) * -(-width // ww)
    tokens = wh * ww
    bias_strides = (0, 0, 0, 0) if bias is None else bias.expand(batch, num_heads, tokens, tokens).stride()
    padded = bool(height % wh or width % ww)
    # The qkv bias is read only for padding tokens, so an unpadded map (every Swin stage at 224)
    # launches without it; the kernels then leave out its selects and, backward, its sums.
    padding = (PAD_THEN_SHIFT if pad_first else SHIFT_THEN_PAD) if padded else NO_PADDING
    flags = dict(PADDING=padding.value, SEQUENCE=height == wh == 1 and ww == width and not (sh or sw),
                 SHIFTED=bool(sh or sw), HAS_TABLE=bias_table is not None,
                 HAS_FILL=qkv_bias is not None and padded, COSINE=logit_scale is not None, HAS_BIAS=bias is not None,
                 IEEE=qkv.dtype == torch.float32)
    scale = head_dim**-0.5 if scale is None else scale
    return _Launch(
        grid_windows=batch * num_windows, tokens=tokens, head_dim=head_dim,
        strides=(qkv.stride(0), qkv.stride(1), qkv.stride(2), *bias_strides),
        sizes=(height, width, wh, ww, sh, sw, num_windows, num_heads, head_dim, float(scale), float(mask_value)),
        flags=flags, stages=pipeline_stages(qkv.dtype == torch.float32),
    )


def pipeline_stages(fp32: bool) -> int:
    """The attention kernels' pipeline depth: :data:`FP32_STAGES` for fp32 inputs, else :data:`HALF_STAGES`."""
    return FP32_STAGES if fp32 else HALF_STAGES


def tile_forward_registers(block_d: int, fp32: bool, fp32_params: bool, padded: bool,
                           capability: tuple[int, int]) -> Optional[int]:
    """maxnreg of a one-tile forward launch on a device of compute ``capability``: the cap
    :data:`TILE_FORWARD_MAX_REGISTERS` for fp16 and bf16 inputs and parameters, a map that needs no
    padding and BLOCK_D at most 32 on sm_90 and later, else None (the compiler's choice)."""
    if TILE_FORWARD_MAX_REGISTERS is None or fp32 or fp32_params or padded or block_d > 32 or capability < (9, 0):
        return None
    return TILE_FORWARD_MAX_REGISTERS


def _tile_sizes(launch: _Launch) -> tuple:
    """The one-tile kernels' strides and sizes, from stride_qb through mask_value."""
    return (*launch.strides[:3], *launch.sizes[:7], launch.grid_windows, *launch.sizes[7:])


def _flags(launch: _Launch, *unused: str) -> dict:
    """The call's flags for a kernel that takes all but ``unused`` and SEQUENCE (the kernels of
    blocks of keys have it, for global attention)."""
    return {k: v for k, v in launch.flags.items() if k not in unused and k != "SEQUENCE"}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _contiguous(t: Optional[torch.Tensor], fallback: torch.Tensor) -> torch.Tensor:
    return fallback if t is None else t.reshape(-1).contiguous()


def _parameters(qkv, bias_table, qkv_bias, logit_scale) -> tuple:
    """The table, qkv bias and logit scale as the kernels take them (qkv where absent)."""
    return _contiguous(bias_table, qkv), _contiguous(qkv_bias, qkv), _contiguous(logit_scale, qkv)


def window_attention_fwd(qkv, num_heads, window, shift, bias_table=None, qkv_bias=None, logit_scale=None, scale=None,
                         pad_first=False, mask_value=-100.0, bias=None):
    """Fused window attention forward.

    Args:
        qkv: [B, H, W, 3C] fp16 / bf16 / fp32, last dim (3, heads, head_dim); other strides free.
        num_heads, window, shift, bias_table ([(2Wh-1)(2Ww-1), heads]), qkv_bias ([3C]),
        logit_scale ([heads] values), scale, pad_first, mask_value: as
            :func:`vitkernels.ops.window_attention`.
        bias: additive logits bias broadcastable to [B, heads, N, N] (global attention), or None.

    Returns:
        (out [B, H, W, C] contiguous in qkv's dtype, lse [B * nW, heads, N] fp32).
    """
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    launch = _prepare(qkv, num_heads, window, shift, bias_table, qkv_bias, logit_scale, scale, pad_first,
                      mask_value, bias)
    batch, height, width, three_c = qkv.shape
    out = qkv.new_empty(batch, height, width, three_c // 3)
    lse = torch.empty(launch.grid_windows, num_heads, launch.tokens, device=qkv.device, dtype=torch.float32)
    config = prune_configs(launch.tokens, launch.head_dim, fp32=qkv.dtype == torch.float32)
    tensors = _parameters(qkv, bias_table, qkv_bias, logit_scale)
    block_d = _block_d(launch.head_dim)
    if one_tile(launch.tokens, config) and bias is None:
        kernel = _window_attention_fwd_tile_kernel
        args = (qkv, out, lse, *tensors, *_tile_sizes(launch))
        options = dict(**_flags(launch, "HAS_BIAS"), BLOCK=config.block_m, BLOCK_D=block_d,
                       num_warps=launch_warps("tile", config, launch.head_dim, launch.flags), num_stages=launch.stages)
        device_capability = compute_capability(qkv.device) if qkv.is_cuda else (0, 0)
        fp32_params = any(t is not None and t.dtype == torch.float32 for t in (bias_table, qkv_bias, logit_scale))
        registers = tile_forward_registers(block_d, qkv.dtype == torch.float32, fp32_params,
                                           launch.flags["PADDING"] != NO_PADDING.value, device_capability)
        if registers is not None:
            options["maxnreg"] = registers
        programs = window_programs(qkv.device, launch.grid_windows, num_heads,
                                   lambda: resident_programs(kernel, args, options, qkv.device))
        kernel[(programs, num_heads)](*args, **options)
        return out, lse
    grid = (launch.grid_windows, num_heads, triton.cdiv(launch.tokens, config.block_m))
    _window_attention_fwd_kernel[grid](
        qkv, out, lse, *tensors, qkv if bias is None else bias, *launch.strides, *launch.sizes, **launch.flags,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=block_d, num_warps=config.num_warps,
        num_stages=launch.stages,
    )
    return out, lse


def one_tile(tokens: int, config: Config) -> bool:
    """Whether a window of ``tokens`` tokens is one square tile of ``config``: the forward then runs
    :func:`_window_attention_fwd_tile_kernel`."""
    return config.block_m == config.block_n and tokens <= config.block_n


def window_programs(device: torch.device, windows: int, heads: int, per_multiprocessor: Callable[[], int]) -> int:
    """Programs per head of a one-tile kernel: as many over all heads as the device holds at once
    (``per_multiprocessor()`` on each multiprocessor, as the compiled kernel's registers and shared
    memory allow), so that they run in one wave; at most one per window. A few under the
    interpreter, so that each walks several windows."""
    if device.type != "cuda":
        return max(1, min(windows, 2))
    return max(1, min(windows, per_multiprocessor() * multiprocessors(device) // heads))


def launch_warps(kernel: str, config: Config, head_dim: int, flags: dict) -> int:
    """Warps of a launch of ``kernel`` (a name of :data:`KERNELS`) with ``config``.

    In fp16 and bf16 a 64-row tile takes one warpgroup of 4 warps where the compiler's report favours
    it: one warpgroup holds the whole tile, so the rows' max and sum stay in it and P stays in
    registers for the P V product, where 8 warps split the keys over two warpgroups, which exchange
    both through shared memory. By that report (sm_90, Triton 3.6, bf16, 2 pipeline stages; warps
    times instructions per window or key block of the loop, 4 warps against 8):

    * one-tile forward, Swin-T stage 1 (head_dim 32): shifted 4 x 958 against 8 x 649, unshifted
      4 x 561 against 8 x 481, at 165 and 127 registers (3 and 4 programs per multiprocessor); head
      dims up to 64 alike;
    * one-tile backward: 4 x 1122 against 8 x 838, unshifted 4 x 729 against 8 x 641, 255 registers
      either way (with 4 warps 5 and 1 spill instructions in the loop); head dims above 32, cosine
      attention and padded maps spill 19 to 313 instructions' worth within the loop with 4 warps;
    * dq and dk/dv kernels (32- and 64-row tiles): ViT-B (head_dim 64) 4 x 414 against 8 x 396 and
      4 x 518 against 8 x 542, SwinV2's 16x16 cosine windows 4 x 2222 against 8 x 1688 and
      4 x 1388 against 8 x 1062, head_dim 128 alike, no spill within the loops.

    Those take 4 warps; fp32 launches (whose 4-warp forward spills), the table-gradient kernel
    (which spills within its loop with 4), the dq and dk/dv kernels of an additive bias (ViT-B's dq
    spills 112 bytes per thread on sm_90, 600 on sm_80), the tiled forward (whose 128-row tiles give
    each warpgroup rows of its own) and tiles of under 4 warps keep ``config``'s warps.
    """
    if flags["IEEE"] or config.num_warps <= WARPGROUP:
        return config.num_warps
    if kernel in ("dq", "dkdv") and not flags["HAS_BIAS"]:
        return WARPGROUP
    if config.block_m == WARPGROUP_TILE and kernel == "tile" and head_dim <= 64:
        return WARPGROUP
    if config.block_m == WARPGROUP_TILE and kernel == "tile_bwd" and head_dim <= 32 and not (
            flags["COSINE"] or flags["HAS_FILL"]):
        return WARPGROUP
    return config.num_warps


def _table_chunks(launch: _Launch) -> tuple[int, int]:
    """(windows per chunk, chunks) for summing dS into [chunks, heads, N, N] within the buffer budget."""
    heads = launch.sizes[7]
    per_chunk = triton.cdiv(launch.grid_windows, max(1, DTABLE_BUFFER_ELEMENTS // (heads * launch.tokens ** 2)))
    return per_chunk, triton.cdiv(launch.grid_windows, max(per_chunk, 1))


def _recompute_dsum(stats, tensors, launch, config):
    """dS summed per chunk of windows by its own kernel, for windows wider than one key block."""
    height, width, wh, ww, sh, sw, num_windows, heads, head_dim, scale, mask_value = launch.sizes
    per_chunk, chunks = _table_chunks(launch)
    dsum = torch.empty(chunks, heads, launch.tokens, launch.tokens, device=stats[0].device, dtype=torch.float32)
    tiles = triton.cdiv(launch.tokens, config.block_m) * triton.cdiv(launch.tokens, config.block_n)
    flags = _flags(launch, "HAS_TABLE", "HAS_BIAS")
    _window_attention_bwd_dtable_kernel[(chunks, heads, tiles)](
        *stats, dsum, *tensors, *launch.strides[:3],
        height, width, wh, ww, sh, sw, num_windows, launch.grid_windows, per_chunk, heads, head_dim, scale,
        mask_value, **flags, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=_block_d(head_dim),
        num_warps=config.num_warps, num_stages=launch.stages,
    )
    return dsum


def _gather_table(dsum, bias_table, launch):
    """The bias-table gradient from dS sums [chunks, heads, N, N], reduced over chunks in order."""
    wh, ww, heads = launch.sizes[2], launch.sizes[3], launch.sizes[7]
    dtable = torch.empty(bias_table.shape, device=bias_table.device, dtype=torch.float32)
    block_p = triton.next_power_of_2(launch.tokens)
    block_e = max(1, GATHER_TILE // block_p)
    _relative_bias_grad_kernel[(triton.cdiv(dtable.shape[0], block_e), heads)](
        dsum, dtable, dsum.shape[0], heads, wh, ww, BLOCK_E=block_e, BLOCK_P=block_p,
        num_stages=aot.NUM_STAGES,
    )
    return dtable.to(bias_table.dtype)


def window_attention_bwd(dout, qkv, out, lse, num_heads, window, shift, bias_table=None, qkv_bias=None,
                         logit_scale=None, scale=None, pad_first=False, mask_value=-100.0, bias=None,
                         needs_grad=(True, True, True, True, True)):
    """Fused window attention backward (flash attention's, P recomputed from ``lse``).

    Args:
        dout: [B, H, W, C] gradient of the output; qkv ... bias: the forward's inputs; out, lse: the
            forward's outputs.
        needs_grad: which of (qkv, bias_table, qkv_bias, logit_scale, bias) need a gradient.

    Returns:
        (dqkv [B, H, W, 3C], dtable, dqkv_bias [3C], dlogit_scale (logit_scale's shape), dbias (bias's
        shape)), each None where not needed; fp32 partial sums are reduced in a fixed order.
    """
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()
    dout = dout.contiguous()
    launch = _prepare(qkv, num_heads, window, shift, bias_table, qkv_bias, logit_scale, scale, pad_first,
                      mask_value, bias)
    need_qkv, need_table, need_fill, need_scale, need_bias = (
        need and t is not None for need, t in zip(needs_grad, (qkv, bias_table, qkv_bias, logit_scale, bias)))
    tokens, heads, head_dim = launch.tokens, num_heads, launch.head_dim
    channels = heads * head_dim
    config = prune_configs(tokens, head_dim, backward=True)
    tensors = _parameters(qkv, bias_table, qkv_bias, logit_scale)
    f32 = dict(device=qkv.device, dtype=torch.float32)
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    if one_tile(tokens, config) and bias is None:
        kernel = _window_attention_bwd_tile_kernel

        def args(dscale, dsum, dfill):  # the per-program sums are fp32 buffers sized by the program count
            return (qkv, dout, lse, dqkv, dscale, dsum, dfill, *tensors, *_tile_sizes(launch))

        options = dict(**_flags(launch, "HAS_BIAS"), TABLE_GRAD=need_table, BLOCK=config.block_m,
                       BLOCK_D=_block_d(head_dim), num_warps=launch_warps("tile_bwd", config, head_dim, launch.flags),
                       num_stages=launch.stages)
        programs = window_programs(qkv.device, launch.grid_windows, heads,
                                   lambda: resident_programs(kernel, args(lse, lse, lse), options, qkv.device))
        dscale = torch.empty(programs, 1, heads, **f32) if launch.flags["COSINE"] else lse
        dsum = torch.empty(programs, heads, tokens, tokens, **f32) if need_table else lse
        dfill = torch.empty(programs, 1, 2, channels, **f32) if launch.flags["HAS_FILL"] else lse
        kernel[(programs, heads)](*args(dscale, dsum, dfill), **options)
        dbias = None
    else:
        dscale, dsum, dfill, dbias = _backward_by_blocks(dout, qkv, out, lse, dqkv, tensors, launch, config,
                                                         need_table, need_bias, bias)
    grads = [dqkv if need_qkv else None, None, None, None, None]
    if need_table:
        grads[1] = _gather_table(dsum, bias_table, launch)
    if need_fill:  # the k and v parts sum over padding tokens (none: zero); q's is zero
        dkv = dfill.sum((0, 1)).reshape(-1) if launch.flags["HAS_FILL"] else torch.zeros(2 * channels, **f32)
        grads[2] = torch.cat([torch.zeros(channels, **f32), dkv]).to(qkv_bias.dtype)
    if need_scale:
        grads[3] = _logit_scale_grad(dscale, logit_scale)
    if need_bias:
        grads[4] = dbias.sum_to_size(bias.shape).to(bias.dtype)
    return tuple(grads)


def _backward_by_blocks(dout, qkv, out, lse, dqkv, tensors, launch, config, need_table, need_bias, bias):
    """The dq, dk/dv and (for the table's gradient) dS-sum kernels of windows wider than one tile and
    of global attention: dqkv written, returns the partial sums (dscale, dsum, dfill) and dS for the
    bias (each the unused ``lse`` where not needed)."""
    tokens, heads, channels = launch.tokens, launch.sizes[7], launch.sizes[7] * launch.head_dim
    query_blocks, key_blocks = triton.cdiv(tokens, config.block_m), triton.cdiv(tokens, config.block_n)
    dense = qkv if bias is None else bias
    f32 = dict(device=qkv.device, dtype=torch.float32)
    delta = torch.empty_like(lse)
    dscale = torch.empty(launch.grid_windows, query_blocks, heads, **f32) if launch.flags["COSINE"] else lse
    dbias = torch.empty(qkv.shape[0], heads, tokens, tokens, **f32) if need_bias else lse
    dfill = torch.empty(launch.grid_windows, key_blocks, 2, channels, **f32) if launch.flags["HAS_FILL"] else lse
    common = dict(**launch.flags, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=_block_d(launch.head_dim),
                  num_stages=launch.stages)
    _window_attention_bwd_dq_kernel[(launch.grid_windows, heads, query_blocks)](
        qkv, out, dout, lse, delta, dqkv, dscale, dbias, *tensors, dense, *launch.strides, *launch.sizes,
        BIAS_GRAD=need_bias, ONE_KEY_BLOCK=key_blocks == 1, **common,
        num_warps=launch_warps("dq", config, launch.head_dim, launch.flags),
    )
    _window_attention_bwd_dkdv_kernel[(launch.grid_windows, heads, key_blocks)](
        qkv, out, dout, lse, delta, dqkv, dfill, *tensors, dense, *launch.strides, *launch.sizes, **common,
        num_warps=launch_warps("dkdv", config, launch.head_dim, launch.flags),
    )
    dsum = _recompute_dsum((qkv, out, dout, lse, delta), tensors, launch, config) if need_table else lse
    return dscale, dsum, dfill, dbias


def _logit_scale_grad(dscale, logit_scale):
    """d logit_scale = exp(clamped) * sum(dS * cos) where the clamp at log(100) lets it through."""
    raw = logit_scale.detach().reshape(-1).float()
    passes = (raw <= LOG_SCALE_MAX.value).float()
    grad = dscale.sum((0, 1)) * torch.exp(torch.clamp(raw, max=LOG_SCALE_MAX.value)) * passes
    return grad.reshape(logit_scale.shape).to(logit_scale.dtype)


# --- ahead-of-time compile registry ----------------------------------------------------------------

_POINTER_DTYPES = {"qkv_ptr": "act", "out_ptr": "act", "dout_ptr": "act", "dqkv_ptr": "act", "bias_ptr": "param",
                   "table_ptr": "param", "fill_ptr": "param", "logit_scale_ptr": "param"}
FLAGS = dict(PADDING=NO_PADDING.value, SEQUENCE=False, SHIFTED=True, HAS_TABLE=True, HAS_FILL=False, COSINE=False,
             HAS_BIAS=False,
             BIAS_GRAD=False, TABLE_GRAD=True, ONE_KEY_BLOCK=True)
KERNELS = {"tile": _window_attention_fwd_tile_kernel, "fwd": _window_attention_fwd_kernel,
           "tile_bwd": _window_attention_bwd_tile_kernel, "dq": _window_attention_bwd_dq_kernel,
           "dkdv": _window_attention_bwd_dkdv_kernel, "dtable": _window_attention_bwd_dtable_kernel}


def register_specialization(kernel: str, dtype: str, config: Config, head_dim: int, param_dtype: Optional[str] = None,
                            capability: tuple[int, int] = (9, 0), **flags) -> None:
    """Registers ``KERNELS[kernel]`` for the AOT compile check with qkv in ``dtype`` ("fp16", "bf16",
    "fp32"), parameters (table, qkv bias, logit scale, bias) in ``param_dtype`` (default: ``dtype``;
    fp32 under autocast), and ``flags`` over :data:`FLAGS`, as it is launched on a device of compute
    ``capability`` (the one-tile forward's register cap)."""
    kernel_name, kernel = kernel, KERNELS[kernel]
    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    types = {"act": dtype, "param": param_dtype or dtype}
    signature = {}
    for name in names:
        if "constexpr" in str(params[name].annotation):
            continue
        if name.endswith("_ptr"):
            signature[name] = f"*{types.get(_POINTER_DTYPES.get(name), 'fp32')}:16"
        elif name.startswith("stride") or (name == "head_dim" and head_dim % 16 == 0):
            signature[name] = "i32:16"  # as Triton's launcher specializes multiples of 16
        elif name in ("scale", "mask_value"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    values = {**FLAGS, **flags, "IEEE": dtype == "fp32", "BLOCK": config.block_m, "BLOCK_M": config.block_m,
              "BLOCK_N": config.block_n, "BLOCK_D": _block_d(head_dim)}
    config = replace(config, num_warps=launch_warps(kernel_name, config, head_dim, values))
    constexprs = {k: v for k, v in values.items() if k in names}
    suffix = "" if param_dtype is None else f"_params_{param_dtype}"
    flag_names = ", ".join(f"{k}={v}" for k, v in sorted(flags.items()) if v != FLAGS.get(k) and k in names)
    registers = (tile_forward_registers(_block_d(head_dim), dtype == "fp32", param_dtype == "fp32",
                                        values["PADDING"] != NO_PADDING.value, capability)
                 if kernel_name == "tile" else None)
    options = {} if registers is None else {"maxnreg": registers}
    name = (f"{kernel.fn.__name__}[{dtype}{suffix}, {config.block_m}x{config.block_n}, d={head_dim}"
            f"{', ' + flag_names if flag_names else ''}, warps={config.num_warps}"
            f"{f', maxnreg={registers}' if registers else ''}]")
    aot.register(kernel, signature=signature, constexprs=constexprs, num_warps=config.num_warps,
                 num_stages=pipeline_stages(dtype == "fp32"), name=name, options=options)


def _register_window_kernels() -> None:
    """Swin-T's launches (window 7: the 64x64 single tile, head_dim 32; at 224 no stage is padded) in
    each dtype and feature set, padded maps in both zoo orders, the other tile configs once, SwinV2's
    window of several key blocks, and the backward of head_dim 128, where registers peak."""
    swin = CONFIGS[2]
    padded = dict(PADDING=SHIFT_THEN_PAD.value, HAS_FILL=True)
    register_specialization("tile", "fp16", swin, 32)
    register_specialization("tile", "fp32", swin, 32)
    register_specialization("fwd", "fp32", WIDE_HEAD_FP32_FORWARD, 128)
    register_specialization("tile", "bf16", swin, 32, param_dtype="fp32", PADDING=PAD_THEN_SHIFT.value, HAS_FILL=True)
    register_specialization("tile", "bf16", swin, 32, COSINE=True)
    register_specialization("tile", "bf16", swin, 32)
    register_specialization("tile", "bf16", swin, 32, capability=(8, 0))  # uncapped, as sm_80 runs it
    register_specialization("tile", "bf16", swin, 32, **padded)
    register_specialization("tile", "fp16", CONFIGS[0], 32)
    register_specialization("fwd", "fp16", CONFIGS[3], 32)
    swin_backward = prune_configs(49, 32, backward=True)
    register_specialization("tile_bwd", "bf16", swin_backward, 32)
    register_specialization("tile_bwd", "bf16", swin_backward, 32, **padded)
    register_specialization("tile_bwd", "bf16", swin_backward, 32, COSINE=True)
    register_specialization("tile_bwd", "fp32", swin_backward, 32)
    for kernel in ("dq", "dkdv", "dtable"):  # SwinV2's 16x16 window: 256 tokens, four key blocks
        register_specialization(kernel, "bf16", prune_configs(256, 32, backward=True), 32, COSINE=True,
                                ONE_KEY_BLOCK=False)
    for kernel in ("dq", "dkdv", "dtable"):
        register_specialization(kernel, "bf16", prune_configs(49, 128, backward=True), 128, ONE_KEY_BLOCK=False,
                                **padded)
    block_p = 64
    aot.register(_relative_bias_grad_kernel, signature={"dsum_ptr": "*fp32:16", "dtable_ptr": "*fp32:16",
                                                         "chunks": "i32", "heads": "i32", "Wh": "i32", "Ww": "i32"},
                 constexprs={"BLOCK_E": GATHER_TILE // block_p, "BLOCK_P": block_p})


_register_window_kernels()
