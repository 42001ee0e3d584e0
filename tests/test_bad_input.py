"""Rejections beyond tests/test_errors.py: every public op refuses each bad argument at the boundary
with a ValueError or TypeError (NotSupportedError is a ValueError) whose message names the values."""
import pytest
import timm
import torch

import vitkernels
from vitkernels import ops

NAN, INF = float("nan"), float("inf")
QKV = torch.randn(2, 8, 8, 3 * 16)
TABLE = torch.randn(49, 2)
SEQ = torch.randn(2, 5, 3 * 16)
X = torch.randn(2, 5, 16)
FC1, FC2 = torch.randn(64, 16), torch.randn(16, 64)
IMG = torch.randn(2, 3, 16, 16)
W = torch.randn(24, 3, 4, 4)
META = {"device": "meta"}


def _call(fn, defaults, **kw):
    return lambda: fn(**{**defaults, **kw})


def wa(**kw):
    return _call(ops.window_attention, {"qkv": QKV, "num_heads": 2, "window_size": 4, "shift_size": 0,
                                        "bias_table": TABLE}, **kw)


def attn(**kw):
    return _call(ops.attention, {"qkv": SEQ, "num_heads": 2}, **kw)


def ln(**kw):
    return _call(ops.layernorm, {"x": X, "weight": torch.randn(16), "bias": torch.randn(16)}, **kw)


def add_ln(**kw):
    return _call(ops.add_layernorm, {"x": X, "residual": X + 1, "weight": None, "bias": None}, **kw)


def mlp(**kw):
    return _call(ops.layernorm_mlp, {"x": X, "ln_weight": None, "ln_bias": None, "fc1_weight": FC1, "fc1_bias": None,
                                     "fc2_weight": FC2, "fc2_bias": None}, **kw)


def pe(**kw):
    return _call(ops.patch_embed, {"x": IMG, "weight": W}, **kw)


WINDOW = {
    "wa-empty-channels": (wa(qkv=torch.randn(2, 8, 8, 0)), ValueError, r"qkv must have non-empty last dim, got shape \(2, 8, 8, 0\)"),
    "wa-heads-bool": (wa(num_heads=True), TypeError, "num_heads must be an int, got bool True"),
    "wa-heads-negative": (wa(num_heads=-2), ValueError, "num_heads must be positive, got -2"),
    "wa-window-bool": (wa(window_size=True), TypeError, "window_size must be an int or a pair of ints, got True"),
    "wa-window-float": (wa(window_size=4.0), TypeError, "window_size must be an int or a pair of ints, got 4.0"),
    "wa-shift-triple": (wa(shift_size=(1, 1, 1)), TypeError, r"shift_size must be an int or a pair of ints, got \(1, 1, 1\)"),
    "wa-shift-equals-window": (wa(shift_size=(0, 4)), ValueError, r"shift_size \(0, 4\) must be smaller than window_size \(4, 4\)"),
    "wa-table-int": (wa(bias_table=TABLE.long()), TypeError, "bias_table dtype int64 not supported"),
    "wa-table-rank": (wa(bias_table=TABLE[None]), ValueError, r"bias_table must have 2 dims, got shape \(1, 49, 2\)"),
    "wa-qkv-bias-rank": (wa(qkv_bias=torch.randn(1, 48)), ValueError, r"qkv_bias must have 1 dims, got shape \(1, 48\)"),
    "wa-qkv-bias-device": (wa(qkv_bias=torch.randn(48, **META)), ValueError, "qkv_bias is on meta but the input is on cpu"),
    "wa-logit-device": (wa(logit_scale=torch.randn(2, **META)), ValueError, "logit_scale is on meta but the input is on cpu"),
    "wa-qkv-device": (wa(qkv=QKV.to("meta")), ValueError, "bias_table is on cpu but the input is on meta"),
    "wa-pad-first-int": (wa(pad_first=1), TypeError, "pad_first must be a bool, got 1"),
    "wa-scale-nan": (wa(scale=NAN), ValueError, "scale must be finite, got nan"),
    "wa-scale-str": (wa(scale="0.1"), TypeError, "scale must be a float, got str '0.1'"),
    "wa-mask-nan": (wa(mask_value=NAN), ValueError, "mask_value must be a float <= 0 such as -100.0, got nan"),
    "wa-backend-unknown": (wa(backend="gpu"), ValueError, "unknown backend 'gpu'"),
    "wa-backend-int": (wa(backend=1), TypeError, "backend must be a str.*got int 1"),
    "wa-triton-window": (wa(window_size=40, bias_table=None, backend="triton"), ValueError,
                         r"window \(40, 40\) has a side outside \[1, 32\]"),
    "wa-triton-head-dim": (wa(qkv=torch.randn(1, 4, 4, 3 * 256), num_heads=1, bias_table=None, backend="triton"),
                           ValueError, r"head_dim 256 outside \[1, 128\]"),
}

ATTENTION = {
    "attn-empty-channels": (attn(qkv=torch.randn(2, 5, 0)), ValueError, r"qkv must have non-empty last dim, got shape \(2, 5, 0\)"),
    "attn-no-tokens": (attn(qkv=torch.randn(2, 0, 48)), ValueError, r"qkv must hold at least one token, got shape \(2, 0, 48\)"),
    "attn-not-tensor": (attn(qkv=SEQ.numpy()), TypeError, "qkv must be a torch.Tensor, got ndarray"),
    "attn-int": (attn(qkv=SEQ.int()), TypeError, "qkv dtype int32 not supported"),
    "attn-heads-str": (attn(num_heads="2"), TypeError, "num_heads must be an int, got str '2'"),
    "attn-scale-inf": (attn(scale=INF), ValueError, "scale must be finite, got inf"),
    "attn-bias-bool": (attn(bias=torch.ones(5, 5, dtype=torch.bool)), TypeError, "bias dtype bool not supported"),
    "attn-bias-rank": (attn(bias=torch.randn(1, 2, 2, 5, 5)), ValueError, r"bias must have 2 or 3 or 4 dims, got shape \(1, 2, 2, 5, 5\)"),
    "attn-bias-tokens": (attn(bias=torch.randn(5, 6)), ValueError, r"bias of shape \(5, 6\) does not broadcast"),
    "attn-bias-device": (attn(bias=torch.randn(5, 5, **META)), ValueError, "bias is on meta but the input is on cpu"),
    "attn-backend-unknown": (attn(backend="flash"), ValueError, "unknown backend 'flash'"),
    "attn-triton-head-dim": (attn(qkv=torch.randn(1, 5, 3 * 256), num_heads=1, backend="triton"), ValueError,
                             r"head_dim 256 outside \[1, 128\]"),
}

LAYERNORM = {
    "ln-int": (ln(x=X.long()), TypeError, "x dtype int64 not supported"),
    "ln-rank-1": (ln(x=X[0, 0]), ValueError, r"x must have 2 or 3 or 4 dims, got shape \(16,\)"),
    "ln-rank-5": (ln(x=X[None, None]), ValueError, r"x must have 2 or 3 or 4 dims, got shape \(1, 1, 2, 5, 16\)"),
    "ln-no-channels": (ln(x=X[..., :0], weight=None, bias=None), ValueError, r"x must have a non-empty last dim, got shape \(2, 5, 0\)"),
    "ln-weight-rank": (ln(weight=torch.randn(1, 16)), ValueError, r"weight must have 1 dims, got shape \(1, 16\)"),
    "ln-bias-shape": (ln(bias=torch.randn(15)), ValueError, r"bias must have shape \(16,\), got \(15,\)"),
    "ln-weight-device": (ln(weight=torch.randn(16, **META)), ValueError, "weight is on meta but the input is on cpu"),
    "ln-eps-nan": (ln(eps=NAN), ValueError, "eps must be finite, got nan"),
    "ln-eps-inf": (ln(eps=INF), ValueError, "eps must be finite, got inf"),
    "ln-eps-negative": (ln(eps=-1e-5), ValueError, "eps must be a positive float, got -1e-05"),
    "ln-eps-str": (ln(eps="1e-5"), TypeError, "eps must be a float, got str '1e-5'"),
    "ln-backend-unknown": (ln(backend="fused"), ValueError, "unknown backend 'fused'"),
    "add-ln-residual-type": (add_ln(residual=1.0), TypeError, "residual must be a torch.Tensor, got float"),
    "add-ln-residual-device": (add_ln(residual=X.to("meta")), ValueError, "residual is on meta but the input is on cpu"),
    "add-ln-bias-shape": (add_ln(bias=torch.randn(17)), ValueError, r"bias must have shape \(16,\), got \(17,\)"),
    "add-ln-eps-zero": (add_ln(eps=0), ValueError, "eps must be a positive float, got 0.0"),
    "add-ln-backend-int": (add_ln(backend=0), TypeError, "backend must be a str"),
}

MLP = {
    "mlp-x-type": (mlp(x=[1.0]), TypeError, "x must be a torch.Tensor, got list"),
    "mlp-fc1-rank": (mlp(fc1_weight=FC1[0]), ValueError, r"fc1_weight must have 2 dims, got shape \(16,\)"),
    "mlp-fc1-int": (mlp(fc1_weight=FC1.long()), TypeError, "fc1_weight dtype int64 not supported"),
    "mlp-fc1-device": (mlp(fc1_weight=FC1.to("meta")), ValueError, "fc1_weight is on meta but the input is on cpu"),
    "mlp-fc2-device": (mlp(fc2_weight=FC2.to("meta")), ValueError, "fc2_weight is on meta but the input is on cpu"),
    "mlp-x-channels": (mlp(x=torch.randn(2, 5, 8)), ValueError, r"fc1_weight must have shape \(64, 8\), got \(64, 16\)"),
    "mlp-fc1-bias": (mlp(fc1_bias=torch.randn(16)), ValueError, r"fc1_bias must have shape \(64,\), got \(16,\)"),
    "mlp-fc2-bias": (mlp(fc2_bias=torch.randn(64)), ValueError, r"fc2_bias must have shape \(16,\), got \(64,\)"),
    "mlp-ln-bias": (mlp(ln_bias=torch.randn(64)), ValueError, r"ln_bias must have shape \(16,\), got \(64,\)"),
    "mlp-gamma-rank": (mlp(gamma=torch.randn(1, 16)), ValueError, r"gamma must have 1 dims, got shape \(1, 16\)"),
    "mlp-eps-nan": (mlp(eps=NAN), ValueError, "eps must be finite, got nan"),
    "mlp-gelu-none": (mlp(approximate=None), ValueError, r"approximate must be one of \('none', 'tanh'\), got None"),
    "mlp-backend-unknown": (mlp(backend="xla"), ValueError, "unknown backend 'xla'"),
}

PATCH = {
    "pe-x-rank": (pe(x=IMG[0]), ValueError, r"x must have 4 dims, got shape \(3, 16, 16\)"),
    "pe-x-device": (pe(x=IMG.to("meta")), ValueError, "x is on meta but the input is on cpu"),
    "pe-empty-image": (pe(x=torch.randn(2, 3, 0, 16)), ValueError, r"x must have non-empty H and W, got shape \(2, 3, 0, 16\)"),
    "pe-weight-empty": (pe(weight=torch.randn(0, 3, 4, 4)), ValueError, r"weight must have non-empty E, Cin, ph and pw, got shape \(0, 3, 4, 4\)"),
    "pe-weight-zero-patch": (pe(weight=torch.randn(24, 3, 0, 4)), ValueError, r"weight must have non-empty E, Cin, ph and pw, got shape \(24, 3, 0, 4\)"),
    "pe-weight-int": (pe(weight=W.long()), TypeError, "weight dtype int64 not supported"),
    "pe-bias-dtype": (pe(bias=torch.randn(24, dtype=torch.float64)), TypeError, r"bias dtype float64 not supported; expected one of \['float32'\]"),
    "pe-bias-device": (pe(bias=torch.randn(24, **META)), ValueError, "bias is on meta but the input is on cpu"),
    "pe-patch-norm-str": (pe(patch_norm="yes"), TypeError, "patch_norm must be a bool, got 'yes'"),
    "pe-dynamic-pad-str": (pe(dynamic_pad="no"), TypeError, "dynamic_pad must be a bool, got 'no'"),
    "pe-norm-eps-nan": (pe(patch_norm=True, norm_eps=NAN), ValueError, "norm_eps must be finite, got nan"),
    "pe-norm-bias": (pe(patch_norm=True, norm_bias=torch.randn(23)), ValueError, r"norm_bias must have shape \(24,\), got \(23,\)"),
    "pe-std": (pe(std=torch.rand(3, 1)), ValueError, r"std must have 1 dims, got shape \(3, 1\)"),
    "pe-prefix-batch": (pe(prefix_tokens=torch.randn(2, 1, 24)), ValueError, r"prefix_tokens must be \[P, 24\] or \[1, P, 24\], got \(2, 1, 24\)"),
    "pe-pos-rank": (pe(pos_embed=torch.randn(16 * 24)), ValueError, r"pos_embed must have 2 or 3 dims, got shape \(384,\)"),
    "pe-pos-dim": (pe(pos_embed=torch.randn(1, 16, 23)), ValueError, r"pos_embed must be \[1, L, 24\] or \[L, 24\], got \(1, 16, 23\)"),
    "pe-pos-grid-type": (pe(pos_embed=torch.randn(1, 16, 24), pos_embed_grid="4x4"), TypeError,
                         "pos_embed_grid must be an int or a pair of ints, got '4x4'"),
    "pe-map-pos-prefix": (pe(pos_embed=torch.randn(1, 17, 24), output_format="map"), ValueError,
                          "pos_embed has 17 entries but the 4x4 grid has 16 patches and 0 prefix tokens"),
    "pe-backend-unknown": (pe(backend="tpu"), ValueError, "unknown backend 'tpu'"),
}

CASES = {**WINDOW, **ATTENTION, **LAYERNORM, **MLP, **PATCH}


@pytest.mark.parametrize("case", list(CASES))
def test_rejected(case):
    call, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern):
        call()


def _tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=1, num_classes=3)


def test_patched_module_refuses_dtype_its_backend_lacks():
    model = _tiny_vit().double()
    vitkernels.apply(model, backend="cpu")
    with pytest.raises(vitkernels.NotSupportedError, match=r"(?s)backend 'cpu' cannot run .*dtype float64 not in"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))


def test_patched_module_refuses_unknown_backend_in_use_backend():
    model = _tiny_vit()
    vitkernels.apply(model)
    with pytest.raises(ValueError, match="unknown backend 'quick'"), vitkernels.use_backend("quick"):
        model(torch.randn(1, 3, 32, 32))
