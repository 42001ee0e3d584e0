"""torch.library.opcheck of the backward ops every backend calls (the forward ops and the C++ ops are
checked in the op test files), and float64 gradcheck on the backends that take float64."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from op_cases import CASES, batch_for, op_backend_params, run
from vitkernels import ops


class _RecordOps(TorchDispatchMode):
    """Records each call of a vitkernels op whose name ends in ``suffix``, with its arguments."""

    def __init__(self, suffix):
        super().__init__()
        self.suffix, self.calls = suffix, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "vitkernels" and func._opname.endswith(self.suffix):
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_detached(v) for v in value)
    return value


@pytest.mark.parametrize("op,backend", op_backend_params(("triton",)))
def test_triton_backward_ops_opcheck(op, backend):
    """The backward ops as the autograd formula calls them."""
    case = CASES[op]
    recorder = _RecordOps("_backward")
    with recorder:
        run(case, backend, case.make(batch_for(backend)), torch.float32)
    assert recorder.calls, f"{op} on {backend} called no backward op"
    for func, args, kwargs in recorder.calls:
        torch.library.opcheck(func, _detached(args), _detached(kwargs))


def _tensor_count(func) -> int:
    return sum(str(a.type).startswith(("Tensor", "Optional[Tensor]")) for a in func._schema.arguments)


@pytest.mark.parametrize("op", ops.OPS)
def test_torch_backward_op_opcheck(op):
    """<op>_torch_backward(grad_outputs, needs_grad, *forward arguments) on the forward op's arguments."""
    case = CASES[op]
    recorder = _RecordOps("_torch")
    with recorder:
        outs, _ = run(case, "torch", case.make(2), torch.float32, grad=False)
    (func, args, kwargs), = recorder.calls
    backward = getattr(torch.ops.vitkernels, f"{func._opname}_backward").default
    grad_outputs = [torch.randn_like(o) for o in outs]
    torch.library.opcheck(backward, (grad_outputs, [True] * _tensor_count(func), *_detached(args)), kwargs)


def _float64_backends(op):
    return [name for name, capability in ops.backend_table(op).items() if torch.float64 in capability.dtypes]


@pytest.mark.parametrize("op,backend", [p for p in op_backend_params()
                                       if p.values[1] in _float64_backends(p.values[0])])
def test_gradcheck_float64(op, backend):
    case = CASES[op]
    tensors = {k: t.requires_grad_() for k, t in case.make(1).items()}

    def call(*values):
        return case.call(backend, **dict(zip(tensors, values)))

    assert torch.autograd.gradcheck(call, tuple(tensors.values()), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_float64_backends_listed():
    """gradcheck above needs a float64 backend of every op; the reference is one."""
    assert all("torch" in _float64_backends(op) for op in ops.OPS)
