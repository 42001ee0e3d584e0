"""Every model of the zoo tests, patched against stock on a GPU: bf16 with backend "auto" as users
get it (Triton first), Triton in fp32, and the cuda backend in bf16 (its attention runs fp16 and
bf16 only). The error rule is model_helpers.check_patched_matches_stock's."""
import pytest
import torch

import test_timm
import test_torchvision
import test_transformers
from model_helpers import check_patched_matches_stock
from vitkernels import backends

pytestmark = pytest.mark.cuda

RUNS = [pytest.param(backend, dtype, id=f"{backend}-{str(dtype).replace('torch.', '')}")
        for backend, dtype in (("auto", torch.bfloat16), ("triton", torch.float32), ("cuda", torch.bfloat16))]
# zoo: (its test module, what makes its model return a logits tensor)
ZOOS = {"timm": (test_timm, None), "torchvision": (test_torchvision, None),
        "transformers": (test_transformers, test_transformers.Logits)}
MODELS = [pytest.param(zoo, key, id=f"{zoo}-{key}") for zoo, (module, _) in ZOOS.items() for key in module.MODELS]


@pytest.mark.parametrize("backend,dtype", RUNS)
@pytest.mark.parametrize("zoo,key", MODELS)
def test_patched_matches_stock_on_gpu(zoo, key, backend, dtype):
    reason = None if backend == "auto" else backends.unavailable_reason(backend)
    if reason:
        pytest.skip(f"{backend}: {reason}")
    module, wrap = ZOOS[zoo]
    model, x = module._build(key)
    model = wrap(model) if wrap else model
    dtype_name = str(dtype).replace("torch.", "")
    check_patched_matches_stock(model.to("cuda", dtype), x.to("cuda", dtype), backend,
                                f"{zoo} {key} ({backend}, {dtype_name})")
