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
