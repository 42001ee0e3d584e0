#!/usr/bin/env python
"""Table and plot of a measured run of bench/test_bench_cpu_models.py (pytest-benchmark JSON).

    python bench/plot_results.py bench/results/cpu/run7-quiet.json --png bench/results/cpu/run7-quiet.png

Prints a markdown table (median ms per variant of each benchmark group and the speedup of the cpu
backend over timm eager) and, with --png, writes a two-panel chart of the same medians: Swin-T
forward per variant, and the cpu backend's speedup over timm eager per span. Only what the JSON
holds is shown.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Optional

VARIANTS = ("timm-eager", "cpu-backend", "timm-compiled")
BASELINE, FUSED = "timm-eager", "cpu-backend"


def medians(bench: dict) -> dict[str, dict[str, float]]:
    """{group: {variant: median ms}} from a pytest-benchmark document."""
    groups: dict[str, dict[str, float]] = {}
    for b in bench.get("benchmarks", []):
        match = re.search(r"(" + "|".join(VARIANTS) + r")\]$", b.get("name", ""))
        if match and b.get("stats", {}).get("median"):
            groups.setdefault(b.get("group") or b["name"], {})[match.group(1)] = b["stats"]["median"] * 1e3
    return groups


def speedup(variants: dict[str, float]) -> Optional[float]:
    if variants.get(BASELINE) and variants.get(FUSED):
        return variants[BASELINE] / variants[FUSED]
    return None


def markdown(groups: dict[str, dict[str, float]]) -> str:
    lines = ["| benchmark | timm eager ms | cpu backend ms | torch.compile ms | eager / cpu |", "|---|---|---|---|---|"]
    for group, variants in groups.items():
        cells = [f"{variants[v]:.1f}" if v in variants else "" for v in VARIANTS]
        gain = speedup(variants)
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {'' if gain is None else f'{gain:.2f}x'} |")
    return "\n".join(lines)


def plot(groups: dict[str, dict[str, float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    whole = {g: v for g, v in groups.items() if len(v) > 2}
    parts = {g: v for g, v in groups.items() if len(v) <= 2 and speedup(v) is not None}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 2.2]})
    for group, variants in whole.items():
        names = [v for v in VARIANTS if v in variants]
        left.bar(names, [variants[v] for v in names], color=["tab:gray", "tab:green", "tab:blue"][:len(names)])
        left.set_title(group, fontsize=8)
    left.set_ylabel("median ms (lower is better)")
    left.tick_params(axis="x", labelsize=8)
    labels = [re.sub(r"^window attention span |, fp32.*$", "", g) for g in parts]
    gains = [speedup(v) for v in parts.values()]
    right.barh(labels, gains, color="tab:green")
    right.axvline(1.0, color="black", linewidth=0.8)
    for y, gain in enumerate(gains):
        right.text(gain, y, f" {gain:.2f}x", va="center", fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("timm eager median / cpu backend median (higher is better)")
    right.set_title("window attention spans and LayerNorm+MLP", fontsize=8)
    right.tick_params(axis="y", labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="pytest-benchmark JSON of bench/test_bench_cpu_models.py")
    parser.add_argument("--png", help="write the chart here")
    parser.add_argument("--title", default=None, help="chart title (default: the run's date and commit)")
    args = parser.parse_args(argv)
    with open(args.json) as f:
        bench = json.load(f)
    groups = medians(bench)
    if not groups:
        print(f"no benchmark of bench/test_bench_cpu_models.py in {args.json}", file=sys.stderr)
        return 1
    print(markdown(groups))
    if args.png:
        commit = (bench.get("commit_info") or {}).get("id", "unknown")[:7]
        plot(groups, args.png, args.title or f"CPU, {bench.get('datetime', '')[:16]} UTC, commit {commit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
