"""Test setup. Without CUDA, Triton kernels run in its interpreter: TRITON_INTERPRET must be
set before triton is first imported, hence here, before any test module imports anything."""

import importlib.metadata
import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch is a hard requirement
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    # the upstream releases this run met (CI takes the latest; constraints.txt has the last passing set)
    versions = []
    for dist in ("transformers", "kernels", "triton", "sentence-transformers", "liger-kernel"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    return [
        f"torch {torch.__version__}, cuda={_HAS_CUDA}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}",
        ", ".join(versions),
    ]
