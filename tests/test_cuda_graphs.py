"""On a GPU, the compiled backends never synchronize with the host, and their forward replays from a
captured CUDA graph: what torch.compile(mode="reduce-overhead") and graph-captured serving rely on."""
import pytest
import torch

from op_cases import CASES, gpu_op_backend_params, outputs_of, run

pytestmark = pytest.mark.cuda


def _bf16_cuda(op: str) -> dict:
    return {k: t.to("cuda", torch.bfloat16) for k, t in CASES[op].make(2).items()}


@pytest.mark.parametrize("op,backend", gpu_op_backend_params())
def test_forward_and_backward_never_synchronize(op, backend):
    tensors = _bf16_cuda(op)
    run(CASES[op], backend, tensors)  # compiles and tunes the kernels, which may synchronize
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(CASES[op], backend, tensors)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("op,backend", gpu_op_backend_params())
def test_forward_replays_from_a_cuda_graph(op, backend):
    static = _bf16_cuda(op)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            CASES[op].call(backend, **static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = outputs_of(CASES[op].call(backend, **static))
    for name, tensor in _bf16_cuda(op).items():  # new values in the captured inputs
        static[name].copy_(tensor)
    graph.replay()
    with torch.no_grad():
        expected = outputs_of(CASES[op].call(backend, **static))
    for i, (got, want) in enumerate(zip(captured, expected)):
        assert torch.equal(got, want), (f"{op} on {backend}, output {i}: replay differs from a fresh call by "
                                        f"{(got.float() - want.float()).abs().max().item():.3e}")
