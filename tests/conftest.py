import os

import torch

# The Triton interpreter must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vitkernels.testing import stop_on_cuda_fault  # noqa: E402

CUDA = torch.cuda.is_available()
# cuDNN runs fp32 convolutions in TF32 by default (matmuls not): the fp32 tolerance assumes IEEE fp32,
# both for the torch backend's convolution and for the references run in fp32.
torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: slower tests (still part of `make test`)")
    config.addinivalue_line("markers", "sanitize: the kernel tests bench/device_check.py --sanitize runs under "
                                       "compute-sanitizer (its CUDA and Triton cases)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    stop_on_cuda_fault(item)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
