"""Every available backend of every op on small timm-shaped inputs, against the float64 reference."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import backends, ops
from .ops.attention.reference import attention_reference
from .ops.layernorm_mlp.reference import add_layernorm_reference, layernorm_mlp_reference, layernorm_reference
from .ops.patch_embed.reference import patch_embed_reference
from .ops.window_attention.reference import window_attention_reference
from .testing import errors


@dataclass
class Case:
    op: str
    shape: str
    make: Callable[[torch.device], tuple]  # -> (positional args, keyword args)
    reference: Callable


def _rand(device, *shape, scale=1.0):
    return torch.randn(*shape, device=device) * scale


def _window_attention(device):
    # Swin-T stage 3 block with a shifted window on a padded 15x15 map
    c, heads = 384, 12
    return ((_rand(device, 2, 15, 15, 3 * c), heads, (7, 7), (3, 3), _rand(device, 169, heads, scale=0.02)),
            {"qkv_bias": _rand(device, 3 * c, scale=0.02)})


def _attention(device):
    return (_rand(device, 2, 197, 3 * 384), 6), {}


def _patch_embed(device):
    e = 384
    return ((_rand(device, 2, 3, 224, 224), _rand(device, e, 3, 16, 16, scale=0.05), _rand(device, e)),
            {"prefix_tokens": _rand(device, 1, e), "pos_embed": _rand(device, 1, 197, e, scale=0.02)})


def _mlp(device):
    c = 384
    return ((_rand(device, 2, 197, c), 1 + _rand(device, c, scale=0.1), _rand(device, c, scale=0.1),
             _rand(device, 4 * c, c, scale=c**-0.5), _rand(device, 4 * c), _rand(device, c, 4 * c, scale=(4 * c) ** -0.5),
             _rand(device, c)), {"gamma": _rand(device, c, scale=0.1)})


def _layernorm(device):
    return (_rand(device, 2, 197, 384), 1 + _rand(device, 384, scale=0.1), _rand(device, 384)), {}


def _add_layernorm(device):
    return (_rand(device, 2, 197, 384), _rand(device, 2, 197, 384), 1 + _rand(device, 384, scale=0.1),
            _rand(device, 384)), {}


CASES = [
    Case("window_attention", "Swin-T stage 3, 15x15 map, window 7, shift 3", _window_attention,
         window_attention_reference),
    Case("attention", "ViT-S/16, N=197", _attention, attention_reference),
    Case("patch_embed", "ViT-S/16 224 + class token + pos", _patch_embed, patch_embed_reference),
    Case("layernorm_mlp", "ViT-S/16 MLP, LayerScale", _mlp, layernorm_mlp_reference),
    Case("layernorm", "ViT-S/16 LayerNorm", _layernorm, layernorm_reference),
    Case("add_layernorm", "ViT-S/16 add + LayerNorm", _add_layernorm, add_layernorm_reference),
]


def _to64(value):
    return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _first(result):
    return result[0] if isinstance(result, tuple) else result


@dataclass
class Row:
    op: str
    backend: str
    shape: str
    max_error: float | None = None
    rel_error: float | None = None
    ms: float | None = None
    note: str = ""


def run(device: str | None = None, repeats: int = 5, progress: Callable[[str], None] = lambda s: None) -> list[Row]:
    """Runs every (op, backend) pair; rows of skipped pairs carry the reason in ``note``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    rows = []
    for case in CASES:
        args, kwargs = case.make(device)
        expected = _first(case.reference(*(_to64(a) for a in args), **{k: _to64(v) for k, v in kwargs.items()}))
        table = ops.backend_table(case.op)
        query = backends.Query(device=device.type, dtype=torch.float32)
        for name in backends.BACKENDS:
            progress(f"{case.op} / {name}")
            row = Row(case.op, name, case.shape)
            rows.append(row)
            if backends.unavailable_reason(name) is not None:
                row.note = "backend unavailable (see below)"
                continue
            reasons = backends.not_supported_reasons(case.op, table, name, query)
            if reasons:
                row.note = "; ".join(reasons)
                continue
            fn = getattr(ops, case.op)
            with torch.no_grad():
                try:
                    out = _first(fn(*args, **kwargs, backend=name))
                except backends.NotSupportedError as err:
                    row.note = str(err).replace("\n", " ")
                    continue
                times = []
                for _ in range(repeats):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    fn(*args, **kwargs, backend=name)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) * 1e3)
            err = errors(out, expected)
            row.max_error, row.rel_error, row.ms = err.max_abs, err.rel, statistics.median(times)
    return rows


def format_table(rows: list[Row]) -> str:
    header = f"{'op':<17} {'backend':<7} {'max abs err':>11} {'rel err':>9} {'median ms':>10}  shape / note"
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.ms is None:
            lines.append(f"{r.op:<17} {r.backend:<7} {'-':>11} {'-':>9} {'-':>10}  skipped: {r.note}")
        else:
            lines.append(f"{r.op:<17} {r.backend:<7} {r.max_error:>11.2e} {r.rel_error:>9.2e} {r.ms:>10.2f}  {r.shape}")
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        if reason is not None:
            lines.append(f"{name} unavailable: {reason}")
    return "\n".join(lines)
