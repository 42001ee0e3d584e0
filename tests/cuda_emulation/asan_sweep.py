"""Every emulated CUDA entry point over shapes that take each of its paths, under AddressSanitizer:
a read or write past a tensor's memory (a global-memory fault on the GPU) aborts with ASan's report.
Only memory safety is checked here; the values are test_cuda_emulation.py's business.

Runs in its own process, which the sanitizer's runtime must be loaded into first (Triton's library
does not load beside it, so neither vitkernels nor Triton is imported here):

    LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0 \\
        VITKERNELS_EMULATION_ASAN=1 python tests/cuda_emulation/asan_sweep.py
With --overflow it runs a kernel that stores past a tensor instead, which must abort.
"""
import sys

import torch

from build_emulation import load

HALF, FLOAT = torch.float16, torch.float32


def window_attention(m, batch, height, width, heads, head_dim, window, shift, pad_first, *, bias=True,
                     cosine=False):
    channels = heads * head_dim
    qkv = torch.randn(batch, height, width, 3 * channels, dtype=HALF)
    table = torch.randn((2 * window[0] - 1) * (2 * window[1] - 1), heads) if bias else None
    qkv_bias = torch.randn(3 * channels) if bias else None
    logit_scale = torch.rand(heads) if cosine else None
    args = (heads, list(window), list(shift), table, qkv_bias, logit_scale, None, pad_first, -100.0)
    out, lse = m.window_attention_fwd(qkv, *args)
    m.window_attention_bwd(torch.randn_like(out), qkv, lse, *args)


def attention(m, batch, tokens, heads, head_dim, bias):
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, dtype=HALF)
    out, lse = m.attention_fwd(qkv, heads, bias, None)
    m.attention_bwd(torch.randn_like(out), qkv, lse, heads, bias, None, bias is not None)


def patch_embed(m, dtype, height, width, patch, prefix):
    x = torch.randn(2, 3, height, width, dtype=dtype)
    weight, bias = torch.randn(24, 3, patch, patch, dtype=dtype), torch.randn(24, dtype=dtype)
    tokens = (height // patch) * (width // patch) + prefix
    pre = torch.randn(prefix, 24, dtype=dtype) if prefix else None
    pos = torch.randn(1, tokens, 24, dtype=dtype)
    args = (weight, bias, pre, pos, None, None, 1e-5, False, None, None)
    out = m.patch_embed_fwd(x, *args)
    m.patch_embed_bwd(torch.randn_like(out), x, *args, [True] * 9)


def layernorms(m, dtype, channels, offset):
    x = torch.randn(3 * 7 * channels + offset, dtype=dtype)[offset:].view(3, 7, channels)
    weight, bias = torch.randn(channels, dtype=dtype), torch.randn(channels, dtype=dtype)
    y, mean, rstd = m.layernorm_fwd(x, weight, bias, 1e-5)
    m.layernorm_bwd(torch.randn_like(y), None, x, mean, rstd, weight, True)
    m.add_layernorm_fwd(x, x.clone(), weight, bias, 1e-5)


def layernorm_mlp(m, dtype, shape, channels, hidden, approximate):
    def t(*size):
        return torch.randn(*size, dtype=dtype)

    x, ln_w, ln_b, gamma = t(*shape, channels), t(channels), t(channels), t(channels)
    params = (ln_w, ln_b, t(hidden, channels), t(hidden), t(channels, hidden), t(channels))
    out, mean, rstd, pre, fc2_out = m.layernorm_mlp_fwd(x, *params, 1e-6, gamma, approximate)
    m.layernorm_mlp_bwd(torch.randn_like(out), x, mean, rstd, pre, fc2_out, *params, 1e-6, gamma, approximate)


def main():
    torch.manual_seed(0)
    m = load()
    if "--overflow" in sys.argv:  # shows the sanitizer at work: a store past a tensor aborts here
        m.run_emulator_check("global_overflow")
        return
    for pad_first in (False, True):
        window_attention(m, 1, 17, 20, 2, 32, (7, 7), (3, 3), pad_first)  # one tile, padded
        window_attention(m, 1, 12, 24, 1, 32, (12, 12), (6, 6), pad_first)  # three tiles
        window_attention(m, 1, 13, 13, 1, 48, (7, 7), (3, 3), pad_first)  # head_dim padded to 64
        window_attention(m, 2, 5, 9, 2, 20, (3, 5), (1, 2), pad_first)  # rows not 16-byte aligned
    window_attention(m, 1, 11, 8, 4, 16, (8, 8), (4, 4), True, cosine=True)
    window_attention(m, 1, 15, 12, 2, 16, (12, 12), (6, 6), True, bias=False)
    for batch, tokens, heads, head_dim in [(2, 17, 2, 64), (1, 130, 2, 32), (2, 65, 1, 40)]:
        for bias in (None, torch.randn(tokens, tokens, dtype=HALF),
                     torch.randn(batch, heads, tokens, tokens, dtype=HALF)):
            attention(m, batch, tokens, heads, head_dim, bias)
    for dtype in (FLOAT, HALF):
        patch_embed(m, dtype, 16, 12, 4, 1)
        patch_embed(m, dtype, 32, 48, 16, 0)
        for channels in (8, 100, 768, 2056):
            for offset in (0, 1):
                layernorms(m, dtype, channels, offset)
        for shape, channels, hidden in [((3, 11), 100, 37), ((1,), 64, 256)]:
            layernorm_mlp(m, dtype, shape, channels, hidden, "tanh")
    print("asan sweep: every entry point ran")


if __name__ == "__main__":
    main()
