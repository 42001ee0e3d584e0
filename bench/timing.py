"""Timing for the benchmarks: CUDA-event clocks and input pools larger than the L2 cache on GPU.

On CPU pytest-benchmark's own wall clock times each round, of one call. On GPU each round is timed
by CUDA events (:class:`CudaEventClock` replaces the fixture's timer) around
:data:`CALLS_PER_ROUND` calls launched back to back: the clock waits for the device at each reading,
so a round of one call would also time the host's path to its first launch (Python, dispatch,
Triton's launcher), while in a row of calls that path overlaps the device work of the call before,
as in a model's forward and in ``triton.testing.do_bench``. The calls rotate through copies of
their inputs whose total exceeds twice the L2 cache (:func:`pool_size`), so that no call reads
inputs the previous one left in L2; pytest-benchmark then reports the median over rounds of the
time per call. Where the host's path to the launches is longer than the device's work, the median
is the host's; the op benchmarks therefore also record the device's time alone
(:func:`graph_time`: the same calls captured in a CUDA graph and replayed).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Callable

import torch

# Seconds of timed rounds per benchmark (after warm-up); rounds are clamped to [MIN_ROUNDS, MAX_ROUNDS].
ROUND_BUDGET_S = {"cuda": 0.25, "cpu": 0.2}
MIN_ROUNDS, MAX_ROUNDS = 3, 200
WARMUP_CALLS = 2
CALLS_PER_ROUND = {"cuda": 10, "cpu": 1}
MAX_POOL = 16
GRAPH_REPLAYS = 5  # replays of a CUDA graph of CALLS_PER_ROUND calls (graph_time)


class CudaEventClock:
    """A timer for pytest-benchmark: seconds on the GPU timeline since the clock was made.

    Each reading records an event on the current stream and waits for it, so the difference of
    two readings is the GPU time between them (as CUDA-event timing measures it). Made anew per
    benchmark so that the float milliseconds of ``elapsed_time`` stay precise.
    """

    __name__ = "cuda_event_clock"  # how pytest-benchmark names a timer in its JSON

    def __init__(self):
        self.origin = torch.cuda.Event(enable_timing=True)
        self.origin.record()

    def __call__(self) -> float:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        return self.origin.elapsed_time(event) * 1e-3


def l2_bytes(device: str) -> int:
    if device != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or 50 * 2 ** 20)


def pool_size(input_bytes: int, l2: int) -> int:
    """Copies of the inputs to rotate through so that they span twice the L2 cache (1 without a cache)."""
    if l2 <= 0 or input_bytes <= 0:
        return 1
    return max(1, min(MAX_POOL, math.ceil(2 * l2 / input_bytes)))


def rounds_for(trial_s: float, device: str) -> int:
    """Timed rounds that fill the round budget at ``trial_s`` per call."""
    budget = ROUND_BUDGET_S.get(device, ROUND_BUDGET_S["cpu"])
    return int(min(MAX_ROUNDS, max(MIN_ROUNDS, budget // max(trial_s, 1e-7))))


def synchronizer(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def graph_time(call: Callable[[], None], calls: int, replays: int = GRAPH_REPLAYS) -> dict:
    """The device's time per call with the host out of it: ``calls`` calls captured in one CUDA
    graph, replayed ``replays`` times between CUDA events; ``{"graph_seconds": median per call}``,
    or ``{"graph_error": why}`` when the call cannot be captured (it synchronizes, say) or there is
    no GPU. Set beside the rounds' median, it tells how much of that median the host's path to
    the launches adds."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initializations (library handles) happen outside the capture
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                call()
        graph.replay()
        torch.cuda.synchronize()
        per_call = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            per_call.append(start.elapsed_time(end) * 1e-3 / calls)
        return {"graph_seconds": statistics.median(per_call)}
    except Exception as err:  # noqa: BLE001 - a call that cannot be captured keeps its rounds' median
        lines = str(err).strip().splitlines()
        return {"graph_error": f"{type(err).__name__}: {lines[0][:200] if lines else ''}".strip()}


def measure(benchmark, call: Callable[[], None], device: str, graph: bool = False) -> None:
    """Warm-up calls, a trial call that sets the rounds, then the timed rounds
    (:data:`CALLS_PER_ROUND` calls each; pytest-benchmark records the time per call); on GPU with
    ``graph``, also the device's time per call alone (:func:`graph_time`) in ``extra_info``.

    ``call`` must not synchronize: on GPU the CUDA-event clock waits for each round's end itself.
    A disabled benchmark (``--benchmark-disable``, or under pytest-xdist) makes one call and times
    nothing: a smoke run, which also compiles every kernel the timed run will launch.
    """
    sync = synchronizer(device)
    if benchmark.disabled:
        benchmark.pedantic(call)
        sync()
        return
    for _ in range(WARMUP_CALLS):
        call()
    sync()
    start = time.perf_counter()
    call()
    sync()
    calls = CALLS_PER_ROUND.get(device, 1)
    rounds = rounds_for(calls * (time.perf_counter() - start), device)
    if device == "cuda":
        benchmark._timer = CudaEventClock()  # pytest-benchmark reads each round's timer from this attribute
    benchmark.pedantic(call, rounds=rounds, iterations=calls, warmup_rounds=0)
    clock = "cuda events" if device == "cuda" else "wall clock"
    benchmark.extra_info["timer"] = f"{clock}, {calls} calls per round"
    if graph and device == "cuda":
        benchmark.extra_info.update(graph_time(call, calls))


def ceilings() -> dict:
    """The copy bandwidth and matmul rate measured on this device, from the JSON file that
    ``VITKERNELS_BENCH_CEILINGS`` names (bench/device_check.py writes it before benchmarking); {} when unset."""
    path = os.environ.get("VITKERNELS_BENCH_CEILINGS")
    if not path:
        return {}
    with open(path) as f:
        data = json.load(f)
    return {k: float(data[k]) for k in ("copy_gbps", "matmul_tflops") if data.get(k)}


def achieved(work, seconds: float, metric: str, measured: dict) -> dict:
    """GB/s and TFLOP/s of ``work`` done in ``seconds``; ``value`` is the ``metric`` one and, with its
    ceiling in ``measured``, ``fraction_of_ceiling`` relates it to the copy bandwidth or matmul rate."""
    if metric not in ("GB/s", "TFLOP/s"):
        raise ValueError(f"metric must be GB/s or TFLOP/s, got {metric!r}")
    result = {"gbps": work.bytes / seconds / 1e9, "tflops": work.flops / seconds / 1e12}
    result["value"] = result["gbps" if metric == "GB/s" else "tflops"]
    ceiling = measured.get("copy_gbps" if metric == "GB/s" else "matmul_tflops")
    if ceiling:
        result.update(ceiling=ceiling, fraction_of_ceiling=result["value"] / ceiling)
    return result
