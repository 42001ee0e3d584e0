"""python -m vitkernels {info,demo,check,bench,aot}"""
from __future__ import annotations

import argparse
import platform
import re
import sys

import torch

from . import __version__, _demo, _ext, _models, aot, backends, ops
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
    rows = _models.run(device=device, progress=lambda jobs: tqdm(jobs, desc="models", unit="run"))
    print(_models.format_rows(rows), end="\n\n")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    what = "training step (forward, backward, AdamW)" if args.train else "inference"
    title = f"{what}, {args.zoo} {args.model}, batch {args.batch}, {args.dtype}, {device}"
    print(f"{title}: stock and patched with each available backend, median of {args.repeats}", flush=True)
    rows = _models.run([args.model], zoo=args.zoo, device=device, batch=args.batch, dtype=DTYPES[args.dtype],
                       repeats=args.repeats, train=args.train,
                       progress=lambda jobs: tqdm(jobs, desc="runs", unit="run"))
    print(_models.format_rows(rows))
    if args.plot:
        _models.plot(rows, args.plot, title)
        print(f"plot written to {args.plot}")
    return 0


def _check(device: str | None) -> int:
    rows = _run_table(device)
    bad = [r for r in rows if r.rel_error is not None and r.rel_error > FORWARD_RTOL]
    for r in bad:
        print(f"FAIL {r.op} on {r.backend}: relative error {r.rel_error:.2e} > {FORWARD_RTOL:.0e}")
    print("all backends agree with the reference" if not bad else f"{len(bad)} mismatches")
    return 1 if bad else 0


def _aot(archs: list[int], match: str) -> int:
    aot.import_all_kernels()
    specs = [spec for spec in aot.registered() if re.search(match, spec.name)]
    print(f"compiling {len(specs)} Triton kernel specializations for {', '.join(f'sm_{a}' for a in archs)} ...",
          flush=True)
    try:
        results = aot.compile_specs(specs, archs)
    except aot.AOTCompileError as err:
        print(err)
        return 1
    width = max([len(r.name) for r in results] + [6])
    print(f"{'kernel':<{width}} {'arch':>5} {'shared KiB':>10} {'registers':>9} {'stack B':>7}")
    for r in sorted(results, key=lambda r: (r.name, r.arch)):
        registers = "?" if r.registers is None else r.registers
        stack = "?" if r.stack_bytes is None else r.stack_bytes
        print(f"{r.name:<{width}} {'sm_' + str(r.arch):>5} {r.shared / 1024:>10.1f} {registers:>9} {stack:>7}")
    spilling = [r for r in results if r.stack_bytes]
    print(f"{len(results)} compiled; {len(spilling)} with a stack frame per thread (in Triton kernels, spilled "
          "registers)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vitkernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends available here and why the others are not")
    for name, text in (("demo", "run every available backend of every op and print error and time"),
                       ("check", "like demo, exit non-zero when a backend disagrees with the reference")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    bench = sub.add_parser("bench", help="inference (or training-step) speed of one model, stock against patched "
                                         "with each backend")
    bench.add_argument("--model", required=True, help="timm name, torchvision builder or Hugging Face model type")
    bench.add_argument("--zoo", choices=_models.ZOOS, default="timm")
    bench.add_argument("--batch", type=int, default=8)
    bench.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    bench.add_argument("--repeats", type=int, default=5)
    bench.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when present")
    bench.add_argument("--train", action="store_true", help="time a training step (forward, backward, AdamW)")
    bench.add_argument("--plot", metavar="PNG", help="also write a bar chart of images/s")
    compile_check = sub.add_parser("aot", help="compile the Triton kernels ahead of time for GPU targets (no GPU "
                                               "needed) and print each one's shared memory, registers and stack")
    compile_check.add_argument("--arch", type=int, action="append", choices=sorted(aot.SHARED_MEMORY_LIMITS),
                               help="compute capability, major * 10 + minor (repeatable; default: 80 and 90)")
    compile_check.add_argument("--match", default="", help="only kernels whose name matches this regular expression")
    args = parser.parse_args(argv)
    if args.command == "aot":
        return _aot(args.arch or [80, 90], args.match)
    if args.command == "info":
        return _info()
    if args.command == "demo":
        _demo_models(args.device)
        _run_table(args.device)
        return 0
    if args.command == "bench":
        if args.batch < 1 or args.repeats < 1:
            parser.error(f"--batch and --repeats must be positive, got {args.batch} and {args.repeats}")
        try:
            _models.check_model(args.model, args.zoo)
        except ValueError as error:
            parser.error(f"--model: {error}")
        return _bench(args)
    return _check(args.device)


if __name__ == "__main__":
    sys.exit(main())
