"""vitkernels.apply on timm models: patched against unpatched, both ways."""
import copy

import pytest
import torch

import vitkernels
from model_helpers import check_patched_matches_stock, check_training_matches_stock, perturb, record_op_calls
from vitkernels.testing import errors

timm = pytest.importorskip("timm")

SWIN = dict(window_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 4))
MODELS = {
    # name: (timm model name, constructor overrides, input H, W)
    "vit-class-token-layerscale": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, init_values=0.1), 32, 32),
    "vit-registers-no-embed-class": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, reg_tokens=2,
                                                                  no_embed_class=True), 32, 32),
    "vit-dynamic-size": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, dynamic_img_size=True), 40, 24),
    "vit-dynamic-size-no-pos-embed": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, pos_embed="none",
                                                                   dynamic_img_size=True), 40, 24),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, depth=2), 32, 32),
    "swin-padded-non-square": ("swin_tiny_patch4_window7_224", dict(img_size=(36, 44), **SWIN), 36, 44),
    "swinv2": ("swinv2_tiny_window8_256", dict(img_size=(32, 40), **SWIN), 32, 40),
    "mobilevit": ("mobilevit_xxs", dict(), 64, 64),
}


def _build(key, batch=2):
    name, kwargs, h, w = MODELS[key]
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, num_classes=7, **kwargs)).eval()
    return model, torch.randn(batch, 3, h, w)


@pytest.mark.parametrize("key", list(MODELS))
def test_patched_matches_stock(key):
    stock, x = _build(key)
    check_patched_matches_stock(stock, x, label=key)


@pytest.mark.parametrize("key", ["vit-class-token-layerscale", "swin-padded-non-square"])
def test_batch_one_and_channels_last(key):
    model, x = _build(key, batch=1)
    check_patched_matches_stock(model, x, backend="auto", label=f"{key} batch 1")
    vitkernels.apply(model)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), model(x))


def test_state_dict_round_trip_and_revert():
    model, x = _build("swin-padded-non-square")
    stock_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(x)
    vitkernels.apply(model)
    patched_state = model.state_dict()
    assert list(patched_state) == list(stock_state)
    assert all(torch.equal(patched_state[k], v) for k, v in stock_state.items())
    fresh, _ = _build("swin-padded-non-square")
    vitkernels.apply(fresh)
    fresh.load_state_dict(stock_state, strict=True)
    torch.testing.assert_close(fresh(x), before)
    assert vitkernels.revert(model) == 4
    assert type(model.layers[0].blocks[0]) is timm.models.swin_transformer.SwinTransformerBlock
    assert "vk_backend" not in model.layers[0].blocks[0].__dict__
    torch.testing.assert_close(model(x), before)


def test_report_and_idempotence():
    model, _ = _build("vit-class-token-layerscale")
    first = vitkernels.apply(model)
    text = str(first)
    assert len(first) == 3 and "3 modules replaced" in text and "2 x Block" in text and "1 x VisionTransformer" in text
    second = vitkernels.apply(model)
    assert len(second) == 0
    assert [e.action for e in second.entries] == ["already patched"] * 3


def test_switches_choose_the_fused_ops(monkeypatch):
    model, x = _build("vit-class-token-layerscale")
    calls = record_op_calls(monkeypatch)
    for switches, expected in (({"attention": False, "patch_embed": False}, {"layernorm_mlp"}),
                               ({"attention": False, "mlp": False}, {"patch_embed"}),
                               ({}, {"patch_embed", "attention", "layernorm_mlp"})):
        vitkernels.revert(model)
        vitkernels.apply(model, **switches)
        calls.clear()
        model(x)
        assert set(calls) == expected, (switches, calls)
    vitkernels.revert(model)
    report = vitkernels.apply(model, attention=False, mlp=False, patch_embed=False)
    assert len(report) == 0 and all("switched off" in e.reason for e in report.left)


def test_backend_without_a_kernel_leaves_that_part(monkeypatch):
    model, _ = _build("swin-padded-non-square")
    monkeypatch.setitem(vitkernels.ops.backend_table("window_attention"), "cpu", vitkernels.backends.reference_capability())
    monkeypatch.delitem(vitkernels.ops.backend_table("layernorm_mlp"), "cpu", raising=False)
    report = vitkernels.apply(model, backend="cpu")
    assert len(report) == 4 and "mlp not fused (backend 'cpu' has no layernorm_mlp kernel)" in str(report)


def test_training_with_drop_path_keeps_timm_semantics():
    name, kwargs, h, w = MODELS["swin-padded-non-square"]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, drop_path_rate=0.3, num_classes=7, **kwargs)
    check_training_matches_stock(model, torch.randn(2, 3, h, w), "runs timm's forward in training mode")


def test_no_grad_inference_mode_and_compile():
    model, x = _build("swin-padded-non-square")
    expected = model(x)
    vitkernels.apply(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected)


@pytest.mark.parametrize("key", ["vit-class-token-layerscale", "swin-padded-non-square"])
def test_compile_with_dynamic_shapes(key):
    """dynamic=True traces float attributes (the attention scale, drop-path rates) as symbolic floats,
    which the ops' checks and the blocks' training switch must take without breaking the graph."""
    model, x = _build(key)
    vitkernels.apply(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        inputs = torch.cat([x, x])[:batch]
        with torch.no_grad():
            torch.testing.assert_close(compiled(inputs), model(inputs))
    model.train()  # Swin-T's drop-path is active: its blocks take timm's forward
    compiled(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        vitkernels.apply("swin")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        vitkernels.apply(torch.nn.Linear(2, 2), backend="fast")


@pytest.mark.parametrize("key", ["vit-class-token-layerscale", "swin-padded-non-square", "swinv2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast(key, dtype):
    """Under autocast the patched model is no further from fp64 than stock timm is (2x, plus a floor)."""
    stock, x = _build(key)
    patched, reference = copy.deepcopy(stock), copy.deepcopy(stock).double()
    vitkernels.apply(patched, backend="torch")
    with torch.autocast("cpu", dtype=dtype):
        ours, theirs = patched(x).float(), stock(x).float()
    expected = reference(x.double())
    err_ours, err_theirs = (errors(o, expected) for o in (ours, theirs))
    assert torch.isfinite(ours).all(), f"{key} {dtype}: patched logits are not finite"
    # stock timm SwinV2 overflows to NaN under fp16 autocast; the fused op keeps fp32 statistics
    stock_error = err_theirs.max_abs if torch.isfinite(theirs).all() else 5e-3 * expected.abs().max().item()
    bound = 2 * stock_error + 1e-3 * expected.abs().max().item()
    assert err_ours.max_abs <= bound, f"{key} {dtype}: patched {err_ours}; stock {err_theirs}; bound {bound:.3e}"
