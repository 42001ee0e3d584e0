"""Property tests: random shapes, windows, shifts, heads, dtypes and zoo options of every op, each
backend against the reference (forward and backward). Derandomized so that CI runs the same examples;
example counts keep the whole file near a minute on a 2-core machine (the Triton interpreter is slow,
so it gets a few tiny examples)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from op_cases import Case, compare, op_backend_params
from vitkernels import ops

# examples per backend: the reference against itself in float64 (its fp32, fp16 and bf16 paths) gets few,
# the C++ kernels many, the slow Triton interpreter a few tiny ones
EXAMPLES = {"torch": 4, "cpu": 40, "triton": 5}
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPES = {"torch": ALL_DTYPES, "cpu": ALL_DTYPES, "triton": ALL_DTYPES[:2]}  # the interpreter computes bf16 wrongly


def _fuzz(backend):
    return settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _r(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def _window_case(data, backend):
    small = backend == "triton"
    wh, ww = data.draw(st.integers(1, 4 if small else 7)), data.draw(st.integers(1, 4 if small else 7))
    sh, sw = data.draw(st.integers(0, wh - 1)), data.draw(st.integers(0, ww - 1))
    height, width = data.draw(st.integers(1, 8 if small else 15)), data.draw(st.integers(1, 8 if small else 15))
    heads, head_dim = data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 4, 8, 16]))
    options = data.draw(st.fixed_dictionaries({
        "pad_first": st.booleans(), "table": st.booleans(), "qkv_bias": st.booleans(), "cosine": st.booleans(),
        "mask_value": st.sampled_from([-100.0, -200.0])}))
    channels = heads * head_dim
    tensors = {"qkv": _r(data.draw(st.integers(1, 2)), height, width, 3 * channels),
               "bias_table": _r((2 * wh - 1) * (2 * ww - 1), heads) if options["table"] else None,
               "qkv_bias": _r(3 * channels) if options["qkv_bias"] else None,
               "logit_scale": (2.3 + _r(heads)) if options["cosine"] else None}

    def call(backend, qkv, bias_table=None, qkv_bias=None, logit_scale=None):
        return ops.window_attention(qkv, heads, (wh, ww), (sh, sw), bias_table, qkv_bias=qkv_bias,
                                    logit_scale=logit_scale, pad_first=options["pad_first"],
                                    mask_value=options["mask_value"], backend=backend)

    return call, tensors


def _attention_case(data, backend):
    # 2+ tokens: softmax over a single key is constant, so the logits' (bias) gradient is zero in exact
    # arithmetic and rounding noise otherwise, which no relative tolerance can judge
    tokens = data.draw(st.integers(2, 24 if backend == "triton" else 80))
    heads, head_dim = data.draw(st.integers(1, 4)), data.draw(st.sampled_from([1, 8, 16, 32]))
    batch = data.draw(st.integers(1, 3))
    bias_shape = data.draw(st.sampled_from([None, (tokens, tokens), (heads, tokens, tokens),
                                            (batch, 1, tokens, tokens), (1, heads, 1, tokens)]))
    scale = data.draw(st.sampled_from([None, 0.1, 1.0]))
    tensors = {"qkv": _r(batch, tokens, 3 * heads * head_dim), "bias": None if bias_shape is None else _r(*bias_shape)}

    def call(backend, qkv, bias=None):
        return ops.attention(qkv, heads, bias=bias, scale=scale, backend=backend)

    return call, tensors


def _rows(data, backend):
    """Leading shape (2 to 4 dims in all) and a channel count, odd ones included.

    At least 3 channels: LayerNorm over one or two channels has a constant output (0, or +-1) and a
    gradient of x that is zero in exact arithmetic, rounding noise otherwise, which no relative tolerance
    can judge.
    """
    lead = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    channels = data.draw(st.integers(3, 40 if backend == "triton" else 200))
    return lead, channels


def _layernorm_case(data, backend):
    lead, channels = _rows(data, backend)
    affine = data.draw(st.sampled_from(["both", "weight", "bias", "none"]))
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 1e-12]))
    tensors = {"x": _r(*lead, channels) * 3 + 1, "weight": 1 + _r(channels) if affine in ("both", "weight") else None,
               "bias": _r(channels) if affine in ("both", "bias") else None}
    if data.draw(st.booleans()):
        # eighths in [-4, 4]: x + residual is exact in fp16 and bf16, as the kernels round the sum (an
        # output) before normalizing it while the reference normalizes the fp32 sum
        tensors["x"], tensors["residual"] = (torch.randint(-32, 33, (*lead, channels)).double() / 8 for _ in range(2))

        def call(backend, x, residual, weight=None, bias=None):
            return ops.add_layernorm(x, residual, weight, bias, eps=eps, backend=backend)
    else:
        def call(backend, x, weight=None, bias=None):
            return ops.layernorm(x, weight, bias, eps=eps, backend=backend)

    return call, tensors


def _mlp_case(data, backend):
    lead, channels = _rows(data, backend)
    hidden = data.draw(st.integers(1, 48 if backend == "triton" else 160))
    flags = data.draw(st.fixed_dictionaries({k: st.booleans() for k in ("ln", "fc1_bias", "fc2_bias", "gamma")}))
    approximate = data.draw(st.sampled_from(["none", "tanh"]))
    tensors = {"x": _r(*lead, channels), "ln_weight": 1 + _r(channels) if flags["ln"] else None,
               "ln_bias": _r(channels) if flags["ln"] else None, "fc1_weight": _r(hidden, channels) / channels**0.5,
               "fc1_bias": _r(hidden) if flags["fc1_bias"] else None, "fc2_weight": _r(channels, hidden) / hidden**0.5,
               "fc2_bias": _r(channels) if flags["fc2_bias"] else None,
               "gamma": _r(channels) if flags["gamma"] else None}

    def call(backend, x, fc1_weight, fc2_weight, ln_weight=None, ln_bias=None, fc1_bias=None, fc2_bias=None,
             gamma=None):
        return ops.layernorm_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, gamma=gamma,
                                 approximate=approximate, backend=backend)

    return call, tensors


def _patch_case(data, backend):
    ph, pw = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    dynamic_pad = data.draw(st.booleans())
    gh, gw = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    height = gh * ph - (data.draw(st.integers(0, ph - 1)) if dynamic_pad else 0)
    width = gw * pw - (data.draw(st.integers(0, pw - 1)) if dynamic_pad else 0)
    cin, dim = data.draw(st.integers(1, 4)), data.draw(st.integers(3, 32))  # 3+: see _rows
    prefix = data.draw(st.integers(0, 3))
    pos = data.draw(st.sampled_from(["none", "all", "patches"]))
    patch_norm, normalize = data.draw(st.booleans()), data.draw(st.booleans())
    # the patch norm without a bias makes the output invariant to the embedding's scale: the gradient of
    # std (one input channel) or of x (one value per patch) is then zero but for eps's share, which
    # cancellation buries in fp32 noise that no relative tolerance can judge (the zoos' patch norms
    # follow a convolution with a bias)
    has_bias = patch_norm or data.draw(st.booleans())
    tensors = {"x": _r(data.draw(st.integers(1, 2)), cin, height, width),
               "weight": _r(dim, cin, ph, pw) / (cin * ph * pw) ** 0.5,
               "bias": _r(dim) if has_bias else None,
               "prefix_tokens": _r(prefix, dim) if prefix else None,
               "pos_embed": {"none": None, "all": _r(1, prefix + gh * gw, dim), "patches": _r(gh * gw, dim)}[pos],
               "norm_weight": 1 + _r(dim) if patch_norm else None, "norm_bias": _r(dim) if patch_norm else None,
               "mean": _r(cin) if normalize else None, "std": 1 + _r(cin).abs() if normalize else None}

    def call(backend, **t):
        return ops.patch_embed(**t, patch_norm=patch_norm, dynamic_pad=dynamic_pad, backend=backend)

    return call, tensors


BATCHED = frozenset({"qkv", "x", "residual"})
BUILDERS = {"window_attention": _window_case, "attention": _attention_case, "layernorm": _layernorm_case,
            "add_layernorm": None, "layernorm_mlp": _mlp_case, "patch_embed": _patch_case}


def _fuzz_params():
    # layernorm's builder draws add_layernorm too; backends from each op's table
    return [p for p in op_backend_params() if BUILDERS[p.values[0]] is not None]


@pytest.mark.parametrize("op,backend", _fuzz_params())
def test_matches_reference(op, backend):
    @_fuzz(backend)
    @given(data=st.data())
    def check(data):
        call, tensors = BUILDERS[op](data, backend)
        dtype = data.draw(st.sampled_from(DTYPES[backend]))
        present = {k: t for k, t in tensors.items() if t is not None}
        compare(Case(op, None, call, shared=frozenset(present) - BATCHED), backend, present, dtype)

    check()
