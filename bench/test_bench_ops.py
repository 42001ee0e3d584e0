"""Benchmarks of every op over the shape registry: vitkernels' backends and the other providers.

Each case runs in three modes: ``fwd`` (no autograd), ``bwd`` (the backward of a retained forward
graph alone) and ``fwd+bwd``. Providers are vitkernels' backends (torch, triton, cuda, cpu) and the
ones of bench/providers.py (eager zoo modules, SDPA, FlexAttention, torch.compile). Before timing,
each provider's forward output is checked once against the float64 reference under the tolerance
policy of vitkernels/testing.py, so a fast wrong provider is never reported: a wrong vitkernels
backend fails its test, a wrong or failing outside provider is skipped with the error as reason.

Each result's ``extra_info`` holds the minimal work of the call (``bytes`` and ``flops``), the
op's headline ``metric`` ("GB/s" for memory-bound ops, "TFLOP/s" for matmul-like ones), its
achieved ``value`` and, when ``VITKERNELS_BENCH_CEILINGS`` names a JSON file with ``copy_gbps``
and ``matmul_tflops`` (bench/device_check.py writes one), the ``fraction_of_ceiling``.

Timing (bench/timing.py): CUDA events with inputs rotated through a pool twice the L2 size on
GPU, pytest-benchmark's wall clock on CPU; rounds are fixed from a timed trial call.

Cases run provider by provider, in the order the selection names them: a kernel that faults on
the GPU ends the run (bench/conftest.py), and every provider before it keeps its measurements.

``test_host_path`` times the host's path of one call instead: each op on its ``shapes.HOST``
inputs, whose kernels take microseconds, by the wall clock of many calls, under torch.no_grad
(``host-inference``) and with the differentiated inputs requiring grad (``host-training``, the
forward as autograd records it). On GPU the launches are asynchronous and shorter on the device
than on the host, so the clock times Python, dispatch and launch; on CPU the kernels run for real,
and the "cpu" backend's and eager's times are those of tiny kernels plus their host's path.

Run: ``pytest bench/test_bench_ops.py -q``. Selection by environment variables (comma-separated):
``VITKERNELS_BENCH_SHAPES=quick|standard|all``, ``VITKERNELS_BENCH_OPS=layernorm,attention``,
``VITKERNELS_BENCH_PROVIDERS=cuda,eager,sdpa``, ``VITKERNELS_BENCH_MODES=fwd,fwd+bwd``.
"""
from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Optional

import pytest
import torch

import cases
import providers
import shapes
import timing
from vitkernels import backends, ops
from vitkernels.ops.layernorm_mlp import triton_kernels as mlp_kernels
from vitkernels.ops.window_attention import triton_kernels as window_kernels
from vitkernels.testing import LOW_PRECISION

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = backends.BACKENDS + providers.NAMES
# Providers left out of the CUDA graph timing: torch.compile's own graphs and guards do not belong
# inside a capture.
COMPILED = ("flex", "compile", "compile-max-autotune")


CASES = [
    pytest.param(op, shape, id=f"{op}-{shape.name}")
    for op in cases.selected("VITKERNELS_BENCH_OPS", tuple(cases.OPS))
    for shape in shapes.for_device(cases.OPS[op].shapes, DEVICE)
]


def backend_skip_reason(op: str, backend: str, device: str) -> Optional[str]:
    """Why vitkernels backend ``backend`` cannot be benchmarked for ``op`` here, or None."""
    if backend == "triton" and device != "cuda":
        return "Triton on CPU runs in the interpreter, whose timings say nothing about the kernels"
    missing = backends.unavailable_reason(backend)
    if missing is not None:
        return f"backend {backend!r} unavailable: {missing}"
    if backend not in ops.backend_table(op):
        return f"no {backend} implementation of {op}"
    return None


def provider_fn(op: str, shape, provider: str, device: str, dtype) -> Callable[[cases.Inputs], object]:
    """The function that runs ``provider``; skips the test when the provider cannot run here."""
    if provider in backends.BACKENDS:
        reason = backend_skip_reason(op, provider, device)
    else:
        reason = providers.skip_reason(provider, op, device)
    if reason:
        pytest.skip(reason)
    if provider in backends.BACKENDS:
        return cases.OPS[op].call(shape, provider)
    try:
        return providers.build(provider, op, shape, device, dtype)
    except providers.Unsupported as err:
        pytest.skip(str(err))


_CHECKED: set = set()


def _check_once(op, shape, provider, fn, inputs, device, dtype, variant: Optional[str] = None) -> None:
    key = (op, shape, provider, variant)
    if key in _CHECKED:
        return
    with cases.skip_outside_failures(provider):
        eager = providers.build("eager", op, shape, device, dtype) if dtype in LOW_PRECISION else None
        cases.check_against_reference(op, shape, fn, inputs, dtype, eager)
    _CHECKED.add(key)


def _clone(inputs: cases.Inputs) -> cases.Inputs:
    return {k: None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for k, t in inputs.items()}


def make_call(fn, pool: list[cases.Inputs], mode: str) -> Callable[[], None]:
    """One timed call of ``mode``, each on the next inputs of ``pool``."""
    entries = itertools.cycle(range(len(pool)))
    if mode == "fwd":
        def forward():
            with torch.no_grad():
                fn(pool[next(entries)])

        return forward
    upstream = [torch.randn_like(o) for o in cases.outputs(fn(pool[0]))]
    if mode == "fwd+bwd":
        def forward_backward():
            inputs = pool[next(entries)]
            torch.autograd.grad(cases.outputs(fn(inputs)), cases.grad_inputs(inputs), upstream, allow_unused=True)

        return forward_backward
    graphs = [(cases.outputs(fn(inputs)), cases.grad_inputs(inputs)) for inputs in pool]

    def backward():
        outs, leaves = graphs[next(entries)]
        torch.autograd.grad(outs, leaves, upstream, retain_graph=True, allow_unused=True)

    return backward


def record(benchmark, op, shape, provider, mode, dtype, pool: int, variant: Optional[str] = None) -> cases.Work:
    """Puts the case and its work in extra_info (before the timing: a run interrupted during it still
    names what it measured); returns the work. ``variant`` names a non-default schedule of vitkernels
    backend ``provider``."""
    work = cases.work(op, shape, torch.empty((), dtype=dtype).element_size(), mode)
    benchmark.extra_info.update(
        op=op, shape=shape.name, model=shape.model, backend=f"{provider} ({variant})" if variant else provider,
        provider_kind="vitkernels" if provider in backends.BACKENDS else "baseline",
        provider_detail=(f"vitkernels backend {provider}" + (f", {variant}" if variant else "")
                         if provider in backends.BACKENDS else providers.describe(provider, op, shape)),
        mode=mode, batch=shape.batch,
        dtype=str(dtype).replace("torch.", ""), device=DEVICE, bytes=work.bytes, flops=work.flops,
        metric=cases.metric(op), input_pool=pool,
    )
    return work


def record_achieved(benchmark, op, work) -> None:
    """Puts the achieved rate and its fraction of the measured ceiling in extra_info (of the device
    time alone too, ``graph_*``, where the CUDA graph timing ran)."""
    stats = getattr(benchmark, "stats", None)
    measured = timing.ceilings()
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info.update(timing.achieved(work, stats.stats.median, cases.metric(op), measured))
    if benchmark.extra_info.get("graph_seconds"):
        alone = timing.achieved(work, benchmark.extra_info["graph_seconds"], cases.metric(op), measured)
        benchmark.extra_info.update({f"graph_{key}": value for key, value in alone.items() if key != "ceiling"})


@pytest.mark.parametrize("mode", cases.selected("VITKERNELS_BENCH_MODES", cases.MODES))
@pytest.mark.parametrize("op, shape", CASES)
@pytest.mark.parametrize("provider", cases.selected("VITKERNELS_BENCH_PROVIDERS", PROVIDERS))
def test_op(benchmark, op, shape, provider, mode, device, dtype):
    _bench_case(benchmark, op, shape, provider, mode, device, dtype)


def _bench_case(benchmark, op, shape, provider, mode, device, dtype, variant: Optional[str] = None) -> None:
    benchmark.group = f"{op} {mode} {shape.name}"
    fn = provider_fn(op, shape, provider, device, dtype)
    inputs = cases.make_inputs(op, shape, device, dtype, grad=mode != "fwd")
    _check_once(op, shape, provider, fn, inputs, device, dtype, variant)
    size = 1 if benchmark.disabled else timing.pool_size(cases.nbytes(inputs), timing.l2_bytes(device))
    pool = [inputs] + [_clone(inputs) for _ in range(size - 1)]
    with cases.skip_outside_failures(provider):
        call = make_call(fn, pool, mode)
    work = record(benchmark, op, shape, provider, mode, dtype, len(pool), variant)
    timing.measure(benchmark, call, device, graph=mode != "bwd" and provider not in COMPILED)
    record_achieved(benchmark, op, work)


# Schedules of the Triton kernels other than the default, timed beside it (the window kernels' and
# the LayerNorm+MLP kernels' docstrings): the name of each, the kernel module and the attribute of it
# it replaces (global attention runs the window kernels too), and the ops it concerns.
SCHEDULE_VARIANTS = {
    "1 program per window": (window_kernels, "window_programs",
                             lambda device, windows, heads, per_multiprocessor: windows, ("window_attention",)),
    "key-block kernels": (window_kernels, "one_tile", lambda tokens, config: False, ("window_attention",)),
    "two warpgroups per tile": (window_kernels, "launch_warps",
                                lambda kernel, config, head_dim, flags: config.num_warps,
                                ("window_attention", "attention")),
    # 128 keys per step of the forward's loop: 14% fewer instructions per key by the compiler's report
    # (sm_90, ViT-B, 2 pipeline stages), at 188 registers (one CTA per multiprocessor) against 116 (two)
    "128x128 forward tiles": (window_kernels, "CONFIGS",
                              (*window_kernels.CONFIGS[:3], window_kernels.Config(128, 128, 8)), ("attention",)),
    # the one-tile forward's registers left to the compiler: two programs per multiprocessor, not three
    "compiler's registers": (window_kernels, "TILE_FORWARD_MAX_REGISTERS", None, ("window_attention",)),
    # the attention kernels' loads waited for at the top of each step, not a step ahead
    "2-stage pipelines": (window_kernels, "HALF_STAGES", 2, ("window_attention", "attention")),
    # fc1 normalizing its x tiles as they load instead of LN folded into its weights
    "LN prologue in fc1": (mlp_kernels, "FOLD_LAYERNORM", False, ("layernorm_mlp",)),
}
# (variant, op) whose forward is the default's: its forward alone is not timed
SAME_FORWARD = {("two warpgroups per tile", "attention")}
# variants whose backward is the default's: their backward alone is not timed
SAME_BACKWARD = {"128x128 forward tiles", "compiler's registers", "LN prologue in fc1"}
VARIANT_CASES = [pytest.param(variant, *case.values, id=f"{variant}-{case.id}")
                 for variant, (_, _, _, variant_ops) in SCHEDULE_VARIANTS.items()
                 for case in CASES if case.values[0] in variant_ops]


@pytest.mark.parametrize("mode", cases.selected("VITKERNELS_BENCH_MODES", cases.MODES))
@pytest.mark.parametrize("variant, op, shape", VARIANT_CASES)
def test_schedule_variant(benchmark, variant, op, shape, mode, device, dtype, monkeypatch):
    """The Triton backend with one of SCHEDULE_VARIANTS: for one-tile windows, a program per (window,
    head) instead of as many as the device holds walking the windows, or the kernels of wider
    windows (a program per window and head, the bias gathered in each, and a dq and a dk/dv
    kernel); for window and global attention, two warpgroups per 64-row tile instead of one where
    the default takes one; for global attention, 128 keys per step of the forward instead of 64; for
    the one-tile window forward, registers left to the compiler (two programs per multiprocessor
    where the cap fits three); for both attention ops, 2-stage pipelines instead of 3; for
    LayerNorm+MLP, fc1 normalizing its x tiles as they load instead of taking LN folded into its
    weights."""
    if device != "cuda":
        pytest.skip("Triton on CPU runs in the interpreter, whose timings say nothing about the kernels")
    if (variant, op) in SAME_FORWARD and mode == "fwd":
        pytest.skip(f"{op}'s forward launches the same kernel with {variant!r}")
    if variant in SAME_BACKWARD and mode == "bwd":
        pytest.skip(f"{op}'s backward launches the same kernels with {variant!r}")
    monkeypatch.setattr(*SCHEDULE_VARIANTS[variant][:3])
    _bench_case(benchmark, op, shape, "triton", mode, device, dtype, variant=variant)


HOST_MODES = ("host-inference", "host-training")
HOST_ROUNDS, HOST_CALLS = 30, 20  # rounds of calls back to back: 600 calls, about 50 ms of host time


@pytest.mark.parametrize("mode", HOST_MODES)
@pytest.mark.parametrize("op", cases.selected("VITKERNELS_BENCH_OPS", tuple(cases.OPS)))
@pytest.mark.parametrize("provider", cases.selected("VITKERNELS_BENCH_PROVIDERS", PROVIDERS))
def test_host_path(benchmark, op, provider, mode, device, dtype):
    """One call of ``op`` on its shapes.HOST inputs (module docstring); the median is per call."""
    if provider in COMPILED:
        pytest.skip(f"{provider}: a compiled graph's host path is its guards', not an op's")
    shape = shapes.HOST[op]
    benchmark.group = f"{op} {mode}"
    fn = provider_fn(op, shape, provider, device, dtype)
    inputs = cases.make_inputs(op, shape, device, dtype, grad=mode == "host-training")
    _check_once(op, shape, provider, fn, inputs, device, dtype)
    record(benchmark, op, shape, provider, "fwd", dtype, 1)
    benchmark.extra_info["mode"] = mode
    context = torch.no_grad if mode == "host-inference" else contextlib.nullcontext

    def calls():
        with context():
            for _ in range(HOST_CALLS):
                fn(inputs)

    with cases.skip_outside_failures(provider):
        calls()  # the warm-up round, where an outside provider's failure skips the case
    benchmark.pedantic(calls, rounds=1 if benchmark.disabled else HOST_ROUNDS, iterations=1)
    if device == "cuda":
        torch.cuda.synchronize()
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["seconds_per_call"] = stats.stats.median / HOST_CALLS
