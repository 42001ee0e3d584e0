import math

import pytest
import torch

from op_helpers import DEVICE, backend_params, compare_with_reference, random
from vitkernels import ops
from vitkernels.ops.window_attention.reference import window_attention_reference

# (batch, H, W, heads, head_dim, window, shift)
CASES = [
    pytest.param(2, 8, 8, 2, 8, (4, 4), (0, 0), id="unshifted"),
    pytest.param(1, 8, 8, 3, 8, (4, 4), (2, 2), id="shifted-batch1"),
    pytest.param(2, 9, 11, 2, 8, (4, 4), (2, 2), id="padded-shifted"),
    pytest.param(2, 7, 10, 2, 16, (3, 5), (1, 2), id="non-square-window"),
    pytest.param(1, 6, 13, 4, 4, (6, 4), (0, 2), id="shift-one-dim"),
]


def _make(batch, height, width, heads, head_dim, window):
    channels = heads * head_dim
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    return random(batch, height, width, 3 * channels), random(rows, heads), random(3 * channels)


@pytest.mark.parametrize("backend", backend_params("window_attention"))
@pytest.mark.parametrize("pad_first", [False, True], ids=["timm-order", "hf-tv-order"])
@pytest.mark.parametrize("batch,height,width,heads,head_dim,window,shift", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(backend, pad_first, batch, height, width, heads, head_dim, window, shift, dtype):
    qkv, table, qkv_bias = _make(batch, height, width, heads, head_dim, window)

    def run(qkv, table, qkv_bias):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first,
                                    backend=backend)

    def reference(qkv, table, qkv_bias):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first)

    compare_with_reference(run, reference, [qkv, table, qkv_bias], dtype)


@pytest.mark.parametrize("backend", backend_params("window_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_swinv2_cosine(backend, dtype):
    heads, window, shift = 3, (4, 4), (2, 2)
    qkv, table, qkv_bias = _make(2, 9, 8, heads, 8, window)
    table = 16 * torch.sigmoid(table)
    # one head above the log(100) clamp, the others below it
    logit_scale = torch.tensor([5.0, 2.3, 3.9], dtype=torch.float64, device=DEVICE) + 0.1 * random(heads)

    def run(qkv, table, qkv_bias, logit_scale):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, logit_scale=logit_scale,
                                    backend=backend)

    def reference(qkv, table, qkv_bias, logit_scale):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias,
                                          logit_scale=logit_scale)

    assert (logit_scale > math.log(100)).any() and (logit_scale < math.log(100)).any()
    compare_with_reference(run, reference, [qkv, table, qkv_bias, logit_scale], dtype)


@pytest.mark.parametrize("backend", backend_params("window_attention"))
def test_no_bias_and_custom_scale(backend):
    qkv, _, _ = _make(1, 8, 8, 2, 8, (4, 4))

    def run(qkv):
        return ops.window_attention(qkv, 2, 4, 2, scale=0.3, backend=backend)

    def reference(qkv):
        return window_attention_reference(qkv, 2, (4, 4), (2, 2), scale=0.3)

    compare_with_reference(run, reference, [qkv], torch.float32)


def test_padding_keys_hold_qkv_bias():
    """Changing qkv_bias changes the output of a padded map (padding keys are attended, not masked)."""
    qkv, table, qkv_bias = (t.float() for t in _make(1, 5, 5, 2, 8, (4, 4)))
    a = ops.window_attention(qkv, 2, 4, 0, table, qkv_bias=qkv_bias)
    b = ops.window_attention(qkv, 2, 4, 0, table, qkv_bias=qkv_bias + 1.0)
    unpadded = ops.window_attention(qkv[:, :4, :4].contiguous(), 2, 4, 0, table, qkv_bias=qkv_bias + 1.0)
    assert (a - b).abs().max() > 1e-3
    assert torch.allclose(b[:, :4, :4], unpadded)


def test_opcheck():
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _make(2, 9, 10, 2, 8, (4, 4)))
    logit_scale = torch.rand(2, device=DEVICE, requires_grad=True)
    op = torch.ops.vitkernels.window_attention_torch.default
    torch.library.opcheck(op, (qkv, 2, [4, 4], [2, 2], table, qkv_bias, None, None, False, -100.0))
    torch.library.opcheck(op, (qkv, 2, [4, 4], [2, 2], 16 * table.sigmoid(), qkv_bias, logit_scale, None, True, -200.0))


def test_compile_fullgraph():
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _make(2, 9, 10, 2, 8, (4, 4)))

    def span(qkv, table, qkv_bias):
        return ops.window_attention(qkv, 2, 4, 2, table, qkv_bias=qkv_bias, pad_first=True)

    eager = span(qkv, table, qkv_bias)
    compiled = torch.compile(span, fullgraph=True)(qkv, table, qkv_bias)
    torch.testing.assert_close(compiled, eager)
    (g_eager,) = torch.autograd.grad(eager.sum(), table)
    (g_compiled,) = torch.autograd.grad(compiled.sum(), table)
    torch.testing.assert_close(g_compiled, g_eager)
