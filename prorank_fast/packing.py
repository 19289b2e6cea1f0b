"""Packed micro-batches: sequences concatenated into one row, no padding.

A micro-batch is chosen by token budget (``max_tokens``), not by a number of pairs: groups
(a query with its documents) are bin-packed largest-first into budgets of ``max_tokens`` so
that little of each budget is left unused (~1-3% on lognormal lengths), and a group is never
split (the listwise losses need all of a query's documents in one forward).

The packed row carries what varlen attention needs and nothing else (no attention mask,
as HF, torchtitan and flash-attn do it): ``position_ids`` restarting at 0 for each
sequence, int32 ``cu_seqlens`` and a Python-int ``max_seqlen`` computed once here, so that
no layer has to synchronise with the device to learn them.

Inference with shared prefixes (Reranker): ``shared_prefix_batches`` cuts (prompt, prefix length)
items into budgets that count each query prefix once per batch, and ``PrefixPass`` is one pass of
such a batch (the prefixes, or what follows them with positions continuing), as a scorer reads it.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

__all__ = [
    "PackedBatch",
    "PackingStats",
    "PrefixPass",
    "budget_batches",
    "collate",
    "pack_sequences",
    "plan_micro_batches",
    "shared_prefix_batches",
]


@dataclass
class PackedBatch:
    """S sequences packed into one row of T tokens.

    input_ids:      [1, T] int64, the sequences concatenated, no padding
    position_ids:   [1, T] int64, 0..len-1 for each sequence (restarts at 0)
    cu_seqlens:     [S + 1] int32, cumulative lengths (cu_seqlens[0] = 0, cu_seqlens[-1] = T)
    max_seqlen:     Python int, the longest sequence
    last_index:     [S] int64, index in T of each sequence's last token (where the score is read)
    labels:         [S] float32
    teacher_scores: [S] float32 or None
    group_size:     sequences come in contiguous groups of this size (listwise losses), or None
    num_tokens:     T
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    last_index: torch.Tensor
    labels: torch.Tensor
    teacher_scores: torch.Tensor | None
    group_size: int | None
    num_tokens: int

    @property
    def num_sequences(self) -> int:
        return int(self.last_index.numel())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on `device` (ints stay Python ints)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, non_blocking=non_blocking)
            moved[f.name] = value
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        """A copy in pinned host memory, so that `.to("cuda", non_blocking=True)` really overlaps."""
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.pin_memory()
            pinned[f.name] = value
        return PackedBatch(**pinned)

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a transformers decoder (``model.model(**batch.model_inputs())``):
        what the scorer (training, evaluation and Reranker) calls the backbone with.

        transformers passes ``cu_seq_lens_q/k`` and ``max_length_q/k`` through to the attention
        function (the "prorank_varlen" one uses them); ``use_cache=False`` because a training
        forward must not build a KV cache (the decoder defaults to building one).
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
            "use_cache": False,
        }


@dataclass
class PackingStats:
    """How well a plan fills its budgets: waste = 1 - num_tokens / (num_batches * max_tokens)."""

    num_batches: int
    num_tokens: int
    waste: float
    max_tokens: int
    num_groups: int = 0
    num_sequences: int = 0


def pack_sequences(
    seqs: Sequence[Sequence[int]],
    labels: Sequence[float] | torch.Tensor,
    teacher_scores: Sequence[float] | torch.Tensor | None = None,
    group_size: int | None = None,
) -> PackedBatch:
    """Pack S token-id lists into one [1, T] row (see PackedBatch for shapes and dtypes).

    Every sequence must hold at least one token; `labels` (and `teacher_scores` when given)
    hold one value per sequence; `group_size`, when given, must divide S.
    """
    num_seqs = len(seqs)
    if num_seqs == 0:
        raise ValueError("pack_sequences: no sequences to pack")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"pack_sequences: sequence {lengths.index(0)} is empty (every sequence needs a token)")
    labels_t = torch.as_tensor(labels, dtype=torch.float32).reshape(-1)
    if labels_t.numel() != num_seqs:
        raise ValueError(f"pack_sequences: {labels_t.numel()} labels for {num_seqs} sequences")
    teacher_t = None
    if teacher_scores is not None:
        teacher_t = torch.as_tensor(teacher_scores, dtype=torch.float32).reshape(-1)
        if teacher_t.numel() != num_seqs:
            raise ValueError(f"pack_sequences: {teacher_t.numel()} teacher scores for {num_seqs} sequences")
    if group_size is not None and (group_size < 1 or num_seqs % group_size):
        raise ValueError(f"pack_sequences: group_size={group_size} does not divide {num_seqs} sequences")

    flat = [tok for s in seqs for tok in s]
    num_tokens = len(flat)
    input_ids = torch.tensor(flat, dtype=torch.int64).unsqueeze(0)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    ends = torch.cumsum(lengths_t, 0)
    starts = ends - lengths_t
    # Position of token t in its sequence = t - start of that sequence.
    position_ids = (torch.arange(num_tokens) - torch.repeat_interleave(starts, lengths_t)).unsqueeze(0)
    cu_seqlens = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu_seqlens[1:] = ends.to(torch.int32)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        last_index=ends - 1,
        labels=labels_t,
        teacher_scores=teacher_t,
        group_size=group_size,
        num_tokens=num_tokens,
    )


def _group_tokens(group: Any) -> int:
    return sum(len(s) for s in group.input_ids)


_PLAN_CHUNK = 2048  # groups planned together: O(chunk) work per micro-batch, waste ~1-3% from ~1k groups on


def _fill_bins(keys: list[int], ids: list[int], capacity: int) -> list[list[int]]:
    """Pack items (sizes `keys` ascending, item ids `ids` aligned) into bins of `capacity`.

    Bin by bin, largest item first: the largest remaining item opens a bin, the pair of items
    that fills the rest best is found exactly (vectorised two-sum over the sorted sizes) unless a
    single item fills it better, then the largest items that still fit close it. When a bin holds
    only ~3 groups (max_tokens of a few group sizes) this pair search is what keeps the waste low:
    plain first-fit decreasing leaves ~6% there, this ~1%.
    """
    bins = []
    while keys:
        room = capacity - keys.pop()
        chosen = [ids.pop()]
        if keys and keys[0] <= room:
            arr = np.asarray(keys)
            partner = np.searchsorted(arr, room - arr, side="right") - 1
            # An item cannot pair with itself: the next smaller one fits whenever it does.
            partner[partner == np.arange(arr.size)] -= 1
            pair = np.where(partner >= 0, arr + arr[np.maximum(partner, 0)], -1)
            i = int(pair.argmax())
            single = bisect.bisect_right(keys, room) - 1
            take = sorted((i, int(partner[i])), reverse=True) if pair[i] > keys[single] else [single]
            for p in take:
                room -= keys.pop(p)
                chosen.append(ids.pop(p))
            while keys and keys[0] <= room:
                p = bisect.bisect_right(keys, room) - 1
                room -= keys.pop(p)
                chosen.append(ids.pop(p))
        bins.append(chosen)
    return bins


def budget_batches(
    sizes: Sequence[int], max_tokens: int, *, order: Sequence[int] | None = None, fill: bool = False
) -> list[list[int]]:
    """The one token-budget chunker: indices into `sizes` cut into batches whose sizes sum to
    at most `max_tokens`.

    Items are taken in `order` (default: 0..n-1). With fill=False the batches are consecutive
    runs of that order, each closed when the next item would overflow it (what inference and
    rollouts want: sort by length first and similar lengths share a batch); an item larger
    than the budget gets a batch of its own. With fill=True each run of 2048 items is sorted
    by size and bin-packed largest first with an exact best-pair completion (see _fill_bins):
    ~1-3% waste, the training plans' choice; an item larger than the budget is then an error
    for the caller to have excluded.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = list(range(len(sizes))) if order is None else list(order)
    if fill:
        bins: list[list[int]] = []
        for start in range(0, len(order), _PLAN_CHUNK):
            chunk = sorted(order[start : start + _PLAN_CHUNK], key=sizes.__getitem__)  # stable: order breaks ties
            bins.extend(_fill_bins([sizes[i] for i in chunk], chunk, max_tokens))
        return bins
    batches, current, used = [], [], 0
    for i in order:
        if current and used + sizes[i] > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += sizes[i]
    if current:
        batches.append(current)
    return batches


class PrefixPass:
    """One pass of a shared-prefix forward, read as a scorer reads a PackedBatch (``model_inputs()``,
    ``last_index``, ``num_tokens``): ``seqs`` packed into one row, the positions of sequence j
    starting at ``starts[j]`` (0 for a prefix, the prefix length for what follows it), and the
    ``modeling.SharedPrefix`` store (described for this pass) that the "prorank_varlen" attention
    reads: transformers passes the ``shared_prefix`` keyword through to it."""

    def __init__(self, seqs: Sequence[Sequence[int]], starts: Sequence[int], store: Any, device) -> None:
        lengths = [len(x) for x in seqs]
        self.input_ids = torch.tensor([t for x in seqs for t in x], dtype=torch.int64).unsqueeze(0).to(device)
        positions = [torch.arange(p, p + n) for p, n in zip(starts, lengths, strict=True)]
        self.position_ids = torch.cat(positions).unsqueeze(0).to(device)
        self.last_index = (torch.tensor(lengths, dtype=torch.int64).cumsum(0) - 1).to(device)
        self.num_tokens = sum(lengths)
        self.store = store

    def model_inputs(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "shared_prefix": self.store,
                "use_cache": False}  # fmt: skip


def shared_prefix_batches(items: Sequence[tuple[Sequence[int], int]], max_tokens: int) -> list[list[int]]:
    """Indices into ``items`` ((token ids, prefix length) pairs) cut into batches of at most
    ``max_tokens`` tokens, a prefix counted once per batch that holds it (inference: Reranker).

    Items without a prefix (length 0): budget_batches, longest first. Items with one: grouped by
    prefix (in order of first appearance), each group longest first, filled greedily; a group
    that does not fit continues in the next batch, which runs its prefix again. An item longer
    than the budget gets a batch of its own.
    """
    plain = [u for u, (_, p) in enumerate(items) if not p]
    lengths = [len(items[u][0]) for u in plain]
    order = sorted(range(len(plain)), key=lambda j: -lengths[j])
    batches = [[plain[j] for j in b] for b in budget_batches(lengths, max_tokens, order=order)]
    groups: dict[tuple, list[int]] = {}
    for u, (seq, p) in enumerate(items):
        if p:
            groups.setdefault(tuple(seq[:p]), []).append(u)
    current: list[int] = []
    used, opened = 0, set()
    for g, members in enumerate(groups.values()):
        for u in sorted(members, key=lambda u: -len(items[u][0])):
            seq, p = items[u]
            cost = len(seq) - (p if g in opened else 0)
            if current and used + cost > max_tokens:
                batches.append(current)
                current, used, opened = [], 0, set()
                cost = len(seq)
            current.append(u)
            used += cost
            opened.add(g)
    if current:
        batches.append(current)
    return batches


def plan_micro_batches(
    groups: Sequence[Any], max_tokens: int, *, seed: int, shuffle: bool = True
) -> tuple[list[list[int]], PackingStats]:
    """Split groups into micro-batches of at most `max_tokens` tokens, never splitting a group.

    groups: objects with `.input_ids` (list[list[int]], one list per sequence), e.g. data.TokenizedGroup.
    Returns the group indices of each micro-batch and the plan's PackingStats
    (waste = 1 - tokens / (micro-batches * max_tokens)).

    Groups are shuffled by `seed` (when `shuffle`), then packed by budget_batches(fill=True);
    the micro-batch order is then shuffled by `seed`. A plan is deterministic per seed, and
    differs across epochs when the seed does. A group larger than `max_tokens` raises ValueError.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    sizes = [_group_tokens(g) for g in groups]
    for i, size in enumerate(sizes):
        if size > max_tokens:
            raise ValueError(
                f"group {i} has {size} tokens ({len(groups[i].input_ids)} sequences), more than "
                f"max_tokens={max_tokens}: raise max_tokens or lower data.max_length / data.group_size"
            )
        if size == 0:
            raise ValueError(f"group {i} has no tokens")

    order = list(range(len(sizes)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    bins = budget_batches(sizes, max_tokens, order=order, fill=True)
    if shuffle:
        rng.shuffle(bins)

    num_tokens = sum(sizes)
    waste = 1.0 - num_tokens / (len(bins) * max_tokens) if bins else 0.0
    stats = PackingStats(
        num_batches=len(bins),
        num_tokens=num_tokens,
        waste=waste,
        max_tokens=max_tokens,
        num_groups=len(sizes),
        num_sequences=sum(len(g.input_ids) for g in groups),
    )
    return bins, stats


def collate(groups_subset: Sequence[Any]) -> PackedBatch:
    """Pack the given groups (e.g. one micro-batch of a plan) into a PackedBatch.

    Sequences, labels and teacher scores are flattened in group order. `group_size` is the
    common number of sequences per group, or None when the groups differ in size. Teacher
    scores must be given for every group or for none.
    """
    if len(groups_subset) == 0:
        raise ValueError("collate: no groups")
    seqs: list[Sequence[int]] = []
    labels: list[float] = []
    teacher: list[float] = []
    with_teacher = [getattr(g, "teacher_scores", None) is not None for g in groups_subset]
    if any(with_teacher) and not all(with_teacher):
        raise ValueError("collate: some groups have teacher_scores and others do not")
    sizes = set()
    for g in groups_subset:
        n = len(g.input_ids)
        if len(g.labels) != n:
            raise ValueError(f"collate: a group has {n} sequences and {len(g.labels)} labels")
        seqs.extend(g.input_ids)
        labels.extend(g.labels)
        if with_teacher[0]:
            if len(g.teacher_scores) != n:
                raise ValueError(f"collate: a group has {n} sequences and {len(g.teacher_scores)} teacher scores")
            teacher.extend(g.teacher_scores)
        sizes.add(n)
    group_size = sizes.pop() if len(sizes) == 1 else None
    return pack_sequences(seqs, labels, teacher if with_teacher[0] else None, group_size=group_size)
