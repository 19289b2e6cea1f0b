"""Checkpoints in-process (one process, no process group): the extra state (step, scheduler,
RNG, the loop's state with a stage-1 Rollouts) round-trips exactly through JSON +
safetensors, and a tampered or old pickled extra state is refused without running anything."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prorank_fast.errors import CheckpointError
from prorank_fast.grpo import Rollouts
from prorank_fast.loop import Checkpointer, Dist, warmup_cosine
from prorank_fast.modeling import build_tiny_model

TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
V = 50
D = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


class Payload:
    """Unpickling it creates `path`: the proof that a pickle ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _setup(seed: int):
    torch.manual_seed(seed)
    model = build_tiny_model(TINY, V, 0, torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, 10, 2))
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, steps: int) -> None:
    for _ in range(steps):
        ids = torch.randint(1, V, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def _rollouts() -> Rollouts:
    g = torch.Generator().manual_seed(3)
    return Rollouts(
        prompts=[[5, 6, 7], [8, 9]],
        labels=[1, 0],
        completions=[[16], [15, 2], [16, 2], [15]],
        advantages=torch.randn(4, generator=g),
        rewards=torch.randn(4, generator=g, dtype=torch.float64),
        reward_parts={"format": torch.ones(4, dtype=torch.float64), "pkg.mod:fn": torch.zeros(4)},
        zero_variance=torch.tensor([False, True]),
        group_size=2,
        old_logprobs=[torch.randn(3, generator=g), torch.empty(0)],
        ref_logprobs=None,
        extra={"note": (1, "a"), 7: [0.5]},
    )


def _state() -> dict:
    return {"eval_before": {"ndcg@10": 0.25, "queries": 3, "nan": float("nan")}, "rollouts": (4, _rollouts())}


def _saved(tmp_path: Path, steps: int = 3):
    model, optimizer, scheduler = _setup(0)
    _train(model, optimizer, scheduler, steps)
    random.seed(11)
    torch.manual_seed(12)
    ckpt = Checkpointer(tmp_path, D, keep=2, types=(Rollouts,))
    folder = ckpt.save(steps, model, optimizer, scheduler, _state())
    return ckpt, folder, (model, optimizer, scheduler)


def _assert_same(a, b, path="state"):
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, path
        assert torch.equal(a, b), path
    elif isinstance(a, Rollouts):
        _assert_same(a.to_state(), b.to_state(), path)
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def test_extra_state_round_trips_exactly(tmp_path):
    ckpt, folder, (model, optimizer, scheduler) = _saved(tmp_path)
    assert sorted(p.name for p in folder.glob("extra_*")) == ["extra_rank0.json", "extra_rank0.safetensors"]
    assert not list(folder.glob("*.pt"))
    draws = (random.random(), torch.rand(3))  # what the restored RNGs must give next
    expected_params = {k: v.clone() for k, v in model.state_dict().items()}
    expected_optim = optimizer.state_dict()
    expected_sched = scheduler.state_dict()

    model2, optimizer2, scheduler2 = _setup(1)  # other weights, a fresh optimizer and schedule
    random.seed(99)
    torch.manual_seed(99)
    assert ckpt.latest() == folder
    state = ckpt.load(folder, model2, optimizer2, scheduler2)

    assert ckpt.loaded_step == 3
    assert random.random() == draws[0] and torch.equal(torch.rand(3), draws[1])
    _assert_same(state, _state())
    assert state["rollouts"][1].kept_groups() == [0]
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected_params[k]), k
    _assert_same(optimizer2.state_dict()["state"], expected_optim["state"], "optim")
    assert optimizer2.state_dict()["param_groups"] == expected_optim["param_groups"]
    assert scheduler2.state_dict() == expected_sched
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()
    # and training goes on identically
    torch.manual_seed(5)
    _train(model, optimizer, scheduler, 1)
    torch.manual_seed(5)
    _train(model2, optimizer2, scheduler2, 1)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_rng_draws_after_resume_equal_uninterrupted(tmp_path):
    ckpt, folder, _ = _saved(tmp_path)
    expected = (random.random(), torch.rand(4))
    random.seed(0)
    torch.manual_seed(0)
    ckpt.load(folder, *_setup(2))
    got = (random.random(), torch.rand(4))
    assert got[0] == expected[0] and torch.equal(got[1], expected[1])


def _tamper_pickle_json(folder: Path, marker: Path) -> None:
    (folder / "extra_rank0.json").write_bytes(pickle.dumps({"step": 3, "x": Payload(marker)}))


def _tamper_pickle_safetensors(folder: Path, marker: Path) -> None:
    torch.save({"x": Payload(marker)}, folder / "extra_rank0.safetensors")


def _tamper_pickle_both(folder: Path, marker: Path) -> None:
    _tamper_pickle_json(folder, marker)
    _tamper_pickle_safetensors(folder, marker)


def _edit_json(fn):
    def tamper(folder: Path, marker: Path) -> None:
        path = folder / "extra_rank0.json"
        data = json.loads(path.read_text())
        fn(data)
        path.write_text(json.dumps(data))

    return tamper


def _malformed_json(folder: Path, marker: Path) -> None:
    path = folder / "extra_rank0.json"
    path.write_text(path.read_text()[:-10])


def _missing_tensor(folder: Path, marker: Path) -> None:
    path = folder / "extra_rank0.safetensors"
    tensors = load_file(str(path))
    del tensors["rng.torch"]
    save_file(tensors, str(path))


def _extra_tensor(folder: Path, marker: Path) -> None:
    path = folder / "extra_rank0.safetensors"
    save_file({**load_file(str(path)), "smuggled": torch.zeros(2)}, str(path))


TAMPERED = {
    "pickle-as-json": (_tamper_pickle_json, "not valid JSON"),
    "pickle-as-safetensors": (_tamper_pickle_safetensors, "not a readable safetensors file"),
    "pickle-as-both": (_tamper_pickle_both, "not valid JSON"),
    "malformed-json": (_malformed_json, "not valid JSON"),
    "unknown-tag": (
        _edit_json(lambda d: d["state"].update(x={"__type__": "pickle", "data": "gASV"})),
        "unknown type tag",
    ),
    "unknown-class": (
        _edit_json(lambda d: d["state"].update(x={"__type__": "object", "class": "Popen", "fields": {}})),
        "not a type this run keeps",
    ),
    "bad-rollouts-fields": (
        _edit_json(lambda d: d["state"]["rollouts"]["items"][1]["fields"].pop("labels")),
        "not a valid Rollouts",
    ),
    "missing-tensor": (_missing_tensor, "is not in the safetensors file"),
    "unnamed-tensor": (_extra_tensor, "does not name"),
    "wrong-format": (_edit_json(lambda d: d.update(format="something-else")), "not a prorank-fast"),
    "bad-step": (_edit_json(lambda d: d.update(step="3")), "not a count"),
    "bad-scheduler-key": (_edit_json(lambda d: d["scheduler"].update(optimizer=1)), "unknown keys"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_extra_state_is_refused_and_nothing_runs(tmp_path, case):
    tamper, message = TAMPERED[case]
    ckpt, folder, _ = _saved(tmp_path / "run")
    marker = tmp_path / "pwned"
    tamper(folder, marker)
    model, optimizer, scheduler = _setup(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        ckpt.load(folder, model, optimizer, scheduler)
    assert not marker.exists()
    # refused before DCP read anything: the model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_old_pickled_extra_state_is_refused_without_unpickling(tmp_path):
    ckpt, folder, _ = _saved(tmp_path / "run")
    marker = tmp_path / "pwned"
    for name in ("extra_rank0.json", "extra_rank0.safetensors"):
        (folder / name).unlink()
    torch.save({"step": 3, "state": {"x": Payload(marker)}}, folder / "extra_rank0.pt")  # what the old code wrote
    with pytest.raises(CheckpointError, match=r"extra_rank0\.pt.*older prorank-fast.*pickle.*not loaded"):
        ckpt.load(folder, *_setup(1))
    assert not marker.exists()
    torch.load(folder / "extra_rank0.pt", weights_only=False)  # what the old code did: the payload is live
    assert marker.exists()


def test_latest_must_name_a_step_folder(tmp_path):
    ckpt, _, _ = _saved(tmp_path)
    (ckpt.root / "latest").write_text("../../elsewhere")
    with pytest.raises(CheckpointError, match="not a step_N folder"):
        ckpt.latest()


def test_state_without_an_encoding_fails_at_save(tmp_path):
    model, optimizer, scheduler = _setup(0)
    ckpt = Checkpointer(tmp_path, D, keep=1)  # Rollouts not declared
    with pytest.raises(TypeError, match=r"state\.rollouts\.1: a Rollouts has no checkpoint encoding"):
        ckpt.save(1, model, optimizer, scheduler, _state())


def test_tampered_dcp_metadata_is_refused_and_nothing_runs(tmp_path):
    """DCP unpickles .metadata with plain pickle: a payload planted there is refused first."""
    ckpt, folder, _ = _saved(tmp_path / "run")
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    model, optimizer, scheduler = _setup(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"\.metadata: not DCP metadata .*io\.open is not part of"):
        ckpt.load(folder, model, optimizer, scheduler)
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dcp_metadata_that_names_a_foreign_class_is_refused(tmp_path):
    """The allowlist is the point: real metadata passes (the round trips above), metadata
    naming a class outside DCP's metadata module does not, even a harmless one."""
    from prorank_fast.loop.checkpoint import check_dcp_metadata

    _, folder, _ = _saved(tmp_path / "run")
    check_dcp_metadata(folder)  # what save() wrote is accepted
    (folder / ".metadata").write_bytes(pickle.dumps(random.Random(0)))
    with pytest.raises(CheckpointError, match=r"random\.Random is not part of DCP's checkpoint metadata"):
        check_dcp_metadata(folder)


def test_optimizer_entries_in_the_shards_are_read_weights_only(tmp_path):
    """DCP reads non-tensor entries (the optimizer's param_groups) with torch.load(weights_only=
    False): the planner Checkpointer.load passes reads them with weights_only=True first, so a
    pickle planted among them is refused instead of run; plain entries still load."""
    import io
    import types

    from prorank_fast.loop.checkpoint import _weights_only_load_planner

    marker = tmp_path / "pwned"
    evil = io.BytesIO()
    torch.save(Payload(marker), evil)
    evil.seek(0)
    item = types.SimpleNamespace(dest_index=types.SimpleNamespace(fqn="optim.param_groups.0.lr"))
    with pytest.raises(CheckpointError, match=r"optim\.param_groups\.0\.lr: not plain data"):
        _weights_only_load_planner().load_bytes(item, evil)
    assert not marker.exists()
    # and a real checkpoint's entries (floats, tuples, lists of ints) load through it exactly
    ckpt, folder, (model, optimizer, scheduler) = _saved(tmp_path / "run")
    fresh = _setup(1)
    ckpt.load(folder, *fresh)
    assert fresh[1].state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
