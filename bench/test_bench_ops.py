"""Benchmarks of every op over the shape registry and every backend that runs on this device.

Forward and forward+backward. Each result's ``extra_info`` holds the minimal work of the call
(``bytes`` and ``flops``), the op's headline ``metric`` ("GB/s" for memory-bound ops, "TFLOP/s"
for matmul-like ones) and its achieved ``value``; bench/device_check.py relates them to the copy
bandwidth and matmul rate measured on the same device.

On GPU each timed call ends with torch.cuda.synchronize(), so a round is the wall time of the
launches and the kernels; calls are long enough at the GPU batches that launch latency is a small
part of it. Rounds are fixed per benchmark from a timed trial call (``benchmark.pedantic``).

Run: ``pytest bench -q``; ``VITKERNELS_BENCH_SHAPES=quick|standard|all`` picks the shapes and
``VITKERNELS_BENCH_OPS=layernorm,attention`` the ops.
"""
from __future__ import annotations

import math
import os
import time
from typing import Callable, NamedTuple

import pytest
import torch

import shapes
from vitkernels import backends, ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Seconds of timed rounds per benchmark (after warm-up); rounds are clamped to [MIN_ROUNDS, MAX_ROUNDS].
ROUND_BUDGET_S = 0.25 if DEVICE == "cuda" else 0.2
MIN_ROUNDS, MAX_ROUNDS = 3, 200
WARMUP_CALLS = 2

MEMORY_BOUND = {"window_attention", "layernorm", "add_layernorm"}


class Work(NamedTuple):
    """Minimal work of one call: bytes that must cross DRAM once, and floating-point operations."""

    bytes: float
    flops: float


class Prepared(NamedTuple):
    """A ready call: ``run(backend)`` returns the outputs; ``grad_inputs`` are what backward differentiates."""

    run: Callable[[str], object]
    grad_inputs: list


def _randn(*size, device, dtype, scale=1.0, requires_grad=False):
    t = torch.randn(*size, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return t.requires_grad_(requires_grad)


# --- window_attention ---------------------------------------------------------------------------

def _window_attention(shape: shapes.WindowAttentionShape, device, dtype, grad: bool) -> Prepared:
    w, heads = shape.window, shape.heads
    qkv = _randn(shape.batch, shape.height, shape.width, 3 * shape.dim, device=device, dtype=dtype,
                 requires_grad=grad)
    table_rows = (2 * w - 1) ** 2
    if shape.cosine:  # SwinV2: the cpb table is 16 * sigmoid(mlp(coords)); logit_scale starts at log(10)
        bias_table = (16 * torch.sigmoid(torch.randn(table_rows, heads, device=device))).to(dtype)
        logit_scale = torch.full((heads,), math.log(10.0), device=device, dtype=dtype)
    else:
        bias_table = _randn(table_rows, heads, device=device, dtype=dtype, scale=0.02)
        logit_scale = None
    bias_table.requires_grad_(grad)

    def run(backend):
        return ops.window_attention(qkv, heads, w, shape.shift, bias_table, logit_scale=logit_scale,
                                    backend=backend)

    return Prepared(run, [qkv, bias_table])


def _window_attention_work(shape: shapes.WindowAttentionShape, itemsize: int, backward: bool) -> Work:
    # Forward: qkv read once (3C), output written once (C). Backward: read qkv, out, dout, write dqkv.
    w = shape.window
    padded = math.ceil(shape.height / w) * w * math.ceil(shape.width / w) * w
    tokens, c = shape.batch * shape.height * shape.width, shape.dim
    fwd_bytes, bwd_bytes = 4 * c * tokens * itemsize, 8 * c * tokens * itemsize
    fwd_flops = 4.0 * shape.batch * padded * w * w * c  # QK^T and PV per window: 2 * 2 * N^2 * d per head
    return Work(fwd_bytes + (bwd_bytes if backward else 0), fwd_flops * (3.5 if backward else 1.0))


# --- attention ------------------------------------------------------------------------------------

def _attention(shape: shapes.AttentionShape, device, dtype, grad: bool) -> Prepared:
    qkv = _randn(shape.batch, shape.tokens, 3 * shape.dim, device=device, dtype=dtype, requires_grad=grad)
    return Prepared(lambda backend: ops.attention(qkv, shape.heads, backend=backend), [qkv])


def _attention_work(shape: shapes.AttentionShape, itemsize: int, backward: bool) -> Work:
    tokens, c = shape.batch * shape.tokens, shape.dim
    fwd_bytes, bwd_bytes = 4 * c * tokens * itemsize, 8 * c * tokens * itemsize
    fwd_flops = 4.0 * shape.batch * shape.tokens ** 2 * c
    # Backward is 2.5x the forward's matmul work (5 matmuls against 2), as flash-attention counts it.
    return Work(fwd_bytes + (bwd_bytes if backward else 0), fwd_flops * (3.5 if backward else 1.0))


# --- layernorm_mlp, layernorm, add_layernorm ------------------------------------------------------

def _layernorm_mlp(shape: shapes.TokenShape, device, dtype, grad: bool) -> Prepared:
    c, h = shape.dim, shape.hidden
    x = _randn(shape.batch, shape.tokens, c, device=device, dtype=dtype, requires_grad=grad)
    params = [
        1 + _randn(c, device=device, dtype=dtype, scale=0.1), _randn(c, device=device, dtype=dtype, scale=0.1),
        _randn(h, c, device=device, dtype=dtype, scale=c ** -0.5), _randn(h, device=device, dtype=dtype, scale=0.02),
        _randn(c, h, device=device, dtype=dtype, scale=h ** -0.5), _randn(c, device=device, dtype=dtype, scale=0.02),
    ]
    for p in params:
        p.requires_grad_(grad)

    def run(backend):
        return ops.layernorm_mlp(x, *params, eps=shape.eps, backend=backend)

    return Prepared(run, [x, *params])


def _layernorm_mlp_work(shape: shapes.TokenShape, itemsize: int, backward: bool) -> Work:
    rows, c, h = shape.rows, shape.dim, shape.hidden
    fwd_bytes = (2 * rows * c + 2 * c * h) * itemsize  # x in, out, both weights
    bwd_bytes = (3 * rows * c + 4 * c * h) * itemsize  # x, dout in, dx out; weights in, weight grads out
    fwd_flops = 4.0 * rows * c * h  # fc1 and fc2: 2 * rows * c * h each
    return Work(fwd_bytes + (bwd_bytes if backward else 0), fwd_flops * (3.0 if backward else 1.0))


def _layernorm(shape: shapes.TokenShape, device, dtype, grad: bool) -> Prepared:
    c = shape.dim
    x = _randn(shape.batch, shape.tokens, c, device=device, dtype=dtype, requires_grad=grad)
    weight = (1 + _randn(c, device=device, dtype=dtype, scale=0.1)).requires_grad_(grad)
    bias = _randn(c, device=device, dtype=dtype, scale=0.1, requires_grad=grad)
    return Prepared(lambda backend: ops.layernorm(x, weight, bias, eps=shape.eps, backend=backend), [x, weight, bias])


def _layernorm_work(shape: shapes.TokenShape, itemsize: int, backward: bool) -> Work:
    # Forward: x in, y out. Backward: x and dy in, dx out (weight and bias grads are [C]).
    elements = shape.rows * shape.dim
    return Work((2 + (3 if backward else 0)) * elements * itemsize, (8.0 + (12.0 if backward else 0)) * elements)


def _add_layernorm(shape: shapes.TokenShape, device, dtype, grad: bool) -> Prepared:
    c = shape.dim
    x = _randn(shape.batch, shape.tokens, c, device=device, dtype=dtype, requires_grad=grad)
    residual = _randn(shape.batch, shape.tokens, c, device=device, dtype=dtype, requires_grad=grad)
    weight = (1 + _randn(c, device=device, dtype=dtype, scale=0.1)).requires_grad_(grad)
    bias = _randn(c, device=device, dtype=dtype, scale=0.1, requires_grad=grad)

    def run(backend):
        return ops.add_layernorm(x, residual, weight, bias, eps=shape.eps, backend=backend)

    return Prepared(run, [x, residual, weight, bias])


def _add_layernorm_work(shape: shapes.TokenShape, itemsize: int, backward: bool) -> Work:
    # Forward: x, residual in; sum, normed out. Backward: sum, dnormed, dsum in; dx, dresidual out.
    elements = shape.rows * shape.dim
    return Work((4 + (5 if backward else 0)) * elements * itemsize, (9.0 + (13.0 if backward else 0)) * elements)


# --- patch_embed ----------------------------------------------------------------------------------

def _patch_embed(shape: shapes.PatchEmbedShape, device, dtype, grad: bool) -> Prepared:
    e, p = shape.dim, shape.patch
    x = _randn(shape.batch, shape.in_chans, shape.image, shape.image, device=device, dtype=dtype)
    fan_in = shape.in_chans * p * p
    weight = _randn(e, shape.in_chans, p, p, device=device, dtype=dtype, scale=fan_in ** -0.5, requires_grad=grad)
    bias = _randn(e, device=device, dtype=dtype, scale=0.02, requires_grad=grad)
    kwargs, params = {}, [weight, bias]
    if shape.prefix_tokens:
        kwargs["prefix_tokens"] = _randn(1, shape.prefix_tokens, e, device=device, dtype=dtype, scale=0.02,
                                         requires_grad=grad)
        params.append(kwargs["prefix_tokens"])
    if shape.pos_embed:
        kwargs["pos_embed"] = _randn(1, shape.prefix_tokens + shape.patches, e, device=device, dtype=dtype,
                                     scale=0.02, requires_grad=grad)
        params.append(kwargs["pos_embed"])
    if shape.patch_norm:
        norm_weight = (1 + _randn(e, device=device, dtype=dtype, scale=0.1)).requires_grad_(grad)
        norm_bias = _randn(e, device=device, dtype=dtype, scale=0.1, requires_grad=grad)
        kwargs.update(patch_norm=True, norm_weight=norm_weight, norm_bias=norm_bias)
        params += [kwargs["norm_weight"], kwargs["norm_bias"]]

    def run(backend):
        return ops.patch_embed(x, weight, bias, output_format=shape.output_format, backend=backend, **kwargs)

    # The image is an input, not a parameter: backward computes the parameters' gradients only.
    return Prepared(run, params)


def _patch_embed_work(shape: shapes.PatchEmbedShape, itemsize: int, backward: bool) -> Work:
    rows = shape.batch * shape.patches
    k = shape.in_chans * shape.patch ** 2
    out = shape.batch * (shape.prefix_tokens + shape.patches) * shape.dim
    fwd_bytes = (shape.batch * shape.in_chans * shape.image ** 2 + out + shape.dim * k) * itemsize
    bwd_bytes = (shape.batch * shape.in_chans * shape.image ** 2 + out + shape.dim * k) * itemsize  # x, dout in, dW out
    fwd_flops = 2.0 * rows * k * shape.dim
    return Work(fwd_bytes + (bwd_bytes if backward else 0), fwd_flops * (2.0 if backward else 1.0))


OPS = {
    "window_attention": (shapes.WINDOW_ATTENTION, _window_attention, _window_attention_work),
    "attention": (shapes.ATTENTION, _attention, _attention_work),
    "layernorm_mlp": (shapes.TOKENS, _layernorm_mlp, _layernorm_mlp_work),
    "layernorm": (shapes.TOKENS, _layernorm, _layernorm_work),
    "add_layernorm": (shapes.TOKENS, _add_layernorm, _add_layernorm_work),
    "patch_embed": (shapes.PATCH_EMBED, _patch_embed, _patch_embed_work),
}
assert set(OPS) == set(ops.OPS), f"benchmarks {sorted(OPS)} != ops {sorted(ops.OPS)}"


def selected_ops() -> list[str]:
    """``VITKERNELS_BENCH_OPS`` (comma-separated op names) if set, else every op."""
    raw = os.environ.get("VITKERNELS_BENCH_OPS", "").strip()
    if not raw:
        return list(OPS)
    chosen = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(OPS))
    if unknown:
        raise ValueError(f"VITKERNELS_BENCH_OPS names unknown ops {unknown}; expected some of {sorted(OPS)}")
    return chosen


CASES = [
    pytest.param(op, shape, id=f"{op}-{shape.name}")
    for op in selected_ops()
    for shape in shapes.for_device(OPS[op][0], DEVICE)
]


def skip_reason(op: str, backend: str, device: str):
    """Why ``backend`` cannot be benchmarked for ``op`` here, or None."""
    if backend == "triton" and device != "cuda":
        return "Triton on CPU runs in the interpreter, whose timings say nothing about the kernels"
    missing = backends.unavailable_reason(backend)
    if missing is not None:
        return f"backend {backend!r} unavailable: {missing}"
    if backend not in ops.backend_table(op):
        return f"no {backend} implementation of {op}"
    return None


def _synchronize(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _measure(benchmark, call: Callable[[], None]) -> None:
    for _ in range(WARMUP_CALLS):
        call()
    start = time.perf_counter()
    call()
    trial = max(time.perf_counter() - start, 1e-7)
    rounds = int(min(MAX_ROUNDS, max(MIN_ROUNDS, ROUND_BUDGET_S // trial)))
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)


def _record(benchmark, op, shape, backend, mode, dtype, work: Work) -> None:
    metric = "GB/s" if op in MEMORY_BOUND else "TFLOP/s"
    benchmark.extra_info.update(
        op=op, shape=shape.name, model=shape.model, backend=backend, mode=mode, batch=shape.batch,
        dtype=str(dtype).replace("torch.", ""), device=DEVICE, bytes=work.bytes, flops=work.flops, metric=metric,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        seconds = stats.stats.median
        benchmark.extra_info["gbps"] = work.bytes / seconds / 1e9
        benchmark.extra_info["tflops"] = work.flops / seconds / 1e12
        benchmark.extra_info["value"] = benchmark.extra_info["gbps" if metric == "GB/s" else "tflops"]


def _run(benchmark, op, shape, backend, device, dtype, backward: bool):
    reason = skip_reason(op, backend, device)
    if reason:
        pytest.skip(reason)
    _, prepare, work = OPS[op]
    mode = "fwd+bwd" if backward else "fwd"
    benchmark.group = f"{op} {mode} {shape.name}"
    prepared = prepare(shape, device, dtype, backward)
    sync = _synchronize(device)
    try:
        with torch.set_grad_enabled(backward):
            outputs = prepared.run(backend)
    except backends.NotSupportedError as err:
        pytest.skip(str(err))

    if backward:
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        grads = [torch.randn_like(o) for o in outputs]
        del outputs

        def call():
            out = prepared.run(backend)
            out = out if isinstance(out, tuple) else (out,)
            torch.autograd.grad(out, prepared.grad_inputs, grads, allow_unused=True)
            sync()
    else:
        del outputs

        def call():
            with torch.no_grad():
                prepared.run(backend)
            sync()

    _measure(benchmark, call)
    _record(benchmark, op, shape, backend, mode, dtype, work(shape, torch.empty((), dtype=dtype).element_size(),
                                                                backward))


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("op, shape", CASES)
def test_forward(benchmark, op, shape, backend, device, dtype):
    _run(benchmark, op, shape, backend, device, dtype, backward=False)


@pytest.mark.parametrize("backend", backends.BACKENDS)
@pytest.mark.parametrize("op, shape", CASES)
def test_forward_backward(benchmark, op, shape, backend, device, dtype):
    _run(benchmark, op, shape, backend, device, dtype, backward=True)
