"""Ahead-of-time compile check: Triton kernels compile for sm_80 and sm_90 without a GPU.

Under TRITON_INTERPRET=1 (set by conftest.py on machines without CUDA) the kernels below are
interpreted functions; vitkernels.aot compiles them in a fresh process that imports this module
without the interpreter, so they must stay at module level.
"""
import op_cases
import pytest
import torch
import triton
import triton.language as tl

from vitkernels import aot, ops


@triton.jit
def _masked_add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # x_ptr, y_ptr, out_ptr: [n]
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


@triton.jit
def _tile_matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_bk, stride_cm,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a_ptr: [M, K] row-major, b_ptr: [K, N] row-major, c_ptr: [M, N] row-major
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * stride_am + (k + ks)[None, :],
                    mask=(rows[:, None] < M) & ((k + ks)[None, :] < K), other=0.0)
        b = tl.load(b_ptr + (k + ks)[:, None] * stride_bk + cols[None, :],
                    mask=((k + ks)[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _broken_kernel(x_ptr, BLOCK: tl.constexpr):
    # tl.arange needs a power-of-two length: BLOCK=100 fails to compile.
    offsets = tl.arange(0, BLOCK)
    tl.store(x_ptr + offsets, tl.load(x_ptr + offsets) * 2)


ADD_SIGNATURE = {"x_ptr": "*fp32:16", "y_ptr": "*fp32:16", "out_ptr": "*fp32:16", "n": "i32"}
# Every size a multiple of 16 and 16-byte-aligned pointers, as the launcher specializes them for
# typical shapes: this is what enables cp.async pipelining, and so multi-stage shared buffers.
MATMUL_SIGNATURE = {"a_ptr": "*fp16:16", "b_ptr": "*fp16:16", "c_ptr": "*fp16:16", "M": "i32:16", "N": "i32:16",
                    "K": "i32:16", "stride_am": "i32:16", "stride_bk": "i32:16", "stride_cm": "i32:16"}
ARCHS = (80, 90)


def _local_registry() -> aot.Registry:
    registry = aot.Registry()
    registry.register(_masked_add_kernel, signature=ADD_SIGNATURE, constexprs={"BLOCK": 1024})
    registry.register(_tile_matmul_kernel, signature=MATMUL_SIGNATURE,
                      constexprs={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3)
    registry.register(_tile_matmul_kernel, signature={**MATMUL_SIGNATURE, "a_ptr": "*bf16:16", "b_ptr": "*bf16:16"},
                      constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3,
                      name="tile_matmul_bf16_128x128")
    return registry


def test_kernels_compile_for_sm80_and_sm90():
    registry = _local_registry()
    results = registry.compile_all(ARCHS)
    names = [spec.name for spec in registry.registered()]
    assert sorted((r.name, r.arch) for r in results) == sorted((n, a) for n in names for a in ARCHS)
    for result in results:
        assert 0 <= result.shared <= aot.shared_memory_limit(result.arch), result
        assert result.cubin_bytes > 0, result
    pipelined = [r for r in results if r.name == "tile_matmul_bf16_128x128"]
    assert all(r.shared > 0 for r in pipelined), pipelined


def test_shared_memory_overflow_is_rejected_for_sm80():
    # 128x128 fp16 tiles with BLOCK_K=64 take 32 KiB per pipeline buffer; 7 stages keep 6 of them
    # (192 KiB), over the 163 KiB an sm_80 block may use (it fits sm_90's 227 KiB with Triton 3.8).
    spec = aot.make_spec(_tile_matmul_kernel, signature=MATMUL_SIGNATURE,
                         constexprs={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=7)
    with pytest.raises(aot.AOTCompileError) as info:
        aot.compile_one(spec, 80)
    message = str(info.value)
    assert message.startswith("_tile_matmul_kernel[BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=7] "
                              "for sm_80: needs"), message
    assert "shared memory" in message and "166912" in message, message


def test_compile_errors_name_kernel_and_arch():
    spec = aot.make_spec(_broken_kernel, signature={"x_ptr": "*fp32"}, constexprs={"BLOCK": 100})
    with pytest.raises(aot.AOTCompileError) as info:
        aot.compile_specs([spec], ARCHS)
    message = str(info.value)
    assert message.startswith("2 of 2 ahead-of-time compiles failed"), message
    for arch in ARCHS:
        assert f"_broken_kernel[BLOCK=100, num_warps=4, num_stages=2] for sm_{arch}: compilation failed" in message
    assert "power of 2" in message, message


def test_register_checks_arguments_against_the_kernel():
    registry = aot.Registry()
    with pytest.raises(ValueError, match=r"\['n'\] need a type"):
        registry.register(_masked_add_kernel, signature={k: v for k, v in ADD_SIGNATURE.items() if k != "n"},
                          constexprs={"BLOCK": 1024})
    with pytest.raises(ValueError, match="not arguments"):
        registry.register(_masked_add_kernel, signature={**ADD_SIGNATURE, "m": "i32"}, constexprs={"BLOCK": 1024})
    with pytest.raises(TypeError, match="Triton type"):
        registry.register(_masked_add_kernel, signature={**ADD_SIGNATURE, "n": "i32:8"}, constexprs={"BLOCK": 1024})
    first = registry.register(_masked_add_kernel, signature=ADD_SIGNATURE, constexprs={"BLOCK": 1024})
    assert registry.register(_masked_add_kernel, signature=ADD_SIGNATURE, constexprs={"BLOCK": 1024}) == first
    assert first.name == "_masked_add_kernel[BLOCK=1024, num_warps=4, num_stages=2]"
    with pytest.raises(ValueError, match="already registered"):
        registry.register(_masked_add_kernel, signature=ADD_SIGNATURE, constexprs={"BLOCK": 512}, name=first.name)
    assert len(registry.registered()) == 1


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="sm_75"):
        aot.compile_specs([], 75)


def test_every_package_kernel_compiles_for_sm80_and_sm90():
    aot.import_all_kernels()
    specs = aot.registered()
    results = aot.compile_all(ARCHS)
    assert len(results) == len(specs) * len(ARCHS)


@pytest.mark.skipif(not aot.interpreter_on(), reason="records the launches through the Triton interpreter")
@pytest.mark.parametrize("op", ops.OPS)
def test_every_launch_names_its_pipeline_depth(op, monkeypatch):
    """Triton launches with 3 pipeline stages unless told otherwise, while a kernel registered without
    a depth is compiled with aot.NUM_STAGES: every launch names its depth, so what runs is what the
    check compiled (3 stages once asked a wide-head forward for 256 KiB of shared memory)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    interpret = InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches.append((self.fn.__name__, kwargs.get("num_stages")))
        return interpret(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    case = op_cases.CASES[op]
    op_cases.run(case, "triton", case.make(1), torch.float32)
    unnamed = sorted({name for name, stages in launches if stages is None})
    assert launches and not unnamed, f"{op}: launches without num_stages: {unnamed}"
