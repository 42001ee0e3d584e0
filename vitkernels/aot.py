"""Ahead-of-time compile check of the Triton kernels, for GPU targets, on a machine without a GPU.

A kernel file registers each specialization it launches, right after the ``@triton.jit``
definition::

    aot.register(_layernorm_fwd_kernel,
                 signature={"x_ptr": "*bf16:16", "out_ptr": "*bf16:16", "n_cols": "i32"},
                 constexprs={"BLOCK_N": 1024}, num_warps=4)

``compile_all(90)`` (or ``compile_all((80, 90))``) then runs Triton's whole pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with
the ptxas Triton ships) for ``GPUTarget("cuda", 90, 32)`` and raises :class:`AOTCompileError`
naming the kernel and the arch when a kernel fails to compile or needs more shared memory per
block than the arch allows (Triton itself only notices the latter when the kernel is loaded on
a device).

Under the Triton interpreter (``TRITON_INTERPRET=1``) ``@triton.jit`` returns an interpreted
function that the compiler cannot take, so the kernels are compiled in a fresh Python process
without the interpreter, which imports the kernel's module again. Such kernels must be module-level
attributes (as every kernel of this package is).

Signature types are Triton's strings: ``"*fp32"``, ``"*bf16"``, ``"i32"``, ``"i64"``, ``"fp32"``,
``"constexpr"``; constexpr arguments may be left out of ``signature``. A ``":16"`` suffix
(``"*bf16:16"``, ``"i32:16"``) declares the value divisible by 16, as Triton's launcher does at run
time for 16-byte-aligned tensors and for integers that are multiples of 16: write it wherever the
launch path guarantees it, since alignment decides vector widths, ``cp.async`` pipelining and so
the shared memory a kernel needs.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

# Largest dynamic shared memory one block may opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# in bytes, per compute capability (major * 10 + minor).
SHARED_MEMORY_LIMITS = {
    80: 163 * 1024,  # A100
    86: 99 * 1024,
    87: 163 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,  # H100, H200
    100: 227 * 1024,
    120: 99 * 1024,
}

# Pipeline depth of a specialization registered without one. Triton's own launch default is 3, which
# multiplies the shared buffers of a loop's loads: a launch that names no config passes this
# explicitly, so that what runs is what the check compiled.
NUM_STAGES = 2

# Seconds the out-of-process compile (interpreter mode) may take per kernel and arch.
WORKER_SECONDS_PER_JOB = 120


class AOTCompileError(RuntimeError):
    """A registered kernel failed to compile for an arch, or overflows its shared memory."""


@dataclass(frozen=True)
class KernelSpec:
    """One specialization of a ``@triton.jit`` kernel to compile ahead of time."""

    name: str
    kernel: Any = field(compare=False, repr=False)
    module: str
    qualname: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = NUM_STAGES
    options: dict[str, Any] = field(default_factory=dict)

    def compile_options(self) -> dict[str, Any]:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages, **self.options}

    def key(self) -> tuple:
        return (self.module, self.qualname, _freeze(self.signature), _freeze(self.constexprs),
                self.num_warps, self.num_stages, _freeze(self.options))


@dataclass(frozen=True)
class CompileResult:
    """What the compile of one spec for one arch produced."""

    name: str
    arch: int
    shared: int
    shared_limit: int
    num_warps: int
    num_stages: int
    cubin_bytes: int
    seconds: float
    # From the cubin's resource usage (cuobjdump -res-usage, shipped with Triton), None without the
    # tool: registers per thread, and the per-thread stack frame, where register spills go.
    registers: Optional[int] = None
    stack_bytes: Optional[int] = None


def _freeze(mapping: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in mapping.items()))


def shared_memory_limit(arch: int) -> int:
    """Bytes of shared memory one block may use on compute capability ``arch`` (80, 90, ...)."""
    if arch not in SHARED_MEMORY_LIMITS:
        raise ValueError(f"no shared memory limit known for sm_{arch}; known: "
                         f"{', '.join(f'sm_{a}' for a in sorted(SHARED_MEMORY_LIMITS))}")
    return SHARED_MEMORY_LIMITS[arch]


def interpreter_on() -> bool:
    """Whether ``@triton.jit`` currently returns interpreted functions (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs  # triton >= 3.4

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _python_function(kernel: Any):
    """The plain Python function under a JITFunction, InterpretedFunction, Autotuner or Heuristics."""
    fn = kernel
    for _ in range(8):
        if inspect.isfunction(fn):
            return fn
        fn = getattr(fn, "fn", None)
    raise TypeError(f"expected a @triton.jit kernel, got {type(kernel).__name__} {kernel!r}")


def _jit_function(kernel: Any):
    """The JITFunction under ``kernel`` (unwrapping autotune/heuristics), or None when interpreted."""
    from triton.runtime.jit import JITFunction

    obj = kernel
    for _ in range(8):
        if isinstance(obj, JITFunction):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def _constexpr_value(value: Any) -> Any:
    return getattr(value, "value", value) if type(value).__name__ == "constexpr" else value


def make_spec(kernel: Any, *, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = NUM_STAGES,
              name: Optional[str] = None, options: Optional[dict] = None) -> KernelSpec:
    """Checks a specialization against the kernel's arguments and returns it as a KernelSpec."""
    fn = _python_function(kernel)
    arg_names = list(inspect.signature(fn).parameters)
    constexprs = {k: _constexpr_value(v) for k, v in constexprs.items()}
    unknown = sorted((set(signature) | set(constexprs)) - set(arg_names))
    if unknown:
        raise ValueError(f"{fn.__name__}: {unknown} are not arguments of the kernel {arg_names}")
    missing = [a for a in arg_names if a not in signature and a not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: arguments {missing} need a type in signature or a value in constexprs")
    typed = [a for a in constexprs if signature.get(a, "constexpr") != "constexpr"]
    if typed:
        raise ValueError(f"{fn.__name__}: constexpr arguments {typed} must have type 'constexpr' in signature")
    unset = [a for a, ty in signature.items() if ty == "constexpr" and a not in constexprs]
    if unset:
        raise ValueError(f"{fn.__name__}: constexpr arguments {unset} need a value in constexprs")
    full_signature = {a: signature.get(a, "constexpr") for a in arg_names}
    for arg, ty in full_signature.items():
        if not isinstance(ty, str) or ty.partition(":")[2] not in ("", "16") or ty.startswith("constexpr:"):
            raise TypeError(f"{fn.__name__}: signature[{arg!r}] must be a Triton type such as '*fp32', "
                            f"'*bf16:16' or 'i32', got {ty!r}")
    if name is None:
        parts = [f"{k}={v}" for k, v in constexprs.items()] + [f"num_warps={num_warps}", f"num_stages={num_stages}"]
        name = f"{fn.__name__}[{', '.join(parts)}]"
    return KernelSpec(name=name, kernel=kernel, module=fn.__module__, qualname=fn.__qualname__,
                      signature=full_signature, constexprs=dict(constexprs), num_warps=int(num_warps),
                      num_stages=int(num_stages), options=dict(options or {}))


class Registry:
    """Kernel specializations to compile ahead of time, by name."""

    def __init__(self) -> None:
        self._specs: dict[str, KernelSpec] = {}

    def register(self, kernel: Any, *, signature: dict, constexprs: dict, num_warps: int = 4,
                 num_stages: int = NUM_STAGES, name: Optional[str] = None,
                 options: Optional[dict] = None) -> KernelSpec:
        """Adds one specialization of ``kernel``; returns its spec.

        ``name`` defaults to the kernel's name with its constexprs, warps and stages. Registering the
        same spec again (a module imported twice) is a no-op; another spec under a taken name is
        an error.
        """
        spec = make_spec(kernel, signature=signature, constexprs=constexprs, num_warps=num_warps,
                         num_stages=num_stages, name=name, options=options)
        old = self._specs.get(spec.name)
        if old is not None and old.key() != spec.key():
            raise ValueError(f"a different kernel specialization is already registered as {spec.name!r}")
        self._specs[spec.name] = spec
        return spec

    def registered(self) -> list[KernelSpec]:
        return list(self._specs.values())

    def compile_all(self, arch: Union[int, Sequence[int]]) -> list[CompileResult]:
        """Compiles every registered spec for ``arch`` (an int or several); see :func:`compile_specs`."""
        return compile_specs(self.registered(), arch)


def compile_specs(specs: Iterable[KernelSpec], arch: Union[int, Sequence[int]]) -> list[CompileResult]:
    """Compiles each spec for each arch; raises one AOTCompileError listing every failure."""
    archs = [arch] if isinstance(arch, int) else list(arch)
    for a in archs:
        shared_memory_limit(a)
    jobs = [(spec, a) for spec in specs for a in archs]
    if not jobs:
        return []
    if interpreter_on() or any(_jit_function(spec.kernel) is None for spec, _ in jobs):
        outcomes = _compile_out_of_process(jobs)
    else:
        outcomes = [_compile_in_process(spec, a) for spec, a in jobs]
    results = [o for o in outcomes if isinstance(o, CompileResult)]
    errors = [o for o in outcomes if isinstance(o, str)]
    if len(jobs) == 1 and errors:
        raise AOTCompileError(errors[0])
    if errors:
        raise AOTCompileError(f"{len(errors)} of {len(jobs)} ahead-of-time compiles failed:\n"
                              + "\n".join(f"  - {e}" for e in errors))
    return results


def compile_one(spec: KernelSpec, arch: int) -> CompileResult:
    """Compiles one spec for one arch; raises AOTCompileError naming both when it fails."""
    return compile_specs([spec], arch)[0]


def _ast_source(fn, signature: dict, constexprs: dict):
    """Triton's ASTSource; ``"type:16"`` entries become plain types plus a divisibility-16 attribute."""
    from triton.compiler import ASTSource

    types, attrs = {}, {}
    for index, (arg, ty) in enumerate(signature.items()):
        base, _, hint = ty.partition(":")
        types[arg] = base
        if hint == "16":
            attrs[(index,)] = [["tt.divisibility", 16]]
    params = inspect.signature(ASTSource.__init__).parameters
    keyword = "constexprs" if "constexprs" in params else "constants"  # older releases call it constants
    return ASTSource(fn=fn, signature=types, attrs=attrs, **{keyword: constexprs})


def _gpu_target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


def _compile_in_process(spec: KernelSpec, arch: int) -> Union[CompileResult, str]:
    """A CompileResult, or the error line naming the kernel and arch."""
    import triton

    fn = _jit_function(spec.kernel)
    limit = shared_memory_limit(arch)
    start = time.perf_counter()
    try:
        compiled = triton.compile(_ast_source(fn, spec.signature, spec.constexprs), target=_gpu_target(arch),
                                  options=spec.compile_options())
    except Exception as err:  # noqa: BLE001 - any compiler failure is reported with the kernel's name
        detail = f"{type(err).__name__}: {err}".strip()
        return f"{spec.name} for sm_{arch}: compilation failed: {detail}"
    shared = int(compiled.metadata.shared)
    if shared > limit:
        return (f"{spec.name} for sm_{arch}: needs {shared} bytes of shared memory per block, more than "
                f"the {limit} bytes an sm_{arch} block may use; use smaller tiles or fewer stages")
    cubin = compiled.asm.get("cubin") or b""
    if not cubin:
        return f"{spec.name} for sm_{arch}: the compiler produced no cubin"
    registers, stack = _resource_usage(cubin)
    return CompileResult(name=spec.name, arch=arch, shared=shared, shared_limit=limit, num_warps=spec.num_warps,
                         num_stages=spec.num_stages, cubin_bytes=len(cubin), seconds=time.perf_counter() - start,
                         registers=registers, stack_bytes=stack)


def _cuobjdump() -> Optional[str]:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def _resource_usage(cubin: bytes) -> tuple[Optional[int], Optional[int]]:
    """(registers per thread, stack frame bytes per thread) of a cubin's kernel, or Nones."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory(prefix="vitkernels-cubin-") as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        try:
            report = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None, None
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    return (int(found.group(1)), int(found.group(2))) if found else (None, None)


# --- out-of-process compile, for kernels defined while the interpreter was on ---------------------


def _encode_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        import triton.language as tl

        if isinstance(value, tl.dtype):
            return {"tl.dtype": value.name}
    except ImportError:
        pass
    raise TypeError(f"constexpr value {value!r} of type {type(value).__name__} cannot be sent to the "
                    "compile process (use int, float, bool, str, None or a tl dtype)")


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict) and "tl.dtype" in value:
        import triton.language as tl

        return tl.dtype(value["tl.dtype"])
    return value


def _module_file(module: str) -> Optional[str]:
    loaded = sys.modules.get(module)
    return getattr(loaded, "__file__", None)


def _compile_out_of_process(jobs: list[tuple[KernelSpec, int]]) -> list[Union[CompileResult, str]]:
    payload = {
        "sys_path": [p for p in sys.path if p],
        "jobs": [
            {
                "name": spec.name, "module": spec.module, "file": _module_file(spec.module),
                "qualname": spec.qualname, "signature": spec.signature,
                "constexprs": {k: _encode_value(v) for k, v in spec.constexprs.items()},
                "num_warps": spec.num_warps, "num_stages": spec.num_stages, "options": spec.options,
                "arch": arch,
            }
            for spec, arch in jobs
        ],
    }
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="vitkernels-aot-") as tmp:
        request, answer = os.path.join(tmp, "request.json"), os.path.join(tmp, "answer.json")
        with open(request, "w") as f:
            json.dump(payload, f)
        command = [sys.executable, "-c", "from vitkernels.aot import _worker_main; _worker_main()", request, answer]
        env["PYTHONPATH"] = os.pathsep.join(payload["sys_path"])
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=WORKER_SECONDS_PER_JOB * len(jobs) + 60)
        except subprocess.TimeoutExpired:
            return [f"{spec.name} for sm_{arch}: the compile process timed out" for spec, arch in jobs]
        if proc.returncode != 0 or not os.path.exists(answer):
            tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
            return [f"{spec.name} for sm_{arch}: the compile process exited with {proc.returncode}: {tail}"
                    for spec, arch in jobs]
        with open(answer) as f:
            answers = json.load(f)
    return [CompileResult(**a) if isinstance(a, dict) else a for a in answers]


def _import_module(module: str, path: Optional[str]):
    try:
        return importlib.import_module(module)
    except ImportError:
        if path is None:
            raise
    spec = importlib.util.spec_from_file_location(module, path)
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def _resolve(module_name: str, path: Optional[str], qualname: str):
    obj = _import_module(module_name, path)
    for part in qualname.split("."):
        if part == "<locals>" or not hasattr(obj, part):
            raise LookupError(f"{module_name}.{qualname} is not a module-level attribute, so the compile process "
                              "cannot import it; define the kernel at module level")
        obj = getattr(obj, part)
    return obj


def _worker_job(job: dict) -> Union[dict, str]:
    where = f"{job['name']} for sm_{job['arch']}"
    try:
        kernel = _resolve(job["module"], job["file"], job["qualname"])
    except Exception as err:  # noqa: BLE001
        return f"{where}: cannot import the kernel: {type(err).__name__}: {err}"
    if _jit_function(kernel) is None:
        return f"{where}: {job['module']}.{job['qualname']} is not a @triton.jit function"
    spec = KernelSpec(name=job["name"], kernel=kernel, module=job["module"], qualname=job["qualname"],
                      signature=job["signature"],
                      constexprs={k: _decode_value(v) for k, v in job["constexprs"].items()},
                      num_warps=job["num_warps"], num_stages=job["num_stages"], options=job["options"])
    outcome = _compile_in_process(spec, job["arch"])
    return outcome.__dict__ if isinstance(outcome, CompileResult) else outcome


def _worker_main() -> None:
    """Entry of the compile process: argv = request.json answer.json."""
    os.environ.pop("TRITON_INTERPRET", None)
    request, answer = sys.argv[1], sys.argv[2]
    with open(request) as f:
        payload = json.load(f)
    sys.path[:0] = [p for p in payload["sys_path"] if p not in sys.path]
    answers = [_worker_job(job) for job in payload["jobs"]]
    with open(answer, "w") as f:
        json.dump(answers, f)


# --- the package's registry ------------------------------------------------------------------------

_REGISTRY = Registry()


def register(kernel: Any, *, signature: dict, constexprs: dict, num_warps: int = 4, num_stages: int = NUM_STAGES,
             name: Optional[str] = None, options: Optional[dict] = None) -> KernelSpec:
    """Registers one specialization of a ``@triton.jit`` kernel with the package's registry.

    Args:
        kernel: the ``@triton.jit`` function (or an autotuned one; the jit function under it is used).
        signature: {argument: Triton type string} for the runtime arguments ("*bf16", "i32", ...).
        constexprs: {argument: value} for the ``tl.constexpr`` arguments (ints, floats, bools, str,
            tl dtypes).
        num_warps, num_stages: the launch configuration this specialization is launched with.
        name: defaults to ``kernel[CONSTEXPR=value, ..., num_warps=.., num_stages=..]``.
        options: further Triton compile options (``maxnreg``, ``enable_fp_fusion``, ...).

    Returns:
        the KernelSpec.
    """
    return _REGISTRY.register(kernel, signature=signature, constexprs=constexprs, num_warps=num_warps,
                              num_stages=num_stages, name=name, options=options)


def registered() -> list[KernelSpec]:
    """Every specialization registered with the package's registry so far."""
    return _REGISTRY.registered()


def compile_all(arch: Union[int, Sequence[int]]) -> list[CompileResult]:
    """Compiles every registered specialization for ``arch`` (80, 90, or several)."""
    return _REGISTRY.compile_all(arch)


def import_all_kernels() -> None:
    """Imports every ``vitkernels.ops`` submodule, so that each kernel file has registered its kernels."""
    from . import ops

    # Walk the files rather than pkgutil.walk_packages: op folders need not have an __init__.py.
    root = os.path.dirname(ops.__file__)
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d.isidentifier())
        relative = os.path.relpath(folder, root)
        prefix = ops.__name__ if relative == "." else ops.__name__ + "." + relative.replace(os.sep, ".")
        for file in sorted(files):
            stem = file[:-3]
            if file.endswith(".py") and stem.isidentifier() and stem != "__init__":
                importlib.import_module(f"{prefix}.{stem}")


__all__ = ["AOTCompileError", "CompileResult", "KernelSpec", "Registry", "SHARED_MEMORY_LIMITS", "compile_all",
           "compile_one", "compile_specs", "import_all_kernels", "interpreter_on", "make_spec", "register",
           "registered", "shared_memory_limit"]
