import importlib
import math

import pytest
import torch

from op_helpers import DEVICE, backend_params, compare_with_reference, random
import vitkernels
from vitkernels import ops
from vitkernels.ops.window_attention.reference import window_attention_reference
from vitkernels.testing import assert_close

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


def _triton_run(heads, window, shift, pad_first=False):
    def run(qkv, table, qkv_bias):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first,
                                    backend="triton")

    def reference(qkv, table, qkv_bias):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first)

    return run, reference


TRITON = [p for p in backend_params("window_attention") if p.id == "triton"]


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_swin_window7_head_dim32(backend, dtype):
    """Swin's 7x7 window (49 tokens in one 64-row tile), shifted by 3, on a padded map."""
    heads, window, shift = 2, (7, 7), (3, 3)
    run, reference = _triton_run(heads, window, shift)
    compare_with_reference(run, reference, list(_make(1, 10, 13, heads, 32, window)), dtype)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("pad_first", [False, True], ids=["timm-order", "hf-tv-order"])
def test_multi_tile_window(backend, pad_first):
    """A 9x9 window (81 tokens) spans several query and key tiles: the online softmax loop."""
    heads, window, shift = 1, (9, 9), (4, 4)
    run, reference = _triton_run(heads, window, shift, pad_first)
    compare_with_reference(run, reference, list(_make(1, 11, 9, heads, 16, window)), torch.float32)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_head_dims(backend, head_dim):
    heads, window, shift = 1, (4, 4), (2, 2)
    run, reference = _triton_run(heads, window, shift)
    compare_with_reference(run, reference, list(_make(1, 4, 6, heads, head_dim, window)), torch.float32)


@pytest.mark.parametrize("backend", TRITON)
def test_backward_is_deterministic(backend):
    heads, window = 2, (4, 4)
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _make(1, 5, 7, heads, 8, window))
    logit_scale = torch.rand(heads, device=DEVICE, requires_grad=True)
    out = ops.window_attention(qkv, heads, window, 2, table, qkv_bias=qkv_bias, logit_scale=logit_scale,
                               backend=backend)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (qkv, table, qkv_bias, logit_scale), grad, retain_graph=True)
    second = torch.autograd.grad(out, (qkv, table, qkv_bias, logit_scale), grad)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("pad_first", [False, True], ids=["timm-order", "hf-tv-order"])
def test_triton_bf16(pad_first):
    heads, window, shift = 3, (7, 7), (3, 3)
    run, reference = _triton_run(heads, window, shift, pad_first)
    compare_with_reference(run, reference, list(_make(2, 17, 20, heads, 32, window)), torch.bfloat16)


@pytest.mark.cuda
def test_triton_swinv2_bf16():
    heads, window, shift = 4, (8, 8), (4, 4)
    qkv, table, qkv_bias = _make(2, 16, 20, heads, 32, window)
    logit_scale = torch.tensor([5.0, 2.3, 3.9, 1.0], dtype=torch.float64, device=DEVICE)

    def run(qkv, table, qkv_bias, logit_scale):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, logit_scale=logit_scale,
                                    backend="triton")

    def reference(qkv, table, qkv_bias, logit_scale):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias,
                                          logit_scale=logit_scale)

    compare_with_reference(run, reference, [qkv, 16 * torch.sigmoid(table), qkv_bias, logit_scale], torch.bfloat16)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_opcheck(backend):
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _make(1, 3, 6, 1, 8, (2, 4)))
    logit_scale = torch.rand(1, device=DEVICE, requires_grad=True)
    op = torch.ops.vitkernels.window_attention_triton.default
    torch.library.opcheck(op, (qkv, 1, [2, 4], [1, 2], table, qkv_bias, None, None, False, -100.0))
    torch.library.opcheck(op, (qkv, 1, [2, 4], [1, 2], 16 * table.sigmoid(), qkv_bias, logit_scale, None, True, -200.0))


@pytest.mark.parametrize("backend", TRITON)
def test_triton_compile_fullgraph(backend):
    qkv, table, qkv_bias = (t.float().requires_grad_() for t in _make(1, 5, 6, 2, 8, (4, 4)))

    def span(qkv, table, qkv_bias):
        return ops.window_attention(qkv, 2, 4, 2, table, qkv_bias=qkv_bias, pad_first=True, backend=backend)

    eager = span(qkv, table, qkv_bias)
    compiled = torch.compile(span, fullgraph=True)(qkv, table, qkv_bias)
    torch.testing.assert_close(compiled, eager)
    (g_eager,) = torch.autograd.grad(eager.sum(), table)
    (g_compiled,) = torch.autograd.grad(compiled.sum(), table)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter only runs without a CUDA device")
@pytest.mark.parametrize("backend", TRITON)
def test_triton_refuses_bf16_under_the_interpreter(backend):
    qkv = torch.randn(1, 4, 4, 24, dtype=torch.bfloat16)
    with pytest.raises(vitkernels.NotSupportedError, match="bfloat16 under the Triton interpreter"):
        ops.window_attention(qkv, 2, 4, backend=backend)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("window", [(4, 4), (9, 9)], ids=["one-key-block", "several-key-blocks"])
def test_table_gradient_summed_over_chunks_of_windows(backend, window, monkeypatch):
    """A small dS buffer makes each program sum several windows' dS before the table gather."""
    kernels = importlib.import_module("vitkernels.ops.window_attention.triton_kernels")
    heads, shift = 1, (window[0] // 2, window[1] // 2)
    tokens = window[0] * window[1]
    monkeypatch.setattr(kernels, "DTABLE_BUFFER_ELEMENTS", 2 * heads * tokens * tokens)
    run, reference = _triton_run(heads, window, shift)
    compare_with_reference(run, reference, list(_make(2, window[0] + 2, window[1], heads, 8, window)), torch.float32)


@pytest.mark.parametrize("backend", TRITON)
def test_strided_qkv_map(backend):
    """qkv read through its batch / row / column strides: a transposed map sliced from wider rows."""
    heads, window, shift = 2, (4, 4), (2, 2)
    qkv, table, qkv_bias = _make(1, 6, 9, heads, 8, window)
    wider = torch.cat([qkv, random(1, 6, 9, 5)], dim=-1).transpose(1, 2).contiguous().transpose(1, 2)
    strided = wider[..., : qkv.shape[-1]]
    assert not strided.is_contiguous() and strided.stride(-1) == 1
    out = ops.window_attention(strided.float(), heads, window, shift, table.float(), qkv_bias=qkv_bias.float(),
                               backend=backend)
    expected = window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias)
    assert_close(out, expected)


@pytest.mark.parametrize("backend", TRITON)
def test_fp16_map_with_fp32_parameters(backend):
    """Under autocast the qkv map is fp16 while the table and qkv bias stay fp32."""
    heads, window, shift = 2, (4, 4), (2, 2)
    qkv, table, qkv_bias = _make(1, 6, 7, heads, 8, window)

    def run(qkv, table, qkv_bias):
        return ops.window_attention(qkv, heads, window, shift, table.float(), qkv_bias=qkv_bias.float(),
                                    backend=backend)

    def reference(qkv, table, qkv_bias):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias)

    compare_with_reference(run, reference, [qkv, table, qkv_bias], torch.float16)
