"""Index arithmetic past 2^31 elements, without the memory.

The inputs are fp16 strided views into one lazily allocated buffer of more than 2^31 elements:
only the pages the views cover are ever touched. Either the batch stride puts the last sample past
element 2^31 (a 32-bit batch offset would wrap), or, within one image, the row stride fits in 32 bits
but row * stride does not. Each backend computes on the view itself, the reference on the same view,
forward and backward.
"""
import os

import pytest
import torch

from op_cases import CASES, compare
from vitkernels import backends, ops

BATCH_STRIDE = 2**30 + 64  # sample 2 starts at element 2^31 + 128
ROW_STRIDE = 2**29 + 96  # row 7 starts past element 3 * 2^30
MAX_RSS_GROWTH = 1 << 30  # the buffers span 4 to 8 GiB; touching them would show


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _strided_view(values: torch.Tensor, strides: tuple) -> torch.Tensor:
    """``values`` copied into an fp16 view with ``strides`` of a buffer just large enough to hold it."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(values.shape, strides))
    try:
        buffer = torch.empty(span, dtype=torch.float16)
    except RuntimeError as err:
        pytest.skip(f"cannot reserve {span} fp16 elements of address space: {err}")
    view = buffer.as_strided(values.shape, strides)
    view.copy_(values)
    return view


def _far_batch(values: torch.Tensor) -> torch.Tensor:
    return _strided_view(values, (BATCH_STRIDE, *values[0].contiguous().stride()))


def _usable(op, backend):
    reason = backends.unavailable_reason(backend)
    if reason is None and "cpu" not in ops.backend_table(op)[backend].devices:
        reason = "runs CUDA tensors only; the views are CPU tensors"
    if reason:
        pytest.skip(f"{backend}: {reason}")


CPU_OPS = ["window_attention", "attention", "layernorm", "add_layernorm", "layernorm_mlp", "patch_embed"]
# The Triton kernels that read the input through its strides (the others take contiguous copies).
TRITON_OPS = ["window_attention", "attention"]


@pytest.mark.parametrize("op,backend", [(op, "cpu") for op in CPU_OPS] + [(op, "triton") for op in TRITON_OPS])
def test_batch_offset_past_2_31(op, backend):
    _usable(op, backend)
    case = CASES[op]
    before = _rss()
    masters = case.make(3)
    tensors = {k: t.half() if k in case.shared else _far_batch(t) for k, t in masters.items()}
    assert max(t.storage_offset() + (t.shape[0] - 1) * t.stride(0) for k, t in tensors.items()
               if k not in case.shared) >= 2**31
    compare(case, backend, tensors)
    assert _rss() - before < MAX_RSS_GROWTH, f"resident memory grew by {(_rss() - before) / 2**20:.0f} MiB"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_window_attention_row_offset_past_2_31(backend):
    _usable("window_attention", backend)
    case = CASES["window_attention"]
    before = _rss()
    masters = case.make(1)
    qkv = masters["qkv"][:, :8, :4]
    tensors = {"qkv": _strided_view(qkv, (10**9, ROW_STRIDE, qkv.shape[-1], 1)),
               **{k: masters[k].half() for k in case.shared}}
    assert (qkv.shape[1] - 1) * ROW_STRIDE >= 2**31 and ROW_STRIDE < 2**31
    compare(case, backend, tensors)
    assert _rss() - before < MAX_RSS_GROWTH, f"resident memory grew by {(_rss() - before) / 2**20:.0f} MiB"
