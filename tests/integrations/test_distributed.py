"""DistributedDataParallel over two CPU processes (gloo): patched gradients equal the stock model's."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

timm = pytest.importorskip("timm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import vitkernels
    from vitkernels.testing import errors

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    stock = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=(36, 44), window_size=4,
                              embed_dim=24, depths=(2, 2), num_heads=(2, 4), num_classes=5).eval()
    patched = copy.deepcopy(stock)
    vitkernels.apply(patched, backend="torch")
    torch.manual_seed(100 + rank)  # each rank sees its own batch
    x = torch.randn(2, 3, 36, 44)
    worst = 0.0
    models = [torch.nn.parallel.DistributedDataParallel(m) for m in (stock, patched)]
    for model in models:
        model(x).square().sum().backward()
    for (name, a), (_, b) in zip(stock.named_parameters(), patched.named_parameters()):
        worst = max(worst, errors(b.grad, a.grad).rel)
    torch.save({"worst": worst, "grad": patched.head.fc.weight.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_gloo_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r, result in enumerate(results):
        assert result["worst"] < 1e-4, f"rank {r}: worst relative gradient difference {result['worst']:.2e}"
    torch.testing.assert_close(results[0]["grad"], results[1]["grad"], rtol=0, atol=0)  # all-reduced
