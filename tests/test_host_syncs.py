"""No host-device syncs in the kernels' default CUDA mode, the chunk plan's byte budget at the
real shape, and the overlapped schedule's results against the serial one.

The sync guard: on CPU nothing syncs, so the test watches for what would sync on CUDA, a
tensor read back into Python (``item``, ``bool``, ``int``, ``float``, ``index``, ``tolist``,
``numpy``, ``cpu``, ``nonzero``). A read counts as the kernels' own when the first frame above
torch's own Python code lies in kernels/ (Triton's interpreter reads tensors on the way into a
kernel; on a GPU it does not, so its frames do not count).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_grpo import COMMON, LEVELS, LOSS_TYPES, make_inputs

import prorank_fast.kernels as K
from prorank_fast.kernels import _utils

KERNELS_DIR = str(Path(K.__file__).resolve().parent)
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
READBACKS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")
IMPLS = ("torch", "triton")


@pytest.fixture
def sync_guard(monkeypatch):
    """Records every tensor read-back made from the kernels' own code; yields the list."""
    seen: list[str] = []

    def culprit() -> str | None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(KERNELS_DIR):
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
        return None

    for name in READBACKS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, __original=original, __name=name, **kwargs):
            where = culprit()
            # nonzero with a static size (nonzero_static) needs no read-back; plain nonzero does
            if where is not None:
                seen.append(f"Tensor.{__name} at {where}")
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    original_nonzero = torch.nonzero

    def nonzero(*args, **kwargs):
        where = culprit()
        if where is not None:
            seen.append(f"torch.nonzero at {where}")
        return original_nonzero(*args, **kwargs)

    monkeypatch.setattr(torch, "nonzero", nonzero)
    monkeypatch.setenv("PRORANK_CHECKS", "device")
    monkeypatch.setenv("PRORANK_CHUNK_ROWS", "8")  # several chunks: the loop itself must not sync
    yield seen


def test_the_guard_sees_a_readback(sync_guard):
    """The guard is live: the full-check mode reads the ids' range back, and it is seen."""
    inp = make_inputs()
    K.fused_linear_logprobs(inp.hidden, inp.weight, inp.token_ids, impl="torch", checks="full")
    assert any("check_token_ids" in s for s in sync_guard), sync_guard


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_grpo_loss_makes_no_host_sync(sync_guard, impl, level, loss_type):
    inp = make_inputs()
    hidden = inp.hidden.clone().requires_grad_(True)
    weight = inp.weight.clone().requires_grad_(True)
    bias = inp.bias.clone().requires_grad_(True)
    loss, metrics = K.fused_linear_grpo_loss(
        hidden, weight, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=bias, beta=0.04,
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=12,
        num_items_in_batch=torch.tensor(30.0), impl=impl, **COMMON,
    )  # fmt: skip
    (loss * 0.5).backward()  # a non-unit upstream gradient: the scaling must not sync either
    assert sync_guard == []
    assert hidden.grad is not None and weight.grad is not None and bias.grad is not None
    assert set(metrics) == {"kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "log_ratio_max"}


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_make_no_host_sync(sync_guard, impl):
    inp = make_inputs()
    hidden = inp.hidden.clone().requires_grad_(True)
    logp, ent = K.fused_linear_logprobs(
        hidden, inp.weight, inp.token_ids, bias=inp.bias, temperature=0.7, return_entropy=True, impl=impl
    )
    (logp.sum() + ent.sum()).backward()
    assert sync_guard == []
    assert hidden.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss", ["bce", "mse", "listwise", "distill"])
def test_score_ops_make_no_host_sync(sync_guard, impl, loss):
    torch.manual_seed(0)
    hidden = torch.randn(16, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=True)
    labels = torch.rand(16) if loss != "listwise" else (torch.rand(16) > 0.5).float() + 0.1
    teacher = torch.randn(16)
    value, scores = K.restricted_vocab_score_loss(
        hidden, weight, labels, token_ids=(3, 7, 3), token_weights=(1.0, -1.0, 0.5), loss=loss, group_size=4,
        teacher_scores=teacher, temperature=2.0, impl=impl,
    )  # fmt: skip
    value.backward()
    s = K.restricted_vocab_score(hidden.detach(), weight.detach(), (3, 7, 3), (1.0, -1.0, 0.5), impl=impl)
    assert sync_guard == []
    assert torch.equal(s, scores.detach())
    assert hidden.grad is not None and weight.grad is not None


def test_device_mode_still_rejects_bad_values(monkeypatch):
    """Device mode asserts what full mode checks; on CPU the assert fires at once."""
    monkeypatch.setenv("PRORANK_CHECKS", "device")
    inp = make_inputs()
    bad_ids = inp.token_ids.clone()
    bad_ids[3] = 1000
    with pytest.raises(RuntimeError, match="token_ids holds ids outside"):
        K.fused_linear_logprobs(inp.hidden, inp.weight, bad_ids, impl="torch")
    bad_adv = inp.advantages.clone()
    bad_adv[0] = float("nan")
    with pytest.raises(RuntimeError, match="advantages holds non-finite"):
        K.fused_linear_grpo_loss(inp.hidden, inp.weight, inp.token_ids, bad_adv, inp.seq_ids, impl="torch")
    with pytest.raises(RuntimeError, match=r"labels must lie in \[0, 1\]"):
        K.restricted_vocab_score_loss(torch.randn(4, 8), torch.randn(20, 8), torch.tensor([0.0, 2.0, 0.5, 1.0]))
    with pytest.raises(RuntimeError, match="num_items_in_batch must be a finite positive"):
        K.fused_linear_grpo_loss(
            inp.hidden, inp.weight, inp.token_ids, inp.advantages, inp.seq_ids, num_items_in_batch=torch.tensor(0.0)
        )


def test_full_mode_names_the_value(monkeypatch):
    monkeypatch.setenv("PRORANK_CHECKS", "full")
    inp = make_inputs()
    bad_ids = inp.token_ids.clone()
    bad_ids[3] = 1000
    with pytest.raises(ValueError, match=r"token_ids holds ids outside \[0, 1000\): min \d+, max 1000"):
        K.fused_linear_logprobs(inp.hidden, inp.weight, bad_ids, impl="torch")


def test_check_mode_setting_is_validated(monkeypatch):
    inp = make_inputs()
    with pytest.raises(ValueError, match="checks must be one of"):
        K.fused_linear_logprobs(inp.hidden, inp.weight, inp.token_ids, checks="fast")
    monkeypatch.setenv("PRORANK_CHECKS", "none")
    with pytest.raises(ValueError, match="PRORANK_CHECKS must be one of"):
        K.fused_linear_logprobs(inp.hidden, inp.weight, inp.token_ids)


def test_default_check_mode_follows_the_device(monkeypatch):
    monkeypatch.delenv("PRORANK_CHECKS", raising=False)
    assert _utils.checks_mode(torch.device("cuda")) == "device"
    assert _utils.checks_mode(torch.device("cpu")) == "full"
    assert _utils.checks_mode(torch.device("cpu"), "device") == "device"


def test_device_mode_refuses_a_second_backward(monkeypatch):
    monkeypatch.setenv("PRORANK_CHECKS", "device")
    inp = make_inputs()
    hidden = inp.hidden.clone().requires_grad_(True)
    loss, _ = K.fused_linear_grpo_loss(hidden, inp.weight, inp.token_ids, inp.advantages, inp.seq_ids, impl="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


# ---------------------------------------------------------------------------------------
# Chunk plan: the byte budget at the real shape
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("buffers", [1, 2])
def test_chunk_plan_at_the_real_shape_fits_the_budget(monkeypatch, buffers):
    """N=16384, H=896, V=151936, bf16 on CUDA (planned only, nothing allocated)."""
    monkeypatch.delenv("PRORANK_CHUNK_ROWS", raising=False)
    monkeypatch.delenv("PRORANK_CHUNK_BYTES", raising=False)
    rows, transient = _utils.chunk_plan(16384, 151936, torch.bfloat16, torch.device("cuda"), buffers=buffers)
    assert transient <= 256 * 2**20
    assert transient == buffers * rows * 151936 * 2
    assert rows >= 256 and rows % 256 == 0  # GEMMs keep an M near peak
    rows_small, transient_small = _utils.chunk_plan(
        16384, 151936, torch.bfloat16, torch.device("cuda"), chunk_bytes=64 << 20, buffers=buffers
    )
    assert rows_small == 256  # below the GEMM floor the floor wins, and the plan says what it costs
    assert transient_small == buffers * 256 * 151936 * 2


def test_chunk_plan_settings(monkeypatch):
    monkeypatch.delenv("PRORANK_CHUNK_ROWS", raising=False)
    monkeypatch.setenv("PRORANK_CHUNK_BYTES", str(1 << 20))
    rows, transient = _utils.chunk_plan(4096, 1000, torch.float32, torch.device("cpu"))
    assert rows == 256 and transient == 256 * 1000 * 4  # largest power of two within 1 MiB
    assert _utils.chunk_plan(10, 1000, torch.float32, torch.device("cpu"))[0] == 10  # never past N
    assert _utils.chunk_plan(4096, 1000, torch.float32, None, chunk_rows=5)[0] == 5
    monkeypatch.setenv("PRORANK_CHUNK_BYTES", "lots")
    with pytest.raises(ValueError, match="PRORANK_CHUNK_BYTES must be an integer"):
        _utils.chunk_plan(4096, 1000, torch.float32, None)
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        _utils.chunk_plan(4096, 1000, torch.float32, None, chunk_bytes=0)


# ---------------------------------------------------------------------------------------
# Overlapped schedule: the same results as the serial one
# ---------------------------------------------------------------------------------------


def _grads(schedule, impl, level, loss_type):
    inp = make_inputs(N=52)
    leaves = [t.clone().requires_grad_(True) for t in (inp.hidden, inp.weight, inp.bias)]
    loss, metrics = K.fused_linear_grpo_loss(
        *leaves[:2], inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=leaves[2], beta=0.04,
        loss_type=loss_type, importance_sampling_level=level, max_completion_length=12, impl=impl,
        chunk_rows=8, schedule=schedule, **COMMON,
    )  # fmt: skip
    loss.backward()
    logp, ent = K.fused_linear_logprobs(
        *leaves[:2], inp.token_ids, bias=leaves[2], return_entropy=True, impl=impl, chunk_rows=8, schedule=schedule
    )
    return [loss.detach(), *metrics.values(), *(t.grad for t in leaves), logp.detach(), ent.detach()]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("level", LEVELS)
def test_overlap_schedule_matches_serial_bitwise(impl, level):
    """Seven chunks over two alternating buffers against one buffer: the same arithmetic per
    chunk in the same order, so == (on CPU the overlap runs without streams)."""
    serial = _grads("serial", impl, level, "dapo")
    overlap = _grads("overlap", impl, level, "dapo")
    for a, b in zip(serial, overlap, strict=True):
        assert torch.equal(a, b)


def test_overlap_uses_two_buffers_within_the_budget():
    from prorank_fast.kernels.lm_head import LMHeadChunks

    hidden, weight = torch.randn(100, 8), torch.randn(1000, 8)
    common = dict(need_hidden_grad=False, need_weight_grad=False, need_bias_grad=False, chunk_bytes=128 * 1000 * 4)
    serial = LMHeadChunks(hidden, weight, None, schedule="serial", **common)
    overlap = LMHeadChunks(hidden, weight, None, schedule="overlap", **common)
    assert (len(serial.buffers), serial.rows) == (1, 100)
    assert (len(overlap.buffers), overlap.rows) == (2, 64)
    assert overlap.transient_bytes <= 128 * 1000 * 4
    with pytest.raises(ValueError, match="schedule must be one of"):
        LMHeadChunks(hidden, weight, None, schedule="parallel", **common)
