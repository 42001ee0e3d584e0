"""The model part of the demo: a real photo through timm Swin-T and ViT-B/16, stock and patched."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import backends
from .integrations import apply

MODELS = ("swin_tiny_patch4_window7_224", "vit_base_patch16_224")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(size: int = 224) -> torch.Tensor:
    """scikit-image's cat photo, resized to size x size and normalized as ImageNet models expect: [1, 3, S, S]."""
    from skimage import data

    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    return (image - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


@dataclass
class ModelRow:
    model: str
    backend: str
    ms: float
    max_logit_diff: float = 0.0
    top1: int = -1
    replaced: int = 0
    note: str = ""


def run(device: str | None = None, batch: int = 1, repeats: int = 3, models: Iterable[str] = MODELS,
        progress: Callable[[Iterable], Iterable] = lambda it: it) -> list[ModelRow]:
    """Stock and patched (with every backend available on the device) logits and timings per model.

    Models are randomly initialized with a fixed seed (no pretrained weights are fetched), so the
    class predicted for the photo is arbitrary; what matters is that patched models agree.
    """
    import timm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = photo().repeat(batch, 1, 1, 1).to(device)
    names = [n for n in backends.PRIORITY[device.type] if backends.unavailable_reason(n) is None]
    jobs = [(m, b) for m in models for b in ["stock", *names]]
    rows, stock = [], {}
    for model_name, backend in progress(jobs):
        if model_name not in stock:
            torch.manual_seed(0)
            stock[model_name] = (timm.create_model(model_name, pretrained=False).eval().to(device), None)
        model, reference = stock[model_name]
        row = ModelRow(model_name, backend, 0.0)
        if backend != "stock":
            model = copy.deepcopy(model)
            report = apply(model, backend=backend)
            row.replaced = len(report)
        with torch.inference_mode():
            try:
                logits = model(x)
                row.ms = _median_ms(lambda: model(x), repeats, device)
            except backends.NotSupportedError as err:
                row.note = str(err).splitlines()[0]
                rows.append(row)
                continue
        if reference is None:
            stock[model_name] = (model, logits)
        else:
            row.max_logit_diff = (logits.float() - reference.float()).abs().max().item()
        row.top1 = int(logits.argmax(-1)[0])
        rows.append(row)
    return rows


def format_rows(rows: list[ModelRow]) -> str:
    stock_ms = {r.model: r.ms for r in rows if r.backend == "stock"}
    header = f"{'model':<30} {'run':<7} {'replaced':>8} {'max |logit diff|':>17} {'median ms':>10} {'speedup':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.note:
            lines.append(f"{r.model:<30} {r.backend:<7} {r.replaced:>8}  skipped: {r.note}")
            continue
        speedup = stock_ms[r.model] / r.ms if r.ms else float("nan")
        lines.append(f"{r.model:<30} {r.backend:<7} {r.replaced:>8} {r.max_logit_diff:>17.2e} {r.ms:>10.1f} "
                     f"{speedup:>7.2f}x")
    return "\n".join(lines)
