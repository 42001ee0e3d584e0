"""Under torch.use_deterministic_algorithms(True) every backward is bitwise reproducible run to run."""
import pytest
import torch

from op_cases import CASES, batch_for, op_backend_params, run


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def _results(op, backend, tensors, upstream):
    outs, grads = run(CASES[op], backend, tensors, torch.float32, upstream=upstream)
    return outs + list(grads.values())


def _assert_bitwise_equal(first, second, what):
    for i, (a, b) in enumerate(zip(first, second)):
        differing = (a != b) & ~(a.isnan() & b.isnan())
        assert not differing.any(), (f"{what}: result {i} differs at {differing.sum().item()} places, "
                                     f"max {(a - b)[differing].abs().max().item():.3e}")


@pytest.mark.parametrize("op,backend", op_backend_params())
def test_backward_is_bitwise_reproducible(op, backend, deterministic):
    tensors = CASES[op].make(batch_for(backend))
    upstream = [torch.randn_like(o) for o in run(CASES[op], "torch", tensors, torch.float64, grad=False)[0]]
    first = _results(op, backend, tensors, upstream)
    second = _results(op, backend, tensors, upstream)
    _assert_bitwise_equal(first, second, f"{op} on {backend}, two runs")


@pytest.mark.parametrize("op,backend", op_backend_params(("cpu",)))
def test_cpu_backward_is_independent_of_thread_count(op, backend, deterministic):
    """The C++ kernels split their reductions by work, not by threads: one thread or two, same bits."""
    tensors = CASES[op].make(4)
    upstream = [torch.randn_like(o) for o in run(CASES[op], "torch", tensors, torch.float64, grad=False)[0]]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _results(op, backend, tensors, upstream)
        torch.set_num_threads(2)
        double = _results(op, backend, tensors, upstream)
    finally:
        torch.set_num_threads(threads)
    _assert_bitwise_equal(single, double, f"{op} on {backend}, 1 thread against 2")
