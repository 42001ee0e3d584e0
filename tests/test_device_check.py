"""bench/device_check.py without a GPU: its pure functions, and its runner with subprocesses replaced."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dc():
    name = "_device_check_under_test"
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", "device_check.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)


def _bench_entry(op, metric, median, *, bytes_=None, flops=None, shape="vit_b_224", backend="torch", mode="fwd"):
    return {
        "name": f"test_forward[{op}-{shape}-{backend}]",
        "stats": {"median": median},
        "extra_info": {"op": op, "shape": shape, "backend": backend, "mode": mode, "batch": 128,
                       "dtype": "bfloat16", "metric": metric, "bytes": bytes_, "flops": flops},
    }


FAKE_BENCH = {
    "machine_info": {"node": "gpu"},
    "benchmarks": [
        _bench_entry("layernorm", "GB/s", 1e-3, bytes_=2e9),  # 2000 GB/s
        _bench_entry("attention", "TFLOP/s", 2e-3, flops=8e11),  # 400 TFLOP/s
        _bench_entry("window_attention", "GB/s", None, bytes_=1e9),  # no timing (disabled run)
    ],
}
CEILINGS = {"copy_gbps": 3000.0, "matmul_tflops": 800.0}


def test_summarize_benchmarks_relates_results_to_ceilings(dc):
    rows = {r["op"]: r for r in dc.summarize_benchmarks(FAKE_BENCH, CEILINGS)}
    assert rows["layernorm"]["value"] == pytest.approx(2000.0)
    assert rows["layernorm"]["fraction_of_ceiling"] == pytest.approx(2 / 3)
    assert rows["layernorm"]["median_ms"] == pytest.approx(1.0)
    assert rows["attention"]["value"] == pytest.approx(400.0)
    assert rows["attention"]["fraction_of_ceiling"] == pytest.approx(0.5)
    assert rows["window_attention"]["value"] is None and rows["window_attention"]["fraction_of_ceiling"] is None
    assert dc.summarize_benchmarks(FAKE_BENCH, {})[0]["fraction_of_ceiling"] is None


def test_summary_carries_the_device_time_alone(dc):
    entry = _bench_entry("layernorm", "GB/s", 1e-3, bytes_=2e9)
    entry["extra_info"]["graph_seconds"] = 0.8e-3  # the rounds' median also held 0.2 ms of host path
    (row,) = dc.summarize_benchmarks({"benchmarks": [entry]}, CEILINGS)
    assert row["graph_ms"] == pytest.approx(0.8)
    assert row["graph_fraction_of_ceiling"] == pytest.approx(2500 / 3000)
    assert row["fraction_of_ceiling"] == pytest.approx(2 / 3)
    (untimed,) = dc.summarize_benchmarks({"benchmarks": [_bench_entry("layernorm", "GB/s", 1e-3, bytes_=2e9)]},
                                         CEILINGS)
    assert untimed["graph_ms"] is None and untimed["graph_fraction_of_ceiling"] is None
    text = dc.render_markdown({"env": {}, "steps": [], "benchmarks": [row, untimed]})
    assert "| device ms (graph) | of ceiling (graph) |" in text and "| 0.8 | 83.3% |" in text


def test_render_markdown_writes_every_section(dc):
    steps = [{"name": "env", "status": "ok", "seconds": 2.5, "detail": ""},
             {"name": "tests", "status": "failed", "seconds": 80.0, "detail": "1 failed | 20 passed in 70s"}]
    result = {
        "date": "2026-01-01T00:00:00+00:00", "mode": "gpu", "total_seconds": 300.0, "status": dc.overall_status(steps),
        "env": {"device_name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "2.11.0"},
        "ceilings": CEILINGS, "steps": steps, "benchmarks": dc.summarize_benchmarks(FAKE_BENCH, CEILINGS),
    }
    text = dc.render_markdown(result)
    assert text.startswith("# vitkernels device check — NVIDIA H100 80GB HBM3")
    assert "status **failed**" in text
    assert "| capability | 9.0 |" in text
    assert "| copy_gbps | 3000 |" in text
    assert "1 failed \\| 20 passed" in text  # a "|" in a cell must not split the row
    assert "| layernorm | fwd | vit_b_224 | torch | 128 | bfloat16 | 1 | 2e+03 GB/s | 66.7% |" in text
    assert "| attention | fwd | vit_b_224 | torch | 128 | bfloat16 | 2 | 400 TFLOP/s | 50.0% |" in text
    assert "Benchmarks (3)" in text
    empty = dc.render_markdown({"env": {}, "steps": [], "benchmarks": []})
    assert "No benchmark results." in empty


def test_overall_status(dc):
    assert dc.overall_status([{"status": "ok"}, {"status": "skipped"}]) == "ok"
    assert dc.overall_status([{"status": "ok"}, {"status": "timeout"}]) == "failed"


def test_step_timeouts_keep_time_for_later_steps(dc):
    caps, reserve = {"a": 100, "b": 50, "c": 500}, {"a": 10, "b": 20, "c": 90}
    assert dc.step_timeout("a", 400, ["b", "c"], caps, reserve) == 100
    assert dc.step_timeout("a", 150, ["b", "c"], caps, reserve) == 40
    assert dc.step_timeout("a", 50, ["b", "c"], caps, reserve) == 10  # its own reserve
    assert dc.step_timeout("a", 5, ["b", "c"], caps, reserve) == 5  # never past the budget
    assert dc.step_timeout("a", -1, ["b", "c"], caps, reserve) == 0
    assert dc.step_timeout("c", 300, [], caps, reserve) == 300
    assert dc.op_share(120, 6) == pytest.approx(40)
    assert dc.op_share(120, 1) == 120
    assert dc.op_share(-5, 3) == 0


def test_parsers(dc):
    assert dc.parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.88") == "13.0"
    assert dc.parse_nvcc_version("") is None
    output = "....s.\n=========== 5 passed, 1 skipped, 2 deselected in 3.21s ===========\n"
    assert dc.parse_pytest_summary(output) == "5 passed, 1 skipped, 2 deselected in 3.21s"
    assert dc.parse_pytest_summary("4 skipped, 110 deselected in 1.17s\n") == "4 skipped, 110 deselected in 1.17s"
    assert dc.parse_pytest_summary("no tests ran in 0.01s") == "no tests ran in 0.01s"
    assert dc.parse_pytest_summary("Traceback ...") == ""


def test_review_pytest_accepts_an_empty_selection(dc):
    step = dc.Step("tests", "failed", 1.0, "exit 5")
    dc.review_pytest(step, "\n1 deselected in 0.02s\nno tests ran in 0.02s\n")
    assert step.status == "ok" and step.detail == "no tests ran in 0.02s"
    step = dc.Step("tests", "failed", 1.0, "exit 1")
    dc.review_pytest(step, "1 failed, 3 passed in 1.00s\n")
    assert step.status == "failed" and step.detail == "1 failed, 3 passed in 1.00s; exit 1"


def test_merge_bench_json(dc):
    merged = dc.merge_bench_json([FAKE_BENCH, {"machine_info": {"node": "other"}, "benchmarks": [{"name": "x"}]}])
    assert merged["machine_info"] == {"node": "gpu"}
    assert [b["name"] for b in merged["benchmarks"]][-1] == "x" and len(merged["benchmarks"]) == 4
    assert dc.merge_bench_json([]) == {"benchmarks": []}


def test_run_with_timeout_logs_and_kills(dc, tmp_path):
    log_path = tmp_path / "step.log"
    with open(log_path, "w") as log:
        assert dc.run_with_timeout([sys.executable, "-c", "print('hello')"], dict(os.environ), log, 30) == 0
        assert dc.run_with_timeout([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), log,
                                   0.5) is None
        assert "No such file" in dc.run_with_timeout([str(tmp_path / "missing")], dict(os.environ), log, 5)
    assert "hello" in log_path.read_text()


def test_a_timed_out_step_is_interrupted_before_it_is_killed(dc, tmp_path):
    """SIGINT first, so that pytest-benchmark still writes what it measured."""
    script = ("import signal, sys, time\n"
              "signal.signal(signal.SIGINT, lambda *a: (print('interrupted', flush=True), sys.exit(2)))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    log_path = tmp_path / "step.log"
    with open(log_path, "w") as log:
        assert dc.run_with_timeout([sys.executable, "-c", script], dict(os.environ), log, 4.0, grace=1.0) is None
    assert "interrupted" in log_path.read_text()
    # a timeout shorter than three default graces still leaves a quarter of it to the interrupt
    with open(log_path, "w") as log:
        assert dc.run_with_timeout([sys.executable, "-c", script], dict(os.environ), log, 4.0) is None
    assert "interrupted" in log_path.read_text()


def test_runner_records_a_step_with_its_log(dc, tmp_path, capsys):
    runner = dc.Runner(str(tmp_path), budget=60, cpu=True, quick=True)
    step, output = runner.command("echo", [sys.executable, "-c", "print('3 passed in 0.10s')"], 30,
                                  review=dc.review_pytest)
    assert step.status == "ok" and step.detail == "3 passed in 0.10s" and "3 passed" in output
    log = (tmp_path / "logs" / "echo.log").read_text()
    assert log.startswith("$ ") and "\n3 passed in 0.10s\n" in log and "# ok: exit 0" in log
    skipped, _ = runner.command("late", [sys.executable, "-c", "pass"], 1)
    assert skipped.status == "skipped"
    assert "echo: ok" in capsys.readouterr().out
    assert [s.name for s in runner.steps] == ["echo", "late"]
    text = dc.render_markdown({"env": {}, "steps": [vars(s) for s in runner.steps], "benchmarks": []})
    assert "| echo | ok |" in text and "| late | skipped |" in text


def test_results_folder_names_gpu_date_and_commit(dc):
    assert dc.results_folder("NVIDIA H100 80GB HBM3", "2026-11-26T03:00:00+00:00", "4bdc99b692ac76fc") == \
        "h100-80gb-hbm3/2026-11-26-4bdc99b"
    assert dc.results_folder("cpu", "2026-11-26", "unknown") == "cpu/2026-11-26-unknown"
    assert dc.results_folder("NVIDIA H200", "2026-11-26", "4bdc99b692ac76fc-dirty") == "h200/2026-11-26-4bdc99b-dirty"
    assert dc.results_folder("", "", "") == "unknown/undated-unknown"


def test_sanitizer_verdicts(dc):
    assert dc.parse_sanitizer_summary("========= ERROR SUMMARY: 0 errors\n") == 0
    assert dc.parse_sanitizer_summary("ERROR SUMMARY: 1 error\nERROR SUMMARY: 12 errors") == 12
    assert dc.parse_sanitizer_summary("Traceback") is None
    clean = dc.Step("sanitize_memcheck", "ok", 5.0)
    dc.review_sanitizer(clean, "4 passed in 3.0s\n========= ERROR SUMMARY: 0 errors\n")
    assert clean.status == "ok" and clean.detail == "clean; 4 passed in 3.0s"
    racy = dc.Step("sanitize_racecheck", "failed", 5.0, "exit 3")
    dc.review_sanitizer(racy, "4 passed in 9.0s\n========= ERROR SUMMARY: 2 errors\n")
    assert racy.status == "failed" and racy.detail.startswith("2 errors; 4 passed")
    unfinished = dc.Step("sanitize_memcheck", "ok", 5.0)
    dc.review_sanitizer(unfinished, "")
    assert unfinished.status == "failed" and "no ERROR SUMMARY" in unfinished.detail
    cut = dc.Step("sanitize_racecheck", "timeout", 5.0, "killed after 194s")
    dc.review_sanitizer(cut, "========= COMPUTE-SANITIZER\n.s.s....s.F [ 29%]\n....\n")
    assert cut.status == "timeout" and "15 tests reached, no error reported in them" in cut.detail, cut.detail
    report = ("========= COMPUTE-SANITIZER\n..\n========= Invalid __global__ read of size 4 bytes\n"
              "=========     at window_attention_fwd+0x1a0\n.\n")
    assert dc.sanitizer_progress(report) == (3, 1)


@pytest.mark.parametrize("tool, dtypes", [("memcheck", {"fp16", "fp32"}), ("racecheck", {"fp16"})])
def test_sanitizer_command_runs_the_kernel_selection(dc, tool, dtypes):
    command = dc.sanitizer_command(tool, "/cuda/bin/compute-sanitizer")
    assert command[:3] == ["/cuda/bin/compute-sanitizer", "--tool", tool]
    assert command[command.index("pytest") + 1] == "tests/ops/test_window_attention.py"
    assert command[command.index("-m", command.index("pytest")) + 1] == "sanitize"
    assert command[command.index("-k") + 1] == dc.SANITIZE_K[tool]
    pytest_args = command[command.index("pytest") + 1:]
    selected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", *pytest_args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300).stdout
    for name in ("test_window_attention.py::test_matches_reference", "test_swinv2_cosine",
                 "test_attention.py::test_cuda_matches_reference", "test_layernorm_mlp.py::test_layernorm_mlp",
                 "test_layernorm_mlp.py::test_add_layernorm", "test_patch_embed.py::test_matches_reference"):
        assert name in selected and f"{name}[" in selected, name
    tests = [line for line in selected.splitlines() if "::" in line]
    assert tests and all(("cuda" in t or "triton" in t) and "bf16" not in t for t in tests)
    assert {dtype for dtype in ("fp16", "fp32") if any(dtype in t for t in tests)} == dtypes
    with pytest.raises(ValueError, match="initcheck"):
        dc.sanitizer_command("initcheck", "compute-sanitizer")


def _fake_runs(dc, monkeypatch, output: str, returncode=0):
    """Replaces every subprocess of the runner by one that prints ``output``; returns the commands seen."""
    seen = []

    def fake(command, env, log, timeout):
        seen.append((command, env))
        log.write(output)
        log.flush()
        return returncode

    monkeypatch.setattr(dc, "run_with_timeout", fake)
    return seen


def test_sanitize_mode_records_each_tools_verdict(dc, tmp_path, monkeypatch):
    seen = _fake_runs(dc, monkeypatch, "5 passed in 2.0s\n========= ERROR SUMMARY: 0 errors\n")
    monkeypatch.setattr(dc, "sanitizer_path", lambda: "/cuda/bin/compute-sanitizer")
    monkeypatch.setattr(dc, "_gpu_name", lambda: "NVIDIA H200")
    assert dc.main(["--sanitize", "--no-build", "--out", str(tmp_path), "--budget", "600"]) == 1  # env probe: no file
    (folder,) = (tmp_path / "h200").iterdir()
    report = json.loads((folder / "device_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["sanitize_memcheck"]["status"] == "ok" and steps["sanitize_memcheck"]["detail"].startswith("clean")
    assert steps["sanitize_racecheck"]["status"] == "ok"
    assert "tests" not in steps and "bench" not in report["mode"]
    tools = [c[c.index("--tool") + 1] for c, _ in seen if "--tool" in c]
    assert sorted(tools) == ["memcheck", "racecheck"]
    assert (folder / "device_check.log").read_text().count("sanitize_") >= 2
    assert "| sanitize_racecheck | ok |" in (folder / "device_check.md").read_text()


def test_missing_sanitizer_fails_the_step(dc, tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "sanitizer_path", lambda: None)
    runner = dc.Runner(str(tmp_path), budget=60, cpu=False, quick=True)
    step = dc.run_sanitizer(runner, "memcheck", [])
    assert step.status == "failed" and "compute-sanitizer not found" in step.detail


def test_bench_runs_pass_the_measured_ceilings(dc):
    runs = dc.bench_runs(cpu=False, quick=False, ceilings_path="/r/logs/ceilings.json", full=True)
    names = [name for name, _, _ in runs]
    assert names[:len(dc.OPS)] == [f"bench:{op}" for op in dc.OPS]
    assert "bench:models" in names and "bench:flex" in names and "bench:compile" in names
    assert all(env["VITKERNELS_BENCH_CEILINGS"] == "/r/logs/ceilings.json" for _, _, env in runs)
    args, ops_env = runs[names.index("bench:layernorm")][1:]
    assert ops_env["VITKERNELS_BENCH_MODES"] == "fwd,bwd,fwd+bwd"
    assert args == ["bench/test_bench_ops.py", "-k", "not test_host_path"]
    assert "flex" not in ops_env["VITKERNELS_BENCH_PROVIDERS"] and "torch" in ops_env["VITKERNELS_BENCH_PROVIDERS"]
    assert runs[names.index("bench:models")][1] == ["bench/test_bench_models.py"]
    quick = dc.bench_runs(cpu=True, quick=True, ceilings_path=None)
    assert "bench:flex" not in [name for name, _, _ in quick]
    assert all("VITKERNELS_BENCH_CEILINGS" not in env for _, _, env in quick)
    assert quick[0][2]["VITKERNELS_BENCH_MODES"] == "fwd"


def test_the_default_benchmarks_are_the_compact_set(dc):
    runs = {name: (args, env) for name, args, env in dc.bench_runs(cpu=False, quick=False, ceilings_path=None)}
    assert list(runs) == [f"bench:{op}" for op in dc.OPS] + ["bench:models", "bench:host"]
    args, env = runs["bench:window_attention"]
    assert args == ["bench/test_bench_ops.py", "-k", "not test_schedule_variant and not test_host_path"]
    assert env["VITKERNELS_BENCH_MODES"] == "fwd,bwd"
    assert env["VITKERNELS_BENCH_PROVIDERS"].split(",") == ["triton", "cuda", "eager-sdpa", "eager", "sdpa"]
    args, env = runs["bench:models"]
    assert args == ["bench/test_bench_models.py", "-k", "infer"]
    assert env["VITKERNELS_BENCH_MODEL_PROVIDERS"] == "stock,triton"
    on_cpu = {name: env for name, _, env in dc.bench_runs(cpu=True, quick=False, ceilings_path=None)}
    assert on_cpu["bench:layernorm"]["VITKERNELS_BENCH_PROVIDERS"].split(",")[0] == "cpu"
    assert on_cpu["bench:models"]["VITKERNELS_BENCH_MODEL_PROVIDERS"] == "stock,cpu"
    # the selection the runs' arguments make, collected by pytest on this machine
    ops_env = dict(os.environ, **runs["bench:attention"][1])
    selected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *runs["bench:attention"][0]],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=ops_env).stdout
    tests = [line for line in selected.splitlines() if "::" in line]
    assert tests and all("::test_op[" in t and "fwd+bwd" not in t for t in tests), selected[-2000:]
    assert {provider for provider in ("triton", "sdpa", "torch") if any(f"[{provider}-" in t for t in tests)} == {
        "triton", "sdpa"}, tests
    args, env = runs["bench:host"]
    selected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, **env)).stdout
    tests = [line for line in selected.splitlines() if "::" in line]
    assert tests and all("::test_host_path[" in t for t in tests), selected[-2000:]
    assert {op for op in dc.OPS if any(f"-{op}-host-inference]" in t for t in tests)} == set(dc.OPS), tests


def test_models_compile_run_times_torch_compile_of_the_stock_models(dc):
    runs = {name: (args, env) for name, args, env in dc.bench_runs(cpu=False, quick=False, ceilings_path=None,
                                                                   full=True)}
    args, env = runs["bench:models-compile"]
    assert args[0] == "bench/test_bench_models.py" and args[args.index("-k") + 1] == dc.COMPILED_MODELS
    assert env["VITKERNELS_BENCH_MODEL_PROVIDERS"] == "compile"
    assert list(runs)[-4:] == [f"bench:{name}" for name in dc.COMPILED_ORDER]
    assert "bench:models-compile" not in {name for name, _, _ in dc.bench_runs(False, True, None, full=True)}


def test_bench_selection_makes_the_named_runs_in_order(dc):
    runs = dc.bench_runs(cpu=False, quick=True, ceilings_path=None, selection=["attention", "compile", "models"])
    assert [name for name, _, _ in runs] == ["bench:attention", "bench:compile", "bench:models"]
    assert runs[1][2]["VITKERNELS_BENCH_PROVIDERS"] == "compile"
    assert dc.bench_selection(" window_attention, flex ") == ["window_attention", "flex"]
    for bad in ("window_attention,softmax", "", ","):
        with pytest.raises(ValueError, match="--bench takes a comma-separated list of window_attention"):
            dc.bench_selection(bad)


def test_bench_only_run_skips_the_tests(dc, tmp_path, monkeypatch):
    _fake_gpu_machine(dc, monkeypatch)
    assert dc.main(["--out", str(tmp_path), "--budget", "1000", "--skip-tests", "--bench", "layernorm,models"]) == 0
    (folder,) = (tmp_path / "h100-80gb-hbm3").iterdir()
    report = json.loads((folder / "device_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["tests"]["status"] == "skipped"
    assert [s["name"] for s in report["steps"] if s["name"].startswith("bench:")] == ["bench:layernorm",
                                                                                       "bench:models"]
    assert report["mode"] == "gpu, no tests, bench layernorm,models"
    with pytest.raises(SystemExit):
        dc.main(["--out", str(tmp_path), "--bench", "softmax"])


def test_tests_only_run_gives_the_tests_the_measurements_reserve(dc, tmp_path, monkeypatch):
    seen = _fake_gpu_machine(dc, monkeypatch)
    fake, timeouts = dc.run_with_timeout, {}

    def timed(command, env, log, timeout):
        timeouts[os.path.basename(log.name)] = timeout
        return fake(command, env, log, timeout)

    monkeypatch.setattr(dc, "run_with_timeout", timed)
    budget = dc.CAPS["tests"] + 5
    assert dc.main(["--out", str(tmp_path), "--budget", str(budget), "--no-build", "--skip-bench"]) == 0
    (folder,) = (tmp_path / "h100-80gb-hbm3").iterdir()
    report = json.loads((folder / "device_check.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert all(steps[name]["status"] == "skipped" for name in ("ceilings", "large", "bench"))
    assert report["benchmarks"] == []
    assert not any(arg.startswith("--benchmark-json=") for command, _ in seen for arg in command)
    assert timeouts["tests.log"] > dc.CAPS["tests"] - 5, timeouts
    assert report["mode"] == "gpu, no benchmarks"


def test_speedups_compare_the_best_fused_backend_with_each_provider(dc, tmp_path):
    def row(backend, kind, ms, shape="vit_b_224", mode="fwd"):
        return {"op": "attention", "mode": mode, "shape": shape, "backend": backend, "kind": kind, "median_ms": ms}

    rows = [row("torch", "vitkernels", 0.5), row("triton", "vitkernels", 2.0), row("cuda", "vitkernels", 1.0),
            row("eager", "baseline", 4.0), row("sdpa", "baseline", 1.5), row("eager", "baseline", None, mode="bwd")]
    gains = {g["provider"]: g for g in dc.speedups(rows)}
    assert set(gains) == {"eager", "sdpa"}
    assert gains["eager"]["backend"] == "cuda" and gains["eager"]["speedup"] == pytest.approx(4.0)
    assert gains["sdpa"]["speedup"] == pytest.approx(1.5)
    (path,) = dc.plot_speedups(list(gains.values()), str(tmp_path), "test")
    assert path.endswith("speedup_fwd.png") and os.path.getsize(path) > 1000
    assert dc.speedups([row("eager", "baseline", 4.0)]) == []


def test_summary_of_model_records_in_images_per_second(dc):
    bench = {"benchmarks": [{"name": "m", "stats": {"median": 0.5}, "extra_info": {
        "op": "model", "mode": "train", "shape": "swin_t", "backend": "cuda", "provider_kind": "vitkernels",
        "batch": 128, "metric": "images/s"}}]}
    (row,) = dc.summarize_benchmarks(bench, CEILINGS)
    assert row["value"] == pytest.approx(256.0) and row["fraction_of_ceiling"] is None and row["kind"] == "vitkernels"


def test_large_cases_pass_two_to_the_31_and_skip_without_memory(dc):
    cases = list(dc._large_cases(free_bytes=200 * 2 ** 30))
    assert [name for name, _, _ in cases] == ["window_attention", "layernorm"]
    assert all(elements > 2 ** 31 and why is None for _, elements, why in cases)
    assert all("GiB free" in why for _, _, why in dc._large_cases(free_bytes=2 * 2 ** 30))
    text = dc.render_markdown({"env": {}, "steps": [], "benchmarks": [],
                               "large": {"layernorm cuda": {"status": "ok", "detail": "error 1e-3"}}})
    assert "## Past 2^31 elements" in text and "| layernorm cuda | ok | error 1e-3 |" in text


PROBE_RESULTS = {
    "env": {"device_name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "torch": "2.11.0"},
    "extension": {"unavailable_reason": None, "has_cuda": True},
    "ceilings": CEILINGS,
    "large": {"layernorm cuda (2.15e9 elements)": {"status": "ok", "detail": "largest relative error 3e-03"}},
}


def _fake_gpu_machine(dc, monkeypatch):
    """Subprocesses that answer like a GPU machine: probes write their JSON, benchmark runs their records."""
    seen = []

    def fake(command, env, log, timeout):
        seen.append((command, env))
        if "--probe" in command:
            with open(command[command.index("--probe-out") + 1], "w") as f:
                json.dump(PROBE_RESULTS[command[command.index("--probe") + 1]], f)
        for arg in command:
            if arg.startswith("--benchmark-json="):
                op = env.get("VITKERNELS_BENCH_OPS", "model").split(",")[0]
                entries = [_bench_entry(op, "GB/s", 1e-3 * factor, bytes_=2e9, backend=backend)
                           for factor, backend in ((1, "cuda"), (3, "eager"))]
                for entry, kind in zip(entries, ("vitkernels", "baseline")):
                    entry["extra_info"]["provider_kind"] = kind
                with open(arg.split("=", 1)[1], "w") as f:
                    json.dump({"benchmarks": entries}, f)
        log.write("3 passed in 1.00s\n")
        return 0

    monkeypatch.setattr(dc, "run_with_timeout", fake)
    monkeypatch.setattr(dc, "_gpu_name", lambda: "NVIDIA H100 80GB HBM3")
    return seen


def test_gpu_test_steps_spread_over_xdist_workers(dc, monkeypatch):
    monkeypatch.setattr(dc.importlib.util, "find_spec", lambda name: object() if name == "xdist" else None)
    monkeypatch.setattr(dc.importlib.metadata, "version", lambda name: "3.8.0")
    assert dc.pytest_workers(cpu=False, cpu_count=16) == ["-n", "14", "--dist", "worksteal"]
    monkeypatch.setattr(dc.importlib.metadata, "version", lambda name: "3.1.0")
    assert dc.pytest_workers(cpu=False, cpu_count=16) == ["-n", "14"]
    assert dc.pytest_workers(cpu=False, cpu_count=64) == ["-n", "16"]
    assert dc.pytest_workers(cpu=False, cpu_count=4) == ["-n", "2"]
    assert dc.pytest_workers(cpu=False, cpu_count=3) == []
    assert dc.pytest_workers(cpu=True, cpu_count=16) == []
    monkeypatch.setattr(dc.importlib.util, "find_spec", lambda name: None)
    assert dc.pytest_workers(cpu=False, cpu_count=16) == []


def test_gpu_run_wires_every_step(dc, tmp_path, monkeypatch):
    seen = _fake_gpu_machine(dc, monkeypatch)
    assert dc.main(["--out", str(tmp_path), "--pack-logs"]) == 0
    (folder,) = (tmp_path / "h100-80gb-hbm3").iterdir()
    assert dc._git_commit()[:7] in folder.name
    report = json.loads((folder / "device_check.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert names[:7] == ["env", "build", "build_check", "tests", "ceilings", "large", "bench:window_attention"]
    assert "bench:models" in names and "bench:compile" not in names
    assert report["budget_seconds"] == dc.DEFAULT_BUDGET_S <= 7 * 60
    tests_command = next(command for command, _ in seen if "pytest" in command and "tests" in command)
    assert tests_command[tests_command.index("tests"):][:3] == ["tests", "-m", dc.TESTS_MARK]
    build_env = next(env for command, env in seen if "build_ext" in command)
    assert build_env["TORCH_CUDA_ARCH_LIST"] == "9.0"
    bench_envs = [env for command, env in seen if any(a.startswith("--benchmark-json=") for a in command)]
    assert all(env["VITKERNELS_BENCH_CEILINGS"].endswith("ceilings.json") for env in bench_envs)
    assert report["large"] == PROBE_RESULTS["large"]
    gains = {(g["op"], g["provider"]): g["speedup"] for g in report["speedups"]}
    assert gains[("layernorm", "eager")] == pytest.approx(3.0)
    assert sorted(report["plots"]) == ["speedup_fwd.png"]
    assert {p.name for p in folder.iterdir()} >= {"device_check.md", "device_check.json", "bench.json", "logs.tar.gz",
                                                 "device_check.log", "speedup_fwd.png"}
    assert "## Past 2^31 elements" in (folder / "device_check.md").read_text()


def test_full_run_adds_the_compiled_providers_in_a_larger_budget(dc, tmp_path, monkeypatch):
    seen = _fake_gpu_machine(dc, monkeypatch)
    assert dc.main(["--out", str(tmp_path), "--full", "--skip-tests"]) == 0
    (folder,) = (tmp_path / "h100-80gb-hbm3").iterdir()
    report = json.loads((folder / "device_check.json").read_text())
    names = [s["name"] for s in report["steps"]]
    assert names[-4:] == [f"bench:{name}" for name in dc.COMPILED_ORDER]
    assert report["budget_seconds"] == dc.FULL_BUDGET_S and report["mode"] == "gpu full, no tests"
    layernorm_env = next(env for command, env in seen if env.get("VITKERNELS_BENCH_OPS") == "layernorm"
                         and any(a.startswith("--benchmark-json=") for a in command))
    assert layernorm_env["VITKERNELS_BENCH_MODES"] == dc.FULL_MODES


def test_review_pytest_fails_a_run_that_lost_its_cuda_context(dc):
    from vitkernels.testing import CUDA_CONTEXT_LOST

    assert dc.CUDA_CONTEXT_LOST == CUDA_CONTEXT_LOST
    line = f"{CUDA_CONTEXT_LOST} during or before bench/test_bench_ops.py::test_op[cuda-x]: illegal address"
    step = dc.Step("bench:layernorm", "failed", 1.0, "exit 3")
    dc.review_pytest(step, f"....\n4 passed in 9.00s\n! _pytest.outcomes.Exit: {line} !\n")
    assert step.status == "failed" and step.detail == f"4 passed in 9.00s; exit 3; {line}"


def test_tests_k_selects_in_each_test_step(dc, tmp_path, monkeypatch):
    seen = []

    def command(self, name, command, timeout, extra_env=None, log_name=None, review=None):
        seen.append(command)
        return dc.Step(name, "ok"), ""

    monkeypatch.setattr(dc.Runner, "command", command)
    runner = dc.Runner(str(tmp_path), budget=60, cpu=True, quick=True, tests_k="swinv2 or fp32")
    dc._pytest_step(runner, "tests", ["tests", "-m", "device"], [])
    assert seen[-1][-4:] == ["-m", "(device) and not slow", "-k", "swinv2 or fp32"]
    dc._pytest_step(dc.Runner(str(tmp_path), budget=60, cpu=True, quick=False), "tests", ["tests/ops"], [])
    assert "-k" not in seen[-1] and seen[-1].count("-m") == 1  # python -m pytest


def test_git_commit_marks_a_working_tree_that_differs(dc, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git[:5] + ["init", "-q", str(repo)], check=True)
    (repo / "f.txt").write_text("one\n")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    monkeypatch.setattr(dc, "ROOT", str(repo))
    clean = dc._git_commit()
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (repo / "untracked.txt").write_text("x\n")
    assert dc._git_commit() == clean
    (repo / "f.txt").write_text("two\n")
    assert dc._git_commit() == clean + "-dirty"


def test_warm_up_compiles_the_timed_cases_in_parallel_first(dc, tmp_path, monkeypatch):
    runs = dc.bench_runs(cpu=False, quick=True, ceilings_path="/r/ceilings.json",
                         selection=["attention", "layernorm", "flex", "models"])
    args, env = dc.warm_run(runs, ["-n", "14"])
    assert args == ["bench/test_bench_ops.py", "bench/test_bench_models.py", "--benchmark-disable",
                    "-k", "not train and not test_schedule_variant and not test_host_path", "-n", "14"]
    assert env["VITKERNELS_BENCH_OPS"] == "attention,layernorm"
    assert env["VITKERNELS_BENCH_PROVIDERS"] == env["VITKERNELS_BENCH_MODEL_PROVIDERS"] == "triton"
    assert env["VITKERNELS_BENCH_MODES"] == "fwd" and env["VITKERNELS_BENCH_SHAPES"] == "quick"
    full, _ = dc.warm_run(dc.bench_runs(False, False, None, ["window_attention"], full=True), ["-n", "14"])
    assert full[full.index("-k") + 1] == "not train"
    assert dc.warm_run(runs, []) is None
    assert dc.warm_run(runs[2:3], ["-n", "14"]) is None  # compiled providers only
    models_only, _ = dc.warm_run(runs[3:], ["-n", "2"])
    assert models_only[0] == "bench/test_bench_models.py" and "bench/test_bench_ops.py" not in models_only

    seen = _fake_gpu_machine(dc, monkeypatch)
    monkeypatch.setattr(dc, "pytest_workers", lambda cpu, cpu_count=None: ["-n", "14"])
    assert dc.main(["--out", str(tmp_path), "--budget", "1000", "--skip-tests", "--bench", "layernorm"]) == 0
    (folder,) = (tmp_path / "h100-80gb-hbm3").iterdir()
    names = [s["name"] for s in json.loads((folder / "device_check.json").read_text())["steps"]]
    assert names[-2:] == ["bench_warm", "bench:layernorm"]
    warm_command = next(command for command, _ in seen if "--benchmark-disable" in command)
    assert not any(a.startswith("--benchmark-json") for a in warm_command)


def test_a_warm_up_out_of_time_does_not_fail_the_run(dc):
    step = dc.Step("bench_warm", "timeout", 80.0, "killed after 80s")
    dc.review_warm(step, "...\n3 passed in 70.00s\n")
    assert step.status == "ok" and "compile what it did not reach" in step.detail
    failed = dc.Step("bench_warm", "failed", 80.0, "exit 1")
    dc.review_warm(failed, "1 failed, 2 passed in 70.00s\n")
    assert failed.status == "failed"


CRASH_OUTPUT = """..Fatal Python error: Segmentation fault
[gw5] node down: Not properly terminated
FAILED
worker 'gw5' crashed while running 'tests/ops/test_x.py::test_y[short-mean]'
worker 'gw8' crashed while running 'tests/ops/test_x.py::test_y[short-rstd]'
2 failed, 10 passed in 9.00s
"""
GDB_OUTPUT = """Program received signal SIGSEGV, Segmentation fault.
0x00007ffff7e4 in std::ostream::sentry::sentry () from /lib/x86_64-linux-gnu/libstdc++.so.6
#0  0x00007ffff7e4 in std::ostream::sentry::sentry ()   from /lib/x86_64-linux-gnu/libstdc++.so.6
#1  0x00007fffe1a2 in c10::detail::_str<long> () from /work/main/vitkernels/_C.so
From                To                  Syms Read   Shared Object Library
0x00007ffff7e00000  0x00007ffff7f9a000  Yes         /lib/x86_64-linux-gnu/libstdc++.so.6
"""


def test_a_crashed_test_is_rerun_under_a_debugger(dc, tmp_path, monkeypatch):
    assert dc.crashed_tests(CRASH_OUTPUT) == ["tests/ops/test_x.py::test_y[short-mean]",
                                             "tests/ops/test_x.py::test_y[short-rstd]"]
    assert dc.crashed_tests("5 passed in 1.00s") == []
    assert dc.backtrace_frames(GDB_OUTPUT) == [
        "#0 0x00007ffff7e4 in std::ostream::sentry::sentry () from /lib/x86_64-linux-gnu/libstdc++.so.6",
        "#1 0x00007fffe1a2 in c10::detail::_str<long> () from /work/main/vitkernels/_C.so"]
    seen = []

    def fake(command, env, log, timeout):
        seen.append(command)
        log.write(GDB_OUTPUT if command[0].endswith("gdb") else CRASH_OUTPUT)
        return 0 if command[0].endswith("gdb") else 1

    monkeypatch.setattr(dc, "run_with_timeout", fake)
    monkeypatch.setattr(dc, "debugger_path", lambda: "/usr/bin/gdb")
    runner = dc.Runner(str(tmp_path), budget=300, cpu=False, quick=True)
    dc._pytest_step(runner, "tests", ["tests", "-m", "device"], ["ceilings"])
    steps = {s.name: s for s in runner.steps}
    assert steps["tests"].status == "failed"
    trace = steps["tests_backtrace"]
    assert trace.status == "ok" and trace.detail.startswith("tests/ops/test_x.py::test_y[short-mean]: #0 ")
    assert "c10::detail::_str<long>" in trace.detail
    assert seen[1][:2] == ["/usr/bin/gdb", "-batch"] and "tests/ops/test_x.py::test_y[short-mean]" in seen[1]
    for debugger_output, detail in (("[Inferior 1 (process 42) exited normally]\n", "no fault under the debugger"),
                                    ("ptrace: Operation not permitted.\n", "no backtrace")):
        monkeypatch.setattr(dc, "run_with_timeout", lambda command, env, log, timeout, text=debugger_output: (
            log.write(text if command[0].endswith("gdb") else CRASH_OUTPUT), 0)[1])
        dc._pytest_step(runner, "tests", ["tests"], [])
        assert detail in runner.steps[-1].detail and runner.steps[-1].name == "tests_backtrace"
    monkeypatch.setattr(dc, "debugger_path", lambda: None)
    dc._pytest_step(runner, "tests", ["tests"], [])
    assert runner.steps[-1].status == "skipped" and "no gdb or cuda-gdb" in runner.steps[-1].detail


def test_sanitizer_tools_run_side_by_side(dc, tmp_path, monkeypatch):
    import threading

    both_started = threading.Barrier(2, timeout=10)

    def fake(command, env, log, timeout):
        if "--tool" in command:
            both_started.wait()  # a tool run waiting for the other one fails here when they run in turn
        log.write("3 passed in 1.00s\n========= ERROR SUMMARY: 0 errors\n")
        return 0

    monkeypatch.setattr(dc, "run_with_timeout", fake)
    monkeypatch.setattr(dc, "sanitizer_path", lambda: "/cuda/bin/compute-sanitizer")
    runner = dc.Runner(str(tmp_path), budget=600, cpu=False, quick=True)
    dc.run_steps(runner, no_build=True, sanitize=True)
    steps = {s.name: s.status for s in runner.steps}
    assert steps["sanitize_memcheck"] == steps["sanitize_racecheck"] == "ok"


def test_gpu_tests_are_tests_ops_and_the_cuda_tests():
    selected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "-m", "device", "tests/ops/test_cpu_math.py", "tests/test_leaks.py",
                               "tests/test_errors.py"], cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    tests = [line for line in selected.splitlines() if "::" in line]
    files = {t.split("::")[0] for t in tests}
    assert files == {"tests/ops/test_cpu_math.py", "tests/test_leaks.py"}, selected[-2000:]
    assert all("test_cuda_allocated_memory_is_flat" in t for t in tests if t.startswith("tests/test_leaks.py"))
