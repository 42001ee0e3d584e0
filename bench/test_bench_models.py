"""Whole timm models: inference images/s and one training step (forward, backward, AdamW).

Providers: ``stock`` (timm eager), ``compile`` (torch.compile of the stock model) and the model
patched by ``vitkernels.apply`` with each vitkernels backend (torch, triton, cuda, cpu). Models
and batches come from shapes.MODELS: the quick subset at batch 1 on CPU, the standard subset at
each model's ``gpu_batch`` on GPU (bf16 there, fp32 on CPU). Random weights (seed 0), random
images. Before timing, each provider's logits are checked once against the stock model run in
float64, under the tolerance policy of vitkernels/testing.py.

Each record's ``extra_info`` has ``metric`` "images/s" and its ``value`` (on a GPU, inference
also ``graph_value``, from the device's time alone: bench/timing.py's CUDA graph replay). Timing
as in test_bench_ops.py (bench/timing.py).

Run: ``pytest bench/test_bench_models.py -q``; ``VITKERNELS_BENCH_SHAPES`` picks the models and
``VITKERNELS_BENCH_MODEL_PROVIDERS=stock,cuda`` the providers.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch

import cases
import shapes
import timing
from vitkernels import apply, backends
from vitkernels.testing import LOW_PRECISION, assert_close

timm = pytest.importorskip("timm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PROVIDERS = ("stock", "compile") + backends.BACKENDS
MODES = ("infer", "train")
MODELS = shapes.for_device(shapes.MODELS, DEVICE)


def _model(shape: shapes.ModelShape, provider: str, device, dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(shape.model, pretrained=False).to(device, dtype)
    if provider in backends.BACKENDS:
        reason = backends.unavailable_reason(provider)
        if reason or (provider == "triton" and device != "cuda"):
            pytest.skip(reason or "Triton on CPU runs in the interpreter, whose timings say nothing")
        if not apply(model, backend=provider):
            pytest.skip(f"apply(backend={provider!r}) replaced nothing in {shape.model}")
    return model


_CHECKED: set = set()


def _check_once(shape, provider, model, fn, images, dtype) -> None:
    """The provider's logits against the stock model in float64.

    A wrong vitkernels backend fails the test; a wrong or failing torch.compile is skipped, not timed.
    """
    if (shape, provider) in _CHECKED:
        return
    torch.manual_seed(0)
    stock = timm.create_model(shape.model, pretrained=False).to(images.device).eval()
    model.eval()
    with torch.no_grad():
        expected = copy.deepcopy(stock).double()(images.double())
        low = stock.to(dtype)(images) if dtype in LOW_PRECISION else None
        with cases.skip_outside_failures(provider):
            assert_close(fn(images), expected, low_precision_reference=low, name=f"{shape.name} logits ({provider})")
    _CHECKED.add((shape, provider))


def _train_step(fn, model: torch.nn.Module):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(images, labels):
        loss = torch.nn.functional.cross_entropy(fn(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", MODELS, ids=[s.name for s in MODELS])
@pytest.mark.parametrize("provider", cases.selected("VITKERNELS_BENCH_MODEL_PROVIDERS", PROVIDERS))
def test_model(benchmark, shape, provider, mode, device, dtype):
    benchmark.group = f"model {mode} {shape.name}"
    model = _model(shape, provider, device, dtype)
    fn = torch.compile(model) if provider == "compile" else model
    images = torch.randn(shape.batch, 3, shape.image, shape.image, device=device).to(dtype)
    _check_once(shape, provider, model, fn, images, dtype)
    count = 1 if benchmark.disabled else timing.pool_size(images.numel() * images.element_size(),
                                                          timing.l2_bytes(device))
    pool = itertools.cycle([images] + [images.clone() for _ in range(count - 1)])
    if mode == "infer":
        model.eval()

        def call():
            with torch.no_grad():
                fn(next(pool))
    else:
        model.train()
        labels = torch.randint(0, model.num_classes, (shape.batch,), device=device)
        step = _train_step(fn, model)

        def call():
            step(next(pool), labels)

    # the case before the timing: a run interrupted during it still names what it measured
    benchmark.extra_info.update(
        op="model", shape=shape.name, model=shape.model, backend=provider,
        provider_kind="vitkernels" if provider in backends.BACKENDS else "baseline", mode=mode, batch=shape.batch,
        dtype=str(dtype).replace("torch.", ""), device=device, metric="images/s", input_pool=count,
    )
    # inference also replayed from a CUDA graph (the device's time alone); a training step's
    # optimizer is not capturable as built, and torch.compile brings graphs of its own
    timing.measure(benchmark, call, device, graph=mode == "infer" and provider != "compile")
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["value"] = shape.batch / stats.stats.median
    if benchmark.extra_info.get("graph_seconds"):
        benchmark.extra_info["graph_value"] = shape.batch / benchmark.extra_info["graph_seconds"]
