"""No leak: memory stays flat across 1,000 calls of each op (and 100 more with a backward)."""
import gc
import os

import pytest
import torch

from op_cases import CASES, gpu_op_backend_params, op_backend_params, run
from vitkernels import ops

CALLS, BACKWARD_CALLS, WARMUP = 1000, 100, 20
RSS_SLACK = 1 << 20  # allocator noise (up to ~200 KiB seen); one leaked output per call would pass it


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _calls(op, backend, tensors, count, backward_count):
    """``count`` forward calls without autograd, then ``backward_count`` forward and backward calls."""
    with torch.no_grad():
        for _ in range(count):
            CASES[op].call(backend, **tensors)
    for _ in range(backward_count):
        run(CASES[op], backend, tensors)


@pytest.mark.parametrize("op,backend", op_backend_params(("cpu",)))
def test_cpu_rss_is_flat(op, backend):
    tensors = {k: t.float() for k, t in CASES[op].make(2).items()}
    _calls(op, backend, tensors, WARMUP, WARMUP)
    gc.collect()
    before = _rss()
    _calls(op, backend, tensors, CALLS, BACKWARD_CALLS)
    gc.collect()
    grown = _rss() - before
    assert grown <= RSS_SLACK, f"{op} on {backend}: resident memory grew {grown / 2**20:.1f} MiB over {CALLS} calls"


@pytest.mark.cuda
@pytest.mark.parametrize("op,backend", gpu_op_backend_params())
def test_cuda_allocated_memory_is_flat(op, backend):
    # float32 where the backend takes it; the CUDA attention kernels run on tensor cores in 16 bits.
    dtype = torch.float32 if torch.float32 in ops.backend_table(op)[backend].dtypes else torch.float16
    tensors = {k: t.to(dtype).cuda() for k, t in CASES[op].make(2).items()}
    _calls(op, backend, tensors, WARMUP, WARMUP)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    _calls(op, backend, tensors, CALLS, BACKWARD_CALLS)
    torch.cuda.synchronize()
    grown = torch.cuda.memory_allocated() - before
    # Less than before is no leak: the warm-up's last autograd graph may be freed during the calls.
    assert grown <= 0, f"{op} on {backend}: {grown} more bytes allocated after {CALLS} calls"
