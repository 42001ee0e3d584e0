"""CPU benchmarks of the C++ "cpu" backend against timm on the same machine, side by side in one run.

* Swin-T forward (fp32, batch 8, 224, random weights): timm eager; timm with every block's
  window-attention span served by the cpu backend; torch.compile of the unpatched model.
* The window attention span alone, per Swin-T stage (batch 8): ops.window_attention on the qkv map
  against timm's eager steps between its two Linears (roll, pad, partition, scaled q k^T, bias,
  mask, softmax, attention, reverse, crop, un-roll).
* A ViT-B block's second half, x + mlp(norm2(x)) (batch 8, 197 tokens, fp32): ops.layernorm_mlp
  against timm's eager nn.LayerNorm and Mlp modules.

Run: ``pytest bench/test_bench_cpu_models.py --benchmark-json=<file>``. Speed is measured, never
asserted; results of one run are recorded under bench/results/cpu/.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

import shapes
from vitkernels import backends, ops

timm = pytest.importorskip("timm")
from timm.models.swin_transformer import window_partition, window_reverse  # noqa: E402

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("cpu") is not None, reason=f"cpu: {backends.unavailable_reason('cpu')}"
)

SWIN_T = "swin_tiny_patch4_window7_224"
BATCH = 8
ROUNDS = 5
# The spans and the LayerNorm+MLP block take milliseconds: more rounds steady their medians.
SHORT_ROUNDS = 25


def _windowed_attn(block, x):
    """SwinTransformerBlock._attn with its span from the qkv Linear to proj served by the cpu backend."""
    attn = block.attn
    qkv = attn.qkv(x)
    out = ops.window_attention(qkv, attn.num_heads, block.window_size, block.shift_size,
                               attn.relative_position_bias_table, qkv_bias=attn.qkv.bias, backend="cpu")
    return attn.proj(out)


def _swin_t(patched: bool) -> torch.nn.Module:
    model = timm.create_model(SWIN_T, pretrained=False).eval()
    if patched:
        for stage in model.layers:
            for block in stage.blocks:
                block._attn = types.MethodType(_windowed_attn, block)
    return model


def _pedantic(benchmark, fn, *args, rounds=ROUNDS):
    with torch.no_grad():
        fn(*args)  # warm-up (and, for torch.compile, compilation)
        return benchmark.pedantic(fn, args=args, rounds=rounds, iterations=1)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(BATCH, 3, 224, 224)


@pytest.mark.parametrize("variant", ["timm-eager", "cpu-backend", "timm-compiled"])
def test_swin_t_forward(benchmark, images, variant):
    benchmark.group = f"{SWIN_T} forward, fp32, batch {BATCH}"
    torch.manual_seed(0)
    model = _swin_t(patched=variant == "cpu-backend")
    benchmark.extra_info["fused_attn"] = bool(model.layers[0].blocks[0].attn.fused_attn)
    fn = torch.compile(model) if variant == "timm-compiled" else model
    _pedantic(benchmark, fn, images)


def _timm_span(qkv, heads, window, shift, bias, mask):
    """timm's eager steps between qkv and proj (SwinTransformerBlock._attn, WindowAttention.forward)."""
    b, h, w, three_c = qkv.shape
    c = three_c // 3
    x = torch.roll(qkv, shifts=(-shift, -shift), dims=(1, 2)) if shift else qkv
    pad_h, pad_w = (window - h % window) % window, (window - w % window) % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = x.shape[1:3]
    windows = window_partition(x, (window, window)).view(-1, window * window, three_c)
    n = window * window
    q, k, v = windows.reshape(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + bias
    if mask is not None:
        attn = attn.view(-1, mask.shape[0], heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    x = window_reverse(out.view(-1, window, window, c), (window, window), hp, wp)[:, :h, :w, :].contiguous()
    return torch.roll(x, shifts=(shift, shift), dims=(1, 2)) if shift else x


SWIN_T_SPANS = [s.scaled(BATCH) for s in shapes.WINDOW_ATTENTION if s.model == SWIN_T]


@pytest.mark.parametrize("impl", ["timm-eager", "cpu-backend"])
@pytest.mark.parametrize("shape", SWIN_T_SPANS, ids=[s.name for s in SWIN_T_SPANS])
def test_window_attention_span(benchmark, shape, impl):
    benchmark.group = f"window attention span {shape.name}, fp32, batch {BATCH}"
    w, heads, shift = shape.window, shape.heads, shape.shift
    qkv = torch.randn(shape.batch, shape.height, shape.width, 3 * shape.dim)
    table = torch.randn((2 * w - 1) ** 2, heads) * 0.02
    if impl == "cpu-backend":
        _pedantic(benchmark, lambda: ops.window_attention(qkv, heads, w, shift, table, backend="cpu"),
                  rounds=SHORT_ROUNDS)
        return
    from vitkernels.ops.window_attention.reference import relative_position_bias, shift_mask

    hp, wp = -(-shape.height // w) * w, -(-shape.width // w) * w
    # timm builds both once, at model construction: they are not part of its span
    bias = relative_position_bias(table, w, w).unsqueeze(0)
    mask = shift_mask(hp, wp, (w, w), (shift, shift)) if shift else None
    _pedantic(benchmark, _timm_span, qkv, heads, w, shift, bias, mask, rounds=SHORT_ROUNDS)


VIT_B_MLP = shapes.by_name(shapes.BY_OP["layernorm_mlp"], "vit_b_224").scaled(BATCH)


@pytest.mark.parametrize("impl", ["timm-eager", "cpu-backend"])
def test_layernorm_mlp_vit_b(benchmark, impl):
    from timm.layers import Mlp

    shape = VIT_B_MLP
    benchmark.group = f"layernorm_mlp {shape.name}, fp32, batch {BATCH}"
    norm = torch.nn.LayerNorm(shape.dim, eps=shape.eps)
    mlp = Mlp(shape.dim, shape.hidden)
    x = torch.randn(shape.batch, shape.tokens, shape.dim)
    if impl == "cpu-backend":
        params = (norm.weight, norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
        _pedantic(benchmark, lambda: ops.layernorm_mlp(x, *params, eps=shape.eps, backend="cpu"), rounds=SHORT_ROUNDS)
    else:
        _pedantic(benchmark, lambda: x + mlp(norm(x)), rounds=SHORT_ROUNDS)
