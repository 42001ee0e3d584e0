import importlib
import math
import types

import pytest
import torch
import triton
import triton.language as tl

from op_helpers import DEVICE, backend_params, compare_with_reference, random
import vitkernels
from vitkernels import ops
from vitkernels.ops.window_attention import triton_kernels as window_triton
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


def skip_refused_dtype(backend, dtype):
    """Shared tests run a dtype only on the backends that declare it (cuda: fp16 and bf16)."""
    if dtype not in ops.backend_table("window_attention")[backend].dtypes:
        pytest.skip(f"{backend} does not compute {dtype} (its refusal is tested on its own)")


def _make(batch, height, width, heads, head_dim, window):
    channels = heads * head_dim
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    return random(batch, height, width, 3 * channels), random(rows, heads), random(3 * channels)


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", backend_params("window_attention"))
@pytest.mark.parametrize("pad_first", [False, True], ids=["timm-order", "hf-tv-order"])
@pytest.mark.parametrize("batch,height,width,heads,head_dim,window,shift", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_reference(backend, pad_first, batch, height, width, heads, head_dim, window, shift, dtype):
    skip_refused_dtype(backend, dtype)
    qkv, table, qkv_bias = _make(batch, height, width, heads, head_dim, window)

    def run(qkv, table, qkv_bias):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first,
                                    backend=backend)

    def reference(qkv, table, qkv_bias):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first)

    compare_with_reference(run, reference, [qkv, table, qkv_bias], dtype)


@pytest.mark.sanitize
@pytest.mark.parametrize("backend", backend_params("window_attention"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_swinv2_cosine(backend, dtype):
    skip_refused_dtype(backend, dtype)
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
@pytest.mark.parametrize("window", [(4, 4), (9, 9)], ids=["one-key-block", "several-key-blocks"])
def test_logit_scale_gradient_is_not_amplified(backend, window):
    """fp16 cosine attention with logits scaled by 90: the logit-scale gradient, a sum of
    dS * q.k over every window, stays within 3x of the error that rounding the inputs to fp16 alone
    causes (the float64 computation on the rounded inputs). A backward whose delta = rowsum(dO * O)
    used the fp16 output measured 5x."""
    skip_refused_dtype(backend, torch.float16)
    heads, head_dim, shift = 2, 8, (window[0] // 2, window[1] // 2)
    batch, height, width = 2, 2 * window[0] + 1, 2 * window[1]
    qkv, table, _ = _make(batch, height, width, heads, head_dim, window)
    logit_scale = torch.full((heads,), 4.5, dtype=torch.float64, device=DEVICE)  # x90, under the clamp
    upstream = random(batch, height, width, heads * head_dim)

    def kernel(qkv, table, logit_scale):
        return ops.window_attention(qkv, heads, window, shift, table, logit_scale=logit_scale, backend=backend)

    def reference(qkv, table, logit_scale):
        return window_attention_reference(qkv, heads, window, shift, table, logit_scale=logit_scale)

    def logit_scale_grad(run, dtype, rounded_to=None):
        inputs = [(t if rounded_to is None else t.to(rounded_to)).to(dtype).requires_grad_()
                  for t in (qkv, table, logit_scale)]
        return torch.autograd.grad((run(*inputs).double() * upstream).sum(), inputs[2])[0].double()

    exact = logit_scale_grad(reference, torch.float64)
    error = (logit_scale_grad(kernel, torch.float16) - exact).abs().max().item()
    rounding = (logit_scale_grad(reference, torch.float64, rounded_to=torch.float16) - exact).abs().max().item()
    floor = 1e-3 * exact.abs().max().item()
    assert error <= 3 * rounding + floor, (
        f"logit-scale gradient error {error:.3e} > 3 x {rounding:.3e} (rounding the inputs) + {floor:.3e}")


@pytest.mark.parametrize("backend", backend_params("window_attention"))
def test_no_bias_and_custom_scale(backend):
    skip_refused_dtype(backend, torch.float32)
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
@pytest.mark.parametrize("window", [(7, 7), (5, 11)], ids=["49-tokens", "55-tokens-non-square"])
def test_wide_head_backward_tiles(backend, window):
    """head_dim 96 beyond 32 tokens: the backward's 32x32 tiles, several query and key blocks, and the
    table gradient of its own kernel; the fp32 forward's 64x32 tile, two key blocks."""
    kernels = importlib.import_module("vitkernels.ops.window_attention.triton_kernels")
    tokens = window[0] * window[1]
    assert kernels.prune_configs(tokens, 96, backward=True) == kernels.WIDE_HEAD_BACKWARD
    assert kernels.prune_configs(tokens, 96, fp32=True) == kernels.WIDE_HEAD_FP32_FORWARD
    heads, shift = 1, (window[0] // 2, window[1] // 2)
    run, reference = _triton_run(heads, window, shift)
    compare_with_reference(run, reference, list(_make(1, window[0] + 2, window[1] + 1, heads, 96, window)),
                           torch.float32)


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
@pytest.mark.parametrize("pad_first", [False, True], ids=["timm-order", "hf-tv-order"])
@pytest.mark.parametrize("heads,programs,cosine", [(4, 1, False), (3, 5, True), (2, 11, False)],
                         ids=["4-heads-1-program", "3-heads-5-programs-cosine", "2-heads-11-programs"])
def test_one_tile_forward_walks_windows(backend, pad_first, heads, programs, cosine, monkeypatch):
    """The one-tile schedule: each program walks every ``programs``-th window of its head, the
    boundary windows of the shift among them, with the head's bias computed once. Of the 9 windows
    of an image (3 x 3), a step of 5 carries from column to row, and one of 11 to the next image."""
    kernels = importlib.import_module("vitkernels.ops.window_attention.triton_kernels")
    monkeypatch.setattr(kernels, "window_programs", lambda device, windows, heads, per_multiprocessor: programs)
    batch, height, width, window, shift = 2, 9, 10, (4, 4), (2, 2)
    assert kernels.one_tile(window[0] * window[1], kernels.prune_configs(window[0] * window[1], 8))
    qkv, table, qkv_bias = _make(batch, height, width, heads, 8, window)
    logit_scale = 3.0 + random(heads) if cosine else None

    def run(qkv, table, qkv_bias, logit_scale=None):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, logit_scale=logit_scale,
                                    pad_first=pad_first, backend=backend)

    def reference(qkv, table, qkv_bias, logit_scale=None):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias,
                                          logit_scale=logit_scale, pad_first=pad_first)

    inputs = [qkv, table, qkv_bias] + ([logit_scale] if cosine else [])
    compare_with_reference(run, reference, inputs, torch.float32)
    compare_with_reference(run, reference, inputs, torch.float16)


@pytest.mark.parametrize("backend", TRITON)
def test_key_block_kernels_on_one_tile_windows(backend, monkeypatch):
    """Windows of one tile through the kernels of wider windows (a benchmark's comparison): the
    forward's single key block, and a dq kernel that forms D within it."""
    kernels = importlib.import_module("vitkernels.ops.window_attention.triton_kernels")
    monkeypatch.setattr(kernels, "one_tile", lambda tokens, config: False)
    heads, window, shift = 2, (4, 4), (2, 2)
    run, reference = _triton_run(heads, window, shift)
    compare_with_reference(run, reference, list(_make(2, 9, 6, heads, 8, window)), torch.float32)


def test_one_tile_schedule():
    kernels = importlib.import_module("vitkernels.ops.window_attention.triton_kernels")
    assert kernels.one_tile(49, kernels.prune_configs(49, 32))  # Swin's 7x7 window
    assert kernels.one_tile(64, kernels.prune_configs(64, 32))  # SwinV2's 8x8
    assert not kernels.one_tile(144, kernels.prune_configs(144, 32))  # 12x12: several key blocks
    assert not kernels.one_tile(49, kernels.prune_configs(49, 128, fp32=True))  # fp32 wide heads: 64x32 tiles
    cpu = torch.device("cpu")
    assert kernels.window_programs(cpu, 1, 3, lambda: 4) == 1
    assert kernels.window_programs(cpu, 8192, 3, lambda: 4) == 2  # the interpreter: a few, each walking many windows


def test_launch_warps():
    """One warpgroup per 64-row tile where the compiler's report favours it, the config's warps elsewhere."""
    kernels = importlib.import_module("vitkernels.ops.window_attention.triton_kernels")
    swin, swin_backward = kernels.prune_configs(49, 32), kernels.prune_configs(49, 32, backward=True)
    flags = dict(kernels.FLAGS, IEEE=False)
    warps = kernels.launch_warps
    assert warps("tile", swin, 32, flags) == warps("tile", swin, 64, dict(flags, COSINE=True)) == 4
    assert warps("tile_bwd", swin_backward, 32, flags) == 4
    assert warps("tile", swin, 32, dict(flags, IEEE=True)) == swin.num_warps == 8
    assert warps("tile", swin, 128, flags) == 8
    for backward_flags, head_dim in ((dict(COSINE=True), 32), (dict(HAS_FILL=True), 32), ({}, 64)):
        assert warps("tile_bwd", swin_backward, head_dim, dict(flags, **backward_flags)) == 8
    small = kernels.prune_configs(16, 32)
    assert warps("tile", small, 32, flags) == small.num_warps
    wide, vit = kernels.prune_configs(256, 128, backward=True), kernels.prune_configs(197, 64, backward=True)
    for kernel in ("dq", "dkdv"):
        assert warps(kernel, vit, 64, flags) == warps(kernel, wide, 128, dict(flags, COSINE=True)) == 4
        assert warps(kernel, vit, 64, dict(flags, IEEE=True)) == vit.num_warps == 8
        assert warps(kernel, vit, 64, dict(flags, HAS_BIAS=True)) == 8
    assert warps("dtable", vit, 64, flags) == warps("fwd", kernels.prune_configs(197, 64), 64, flags) == 8


def test_programs_per_multiprocessor():
    """Persistent launches fill each multiprocessor with as many programs as its registers, shared
    memory, threads and block slots allow (H100: 228 KiB of shared memory, 2048 threads)."""
    triton_helpers = importlib.import_module("vitkernels.ops._triton")
    shared, threads = 228 * 1024, 2048
    assert triton_helpers.programs_per_multiprocessor(165, 4, 28672, shared, threads) == 3  # 168 x 32 per warp
    assert triton_helpers.programs_per_multiprocessor(127, 4, 28672, shared, threads) == 4
    assert triton_helpers.programs_per_multiprocessor(255, 8, 41216, shared, threads) == 1
    assert triton_helpers.programs_per_multiprocessor(32, 4, 100 * 1024, shared, threads) == 2  # shared memory
    assert triton_helpers.programs_per_multiprocessor(16, 1, 0, shared, threads) == 32  # block slots
    assert triton_helpers.programs_per_multiprocessor(16, 8, 0, shared, threads) == 8  # threads
    assert triton_helpers.programs_per_multiprocessor(255, 32, 300 * 1024, shared, threads) == 1


def test_pipeline_depth_and_register_cap():
    """fp16 and bf16 launches pipeline a step ahead (3 stages); the one-tile forward is capped at
    168 registers (three programs of 4 warps per multiprocessor) where the compiler's report shows
    no spill: sm_90, head dims up to 32, parameters in the input's dtype, no padding."""
    kernels = importlib.import_module("vitkernels.ops.window_attention.triton_kernels")
    assert kernels.pipeline_stages(False) == kernels.HALF_STAGES == 3
    assert kernels.pipeline_stages(True) == kernels.FP32_STAGES
    registers = kernels.tile_forward_registers
    assert registers(32, False, False, False, (9, 0)) == registers(16, False, False, False, (10, 0)) == 168
    assert 3 * 168 * 128 <= 65536 < 4 * 168 * 128
    for block_d, fp32, fp32_params, padded, capability in (
            (64, False, False, False, (9, 0)), (32, True, False, False, (9, 0)), (32, False, True, False, (9, 0)),
            (32, False, False, True, (9, 0)), (32, False, False, False, (8, 0))):
        assert registers(block_d, fp32, fp32_params, padded, capability) is None


def test_resident_programs_reads_the_compiled_kernel(monkeypatch):
    triton_helpers = importlib.import_module("vitkernels.ops._triton")
    class Compiled:  # Triton's CompiledKernel: registers known once its binary is loaded
        n_regs = 0
        metadata = types.SimpleNamespace(num_warps=4, shared=28672)

        def _init_handles(self):
            self.n_regs = 165

    compiled, calls = Compiled(), []

    class Kernel:
        def warmup(self, *args, grid, **kwargs):
            calls.append((args, grid, kwargs))
            return compiled

    props = types.SimpleNamespace(shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(triton_helpers, "_RESIDENT", {})
    device, kernel, x = torch.device("cuda", 0), Kernel(), torch.empty(2, dtype=torch.float16)
    assert triton_helpers.resident_programs(kernel, (x, 2), {"num_warps": 4}, device) == 3
    assert triton_helpers.resident_programs(kernel, (x, 3), {"num_warps": 4}, device) == 3
    assert calls == [((x, 2), (1,), {"num_warps": 4})]  # the second call reads the first one's answer
    compiled = None  # what a new dtype or option compiles is read again
    assert triton_helpers.resident_programs(kernel, (x.float(), 2), {"num_warps": 4}, device) == 1
    assert triton_helpers.resident_programs(kernel, (x, 2), {"num_warps": 8}, device) == 1
    assert len(calls) == 3


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


# --- the cuda backend beyond the shared tests: bf16, real model sizes, the compiled ops ----------

def _cuda_run(heads, window, shift, pad_first=False, **options):
    def run(qkv, table, qkv_bias, *logit_scale):
        return ops.window_attention(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first,
                                    logit_scale=logit_scale[0] if logit_scale else None, backend="cuda", **options)

    def reference(qkv, table, qkv_bias, *logit_scale):
        return window_attention_reference(qkv, heads, window, shift, table, qkv_bias=qkv_bias, pad_first=pad_first,
                                          logit_scale=logit_scale[0] if logit_scale else None, **options)

    return run, reference


# (batch, H, W, heads, head_dim, window, shift): Swin-T stage 1 and 3 (7x7, 49 tokens in one
# 64-row tile), SwinV2 windows of 8 (one full tile), 12 (144 tokens: three query and key tiles)
# and 16, head_dim 64 (Swin-L's last stages) and a padded map in both zoo orders.
CUDA_CASES = [
    pytest.param(2, 56, 56, 3, 32, (7, 7), (3, 3), id="swin-t-stage1"),
    pytest.param(2, 14, 14, 12, 32, (7, 7), (3, 3), id="swin-t-stage3"),
    pytest.param(1, 17, 20, 4, 32, (7, 7), (3, 3), id="padded"),
    pytest.param(2, 16, 16, 4, 32, (8, 8), (4, 4), id="window8"),
    pytest.param(1, 24, 24, 2, 32, (12, 12), (6, 6), id="window12-multi-tile"),
    pytest.param(1, 32, 32, 2, 64, (16, 16), (8, 8), id="window16-head64"),
    pytest.param(1, 13, 13, 2, 48, (7, 7), (3, 3), id="head48-padded"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("pad_first", [False, True], ids=["timm-order", "hf-tv-order"])
@pytest.mark.parametrize("batch,height,width,heads,head_dim,window,shift", CUDA_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_matches_reference(batch, height, width, heads, head_dim, window, shift, pad_first, dtype):
    run, reference = _cuda_run(heads, window, shift, pad_first)
    compare_with_reference(run, reference, list(_make(batch, height, width, heads, head_dim, window)), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("window,shift", [((8, 8), (4, 4)), ((12, 12), (6, 6))], ids=["window8", "window12"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_cuda_swinv2_cosine(window, shift, dtype):
    heads = 4
    qkv, table, qkv_bias = _make(2, 2 * window[0] + 3, 2 * window[1], heads, 32, window)
    # two heads above the log(100) clamp, two below; the HF Swinv2 doubled mask
    logit_scale = torch.tensor([5.0, 2.3, 3.9, 4.7], dtype=torch.float64, device=DEVICE).reshape(heads, 1, 1)
    run, reference = _cuda_run(heads, window, shift, pad_first=True, mask_value=-200.0)
    compare_with_reference(run, reference, [qkv, 16 * torch.sigmoid(table), qkv_bias, logit_scale], dtype)


@pytest.mark.cuda
def test_cuda_no_bias_and_custom_scale():
    qkv, _, _ = _make(2, 15, 15, 3, 32, (7, 7))

    def run(qkv):
        return ops.window_attention(qkv, 3, 7, 3, scale=0.3, backend="cuda")

    def reference(qkv):
        return window_attention_reference(qkv, 3, (7, 7), (3, 3), scale=0.3)

    compare_with_reference(run, reference, [qkv], torch.float16)


@pytest.mark.cuda
def test_cuda_statistics_match_the_cpu_op():
    """The lse the forward saves has the CPU op's shape and values; the gradients have the CPU op's
    shapes, dtypes and values (fp16 inputs, computed in fp32 on the CPU)."""
    heads, window, shift = 3, [7, 7], [3, 3]
    qkv, table, qkv_bias = (t.half() for t in _make(2, 17, 15, heads, 32, tuple(window)))
    args = (heads, window, shift, table, qkv_bias, None, None, True, -100.0)
    out, lse = torch.ops.vitkernels.window_attention_fwd(qkv, *args)
    cpu_args = (heads, window, shift, table.cpu(), qkv_bias.cpu(), None, None, True, -100.0)
    cpu_out, cpu_lse = torch.ops.vitkernels.window_attention_fwd(qkv.cpu(), *cpu_args)
    assert lse.shape == cpu_lse.shape and lse.dtype == cpu_lse.dtype == torch.float32
    torch.testing.assert_close(lse.cpu(), cpu_lse, atol=2e-2, rtol=0)
    torch.testing.assert_close(out.cpu(), cpu_out, atol=1e-2, rtol=0)
    grad = torch.randn_like(out)
    grads = torch.ops.vitkernels.window_attention_bwd(grad, qkv, lse, *args)
    cpu_grads = torch.ops.vitkernels.window_attention_bwd(grad.cpu(), qkv.cpu(), cpu_lse, *cpu_args)
    for name, g, expected in zip(("qkv", "bias_table", "qkv_bias", "logit_scale"), grads, cpu_grads):
        assert g.shape == expected.shape and g.dtype == expected.dtype, name
        if expected.numel() == 0:
            continue
        scale = max(expected.float().abs().max().item(), 1.0)
        error = (g.cpu().float() - expected.float()).abs().max().item()
        assert error <= 2e-2 * scale, f"{name}: max abs error {error:.3e} against the cpu op (scale {scale:.3e})"


@pytest.mark.cuda
def test_cuda_backward_is_deterministic():
    """The bias table, qkv_bias and logit_scale gradients sum over windows without atomics."""
    heads, window = 3, (7, 7)
    qkv, table, qkv_bias = (t.half().requires_grad_() for t in _make(4, 23, 21, heads, 32, window))
    logit_scale = torch.rand(heads, device=DEVICE, requires_grad=True)
    out = ops.window_attention(qkv, heads, window, 3, table, qkv_bias=qkv_bias, logit_scale=logit_scale,
                               backend="cuda")
    grad = torch.randn_like(out)
    inputs = (qkv, table, qkv_bias, logit_scale)
    first = torch.autograd.grad(out, inputs, grad, retain_graph=True)
    for _ in range(3):
        for a, b in zip(first, torch.autograd.grad(out, inputs, grad, retain_graph=True)):
            assert torch.equal(a, b)


def _cuda_opcheck_args():
    qkv, table, qkv_bias = (t.half().requires_grad_() for t in _make(2, 9, 10, 2, 32, (4, 4)))
    logit_scale = torch.rand(2, device=DEVICE, requires_grad=True)
    return [
        (qkv, 2, [4, 4], [2, 2], table, qkv_bias, None, None, False, -100.0),
        (qkv, 2, [4, 4], [2, 2], 16 * table.sigmoid(), qkv_bias, logit_scale, None, True, -200.0),
        (qkv.detach().bfloat16(), 2, [4, 4], [0, 0], None, None, None, 0.2, False, -100.0),
    ]


@pytest.mark.cuda
@pytest.mark.parametrize("case", range(3))
def test_cuda_fwd_opcheck(case):
    torch.library.opcheck(torch.ops.vitkernels.window_attention_fwd.default, _cuda_opcheck_args()[case])


@pytest.mark.cuda
def test_cuda_bwd_opcheck():
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _cuda_opcheck_args()[1])
    out, lse = torch.ops.vitkernels.window_attention_fwd(*args)
    # the backward has no gradient of its own: the autograd checks do not apply
    bwd_args = (torch.randn_like(out), args[0], lse, *args[1:])
    torch.library.opcheck(torch.ops.vitkernels.window_attention_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
def test_cuda_compile_fullgraph():
    qkv, table, qkv_bias = (t.half().requires_grad_() for t in _make(2, 9, 10, 2, 32, (4, 4)))

    def span(qkv, table, qkv_bias):
        return ops.window_attention(qkv, 2, 4, 2, table, qkv_bias=qkv_bias, pad_first=True, backend="cuda")

    eager = span(qkv, table, qkv_bias)
    compiled = torch.compile(span, fullgraph=True)(qkv, table, qkv_bias)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(torch.autograd.grad(compiled.sum(), (qkv, table, qkv_bias)),
                    torch.autograd.grad(eager.sum(), (qkv, table, qkv_bias))):
        torch.testing.assert_close(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,head_dim,match", [(torch.float32, 32, "float32: the CUDA kernels"),
                                                  (torch.float16, 128, "head_dim 128 outside")])
def test_cuda_refuses_with_reasons(dtype, head_dim, match):
    qkv = torch.randn(1, 7, 7, 3 * head_dim, dtype=dtype, device="cuda")
    with pytest.raises(vitkernels.NotSupportedError, match=match):
        ops.window_attention(qkv, 1, 7, backend="cuda")


@pytest.mark.cuda
def test_cuda_op_refuses_more_windows_than_its_32_bit_token_arithmetic():
    # 2^25 images of 64 windows, as a stride-0 view of one image: 2^31 windows, one past the limit
    one = torch.randn(1, 56, 56, 3 * 32, dtype=torch.float16, device="cuda")
    qkv = one.expand(1 << 25, -1, -1, -1)
    with pytest.raises(RuntimeError, match=r"fewer than 2\^31 windows, got 33554432 images of 64 windows"):
        torch.ops.vitkernels.window_attention_fwd(qkv, 1, [7, 7], [0, 0], None, None, None, None, False, -100.0)


@triton.jit
def _frame_rows_kernel(rows_ptr, cols_ptr, Ww, BLOCK: tl.constexpr):
    t = tl.arange(0, BLOCK)
    i, j, _, _, _, _ = window_triton._frame(0, t, 64, 64, 32, Ww, 0, 0, window_triton.NO_PADDING)
    tl.store(rows_ptr + t, i)
    tl.store(cols_ptr + t, j)


@pytest.mark.parametrize("window_w", list(range(1, 33)))
def test_triton_frame_rows_without_integer_division(window_w):
    # every token of a 32 x window_w window and the key block past it, as the key-block kernels see them
    block = 2048
    rows = torch.empty(block, dtype=torch.int32, device=DEVICE)
    cols = torch.empty(block, dtype=torch.int32, device=DEVICE)
    _frame_rows_kernel[(1,)](rows, cols, window_w, BLOCK=block)
    t = torch.arange(block, dtype=torch.int32, device=DEVICE)
    wrong = (rows != t // window_w) | (cols != t % window_w)
    assert not wrong.any(), f"window_w={window_w}: first wrong token {t[wrong][:1].tolist()}"
