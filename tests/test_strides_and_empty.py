"""Empty batches and non-contiguous layouts on every backend available here."""
import pytest
import torch

from op_cases import CASES, batch_for, op_backend_params, run
from vitkernels.testing import assert_close


def _check_empty(op, backend, grad):
    case = CASES[op]
    tensors = case.make(0)
    outs, grads = run(case, backend, tensors, torch.float32, grad=grad)
    ref_outs, ref_grads = run(case, "torch", tensors, torch.float64, grad=grad)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        assert out.shape == ref.shape and out.shape[0] == 0, f"output {i}: {tuple(out.shape)} != {tuple(ref.shape)}"
        assert out.dtype == torch.float32
    for name, g in grads.items():
        # weights see no rows: their gradient is exactly zero, as the reference's
        assert_close(g, ref_grads[name], grad=True, name=f"grad of {name}")


@pytest.mark.parametrize("op,backend", op_backend_params())
def test_empty_batch_forward(op, backend):
    _check_empty(op, backend, grad=False)


@pytest.mark.parametrize("op,backend", op_backend_params())
def test_empty_batch_backward(op, backend):
    _check_empty(op, backend, grad=True)


def _transposed(t):
    """Same values, the last two dims' strides swapped."""
    return t.mT.contiguous().mT if t.dim() >= 2 else t


def _sliced(t):
    """Same values, every other element of a wider buffer along the last dim."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype).normal_()
    wide[..., ::2] = t
    return wide[..., ::2]


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else _transposed(t)


def _batch_slice(t):
    """Same values, every other sample of a batch twice as large (non-unit batch stride)."""
    wide = torch.randn(2 * t.shape[0], *t.shape[1:], dtype=t.dtype)
    wide[::2] = t
    return wide[::2]


LAYOUTS = {"transposed": _transposed, "sliced": _sliced, "channels_last": _channels_last}


@pytest.mark.parametrize("layout", list(LAYOUTS) + ["batch-slice"])
@pytest.mark.parametrize("op,backend", op_backend_params())
def test_non_contiguous_matches_contiguous(op, backend, layout):
    case = CASES[op]
    batch = 2 if layout == "batch-slice" else batch_for(backend)  # a batch of one ignores its stride
    tensors = {k: t.float() for k, t in case.make(batch).items()}
    relaid = {k: (_batch_slice(t) if k not in case.shared else t) if layout == "batch-slice" else LAYOUTS[layout](t)
              for k, t in tensors.items()}
    assert any(not t.is_contiguous() for t in relaid.values())
    upstream = [torch.randn_like(o) for o in run(case, backend, tensors, grad=False)[0]]
    outs, grads = run(case, backend, tensors, upstream=upstream)
    strided_outs, strided_grads = run(case, backend, relaid, upstream=upstream)
    for i, (a, b) in enumerate(zip(strided_outs, outs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"output {i} ({layout}): {m}")
    for name in grads:
        torch.testing.assert_close(strided_grads[name], grads[name], rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"grad of {name} ({layout}): {m}")
