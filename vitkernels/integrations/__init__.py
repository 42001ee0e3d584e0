"""Patching built models in place: vitkernels.apply(model) and vitkernels.revert(model).

A patch swaps a module's class for a fused subclass of it (vitkernels.nn), so parameters, buffers,
hooks and ``state_dict()`` stay exactly those of the original; ``revert`` swaps the class back.
Each zoo's integration module holds one table of :class:`Rule` s; a rule names the class it
replaces, the fused class, the fusions it can do, and checks that say why a module must be left
alone. A zoo whose convention is to select functions rather than modules (Hugging Face's
AttentionInterface) also provides ``apply_functions`` / ``revert_functions``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch.nn as nn

from .. import backends
from .. import ops as ops_module

FUSIONS = ("attention", "mlp", "patch_embed")
ZOOS = ("timm", "torchvision", "transformers")


@dataclass(frozen=True)
class Rule:
    """Replace modules of class ``original`` (exactly, not subclasses) by ``fused``.

    ``parts`` maps each fusion the fused class can do (a name of FUSIONS) to a check returning
    why this module cannot take it, or None. ``train_note`` says when the fused module runs its
    original forward in training mode (active dropout or drop-path).
    """

    original: type
    fused: type
    parts: dict[str, Callable[[nn.Module], Optional[str]]]
    train_note: Callable[[nn.Module], Optional[str]] = lambda module: None
    requires: dict[str, str] = field(default_factory=dict)  # part -> the part it can only run with
    ops: dict[str, str] = field(default_factory=dict)  # part -> the op it calls (default: the part's name)


@dataclass
class Entry:
    name: str
    kind: str
    action: str  # "replaced", "already patched" or "left"
    reason: str = ""  # why left, or what is fused and any training fallback


@dataclass
class Report:
    """What apply() did: ``len(report)`` modules replaced; ``str(report)`` a readable summary."""

    backend: str
    entries: list[Entry] = field(default_factory=list)

    @property
    def replaced(self) -> list[Entry]:
        return [e for e in self.entries if e.action == "replaced"]

    @property
    def left(self) -> list[Entry]:
        return [e for e in self.entries if e.action == "left"]

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for e in self.entries:
            counts[(e.kind, e.action)] = counts.get((e.kind, e.action), 0) + 1
        lines = [f"vitkernels.apply (backend={self.backend}): {len(self)} modules replaced"]
        for (kind, action), n in sorted(counts.items()):
            lines.append(f"  {action:<15} {n:>3} x {kind}")
        for e in self.entries:
            if e.reason:
                lines.append(f"  {e.action} {e.name or '<model>'} ({e.kind}): {e.reason}")
        return "\n".join(lines)


def _zoos() -> list:
    """The integration modules whose zoo is installed."""
    found = []
    for zoo in ZOOS:
        try:
            found.append(importlib.import_module(f"{__name__}.{zoo}"))
        except ImportError:
            continue
    return found


def _rules() -> list[Rule]:
    return [rule for zoo in _zoos() for rule in zoo.RULES]


def apply(model: nn.Module, backend: str = "auto", *, attention: bool = True, mlp: bool = True,
          patch_embed: bool = True) -> Report:
    """Patch ``model`` in place with fused modules; returns a :class:`Report`.

    Args:
        model: a built timm model (or any module containing supported blocks).
        backend: backend of the fused ops ("auto", "torch", "triton", "cuda", "cpu").
        attention, mlp, patch_embed: switch each fusion off with False.

    Applying twice changes nothing more; :func:`revert` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    backends.check_name(backend)
    enabled = {"attention": attention, "mlp": mlp, "patch_embed": patch_embed}
    rules = _rules()
    by_class = {rule.original: rule for rule in rules}
    fused_classes = {rule.fused for rule in rules}
    report = Report(backend)
    for name, module in model.named_modules():
        kind = type(module).__name__
        if type(module) in fused_classes:
            module.vk_backend = backend  # re-applying may change the backend, nothing else
            report.entries.append(Entry(name, kind, "already patched"))
            continue
        rule = by_class.get(type(module))
        if rule is None:
            continue
        reasons = {part: "switched off" if not enabled[part] else check(module) for part, check in rule.parts.items()}
        for part in reasons:
            op = rule.ops.get(part, part)
            if not reasons[part] and backend != "auto" and backend not in ops_module.backend_table(op):
                reasons[part] = f"backend {backend!r} has no {op} kernel"
        for part, needed in rule.requires.items():
            if not reasons[part] and reasons[needed]:
                reasons[part] = f"needs the {needed} fusion"
        fused = frozenset(part for part, reason in reasons.items() if not reason)
        if not fused:
            why = "; ".join(f"{part}: {reason}" for part, reason in reasons.items())
            report.entries.append(Entry(name, kind, "left", why))
            continue
        module.__class__ = rule.fused
        module.vk_backend, module.vk_parts = backend, fused
        notes = [f"{part} not fused ({reason})" for part, reason in reasons.items() if reason]
        notes += [note for note in (rule.train_note(module),) if note]
        report.entries.append(Entry(name, kind, "replaced", "; ".join(notes)))
    for zoo in _zoos():
        if hasattr(zoo, "apply_functions"):
            report.entries.extend(zoo.apply_functions(model, backend, enabled))
    return report


def revert(model: nn.Module) -> int:
    """Swap every fused module of ``model`` back to its original class; returns how many."""
    fused = {rule.fused: rule.original for rule in _rules()}
    count = 0
    for module in model.modules():
        original = fused.get(type(module))
        if original is not None:
            module.__class__ = original
            module.__dict__.pop("vk_backend", None)
            module.__dict__.pop("vk_parts", None)
            count += 1
    for zoo in _zoos():
        if hasattr(zoo, "revert_functions"):
            count += zoo.revert_functions(model)
    return count
