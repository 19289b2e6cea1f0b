"""Every entry point started from the checkout's root sees Hugging Face's `kernels`, never ours
(tests/import_probe.py says how it is checked). Here: the README's `pytest` (this run), the CLI and
a CPU benchmark; torchrun's launcher and its workers in test_trainer.py (test_fsdp_two_processes_match_one),
the GPU suite's processes in test_gpu_suite_smoke.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from import_probe import ROOT, check_records, hub_kernels, probe_env

ENTRY_POINTS = {
    "cli": [sys.executable, "-m", "prorank_fast.cli"],
    "benchmarks.grpo_loss": [sys.executable, "-m", "benchmarks.grpo_loss", "--n", "64", "--h", "16", "--v", "256",
                             "--s", "4", "--rounds", "1", "--warmup", "0", "--no-memory"],
}  # fmt: skip


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point_imports_hub_kernels(entry, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env = probe_env(env, tmp_path / "records")
    proc = subprocess.run(ENTRY_POINTS[entry], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_records(tmp_path / "records")


def test_this_pytest_run_imports_hub_kernels():
    """The README's `pytest` is this very run: pyproject's `pythonpath` put the checkout's root on
    sys.path, every test module has been collected, and transformers' model classes import."""
    from transformers import AutoModelForCausalLM  # noqa: F401

    assert str(ROOT) in [os.path.realpath(p or os.curdir) for p in sys.path]
    hub = hub_kernels()
    if hub is None:
        with pytest.raises(ModuleNotFoundError):
            import kernels  # noqa: F401
        return
    import kernels

    assert os.path.realpath(kernels.__file__) == hub


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_our_kernels_are_never_a_top_level_package(tmp_path):
    """From the root (first on sys.path), `kernels` is Hugging Face's package or, where that is not
    installed, nothing; none of our kernel modules is reachable under it."""
    hub = hub_kernels()
    probe = (
        "import os, kernels; print(os.path.realpath(kernels.__file__))\n"
        "for sub in ('grpo', 'reference', 'score'):\n"
        "    try:\n"
        "        __import__('kernels.' + sub)\n"
        "        print('importable: kernels.' + sub)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
    )
    if hub is not None:
        proc = _python(probe)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [hub], proc.stdout

    # where Hugging Face's package is absent: no site-packages (-S), the root first on the path
    absent = f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
    for name in ("kernels", "kernels.grpo"):
        proc = _python(absent + f"import {name}", "-S")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == "ModuleNotFoundError: No module named 'kernels'", proc.stderr

    # ours, under its one name, from anywhere
    code = "import prorank_fast.kernels as k; print(k.fused_linear_grpo_loss.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "prorank_fast.kernels.grpo", out.stderr
