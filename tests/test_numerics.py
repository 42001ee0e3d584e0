"""Numerics at the edges: fp16 with large logits and statistics, NaN and inf propagation, rows whose
every key is masked. Each backend against the reference on the same values, forward and backward."""
import dataclasses

import pytest
import torch

from op_cases import CASES, batch_for, compare, op_backend_params, run
from vitkernels import ops
from vitkernels.testing import assert_close

# Batched input scaled so that fp16 arithmetic would overflow: the largest q.k pass 1e5 and LayerNorm's
# squares reach 1e8, past fp16's 65504; the inputs themselves stay representable.
LARGE = {"window_attention": ("qkv", 100.0), "attention": ("qkv", 100.0), "layernorm": ("x", 2e4),
         "add_layernorm": ("x", 2e4), "layernorm_mlp": ("x", 2e4)}


@pytest.mark.parametrize("op,backend", [p for p in op_backend_params() if p.values[0] in LARGE])
def test_fp16_large_values_stay_finite(op, backend):
    name, scale = LARGE[op]
    tensors = CASES[op].make(batch_for(backend))
    tensors[name] = tensors[name] * scale
    q, k = tensors["qkv"].chunk(3, -1)[:2] if "qkv" in tensors else (None, None)
    if q is not None:
        assert (q.unflatten(-1, (2, 8)) * k.unflatten(-1, (2, 8))).sum(-1).abs().max() > 65504
    outs, grads = compare(CASES[op], backend, tensors, torch.float16)
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(torch.isfinite(g).all() for g in grads.values())


def _same_non_finite(actual, expected, what):
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        a, e = test(actual), test(expected)
        assert torch.equal(a, e), (f"{what}: {test.__name__} at {a.sum().item()} places, the reference at "
                                   f"{e.sum().item()}; differing at {(a != e).nonzero()[:5].tolist()}")


def _finite_close(actual, expected, what, grad):
    keep = torch.isfinite(expected)
    assert_close(actual[keep], expected[keep], grad=grad, name=what)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("op,backend", op_backend_params())
def test_non_finite_input_propagates_as_in_reference(op, backend, value):
    case = CASES[op]
    tensors = case.make(2)
    batched = next(k for k in tensors if k not in case.shared)
    tensors[batched][0].view(-1)[tensors[batched][0].numel() // 2] = value
    upstream = [torch.randn_like(o) for o in run(case, "torch", tensors, torch.float64, grad=False)[0]]
    outs, grads = run(case, backend, tensors, torch.float32, upstream=upstream)
    ref_outs, ref_grads = run(case, "torch", tensors, torch.float64, upstream=upstream)
    assert any(not torch.isfinite(o).all() for o in ref_outs)
    for i, (out, ref) in enumerate(zip(outs, ref_outs)):
        _same_non_finite(out, ref, f"output {i}")
        _finite_close(out, ref, f"output {i}", grad=False)
    for name, grad in grads.items():
        _same_non_finite(grad, ref_grads[name], f"grad of {name}")
        _finite_close(grad, ref_grads[name], f"grad of {name}", grad=True)
    assert torch.isfinite(ref_grads[batched][1]).all(), "the second sample never sees the bad value"


def _attention_with_masked_rows(batch=2):
    """attention's case with query rows 3 and 7 of head 1 masked on every key (bias -inf)."""
    tensors = CASES["attention"].make(batch)
    tensors["bias"][1, [3, 7]] = float("-inf")
    return tensors


@pytest.mark.parametrize("op,backend", [p for p in op_backend_params() if p.values[0] == "attention"])
def test_fully_masked_rows_match_reference(op, backend):
    tensors = _attention_with_masked_rows()
    case = CASES[op]
    upstream = [torch.randn_like(o) for o in run(case, "torch", tensors, torch.float64, grad=False)[0]]
    outs, grads = run(case, backend, tensors, torch.float32, upstream=upstream)
    ref_outs, ref_grads = run(case, "torch", tensors, torch.float64, upstream=upstream)
    assert torch.isnan(ref_outs[0]).any(), "the reference gives NaN on rows with no key left"
    _same_non_finite(outs[0], ref_outs[0], "output")
    _finite_close(outs[0], ref_outs[0], "output", grad=False)
    # rows of other heads and other queries are untouched by the masked rows
    assert torch.isfinite(ref_outs[0][:, :, :8]).all()
    for name, grad in grads.items():
        _same_non_finite(grad, ref_grads[name], f"grad of {name}")
        _finite_close(grad, ref_grads[name], f"grad of {name}", grad=True)


@pytest.mark.parametrize("op,backend", [p for p in op_backend_params() if p.values[0] == "window_attention"])
def test_infinite_shift_mask_gives_no_nan(op, backend):
    """mask_value=-inf hides other regions' keys entirely; a query always sees its own region."""
    case = CASES[op]
    tensors = case.make(batch_for(backend))

    def call(backend, qkv, bias_table, qkv_bias):
        return ops.window_attention(qkv, 2, 4, 2, bias_table, qkv_bias=qkv_bias, mask_value=float("-inf"),
                                    backend=backend)

    masked = dataclasses.replace(case, call=call)
    upstream = [torch.randn_like(o) for o in run(masked, "torch", tensors, torch.float64, grad=False)[0]]
    outs, grads = run(masked, backend, tensors, torch.float32, upstream=upstream)
    ref_outs, ref_grads = run(masked, "torch", tensors, torch.float64, upstream=upstream)
    assert_close(outs[0], ref_outs[0], name="output")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], grad=True, name=f"grad of {name}")
