"""The shape registry: every benchmarked shape, named after the model and stage it comes from.

Shapes are built with batch 1; :func:`scaled` (or ``shape.scaled(batch)``) sets the batch, and
:func:`for_device` picks a subset and the batch for a device: a small batch on CPU, the model's
``gpu_batch`` on GPU.

Subsets: ``"quick"`` (a handful per op, the CPU default and the shapes bench/device_check.py times),
``"standard"`` (the GPU default: one shape per distinct geometry that matters), ``"all"``.
``VITKERNELS_BENCH_SHAPES`` overrides the default.

Sources (timm): Swin-T/S/B at 224 (patch 4, stage maps 56/28/14/7, C 96/96/128 doubling per stage,
heads 3-6-12-24 for T and S, 4-8-16-32 for B, window 7, every second block shifted by 3; a stage
whose map is at most the window runs unshifted with the map as window). Swin-S has Swin-T's block
shapes (only its depth differs). SwinV2-T at 256 (patch 4, maps 64/32/16/8, C 96, heads 3-6-12-24,
cosine attention) with window 8 or 16. ViT-S/B/L/16 at 224 and 384 (N = 1 + 14*14 = 197 or
1 + 24*24 = 577 tokens; dims 384/768/1024, heads 6/12/16, MLP ratio 4). ``MODELS`` holds the same
models whole (bench/test_bench_models.py), under the short names of their shapes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Self, Sequence, TypeVar

CPU_BATCH = 1
SUBSETS = ("quick", "standard", "all")


@dataclass(frozen=True, kw_only=True)
class _Batched:
    """What every shape has: its batch, the batch of GPU runs, and the subsets it is in."""

    batch: int = 1
    gpu_batch: int = 128
    subsets: frozenset[str] = frozenset({"all"})

    def scaled(self, batch: int) -> Self:
        return replace(self, batch=batch)


@dataclass(frozen=True)
class WindowAttentionShape(_Batched):
    """ops.window_attention: qkv [batch, height, width, 3*dim]."""

    name: str
    model: str
    height: int
    width: int
    dim: int
    heads: int
    window: int
    shift: int
    cosine: bool = False  # SwinV2: logit_scale instead of a softmax scale

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class AttentionShape(_Batched):
    """ops.attention: qkv [batch, tokens, 3*dim]."""

    name: str
    model: str
    tokens: int
    dim: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


@dataclass(frozen=True)
class TokenShape(_Batched):
    """ops.layernorm_mlp, ops.layernorm, ops.add_layernorm: x [batch, tokens, dim], MLP hidden = ratio * dim."""

    name: str
    model: str
    tokens: int
    dim: int
    mlp_ratio: int = 4
    eps: float = 1e-6

    @property
    def hidden(self) -> int:
        return self.mlp_ratio * self.dim

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


@dataclass(frozen=True)
class PatchEmbedShape(_Batched):
    """ops.patch_embed: image [batch, in_chans, image, image] -> [batch, prefix + N, dim] or a map."""

    name: str
    model: str
    image: int
    patch: int
    dim: int
    in_chans: int = 3
    prefix_tokens: int = 0
    pos_embed: bool = False
    patch_norm: bool = False
    output_format: str = "tokens"
    # a uint8 image with the per-channel normalization folded into the op (the preprocessing a
    # float image has already been through)
    uint8: bool = False

    @property
    def grid(self) -> int:
        return self.image // self.patch

    @property
    def patches(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class ModelShape(_Batched):
    """A whole timm model: images [batch, 3, image, image]."""

    name: str
    model: str
    image: int


Shape = TypeVar("Shape", WindowAttentionShape, AttentionShape, TokenShape, PatchEmbedShape, ModelShape)


def scaled(shape: Shape, batch: int) -> Shape:
    """``shape`` with ``batch`` images."""
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    return shape.scaled(batch)


def _tags(*names: str) -> frozenset[str]:
    # "quick" shapes are in "standard" too, and everything is in "all".
    tags = set(names) | {"all"}
    if "quick" in tags:
        tags.add("standard")
    return frozenset(tags)


# --- the models ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Swin:
    model: str
    image: int
    embed_dim: int
    heads: tuple[int, int, int, int]
    window: int
    cosine: bool = False


SWIN = (
    _Swin("swin_tiny_patch4_window7_224", 224, 96, (3, 6, 12, 24), 7),
    _Swin("swin_small_patch4_window7_224", 224, 96, (3, 6, 12, 24), 7),
    _Swin("swin_base_patch4_window7_224", 224, 128, (4, 8, 16, 32), 7),
    _Swin("swinv2_tiny_window8_256", 256, 96, (3, 6, 12, 24), 8, cosine=True),
    _Swin("swinv2_tiny_window16_256", 256, 96, (3, 6, 12, 24), 16, cosine=True),
)
_SWIN_SHORT = {
    "swin_tiny_patch4_window7_224": "swin_t",
    "swin_small_patch4_window7_224": "swin_s",
    "swin_base_patch4_window7_224": "swin_b",
    "swinv2_tiny_window8_256": "swinv2_t_w8",
    "swinv2_tiny_window16_256": "swinv2_t_w16",
}


@dataclass(frozen=True)
class _ViT:
    model: str
    short: str
    image: int
    dim: int
    heads: int

    @property
    def tokens(self) -> int:
        return 1 + (self.image // 16) ** 2

    @property
    def gpu_batch(self) -> int:
        return 128 if self.image <= 224 else 32

    @property
    def model_gpu_batch(self) -> int:
        """Training batch that keeps activations and AdamW state well inside 80 GB (bf16)."""
        if self.dim >= 1024:
            return 64 if self.image <= 224 else 16
        return 128 if self.image <= 224 else 32


VIT = tuple(
    _ViT(f"vit_{size}_patch16_{image}", f"vit_{size[0]}_{image}", image, dim, heads)
    for image in (224, 384)
    for size, dim, heads in (("small", 384, 6), ("base", 768, 12), ("large", 1024, 16))
)

# Subset membership by name; everything not listed is in "all" only.
_QUICK = {
    "swin_t.s1.w7", "swin_t.s1.w7.shifted", "swinv2_t_w8.s1.w8.shifted", "vit_s_224", "vit_b_224",
    "swin_t.s1", "swin_t", "vit_b_224.uint8",
}
_STANDARD = {
    "swin_t.s2.w7", "swin_t.s2.w7.shifted", "swin_t.s3.w7", "swin_t.s3.w7.shifted", "swin_t.s4.w7",
    "swin_b.s1.w7.shifted", "swin_b.s3.w7.shifted", "swinv2_t_w16.s1.w16.shifted", "swinv2_t_w16.s2.w16",
    "vit_l_224", "vit_s_384", "vit_b_384", "vit_l_384", "swin_t.s3", "swin_b.s1", "swin_b", "swinv2_t_w8",
}


def _subsets(name: str) -> frozenset[str]:
    if name in _QUICK:
        return _tags("quick")
    if name in _STANDARD:
        return _tags("standard")
    return _tags()


def _swin_stages(swin: _Swin):
    """(stage, map side, channels, heads, window, shift) of each stage, with timm's window clamp."""
    side = swin.image // 4
    for stage, heads in enumerate(swin.heads, start=1):
        window = min(swin.window, side)
        shift = 0 if side <= swin.window else window // 2
        yield stage, side, swin.embed_dim * 2 ** (stage - 1), heads, window, shift
        side //= 2


def _window_attention_shapes() -> list[WindowAttentionShape]:
    shapes = []
    for swin in SWIN:
        short = _SWIN_SHORT[swin.model]
        for stage, side, dim, heads, window, shift in _swin_stages(swin):
            for shifted in ((False, True) if shift else (False,)):
                name = f"{short}.s{stage}.w{window}" + (".shifted" if shifted else "")
                shapes.append(WindowAttentionShape(
                    name=name, model=swin.model, height=side, width=side, dim=dim, heads=heads, window=window,
                    shift=shift if shifted else 0, cosine=swin.cosine, subsets=_subsets(name)))
    return shapes


def _attention_shapes() -> list[AttentionShape]:
    return [AttentionShape(name=vit.short, model=vit.model, tokens=vit.tokens, dim=vit.dim, heads=vit.heads,
                           gpu_batch=vit.gpu_batch, subsets=_subsets(vit.short)) for vit in VIT]


def _token_shapes() -> list[TokenShape]:
    shapes = [TokenShape(name=vit.short, model=vit.model, tokens=vit.tokens, dim=vit.dim, eps=1e-6,
                         gpu_batch=vit.gpu_batch, subsets=_subsets(vit.short)) for vit in VIT]
    for swin in SWIN:
        short = _SWIN_SHORT[swin.model]
        for stage, side, dim, _, _, _ in _swin_stages(swin):
            name = f"{short}.s{stage}"
            shapes.append(TokenShape(name=name, model=swin.model, tokens=side * side, dim=dim, eps=1e-5,
                                     subsets=_subsets(name)))
    return shapes


def _patch_embed_shapes() -> list[PatchEmbedShape]:
    shapes = [PatchEmbedShape(name=vit.short + suffix, model=vit.model, image=vit.image, patch=16, dim=vit.dim,
                              prefix_tokens=1, pos_embed=True, uint8=uint8, gpu_batch=vit.gpu_batch,
                              subsets=_subsets(vit.short + suffix))
              for vit in VIT for suffix, uint8 in (("", False), (".uint8", True))]
    for swin in SWIN:
        short = _SWIN_SHORT[swin.model]
        if short == "swinv2_t_w16":
            continue  # the same stem as swinv2_t_w8
        shapes.append(PatchEmbedShape(name=short, model=swin.model, image=swin.image, patch=4, dim=swin.embed_dim,
                                      patch_norm=True, output_format="map", subsets=_subsets(short)))
    return shapes


def _model_shapes() -> list[ModelShape]:
    shapes = [ModelShape(name=_SWIN_SHORT[swin.model], model=swin.model, image=swin.image, gpu_batch=128,
                         subsets=_subsets(_SWIN_SHORT[swin.model])) for swin in SWIN]
    shapes += [ModelShape(name=vit.short, model=vit.model, image=vit.image, gpu_batch=vit.model_gpu_batch,
                          subsets=_subsets(vit.short)) for vit in VIT]
    return shapes


WINDOW_ATTENTION: tuple[WindowAttentionShape, ...] = tuple(_window_attention_shapes())
ATTENTION: tuple[AttentionShape, ...] = tuple(_attention_shapes())
TOKENS: tuple[TokenShape, ...] = tuple(_token_shapes())
PATCH_EMBED: tuple[PatchEmbedShape, ...] = tuple(_patch_embed_shapes())
MODELS: tuple[ModelShape, ...] = tuple(_model_shapes())

# Per op, inputs so small that a call's kernels take microseconds: the shapes of the host's path
# (bench/test_bench_ops.py::test_host_path), of no model and in no subset, batch 1 on every device.
# One shifted 7x7 window, 17 tokens, 8 tokens of 32 channels, a 32x32 image in 16x16 patches.
HOST = {
    "window_attention": WindowAttentionShape("host.w7.shifted", "none", height=7, width=7, dim=16, heads=1,
                                             window=7, shift=3, subsets=frozenset()),
    "attention": AttentionShape("host.n17", "none", tokens=17, dim=16, heads=1, subsets=frozenset()),
    **{op: TokenShape("host.c32", "none", tokens=8, dim=32, subsets=frozenset())
       for op in ("layernorm_mlp", "layernorm", "add_layernorm")},
    "patch_embed": PatchEmbedShape("host.p16", "none", image=32, patch=16, dim=32, prefix_tokens=1, pos_embed=True,
                                   subsets=frozenset()),
}

# Shapes per op of vitkernels.ops.OPS.
BY_OP = {
    "window_attention": WINDOW_ATTENTION,
    "attention": ATTENTION,
    "layernorm_mlp": TOKENS,
    "layernorm": TOKENS,
    "add_layernorm": TOKENS,
    "patch_embed": PATCH_EMBED,
}


def default_subset(device: str) -> str:
    """``VITKERNELS_BENCH_SHAPES`` if set, else "standard" on GPU and "quick" on CPU."""
    subset = os.environ.get("VITKERNELS_BENCH_SHAPES") or ("standard" if device == "cuda" else "quick")
    if subset not in SUBSETS:
        raise ValueError(f"VITKERNELS_BENCH_SHAPES={subset!r}; expected one of {SUBSETS}")
    return subset


def select(shapes: Iterable[Shape], subset: str) -> list[Shape]:
    """The shapes of one subset (quick is in standard, standard in all)."""
    if subset not in SUBSETS:
        raise ValueError(f"subset {subset!r}; expected one of {SUBSETS}")
    return [s for s in shapes if subset in s.subsets]


def for_device(shapes: Sequence[Shape], device: str, subset: Optional[str] = None,
               batch: Optional[int] = None) -> list[Shape]:
    """The subset for ``device`` with its batch: ``batch``, else CPU_BATCH on CPU, else each shape's gpu_batch."""
    chosen = select(shapes, subset or default_subset(device))
    if batch is not None:
        return [scaled(s, batch) for s in chosen]
    return [scaled(s, CPU_BATCH if device != "cuda" else s.gpu_batch) for s in chosen]


def by_name(shapes: Iterable[Shape], name: str) -> Shape:
    for shape in shapes:
        if shape.name == name:
            return shape
    raise KeyError(f"no shape named {name!r}")
