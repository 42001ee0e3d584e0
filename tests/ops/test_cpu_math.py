"""The CPU kernels' shared fp32 math (csrc/common/cpu.cpp) as each instruction set compiles it.

The extension clones each of those functions for AVX-512, AVX2 and baseline x86-64 and runs the
widest this CPU has, so the op tests only ever reach one clone. Here common/cpu.cpp is built once
per clone's -march, with VITKERNELS_CPU_SINGLE_TARGET and the C entry points of cpu_math_abi.cpp,
and every function is checked against float64 PyTorch on random inputs, including ragged sizes
that leave a partial 16-lane tile. A target this CPU cannot run is skipped.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from vitkernels.testing import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TILE = 16  # kGemmTileCols: rows of the softmax buffers are read up to a multiple of it

# -march level: the /proc/cpuinfo flags it adds, which the CPU must have to run that build.
TARGETS = {
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl",
                  "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
    "x86-64-v3": {"avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"},
    "x86-64": set(),
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _unsupported(target: str):
    if platform.machine() != "x86_64":
        return f"the clones are x86-64 only (this is {platform.machine()})"
    if _compiler() is None:
        return "no C++ compiler (CXX, c++ or g++)"
    missing = sorted(TARGETS[target] - _cpu_flags())
    return f"this CPU lacks {', '.join(missing)}" if missing else None


@pytest.fixture(scope="module", params=list(TARGETS))
def lib(request, tmp_path_factory):
    """common/cpu.cpp and the C entry points, built for one -march and loaded."""
    target = request.param
    reason = _unsupported(target)
    if reason:
        pytest.skip(f"{target}: {reason}")
    path = str(tmp_path_factory.mktemp("cpu_math") / f"cpu_math_{target}.so")
    command = [_compiler(), "-O3", "-std=c++17", "-shared", "-fPIC", f"-march={target}",
               "-DVITKERNELS_CPU_SINGLE_TARGET", "-I", os.path.join(ROOT, "csrc"),
               os.path.join(ROOT, "csrc", "common", "cpu.cpp"),
               os.path.join(ROOT, "tests", "ops", "cpu_math_abi.cpp"), "-o", path]
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(command)} failed:\n{built.stderr}"
    handle = ctypes.CDLL(path)
    handle.vk_dot.restype = ctypes.c_float
    return handle


def _i(value: int) -> ctypes.c_int64:
    return ctypes.c_int64(value)


def _p(tensor) -> ctypes.c_void_p:
    """The address of a contiguous fp32 tensor, or null for None."""
    if tensor is None:
        return ctypes.c_void_p(None)
    assert tensor.dtype == torch.float32 and tensor.is_contiguous()
    return ctypes.c_void_p(tensor.data_ptr())


def _rows(matrix, rows: int):
    """One row pointer per row of a 2-d fp32 tensor (the ``add`` argument), kept alive by the caller."""
    return (ctypes.c_void_p * rows)(*[matrix.data_ptr() + i * matrix.stride(0) * 4 for i in range(rows)])


def _tile_multiple(cols: int) -> int:
    return -(-cols // TILE) * TILE


def _padded(rows: int, cols: int, ld: int, scale: float = 1.0):
    """A random [rows, ld] fp32 buffer (its columns from cols on are padding) and its float64 view."""
    buffer = torch.randn(rows, ld) * scale
    return buffer, buffer[:, :cols].double()


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 7, 19), (16, 33, 32), (13, 64, 49)])
def test_gemm(lib, m, k, n, transpose_a, accumulate):
    lda, ldb, ldc = (m if transpose_a else k) + 3, n + 5, n + 2
    a = torch.randn(k if transpose_a else m, lda)
    b = torch.randn(k, ldb)
    c = torch.randn(m, ldc)
    a_mk = (a[:, :m].t() if transpose_a else a[:, :k]).double()
    expected = c.double().clone()
    expected[:, :n] = (expected[:, :n] if accumulate else 0) + 0.75 * a_mk @ b[:, :n].double()
    lib.vk_gemm(_p(a), _p(b), _p(c), _i(m), _i(k), _i(n), _i(lda), _i(ldb), _i(ldc), ctypes.c_float(0.75),
                int(transpose_a), int(accumulate))
    assert_close(c, expected, name=f"gemm {m}x{k}x{n}")


@pytest.mark.parametrize("rows,cols", [(16, 16), (5, 37), (33, 18), (1, 1)])
def test_transpose(lib, rows, cols):
    src = torch.randn(rows, cols + 3)
    dst = torch.randn(cols, rows + 2)
    expected = dst.clone()
    expected[:, :rows] = src[:, :cols].t()
    lib.vk_transpose(_p(src), _p(dst), _i(rows), _i(cols), _i(cols + 3), _i(rows + 2))
    assert torch.equal(dst, expected), f"transpose {rows}x{cols}: {(dst - expected).abs().max().item():.3e} off"


def _softmax_reference(x, add):
    logits = x + (add if add is not None else 0)
    peak = logits.max(dim=1, keepdim=True).values
    unnormalized = torch.exp(logits - peak)
    total = unnormalized.sum(dim=1)
    return unnormalized, peak.squeeze(1) + torch.log(total), 1 / total


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("rows,cols", [(1, 1), (21, 15), (16, 16), (17, 49), (3, 50)])
def test_softmax_rows_unnormalized(lib, rows, cols, with_add):
    ld = _tile_multiple(cols) + TILE
    s, x = _padded(rows, cols, ld, scale=4.0)
    add, add64 = _padded(rows, cols, ld, scale=4.0) if with_add else (None, None)
    lse, inv_sum = torch.randn(rows), torch.randn(rows)
    expected, expected_lse, expected_inv = _softmax_reference(x, add64)
    add_rows = _rows(add, rows) if with_add else None
    lib.vk_softmax_rows_unnormalized(_p(s), add_rows, _p(lse), _p(inv_sum), _i(rows), _i(cols), _i(ld))
    assert_close(s[:, :cols], expected, name="probabilities")
    assert_close(lse, expected_lse, name="lse")
    assert_close(inv_sum, expected_inv, name="1 / sum")
    tail = s[:, cols:_tile_multiple(cols)]
    assert torch.equal(tail, torch.zeros_like(tail)), f"columns past {cols} not zeroed: {tail}"


def test_softmax_rows_unnormalized_keeps_nan(lib):
    rows, cols, ld = 3, 20, 32
    s = torch.randn(rows, ld)
    s[1, 17] = float("nan")
    lse, inv_sum = torch.empty(rows), torch.empty(rows)
    lib.vk_softmax_rows_unnormalized(_p(s), None, _p(lse), _p(inv_sum), _i(rows), _i(cols), _i(ld))
    assert torch.isnan(s[1, 17]) and torch.isnan(lse[1]) and torch.isnan(inv_sum[1]), (s[1], lse, inv_sum)
    assert not torch.isnan(lse[[0, 2]]).any() and not torch.isnan(s[[0, 2], :cols]).any(), (s, lse)


@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("rows,cols", [(1, 1), (21, 15), (17, 49)])
def test_exp_rows_minus(lib, rows, cols, with_add):
    ld = _tile_multiple(cols)
    s, x = _padded(rows, cols, ld, scale=4.0)
    add, add64 = _padded(rows, cols, ld, scale=4.0) if with_add else (None, None)
    _, lse64, _ = _softmax_reference(x, add64)
    lse = lse64.float()
    expected = torch.exp(x + (add64 if with_add else 0) - lse.double()[:, None])
    lib.vk_exp_rows_minus(_p(s), _rows(add, rows) if with_add else None, _p(lse), _i(rows), _i(cols), _i(ld))
    assert_close(s[:, :cols], expected, name="probabilities")


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100])
def test_dot(lib, n):
    a, b = torch.randn(n), torch.randn(n)
    got = torch.tensor([lib.vk_dot(_p(a), _p(b), _i(n))])
    assert_close(got, (a.double() @ b.double()).reshape(1), name=f"dot of {n}")


@pytest.mark.parametrize("d", [7, 16, 32, 50])
def test_normalize_rows_and_backward(lib, d):
    n = 9
    x = torch.randn(n, d)
    x[3] *= 1e-3
    x64 = x.double().requires_grad_()
    y64 = F.normalize(x64, dim=-1, eps=1e-12)
    dy = torch.randn(n, d)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    y, norm = x.clone(), torch.empty(n)
    lib.vk_normalize_rows(_p(y), _p(norm), _i(n), _i(d))
    assert_close(y, y64.detach(), name="normalized rows")
    assert_close(norm, x.double().norm(dim=-1), name="norms")
    lib.vk_normalize_rows_backward(_p(dy), _p(y), _p(norm), _i(n), _i(d))
    assert_close(dy, dx64, grad=True, name="normalize gradient")


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("c", [3, 15, 16, 96, 100])
def test_layernorm_row_and_backward(lib, c, affine):
    x = torch.randn(c) * 3 + 0.5
    weight, bias = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    x64 = x.double().requires_grad_()
    w64 = weight.double().requires_grad_() if affine else None
    b64 = bias.double().requires_grad_() if affine else None
    y64 = F.layer_norm(x64, (c,), w64, b64, eps=1e-6)
    dy = torch.randn(c)
    y, mean, rstd = torch.empty(c), ctypes.c_float(), ctypes.c_float()
    lib.vk_layernorm_row(_p(x), _p(weight), _p(bias), _p(y), _i(c), ctypes.c_float(1e-6),
                         ctypes.byref(mean), ctypes.byref(rstd))
    assert_close(y, y64.detach(), name=f"layernorm of {c}")
    var = x.double().var(unbiased=False)
    assert_close(torch.tensor([mean.value, rstd.value]), torch.stack([x.double().mean(), (var + 1e-6).rsqrt()]),
                 name="mean, rstd")

    wanted = [x64] + ([w64, b64] if affine else [])
    grads = torch.autograd.grad(y64, wanted, dy.double())
    dx = torch.empty(c)
    dweight, dbias = (torch.randn(c), torch.randn(c)) if affine else (None, None)
    before = (dweight.double(), dbias.double()) if affine else ()
    lib.vk_layernorm_row_backward(_p(dy), _p(x), _p(weight), ctypes.c_float(mean.value), ctypes.c_float(rstd.value),
                                  _p(dx), _p(dweight), _p(dbias), _i(c))
    assert_close(dx, grads[0], grad=True, name="dx")
    if affine:
        assert_close(dweight, before[0] + grads[1], grad=True, name="dweight (accumulated)")
        assert_close(dbias, before[1] + grads[2], grad=True, name="dbias (accumulated)")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("n", [1, 17, 1000])
def test_gelu_bias_gelu_and_backward(lib, n, approximate):
    tanh = int(approximate == "tanh")
    a = torch.randn(n) * 4
    a[0] = -12.0 if n > 1 else a[0]
    a64 = a.double().requires_grad_()
    y64 = F.gelu(a64, approximate=approximate)
    out = torch.empty(n)
    lib.vk_gelu(_p(a), _p(out), _i(n), tanh)
    assert_close(out, y64.detach(), name=f"gelu ({approximate})")

    bias = torch.randn(n)
    pre, fused = a.clone(), torch.empty(n)
    lib.vk_bias_gelu(_p(pre), _p(bias), _p(fused), _i(n), tanh)
    assert_close(pre, a.double() + bias.double(), name="pre + bias")
    assert_close(fused, F.gelu(a.double() + bias.double(), approximate=approximate), name="bias_gelu")

    dout = torch.randn(n)
    (da64,) = torch.autograd.grad(y64, a64, dout.double())
    da = dout.clone()
    lib.vk_gelu_backward(_p(a), _p(da), _p(da), _i(n), tanh)
    assert_close(da, da64, grad=True, name="gelu gradient (in place)")
