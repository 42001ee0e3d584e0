"""vitkernels.apply on torchvision ViT and Swin models."""
import pytest
import torch

import vitkernels
from model_helpers import check_patched_matches_stock, check_training_matches_stock, perturb

models = pytest.importorskip("torchvision.models")

SMALL_SWIN = dict(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                  stochastic_depth_prob=0.1, num_classes=7)
MODELS = {
    # name: (constructor, input H, W)
    "vit": (lambda: models.VisionTransformer(32, 8, 2, 4, 48, 96, num_classes=7), 32, 32),
    "swin-padded": (lambda: models.SwinTransformer(**SMALL_SWIN), 36, 44),
    "swin-window-wider-than-map": (lambda: models.SwinTransformer(**{**SMALL_SWIN, "window_size": [7, 4]}), 20, 52),
    "swin-v2": (lambda: models.SwinTransformer(**SMALL_SWIN, block=models.swin_transformer.SwinTransformerBlockV2,
                                               downsample_layer=models.swin_transformer.PatchMergingV2), 36, 44),
}


def _build(key, batch=2):
    ctor, h, w = MODELS[key]
    torch.manual_seed(0)
    return perturb(ctor()).eval(), torch.randn(batch, 3, h, w)


@pytest.mark.parametrize("key", list(MODELS))
def test_patched_matches_stock(key):
    model, x = _build(key)
    check_patched_matches_stock(model, x, label=key)


def test_report_revert_and_state_dict():
    model, x = _build("swin-padded")
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    report = vitkernels.apply(model)
    assert "4 x ShiftedWindowAttention" in str(report) and "4 x SwinTransformerBlock" in str(report)
    assert list(model.state_dict()) == list(state)
    torch.testing.assert_close(model(x), before)
    assert vitkernels.revert(model) == 8
    assert type(model.features[1][0].attn) is models.swin_transformer.ShiftedWindowAttention


def test_training_falls_back_with_stochastic_depth():
    model, x = _build("swin-padded")
    check_training_matches_stock(model, x, "runs torchvision's forward in training mode")


def test_compile_patched_vit():
    model, x = _build("vit")
    expected = model(x)
    vitkernels.apply(model)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), expected)
