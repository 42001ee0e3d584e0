"""Numerics at the edges: fp16 with large logits and statistics, NaN and inf propagation, rows whose
every key is masked. Each backend against the reference on the same values, forward and backward."""
import dataclasses

import pytest
import torch

from op_cases import CASES, batch_for, compare, gpu_op_backend_params, op_backend_params, run
from vitkernels import ops
from vitkernels.testing import LOW_PRECISION, assert_close

# Batched input scaled so that fp16 arithmetic would overflow: the largest q.k pass 1e5 and LayerNorm's
# squares reach 1e8, past fp16's 65504; the inputs themselves stay representable.
LARGE = {"window_attention": ("qkv", 100.0), "attention": ("qkv", 100.0), "layernorm": ("x", 2e4),
         "add_layernorm": ("x", 2e4), "layernorm_mlp": ("x", 2e4)}


def _on(device, tensors):
    return {k: v.to(device) for k, v in tensors.items()}


def check_large_values_stay_finite(op, backend, dtype=torch.float16, device="cpu"):
    name, scale = LARGE[op]
    tensors = _on(device, CASES[op].make(batch_for(backend)))
    tensors[name] = tensors[name] * scale
    q, k = tensors["qkv"].chunk(3, -1)[:2] if "qkv" in tensors else (None, None)
    if q is not None:
        assert (q.unflatten(-1, (2, 8)) * k.unflatten(-1, (2, 8))).sum(-1).abs().max() > 65504
    outs, grads = compare(CASES[op], backend, tensors, dtype)
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("op,backend", [p for p in op_backend_params() if p.values[0] in LARGE])
def test_fp16_large_values_stay_finite(op, backend):
    check_large_values_stay_finite(op, backend)


def _same_non_finite(actual, expected, what):
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        a, e = test(actual), test(expected)
        assert torch.equal(a, e), (f"{what}: {test.__name__} at {a.sum().item()} places, the reference at "
                                   f"{e.sum().item()}; differing at {(a != e).nonzero()[:5].tolist()}")


def _finite_close(actual, expected, what, grad, low=None):
    keep = torch.isfinite(expected)
    if not keep.any():  # every value non-finite: _same_non_finite has compared them all
        return
    assert_close(actual[keep], expected[keep], low_precision_reference=None if low is None else low[keep], grad=grad,
                 name=what)


def _runs(case, backend, tensors, dtype):
    """The backend's (outputs, grads) in dtype, the float64 reference's and, for fp16 and bf16, the
    reference's in dtype (else None), all on one upstream gradient."""
    upstream = [torch.randn_like(o) for o in run(case, "torch", tensors, torch.float64, grad=False)[0]]
    low = run(case, "torch", tensors, dtype, upstream=upstream) if dtype in LOW_PRECISION else None
    return run(case, backend, tensors, dtype, upstream=upstream), run(case, "torch", tensors, torch.float64,
                                                                      upstream=upstream), low


def _same_results(found, reference, low):
    """The same non-finite places as the reference, and the finite values close."""
    (outs, grads), (ref_outs, ref_grads) = found, reference
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        _same_non_finite(out, ref, f"output {i}")
        _finite_close(out, ref, f"output {i}", grad=False, low=None if low is None else low[0][i])
    for name, grad in grads.items():
        _same_non_finite(grad, ref_grads[name], f"grad of {name}")
        _finite_close(grad, ref_grads[name], f"grad of {name}", grad=True, low=None if low is None else low[1][name])


def check_non_finite_input_propagates(op, backend, value, dtype=torch.float32, device="cpu"):
    case = CASES[op]
    tensors = _on(device, case.make(2))
    batched = next(k for k in tensors if k not in case.shared)
    tensors[batched][0].view(-1)[tensors[batched][0].numel() // 2] = value
    found, reference, low = _runs(case, backend, tensors, dtype)
    assert any(not torch.isfinite(o).all() for o in reference[0])
    _same_results(found, reference, low)
    assert torch.isfinite(reference[1][batched][1]).all(), "the second sample never sees the bad value"


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("op,backend", op_backend_params())
def test_non_finite_input_propagates_as_in_reference(op, backend, value):
    check_non_finite_input_propagates(op, backend, value)


def _attention_with_masked_rows(batch=2):
    """attention's case with query rows 3 and 7 of head 1 masked on every key (bias -inf)."""
    tensors = CASES["attention"].make(batch)
    tensors["bias"][1, [3, 7]] = float("-inf")
    return tensors


def check_fully_masked_rows(backend, dtype=torch.float32, device="cpu"):
    found, reference, low = _runs(CASES["attention"], backend, _on(device, _attention_with_masked_rows()), dtype)
    assert torch.isnan(reference[0][0]).any(), "the reference gives NaN on rows with no key left"
    # rows of other heads and other queries are untouched by the masked rows
    assert torch.isfinite(reference[0][0][:, :, :8]).all()
    _same_results(found, reference, low)


@pytest.mark.parametrize("op,backend", [p for p in op_backend_params() if p.values[0] == "attention"])
def test_fully_masked_rows_match_reference(op, backend):
    check_fully_masked_rows(backend)


def check_infinite_shift_mask(backend, dtype=torch.float32, device="cpu"):
    """mask_value=-inf hides other regions' keys entirely; a query always sees its own region."""
    case = CASES["window_attention"]

    def call(backend, qkv, bias_table, qkv_bias):
        return ops.window_attention(qkv, 2, 4, 2, bias_table, qkv_bias=qkv_bias, mask_value=float("-inf"),
                                    backend=backend)

    (outs, grads), (ref_outs, ref_grads), low = _runs(dataclasses.replace(case, call=call), backend,
                                                      _on(device, case.make(batch_for(backend))), dtype)
    assert_close(outs[0], ref_outs[0], low_precision_reference=None if low is None else low[0][0], name="output")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], low_precision_reference=None if low is None else low[1][name], grad=True,
                     name=f"grad of {name}")


@pytest.mark.parametrize("op,backend", [p for p in op_backend_params() if p.values[0] == "window_attention"])
def test_infinite_shift_mask_gives_no_nan(op, backend):
    check_infinite_shift_mask(backend)


# --- the same in fp16 on a GPU, for the compiled GPU backends (triton, cuda) --------------------

GPU = gpu_op_backend_params()


@pytest.mark.cuda
@pytest.mark.parametrize("op,backend", [p for p in GPU if p.values[0] in LARGE])
def test_gpu_fp16_large_values_stay_finite(op, backend):
    check_large_values_stay_finite(op, backend, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("op,backend", GPU)
def test_gpu_fp16_non_finite_input_propagates_as_in_reference(op, backend, value):
    check_non_finite_input_propagates(op, backend, value, torch.float16, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("op,backend", [p for p in GPU if p.values[0] == "attention"])
def test_gpu_fp16_fully_masked_rows_match_reference(op, backend):
    check_fully_masked_rows(backend, torch.float16, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("op,backend", [p for p in GPU if p.values[0] == "window_attention"])
def test_gpu_fp16_infinite_shift_mask_gives_no_nan(op, backend):
    check_infinite_shift_mask(backend, torch.float16, device="cuda")
