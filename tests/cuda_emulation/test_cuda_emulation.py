"""The CUDA kernels, run on the CPU by the emulated build (build_emulation.py, include/vk_emulation.h),
against the references: their index arithmetic, fragment layouts, barriers and shared-memory
bounds are tested without a GPU. For the tests of this module the emulated CUDA entry points take
the place of the ops' CPU kernels, so that the public ops with backend="cpu" run the CUDA kernels
through the ops' own argument handling and autograd. Timing, and whatever depends on the real
hardware (the compiled code's numerics, races the emulator's two thread orders do not expose), is
left to the `cuda` tests.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from build_emulation import load

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "ops"), str(TESTS)]  # the op tests' shared harnesses
from op_helpers import compare_with_reference, random  # noqa: E402
from test_numerics import (  # noqa: E402
    LARGE, check_fully_masked_rows, check_infinite_shift_mask, check_large_values_stay_finite,
    check_non_finite_input_propagates)
from test_large_index import MAX_RSS_GROWTH, _rss  # noqa: E402
from test_layernorm_mlp import _misaligned  # noqa: E402
from test_patch_embed import CASES as PATCH_CASES, CIN, DIM  # noqa: E402

from vitkernels import ops  # noqa: E402
from vitkernels.testing import assert_close  # noqa: E402
from vitkernels.ops.attention.reference import attention_reference  # noqa: E402
from vitkernels.ops.layernorm_mlp.reference import (  # noqa: E402
    add_layernorm_reference, layernorm_mlp_reference, layernorm_reference)
from vitkernels.ops.patch_embed.reference import patch_embed_reference  # noqa: E402
from vitkernels.ops.window_attention.reference import relative_position_bias, window_attention_reference  # noqa: E402

# The inputs are CPU tensors; where a GPU is present, the `cuda` tests run the kernels themselves.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda tests run the real kernels here")]

HALF = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ALL = [pytest.param(torch.float32, id="fp32"), *HALF]
OPS = ("gather_relative_position_bias", "window_attention_fwd", "window_attention_bwd", "attention_fwd",
       "attention_bwd", "layernorm_fwd", "add_layernorm_fwd", "layernorm_bwd", "layernorm_mlp_fwd",
       "layernorm_mlp_bwd", "patch_embed_fwd", "patch_embed_bwd")


@pytest.fixture(scope="module")
def emulated():
    """The emulated module, its entry points registered as the ops' CPU kernels until the module's
    tests end (then the C++ CPU kernels are back)."""
    module = load()
    library = torch.library.Library("vitkernels", "IMPL")
    for name in OPS:
        library.impl(name, getattr(module, name), "CPU")
    yield module
    library._destroy()


@pytest.fixture(params=[False, True], ids=["thread-order", "reverse-order"])
def order(request, emulated):
    emulated.set_reverse_order(request.param)
    yield request.param
    emulated.set_reverse_order(False)


# --- window attention --------------------------------------------------------------------------

def _window_run(heads, window, shift, *, pad_first=False, scale=None, mask_value=-100.0):
    options = dict(pad_first=pad_first, scale=scale, mask_value=mask_value)

    def run(qkv, table=None, qkv_bias=None, logit_scale=None):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, logit_scale=logit_scale,
                                    backend="cpu", **options)

    def reference(qkv, table=None, qkv_bias=None, logit_scale=None):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias,
                                          logit_scale=logit_scale, **options)

    return run, reference


def _window_inputs(batch, height, width, heads, head_dim, window):
    channels = heads * head_dim
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    return [random(batch, height, width, 3 * channels), random(rows, heads), random(3 * channels)]


# (batch, H, W, heads, head_dim, window, shift): the cuda tests' shapes on smaller maps: one
# 64-token tile (7x7 with padding and shift, 8x8), three tiles a side (12x12), head_dim 64 and 48
# (padded to 64), a non-square window.
WINDOW_CASES = [
    pytest.param(1, 14, 14, 2, 32, (7, 7), (3, 3), id="swin-7x7"),
    pytest.param(1, 17, 20, 2, 32, (7, 7), (3, 3), id="padded"),
    pytest.param(1, 16, 16, 2, 32, (8, 8), (4, 4), id="window8"),
    pytest.param(1, 12, 24, 1, 32, (12, 12), (6, 6), id="window12-multi-tile"),
    pytest.param(1, 8, 16, 1, 64, (8, 8), (0, 4), id="head64"),
    pytest.param(1, 13, 13, 1, 48, (7, 7), (3, 3), id="head48-padded"),
    pytest.param(2, 5, 9, 2, 16, (3, 5), (1, 2), id="non-square-window"),
]


@pytest.mark.parametrize("pad_first", [False, True], ids=["timm-order", "hf-tv-order"])
@pytest.mark.parametrize("batch,height,width,heads,head_dim,window,shift", WINDOW_CASES)
@pytest.mark.parametrize("dtype", HALF)
def test_window_attention(emulated, order, batch, height, width, heads, head_dim, window, shift, pad_first, dtype):
    run, reference = _window_run(heads, window, shift, pad_first=pad_first)
    compare_with_reference(run, reference, _window_inputs(batch, height, width, heads, head_dim, window), dtype)


@pytest.mark.parametrize("window,shift", [((8, 8), (4, 4)), ((12, 12), (6, 6))], ids=["window8", "window12"])
@pytest.mark.parametrize("dtype", HALF)
def test_window_attention_cosine(emulated, window, shift, dtype):
    heads = 4
    qkv, table, qkv_bias = _window_inputs(1, window[0] + 3, window[1], heads, 16, window)
    # two heads above the log(100) clamp, two below; the HF Swinv2 doubled mask
    logit_scale = torch.tensor([5.0, 2.3, 3.9, 4.7], dtype=torch.float64).reshape(heads, 1, 1)
    run, reference = _window_run(heads, window, shift, pad_first=True, mask_value=-200.0)
    compare_with_reference(run, reference, [qkv, 16 * torch.sigmoid(table), qkv_bias, logit_scale], dtype)


def test_window_attention_without_bias_and_with_a_scale(emulated):
    qkv = _window_inputs(2, 15, 15, 3, 32, (7, 7))[0]
    run, reference = _window_run(3, (7, 7), (3, 3), scale=0.3)
    compare_with_reference(run, reference, [qkv], torch.float16)


def test_window_attention_backward_is_the_same_in_either_thread_order(emulated):
    """The reduced gradients (bias table, qkv_bias, logit_scale) are summed in an order fixed by the
    shape, not by which thread gets there first."""
    heads, window = 3, (7, 7)
    qkv, table, qkv_bias = (t.half().requires_grad_() for t in _window_inputs(4, 23, 21, heads, 32, window))
    logit_scale = torch.rand(heads, requires_grad=True)
    out = ops.window_attention(qkv, heads, window, 3, table, qkv_bias=qkv_bias, logit_scale=logit_scale,
                               backend="cpu")
    grad = torch.randn_like(out)
    inputs = (qkv, table, qkv_bias, logit_scale)
    first = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    emulated.set_reverse_order(True)
    try:
        second = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    finally:
        emulated.set_reverse_order(False)
    for name, a, b in zip(("qkv", "bias_table", "qkv_bias", "logit_scale"), first, second):
        assert torch.equal(a, b), f"{name}: max difference {(a.float() - b.float()).abs().max().item():.3e}"


def test_gather_relative_position_bias(emulated):
    table = torch.randn(13 * 9, 3)
    torch.testing.assert_close(torch.ops.vitkernels.gather_relative_position_bias(table, 7, 5),
                               relative_position_bias(table, 7, 5), atol=0, rtol=0)


# --- global attention --------------------------------------------------------------------------

# (batch, tokens, heads, head_dim): one ragged tile, several (ViT-B/16 at 224: 197 tokens), head_dim
# 32 and 40 (padded to 64).
@pytest.mark.parametrize("batch,tokens,heads,head_dim", [(2, 17, 2, 64), (1, 197, 2, 64), (2, 65, 1, 40),
                                                        (1, 130, 2, 32)])
@pytest.mark.parametrize("bias_shape", [None, "tokens", "full"])
@pytest.mark.parametrize("dtype", HALF)
def test_attention(emulated, order, batch, tokens, heads, head_dim, bias_shape, dtype):
    shapes = {None: None, "tokens": (tokens, tokens), "full": (batch, heads, tokens, tokens)}
    bias = None if shapes[bias_shape] is None else random(*shapes[bias_shape])

    def run(qkv, bias):
        return ops.attention(qkv, heads, bias=bias, backend="cpu")

    def reference(qkv, bias):
        return attention_reference(qkv, heads, bias=bias)

    compare_with_reference(run, reference, [random(batch, tokens, 3 * heads * head_dim), bias], dtype)


# --- patch embedding ---------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(PATCH_CASES))
@pytest.mark.parametrize("dtype", ALL)
def test_patch_embed(emulated, order, case, dtype):
    height, width, patch = PATCH_CASES[case][:3]
    kwargs = PATCH_CASES[case][3]()
    keys = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    fixed = {k: v for k, v in kwargs.items() if k not in keys}
    inputs = [random(2, CIN, height, width), random(DIM, CIN, patch, patch, scale=0.2), random(DIM)]

    def bind(fn, **extra):
        def call(x, weight, bias, *tensors):
            return fn(x, weight, bias, **dict(zip(keys, tensors)), **fixed, **extra)
        return call

    compare_with_reference(bind(ops.patch_embed, backend="cpu"), bind(patch_embed_reference),
                           inputs + [kwargs[k] for k in keys], dtype)


def test_patch_embed_uint8_image(emulated):
    image = torch.randint(0, 256, (2, CIN, 32, 48), dtype=torch.uint8)
    weight, bias = random(64, CIN, 16, 16, scale=0.05), random(64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)
    out = ops.patch_embed(image, weight.float(), bias.float(), mean=mean.float(), std=std.float(), backend="cpu")
    torch.testing.assert_close(out.double(), patch_embed_reference(image, weight, bias, mean=mean, std=std),
                               atol=1e-4, rtol=1e-4)


# --- LayerNorm and LayerNorm + MLP -------------------------------------------------------------

# Rows held by part of a warp (8, 96, 100: not a multiple of a 16-byte pack), a warp (768) or a
# block (2056: more than the block holds in registers).
@pytest.mark.parametrize("channels", [8, 96, 100, 768, 2056])
@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", ALL)
def test_layernorm(emulated, channels, misaligned, dtype):
    move = _misaligned if misaligned else (lambda t: t)
    x, r, w, b = random(3, 7, channels), random(3, 7, channels), 1 + random(channels), random(channels)
    compare_with_reference(lambda x, w, b: ops.layernorm(move(x), w, b, eps=1e-5, backend="cpu"),
                           lambda x, w, b: layernorm_reference(x, w, b, eps=1e-5), [x, w, b], dtype)
    compare_with_reference(lambda x, r, w, b: ops.add_layernorm(move(x), move(r), w, b, backend="cpu"),
                           lambda x, r, w, b: add_layernorm_reference(x, r, w, b), [x, r, w, b], dtype)


@pytest.mark.parametrize("shape,channels,hidden", [((3, 11), 100, 37), ((2, 9), 64, 256), ((1,), 64, 256)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", ALL)
def test_layernorm_mlp(emulated, shape, channels, hidden, approximate, dtype):
    inputs = [random(*shape, channels), 1 + random(channels), random(channels), random(hidden, channels, scale=0.2),
              random(hidden), random(channels, hidden, scale=0.2), random(channels), random(channels)]
    compare_with_reference(
        lambda *t: ops.layernorm_mlp(*t[:7], gamma=t[7], approximate=approximate, backend="cpu"),
        lambda *t: layernorm_mlp_reference(*t[:7], gamma=t[7], approximate=approximate), inputs, dtype)


# --- property tests: shapes and options drawn over the CUDA kernels' domain ----------------------

def _drawn(examples):
    """Derandomized, so that every run checks the same examples (the inputs come from the test's seed)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _half(draw):
    return draw(st.sampled_from([torch.float16, torch.bfloat16]))


def test_window_attention_drawn(emulated):
    """Windows up to 12x12 (several tiles), any shift, maps padded in either zoo order, head dims up
    to 64 (padded to 32 or 64), with or without bias table, qkv bias and cosine attention."""
    @_drawn(50)
    @given(data=st.data())
    def check(data):
        draw = data.draw
        window = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        shift = draw(st.integers(0, window[0] - 1)), draw(st.integers(0, window[1] - 1))
        height, width = draw(st.integers(1, 2 * window[0] + 1)), draw(st.integers(1, 2 * window[1] + 1))
        heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([4, 8, 12, 16, 32, 40, 64]))
        table, cosine = draw(st.booleans()), draw(st.booleans())
        # cosine attention normalizes the padding's q and k, zero vectors without a qkv bias, which the
        # fp16 reference's F.normalize divides by its eps rounded to 0 (NaN)
        qkv_bias = cosine or draw(st.booleans())
        run, reference = _window_run(heads, window, shift, pad_first=draw(st.booleans()),
                                     scale=None if cosine else draw(st.sampled_from([None, 0.3])),
                                     mask_value=draw(st.sampled_from([-100.0, -200.0])))
        channels = heads * head_dim
        inputs = [random(draw(st.integers(1, 2)), height, width, 3 * channels),
                  random((2 * window[0] - 1) * (2 * window[1] - 1), heads) if table else None,
                  random(3 * channels) if qkv_bias else None]
        # The logit scale is held fixed: its gradient, one sum over every logit of a head, is a
        # handful of numbers whose low-precision errors, two roundings of a long cancelling sum, are
        # too noisy for the policy's factor (test_window_attention_cosine checks it on chosen values).
        logit_scale = 2.3 + random(heads) if cosine else None

        def fixed_scale(fn):
            return lambda qkv, *tensors: fn(qkv, *tensors, None if logit_scale is None else logit_scale.to(qkv.dtype))

        compare_with_reference(fixed_scale(run), fixed_scale(reference), inputs, _half(draw))

    check()


def test_attention_drawn(emulated):
    """1 to 200 tokens (ragged tiles), head dims up to 64, every bias broadcast and scale."""
    @_drawn(50)
    @given(data=st.data())
    def check(data):
        draw = data.draw
        # 2+ tokens: over a single key the bias gradient is zero but for rounding noise
        batch, tokens, heads = draw(st.integers(1, 2)), draw(st.integers(2, 200)), draw(st.integers(1, 3))
        head_dim = draw(st.sampled_from([4, 8, 16, 24, 32, 48, 64]))
        bias_shape = draw(st.sampled_from([None, (tokens, tokens), (heads, tokens, tokens),
                                           (batch, 1, tokens, tokens), (1, heads, 1, tokens)]))
        scale = draw(st.sampled_from([None, 0.1, 1.0]))

        def run(qkv, bias):
            return ops.attention(qkv, heads, bias=bias, scale=scale, backend="cpu")

        def reference(qkv, bias):
            return attention_reference(qkv, heads, bias=bias, scale=scale)

        inputs = [random(batch, tokens, 3 * heads * head_dim), None if bias_shape is None else random(*bias_shape)]
        compare_with_reference(run, reference, inputs, _half(draw))

    check()


def test_patch_embed_drawn(emulated):
    """Square and non-square patches, dynamic padding, prefix tokens, position tables with or without
    their rows, patch norm and folded normalization, every dtype."""
    @_drawn(50)
    @given(data=st.data())
    def check(data):
        draw = data.draw
        patch = draw(st.integers(1, 8)), draw(st.integers(1, 8))
        grid = draw(st.integers(1, 4)), draw(st.integers(1, 4))
        flags = dict(dynamic_pad=draw(st.booleans()), patch_norm=draw(st.booleans()))
        size = [g * p - (draw(st.integers(0, p - 1)) if flags["dynamic_pad"] else 0) for g, p in zip(grid, patch)]
        cin, dim, prefix = draw(st.integers(1, 4)), draw(st.integers(3, 40)), draw(st.integers(0, 3))
        tokens = grid[0] * grid[1]
        tensors = {"x": random(draw(st.integers(1, 2)), cin, *size),
                   "weight": random(dim, cin, *patch, scale=(cin * patch[0] * patch[1]) ** -0.5),
                   # the patch norm without a bias would make the output invariant to the embedding's
                   # scale (see tests/test_fuzz.py); the zoos' patch norms follow a biased convolution
                   "bias": random(dim) if flags["patch_norm"] or draw(st.booleans()) else None,
                   "prefix_tokens": random(prefix, dim) if prefix else None,
                   "pos_embed": draw(st.sampled_from([None, (1, prefix + tokens, dim), (tokens, dim)])),
                   "norm_weight": 1 + random(dim) if flags["patch_norm"] else None,
                   "norm_bias": random(dim) if flags["patch_norm"] else None}
        if tensors["pos_embed"] is not None:
            tensors["pos_embed"] = random(*tensors["pos_embed"])
        if draw(st.booleans()):
            tensors["mean"], tensors["std"] = random(cin), 1 + random(cin).abs()
        names = [k for k, t in tensors.items() if t is not None]

        def bind(fn, **extra):
            return lambda *values: fn(**dict(zip(names, values)), **flags, **extra)

        compare_with_reference(bind(ops.patch_embed, backend="cpu"), bind(patch_embed_reference),
                               [tensors[k] for k in names], draw(st.sampled_from([torch.float32, torch.float16,
                                                                                  torch.bfloat16])))

    check()


# --- numerics at the edges (tests/test_numerics.py's checks, in fp16) ---------------------------

@pytest.mark.parametrize("op", list(LARGE))
def test_fp16_large_values_stay_finite(emulated, op):
    check_large_values_stay_finite(op, "cpu")


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("op", ["window_attention", "attention", "layernorm", "add_layernorm", "layernorm_mlp",
                                "patch_embed"])
def test_non_finite_input_propagates_as_in_reference(emulated, op, value):
    check_non_finite_input_propagates(op, "cpu", value, torch.float16)


def test_fully_masked_rows_match_reference(emulated):
    check_fully_masked_rows("cpu", torch.float16)


def test_infinite_shift_mask_gives_no_nan(emulated):
    check_infinite_shift_mask("cpu", torch.float16)


# --- index arithmetic past 2^31 elements (the emulator runs only the blocks at the far end) -------

@pytest.fixture
def far_end(emulated):
    """Runs the given block columns only (emulated.set_block_filter), and checks that the process
    touched no more than MAX_RSS_GROWTH of the tensors' pages."""
    before = _rss()
    yield emulated.set_block_filter
    emulated.set_block_filter([])
    assert _rss() - before < MAX_RSS_GROWTH, "the test touched the whole tensor"


def _past_2_31(shape, last):
    """An fp16 tensor of `shape` (more than 2^31 elements, the last sample entirely past element 2^31),
    its pages untouched but the last sample's, which holds `last`."""
    t = torch.empty(shape, dtype=torch.float16)
    assert t.numel() > 2**31 and t[-1].storage_offset() > 2**31
    t[-1].copy_(last)
    return t


def test_window_attention_past_2_31(far_end):
    """Swin-T stage 1 at batch 2380: the last image's 64 windows, forward (shifted), and the backward
    of one problem slot that ends in the last window."""
    heads, window, shift = 3, (7, 7), (3, 3)
    batch, side, channels = 2380, 56, 96
    last = random(1, side, side, 3 * channels, device="cpu").half()
    table, qkv_bias = random(169, heads, device="cpu").float(), random(3 * channels, device="cpu").float()
    qkv = _past_2_31((batch, side, side, 3 * channels), last[0])
    groups = batch * 64
    far_end(list(range(-64, 0)))
    out, lse = torch.ops.vitkernels.window_attention_fwd(qkv, heads, list(window), list(shift), table, qkv_bias,
                                                         None, None, False, -100.0)
    expected = [window_attention_reference(last.to(dtype), heads, window, shift, table.to(dtype),
                                           qkv_bias=qkv_bias.to(dtype)) for dtype in (torch.float64, torch.float16)]
    assert_close(out[-1:], expected[0], low_precision_reference=expected[1], name="output of the last image")

    # The backward's CTA column c walks problems c, c + chunks, ...: the one that ends in the last
    # window walks the whole tensor; unshifted, the last window's gradient is its own.
    chunks = -(-2048 // heads)
    grad = torch.empty(out.shape, dtype=torch.float16)  # dqkv is the tensor past 2^31 here
    grad[-1].copy_(random(side, side, channels, device="cpu"))
    far_end([-1])
    out, lse = torch.ops.vitkernels.window_attention_fwd(qkv, heads, list(window), [0, 0], table, qkv_bias, None,
                                                         None, False, -100.0)
    far_end([(groups - 1) % chunks])
    dqkv = torch.ops.vitkernels.window_attention_bwd(grad, qkv, lse, heads, list(window), [0, 0], table, qkv_bias,
                                                     None, None, False, -100.0)[0]
    corner = (slice(side - 7, side), slice(side - 7, side))
    found = []
    for dtype in (torch.float64, torch.float16):
        x = last[(0, *corner)].to(dtype).unsqueeze(0).requires_grad_()
        y = window_attention_reference(x, heads, window, (0, 0), table.to(dtype), qkv_bias=qkv_bias.to(dtype))
        found.append(torch.autograd.grad(y, x, grad[(-1, *corner)].to(dtype).unsqueeze(0))[0])
    assert_close(dqkv[(-1, *corner)].unsqueeze(0), found[0], low_precision_reference=found[1],
                 name="dqkv of the last window")


def test_attention_past_2_31(far_end):
    """ViT-B/16 at batch 4733: the last image's forward."""
    heads, tokens, channels = 12, 197, 768
    last = random(1, tokens, 3 * channels, device="cpu").half()
    qkv = _past_2_31((4733, tokens, 3 * channels), last[0])
    far_end([-1])
    out, _lse = torch.ops.vitkernels.attention_fwd(qkv, heads, None, None)
    expected = [attention_reference(last.to(dtype), heads) for dtype in (torch.float64, torch.float16)]
    assert_close(out[-1:], expected[0], low_precision_reference=expected[1], name="output of the last image")


def test_patch_embed_past_2_31(far_end):
    """ViT-B/16 images at batch 14268, embedded to 64 channels with bias and position table: the GEMM's
    last row tiles, which hold the last image's 196 patches."""
    dim, patch = 64, 16
    last = random(1, 3, 224, 224, device="cpu").half()
    weight, bias, pos = (random(dim, 3, patch, patch, scale=0.05, device="cpu").half(),
                         random(dim, device="cpu").half(), random(1, 196, dim, device="cpu").half())
    x = _past_2_31((14268, 3, 224, 224), last[0])
    far_end(list(range(-4, 0)))  # 4 tiles of 64 rows cover the last 196 of 14268 * 196
    out = torch.ops.vitkernels.patch_embed_fwd(x, weight, bias, None, pos, None, None, 1e-5, False, None, None)
    expected = [patch_embed_reference(last.to(dtype), weight.to(dtype), bias.to(dtype), pos_embed=pos.to(dtype))
                for dtype in (torch.float64, torch.float16)]
    assert_close(out[-1:], expected[0], low_precision_reference=expected[1], name="tokens of the last image")


def test_layernorm_past_2_31(far_end):
    """ViT-B rows past element 2^31: the last block's rows."""
    rows, channels = 2796204, 768
    last = random(channels, device="cpu").half()
    weight, bias = (1 + random(channels, device="cpu")).half(), random(channels, device="cpu").half()
    x = _past_2_31((rows, channels), last)
    far_end([-1])
    y, _mean, _rstd = torch.ops.vitkernels.layernorm_fwd(x, weight, bias, 1e-6)
    expected = [layernorm_reference(last.to(dtype), weight.to(dtype), bias.to(dtype)) for dtype in
                (torch.float64, torch.float16)]
    assert_close(y[-1], expected[0], low_precision_reference=expected[1], name="the last row")


# --- the emulator's own checks: each rule-breaking kernel of emulator_checks.cpp is caught ------

@pytest.mark.parametrize("name,message", [
    ("deadlock", "deadlock; thread 0 waits at __syncwarp"),
    ("divergence", "warp divergence: lane 1 at __shfl_xor_sync while lane 0 is at __syncwarp"),
    ("ldmatrix_bounds", "ldmatrix.x4: operand outside the launch's dynamic shared memory"),
    ("shared_overflow", "wrote past its 64 bytes of dynamic shared memory"),
    ("copy_never_waited", "exits with cp.async copies never waited for"),
    ("shared_without_optin", "102400 bytes of dynamic shared memory without"),
    ("partial_warp", "with a full mask in a warp of 16 live lanes"),
    ("block_too_large", "launch with 2048 threads per block"),
])
def test_emulator_reports(emulated, name, message):
    with pytest.raises(RuntimeError, match="cuda emulation: .*" + message.replace("(", r"\(")):
        emulated.run_emulator_check(name)


def test_emulator_lands_copies_at_the_wait(emulated):
    early, waited = emulated.run_emulator_check("copy_read_early")
    assert early != early and waited == 2.0, (early, waited)  # the 0xff fill is a NaN


def test_emulator_reverse_order_exposes_a_missing_barrier(emulated):
    assert emulated.run_emulator_check("missing_barrier")[0] == 1.0
    emulated.set_reverse_order(True)
    try:
        value = emulated.run_emulator_check("missing_barrier")[0]
    finally:
        emulated.set_reverse_order(False)
    assert value != value, value  # warp 1 ran first and read the fill


def _asan_sweep(*args):
    runtime = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(runtime) or not os.path.exists(runtime):
        pytest.skip("gcc has no AddressSanitizer runtime here")
    env = dict(os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0", VITKERNELS_EMULATION_ASAN="1")
    script = Path(__file__).resolve().parent / "asan_sweep.py"
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=1800)


def test_kernels_stay_inside_their_tensors_under_asan():
    result = _asan_sweep()
    assert result.returncode == 0 and "every entry point ran" in result.stdout, result.stderr[-6000:]


def test_asan_sweep_reports_a_store_past_a_tensor():
    result = _asan_sweep("--overflow")
    assert result.returncode != 0 and "heap-buffer-overflow" in result.stderr, result.stderr[-3000:]
