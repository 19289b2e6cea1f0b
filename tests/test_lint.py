"""The tree stays ruff-clean (lint and format), as the project's standards ask."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]], ids=["check", "format"])
def test_ruff_clean(args):
    ruff = shutil.which("ruff")
    assert ruff is not None, "ruff is a test dependency: pip install -e '.[test]'"
    proc = subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_top_level_kernels_package(tmp_path):
    """PyPI's unrelated `kernels` package is probed by transformers: ours must only be
    importable as prorank_fast.kernels."""
    import sys

    code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('kernels') is None else 1)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path)
    assert proc.returncode == 0, "a top-level `kernels` package is importable"
    code = "import prorank_fast.kernels as k; print(k.fused_linear_grpo_loss.__module__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "prorank_fast.kernels.grpo", out.stderr
