"""vitkernels.apply on Hugging Face transformers ViT, DeiT and Swin models."""
import pytest
import torch

import vitkernels
from model_helpers import check_patched_matches_stock, perturb, record_op_calls

transformers = pytest.importorskip("transformers")

VIT = dict(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=96, num_labels=5)
SWIN = dict(image_size=36, patch_size=4, embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=5)
MODELS = {
    # name: (model class, config class, config, input H, W)
    "vit": ("ViTForImageClassification", "ViTConfig", VIT, 32, 32),
    "vit-gelu-tanh-eager": ("ViTForImageClassification", "ViTConfig",
                            dict(VIT, hidden_act="gelu_pytorch_tanh", attn_implementation="eager"), 32, 32),
    "vit-gelu-new": ("ViTForImageClassification", "ViTConfig", dict(VIT, hidden_act="gelu_new"), 32, 32),
    "deit-distilled": ("DeiTForImageClassificationWithTeacher", "DeiTConfig", VIT, 32, 32),
    "swin-padded": ("SwinForImageClassification", "SwinConfig", SWIN, 36, 44),
    "swinv2-padded": ("Swinv2ForImageClassification", "Swinv2Config", SWIN, 36, 44),
}


def _build(key, batch=2):
    model_cls, config_cls, config, h, w = MODELS[key]
    torch.manual_seed(0)
    config = dict(config)
    attn = config.pop("attn_implementation", None)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    if attn:
        model.set_attn_implementation(attn)
    return perturb(model).eval(), torch.randn(batch, 3, h, w)


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits


@pytest.mark.parametrize("key", list(MODELS))
def test_patched_matches_stock(key):
    model, x = _build(key)
    report = check_patched_matches_stock(Logits(model), x, label=key)
    assert not report.left, str(report)


def test_attention_function_is_used_and_reverted(monkeypatch):
    model, x = _build("vit")
    expected = model(x).logits
    calls = record_op_calls(monkeypatch)
    report = vitkernels.apply(model, mlp=False)
    assert "attention function 'vitkernels'" in str(report)
    assert model.config._attn_implementation == "vitkernels"
    model(x)
    assert calls == ["attention", "attention"]
    assert vitkernels.revert(model) == 2
    assert model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(model(x).logits, expected)


def test_swin_mlp_needs_attention_and_state_dict_is_unchanged():
    model, x = _build("swin-padded")
    state = list(model.state_dict())
    report = vitkernels.apply(model, attention=False)
    assert len(report) == 0 and all("needs the attention fusion" in e.reason for e in report.left), str(report)
    report = vitkernels.apply(model)
    assert len(report) == 4 and list(model.state_dict()) == state


def test_compile_patched_swin():
    model, x = _build("swin-padded")
    expected = model(x).logits
    vitkernels.apply(model)
    torch.testing.assert_close(torch.compile(Logits(model), fullgraph=True)(x), expected)
