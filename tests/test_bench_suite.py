"""The benchmark suite's own logic without timing anything: shapes, work, pools, ceilings, providers."""
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


@pytest.fixture(scope="module")
def bench(request):
    """The bench modules, imported as the benchmarks import them (bench/ on sys.path)."""
    sys.path.insert(0, BENCH)
    try:
        import cases
        import providers
        import shapes
        import timing

        yield type("Bench", (), {"cases": cases, "providers": providers, "shapes": shapes, "timing": timing})
    finally:
        sys.path.remove(BENCH)


def test_registry_holds_the_models_and_stages(bench):
    shapes = bench.shapes
    names = {s.name for s in shapes.WINDOW_ATTENTION}
    for name in ("swin_t.s1.w7.shifted", "swin_s.s3.w7", "swin_b.s2.w7.shifted", "swinv2_t_w8.s1.w8.shifted",
                 "swinv2_t_w16.s2.w16.shifted"):
        assert name in names
    assert "swin_t.s4.w7.shifted" not in names  # a 7x7 map is one window: no shift
    assert {s.name for s in shapes.ATTENTION} == {f"vit_{m}_{i}" for m in "sbl" for i in (224, 384)}
    assert shapes.by_name(shapes.ATTENTION, "vit_l_384").tokens == 577
    models = {s.name: s for s in shapes.MODELS}
    assert set(models) >= {"swin_t", "swin_s", "swin_b", "swinv2_t_w8", "swinv2_t_w16", "vit_b_384"}
    assert models["vit_l_384"].gpu_batch < models["vit_b_224"].gpu_batch
    quick = shapes.for_device(shapes.MODELS, "cpu")
    assert quick and all(s.batch == shapes.CPU_BATCH and "quick" in s.subsets for s in quick)
    assert all(s.batch == s.gpu_batch for s in shapes.for_device(shapes.MODELS, "cuda", "standard"))


def test_work_of_each_mode(bench):
    cases = bench.cases
    shape = bench.shapes.by_name(bench.shapes.TOKENS, "vit_b_224").scaled(4)
    fwd, both = (cases.work("layernorm", shape, 2, m) for m in ("fwd", "fwd+bwd"))
    bwd = cases.work("layernorm", shape, 2, "bwd")
    assert fwd.bytes == 2 * 4 * 197 * 768 * 2
    assert bwd.bytes == pytest.approx(both.bytes - fwd.bytes) and bwd.flops == pytest.approx(both.flops - fwd.flops)
    assert cases.metric("layernorm") == "GB/s" and cases.metric("attention") == "TFLOP/s"
    with pytest.raises(ValueError, match="sideways"):
        cases.work("layernorm", shape, 2, "sideways")


def test_selection_by_environment(bench, monkeypatch):
    monkeypatch.setenv("VITKERNELS_BENCH_MODES", "fwd, bwd")
    assert bench.cases.selected("VITKERNELS_BENCH_MODES", bench.cases.MODES) == ["fwd", "bwd"]
    monkeypatch.setenv("VITKERNELS_BENCH_MODES", "fwd,backwards")
    with pytest.raises(ValueError, match="backwards"):
        bench.cases.selected("VITKERNELS_BENCH_MODES", bench.cases.MODES)
    monkeypatch.delenv("VITKERNELS_BENCH_MODES")
    assert bench.cases.selected("VITKERNELS_BENCH_MODES", bench.cases.MODES) == list(bench.cases.MODES)


def test_pools_span_twice_the_l2_cache(bench):
    timing = bench.timing
    l2 = 50 * 2 ** 20
    assert timing.pool_size(10 * 2 ** 20, l2) == 10
    assert timing.pool_size(300 * 2 ** 20, l2) == 1
    assert timing.pool_size(1024, l2) == timing.MAX_POOL
    assert timing.pool_size(10 * 2 ** 20, 0) == 1  # CPU: no rotation
    assert timing.rounds_for(1.0, "cpu") == timing.MIN_ROUNDS
    assert timing.rounds_for(1e-6, "cuda") == timing.MAX_ROUNDS


def test_achieved_rates_relate_to_the_measured_ceilings(bench, tmp_path, monkeypatch):
    timing, work = bench.timing, bench.cases.Work(bytes=3e9, flops=4e12)
    monkeypatch.delenv("VITKERNELS_BENCH_CEILINGS", raising=False)
    assert timing.ceilings() == {}
    path = tmp_path / "ceilings.json"
    path.write_text(json.dumps({"copy_gbps": 3000.0, "matmul_tflops": 800.0, "copy_ms": 1.0}))
    monkeypatch.setenv("VITKERNELS_BENCH_CEILINGS", str(path))
    measured = timing.ceilings()
    assert measured == {"copy_gbps": 3000.0, "matmul_tflops": 800.0}
    memory = timing.achieved(work, 2e-3, "GB/s", measured)
    assert memory["value"] == pytest.approx(1500.0) and memory["fraction_of_ceiling"] == pytest.approx(0.5)
    compute = timing.achieved(work, 1e-2, "TFLOP/s", measured)
    assert compute["value"] == pytest.approx(400.0) and compute["fraction_of_ceiling"] == pytest.approx(0.5)
    assert "fraction_of_ceiling" not in timing.achieved(work, 1e-2, "TFLOP/s", {})
    with pytest.raises(ValueError, match="images/s"):
        timing.achieved(work, 1.0, "images/s", measured)


def test_graph_timing_reports_what_stopped_it(bench):
    """Without a GPU (or for a call that cannot be captured) the device time is an error to read, never
    an exception that would lose the rounds' median."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the capture would run")
    found = bench.timing.graph_time(lambda: None, 10)
    assert set(found) == {"graph_error"} and found["graph_error"], found


@pytest.mark.cuda
def test_graph_timing_on_a_gpu(bench):
    x = torch.randn(1 << 20, device="cuda")
    found = bench.timing.graph_time(lambda: x.mul_(1.0), 10)
    assert found.get("graph_seconds", 0) > 0, found
    refused = bench.timing.graph_time(lambda: x.sum().item(), 10)  # a synchronization cannot be captured
    assert set(refused) == {"graph_error"}, refused
    assert torch.equal(x.clone().add_(1), x + 1)  # the device works on after the refused capture


def _small(bench, name):
    """The named window shape on a map of two windows by two."""
    from dataclasses import replace

    shape = bench.shapes.by_name(bench.shapes.WINDOW_ATTENTION, name)
    return replace(shape, height=2 * shape.window, width=2 * shape.window)


@pytest.mark.parametrize("provider", ["eager", "eager-sdpa", "sdpa"])
@pytest.mark.parametrize("name", ["swin_t.s1.w7", "swin_t.s1.w7.shifted", "swinv2_t_w8.s1.w8.shifted"])
def test_window_attention_providers_match_the_reference(bench, provider, name):
    shape = _small(bench, name)
    inputs = bench.cases.make_inputs("window_attention", shape, "cpu", torch.float32, grad=False)
    try:
        fn = bench.providers.build(provider, "window_attention", shape, "cpu", torch.float32)
    except bench.providers.Unsupported as err:
        assert shape.cosine and "SwinV2" in str(err)
        return
    bench.cases.check_against_reference("window_attention", shape, fn, inputs, torch.float32, None)


@pytest.mark.parametrize("op,provider", [("attention", "eager"), ("attention", "eager-sdpa"), ("attention", "sdpa"),
                                         ("layernorm_mlp", "eager"), ("layernorm", "eager"),
                                         ("add_layernorm", "eager"), ("patch_embed", "eager")])
def test_token_providers_match_the_reference(bench, op, provider):
    from dataclasses import replace

    shape = replace(bench.shapes.for_device(bench.cases.OPS[op].shapes, "cpu", "quick")[0], batch=2)
    inputs = bench.cases.make_inputs(op, shape, "cpu", torch.float32, grad=False)
    fn = bench.providers.build(provider, op, shape, "cpu", torch.float32)
    bench.cases.check_against_reference(op, shape, fn, inputs, torch.float32, None)


def test_a_wrong_provider_is_caught(bench):
    shape = _small(bench, "swin_t.s1.w7.shifted")
    inputs = bench.cases.make_inputs("window_attention", shape, "cpu", torch.float32, grad=False)
    unshifted = bench.providers.build("sdpa", "window_attention", _small(bench, "swin_t.s1.w7"), "cpu", torch.float32)
    with pytest.raises(AssertionError, match="differs from the reference"):
        bench.cases.check_against_reference("window_attention", shape, unshifted, inputs, torch.float32, None)


def test_provider_skip_reasons(bench):
    providers = bench.providers
    assert "not attention" in providers.skip_reason("sdpa", "layernorm", "cuda")
    assert "GPU" in providers.skip_reason("compile-max-autotune", "attention", "cpu")
    assert providers.skip_reason("compile-max-autotune", "attention", "cuda") is None
    assert providers.skip_reason("eager", "patch_embed", "cpu") is None
    swinv2 = bench.shapes.by_name(bench.shapes.WINDOW_ATTENTION, "swinv2_t_w8.s1.w8")
    assert "SwinV2" in providers.describe("eager", "window_attention", swinv2)
    assert providers.describe("eager-sdpa", "attention", None) == \
        "timm Attention, fused_attn on (F.scaled_dot_product_attention)"
    assert providers.describe("compile", "layernorm", None) == "torch.compile of: nn.LayerNorm"
    with pytest.raises(ValueError, match="unknown provider"):
        providers.build("numpy", "attention", None, "cpu", torch.float32)


def test_outside_failures_are_skipped_and_backend_failures_raised(bench):
    with pytest.raises(pytest.skip.Exception, match="sdpa not timed: RuntimeError: no kernel"):
        with bench.cases.skip_outside_failures("sdpa"):
            raise RuntimeError("no kernel\nfor this shape")
    with pytest.raises(RuntimeError, match="no kernel"):
        with bench.cases.skip_outside_failures("cuda"):
            raise RuntimeError("no kernel")
    with bench.cases.skip_outside_failures("eager"):
        pass
