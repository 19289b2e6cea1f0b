"""Resumable checkpoints: torch.distributed.checkpoint, written to a temporary folder then renamed."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from ..io import atomic_write_text
from .distributed import Dist, rng_state, set_rng_state

CHECKPOINTS = "checkpoints"


LATEST = "latest"


class Checkpointer:
    """output_dir/checkpoints/step_000050/ (DCP shards + per-rank extra state) and a
    `latest` file naming the newest complete one. A checkpoint becomes visible only by an
    atomic rename after every rank has written, so a run killed at any moment leaves the
    previous checkpoint intact."""

    def __init__(self, output_dir: Path, d: Dist, keep: int):
        self.root = output_dir / CHECKPOINTS
        self.d = d
        self.keep = max(1, keep)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int, model, optimizer, scheduler, extra: dict) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"step_{step:07d}"
        final, tmp = self.root / name, self.root / f".tmp_{name}"
        if self.d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.d.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process: expected
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(
            {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra},
            tmp / f"extra_rank{self.d.rank}.pt",
        )
        self.d.barrier()
        if self.d.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.root / LATEST, name)
            for old in sorted(self.root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(path / f"extra_rank{self.d.rank}.pt", weights_only=False)
        self.loaded_step = int(extra["step"])
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        return extra
