"""Writing files so that a reader never sees half of one: write beside, then rename.

A run can be killed at any moment (a preempted job, Ctrl-C); whatever it had written before
stays whole, and what it was writing either appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_dir", "atomic_write_text"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and os.replace."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """atomic_write_bytes for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_dir(target: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with `fill(tmp_folder)`, then move it to `target`, replacing any old one.

    The folder appears under its name only once `fill` has returned; an old `target` is
    removed just before (os.replace cannot replace a non-empty folder), so a kill between the
    two leaves the complete new folder under its temporary name and the old one gone, never
    a partial folder under `target`.
    """
    target = Path(target)
    tmp = target.with_name(f".tmp_{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    fill(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target
