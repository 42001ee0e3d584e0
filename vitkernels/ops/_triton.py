"""Triton pieces shared by the ops' kernels: GEMM configs and products, and the device's capacity for
persistent launches."""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable

import torch
import triton
import triton.language as tl

from .. import aot


@functools.lru_cache(maxsize=None)
def multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=None)
def compute_capability(device: torch.device) -> tuple[int, int]:
    """Compute capability (major, minor) of a CUDA device."""
    return torch.cuda.get_device_capability(device)


REGISTERS_PER_MULTIPROCESSOR = 65536  # sm_80 and sm_90
RESERVED_SHARED_PER_BLOCK = 1024  # the driver's shared memory of each resident block (sm_80 and later)
MAX_BLOCKS_PER_MULTIPROCESSOR = 32
_RESIDENT: dict = {}  # resident_programs' answers


def programs_per_multiprocessor(registers: int, warps: int, shared: int, shared_per_multiprocessor: int,
                                threads_per_multiprocessor: int) -> int:
    """How many programs of ``warps`` warps, ``registers`` registers per thread and ``shared`` bytes
    of shared memory a multiprocessor holds at once: registers are allocated per warp in multiples
    of 256, and each block also takes the driver's reserved shared memory."""
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    return max(1, min(REGISTERS_PER_MULTIPROCESSOR // (per_warp * warps),
                      shared_per_multiprocessor // (shared + RESERVED_SHARED_PER_BLOCK),
                      threads_per_multiprocessor // (32 * warps), MAX_BLOCKS_PER_MULTIPROCESSOR))


def resident_programs(kernel, args: tuple, kwargs: dict, device: torch.device) -> int:
    """Programs of ``kernel`` launched with ``args`` and ``kwargs`` that fit on one multiprocessor of
    CUDA ``device`` at once, read from the compiled kernel (compiled first if needed, as its
    launch would). A persistent kernel launches that many per multiprocessor: all in one wave.

    The answer is kept per kernel, device, ``kwargs`` and dtypes of the tensors in ``args``, so a
    call pays Triton's argument binding once per launch, not twice. Triton also compiles variants
    for the alignment of pointers and integers; they share the first one's answer, which may be
    off by a program for them: only the wave's size depends on it, never the result."""
    key = (kernel, device, tuple(sorted(kwargs.items())),
           tuple(arg.dtype for arg in args if isinstance(arg, torch.Tensor)))
    programs = _RESIDENT.get(key)
    if programs is not None:
        return programs
    compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    if compiled is None:  # a compile hook of Triton's declined to compile: one program per multiprocessor
        return 1
    compiled._init_handles()
    props = torch.cuda.get_device_properties(device)
    programs = _RESIDENT[key] = programs_per_multiprocessor(
        compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
        props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor)
    return programs


def gemm_config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                         num_warps=warps, num_stages=stages)


_AUTOTUNED: list = []  # the autotuners autotune_by_depth made


def autotuned_kernels() -> list:
    """The Triton autotuners of every op (``triton.autotune`` objects), each op's kernel module
    imported first."""
    here = os.path.dirname(os.path.abspath(__file__))
    for name in sorted(os.listdir(here)):
        if os.path.exists(os.path.join(here, name, "triton_kernels.py")):
            importlib.import_module(f"{__package__}.{name}.triton_kernels")
    return list(_AUTOTUNED)


def autotune_by_depth(configs: list, pointer: str) -> Callable:
    """``triton.autotune`` over ``configs``, keyed on M, N, K, trying the configs whose BLOCK_K suits
    the dtype of argument ``pointer``: fp32 tiles take half the K depth (32) of fp16/bf16 ones (64)
    to fit shared memory.

    Under the interpreter, which cannot time anything, the autotuner gets the last config alone, so
    it launches it without benchmarking.
    """
    if aot.interpreter_on():
        tune = triton.autotune(configs=configs[-1:], key=["M", "N", "K"])
    else:
        def prune(configs, named_args, **kwargs):
            depth = 32 if named_args[pointer].dtype == torch.float32 else 64
            return [c for c in configs if c.kwargs["BLOCK_K"] == depth]

        tune = triton.autotune(configs=configs, key=["M", "N", "K"], prune_configs_by={"early_config_prune": prune})

    def register(kernel):
        tuner = tune(kernel)
        _AUTOTUNED.append(tuner)
        return tuner

    return register


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
