"""A kernel fault that leaves the CUDA context unusable stops the test or benchmark run, naming
the test, instead of failing every later test with the same error (vitkernels.testing)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from vitkernels import testing

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


class FakeItem:
    nodeid = "tests/ops/test_x.py::test_y[cuda]"


@pytest.fixture
def faulted_cuda(monkeypatch):
    """A CUDA runtime whose synchronize raises what an earlier kernel fault leaves behind."""
    def synchronize():
        raise RuntimeError(f"{ILLEGAL_ADDRESS}\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)


def test_no_fault_without_an_initialized_cuda_context(monkeypatch):
    def synchronize():
        raise AssertionError("synchronize must not run before CUDA is initialized")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    assert testing.cuda_fault() is None
    testing.stop_on_cuda_fault(FakeItem())


def test_a_fault_is_its_first_line(faulted_cuda):
    assert testing.cuda_fault() == ILLEGAL_ADDRESS


def test_a_plain_run_stops_naming_the_test(faulted_cuda, monkeypatch):
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    with pytest.raises(pytest.exit.Exception) as stopped:
        testing.stop_on_cuda_fault(FakeItem())
    assert stopped.value.returncode == 3
    assert str(stopped.value.msg) == f"{testing.CUDA_CONTEXT_LOST} during or before {FakeItem.nodeid}: {ILLEGAL_ADDRESS}"


def test_an_xdist_worker_exits_for_a_fresh_one(faulted_cuda, monkeypatch, capsys):
    class Exited(Exception):
        pass

    def exit_now(code):
        raise Exited(code)

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(Exited) as exited:
        testing.stop_on_cuda_fault(FakeItem())
    assert exited.value.args == (3,)
    assert f"{testing.CUDA_CONTEXT_LOST} during or before {FakeItem.nodeid}" in capsys.readouterr().err


def test_a_run_stops_after_the_faulting_test(tmp_path):
    """A real pytest run with the hook: the test after the fault never runs, the exit status is 3."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent("""
        import pytest
        from vitkernels import testing

        FAULTED = []
        testing.cuda_fault = lambda: FAULTED[0] if FAULTED else None

        @pytest.hookimpl(trylast=True)
        def pytest_runtest_teardown(item):
            testing.stop_on_cuda_fault(item)
    """))
    (tmp_path / "test_run.py").write_text(textwrap.dedent("""
        from conftest import FAULTED

        def test_before():
            pass

        def test_faults():
            FAULTED.append("an illegal memory access was encountered")

        def test_after():
            raise AssertionError("ran after the CUDA context was lost")
    """))
    env = dict(os.environ)
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_run.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 3, output
    assert f"{testing.CUDA_CONTEXT_LOST} during or before test_run.py::test_faults" in output, output
    assert "2 passed" in output and "failed" not in output, output
