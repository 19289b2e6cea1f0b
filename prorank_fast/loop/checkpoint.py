"""Resumable checkpoints: torch.distributed.checkpoint for the model and optimizer, JSON +
safetensors for the rest, written to a temporary folder then renamed.

A checkpoint folder holds DCP's shards and `.metadata`, and per rank r `extra_rank{r}.json`
(step, LR-scheduler state, RNG states, the loop's `state`) with every tensor of it in
`extra_rank{r}.safetensors`, named from the JSON by {"__type__": "tensor", "key": ...}. The
extra state is read with json and safetensors only: nothing in it is unpickled, and anything
that is not what this module writes (an old pickled extra_rank{r}.pt, a type tag or class it
does not know, a tensor the JSON names but the safetensors file lacks) is refused with
CheckpointError, before DCP reads anything.

DCP itself unpickles: its `.metadata` with plain pickle.load, and the non-tensor entries of
the state (the optimizer's param_groups) with torch.load(weights_only=False). So before
dcp.load the `.metadata` is unpickled once with an unpickler that resolves only the classes
DCP's metadata is made of (check_dcp_metadata), and the load runs with a planner that reads
those entries with weights_only=True (_WeightsOnlyLoadPlanner): a pickle planted in either
is refused with CheckpointError and never runs.

Encoded values: None, bool, int, float, str, lists, dicts with str keys as themselves; tuples,
dicts with other keys, tensors and the classes a stage names (`types`: each with
`to_state() -> dict` and a classmethod `from_state(dict)`) as {"__type__": ...} objects."""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError
from ..io import atomic_write_text
from .distributed import Dist, rng_state, set_rng_state

CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT = "prorank-fast/extra-state"
VERSION = 1
TAG = "__type__"
_STEP_NAME = re.compile(r"step_\d+")
# what restoring a decoded value may raise when the value is not what the code expects
_BAD_VALUE = (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError)


# What DCP's .metadata may name besides the classes of torch.distributed.checkpoint.metadata
# (Metadata, MetadataIndex, TensorStorageMetadata, ... and the memory-format enum): the
# filesystem writer's storage record, tensor sizes, dtypes, layouts and the folder path.
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module == "torch":
            allowed = name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)
        elif module == _DCP_METADATA_MODULE:  # its dataclasses and enums: building them runs no code of the pickle's
            allowed = isinstance(getattr(importlib.import_module(module), name, None), type)
        else:
            allowed = (module, name) in _DCP_METADATA_GLOBALS
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's checkpoint metadata")
        return super().find_class(module, name)


def check_dcp_metadata(folder: Path) -> None:
    """Unpickle `folder/.metadata` resolving only what DCP's metadata is made of; a pickle that
    names anything else (a function to call, a class of another module) raises CheckpointError
    before it can run. dcp.load unpickles the same file without such a check."""
    path = Path(folder) / ".metadata"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (not a torch.distributed.checkpoint folder); refusing to resume")
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure to read it as metadata is a refusal
        raise CheckpointError(f"{path}: not DCP metadata this version can read safely ({e}); refusing to resume") from e


def _weights_only_load_planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's planner, but the non-tensor entries are unpickled with weights_only=True first."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as e:
                raise CheckpointError(f"{read_item.dest_index.fqn}: not plain data ({e}); refusing to resume") from e
            clean = io.BytesIO()
            torch.save(obj, clean)  # the default planner re-reads it: now our own plain bytes
            clean.seek(0)
            super().load_bytes(read_item, clean)

    return _WeightsOnlyLoadPlanner()


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def encode_state(value: Any, types: tuple[type, ...] = ()) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able value, tensors by key) for `value`. TypeError names the first value that has
    no encoding (a bug in the caller: the loop's state holds only what checkpoints keep)."""
    tensors: dict[str, torch.Tensor] = {}

    def enc(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, np.generic):
            return enc(v.item(), path)
        if isinstance(v, torch.Tensor):
            key, n = path or "value", 1
            while key in tensors:
                key, n = f"{path}#{n}", n + 1
            tensors[key] = v.detach().to("cpu", copy=True).contiguous()
            return {TAG: "tensor", "key": key, "device": v.device.type}
        if isinstance(v, tuple):
            return {TAG: "tuple", "items": [enc(x, _join(path, i)) for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [enc(x, _join(path, i)) for i, x in enumerate(v)]
        if isinstance(v, dict):
            if all(isinstance(k, str) for k in v) and TAG not in v:
                return {k: enc(x, _join(path, k)) for k, x in v.items()}
            if all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in v):
                return {TAG: "dict", "items": [[k, enc(x, _join(path, k))] for k, x in v.items()]}
        if type(v) in types:
            return {TAG: "object", "class": type(v).__name__, "fields": enc(v.to_state(), path)}
        raise TypeError(f"checkpoint state {path or 'value'}: a {type(v).__name__} has no checkpoint encoding")

    return enc(value, ""), tensors


def decode_state(
    value: Any, tensors: dict[str, torch.Tensor], types: tuple[type, ...] = (), *, device=None, source: str = "state"
) -> Any:
    """The inverse of encode_state. Every tensor of `tensors` must be named exactly once; a
    tensor saved from a device of `device`'s type goes back to `device`, the others to the CPU.
    CheckpointError (naming `source` and where in it) for anything else."""
    by_name = {cls.__name__: cls for cls in types}
    unused = set(tensors)

    def fail(path: str, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: {path or 'the top level'}: {why}; refusing to resume from it")

    def expect(obj: dict, keys: set[str], path: str) -> None:
        if set(obj) != keys:
            raise fail(path, f"a {obj[TAG]!r} entry has the keys {sorted(obj)}, expected {sorted(keys)}")

    def dec(v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [dec(x, _join(path, i)) for i, x in enumerate(v)]
        if not isinstance(v, dict):
            raise fail(path, f"unexpected JSON value {type(v).__name__}")
        if TAG not in v:
            return {k: dec(x, _join(path, k)) for k, x in v.items()}
        tag = v[TAG]
        if tag == "tensor":
            expect(v, {TAG, "key", "device"}, path)
            key = v["key"]
            if not isinstance(key, str) or key not in tensors:
                raise fail(path, f"the tensor {key!r} is not in the safetensors file")
            unused.discard(key)
            t = tensors[key]
            if device is not None and isinstance(v["device"], str) and v["device"] == torch.device(device).type:
                t = t.to(device)
            return t
        if tag == "tuple":
            expect(v, {TAG, "items"}, path)
            if not isinstance(v["items"], list):
                raise fail(path, "a tuple's items are not a list")
            return tuple(dec(x, _join(path, i)) for i, x in enumerate(v["items"]))
        if tag == "dict":
            expect(v, {TAG, "items"}, path)
            items = v["items"]
            pairs_ok = isinstance(items, list) and all(isinstance(p, list) and len(p) == 2 for p in items)
            if not pairs_ok or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k, _ in items):
                raise fail(path, "a dict's items are not [key, value] pairs with str or int keys")
            return {k: dec(x, _join(path, k)) for k, x in items}
        if tag == "object":
            expect(v, {TAG, "class", "fields"}, path)
            cls = by_name.get(v["class"]) if isinstance(v["class"], str) else None
            if cls is None:
                raise fail(path, f"holds a {v['class']!r}, which is not a type this run keeps ({sorted(by_name)})")
            fields = dec(v["fields"], path)
            if not isinstance(fields, dict):
                raise fail(path, f"the fields of a {v['class']} are not an object")
            try:
                return cls.from_state(fields)
            except _BAD_VALUE as e:
                raise fail(path, f"not a valid {v['class']}: {e}") from e
        raise fail(path, f"unknown type tag {tag!r}")

    try:
        out = dec(value, "")
    except RecursionError as e:
        raise CheckpointError(f"{source}: nested too deeply; refusing to resume from it") from e
    if unused:
        raise CheckpointError(f"{source}: holds tensors the JSON does not name ({sorted(unused)[:5]}); refusing")
    return out


class Checkpointer:
    """output_dir/checkpoints/step_0000050/ (DCP shards + per-rank extra state) and a
    `latest` file naming the newest complete one. A checkpoint becomes visible only by an
    atomic rename after every rank has written, so a run killed at any moment leaves the
    previous checkpoint intact. `types`: the classes (to_state/from_state) the loop's state
    may hold."""

    def __init__(self, output_dir: Path, d: Dist, keep: int, types: tuple[type, ...] = ()):
        self.root = output_dir / CHECKPOINTS
        self.d = d
        self.keep = max(1, keep)
        self.types = tuple(types)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        name = pointer.read_text().strip()
        if not _STEP_NAME.fullmatch(name):
            raise CheckpointError(f"{pointer}: names {name[:80]!r}, not a step_N folder; refusing to resume from it")
        path = self.root / name
        return path if path.is_dir() else None

    def _extra_paths(self, folder: Path) -> tuple[Path, Path]:
        return folder / f"extra_rank{self.d.rank}.json", folder / f"extra_rank{self.d.rank}.safetensors"

    def save(self, step: int, model, optimizer, scheduler, state: dict) -> Path:
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import save_file
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
        extra = {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), "state": state}
        encoded, tensors = encode_state(extra, self.types)
        json_path, tensor_path = self._extra_paths(tmp)
        save_file(tensors, str(tensor_path), metadata={"format": "pt"})
        header = {"format": FORMAT, "version": VERSION, "rank": self.d.rank, "world": self.d.world}
        json_path.write_text(json.dumps({**header, **encoded}))
        self.d.barrier()
        if self.d.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write_text(self.root / LATEST, name)
            for old in sorted(self.root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()
        return final

    def read_extra(self, folder: Path) -> dict:
        """This rank's {"step", "scheduler", "rng", "state"} of the checkpoint in `folder`,
        read without unpickling anything; CheckpointError if it is not what save() writes."""
        from safetensors.torch import load_file

        json_path, tensor_path = self._extra_paths(folder)
        if not json_path.exists():
            old = folder / f"extra_rank{self.d.rank}.pt"
            if old.exists():
                raise CheckpointError(
                    f"{old}: a checkpoint written by an older prorank-fast, whose extra state is a pickle; "
                    "pickles can run code when loaded, so it is not loaded. Resume from a checkpoint written by "
                    "this version, or delete the checkpoints folder to start over"
                )
            raise CheckpointError(f"{folder}: no {json_path.name} (incomplete, or written by fewer processes)")
        try:
            payload = json.loads(json_path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise CheckpointError(f"{json_path}: not valid JSON ({e}); refusing to resume from it") from e
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
            raise CheckpointError(f"{json_path}: not a {FORMAT} v{VERSION} file; refusing to resume from it")
        missing = {"step", "scheduler", "rng", "state"} - set(payload)
        if missing:
            raise CheckpointError(f"{json_path}: lacks {sorted(missing)}; refusing to resume from it")
        if not tensor_path.exists():
            raise CheckpointError(f"{folder}: no {tensor_path.name} (incomplete); refusing to resume from it")
        try:
            tensors = load_file(str(tensor_path), device="cpu")
        except Exception as e:  # safetensors only parses (a JSON header, raw bytes): any failure is a bad file
            raise CheckpointError(f"{tensor_path}: not a readable safetensors file ({e}); refusing") from e
        body = {k: payload[k] for k in ("step", "scheduler", "rng", "state")}
        extra = decode_state(body, tensors, self.types, device=self.d.device, source=str(json_path))
        step, sched, rng, state = extra["step"], extra["scheduler"], extra["rng"], extra["state"]
        problems = []
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            problems.append(f"step {step!r} is not a count")
        if not isinstance(sched, dict):
            problems.append("scheduler is not an object")
        if not isinstance(rng, dict) or not isinstance(rng.get("python"), tuple) or "torch" not in rng:
            problems.append("rng is not {python: tuple, torch: tensor, ...}")
        if not isinstance(state, dict):
            problems.append("state is not an object")
        if problems:
            raise CheckpointError(f"{json_path}: {'; '.join(problems)}; refusing to resume from it")
        return extra

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        """Restore model, optimizer, scheduler and RNG states from `path`; returns the loop's
        state and sets `loaded_step`. The extra state is read and checked on every rank first:
        if any rank refuses its own, every rank raises, before DCP reads anything."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        error: CheckpointError | None = None
        try:
            extra = self.read_extra(path)
        except CheckpointError as e:
            error = e
        refused = self.d.all_sum([1.0 if error is not None else 0.0])[0]
        if error is not None:
            raise error
        if refused:
            raise CheckpointError(f"{path}: another rank refused its extra state (see its error); not resuming")
        check_dcp_metadata(path)
        unknown = set(extra["scheduler"]) - set(scheduler.state_dict())
        if unknown:
            raise CheckpointError(f"{path}: the scheduler state has unknown keys {sorted(unknown)}; refusing")

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp_state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            try:
                dcp.load(dcp_state, checkpoint_id=str(path), planner=_weights_only_load_planner())
            except BaseException as e:  # DCP wraps a rank's error in CheckpointException (a BaseException)
                cause = getattr(e, "failures", {}) or {}
                refused = [f for f in (cause.values() if isinstance(cause, dict) else []) if "refusing" in str(f)]
                if isinstance(e, CheckpointError) or refused:
                    raise CheckpointError(f"{path}: {refused[0] if refused else e}") from e
                raise
        set_state_dict(model, optimizer, model_state_dict=dcp_state["model"], optim_state_dict=dcp_state["optim"])
        try:
            scheduler.load_state_dict(extra["scheduler"])
            set_rng_state(extra["rng"])
        except _BAD_VALUE as e:
            raise CheckpointError(f"{path}: the scheduler or RNG state cannot be restored ({e})") from e
        self.loaded_step = extra["step"]
        return extra["state"]
