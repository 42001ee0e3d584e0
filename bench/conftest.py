"""Benchmark fixtures: the device (CUDA when present, else CPU) and its dtype (bf16 on GPU, fp32 on CPU).

Benchmarks never switch the Triton interpreter on: interpreted kernels are correctness checks, and
their timings say nothing about the kernels.
"""
import os

import pytest
import torch

import shapes
from vitkernels.testing import stop_on_cuda_fault

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
SELECTION = ("VITKERNELS_BENCH_OPS", "VITKERNELS_BENCH_PROVIDERS", "VITKERNELS_BENCH_MODES",
             "VITKERNELS_BENCH_MODEL_PROVIDERS", "VITKERNELS_BENCH_CEILINGS")


def pytest_report_header(config):
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    chosen = ", ".join(f"{v}={os.environ[v]}" for v in SELECTION if os.environ.get(v)) or "every op and provider"
    return (f"vitkernels bench: device {DEVICE} ({name}), dtype {str(DTYPE).replace('torch.', '')}, "
            f"shapes {shapes.default_subset(DEVICE)!r} (VITKERNELS_BENCH_SHAPES=quick|standard|all); {chosen}")


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    stop_on_cuda_fault(item)
    if DEVICE == "cuda" and os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist workers share the one GPU (bench/device_check.py's warm-up run): each hands
        # its cached blocks back after every case, or the caches of idle workers starve the others.
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    return DTYPE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
