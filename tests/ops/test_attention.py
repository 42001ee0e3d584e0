import pytest
import torch

from op_helpers import DEVICE, backend_params, compare_with_reference, random
import vitkernels
from vitkernels import ops
from vitkernels.ops.attention.reference import attention_reference


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", backend_params("attention"))
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(2, 17, 2, 8), (1, 5, 3, 16), (3, 50, 4, 4)])
@pytest.mark.parametrize("bias_shape", [None, "heads", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(backend, batch, tokens, heads, head_dim, bias_shape, dtype):
    if dtype not in ops.backend_table("attention")[backend].dtypes:
        pytest.skip(f"{backend} does not compute {dtype} (its refusal is tested on its own)")
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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_odd_token_count_spans_key_tiles(backend, bias_shape, dtype):
    """N = 197 (ViT-B/16 at 224: class token + 196 patches) spans several query and key tiles; in
    fp16 the backward's rowsum(dO * O) reads the rounded output."""
    batch, tokens, heads, head_dim = 1, 197, 2, 16
    bias = {None: None, "tokens": random(tokens, tokens), "batch-1": random(1, heads, tokens, tokens)}[bias_shape]
    run, reference = _attention_run(heads)
    compare_with_reference(run, reference, [random(batch, tokens, 3 * heads * head_dim), bias], dtype)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_head_dims(backend, head_dim):
    run, reference = _attention_run(1)
    compare_with_reference(run, reference, [random(1, 17, 3 * head_dim), random(17, 17)], torch.float32)


@pytest.mark.parametrize("backend", TRITON)
def test_wide_head_over_several_tiles(backend):
    """ViT-H's head_dim 80 on 70 tokens: several forward tiles, and the backward's wide-head tiles."""
    run, reference = _attention_run(2)
    compare_with_reference(run, reference, [random(1, 70, 3 * 2 * 80), random(70, 70)], torch.float32)


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


# --- the cuda backend beyond the shared tests: bf16, ViT sizes, the compiled ops ------------------

def _cuda_run(heads):
    def run(qkv, bias):
        return ops.attention(qkv, heads, bias=bias, backend="cuda")

    def reference(qkv, bias):
        return attention_reference(qkv, heads, bias=bias)

    return run, reference


# (batch, tokens, heads, head_dim): ViT-B/16 at 224 and 384 (197, 577 tokens: a ragged last tile),
# 1025 tokens (ViT-B/16 at 512, DeiT-S at 512), head_dim 32 and a head_dim padded to 64.
@pytest.mark.cuda
@pytest.mark.sanitize
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(2, 197, 12, 64), (1, 577, 12, 64), (1, 1025, 6, 64),
                                                        (2, 197, 6, 32), (2, 65, 3, 40)])
@pytest.mark.parametrize("bias_shape", [None, "tokens", "heads", "full"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_matches_reference(batch, tokens, heads, head_dim, bias_shape, dtype):
    shapes = {None: None, "tokens": (tokens, tokens), "heads": (heads, tokens, tokens),
              "full": (batch, heads, tokens, tokens)}
    bias = None if shapes[bias_shape] is None else random(*shapes[bias_shape])
    run, reference = _cuda_run(heads)
    compare_with_reference(run, reference, [random(batch, tokens, 3 * heads * head_dim), bias], dtype)


@pytest.mark.cuda
def test_cuda_statistics_match_the_cpu_op():
    """lse and the gradients have the CPU op's shapes, dtypes and values (fp16 inputs)."""
    qkv, bias = random(2, 197, 3 * 4 * 32).half(), random(4, 197, 197).half()
    out, lse = torch.ops.vitkernels.attention_fwd(qkv, 4, bias, None)
    cpu_out, cpu_lse = torch.ops.vitkernels.attention_fwd(qkv.cpu(), 4, bias.cpu(), None)
    assert lse.shape == cpu_lse.shape and lse.dtype == cpu_lse.dtype == torch.float32
    torch.testing.assert_close(lse.cpu(), cpu_lse, atol=2e-2, rtol=0)
    torch.testing.assert_close(out.cpu(), cpu_out, atol=1e-2, rtol=0)
    grad = torch.randn_like(out)
    grads = torch.ops.vitkernels.attention_bwd(grad, qkv, lse, 4, bias, None, True)
    cpu_grads = torch.ops.vitkernels.attention_bwd(grad.cpu(), qkv.cpu(), cpu_lse, 4, bias.cpu(), None, True)
    for name, g, expected in zip(("qkv", "bias"), grads, cpu_grads):
        assert g.shape == expected.shape and g.dtype == expected.dtype, name
        scale = max(expected.float().abs().max().item(), 1.0)
        error = (g.cpu().float() - expected.float()).abs().max().item()
        assert error <= 2e-2 * scale, f"{name}: max abs error {error:.3e} against the cpu op (scale {scale:.3e})"


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    qkv = random(2, 197, 3 * 6 * 64).half().requires_grad_()
    bias = random(6, 197, 197).half().requires_grad_()
    out = ops.attention(qkv, 6, bias=bias, backend="cuda")
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (qkv, bias), grad, retain_graph=True)
    for _ in range(3):
        for a, b in zip(first, torch.autograd.grad(out, (qkv, bias), grad, retain_graph=True)):
            assert torch.equal(a, b)


@pytest.mark.cuda
def test_cuda_opcheck_and_compile():
    qkv = torch.randn(2, 37, 3 * 2 * 32, device="cuda", dtype=torch.float16, requires_grad=True)
    bias = torch.randn(1, 2, 37, 37, device="cuda", dtype=torch.float16, requires_grad=True)
    fwd = torch.ops.vitkernels.attention_fwd.default
    torch.library.opcheck(fwd, (qkv, 2, bias, None))
    torch.library.opcheck(fwd, (qkv.detach().bfloat16().requires_grad_(), 2, None, 0.3))
    out, lse = fwd(qkv.detach(), 2, bias.detach(), None)
    # the backward has no gradient of its own: the autograd checks do not apply
    torch.library.opcheck(torch.ops.vitkernels.attention_bwd.default,
                          (torch.randn_like(out), qkv.detach(), lse, 2, bias.detach(), None, True),
                          test_utils=("test_schema", "test_faketensor"))

    def span(qkv, bias):
        return ops.attention(qkv, 2, bias=bias, backend="cuda")

    torch.testing.assert_close(torch.compile(span, fullgraph=True)(qkv, bias), span(qkv, bias))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,head_dim,match", [(torch.float32, 64, "float32: the CUDA kernels"),
                                                  (torch.bfloat16, 128, "head_dim 128 outside")])
def test_cuda_refuses_with_reasons(dtype, head_dim, match):
    qkv = torch.randn(1, 197, 3 * head_dim, dtype=dtype, device="cuda")
    with pytest.raises(vitkernels.NotSupportedError, match=match):
        ops.attention(qkv, 1, backend="cuda")
