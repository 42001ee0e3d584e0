"""vitkernels.testing: the tolerance policy of assert_close on constructed errors, and the narrowing of
the autotuners for test runs on a GPU."""
import pytest
import torch

from vitkernels.ops._triton import autotuned_kernels, gemm_config
from vitkernels.testing import assert_close, first_tile_of_each_depth


def _with_error(reference: torch.Tensor, error: float, dtype: torch.dtype) -> torch.Tensor:
    """``reference`` in ``dtype`` with ``error`` added to its first element."""
    out = reference.clone()
    out.view(-1)[0] += error
    return out.to(dtype)


@pytest.fixture
def reference():
    return torch.randn(64, dtype=torch.float64)


def test_fp32_relative_rule(reference):
    scale = reference.abs().max().item()
    assert_close(_with_error(reference, 0.5e-5 * scale, torch.float32), reference)
    with pytest.raises(AssertionError, match="relative tolerance 1e-05"):
        assert_close(_with_error(reference, 3e-5 * scale, torch.float32), reference)
    assert_close(_with_error(reference, 3e-5 * scale, torch.float32), reference, grad=True)


def test_low_precision_needs_its_reference(reference):
    with pytest.raises(ValueError, match="low_precision_reference"):
        assert_close(reference.half(), reference)


def test_low_precision_bound_is_a_multiple_of_the_torch_error(reference):
    low = _with_error(reference, 0.1, torch.float64)
    assert_close(_with_error(reference, 0.15, torch.float16), reference, low_precision_reference=low)
    with pytest.raises(AssertionError, match="max abs") as failure:
        assert_close(_with_error(reference, 0.3, torch.float16), reference, low_precision_reference=low)
    assert "2.0 x low-precision torch" in str(failure.value) and "mean abs" in str(failure.value)
    assert_close(_with_error(reference, 0.28, torch.float16), reference, low_precision_reference=low, grad=True)


def test_rounded_inputs_raise_a_lucky_base(reference):
    """A low-precision run that errs less than rounding its inputs costs does not set the bound."""
    low = _with_error(reference, 0.01, torch.float64)
    rounded = _with_error(reference, 0.1, torch.float64)
    actual = _with_error(reference, 0.15, torch.float16)
    with pytest.raises(AssertionError):
        assert_close(actual, reference, low_precision_reference=low)
    assert_close(actual, reference, low_precision_reference=low, rounded_input_reference=rounded)
    with pytest.raises(AssertionError, match="rounded inputs"):
        assert_close(_with_error(reference, 0.3, torch.float16), reference, low_precision_reference=low,
                     rounded_input_reference=rounded)
    # a smaller rounding error leaves the low-precision base in place
    with pytest.raises(AssertionError, match="low-precision torch"):
        assert_close(actual, reference, low_precision_reference=low, rounded_input_reference=low)


class _Tuner:
    def __init__(self, configs):
        self.configs = configs


def test_first_tile_of_each_depth_narrows_and_restores_autotuners():
    tiles = [gemm_config(128, 128, 64, 8, 3), gemm_config(128, 64, 64, 4, 4), gemm_config(128, 128, 32, 8, 3),
             gemm_config(64, 64, 32, 4, 3)]
    tuner = _Tuner(list(tiles))
    with pytest.raises(RuntimeError, match="inside"):
        with first_tile_of_each_depth([tuner]):
            assert tuner.configs == [tiles[0], tiles[2]]
            raise RuntimeError("inside")
    assert tuner.configs == tiles
    kernels = autotuned_kernels()
    assert len(kernels) >= 2 and all(hasattr(k, "configs") for k in kernels)
    with first_tile_of_each_depth():
        assert all(len({c.kwargs["BLOCK_K"] for c in k.configs}) == len(k.configs) for k in kernels)
