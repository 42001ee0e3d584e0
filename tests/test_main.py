import pytest

from vitkernels import __main__ as cli
from vitkernels import _demo, backends


@pytest.fixture(autouse=True)
def _no_interpreted_triton(monkeypatch):
    """The op tests cover Triton under the interpreter; here it would only make the demo slow."""
    monkeypatch.setitem(backends._UNAVAILABLE, "triton", "left out of the CLI tests (interpreter)")


def test_info_names_every_backend(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "cuda", "cpu"):
        assert f"  {name} " in out, out
    assert "torch   available" in out


def test_check_runs_every_op_against_the_reference(capsys):
    assert cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for case in _demo.CASES:
        assert case.op in out
    assert "all backends agree with the reference" in out


def test_demo_rows_carry_errors_for_torch():
    rows = _demo.run("cpu", repeats=1)
    torch_rows = [r for r in rows if r.backend == "torch"]
    assert len(torch_rows) == len(_demo.CASES)
    assert all(r.rel_error is not None and r.rel_error < 1e-5 for r in torch_rows)


def test_unknown_command_exits():
    with pytest.raises(SystemExit):
        cli.main(["fly"])


def test_bench_one_model_with_plot(capsys, tmp_path):
    plot = tmp_path / "bench.png"
    assert cli.main(["bench", "--model", "vit_tiny_patch16_224", "--batch", "1", "--repeats", "1",
                     "--device", "cpu", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "vit_tiny_patch16_224" in out and " stock " in out and " torch " in out
    assert plot.stat().st_size > 0


def test_bench_training_step(capsys, monkeypatch):
    monkeypatch.setitem(backends._UNAVAILABLE, "cpu", "left out of this test (time)")
    assert cli.main(["bench", "--model", "test_vit", "--batch", "2", "--repeats", "1", "--device", "cpu",
                     "--train"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("training step (forward, backward, AdamW), timm test_vit, batch 2")
    rows = [line.split() for line in out.splitlines() if line.startswith("test_vit ")]
    assert {row[1] for row in rows} == {"stock", "torch"}
    # each backend trains its own copy from the same weights: the first forward matches the stock one
    assert all(float(row[3]) < 1e-4 for row in rows if row[1] != "stock"), out


def test_bench_rejects_bad_batch():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--model", "vit_tiny_patch16_224", "--batch", "0"])


@pytest.mark.parametrize("zoo", ["timm", "torchvision", "transformers"])
def test_bench_names_an_unknown_model(zoo, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--zoo", zoo, "--model", "no_such_model"])
    assert f"--model: {zoo} has no model 'no_such_model'" in capsys.readouterr().err


def test_aot_prints_each_kernels_resources(capsys):
    assert cli.main(["aot", "--arch", "90", "--match", "^_gelu_bwd_kernel"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("_gelu_bwd_kernel")]
    assert len(rows) == 2, out  # fp16 and bf16
    for row in rows:
        registers, stack = row[-2:]
        assert row[-4] == "sm_90" and 0 < int(registers) <= 255 and int(stack) >= 0, out
    assert "2 compiled" in out, out


def test_aot_refuses_an_unknown_arch():
    with pytest.raises(SystemExit):
        cli.main(["aot", "--arch", "75"])
