import os

import torch

# The Triton interpreter must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vitkernels.testing import first_tile_of_each_depth, stop_on_cuda_fault  # noqa: E402

CUDA = torch.cuda.is_available()
# cuDNN runs fp32 convolutions in TF32 by default (matmuls not): the fp32 tolerance assumes IEEE fp32,
# both for the torch backend's convolution and for the references run in fp32.
torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "slow: slower tests (still part of `make test`)")
    config.addinivalue_line("markers", "sanitize: the kernel tests bench/device_check.py --sanitize runs under "
                                       "compute-sanitizer (its CUDA and Triton cases)")
    config.addinivalue_line("markers", "device: the tests bench/device_check.py runs on a GPU machine: every test "
                                       "of tests/ops and every cuda test (set here, not by hand)")


OPS_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops")


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") or os.path.commonpath([str(item.path), OPS_TESTS]) == OPS_TESTS:
            item.add_marker(pytest.mark.device)
        if "cuda" in item.keywords and not CUDA:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _one_tile_per_depth():
    """On a GPU, Triton's autotuners would compile and time every tile for each new shape, which
    costs the op tests more than the tests themselves: each launches its first tile of each depth
    (vitkernels.testing.first_tile_of_each_depth), the each-tile tests compare every tile with the
    reference, and the benchmarks check the tile the full autotuner picks."""
    if not CUDA:
        yield
        return
    with first_tile_of_each_depth():
        yield


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
    stop_on_cuda_fault(item)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
