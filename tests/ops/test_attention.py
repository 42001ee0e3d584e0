import pytest
import torch

from op_helpers import DEVICE, backend_params, compare_with_reference, random
from vitkernels import ops
from vitkernels.ops.attention.reference import attention_reference


@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(2, 17, 2, 8), (1, 5, 3, 16), (3, 50, 4, 4)])
@pytest.mark.parametrize("bias_shape", [None, "heads", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(backend, batch, tokens, heads, head_dim, bias_shape, dtype):
    qkv = random(batch, tokens, 3 * heads * head_dim)
    bias = {None: None, "heads": random(heads, tokens, tokens), "full": random(batch, heads, tokens, tokens)}[bias_shape]

    def run(qkv, bias):
        return ops.attention(qkv, heads, bias=bias, backend=backend)

    def reference(qkv, bias):
        return attention_reference(qkv, heads, bias=bias)

    compare_with_reference(run, reference, [qkv, bias], dtype)


def test_opcheck_and_compile():
    qkv = torch.randn(2, 17, 48, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, 17, 17, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.vitkernels.attention_torch.default, (qkv, 4, bias, None))
    torch.library.opcheck(torch.ops.vitkernels.attention_torch.default, (qkv, 4, None, 0.2))

    def span(qkv, bias):
        return ops.attention(qkv, 4, bias=bias)

    torch.testing.assert_close(torch.compile(span, fullgraph=True)(qkv, bias), span(qkv, bias))


TRITON = [p for p in backend_params("attention") if p.id == "triton"]


def _attention_run(heads):
    def run(qkv, bias):
        return ops.attention(qkv, heads, bias=bias, backend="triton")

    def reference(qkv, bias):
        return attention_reference(qkv, heads, bias=bias)

    return run, reference


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("bias_shape", [None, "tokens", "batch-1"])
def test_odd_token_count_spans_key_tiles(backend, bias_shape):
    """N = 197 (ViT-B/16 at 224: class token + 196 patches) spans several query and key tiles."""
    batch, tokens, heads, head_dim = 1, 197, 2, 16
    bias = {None: None, "tokens": random(tokens, tokens), "batch-1": random(1, heads, tokens, tokens)}[bias_shape]
    run, reference = _attention_run(heads)
    compare_with_reference(run, reference, [random(batch, tokens, 3 * heads * head_dim), bias], torch.float32)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_head_dims(backend, head_dim):
    run, reference = _attention_run(1)
    compare_with_reference(run, reference, [random(1, 17, 3 * head_dim), random(17, 17)], torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [197, 577])
def test_triton_bf16(tokens):
    heads = 12
    run, reference = _attention_run(heads)
    inputs = [random(2, tokens, 3 * heads * 64), random(heads, tokens, tokens)]
    compare_with_reference(run, reference, inputs, torch.bfloat16)


@pytest.mark.parametrize("backend", TRITON)
def test_triton_opcheck_and_compile(backend):
    qkv = torch.randn(2, 17, 48, device=DEVICE, requires_grad=True)
    bias = torch.randn(4, 17, 17, device=DEVICE, requires_grad=True)
    op = torch.ops.vitkernels.attention_triton.default
    torch.library.opcheck(op, (qkv, 4, bias, None))
    torch.library.opcheck(op, (qkv, 4, None, 0.2))

    def span(qkv, bias):
        return ops.attention(qkv, 4, bias=bias, backend=backend)

    torch.testing.assert_close(torch.compile(span, fullgraph=True)(qkv, bias), span(qkv, bias))
