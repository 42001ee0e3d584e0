"""Whole models, stock and patched: the demo (a real photo) and `python -m vitkernels bench`."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from . import backends
from .integrations import apply

DEMO_MODELS = ("swin_tiny_patch4_window7_224", "vit_base_patch16_224")
ZOOS = ("timm", "transformers", "torchvision")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(size: int = 224) -> torch.Tensor:
    """scikit-image's cat photo, resized to size x size and normalized as ImageNet models expect: [1, 3, S, S]."""
    from skimage import data

    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True)
    return (image - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


class _Logits(torch.nn.Module):
    """Hugging Face models return an output object; this returns its logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).logits


def check_model(name: str, zoo: str = "timm") -> None:
    """Raises ValueError unless ``zoo`` is known and can build ``name`` (see :func:`build`)."""
    if zoo == "timm":
        import timm

        known, listing = timm.is_model(name), "timm.list_models()"
    elif zoo == "torchvision":
        import torchvision

        known, listing = name in torchvision.models.list_models(), "torchvision.models.list_models()"
    elif zoo == "transformers":
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        known, listing = name in CONFIG_MAPPING, "model types such as vit, deit, swin, swinv2"
    else:
        raise ValueError(f"zoo must be one of {ZOOS}, got {zoo!r}")
    if not known:
        raise ValueError(f"{zoo} has no model {name!r} ({listing})")


def build(name: str, zoo: str = "timm") -> tuple[torch.nn.Module, int]:
    """A randomly initialized model (seed 0; no weights are fetched) and its input size.

    ``name`` is a timm model name, a torchvision builder name (``swin_t``, ``vit_b_16``) or a
    Hugging Face model type (``vit``, ``deit``, ``swin``, ``swinv2``: default config).
    """
    check_model(name, zoo)
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        return model, model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    if zoo == "torchvision":
        import torchvision

        return getattr(torchvision.models, name)(weights=None), 224
    if zoo == "transformers":
        import transformers

        config = transformers.AutoConfig.for_model(name)
        return _Logits(transformers.AutoModelForImageClassification.from_config(config)), config.image_size


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
    batch: int
    ms: float = 0.0
    max_logit_diff: float = 0.0
    replaced: int = 0
    note: str = ""

    @property
    def images_per_s(self) -> float:
        return self.batch / self.ms * 1e3 if self.ms else 0.0


def _train_step(model: torch.nn.Module, x: torch.Tensor, classes: int) -> Callable[[], None]:
    """One training step on ``x``: forward, cross-entropy against fixed random labels, backward, AdamW."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    labels = torch.randint(0, classes, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)

    def step() -> None:
        torch.nn.functional.cross_entropy(model(x).float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _time(model: torch.nn.Module, x: torch.Tensor, repeats: int, train: bool) -> tuple[torch.Tensor, float]:
    """The logits of ``model`` on ``x`` (before any training step) and the median ms of inference or a step."""
    with torch.inference_mode():
        logits = model(x)
        if not train:
            return logits, _median_ms(lambda: model(x), repeats, x.device)
    step = _train_step(model, x, logits.shape[-1])
    step()  # warm-up: AdamW creates its state on the first step
    return logits, _median_ms(step, repeats, x.device)


def run(models: Iterable[str] = DEMO_MODELS, *, zoo: str = "timm", device: str | None = None, batch: int = 1,
        dtype: torch.dtype = torch.float32, repeats: int = 3, train: bool = False,
        progress: Callable[[Iterable], Iterable] = lambda it: it) -> list[ModelRow]:
    """Inference (or, with ``train``, a training step) of each model on the photo, stock and patched
    with every backend available here.

    Rows carry the median time, the largest logit difference to the stock model and how many
    modules were replaced; a backend that cannot run a model gets a row with the reason. A
    training step is forward, cross-entropy against random labels, backward and an AdamW update,
    each run on its own copy of the model.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [n for n in backends.PRIORITY[device.type] if backends.unavailable_reason(n) is None]
    jobs = [(m, b) for m in models for b in ["stock", *names]]
    rows, stock = [], {}
    for model_name, backend in progress(jobs):
        if model_name not in stock:
            model, size = build(model_name, zoo)
            x = photo(size).repeat(batch, 1, 1, 1).to(device, dtype)
            stock[model_name] = (model.eval().to(device, dtype), x, None)
        model, x, reference = stock[model_name]
        row = ModelRow(model_name, backend, batch)
        rows.append(row)
        if backend != "stock" or train:
            model = copy.deepcopy(model)
        if backend != "stock":
            row.replaced = len(apply(model, backend=backend))
        try:
            logits, row.ms = _time(model, x, repeats, train)
        except backends.NotSupportedError as err:
            row.note = str(err).splitlines()[0]
            continue
        if reference is None:
            stock[model_name] = (stock[model_name][0], x, logits)
        else:
            row.max_logit_diff = (logits.float() - reference.float()).abs().max().item()
    return rows


def format_rows(rows: list[ModelRow]) -> str:
    stock_ms = {r.model: r.ms for r in rows if r.backend == "stock"}
    header = (f"{'model':<30} {'run':<7} {'replaced':>8} {'max |logit diff|':>17} {'median ms':>10} "
              f"{'images/s':>9} {'speedup':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.note:
            lines.append(f"{r.model:<30} {r.backend:<7} {r.replaced:>8}  skipped: {r.note}")
            continue
        speedup = stock_ms[r.model] / r.ms if r.ms else float("nan")
        lines.append(f"{r.model:<30} {r.backend:<7} {r.replaced:>8} {r.max_logit_diff:>17.2e} {r.ms:>10.1f} "
                     f"{r.images_per_s:>9.1f} {speedup:>7.2f}x")
    return "\n".join(lines)


def plot(rows: list[ModelRow], path: str, title: str) -> None:
    """A bar chart of images/s per run, one group per model, written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.ms]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(measured)), 3.5))
    ax.bar([f"{r.model}\n{r.backend}" for r in measured], [r.images_per_s for r in measured])
    ax.set_ylabel("images/s")
    ax.set_title(title)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
