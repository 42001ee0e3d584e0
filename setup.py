"""Builds vitkernels with its optional compiled extension ``vitkernels._C``.

Metadata lives in pyproject.toml; this file only decides what the extension holds:

* the C++ part (csrc/registration.cpp and every csrc/*/cpu.cpp) whenever a C++ compiler and torch
  are present, with OpenMP when the compiler supports it;
* every csrc/*/cuda.cu, with VITKERNELS_WITH_CUDA defined, when torch is a CUDA build and a CUDA
  toolkit is found.

Environment:
    VITKERNELS_SKIP_CUDA_BUILD=1  leave the CUDA kernels out.
    VITKERNELS_CUDA_ARCHS         archs to compile for, ";"-separated (default "8.0;9.0"); it becomes
                                  TORCH_CUDA_ARCH_LIST, which must be set on a machine without a GPU.
    CUDA_HOME                     the toolkit root; else /usr/local/cuda; else the toolkit behind the
                                  nvcc on PATH (which may be a wrapper script living elsewhere).
    MAX_JOBS                      parallel compile jobs (default: the number of cores).

The package works without the extension, so a missing compiler or a failed build installs the
pure-Python package and prints a warning instead of failing the install. Build with
``pip install --no-build-isolation -e .`` (torch must be importable) or, in place,
``python setup.py build_ext --inplace``.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def warn(message: str) -> None:
    print(f"\n*** vitkernels WARNING: {message}\n", file=sys.stderr, flush=True)


def note(message: str) -> None:
    print(f"vitkernels: {message}", flush=True)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


def cxx_command() -> Optional[list[str]]:
    """The C++ compiler torch's ninja build will call ($CXX, else c++), or None when absent."""
    command = shlex.split(os.environ.get("CXX", "c++"))
    if not command or shutil.which(command[0]) is None:
        return None
    return command


def supports_openmp(cxx: list[str]) -> bool:
    source = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "probe.cpp")
        with open(path, "w") as f:
            f.write(source)
        result = subprocess.run(
            [*cxx, "-fopenmp", path, "-o", os.path.join(tmp, "probe")], capture_output=True, check=False
        )
    return result.returncode == 0


def is_cuda_toolkit(path: Optional[str]) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def toolkit_behind(nvcc: str) -> Optional[str]:
    """The toolkit an nvcc on PATH belongs to, through symlinks or a wrapper script.

    A wrapper in /usr/local/bin makes torch guess CUDA_HOME=/usr/local; ``nvcc --dryrun`` prints
    the real driver's folder (``_HERE_=<toolkit>/bin``) whatever the wrapper is.
    """
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if is_cuda_toolkit(home):
        return home
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.cu")
        with open(source, "w") as f:
            f.write("int main() { return 0; }\n")
        try:
            result = subprocess.run(
                [nvcc, "--dryrun", "-c", source, "-o", os.path.join(tmp, "probe.o")],
                capture_output=True, text=True, timeout=60, check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None
    match = re.search(r"^#\$ _HERE_=(.+)$", result.stdout + result.stderr, re.MULTILINE)
    if match:
        home = os.path.dirname(os.path.realpath(match.group(1).strip()))
        if is_cuda_toolkit(home):
            return home
    return None


def find_cuda_home() -> Optional[str]:
    """CUDA_HOME when it holds a toolkit, else /usr/local/cuda, else the toolkit behind PATH's nvcc."""
    given = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if given:
        if is_cuda_toolkit(given):
            return given
        warn(f"CUDA_HOME={given} has no bin/nvcc and include/cuda_runtime.h; looking elsewhere")
    if is_cuda_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return toolkit_behind(nvcc) if nvcc else None


def nvcc_version(cuda_home: str) -> Optional[tuple[int, int]]:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def cuda_arch_list() -> Optional[str]:
    """VITKERNELS_CUDA_ARCHS normalized to "a;b;c", or None (with a warning) when malformed."""
    raw = os.environ.get("VITKERNELS_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    archs = [arch for arch in re.split(r"[;\s]+", raw.strip()) if arch]
    if not archs or not all(re.fullmatch(r"[A-Za-z0-9.+]+", arch) for arch in archs):
        warn(f"VITKERNELS_CUDA_ARCHS={raw!r} is not a ';'-separated arch list such as '8.0;9.0+PTX'")
        return None
    return ";".join(archs)


def put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; a venv's ninja (the pip package) is not there unless activated."""
    if shutil.which("ninja"):
        return
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja

        candidates.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "ninja")):
            os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")
            return
    warn("ninja not found: torch falls back to a slow, serial build (pip install ninja)")


def nvidia_include_dirs() -> list[str]:
    """Header folders of the pip nvidia-* wheels torch depends on (cuBLAS and friends)."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for location in spec.submodule_search_locations:
        found.extend(sorted(glob.glob(os.path.join(location, "*", "include"))))
    return found


# ---------------------------------------------------------------------------------------------
# The extension
# ---------------------------------------------------------------------------------------------


def sources(pattern: str) -> list[str]:
    """Paths relative to this file, as setuptools wants them."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def cuda_plan(torch) -> tuple[Optional[str], Optional[str]]:
    """(cuda_home, arch list) when the CUDA kernels are to be built, else (None, None) and a note why."""
    if env_flag("VITKERNELS_SKIP_CUDA_BUILD"):
        note("VITKERNELS_SKIP_CUDA_BUILD is set: building the CPU kernels only")
        return None, None
    if not torch.version.cuda:
        note(f"torch {torch.__version__} is not a CUDA build: building the CPU kernels only")
        return None, None
    cuda_home = find_cuda_home()
    if cuda_home is None:
        note("no CUDA toolkit found (CUDA_HOME, /usr/local/cuda, nvcc on PATH): building the CPU kernels only")
        return None, None
    version = nvcc_version(cuda_home)
    torch_major = int(torch.version.cuda.split(".")[0])
    if version is None or version[0] != torch_major:
        warn(
            f"nvcc in {cuda_home} reports CUDA {version} but torch was built with CUDA {torch.version.cuda}; "
            "building the CPU kernels only"
        )
        return None, None
    archs = cuda_arch_list()
    if archs is None:
        return None, None
    return cuda_home, archs


def hidden_static_runtime_flags() -> list[str]:
    """Linker flags that keep what static archives bring into the extension out of its exported symbols.

    A compiler that links the C++ runtime statically (a toolchain wrapper passing -static-libstdc++)
    puts a copy of libstdc++ in the extension, while torch has already loaded the shared one. Exported,
    the copy's data symbols (the locale's tables, the facets' ids) resolve to the shared library's,
    whose layout differs between versions, so the copy's stream code misreads them: formatting a
    number in an error message crashed the process. Hidden, the copy uses its own data.
    """
    return ["-Wl,--exclude-libs,ALL"] if sys.platform.startswith("linux") else []


def extension_plan():
    """(ext_modules, build_ext class): empty and the plain setuptools command when nothing can be built."""
    try:
        import torch
    except ImportError as err:
        warn(f"torch cannot be imported ({err}), so vitkernels._C is not built; "
             "install torch first and use `pip install --no-build-isolation`")
        return [], None
    cxx = cxx_command()
    if cxx is None:
        warn("no C++ compiler ($CXX or c++) found: vitkernels._C is not built; the package works without it")
        return [], None

    cuda_home, archs = cuda_plan(torch)
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when first imported.
        os.environ["CUDA_HOME"] = cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    put_ninja_on_path()

    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home

    openmp = supports_openmp(cxx)
    cxx_flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    link_flags = (["-fopenmp"] if openmp else []) + hidden_static_runtime_flags()
    cpu_sources = ["csrc/registration.cpp"] + sources("*/cpu.cpp")
    include_dirs = [os.path.join(ROOT, "csrc")]

    if cuda_home is None:
        extension = cpp_extension.CppExtension(
            "vitkernels._C", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    else:
        defines = ["-DVITKERNELS_WITH_CUDA"]
        # nvcc compiles one file's archs in parallel: the .cu files are the long pole of the build.
        threads = min(len(archs.split(";")), os.cpu_count() or 1)
        extension = cpp_extension.CUDAExtension(
            "vitkernels._C", cpu_sources + sources("*/cuda.cu"), include_dirs=include_dirs,
            extra_compile_args={
                "cxx": cxx_flags + defines + [f'-DVITKERNELS_CUDA_ARCHS="{archs}"'],
                "nvcc": ["-O3", "--threads", str(threads)] + defines,
            },
            extra_link_args=link_flags,
        )
        # After the toolkit's own include folder (which CUDAExtension appended), so that the
        # toolkit's headers win and the wheels only add what it lacks (cublas_v2.h, ...).
        extension.include_dirs.extend(nvidia_include_dirs())

    note(
        f"building vitkernels._C: C++ ({' '.join(cxx)}, OpenMP {'on' if openmp else 'off'})"
        + (f", CUDA from {cuda_home} for archs {archs}" if cuda_home else ", no CUDA kernels")
    )
    return [extension], optional_build_ext(cpp_extension.BuildExtension)


def optional_build_ext(base):
    """BuildExtension that turns a failed build into a warning and installs the package without it."""

    class OptionalBuildExtension(base):
        def build_extensions(self) -> None:
            # Python's own CFLAGS carry -g; debug info makes the objects many times larger.
            for name in getattr(self.compiler, "executables", {}):
                flags = getattr(self.compiler, name, None)
                if isinstance(flags, list):
                    setattr(self.compiler, name, [flag for flag in flags if flag != "-g"])
            try:
                super().build_extensions()
            except Exception as err:  # noqa: BLE001 - any failure: install without the extension
                warn(
                    f"building vitkernels._C failed ({type(err).__name__}: {err}). Installing vitkernels "
                    "without it: the 'cpu' and 'cuda' backends are unavailable, the others work. "
                    "See the compiler output above."
                )
                self.extensions = []
                self.distribution.ext_modules = []

    return OptionalBuildExtension


ext_modules, build_ext = extension_plan()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext} if build_ext else {})
