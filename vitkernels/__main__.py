"""python -m vitkernels {info,demo,check}"""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__, _demo, _ext, _models, backends, ops
from .testing import FORWARD_RTOL


def _info() -> int:
    print(f"vitkernels {__version__}  torch {torch.__version__}  python {platform.python_version()}")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"CUDA device: {cuda}")
    info = _ext.build_info()
    print("extension: " + (", ".join(f"{k}={v}" for k, v in info.items()) if info else "not loaded"))
    print("\nbackends:")
    for name in backends.BACKENDS:
        reason = backends.unavailable_reason(name)
        state = "available" if reason is None else f"unavailable: {reason}"
        implemented = [op for op in ops.OPS if name in ops.backend_table(op)]
        print(f"  {name:<7} {state}")
        print(f"  {'':<7} {backends.DESCRIPTIONS[name]}; ops: {', '.join(implemented) or 'none yet'}")
    print(f"\nselection: backend= argument, else use_backend(), else VITKERNELS_BACKEND, else auto "
          f"(order cuda: {backends.PRIORITY['cuda']}, cpu: {backends.PRIORITY['cpu']})")
    return 0


def _run_table(device: str | None) -> list[_demo.Row]:
    print("running every available backend of every op against the float64 reference ...", flush=True)
    rows = _demo.run(device, progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True))
    print(_demo.format_table(rows))
    return rows


def _demo_models(device: str | None) -> None:
    from tqdm import tqdm

    print("scikit-image's cat photo through timm Swin-T and ViT-B/16 (random weights, fixed seed), stock and "
          "patched with each available backend ...", flush=True)
    rows = _models.run(device, progress=lambda jobs: tqdm(jobs, desc="models", unit="run"))
    print(_models.format_rows(rows), end="\n\n")


def _check(device: str | None) -> int:
    rows = _run_table(device)
    bad = [r for r in rows if r.rel_error is not None and r.rel_error > FORWARD_RTOL]
    for r in bad:
        print(f"FAIL {r.op} on {r.backend}: relative error {r.rel_error:.2e} > {FORWARD_RTOL:.0e}")
    print("all backends agree with the reference" if not bad else f"{len(bad)} mismatches")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available here and why the others are not")
    for name, text in (("demo", "run every available backend of every op and print error and time"),
                       ("check", "like demo, exit non-zero when a backend disagrees with the reference")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "demo":
        _demo_models(args.device)
        _run_table(args.device)
        return 0
    return _check(args.device)


if __name__ == "__main__":
    sys.exit(main())
