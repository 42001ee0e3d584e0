#!/usr/bin/env python
"""The one command to run on a GPU machine: build, GPU tests, measured ceilings, benchmarks, report.

    python bench/device_check.py [--out DIR] [--full] [--quick] [--cpu] [--sanitize] [--no-build]
                                 [--tests-k EXPR] [--skip-tests] [--skip-bench] [--bench LIST]
                                 [--budget SECONDS]

Steps (each in a subprocess with a timeout, logged to RESULTS/logs/<step>.log; a failing step is
recorded and the next one runs; a step out of time gets SIGINT, then SIGKILL):

  env         GPU name and capability, torch / triton / CUDA / nvcc versions, git commit, date
  build       VITKERNELS_CUDA_ARCHS=<major>.<minor> python setup.py build_ext --inplace, then a check
              that vitkernels._C loads with its CUDA kernels (skipped with --cpu or without setup.py)
  tests       python -m pytest tests -m device -q: every test of tests/ops (the kernels against the
              reference, compiled Triton on a GPU, no interpreter) and the cuda-marked tests
              elsewhere (models, CUDA graphs, leaks, faults), in one run. On a GPU machine it runs
              on pytest-xdist workers, which share out the slow tests (the model comparisons) with
              the many short ones; a test whose worker crashed (a segmentation fault) is rerun alone
              under gdb or cuda-gdb (tests_backtrace), whose top frames the step's detail quotes.
  ceilings    device-to-device copy of 1 GiB (GB/s, read + write) and an 8192^3 bf16 matmul
              (TFLOP/s), medians of CUDA-event timings; --cpu: a large clone and an fp32 matmul
  large       one call of window_attention and of layernorm per compiled backend on a tensor of
              more than 2^31 elements, compared with the reference on slices (skipped without the
              memory; GPU only)
  bench_warm  on a GPU machine, the benchmark cases of the Triton backend called once each with
              the benchmarks disabled, on pytest-xdist workers: the kernels' host compiles run in
              parallel and fill Triton's on-disk cache for the timed runs (up to WARM_SHARE of
              the benchmarks' time; cut short, it still warmed what it reached)
  bench       the compact set, one pytest run per op (RESULTS/logs/bench_<op>.json): each op on the
              quick shapes, forward and backward, by the vitkernels GPU backends (--cpu: the CPU
              backend) and the eager and SDPA baselines; then the quick models' inference, stock
              and patched with the Triton backend (--cpu: the CPU backend); then the host's path
              of one call of each op (bench/test_bench_ops.py::test_host_path). --full adds
              forward+backward, the torch and cpu backends, the Triton schedule variants, the
              models' training step and the other backends, then, while time remains,
              FlexAttention, torch.compile (forward, on one or two shapes per op), torch.compile
              of the stock Swin-T and ViT-B/16 (inference) and last compile max-autotune
              (forward, Swin-T stage 1 window attention). The bench runs read the measured
              ceilings (VITKERNELS_BENCH_CEILINGS), so each record carries its fraction of the
              copy bandwidth or matmul rate. Merged into RESULTS/bench.json.

The default run is sized to finish within 7 minutes, the build included, and DEFAULT_BUDGET_S bounds
it: a step out of time is cut and the report says so; --full's budget is FULL_BUDGET_S.

--sanitize replaces tests, ceilings, large and bench by two runs, side by side, of a short pytest
selection of the CUDA and Triton kernels (the tests marked sanitize) under compute-sanitizer, one
with --tool memcheck (fp32 and fp16 cases, SANITIZE_K["memcheck"]) and one with --tool racecheck
(the fp16 cases alone, SANITIZE_K["racecheck"]: the shared-memory traffic of the tensor-core paths,
which bf16 shares; the fp32 cases add the IEEE products of the same tiles); each tool's verdict (its
ERROR SUMMARY) is recorded. Its default budget is 540 s.

Results go to RESULTS = DIR/<gpu>/<date>-<commit>/ (DIR/cpu/... with --cpu), the layout of
bench/results/: copy DIR's contents into bench/results/ to commit them. RESULTS holds
device_check.json (facts, ceilings, steps, benchmark medians with GB/s or TFLOP/s and their
fraction of the measured ceiling), device_check.md, speedup_<mode>.png plots, bench.json,
device_check.log (this script's own output) and logs/ (every step's raw log). The whole run keeps
under --budget seconds; the exit status is 1 when a step failed or timed out.

DIR defaults to $OUT, else ./out. --quick skips slow tests and benchmarks the forward alone.
--tests-k EXPR runs only the tests that pytest's -k EXPR selects (the report's mode says so);
--skip-tests skips the tests, --skip-bench the ceilings, the large case and the benchmarks.
--bench LIST makes only the named benchmark runs (ops, "models", "host", "flex", "compile",
"models-compile", "max-autotune"), in that order, each with the default's selection or --full's.
--pack-logs replaces RESULTS/logs by RESULTS/logs.tar.gz at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
OPS = ("window_attention", "attention", "patch_embed", "layernorm_mlp", "layernorm", "add_layernorm")

DEFAULT_BUDGET_S = 400  # under 7 minutes, the build included
FULL_BUDGET_S = 580
SANITIZE_BUDGET_S = 540  # the build, then two passes under tools that slow kernels by 10-100x
# Per-step caps (seconds) and the time each later step is guaranteed before an earlier one may use it.
CAPS = {"env": 60, "build": 240, "build_check": 60, "tests": 240, "ceilings": 90, "large": 60, "bench": 480,
        "sanitize_memcheck": 450, "sanitize_racecheck": 450, "backtrace": 60}
RESERVE = {"env": 10, "build": 30, "build_check": 10, "tests": 40, "ceilings": 30, "large": 15, "bench": 90,
           "sanitize_memcheck": 40, "sanitize_racecheck": 60, "backtrace": 0}
# The GPU tests: tests/conftest.py marks every test of tests/ops and every cuda test `device`.
TESTS_MARK = "device"
# The benchmark set of each run of bench/test_bench_ops.py: providers, modes and the tests (-k).
# The providers run in this order and a run cut short by its timeout keeps what it measured: the
# vitkernels backends of the machine first (--cpu: the CPU backend), then the baselines users compare
# them with, then (--full) the reference and the CPU backend.
BASELINES = "eager-sdpa,eager,sdpa"
COMPACT_PROVIDERS = {"gpu": "triton,cuda," + BASELINES, "cpu": "cpu," + BASELINES}
COMPACT_MODES = "fwd,bwd"
FULL_PROVIDERS = f"triton,cuda,{BASELINES},torch,cpu"
FULL_MODES = "fwd,bwd,fwd+bwd"
QUICK_MODES = "fwd"
# the compact set leaves the Triton schedule variants out, and every set the host's path, which has a run
HOST_TESTS = "test_host_path"
COMPACT_OP_TESTS = f"not test_schedule_variant and not {HOST_TESTS}"
# Runs of the compiled providers (name: ops, providers, -k shapes), slowest to compile last.
COMPILED_RUNS = {
    "flex": ("window_attention,attention", "flex", "swin_t.s1.w7.shifted or vit_b_224"),
    "compile": ("window_attention,attention,layernorm_mlp,layernorm", "compile",
                "swin_t.s1.w7.shifted or vit_b_224 or swin_t.s1-"),
    "max-autotune": ("window_attention", "compile-max-autotune", "swin_t.s1.w7.shifted"),
}
# The models: the compact set times inference, stock and patched with the Triton backend (--cpu: the
# CPU backend); --full adds the training step and the other backends.
COMPACT_MODEL_PROVIDERS = {"gpu": "stock,triton", "cpu": "stock,cpu"}
COMPACT_MODEL_TESTS = "infer"
FULL_MODEL_PROVIDERS = "stock,triton,cpu,cuda"
# torch.compile of whole stock models (inference; -k models): what the patched ones are compared with
COMPILED_MODELS = "infer and (swin_t or vit_b_224)"
# The compiled providers' runs in order, the slowest to compile last.
COMPILED_ORDER = ("flex", "compile", "models-compile", "max-autotune")
BENCH_RUNS = (*OPS, "models", "host", *COMPILED_ORDER)  # what --bench may name
# The kernels under compute-sanitizer: the tests marked `sanitize` (each op's comparisons with the
# reference), their CUDA and Triton cases, window attention first, so that a run cut short has
# covered it. memcheck takes fp32 and fp16 (fp16 takes the tensor-core paths, and bf16 the same
# code); racecheck, two to three times as slow, the fp16 cases alone (module docstring).
SANITIZE_FILES = ("tests/ops/test_window_attention.py", "tests/ops/test_attention.py",
                  "tests/ops/test_layernorm_mlp.py", "tests/ops/test_patch_embed.py")
SANITIZE_K = {"memcheck": "(cuda or triton) and not bf16", "racecheck": "(cuda or triton) and fp16"}
SANITIZE_TOOLS = tuple(SANITIZE_K)
# What a pytest run prints when it stops on a kernel fault (vitkernels.testing.CUDA_CONTEXT_LOST;
# this script imports no vitkernels module into its own process).
CUDA_CONTEXT_LOST = "CUDA context lost"
MIN_STEP_S = 10
MAX_WORKERS = 16  # pytest-xdist workers of a GPU machine's test steps and warm-up run
DURATIONS = "--durations=15"  # each pytest run's log names its slowest phases
# The providers whose first call compiles kernels on the host (Triton's JIT): the warm-up run calls
# each of their benchmark cases once, in parallel, before the timed runs.
WARM_PROVIDERS = "triton"
WARM_SHARE = 0.4  # of the benchmarks' time, at most, for the warm-up run
INTERRUPT_GRACE_S = 10  # seconds between SIGINT and SIGKILL of a step that runs out of time


@dataclass
class Step:
    name: str
    status: str = "pending"  # ok | failed | timeout | skipped
    seconds: float = 0.0
    detail: str = ""
    log: str = ""
    command: list = field(default_factory=list)


# --- pure functions (tested in tests/test_device_check.py) ----------------------------------------

def step_timeout(name: str, remaining: float, later: list[str], caps: dict = CAPS, reserve: dict = RESERVE) -> float:
    """Seconds step ``name`` may run: its cap, less what the ``later`` steps are guaranteed.

    A step always gets its own reserve while that much of the budget remains.
    """
    share = max(reserve[name], remaining - sum(reserve[s] for s in later))
    return max(0.0, min(caps[name], share, remaining))


def op_share(available: float, ops_left: int) -> float:
    """Timeout of the next of ``ops_left`` benchmark runs: up to twice an even share of ``available``."""
    if ops_left <= 1:
        return max(0.0, available)
    return max(0.0, min(available, 2 * available / ops_left))


def parse_nvcc_version(text: str) -> Optional[str]:
    """'13.0' from ``nvcc --version`` output, or None."""
    match = re.search(r"release (\d+\.\d+)", text or "")
    return match.group(1) if match else None


def parse_pytest_summary(text: str) -> str:
    """The last ``N passed, M skipped in 1.2s`` line of pytest output ('' when none)."""
    lines = [line.strip("= \n") for line in (text or "").splitlines()]
    found = [line for line in lines if re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b",
                                                 line) and re.search(r"\bin \d+(\.\d+)?s\b", line)]
    return found[-1] if found else ""


def merge_bench_json(parts: list[dict]) -> dict:
    """One pytest-benchmark JSON document from several runs (machine info of the first)."""
    if not parts:
        return {"benchmarks": []}
    merged = {k: v for k, v in parts[0].items() if k != "benchmarks"}
    merged["benchmarks"] = [b for part in parts for b in part.get("benchmarks", [])]
    return merged


def summarize_benchmarks(bench: dict, ceilings: dict) -> list[dict]:
    """Rows of op, mode, shape, backend, median and the headline metric with its fraction of the ceiling.

    ``ceilings`` holds ``copy_gbps`` and ``matmul_tflops`` (either may be missing); GB/s results
    are divided by the copy bandwidth, TFLOP/s results by the matmul rate; images/s (whole models)
    have no ceiling.
    """
    def rate(info: dict, metric: Optional[str], seconds: Optional[float]) -> Optional[float]:
        if not seconds or seconds <= 0:
            return None
        if metric == "GB/s" and info.get("bytes") is not None:
            return info["bytes"] / seconds / 1e9
        if metric == "TFLOP/s" and info.get("flops") is not None:
            return info["flops"] / seconds / 1e12
        if metric == "images/s" and info.get("batch"):
            return info["batch"] / seconds
        return None

    rows = []
    for b in bench.get("benchmarks", []):
        info = b.get("extra_info", {})
        median = (b.get("stats") or {}).get("median")
        metric = info.get("metric")
        value = rate(info, metric, median)
        alone = info.get("graph_seconds")
        alone_value = rate(info, metric, alone)
        ceiling = {"GB/s": ceilings.get("copy_gbps"), "TFLOP/s": ceilings.get("matmul_tflops")}.get(metric)
        rows.append({
            "name": b.get("name"), "op": info.get("op"), "mode": info.get("mode"), "shape": info.get("shape"),
            "backend": info.get("backend"), "kind": info.get("provider_kind"), "batch": info.get("batch"),
            "dtype": info.get("dtype"),
            "median_ms": None if median is None else median * 1e3, "metric": metric, "value": value,
            "fraction_of_ceiling": value / ceiling if value is not None and ceiling else None,
            # the device's time alone (a CUDA graph of the same calls), where it was measured
            "graph_ms": None if alone is None else alone * 1e3,
            "graph_fraction_of_ceiling": alone_value / ceiling if alone_value is not None and ceiling else None,
        })
    rows.sort(key=lambda r: (str(r["op"]), str(r["mode"]), str(r["shape"]), str(r["backend"])))
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _percent(fraction: Optional[float]) -> str:
    return "-" if fraction is None else f"{100 * fraction:.1f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def render_markdown(result: dict) -> str:
    """The markdown report of a device_check result (the dict written to device_check.json)."""
    env = result.get("env", {})
    ceilings = result.get("ceilings", {})
    lines = [f"# vitkernels device check — {env.get('device_name', 'unknown device')}", ""]
    lines += [f"{result.get('date', '')}, mode {result.get('mode', '?')}, total {_fmt(result.get('total_seconds'))} s, "
              f"status **{result.get('status', '?')}**", ""]
    lines += ["## Environment", ""]
    lines += _table(["fact", "value"], [[k, _fmt(v)] for k, v in env.items()])
    lines += ["", "## Ceilings (measured in this run)", ""]
    lines += _table(["ceiling", "value"], [[k, _fmt(v, 4)] for k, v in ceilings.items()])
    lines += ["", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "detail"],
                    [[s.get("name"), s.get("status"), _fmt(s.get("seconds")), s.get("detail", "")]
                     for s in result.get("steps", [])])
    rows = result.get("benchmarks", [])
    lines += ["", f"## Benchmarks ({len(rows)})", ""]
    if rows:
        lines += _table(
            ["op", "mode", "shape", "backend", "batch", "dtype", "median ms", "achieved", "of ceiling",
             "device ms (graph)", "of ceiling (graph)"],
            [[r["op"], r["mode"], r["shape"], r["backend"], r["batch"], r["dtype"], _fmt(r["median_ms"]),
              f"{_fmt(r['value'])} {r['metric'] or ''}".strip(), _percent(r["fraction_of_ceiling"]),
              _fmt(r.get("graph_ms")), _percent(r.get("graph_fraction_of_ceiling"))]
             for r in rows])
    else:
        lines.append("No benchmark results.")
    gains = result.get("speedups", [])
    if gains:
        lines += ["", "## Speedups (a provider's median over the best vitkernels backend's)", ""]
        lines += _table(["op", "mode", "shape", "against", "best backend", "speedup"],
                        [[g["op"], g["mode"], g["shape"], g["provider"], g["backend"], f"{g['speedup']:.2f}x"]
                         for g in gains])
    large = result.get("large", {})
    if large:
        lines += ["", "## Past 2^31 elements", ""]
        lines += _table(["case", "status", "detail"], [[k, v.get("status"), v.get("detail", "")]
                                                        for k, v in large.items()])
    return "\n".join(lines) + "\n"


def results_folder(device_name: str, date: str, commit: str) -> str:
    """``<gpu>/<date>-<commit>``, the layout of bench/results/: 'h100-80gb-hbm3/2026-11-26-4bdc99b'
    ('...-4bdc99b-dirty' when the working tree differed from the commit)."""
    slug = re.sub(r"[^a-z0-9]+", "-", (device_name or "unknown").lower()).strip("-")
    slug = re.sub(r"^nvidia-", "", slug) or "unknown"
    commit = commit or "unknown"
    short = commit[:7] + ("-dirty" if commit.endswith("-dirty") else "")
    return f"{slug}/{(date or 'undated')[:10]}-{short}"


def parse_sanitizer_summary(text: str) -> Optional[int]:
    """The error count of compute-sanitizer's last ``ERROR SUMMARY: N errors`` line, or None."""
    found = re.findall(r"ERROR SUMMARY: (\d+) error", text or "")
    return int(found[-1]) if found else None


def sanitizer_progress(text: str) -> tuple[int, int]:
    """(tests reached, error reports) of a compute-sanitizer run over ``pytest -q``: one progress
    character per test, and the tool's report lines, which it prints as it finds each error (so a
    run cut before its ERROR SUMMARY still tells what it found in the tests it reached)."""
    reached = sum(len(run) for run in re.findall(r"^([.sFExX]+)(?: +\[ *\d+%\])?$", text or "", re.MULTILINE))
    reports = re.findall(r"^========= (?!COMPUTE-SANITIZER|ERROR SUMMARY)\S", text or "", re.MULTILINE)
    return reached, len(reports)


def review_sanitizer(step: Step, output: str) -> None:
    """The tool's verdict: clean only with an ERROR SUMMARY of 0 and passing tests."""
    errors = parse_sanitizer_summary(output)
    summary = parse_pytest_summary(output)
    if errors is None:
        reached, reports = sanitizer_progress(output)
        verdict = (f"no ERROR SUMMARY (the tool did not finish): {reached} tests reached, "
                   + (f"{reports} error reports among them" if reports else "no error reported in them"))
        if step.status == "ok":
            step.status = "failed"
    else:
        verdict = "clean" if errors == 0 else f"{errors} errors"
        if errors:
            step.status = "failed"
    step.detail = "; ".join(x for x in (verdict, summary, step.detail) if x)


def speedups(rows: list[dict]) -> list[dict]:
    """Per (op, mode, shape) and baseline provider: the baseline's median over the best vitkernels backend's.

    ``rows`` are :func:`summarize_benchmarks` rows with ``kind`` "vitkernels" or "baseline"; the
    torch backend (vitkernels' unfused fallback) is not a candidate for the best backend.
    """
    cases: dict = {}
    for r in rows:
        if r.get("median_ms"):
            cases.setdefault((r["op"], r["mode"], r["shape"]), []).append(r)
    out = []
    for (op, mode, shape), group in sorted(cases.items(), key=lambda kv: tuple(map(str, kv[0]))):
        fused = [r for r in group if r.get("kind") == "vitkernels" and r["backend"] != "torch"]
        if not fused:
            continue
        best = min(fused, key=lambda r: r["median_ms"])
        for r in group:
            if r.get("kind") == "baseline":
                out.append({"op": op, "mode": mode, "shape": shape, "provider": r["backend"],
                            "backend": best["backend"], "speedup": r["median_ms"] / best["median_ms"]})
    return out


def plot_speedups(rows: list[dict], folder: str, title: str) -> list[str]:
    """One PNG per mode (speedup_<mode>.png): per op, the best backend's speedup over each provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for mode in sorted({r["mode"] for r in rows}):
        chosen = [r for r in rows if r["mode"] == mode]
        ops = sorted({r["op"] for r in chosen})
        fig, axes = plt.subplots(len(ops), 1, figsize=(9, 2.6 * len(ops)), squeeze=False)
        for ax, op in zip(axes[:, 0], ops):
            _speedup_bars(ax, [r for r in chosen if r["op"] == op], op)
        fig.suptitle(f"{title}: {mode}, vitkernels' best backend against each provider (>1: vitkernels faster)")
        fig.tight_layout()
        path = os.path.join(folder, f"speedup_{mode.replace('+', '_')}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _speedup_bars(ax, rows: list[dict], op: str) -> None:
    shapes = sorted({r["shape"] for r in rows})
    names = sorted({r["provider"] for r in rows})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        by_shape = {r["shape"]: r["speedup"] for r in rows if r["provider"] == name}
        ax.bar([j + i * width for j in range(len(shapes))], [by_shape.get(sh, 0.0) for sh in shapes], width,
               label=name)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
    ax.set_xticklabels(shapes, fontsize=7)
    ax.set_ylabel("speedup (log)")
    ax.set_title(op, fontsize=9)
    ax.legend(fontsize=6, ncol=4)


def overall_status(steps: list[dict]) -> str:
    return "failed" if any(s.get("status") in ("failed", "timeout") for s in steps) else "ok"


# --- probes: run as `device_check.py --probe NAME --probe-out FILE` in a subprocess -------------

def probe_env() -> dict:
    import platform

    facts: dict = {"python": platform.python_version(), "platform": platform.platform(),
                   "cpu_count": os.cpu_count()}
    import torch

    facts["torch"] = torch.__version__
    facts["torch_cuda"] = torch.version.cuda
    for package in ("triton", "timm", "transformers", "torchvision", "numpy"):
        try:
            facts[package] = importlib.import_module(package).__version__
        except ImportError as err:
            facts[package] = f"unavailable ({err})"
    facts.update(_toolchain())
    facts["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts["device_name"] = props.name
        facts["capability"] = f"{props.major}.{props.minor}"
        facts["device_memory_gib"] = round(props.total_memory / 2 ** 30, 1)
        facts["multiprocessors"] = props.multi_processor_count
        l2_bytes = getattr(props, "L2_cache_size", None)
        if l2_bytes:
            facts["l2_cache_mib"] = round(l2_bytes / 2 ** 20, 1)
        facts["device_count"] = torch.cuda.device_count()
    else:
        facts["device_name"] = f"CPU ({platform.processor() or platform.machine()})"
    return facts


def _toolchain() -> dict:
    """The C++ compiler the extension build will use and the C++ runtime this process loaded: an
    extension built by a newer compiler than that runtime can fail in library code it inlined."""
    import shlex

    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    try:
        done = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=20, check=False)
        version = (done.stdout or done.stderr).splitlines()[0] if (done.stdout or done.stderr) else "no output"
    except (OSError, subprocess.TimeoutExpired) as err:
        version = f"unavailable ({err})"
    runtime = "unknown"
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libstdc++" in line}
        runtime = ", ".join(sorted(os.path.realpath(p) for p in paths)) or "not loaded"
    except OSError:
        pass
    return {"cxx": f"{' '.join(cxx)}: {version}", "libstdcxx_loaded": runtime}


def _cuda_median_ms(fn: Callable[[], None], reps: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cpu_median_ms(fn: Callable[[], None], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def probe_ceilings(cpu: bool, quick: bool) -> dict:
    import torch

    reps = 10 if quick else 20
    if not cpu and torch.cuda.is_available():
        nbytes = 2 ** 30
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 255)
        dst = torch.empty_like(src)
        copy_ms = _cuda_median_ms(lambda: dst.copy_(src), reps)
        del src, dst
        n = 8192
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        matmul_ms = _cuda_median_ms(lambda: torch.matmul(a, b), reps)
        return {"copy_bytes": nbytes, "copy_ms": copy_ms, "copy_gbps": 2 * nbytes / (copy_ms * 1e-3) / 1e9,
                "matmul_n": n, "matmul_dtype": "bfloat16", "matmul_ms": matmul_ms,
                "matmul_tflops": 2 * n ** 3 / (matmul_ms * 1e-3) / 1e12, "method": "CUDA events, median"}
    nbytes = 2 ** 28
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    copy_ms = _cpu_median_ms(lambda: src.clone(), max(5, reps // 2))
    n = 1024 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    matmul_ms = _cpu_median_ms(lambda: torch.matmul(a, b), 5)
    tflops = 2 * n ** 3 / (matmul_ms * 1e-3) / 1e12
    return {"copy_bytes": nbytes, "copy_ms": copy_ms, "copy_gbps": 2 * nbytes / (copy_ms * 1e-3) / 1e9,
            "matmul_n": n, "matmul_dtype": "float32", "matmul_ms": matmul_ms, "matmul_tflops": tflops,
            "matmul_gflops": tflops * 1e3, "torch_threads": torch.get_num_threads(),
            "method": "wall clock (clone of 256 MiB; fp32 matmul), median"}


def probe_extension() -> dict:
    from vitkernels import _ext

    return {"unavailable_reason": _ext.unavailable_reason(), "has_cuda": _ext.has_cuda(),
            "build_info": {k: str(v) for k, v in _ext.build_info().items()}}


def _large_cases(free_bytes: int):
    """(name, element count, bytes needed) of each large case, and why it is skipped (None: it runs)."""
    import torch

    itemsize = torch.empty((), dtype=torch.bfloat16).element_size()
    # window_attention: Swin-T stage 1 qkv maps (56 x 56 x 288) of 2,400 images: 2.17e9 elements.
    qkv_elements = 2400 * 56 * 56 * 288
    # layernorm: 2^31 + 2^20 elements, rows of 768 channels.
    ln_rows = (2 ** 31 + 2 ** 20) // 768 + 1
    plans = [("window_attention", qkv_elements, qkv_elements * itemsize * 4 // 3),
             ("layernorm", ln_rows * 768, ln_rows * 768 * itemsize * 2)]
    for name, elements, needed in plans:
        margin = int(needed * 1.25) + 2 ** 30
        why = None if free_bytes >= margin else (f"needs about {margin / 2 ** 30:.1f} GiB free, "
                                                 f"{free_bytes / 2 ** 30:.1f} GiB are")
        yield name, elements, why


def probe_large() -> dict:
    """One call per compiled backend past 2^31 elements, compared with the reference on slices."""
    import torch

    if not torch.cuda.is_available():
        return {"all": {"status": "skipped", "detail": "no CUDA device"}}
    with torch.no_grad():
        return _large_all(torch.cuda.mem_get_info()[0])


def _large_all(free_bytes: int) -> dict:
    import torch

    from vitkernels import backends, ops

    results = {}
    for name, elements, why in _large_cases(free_bytes):
        for backend in ("cuda", "triton"):
            key = f"{name} {backend} ({elements / 1e9:.2f}e9 elements)"
            missing = backends.unavailable_reason(backend)
            if why or missing or backend not in ops.backend_table(name):
                results[key] = {"status": "skipped", "detail": why or missing or f"no {backend} {name}"}
                continue
            try:
                results[key] = _large_call(name, backend)
            except torch.cuda.OutOfMemoryError as err:
                results[key] = {"status": "skipped", "detail": f"out of memory: {_first_line(err)}"}
            except Exception as err:  # noqa: BLE001 - a launch error (a grid past its limits) is a finding
                results[key] = {"status": "failed", "detail": f"{type(err).__name__}: {_first_line(err)}"}
            torch.cuda.empty_cache()
    return results


def _first_line(err: Exception) -> str:
    return next(iter(str(err).splitlines()), "")


def _large_call(name: str, backend: str) -> dict:
    """Runs one large case; the reference sees the first and the last slice (whole images or rows)."""
    import torch

    from vitkernels import ops
    from vitkernels.testing import errors

    torch.manual_seed(0)
    if name == "window_attention":
        qkv = torch.randn(2400, 56, 56, 288, device="cuda", dtype=torch.bfloat16)
        table = torch.randn(169, 3, device="cuda", dtype=torch.bfloat16) * 0.02
        out = ops.window_attention(qkv, 3, 7, 3, table, backend=backend)
        slices = (slice(0, 4), slice(-4, None))
        expected = [ops.window_attention(qkv[s].double(), 3, 7, 3, table.double(), backend="torch") for s in slices]
    else:
        x = torch.randn((2 ** 31 + 2 ** 20) // 768 + 1, 768, device="cuda", dtype=torch.bfloat16)
        weight, bias = torch.randn(768, device="cuda", dtype=torch.bfloat16), torch.randn(768, device="cuda",
                                                                                           dtype=torch.bfloat16)
        out = ops.layernorm(x, weight, bias, backend=backend)
        slices = (slice(0, 4096), slice(-4096, None))
        expected = [ops.layernorm(x[s].double(), weight.double(), bias.double(), backend="torch") for s in slices]
    worst = max(errors(out[s], e).rel for s, e in zip(slices, expected))
    # bf16 output rounding alone is 2^-8 relative; an index error gives O(1).
    ok = worst < 2e-2 and bool(torch.isfinite(out[slices[1]]).all())
    return {"status": "ok" if ok else "failed", "detail": f"largest relative error on the slices {worst:.2e}"}


PROBES = {"env": lambda args: probe_env(), "ceilings": lambda args: probe_ceilings(args.cpu, args.quick),
          "extension": lambda args: probe_extension(), "large": lambda args: probe_large()}


# --- the runner -----------------------------------------------------------------------------------

class Runner:
    def __init__(self, out: str, budget: float, cpu: bool, quick: bool, tests_k: Optional[str] = None,
                 bench: Optional[list[str]] = None, skip_tests: bool = False, skip_bench: bool = False,
                 full: bool = False):
        self.out, self.budget, self.cpu, self.quick, self.tests_k = out, budget, cpu, quick, tests_k
        self.bench, self.skip_tests, self.skip_bench, self.full = bench, skip_tests, skip_bench, full
        self.logs = os.path.join(out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.start = time.monotonic()
        self.steps: list[Step] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def say(self, message: str) -> None:
        line = f"[{self.elapsed():7.1f}s] {message}"
        print(line, flush=True)
        with open(os.path.join(self.out, "device_check.log"), "a") as log:
            log.write(line + "\n")

    def env(self, extra: Optional[dict] = None) -> dict:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it itself when there is no GPU
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        if self.cpu:
            env["CUDA_VISIBLE_DEVICES"] = ""
        env.update(extra or {})
        return env

    def record(self, step: Step) -> Step:
        self.steps.append(step)
        self.say(f"{step.name}: {step.status} ({step.seconds:.1f}s){' - ' + step.detail if step.detail else ''}")
        return step

    def skip(self, name: str, why: str) -> Step:
        return self.record(Step(name, "skipped", 0.0, why))

    def timeout_for(self, name: str, later: list[str]) -> float:
        return step_timeout(name, self.remaining(), later)

    def command(self, name: str, command: list[str], timeout: float, extra_env: Optional[dict] = None,
                log_name: Optional[str] = None, review: Optional[Callable[[Step, str], None]] = None,
                ) -> tuple[Step, str]:
        """Runs ``command`` in the repository for at most ``timeout`` s; returns the step and its output.

        ``review(step, output)`` may adjust the step's status and detail before it is recorded.
        """
        log_path = os.path.join(self.logs, f"{log_name or name}.log")
        step = Step(name, command=command, log=os.path.relpath(log_path, self.out))
        if timeout < MIN_STEP_S:
            step.status, step.detail = "skipped", f"no time left in the {self.budget:.0f}s budget"
            return self.record(step), ""
        self.say(f"{name}: running (timeout {timeout:.0f}s): {' '.join(command)}")
        started = time.monotonic()
        env_note = " ".join(f"{k}={v}" for k, v in (extra_env or {}).items())
        with open(log_path, "w") as log:
            log.write(f"$ {env_note + ' ' if env_note else ''}{' '.join(command)}\n"
                      f"# cwd {ROOT}, timeout {timeout:.0f}s, "
                      f"started {datetime.datetime.now().isoformat(timespec='seconds')}\n\n")
            log.flush()
            offset = log.tell()
            returncode = run_with_timeout(command, self.env(extra_env), log, timeout)
            step.seconds = time.monotonic() - started
            if returncode is None:
                step.status, step.detail = "timeout", f"killed after {timeout:.0f}s"
            elif isinstance(returncode, str):
                step.status, step.detail = "failed", returncode
            else:
                step.status = "ok" if returncode == 0 else "failed"
                step.detail = f"exit {returncode}" if returncode else ""
        with open(log_path, errors="replace") as log:
            log.seek(offset)
            output = log.read()
        with open(log_path, "a") as log:
            log.write(f"\n# {step.status}: {step.detail or 'exit 0'}, {step.seconds:.1f}s\n")
        if review is not None:
            review(step, output)
        return self.record(step), output

    def probe(self, name: str, probe: str, later: list[str]) -> tuple[Step, dict]:
        result_path = os.path.join(self.logs, f"{name}.json")
        if os.path.exists(result_path):
            os.remove(result_path)
        command = [sys.executable, SCRIPT, "--probe", probe, "--probe-out", result_path]
        command += ["--cpu"] if self.cpu else []
        command += ["--quick"] if self.quick else []
        step, _ = self.command(name, command, self.timeout_for(name, later))
        data = {}
        if step.status == "ok":
            try:
                with open(result_path) as f:
                    data = json.load(f)
            except (OSError, ValueError) as err:
                step.status, step.detail = "failed", f"no probe result: {err}"
        return step, data


def run_with_timeout(command: list[str], env: dict, log, timeout: float, grace: float = INTERRUPT_GRACE_S):
    """Runs ``command`` in ROOT with its output appended to ``log``.

    Returns the exit status, None when it ran out of time, or an error message. At ``timeout -
    grace`` seconds (grace at most a quarter of the timeout) the process group gets SIGINT,
    which lets pytest finish its session and pytest-benchmark write the results measured so far;
    at ``timeout`` the whole group is killed, so that no compiler or worker it started lingers.
    """
    try:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    grace = min(grace, timeout / 4)
    try:
        return proc.wait(timeout=timeout - grace)
    except subprocess.TimeoutExpired:
        pass
    if grace:
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    _signal_group(proc, signal.SIGKILL)
    proc.wait()
    return None


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        if proc.poll() is None:
            proc.send_signal(sig)


def _git_commit() -> str:
    """HEAD's hash, with "-dirty" when tracked files differ from it: the run measured other code."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                    capture_output=True, text=True, timeout=30)
            dirty = status.returncode == 0 and bool(status.stdout.strip())
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _nvcc_version() -> Optional[str]:
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if not nvcc:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30)
        return parse_nvcc_version(out.stdout)
    except (OSError, subprocess.SubprocessError):
        return None


def _nvidia_smi(query: str) -> Optional[str]:
    """The first GPU's ``query`` field from nvidia-smi, or None."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _driver_version() -> Optional[str]:
    return _nvidia_smi("driver_version")


def _gpu_name() -> Optional[str]:
    return _nvidia_smi("name")


def pytest_workers(cpu: bool, cpu_count: Optional[int] = None) -> list[str]:
    """pytest-xdist arguments for a test step on a GPU machine: first use of each Triton kernel
    specialization compiles it on the host, which dominates those runs, so every core but two
    (:data:`MAX_WORKERS` at most) runs a share of the tests on the one GPU. A worker keeps one core
    busy at a time: Triton compiles in its process, then waits for ptxas. Where pytest-xdist has it
    (3.2 and later), idle workers steal queued tests from busy ones, so a few slow tests (the model
    comparisons) do not hold the run's tail. None on CPU runs, below 4 cores or without pytest-xdist."""
    workers = min(MAX_WORKERS, (cpu_count or os.cpu_count() or 1) - 2)
    if cpu or workers < 2 or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(workers)] + (["--dist", "worksteal"] if _xdist_steals() else [])


def _xdist_steals() -> bool:
    """Whether the installed pytest-xdist has --dist worksteal (3.2 and later)."""
    try:
        major, minor = (int(part) for part in importlib.metadata.version("pytest-xdist").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (3, 2)


def _pytest_step(runner: Runner, name: str, args: list[str], later: list[str]) -> Step:
    command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", DURATIONS,
               *pytest_workers(runner.cpu)]
    if runner.quick:
        marks = args[args.index("-m") + 1] if "-m" in args else None
        command += ["-m", f"({marks}) and not slow" if marks else "not slow"]
    if runner.tests_k:
        command += ["-k", runner.tests_k]
    step, output = runner.command(name, command, runner.timeout_for(name, later), review=review_pytest)
    crashed = crashed_tests(output)
    if crashed:
        run_backtrace(runner, f"{name}_backtrace", crashed[0], later)
    return step


CRASHED = re.compile(r"worker '[^']+' crashed while running '([^']+)'")


def crashed_tests(output: str) -> list[str]:
    """The tests whose pytest-xdist worker died under them (a segmentation fault, an abort), in order."""
    return list(dict.fromkeys(CRASHED.findall(output or "")))


def debugger_path() -> Optional[str]:
    """gdb on PATH, else cuda-gdb (PATH or the CUDA toolkit's bin), or None."""
    found = shutil.which("gdb") or shutil.which("cuda-gdb")
    if found:
        return found
    for home in filter(None, [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]):
        candidate = os.path.join(home, "bin", "cuda-gdb")
        if os.path.exists(candidate):
            return candidate
    return None


def backtrace_command(debugger: str, test: str) -> list[str]:
    """``test`` alone under ``debugger`` in batch mode: at the fault, the native backtrace and the C++
    runtime the process loaded."""
    return [debugger, "-batch", "-ex", "run", "-ex", "bt", "-ex", "info sharedlibrary libstdc",
            "--args", sys.executable, "-m", "pytest", test, "-q", "-p", "no:cacheprovider"]


def backtrace_frames(text: str) -> list[str]:
    """The frames (``#0 ...``) of a debugger's backtrace, whitespace collapsed."""
    return [" ".join(line.split()) for line in (text or "").splitlines() if re.match(r"#\d+\s", line)]


def run_backtrace(runner: Runner, name: str, test: str, later: list[str]) -> Step:
    """Reruns a test that crashed its worker under a debugger; the step's detail holds the top frames."""
    debugger = debugger_path()
    if debugger is None:
        return runner.skip(name, f"{test} crashed; no gdb or cuda-gdb found for its backtrace")

    def review(step: Step, output: str) -> None:
        frames = backtrace_frames(output)
        if frames:
            step.status, step.detail = "ok", f"{test}: " + " | ".join(frames[:8])
        elif re.search(r"\[Inferior \d+ \(process \d+\) exited", output):
            step.status, step.detail = "ok", f"{test}: no fault under the debugger"
        else:
            outcome = " ".join(filter(None, (step.status, step.detail)))
            step.detail = f"{test}: no backtrace ({outcome}; see the log)"

    step, _ = runner.command(name, backtrace_command(debugger, test), runner.timeout_for("backtrace", later),
                             review=review)
    return step


def review_pytest(step: Step, output: str) -> None:
    """Puts pytest's summary line in the step's detail; nothing selected (exit 5) is not a failure.
    A run that lost its CUDA context to a kernel fault failed, whatever its exit status, and the
    detail names the test that was running."""
    summary = parse_pytest_summary(output)
    if step.status == "failed" and step.detail == "exit 5" and "no tests ran" in summary:
        step.status, step.detail = "ok", ""
    if summary:
        step.detail = f"{summary}; {step.detail}" if step.detail else summary
    lost = [line[line.index(CUDA_CONTEXT_LOST):].rstrip(" !") for line in output.splitlines()
            if CUDA_CONTEXT_LOST in line]
    if lost:
        step.status = "failed"
        step.detail = f"{step.detail}; {lost[0]}" if step.detail else lost[0]


ORDER = ["env", "build", "build_check", "tests", "ceilings", "large", "bench"]
MEASURE_STEPS = ("ceilings", "large", "bench")  # what --skip-bench leaves out
SANITIZE_ORDER = ["env", "build", "build_check", "sanitize_memcheck", "sanitize_racecheck"]


def run_steps(runner: Runner, no_build: bool, sanitize: bool = False) -> dict:
    order = SANITIZE_ORDER if sanitize else [s for s in ORDER if not (runner.skip_bench and s in MEASURE_STEPS)]

    def later(name):
        return order[order.index(name) + 1:]

    result: dict = {"env": {}, "ceilings": {}, "extension": {}}
    step, facts = runner.probe("env", "env", later("env"))
    facts.update(nvcc=_nvcc_version(), driver=_driver_version(), git_commit=_git_commit(),
                 date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    result["env"] = facts
    result["extension"] = _build(runner, facts.get("capability"), no_build, later)
    if sanitize:
        # Side by side: a run under a tool is bound by its host (Triton's compiles, the tool's
        # instrumentation of each kernel it loads) more than by the device.
        with concurrent.futures.ThreadPoolExecutor(len(SANITIZE_TOOLS)) as pool:
            list(pool.map(lambda tool: run_sanitizer(runner, tool, []), SANITIZE_TOOLS))
        return result

    # GPU tests, with compiled Triton (no interpreter) on a GPU
    if runner.skip_tests:
        runner.skip("tests", "--skip-tests")
    else:
        _pytest_step(runner, "tests", ["tests", "-m", TESTS_MARK], later("tests"))
    if runner.skip_bench:
        for name in MEASURE_STEPS:
            runner.skip(name, "--skip-bench")
        return result
    _, result["ceilings"] = runner.probe("ceilings", "ceilings", later("ceilings"))
    if runner.cpu:
        runner.skip("large", "--cpu: the large-tensor case runs on a GPU")
    else:
        step, result["large"] = runner.probe("large", "large", later("large"))
        if any(v.get("status") == "failed" for v in result["large"].values()):
            step.status, step.detail = "failed", "a kernel differs from the reference past 2^31 elements"
    # benchmarks, one pytest run per op so that a timeout keeps the other runs' results
    result["bench_parts"] = run_bench(runner)
    return result


def _build(runner: Runner, capability: Optional[str], no_build: bool, later) -> dict:
    """Builds the extension for this device's arch only; returns what the extension probe found."""
    if runner.cpu:
        runner.skip("build", "--cpu: no CUDA build")
    elif no_build:
        runner.skip("build", "--no-build")
    elif not os.path.exists(os.path.join(ROOT, "setup.py")):
        runner.skip("build", "no setup.py in the repository")
    elif not capability:
        runner.skip("build", "no CUDA device found by the env step")
    else:
        arch_env = {"VITKERNELS_CUDA_ARCHS": capability, "TORCH_CUDA_ARCH_LIST": capability}
        runner.command("build", [sys.executable, "setup.py", "build_ext", "--inplace"],
                       runner.timeout_for("build", later("build")), arch_env)
        # setup.py turns a failed build into a warning: check what actually loads.
        check, ext = runner.probe("build_check", "extension", later("build_check"))
        if check.status == "ok":
            if ext.get("unavailable_reason"):
                check.status, check.detail = "failed", f"vitkernels._C not loadable: {ext['unavailable_reason']}"
            elif not ext.get("has_cuda"):
                check.status = "failed"
                check.detail = "vitkernels._C was built without CUDA kernels (see logs/build.log)"
            else:
                check.detail = "vitkernels._C loads with CUDA kernels"
        return ext
    return {}


def sanitizer_path() -> Optional[str]:
    """compute-sanitizer on PATH, else in the CUDA toolkit's bin."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", "/usr/local/cuda-13.0"]
    for home in filter(None, homes):
        candidate = os.path.join(home, "bin", "compute-sanitizer")
        if os.path.exists(candidate):
            return candidate
    return None


def sanitizer_command(tool: str, sanitizer: str) -> list[str]:
    """compute-sanitizer ``tool`` over the ``sanitize`` tests of SANITIZE_FILES that SANITIZE_K selects
    (errors fail the run)."""
    if tool not in SANITIZE_TOOLS:
        raise ValueError(f"tool must be one of {SANITIZE_TOOLS}, got {tool!r}")
    return [sanitizer, "--tool", tool, "--error-exitcode", "3", sys.executable, "-m", "pytest", *SANITIZE_FILES,
            "-q", "-p", "no:cacheprovider", "-m", "sanitize", "-k", SANITIZE_K[tool]]


def run_sanitizer(runner: Runner, tool: str, later: list[str]) -> Step:
    name = f"sanitize_{tool}"
    sanitizer = sanitizer_path()
    if sanitizer is None:
        return runner.record(Step(name, "failed", 0.0, "compute-sanitizer not found (PATH, CUDA_HOME/bin)"))
    # Triton's compile cache and the caching allocator hide nothing from the tools, but the
    # allocator's reuse would mask out-of-bounds reads into live blocks: turn it off.
    step, _ = runner.command(name, sanitizer_command(tool, sanitizer), runner.timeout_for(name, later),
                             {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, review=review_sanitizer)
    return step


def bench_runs(cpu: bool, quick: bool, ceilings_path: Optional[str], selection: Optional[list[str]] = None,
               full: bool = False) -> list[tuple[str, list[str], dict]]:
    """(name, pytest arguments, environment) of each benchmark run, in order of importance: the
    compact set, or with ``full`` the full one (the module docstring); with ``selection`` (names of
    BENCH_RUNS), those runs alone, in its order."""
    common = {"VITKERNELS_BENCH_SHAPES": "quick"}
    if ceilings_path:
        common["VITKERNELS_BENCH_CEILINGS"] = ceilings_path
    modes = QUICK_MODES if quick else FULL_MODES if full else COMPACT_MODES
    machine = "cpu" if cpu else "gpu"
    op_args = ["bench/test_bench_ops.py", "-k", f"not {HOST_TESTS}" if full else COMPACT_OP_TESTS]
    runs = {op: (f"bench:{op}", op_args,
                 dict(common, VITKERNELS_BENCH_OPS=op, VITKERNELS_BENCH_MODES=modes,
                      VITKERNELS_BENCH_PROVIDERS=FULL_PROVIDERS if full else COMPACT_PROVIDERS[machine]))
            for op in OPS}
    runs["models"] = ("bench:models", ["bench/test_bench_models.py"] + ([] if full else ["-k", COMPACT_MODEL_TESTS]),
                      dict(common, VITKERNELS_BENCH_MODEL_PROVIDERS=FULL_MODEL_PROVIDERS if full
                           else COMPACT_MODEL_PROVIDERS[machine]))
    runs["host"] = ("bench:host", ["bench/test_bench_ops.py", "-k", HOST_TESTS],
                    dict(common, VITKERNELS_BENCH_PROVIDERS=FULL_PROVIDERS if full else COMPACT_PROVIDERS[machine]))
    for name, (op_names, provider_names, shapes_k) in COMPILED_RUNS.items():
        runs[name] = (f"bench:{name}", ["bench/test_bench_ops.py", "-k", f"test_op and ({shapes_k})"],
                      dict(common, VITKERNELS_BENCH_OPS=op_names, VITKERNELS_BENCH_PROVIDERS=provider_names,
                           VITKERNELS_BENCH_MODES="fwd"))
    runs["models-compile"] = ("bench:models-compile", ["bench/test_bench_models.py", "-k", COMPILED_MODELS],
                              dict(common, VITKERNELS_BENCH_MODEL_PROVIDERS="compile"))
    if selection is None:
        selection = [*OPS, "models", "host", *(COMPILED_ORDER if full and not quick else ())]
    return [runs[name] for name in selection]


def bench_selection(text: str) -> list[str]:
    """The names of ``--bench``'s comma-separated list, checked against BENCH_RUNS."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BENCH_RUNS]
    if unknown or not names:
        raise ValueError(f"--bench takes a comma-separated list of {', '.join(BENCH_RUNS)}; got {text!r}")
    return names


def warm_run(runs: list[tuple[str, list[str], dict]], workers: list[str]) -> Optional[tuple[list[str], dict]]:
    """(pytest arguments, environment) of the warm-up ahead of the timed benchmark ``runs``: each of
    their op cases and model inference cases with a WARM_PROVIDERS provider, called once with the
    benchmarks disabled (checked against the reference, nothing timed) on the pytest-xdist
    ``workers``. The kernels' host compiles then run in parallel and fill Triton's on-disk cache,
    from which the timed runs, one process at a time, load them. None without workers or such runs."""
    ops = [env for name, _, env in runs if name.split(":", 1)[1] in OPS]
    models = [env for name, _, env in runs if name == "bench:models"]
    compact = any(args[-2:] == ["-k", COMPACT_OP_TESTS] for name, args, _ in runs if name.split(":", 1)[1] in OPS)
    if not workers or not (ops or models):
        return None
    env = dict((ops or models)[0], VITKERNELS_BENCH_PROVIDERS=WARM_PROVIDERS,
               VITKERNELS_BENCH_MODEL_PROVIDERS=WARM_PROVIDERS)
    env["VITKERNELS_BENCH_OPS"] = ",".join(e["VITKERNELS_BENCH_OPS"] for e in ops)
    files = ["bench/test_bench_ops.py"] * bool(ops) + ["bench/test_bench_models.py"] * bool(models)
    # A model's training step holds its activations for the backward: several at once on the
    # workers could exhaust the device's memory, and the op cases compile the same kernels.
    return [*files, "--benchmark-disable", "-k", f"not train and {COMPACT_OP_TESTS}" if compact else "not train",
            *workers], env


def review_warm(step: Step, output: str) -> None:
    """A warm-up cut at its share of the time still warmed what it reached: the timed runs compile the rest."""
    review_pytest(step, output)
    if step.status == "timeout":
        step.status = "ok"
        step.detail = f"{step.detail}; the timed runs compile what it did not reach"


def run_bench(runner: Runner) -> list[str]:
    ceilings_path = os.path.join(runner.logs, "ceilings.json")
    runs = bench_runs(runner.cpu, runner.quick, ceilings_path if os.path.exists(ceilings_path) else None,
                      runner.bench, runner.full)
    parts, started, failed = [], time.monotonic(), []
    warm = warm_run(runs, pytest_workers(runner.cpu))
    if warm is not None:
        args, env = warm
        command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", DURATIONS]
        runner.command("bench_warm", command, WARM_SHARE * min(runner.remaining(), CAPS["bench"]), env,
                       review=review_warm)
    for i, (name, args, env) in enumerate(runs):
        available = min(runner.remaining(), CAPS["bench"] - (time.monotonic() - started))
        log_name = name.replace(":", "_")
        path = os.path.join(runner.logs, f"{log_name}.json")
        command = [sys.executable, "-m", "pytest", *args, "-q", "-p", "no:cacheprovider", DURATIONS,
                   f"--benchmark-json={path}", "--benchmark-columns=min,median,max,rounds"]
        if os.path.exists(path):
            os.remove(path)
        step, _ = runner.command(name, command, op_share(available, len(runs) - i), env, log_name=log_name,
                                 review=review_pytest)
        if os.path.exists(path):
            parts.append(path)
        if step.status != "ok":
            failed.append(f"{name}: {step.status} {step.detail}".strip())
    runner.say(f"bench: {len(parts)}/{len(runs)} runs measured in {time.monotonic() - started:.1f}s"
               + (f"; {'; '.join(failed)}" if failed else ""))
    return parts


def finish(runner: Runner, result: dict, mode: str) -> dict:
    parts = []
    for path in result.pop("bench_parts", []):
        try:
            with open(path) as f:
                parts.append(json.load(f))
        except (OSError, ValueError) as err:
            runner.say(f"cannot read {path}: {err}")
    bench = merge_bench_json(parts)
    with open(os.path.join(runner.out, "bench.json"), "w") as f:
        json.dump(bench, f, indent=1)
    steps = [asdict(s) for s in runner.steps]
    rows = summarize_benchmarks(bench, result.get("ceilings", {}))
    report = {
        "date": result["env"].get("date"), "mode": mode, "total_seconds": runner.elapsed(),
        "budget_seconds": runner.budget, "status": overall_status(steps), "env": result["env"],
        "extension": result.get("extension", {}), "ceilings": result.get("ceilings", {}),
        "large": result.get("large", {}), "steps": steps, "benchmarks": rows, "speedups": speedups(rows),
    }
    if report["speedups"]:
        try:
            report["plots"] = [os.path.basename(p) for p in
                               plot_speedups(report["speedups"], runner.out, result["env"].get("device_name", ""))]
        except Exception as err:  # noqa: BLE001 - a plot never costs the report
            runner.say(f"plots failed: {type(err).__name__}: {err}")
    with open(os.path.join(runner.out, "device_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(runner.out, "device_check.md"), "w") as f:
        f.write(render_markdown(report))
    return report


def pack_logs(out: str) -> None:
    """Replaces DIR/logs by DIR/logs.tar.gz."""
    logs = os.path.join(out, "logs")
    with tarfile.open(os.path.join(out, "logs.tar.gz"), "w:gz") as tar:
        tar.add(logs, arcname="logs")
    shutil.rmtree(logs)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.getcwd(), "out"),
                        help="output folder (default: $OUT, else ./out)")
    parser.add_argument("--full", action="store_true",
                        help=f"the full benchmark set: every mode and provider, the Triton schedule variants, the "
                             f"models' training step, then the compiled providers (default budget {FULL_BUDGET_S}s)")
    parser.add_argument("--quick", action="store_true", help="skip slow tests, benchmark the forward alone, fewer reps")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (hides GPUs; no CUDA build)")
    parser.add_argument("--sanitize", action="store_true",
                        help="build, then run the CUDA and Triton kernel tests under compute-sanitizer "
                             "(memcheck, racecheck) instead of tests and benchmarks")
    parser.add_argument("--no-build", action="store_true", help="skip building the extension")
    parser.add_argument("--pack-logs", action="store_true", help="replace DIR/logs by DIR/logs.tar.gz at the end")
    parser.add_argument("--tests-k", metavar="EXPR",
                        help="run only the tests pytest -k EXPR selects (a rerun of "
                             "what an earlier run found, leaving the budget to the benchmarks)")
    parser.add_argument("--bench", metavar="LIST",
                        help=f"the benchmark runs to make, in this order (comma-separated: {', '.join(BENCH_RUNS)}; "
                             "default: every op, then models, then with --full the compiled providers)")
    parser.add_argument("--skip-tests", action="store_true",
                        help="skip the tests (a run for the benchmarks alone)")
    parser.add_argument("--skip-bench", action="store_true",
                        help="skip the ceilings, the large case and the benchmarks (a run for the tests alone, "
                             "which then get the whole budget)")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"total seconds for every step (default {DEFAULT_BUDGET_S}, with --full "
                             f"{FULL_BUDGET_S}, with --sanitize {SANITIZE_BUDGET_S})")
    parser.add_argument("--probe", choices=sorted(PROBES), help=argparse.SUPPRESS)
    parser.add_argument("--probe-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        args.bench = bench_selection(args.bench) if args.bench is not None else None
    except ValueError as err:
        parser.error(str(err))

    if args.probe:
        data = PROBES[args.probe](args)
        with open(args.probe_out, "w") as f:
            json.dump(data, f, indent=1, default=str)
        print(json.dumps(data, indent=1, default=str))
        return 0

    if args.budget is None:
        args.budget = SANITIZE_BUDGET_S if args.sanitize else FULL_BUDGET_S if args.full else DEFAULT_BUDGET_S
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    relative = results_folder("cpu" if args.cpu else (_gpu_name() or "unknown-gpu"), date, _git_commit())
    out = os.path.join(os.path.abspath(args.out), relative)
    if os.path.exists(out):
        shutil.rmtree(out)
    runner = Runner(out, args.budget, cpu=args.cpu, quick=args.quick, tests_k=args.tests_k, bench=args.bench,
                    skip_tests=args.skip_tests, skip_bench=args.skip_bench, full=args.full)
    mode = ("cpu" if args.cpu else "gpu") + (" full" if args.full else "") + (" quick" if args.quick else "")
    mode += " sanitize" if args.sanitize else ""
    mode += f", tests -k {args.tests_k!r}" if args.tests_k else ""
    mode += ", no tests" if args.skip_tests else ""
    mode += ", no benchmarks" if args.skip_bench else ""
    mode += f", bench {','.join(args.bench)}" if args.bench else ""
    runner.say(f"device check ({mode}) in {ROOT}; results in {out} (commit them as bench/results/{relative}/); "
               f"budget {args.budget:.0f}s")
    result: dict = {"env": {}}
    try:
        result = run_steps(runner, args.no_build, args.sanitize)
    except Exception as err:  # noqa: BLE001 - still write what was gathered
        runner.record(Step("runner", "failed", 0.0, f"{type(err).__name__}: {err}"))
    report = finish(runner, result, mode)
    if args.pack_logs:
        pack_logs(out)
    runner.say(f"done: {report['status']}; {len(report['benchmarks'])} benchmark results; "
               f"see {os.path.join(out, 'device_check.md')}")
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
