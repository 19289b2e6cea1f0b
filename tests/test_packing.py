"""Packing: PackedBatch fields, micro-batch planning by token budget, collate."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from prorank_fast.packing import PackedBatch, collate, pack_sequences, plan_micro_batches


@dataclass
class Group:  # duck-types data.TokenizedGroup
    input_ids: list
    labels: list
    teacher_scores: list | None = None
    source: str = "test"


def _groups(n, per_group=8, seed=0, median=150, sigma=0.5):
    """Realistic lengths: lognormal per sequence, clipped to [16, 512] like a max_length=512 prompt."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(n):
        lens = np.clip(rng.lognormal(np.log(median), sigma, size=per_group).astype(int), 16, 512)
        out.append(Group([[g % 50 + 1] * int(n_tok) for n_tok in lens], [1.0] + [0.0] * (per_group - 1)))
    return out


def test_pack_sequences_fields():
    seqs = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    b = pack_sequences(seqs, [1, 0, 0.5, 0], teacher_scores=[0.1, 0.2, 0.3, 0.4], group_size=2)
    assert b.input_ids.shape == (1, 11) and b.input_ids.dtype == torch.int64
    assert b.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert b.position_ids.dtype == torch.int64
    assert b.position_ids[0].tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1]
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens.tolist() == [0, 3, 4, 9, 11]
    assert type(b.max_seqlen) is int and b.max_seqlen == 5
    assert b.last_index.dtype == torch.int64 and b.last_index.tolist() == [2, 3, 8, 10]
    assert (b.input_ids[0, b.last_index] == torch.tensor([7, 8, 13, 15])).all()
    assert b.labels.dtype == torch.float32 and b.labels.tolist() == [1.0, 0.0, 0.5, 0.0]
    assert b.teacher_scores.dtype == torch.float32 and b.teacher_scores.shape == (4,)
    assert b.group_size == 2 and b.num_tokens == 11 and b.num_sequences == 4


def test_pack_sequences_validation():
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([[1], []], [0, 0])
    with pytest.raises(ValueError, match="labels"):
        pack_sequences([[1], [2]], [0])
    with pytest.raises(ValueError, match="teacher"):
        pack_sequences([[1], [2]], [0, 1], teacher_scores=[0.5])
    with pytest.raises(ValueError, match="group_size"):
        pack_sequences([[1], [2], [3]], [0, 1, 0], group_size=2)
    with pytest.raises(ValueError, match="no sequences"):
        pack_sequences([], [])


def test_to_and_model_inputs():
    b = pack_sequences([[1, 2], [3]], [1, 0])
    moved = b.to("cpu")
    assert isinstance(moved, PackedBatch) and moved is not b
    assert moved.max_seqlen == 2 and moved.teacher_scores is None and moved.group_size is None
    kw = b.model_inputs()
    assert kw["cu_seq_lens_q"] is b.cu_seqlens and kw["cu_seq_lens_k"] is b.cu_seqlens
    assert kw["max_length_q"] == kw["max_length_k"] == 2 and kw["use_cache"] is False
    assert kw["input_ids"] is b.input_ids and kw["position_ids"] is b.position_ids


@pytest.mark.parametrize("max_tokens", [4096, 8192, 16384])
def test_plan_budget_groups_and_waste(max_tokens):
    groups = _groups(1500)
    batches, stats = plan_micro_batches(groups, max_tokens, seed=0)
    sizes = [sum(len(s) for s in g.input_ids) for g in groups]
    # every group exactly once (never split: a plan lists whole groups)
    assert sorted(i for b in batches for i in b) == list(range(len(groups)))
    assert all(sum(sizes[i] for i in b) <= max_tokens for b in batches)
    assert stats.num_batches == len(batches) and stats.num_tokens == sum(sizes) and stats.max_tokens == max_tokens
    assert stats.waste == pytest.approx(1 - sum(sizes) / (len(batches) * max_tokens))
    assert stats.num_groups == 1500 and stats.num_sequences == 1500 * 8
    assert stats.waste < 0.05, stats


def test_plan_pointwise_waste():
    groups = _groups(3000, per_group=1)
    _, stats = plan_micro_batches(groups, 4096, seed=3)
    assert stats.waste < 0.05, stats


def test_plan_deterministic_per_seed():
    groups = _groups(300)
    a, _ = plan_micro_batches(groups, 8192, seed=7)
    b, _ = plan_micro_batches(groups, 8192, seed=7)
    c, _ = plan_micro_batches(groups, 8192, seed=8)
    assert a == b
    assert a != c
    d, _ = plan_micro_batches(groups, 8192, seed=7, shuffle=False)
    e, _ = plan_micro_batches(groups, 8192, seed=99, shuffle=False)
    assert d == e


def test_plan_oversized_group_raises():
    groups = _groups(10) + [Group([[1] * 300] * 8, [0.0] * 8)]
    with pytest.raises(ValueError, match="max_tokens=2000"):
        plan_micro_batches(groups, 2000, seed=0)


def test_plan_small_cases():
    assert plan_micro_batches([], 100, seed=0)[0] == []
    batches, stats = plan_micro_batches([Group([[1] * 100], [1.0])], 100, seed=0)
    assert batches == [[0]] and stats.waste == 0.0


def test_collate_flattens_in_group_order():
    g1 = Group([[1, 2], [3]], [1.0, 0.0], [2.0, -1.0])
    g2 = Group([[4], [5, 6, 7]], [0.0, 1.0], [0.5, 3.0])
    b = collate([g2, g1])
    assert b.input_ids[0].tolist() == [4, 5, 6, 7, 1, 2, 3]
    assert b.labels.tolist() == [0.0, 1.0, 1.0, 0.0]
    assert b.teacher_scores.tolist() == [0.5, 3.0, 2.0, -1.0]
    assert b.group_size == 2 and b.last_index.tolist() == [0, 3, 5, 6]
    assert collate([g1, Group([[9]], [1.0], [0.0])]).group_size is None
    with pytest.raises(ValueError, match="teacher"):
        collate([g1, Group([[9], [8]], [1.0, 0.0], None)])
    # a plan's micro-batch collates to at most max_tokens tokens
    groups = _groups(50)
    batches, _ = plan_micro_batches(groups, 4096, seed=0)
    packed = [collate([groups[i] for i in b]) for b in batches]
    assert all(p.num_tokens <= 4096 and p.group_size == 8 for p in packed)
