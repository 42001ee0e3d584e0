import pytest
import torch

import vitkernels
from vitkernels import backends, ops


def _capability(**overrides):
    fields = {"devices": frozenset({"cpu"}), "dtypes": frozenset({torch.float32})}
    fields.update(overrides)
    return backends.Capability(**fields)


def test_capability_lists_every_reason():
    cap = _capability(head_dims=(32, 128), window=(4, 24), features=frozenset({"shift"}))
    query = backends.Query(device="cuda", dtype=torch.float16, head_dim=16, window=(2, 7),
                           features=frozenset({"shift", "cosine"}))
    reasons = cap.reasons(query)
    assert len(reasons) == 5, reasons
    text = " | ".join(reasons)
    for word in ("device 'cuda'", "float16", "head_dim 16", "window (2, 7)", "cosine"):
        assert word in text, text


def test_capability_accepts_supported_query():
    cap = _capability(head_dims=(16, 64), features=frozenset({"shift"}))
    assert cap.reasons(backends.Query(device="cpu", dtype=torch.float32, head_dim=32,
                                      features=frozenset({"shift"}))) == []


def test_auto_takes_first_backend_without_reasons(monkeypatch):
    table = {"cpu": _capability(dtypes=frozenset({torch.float64})), "torch": backends.reference_capability()}
    monkeypatch.setitem(backends._UNAVAILABLE, "cpu", None)
    query32 = backends.Query(device="cpu", dtype=torch.float32)
    query64 = backends.Query(device="cpu", dtype=torch.float64)
    assert backends.select("op", table, query32, "auto") == "torch"
    assert backends.select("op", table, query64, "auto") == "cpu"


def test_explicit_backend_never_falls_back(monkeypatch):
    table = {"cpu": _capability(), "torch": backends.reference_capability()}
    monkeypatch.setitem(backends._UNAVAILABLE, "cpu", "extension not built")
    with pytest.raises(backends.NotSupportedError) as info:
        backends.select("myop", table, backends.Query(device="cpu", dtype=torch.float16), "cpu")
    message = str(info.value)
    assert "'cpu' cannot run myop" in message
    assert "extension not built" in message and "float16" in message


def test_unimplemented_backend_is_refused_with_reason():
    table = {"torch": backends.reference_capability()}
    with pytest.raises(vitkernels.NotSupportedError, match="no cuda implementation of myop"):
        backends.select("myop", table, backends.Query(device="cpu", dtype=torch.float32), "cuda")


def test_use_backend_nests_and_argument_wins(monkeypatch):
    monkeypatch.delenv("VITKERNELS_BACKEND", raising=False)
    assert backends.requested() == "auto"
    with vitkernels.use_backend("torch"):
        assert backends.requested() == "torch"
        with vitkernels.use_backend("cpu"):
            assert backends.requested() == "cpu"
            assert backends.requested("triton") == "triton"
        assert backends.requested() == "torch"
    assert backends.requested() == "auto"


def test_use_backend_reaches_the_op():
    with vitkernels.use_backend("cuda"), pytest.raises(vitkernels.NotSupportedError, match="cuda"):
        ops.attention(torch.randn(1, 5, 12), 2)
    with vitkernels.use_backend("cuda"):
        ops.attention(torch.randn(1, 5, 12), 2, backend="torch")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("VITKERNELS_BACKEND", "triton")
    assert backends.requested() == "triton"
    with vitkernels.use_backend("torch"):
        assert backends.requested() == "torch"
    monkeypatch.setenv("VITKERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VITKERNELS_BACKEND: unknown backend 'fastest'"):
        backends.requested()


@pytest.mark.parametrize("bad,error", [("gpu", ValueError), (3, TypeError)])
def test_unknown_backend_names(bad, error):
    with pytest.raises(error, match="backend"):
        ops.layernorm(torch.randn(2, 4), None, None, backend=bad)
    with pytest.raises(error, match="backend"):
        with vitkernels.use_backend(bad):
            pass


def test_auto_picks_a_backend_on_cpu():
    out = ops.layernorm(torch.randn(3, 8), torch.ones(8), torch.zeros(8), backend="auto")
    torch.testing.assert_close(out.mean(-1), torch.zeros(3), atol=1e-6, rtol=0)


def test_every_backend_has_a_description_and_priority_is_known():
    assert set(backends.DESCRIPTIONS) == set(backends.BACKENDS)
    for order in backends.PRIORITY.values():
        assert set(order) <= set(backends.BACKENDS) and order[-1] == "torch"
