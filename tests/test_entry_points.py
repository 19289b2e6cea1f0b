"""Every entry point started from the checkout's root sees Hugging Face's `kernels`, never ours.

The checkout's root holds our kernels/ folder (installed as prorank_fast.kernels), and `python -m`,
pytest (`pythonpath`) and torchrun put that root first on sys.path, while transformers imports
Hugging Face's package of the same name. Each entry point below runs as users run it, from the root
and with the root on PYTHONPATH too; tests/import_probe/sitecustomize.py makes every Python process
it starts (torchrun's worker, the GPU suite's parts) record, as it exits, what `import kernels`
gives from its sys.path, what the run itself imported under that name, and whether transformers'
model classes import.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).resolve().parent / "import_probe"
BIN = Path(sys.executable).parent


def _hub_kernels() -> str | None:
    """Where Hugging Face's `kernels` is installed (None: not installed), read from its metadata:
    find_spec would look through this process's sys.path, which holds the root."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return os.path.realpath(dist.locate_file("kernels/__init__.py"))


def _script(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert found, f"{name} is not installed next to {sys.executable}"
    return found


ENTRY_POINTS = {
    # the README's test command; collecting every test module is where the wrong `kernels` broke it
    "pytest": lambda tmp: [_script("pytest"), "--collect-only", "-q", "-p", "no:cacheprovider"],
    "cli": lambda tmp: [sys.executable, "-m", "prorank_fast.cli"],
    # the README's launcher on the embedded default, cut to two stage-2 steps
    "torchrun": lambda tmp: [
        _script("torchrun"), "--standalone", "--nproc_per_node", "1", "-m", "prorank_fast.cli", "train",
        f"output_dir={tmp / 'run'}", "stage1.enabled=false", "data.demo_queries=40", "data.eval=null",
        "stage2.max_steps=2", "stage2.checkpoint_every=0",
    ],
    "benchmarks.grpo_loss": lambda tmp: [
        sys.executable, "-m", "benchmarks.grpo_loss", "--n", "64", "--h", "16", "--v", "256", "--s", "4",
        "--rounds", "1", "--warmup", "0", "--no-memory",
    ],
    "benchmarks.gpu_suite": lambda tmp: [
        sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--sections", "peak", "--out-dir", str(tmp),
    ],
}  # fmt: skip
# Python processes each entry point starts at least: torchrun's launcher and its worker; the suite's
# parent and its kernels part
MIN_PROCESSES = {"torchrun": 2, "benchmarks.gpu_suite": 2}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_entry_point_imports_hub_kernels(entry, tmp_path):
    records = tmp_path / "records"
    records.mkdir()
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PRORANK_IMPORT_PROBE"] = str(records)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROBE), str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = ENTRY_POINTS[entry](tmp_path)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    reports = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    assert len(reports) >= MIN_PROCESSES.get(entry, 1), reports
    hub = _hub_kernels()
    for report in reports:
        assert str(ROOT) in report["path"], report  # the root was on the path, so the check means something
        assert report["kernels"] == hub, report
        assert report["transformers"] == "ok", report
        assert report["kernels_imported_by_run"] in (None, hub), report
    if entry in ("pytest", "torchrun") and hub is not None:
        # transformers imported the package during the run itself, not only in the probe
        assert any(r["kernels_imported_by_run"] == hub for r in reports), reports


def _python(code: str, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)


def test_our_kernels_are_never_a_top_level_package(tmp_path):
    """From the root (first on sys.path), `kernels` is Hugging Face's package or, where that is not
    installed, nothing; none of our kernel modules is reachable under it."""
    hub = _hub_kernels()
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
