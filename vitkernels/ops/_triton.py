"""Triton pieces shared by the ops' GEMM-like kernels."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import triton
import triton.language as tl

from .. import aot


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemm_config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


def autotune_by_depth(configs: list, pointer: str) -> Callable:
    """``triton.autotune`` over ``configs``, keyed on M, N, K, trying the configs whose BLOCK_K suits
    the dtype of argument ``pointer``: fp32 tiles take half the K depth (32) of fp16/bf16 ones (64)
    to fit shared memory.

    Under the interpreter, which cannot time anything, the autotuner gets the last config alone, so
    it launches it without benchmarking.
    """
    if aot.interpreter_on():
        return triton.autotune(configs=configs[-1:], key=["M", "N", "K"])

    def prune(configs, named_args, **kwargs):
        depth = 32 if named_args[pointer].dtype == torch.float32 else 64
        return [c for c in configs if c.kwargs["BLOCK_K"] == depth]

    return triton.autotune(configs=configs, key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune})


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, exact fp32 products when IEEE (TF32 would miss the fp32 tolerance)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column indices of this program's output tile, GROUP_M row tiles walked together for L2 reuse."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * tiles_n)) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_size
    pid_n = (pid % (GROUP_M * tiles_n)) // group_size
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
