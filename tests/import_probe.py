"""What `import kernels` gives in the processes of an entry point started from the checkout's root.

The checkout's root holds our kernels/ folder (installed as prorank_fast.kernels); `python -m`,
pytest (`pythonpath`) and torchrun put that root first on sys.path, and transformers imports
Hugging Face's package of the same name. `probe_env` puts import_probe_site/sitecustomize.py on
PYTHONPATH (with the root itself), so that every Python process the command starts (torchrun's
workers, the GPU suite's parts) records, as it exits, what `import kernels` gives from its
sys.path, what the run itself imported under that name, and whether transformers' model classes
import; `check_records` asserts they all saw Hugging Face's package (or none, where it is absent).
Used by tests/test_entry_points.py, and by the tests that already run torchrun and the GPU suite.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(__file__).resolve().parent / "import_probe_site"


def hub_kernels() -> str | None:
    """Where Hugging Face's `kernels` is installed (None: not installed), read from its metadata:
    find_spec would look through this process's sys.path, which holds the root."""
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    return os.path.realpath(dist.locate_file("kernels/__init__.py"))


def probe_env(env: dict, records: Path) -> dict:
    """`env` with the probe on: records go to the (new, empty) folder `records`."""
    records.mkdir(parents=True)
    env = dict(env)
    env["PRORANK_IMPORT_PROBE"] = str(records)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SITE), str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def check_records(records: Path, *, processes: int = 1, imported_by_run: bool = False) -> list[dict]:
    """Every process saw Hugging Face's `kernels` (or none) with the root on its path, and
    transformers' model classes imported; at least `processes` of them recorded; with
    `imported_by_run`, transformers imported the package during the run itself."""
    reports = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    assert len(reports) >= processes, reports
    hub = hub_kernels()
    for report in reports:
        assert str(ROOT) in report["path"], report  # the root was on the path, so the check means something
        assert report["kernels"] == hub, report
        assert report["transformers"] == "ok", report
        assert report["kernels_imported_by_run"] in (None, hub), report
    if imported_by_run and hub is not None:
        assert any(r["kernels_imported_by_run"] == hub for r in reports), reports
    return reports
