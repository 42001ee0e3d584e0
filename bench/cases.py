"""One benchmark case per op: its random inputs, its minimal work, and the call of a vitkernels backend.

Inputs are a dict of named tensors (and None for absent optional ones) so that every provider,
vitkernels' backends and the others in providers.py, reads the same tensors by name:

* window_attention: qkv [B, H, W, 3C], bias_table [(2w-1)^2, heads], logit_scale [heads] or None
  (SwinV2's cosine attention)
* attention: qkv [B, N, 3C]
* layernorm_mlp: x [B, N, C], ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias
* layernorm: x, weight, bias; add_layernorm: x, residual, weight, bias
* patch_embed: image [B, 3, S, S] (not differentiated; uint8 with its mean and std where the shape
  says so), weight, bias, and as the shape asks prefix_tokens, pos_embed, norm_weight, norm_bias
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Callable, NamedTuple, Optional

import pytest
import torch

import shapes
from vitkernels import backends, ops
from vitkernels.testing import LOW_PRECISION, assert_close

Inputs = dict[str, Optional[torch.Tensor]]


class Work(NamedTuple):
    """Minimal work of one call: bytes that must cross DRAM once, and floating-point operations."""

    bytes: float
    flops: float


MEMORY_BOUND = {"window_attention", "layernorm", "add_layernorm"}
MODES = ("fwd", "bwd", "fwd+bwd")


def _randn(*size, device, dtype, scale=1.0):
    return torch.randn(*size, device=device, dtype=torch.float32).mul_(scale).to(dtype)


# --- window_attention ---------------------------------------------------------------------------

def _window_attention_inputs(shape: shapes.WindowAttentionShape, device, dtype) -> Inputs:
    rows = (2 * shape.window - 1) ** 2
    qkv = _randn(shape.batch, shape.height, shape.width, 3 * shape.dim, device=device, dtype=dtype)
    if shape.cosine:  # SwinV2: the cpb table is 16 * sigmoid(mlp(coords)); logit_scale starts at log(10)
        table = (16 * torch.sigmoid(torch.randn(rows, shape.heads, device=device))).to(dtype)
        return {"qkv": qkv, "bias_table": table,
                "logit_scale": torch.full((shape.heads,), math.log(10.0), device=device, dtype=dtype)}
    return {"qkv": qkv, "bias_table": _randn(rows, shape.heads, device=device, dtype=dtype, scale=0.02),
            "logit_scale": None}


def _window_attention_call(shape: shapes.WindowAttentionShape, backend: str) -> Callable[[Inputs], torch.Tensor]:
    def call(t: Inputs) -> torch.Tensor:
        return ops.window_attention(t["qkv"], shape.heads, shape.window, shape.shift, t["bias_table"],
                                    logit_scale=t["logit_scale"], backend=backend)

    return call


def _window_attention_work(shape: shapes.WindowAttentionShape, itemsize: int, backward: bool) -> Work:
    # Forward: qkv read once (3C), output written once (C). Backward: read qkv, out, dout, write dqkv.
    w = shape.window
    padded = math.ceil(shape.height / w) * w * math.ceil(shape.width / w) * w
    tokens, c = shape.batch * shape.height * shape.width, shape.dim
    fwd_bytes, bwd_bytes = 4 * c * tokens * itemsize, 8 * c * tokens * itemsize
    fwd_flops = 4.0 * shape.batch * padded * w * w * c  # QK^T and PV per window: 2 * 2 * N^2 * d per head
    return Work(fwd_bytes + (bwd_bytes if backward else 0), fwd_flops * (3.5 if backward else 1.0))


# --- attention ------------------------------------------------------------------------------------

def _attention_inputs(shape: shapes.AttentionShape, device, dtype) -> Inputs:
    return {"qkv": _randn(shape.batch, shape.tokens, 3 * shape.dim, device=device, dtype=dtype)}


def _attention_call(shape: shapes.AttentionShape, backend: str) -> Callable[[Inputs], torch.Tensor]:
    return lambda t: ops.attention(t["qkv"], shape.heads, backend=backend)


def _attention_work(shape: shapes.AttentionShape, itemsize: int, backward: bool) -> Work:
    tokens, c = shape.batch * shape.tokens, shape.dim
    fwd_bytes, bwd_bytes = 4 * c * tokens * itemsize, 8 * c * tokens * itemsize
    fwd_flops = 4.0 * shape.batch * shape.tokens ** 2 * c
    # Backward is 2.5x the forward's matmul work (5 matmuls against 2), as flash-attention counts it.
    return Work(fwd_bytes + (bwd_bytes if backward else 0), fwd_flops * (3.5 if backward else 1.0))


# --- layernorm_mlp, layernorm, add_layernorm ------------------------------------------------------

def _norm_params(c: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return 1 + _randn(c, device=device, dtype=dtype, scale=0.1), _randn(c, device=device, dtype=dtype, scale=0.1)


def _layernorm_mlp_inputs(shape: shapes.TokenShape, device, dtype) -> Inputs:
    c, h = shape.dim, shape.hidden
    ln_weight, ln_bias = _norm_params(c, device, dtype)
    return {
        "x": _randn(shape.batch, shape.tokens, c, device=device, dtype=dtype), "ln_weight": ln_weight,
        "ln_bias": ln_bias, "fc1_weight": _randn(h, c, device=device, dtype=dtype, scale=c ** -0.5),
        "fc1_bias": _randn(h, device=device, dtype=dtype, scale=0.02),
        "fc2_weight": _randn(c, h, device=device, dtype=dtype, scale=h ** -0.5),
        "fc2_bias": _randn(c, device=device, dtype=dtype, scale=0.02),
    }


MLP_PARAMS = ("ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


def _layernorm_mlp_call(shape: shapes.TokenShape, backend: str) -> Callable[[Inputs], torch.Tensor]:
    return lambda t: ops.layernorm_mlp(t["x"], *(t[k] for k in MLP_PARAMS), eps=shape.eps, backend=backend)


def _layernorm_mlp_work(shape: shapes.TokenShape, itemsize: int, backward: bool) -> Work:
    rows, c, h = shape.rows, shape.dim, shape.hidden
    fwd_bytes = (2 * rows * c + 2 * c * h) * itemsize  # x in, out, both weights
    bwd_bytes = (3 * rows * c + 4 * c * h) * itemsize  # x, dout in, dx out; weights in, weight grads out
    fwd_flops = 4.0 * rows * c * h  # fc1 and fc2: 2 * rows * c * h each
    return Work(fwd_bytes + (bwd_bytes if backward else 0), fwd_flops * (3.0 if backward else 1.0))


def _layernorm_inputs(shape: shapes.TokenShape, device, dtype) -> Inputs:
    weight, bias = _norm_params(shape.dim, device, dtype)
    return {"x": _randn(shape.batch, shape.tokens, shape.dim, device=device, dtype=dtype), "weight": weight,
            "bias": bias}


def _layernorm_call(shape: shapes.TokenShape, backend: str) -> Callable[[Inputs], torch.Tensor]:
    return lambda t: ops.layernorm(t["x"], t["weight"], t["bias"], eps=shape.eps, backend=backend)


def _layernorm_work(shape: shapes.TokenShape, itemsize: int, backward: bool) -> Work:
    # Forward: x in, y out. Backward: x and dy in, dx out (weight and bias grads are [C]).
    elements = shape.rows * shape.dim
    return Work((2 + (3 if backward else 0)) * elements * itemsize, (8.0 + (12.0 if backward else 0)) * elements)


def _add_layernorm_inputs(shape: shapes.TokenShape, device, dtype) -> Inputs:
    inputs = _layernorm_inputs(shape, device, dtype)
    inputs["residual"] = _randn(shape.batch, shape.tokens, shape.dim, device=device, dtype=dtype)
    return inputs


def _add_layernorm_call(shape: shapes.TokenShape, backend: str) -> Callable[[Inputs], tuple]:
    return lambda t: ops.add_layernorm(t["x"], t["residual"], t["weight"], t["bias"], eps=shape.eps, backend=backend)


def _add_layernorm_work(shape: shapes.TokenShape, itemsize: int, backward: bool) -> Work:
    # Forward: x, residual in; sum, normed out. Backward: sum, dnormed, dsum in; dx, dresidual out.
    elements = shape.rows * shape.dim
    return Work((4 + (5 if backward else 0)) * elements * itemsize, (9.0 + (13.0 if backward else 0)) * elements)


# --- patch_embed ----------------------------------------------------------------------------------

def _patch_embed_inputs(shape: shapes.PatchEmbedShape, device, dtype) -> Inputs:
    e, p = shape.dim, shape.patch
    fan_in = shape.in_chans * p * p
    image_shape = (shape.batch, shape.in_chans, shape.image, shape.image)
    if shape.uint8:
        image = torch.randint(0, 256, image_shape, device=device, dtype=torch.uint8)
    else:
        image = _randn(*image_shape, device=device, dtype=dtype)
    inputs = {"image": image,
              "weight": _randn(e, shape.in_chans, p, p, device=device, dtype=dtype, scale=fan_in ** -0.5),
              "bias": _randn(e, device=device, dtype=dtype, scale=0.02),
              "prefix_tokens": None, "pos_embed": None, "norm_weight": None, "norm_bias": None,
              "mean": None, "std": None}
    if shape.uint8:  # ImageNet's statistics, as timm's transforms apply them
        inputs["mean"] = torch.tensor([0.485, 0.456, 0.406], device=device, dtype=dtype)
        inputs["std"] = torch.tensor([0.229, 0.224, 0.225], device=device, dtype=dtype)
    if shape.prefix_tokens:
        inputs["prefix_tokens"] = _randn(1, shape.prefix_tokens, e, device=device, dtype=dtype, scale=0.02)
    if shape.pos_embed:
        inputs["pos_embed"] = _randn(1, shape.prefix_tokens + shape.patches, e, device=device, dtype=dtype,
                                     scale=0.02)
    if shape.patch_norm:
        inputs["norm_weight"], inputs["norm_bias"] = _norm_params(e, device, dtype)
    return inputs


def _patch_embed_call(shape: shapes.PatchEmbedShape, backend: str) -> Callable[[Inputs], torch.Tensor]:
    def call(t: Inputs) -> torch.Tensor:
        return ops.patch_embed(t["image"], t["weight"], t["bias"], prefix_tokens=t["prefix_tokens"],
                               pos_embed=t["pos_embed"], patch_norm=shape.patch_norm, norm_weight=t["norm_weight"],
                               norm_bias=t["norm_bias"], mean=t["mean"], std=t["std"],
                               output_format=shape.output_format, backend=backend)

    return call


def _patch_embed_work(shape: shapes.PatchEmbedShape, itemsize: int, backward: bool) -> Work:
    rows = shape.batch * shape.patches
    k = shape.in_chans * shape.patch ** 2
    out = shape.batch * (shape.prefix_tokens + shape.patches) * shape.dim
    image = shape.batch * shape.in_chans * shape.image ** 2 * (1 if shape.uint8 else itemsize)
    io_bytes = image + (out + shape.dim * k) * itemsize
    # Backward reads the image and dout and writes dW: the same bytes again.
    return Work(io_bytes * (2 if backward else 1), 2.0 * rows * k * shape.dim * (2.0 if backward else 1.0))


class OpCase(NamedTuple):
    shapes: tuple
    inputs: Callable[..., Inputs]
    call: Callable[..., Callable[[Inputs], object]]
    work: Callable[..., Work]
    no_grad: frozenset = frozenset()  # inputs backward does not differentiate


OPS = {
    "window_attention": OpCase(shapes.WINDOW_ATTENTION, _window_attention_inputs, _window_attention_call,
                               _window_attention_work, frozenset({"logit_scale"})),
    "attention": OpCase(shapes.ATTENTION, _attention_inputs, _attention_call, _attention_work),
    "layernorm_mlp": OpCase(shapes.TOKENS, _layernorm_mlp_inputs, _layernorm_mlp_call, _layernorm_mlp_work),
    "layernorm": OpCase(shapes.TOKENS, _layernorm_inputs, _layernorm_call, _layernorm_work),
    "add_layernorm": OpCase(shapes.TOKENS, _add_layernorm_inputs, _add_layernorm_call, _add_layernorm_work),
    # The image and its normalization are inputs, not parameters: backward computes the parameters'
    # gradients only.
    "patch_embed": OpCase(shapes.PATCH_EMBED, _patch_embed_inputs, _patch_embed_call, _patch_embed_work,
                          frozenset({"image", "mean", "std"})),
}
assert set(OPS) == set(ops.OPS), f"benchmarks {sorted(OPS)} != ops {sorted(ops.OPS)}"


def make_inputs(op: str, shape, device, dtype, grad: bool) -> Inputs:
    """Fresh random inputs of ``op`` at ``shape``; with ``grad`` the differentiated ones require grad."""
    inputs = OPS[op].inputs(shape, device, dtype)
    if grad:
        for name, t in inputs.items():
            if t is not None and name not in OPS[op].no_grad:
                t.requires_grad_(True)
    return inputs


def grad_inputs(inputs: Inputs) -> list[torch.Tensor]:
    return [t for t in inputs.values() if t is not None and t.requires_grad]


def cast(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Detached copies in ``dtype`` (for the float64 reference); integer tensors (a uint8 image) as they are."""
    return {k: None if t is None else t.detach().to(dtype) if t.is_floating_point() else t.detach()
            for k, t in inputs.items()}


def work(op: str, shape, itemsize: int, mode: str) -> Work:
    """Minimal work of ``mode`` ("fwd", "bwd" or "fwd+bwd"): backward alone is the difference of the two."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; expected one of {MODES}")
    fwd = OPS[op].work(shape, itemsize, False)
    if mode == "fwd":
        return fwd
    both = OPS[op].work(shape, itemsize, True)
    return both if mode == "fwd+bwd" else Work(both.bytes - fwd.bytes, both.flops - fwd.flops)


def metric(op: str) -> str:
    """The headline unit of ``op``: GB/s for memory-bound ops, TFLOP/s for matmul-like ones."""
    return "GB/s" if op in MEMORY_BOUND else "TFLOP/s"


def nbytes(inputs: Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if t is not None)


def selected(variable: str, choices: tuple) -> list[str]:
    """The comma-separated names of environment ``variable`` (all ``choices`` when unset), validated."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return list(choices)
    chosen = [name.strip() for name in raw.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(choices))
    if unknown:
        raise ValueError(f"{variable} names unknown entries {unknown}; expected some of {list(choices)}")
    return chosen


def outputs(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, (tuple, list)) else [result]


def check_against_reference(op: str, shape, fn, inputs: Inputs, dtype, eager) -> None:
    """Asserts the forward output of ``fn`` under the tolerance policy (float64 reference: the torch backend).

    fp16/bf16 outputs are bounded by the error of ``eager`` (the zoo's computation) in that dtype.
    """
    with torch.no_grad():
        actual = outputs(fn(inputs))
        expected = outputs(OPS[op].call(shape, "torch")(cast(inputs, torch.float64)))
        low = outputs(eager(inputs)) if dtype in LOW_PRECISION else [None] * len(expected)
    for i, (a, e, lp) in enumerate(zip(actual, expected, low)):
        assert_close(a, e, low_precision_reference=lp, name=f"{op} {shape.name} output {i}")


@contextlib.contextmanager
def skip_outside_failures(provider: str):
    """Skips the benchmark on NotSupportedError, and on any error of a provider outside vitkernels
    (it is then not timed; the reason names the error). A vitkernels backend's error fails the test."""
    try:
        yield
    except backends.NotSupportedError as err:
        pytest.skip(str(err))
    except Exception as err:  # noqa: BLE001
        if provider in backends.BACKENDS:
            raise
        pytest.skip(f"{provider} not timed: {type(err).__name__}: {next(iter(str(err).splitlines()), '')}")
