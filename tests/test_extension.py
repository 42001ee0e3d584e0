"""The compiled extension vitkernels._C: that it loads, what it was built with, and its ops.

Without a build the tests skip with the reason, except where VITKERNELS_REQUIRE_EXTENSION=1 (set by
`make test`, so CI) says the extension must be there.
"""
import os
import shutil

import pytest
import torch

import vitkernels.ops.window_attention.op  # noqa: F401  (registers the fake kernels of the compiled ops)
from vitkernels import _ext
from vitkernels.ops.window_attention.reference import relative_position_bias

MISSING = _ext.unavailable_reason()
REQUIRED = os.environ.get("VITKERNELS_REQUIRE_EXTENSION") == "1"
needs_extension = pytest.mark.skipif(MISSING is not None, reason=f"{MISSING}")

# (Wh, Ww): square, non-square both ways, degenerate rows and columns, one token.
WINDOWS = [(7, 7), (3, 5), (5, 3), (8, 4), (1, 6), (6, 1), (1, 1), (12, 16)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def gather(bias_table, window_h, window_w):
    return torch.ops.vitkernels.gather_relative_position_bias(bias_table, window_h, window_w)


def table_for(window, heads, dtype, device="cpu"):
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    return torch.randn(rows, heads, dtype=torch.float64, device=device).to(dtype)


def assert_bitwise_equal(actual, expected):
    """A gather copies values: every bit must match (a value compare would let -0.0 pass for 0.0)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    differs = actual.view(BITS[actual.dtype]) != expected.view(BITS[expected.dtype])
    if differs.any():
        first = tuple(differs.nonzero()[0].tolist())
        raise AssertionError(
            f"{int(differs.sum())} of {differs.numel()} elements differ; first at {first}: "
            f"{actual[first].item()} != {expected[first].item()}"
        )


def cuda_kernels_expected() -> bool:
    """Whether setup.py would have built the CUDA kernels on this machine."""
    if not torch.version.cuda or os.environ.get("VITKERNELS_SKIP_CUDA_BUILD") == "1":
        return False
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    return shutil.which("nvcc") is not None or any(h and os.path.isfile(os.path.join(h, "bin", "nvcc")) for h in homes)


def test_extension_present_when_required():
    if not REQUIRED:
        pytest.skip("VITKERNELS_REQUIRE_EXTENSION is not set")
    assert MISSING is None, MISSING
    if cuda_kernels_expected():
        assert _ext.has_cuda(), (
            "nvcc and a CUDA build of torch are present but vitkernels._C has no CUDA kernels (see setup.py's "
            f"warning when building: CUDA version mismatch? bad VITKERNELS_CUDA_ARCHS?): {_ext.build_info()}"
        )


@needs_extension
def test_build_info():
    import vitkernels._C as compiled

    info = _ext.build_info()
    assert {"compiler", "torch", "cuda", "archs", "openmp"} <= set(info), info
    assert info["torch"] == torch.__version__.split("+")[0]
    assert isinstance(info["openmp"], bool)
    assert compiled.has_cuda() == _ext.has_cuda() == (info["cuda"] is not None)
    if _ext.has_cuda():
        assert info["archs"], info
        assert info["cuda"].split(".")[0] == torch.version.cuda.split(".")[0], info


@needs_extension
def test_no_cxx_runtime_symbols_exported():
    """A toolchain that links libstdc++ statically must not export that copy's symbols (setup.py's
    hidden_static_runtime_flags): the shared libstdc++ torch loaded would take over their data."""
    import subprocess

    import vitkernels._C as compiled

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) is not installed")
    listing = subprocess.run([nm, "-D", "--defined-only", "-C", compiled.__file__], capture_output=True,
                             text=True, check=True).stdout
    runtime = [line for line in listing.splitlines()
               if any(name in line for name in ("std::locale", "std::ios_base", "std::basic_ios<", "::id"))
               and "vitkernels" not in line]
    assert not runtime, f"{len(runtime)} libstdc++ symbols exported by {compiled.__file__}, e.g. {runtime[:5]}"


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_gather_cpu_matches_reference(window, dtype):
    table = table_for(window, heads=3, dtype=dtype)
    out = gather(table, *window)
    assert out.is_contiguous()
    assert_bitwise_equal(out, relative_position_bias(table, *window))


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_cpu_strided_table(dtype):
    window = (4, 6)
    rows = (2 * window[0] - 1) * (2 * window[1] - 1)
    transposed = torch.randn(5, rows, dtype=dtype).t()  # [rows, heads] with strides (1, rows)
    sliced = torch.randn(rows, 10, dtype=dtype)[:, ::2]  # [rows, 5] with strides (10, 2)
    for table in (transposed, sliced):
        assert_bitwise_equal(gather(table, *window), relative_position_bias(table, *window))


@needs_extension
def test_gather_cpu_zero_heads():
    out = gather(torch.empty(15, 0), 3, 2)
    assert out.shape == (0, 6, 6)


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gather_opcheck(dtype):
    op = torch.ops.vitkernels.gather_relative_position_bias.default
    for window in [(3, 5), (7, 7)]:
        torch.library.opcheck(op, (table_for(window, heads=4, dtype=dtype), *window))


@needs_extension
@pytest.mark.parametrize("dynamic", [False, True])
def test_gather_compile_fullgraph(dynamic):
    def fn(table):
        return gather(table, 3, 5) * 2

    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
    for heads in (4, 6):
        table = table_for((3, 5), heads=heads, dtype=torch.float32)
        assert_bitwise_equal(compiled(table), fn(table))


@needs_extension
@pytest.mark.parametrize(
    "shape, dtype, window, message",
    [
        ((24, 3), torch.float32, (3, 5), r"bias_table must have shape \[\(2\*window_h-1\)\*\(2\*window_w-1\), heads\] "
         r"= \[45, heads\] for window \(3, 5\), got \[24, 3\]"),
        ((45,), torch.float32, (3, 5), r"= \[45, heads\] for window \(3, 5\), got \[45\]"),
        ((45, 2, 1), torch.float32, (3, 5), r"got \[45, 2, 1\]"),
        ((45, 2), torch.int64, (3, 5), r"bias_table must be float16, bfloat16, float32 or float64, got Long"),
        ((45, 2), torch.float32, (0, 5), r"window_h must be in \[1, 65536\], got 0"),
        ((45, 2), torch.float32, (3, -1), r"window_w must be in \[1, 65536\], got -1"),
    ],
)
def test_gather_bad_arguments(shape, dtype, window, message):
    with pytest.raises(RuntimeError, match=message):
        gather(torch.zeros(shape, dtype=dtype), *window)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape, window, message",
    [((45, 2), (0, 5), r"window_h must be in \[1, 65536\], got 0"), ((24, 3), (3, 5), r"got \[24, 3\]")],
    ids=["number", "shape"],
)
def test_gather_cuda_bad_arguments(shape, window, message):
    """A refused CUDA call's message, numbers and shapes formatted by the C++ library, reaches Python."""
    if MISSING is not None or not _ext.has_cuda():
        pytest.skip(MISSING or "the extension was built without CUDA kernels")
    with pytest.raises(RuntimeError, match=message):
        gather(torch.zeros(shape, device="cuda"), *window)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_cuda_matches_reference(dtype):
    if MISSING is not None or not _ext.has_cuda():
        pytest.skip(MISSING or "the extension was built without CUDA kernels")
    # (16, 16) with 288 heads: 18.9M outputs, more than the 2^16 blocks of 256 threads cover at once,
    # so the grid-stride loop takes a second pass.
    for window, heads in [((7, 7), 3), ((3, 5), 4), ((1, 4), 2), ((16, 16), 288)]:
        table = table_for(window, heads=heads, dtype=dtype, device="cuda")
        assert_bitwise_equal(gather(table, *window), relative_position_bias(table, *window))
    strided = table_for((4, 6), heads=8, dtype=dtype, device="cuda")[:, ::2]
    assert_bitwise_equal(gather(strided, 4, 6), relative_position_bias(strided, 4, 6))
    op = torch.ops.vitkernels.gather_relative_position_bias.default
    torch.library.opcheck(op, (table_for((3, 5), 4, dtype, "cuda"), 3, 5))
