"""Functional API: validate at the boundary, pick the backend, call the op.

Every function takes ``backend=`` ("torch", "triton", "cuda", "cpu", "auto"); see
vitkernels.backends for how one is chosen.
"""
from .attention.op import attention
from .layernorm_mlp.op import add_layernorm, layernorm, layernorm_mlp
from .patch_embed.op import patch_embed
from .window_attention.op import window_attention

OPS = ("window_attention", "attention", "patch_embed", "layernorm_mlp", "layernorm", "add_layernorm")


def backend_table(op: str) -> dict:
    """{backend name: Capability} of one op of OPS."""
    from .attention import op as attention_op
    from .layernorm_mlp import op as layernorm_mlp_op
    from .patch_embed import op as patch_embed_op
    from .window_attention import op as window_attention_op

    tables = {
        "window_attention": window_attention_op.BACKENDS,
        "attention": attention_op.BACKENDS,
        "patch_embed": patch_embed_op.BACKENDS,
        **layernorm_mlp_op.BACKENDS,
    }
    if op not in tables:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return tables[op]


__all__ = ["window_attention", "attention", "patch_embed", "layernorm_mlp", "layernorm", "add_layernorm",
           "OPS", "backend_table"]
