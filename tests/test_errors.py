"""Bad input is rejected at the public boundary with a ValueError or TypeError naming the values."""
import pytest
import torch

from vitkernels import ops

QKV = torch.randn(2, 8, 8, 3 * 16)
TABLE = torch.randn(49, 2)
IMG = torch.randn(2, 3, 16, 16)
W = torch.randn(24, 3, 4, 4)
X = torch.randn(2, 5, 16)
FC1, FC2 = torch.randn(64, 16), torch.randn(16, 64)


def wa(**kw):
    args = {"qkv": QKV, "num_heads": 2, "window_size": 4, "shift_size": 0, "bias_table": TABLE}
    args.update(kw)
    return lambda: ops.window_attention(**args)


def pe(**kw):
    args = {"x": IMG, "weight": W}
    args.update(kw)
    return lambda: ops.patch_embed(**args)


def mlp(**kw):
    args = dict(x=X, ln_weight=None, ln_bias=None, fc1_weight=FC1, fc1_bias=None, fc2_weight=FC2, fc2_bias=None)
    args.update(kw)
    return lambda: ops.layernorm_mlp(**args)


CASES = {
    "wa-not-tensor": (wa(qkv=QKV.tolist()), TypeError, "qkv must be a torch.Tensor"),
    "wa-rank": (wa(qkv=QKV[0]), ValueError, r"qkv must have 4 dims, got shape \(8, 8, 48\)"),
    "wa-int-dtype": (wa(qkv=QKV.long()), TypeError, "qkv dtype int64 not supported"),
    "wa-heads-split": (wa(num_heads=5), ValueError, r"last dim 48 must be 3 \* num_heads \* head_dim \(num_heads=5\)"),
    "wa-heads-zero": (wa(num_heads=0), ValueError, "num_heads must be positive, got 0"),
    "wa-heads-float": (wa(num_heads=2.0), TypeError, "num_heads must be an int"),
    "wa-window-triple": (wa(window_size=(4, 4, 4)), TypeError, r"window_size must be an int or a pair of ints, got \(4, 4, 4\)"),
    "wa-window-zero": (wa(window_size=(0, 4)), ValueError, r"window_size must be >= 1 in each dimension, got \(0, 4\)"),
    "wa-shift-negative": (wa(shift_size=-1), ValueError, r"shift_size must be >= 0 in each dimension, got \(-1, -1\)"),
    "wa-shift-too-big": (wa(shift_size=(2, 4)), ValueError, r"shift_size \(2, 4\) must be smaller than window_size \(4, 4\)"),
    "wa-table-shape": (wa(bias_table=torch.randn(49, 3)), ValueError, r"bias_table must have shape \(49, 2\), got \(49, 3\)"),
    "wa-table-window": (wa(window_size=(4, 2)), ValueError, r"bias_table must have shape \(21, 2\), got \(49, 2\)"),
    "wa-qkv-bias": (wa(qkv_bias=torch.randn(16)), ValueError, r"qkv_bias must have shape \(48,\), got \(16,\)"),
    "wa-logit-scale": (wa(logit_scale=torch.randn(3)), ValueError, r"logit_scale must hold num_heads=2 values, got shape \(3,\)"),
    "wa-scale-and-cosine": (wa(logit_scale=torch.randn(2), scale=0.1), ValueError, "scale and logit_scale are exclusive"),
    "wa-pad-first": (wa(pad_first="yes"), TypeError, "pad_first must be a bool, got 'yes'"),
    "wa-mask-value": (wa(mask_value=100.0), ValueError, "mask_value must be a float <= 0 such as -100.0, got 100.0"),
    "wa-empty-map": (wa(qkv=QKV[:, :0]), ValueError, "qkv map must be non-empty, got H=0, W=8"),
    "wa-table-device": (wa(bias_table=TABLE.to("meta")), ValueError, "bias_table is on meta but the input is on cpu"),
    "attn-rank": (lambda: ops.attention(X, 2), ValueError, r"last dim 16 must be 3 \* num_heads \* head_dim"),
    "attn-2d": (lambda: ops.attention(X[0], 2), ValueError, r"qkv must have 3 dims, got shape \(5, 16\)"),
    "attn-bias": (lambda: ops.attention(torch.randn(2, 5, 48), 2, bias=torch.randn(3, 5, 5)), ValueError,
                  r"bias of shape \(3, 5, 5\) does not broadcast to \[B, heads, N, N\] = \(2, 2, 5, 5\)"),
    "attn-scale": (lambda: ops.attention(torch.randn(2, 5, 48), 2, scale="big"), TypeError, "scale must be a float"),
    "pe-channels": (pe(x=torch.randn(2, 4, 16, 16)), ValueError, r"x has 4 channels but weight expects 3"),
    "pe-not-multiple": (pe(x=torch.randn(2, 3, 18, 16)), ValueError, "image size 18x16 is not a multiple of the patch size 4x4; pass dynamic_pad=True"),
    "pe-dtype-mismatch": (pe(x=IMG.half()), TypeError, "x dtype float16 not supported"),
    "pe-weight-rank": (pe(weight=W[0]), ValueError, r"weight must have 4 dims, got shape \(3, 4, 4\)"),
    "pe-bias": (pe(bias=torch.randn(23)), ValueError, r"bias must have shape \(24,\), got \(23,\)"),
    "pe-prefix": (pe(prefix_tokens=torch.randn(1, 23)), ValueError, r"prefix_tokens must be \[P, 24\]"),
    "pe-pos-length": (pe(pos_embed=torch.randn(1, 18, 24)), ValueError, "pos_embed has 18 entries but the 4x4 grid has 16 patches and 0 prefix tokens"),
    "pe-pos-grid": (pe(pos_embed=torch.randn(1, 10, 24), pos_embed_grid=(3, 3)), ValueError, "neither the 3x3 pos_embed_grid nor that plus 0 prefix tokens"),
    "pe-grid-without-pos": (pe(pos_embed_grid=(4, 4)), ValueError, "pos_embed_grid given without pos_embed"),
    "pe-map-prefix": (pe(prefix_tokens=torch.randn(1, 24), output_format="map"), ValueError, "output_format='map' cannot hold 1 prefix tokens"),
    "pe-format": (pe(output_format="nchw"), ValueError, r"output_format must be one of \('tokens', 'map'\), got 'nchw'"),
    "pe-norm-without-flag": (pe(norm_weight=torch.randn(24)), ValueError, "norm_weight / norm_bias given but patch_norm=False"),
    "pe-mean": (pe(mean=torch.randn(4)), ValueError, r"mean must have shape \(3,\), got \(4,\)"),
    "mlp-fc1": (mlp(fc1_weight=torch.randn(64, 15)), ValueError, r"fc1_weight must have shape \(64, 16\), got \(64, 15\)"),
    "mlp-fc2": (mlp(fc2_weight=torch.randn(16, 63)), ValueError, r"fc2_weight must have shape \(16, 64\), got \(16, 63\)"),
    "mlp-gamma": (lambda: ops.layernorm_mlp(X, None, None, FC1, None, FC2, None, gamma=torch.randn(15)), ValueError,
                  r"gamma must have shape \(16,\), got \(15,\)"),
    "mlp-gelu": (lambda: ops.layernorm_mlp(X, None, None, FC1, None, FC2, None, approximate="sigmoid"), ValueError,
                 "approximate must be one of"),
    "mlp-eps": (lambda: ops.layernorm_mlp(X, None, None, FC1, None, FC2, None, eps=0.0), ValueError, "eps must be a positive float, got 0.0"),
    "mlp-rank": (mlp(x=X[0, 0]), ValueError, r"x must have 2 or 3 or 4 dims, got shape \(16,\)"),
    "ln-weight": (lambda: ops.layernorm(X, torch.randn(8), None), ValueError, r"weight must have shape \(16,\), got \(8,\)"),
    "add-ln-shape": (lambda: ops.add_layernorm(X, X[:1], None, None), ValueError, r"residual must have shape \(2, 5, 16\), got \(1, 5, 16\)"),
    "add-ln-dtype": (lambda: ops.add_layernorm(X, X.double(), None, None), TypeError, "residual dtype float64 not supported"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rejected(case):
    call, error, pattern = CASES[case]
    with pytest.raises(error, match=pattern):
        call()
