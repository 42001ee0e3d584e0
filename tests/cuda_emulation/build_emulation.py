"""Builds the emulated CUDA kernels: csrc's CUDA sources compiled for the host against the
stand-in headers of include/ (vk_emulation.h runs the kernels on CPU tensors), as a Python module.

The sources are copied with three rewrites the host compiler needs: kernel launches
(`kernel<<<grid, block, shared, stream>>>(args)`) become calls of vk_emu::launch, dynamic shared
memory (`extern __shared__ T name[]`) becomes the launch's buffer, and the device the entry points
demand of their tensors becomes the CPU.
"""
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SOURCES = ("window_attention/cuda.cu", "attention/cuda.cu", "patch_embed/cuda.cu", "layernorm_mlp/cuda.cu")

_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\[\];")


def _kernel_start(text, end):
    """Start of the kernel expression ending at `end`: a qualified name, optionally with template
    arguments (`ns::kernel<T, 4>`)."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if text[i - 1] == ">":
        depth = 0
        while True:
            i -= 1
            depth += {">": 1, "<": -1}.get(text[i], 0)
            if depth == 0:
                break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _closing_paren(text, start):
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError("unbalanced parentheses after a kernel launch")


def rewrite_launches(text):
    """`kernel<<<config>>>(args)` -> `::vk_emu::launch(::vk_emu::Config(config), lambda, args)`."""
    while (at := text.find("<<<")) >= 0:
        config_end = text.index(">>>", at)
        open_paren = text.index("(", config_end)
        close_paren = _closing_paren(text, open_paren)
        start = _kernel_start(text, at)
        kernel = text[start:at].strip()
        config = text[at + 3:config_end]
        args = text[open_paren + 1:close_paren]
        call = (f"::vk_emu::launch(::vk_emu::Config({config}), "
                f"[&](const auto&... vk_args) {{ {kernel}(vk_args...); }}, {args})")
        text = text[:start] + call + text[close_paren + 1:]
    return text


def rewrite(text):
    text = rewrite_launches(text)
    text = _SHARED.sub(r"\1* \2 = reinterpret_cast<\1*>(::vk_emu::dynamic_shared());", text)
    return text.replace("c10::DeviceType::CUDA", "c10::DeviceType::CPU")


def generate(out):
    """Copies csrc to out/src, rewritten; returns the paths of the sources to compile."""
    src = out / "src"
    wanted = {}
    for path in (ROOT / "csrc").rglob("*"):
        if path.is_file():
            name = path.relative_to(ROOT / "csrc").as_posix()
            if name in SOURCES:  # a .cpp for the host compiler, with a name unique among the objects
                name = str(Path(name).with_name(name.replace("/", "_")).with_suffix(".cpp"))
            wanted[src / name] = rewrite(path.read_text())
    if src.exists():
        for path in src.rglob("*"):
            if path.is_file() and path not in wanted:
                path.unlink()
    for path, text in wanted.items():
        if not path.exists() or path.read_text() != text:  # unchanged files keep their time: no rebuild
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return [str(src / Path(name).with_name(name.replace("/", "_")).with_suffix(".cpp")) for name in SOURCES]


def load(verbose=False):
    """The compiled module (built once per source change, in build/cuda_emulation).

    With VITKERNELS_EMULATION_ASAN=1 the module is built with AddressSanitizer (in
    build/cuda_emulation_asan), which then reports the kernels' reads and writes past a tensor's
    memory; python must run with the sanitizer's runtime preloaded:
    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0.
    """
    from torch.utils import cpp_extension

    asan = os.environ.get("VITKERNELS_EMULATION_ASAN") == "1"
    out = ROOT / "build" / ("cuda_emulation_asan" if asan else "cuda_emulation")
    out.mkdir(parents=True, exist_ok=True)
    sources = generate(out)
    include = HERE / "include"
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    return cpp_extension.load(
        name="vitkernels_cuda_emulation_asan" if asan else "vitkernels_cuda_emulation",
        sources=[str(HERE / "bindings.cpp"), str(HERE / "emulator_checks.cpp"), *sources],
        extra_include_paths=[str(include), str(out / "src")],
        extra_cflags=["-O1", "-std=c++20", "-include", str(include / "vk_emulation.h"), "-DVITKERNELS_WITH_CUDA",
                      "-Wno-unknown-pragmas", "-Wno-unused-function", *sanitize],
        extra_ldflags=sanitize,
        build_directory=str(out),
        verbose=verbose,
    )
