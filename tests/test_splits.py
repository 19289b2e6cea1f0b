"""data.splits: the held-out split of a collection's queries and the examples mined from one side."""

from __future__ import annotations

import os
import random

import pytest

from prorank_fast.data.beir import BeirData, load_beir
from prorank_fast.data.splits import check_disjoint, mine_groups, mine_pairs, split_query_ids
from prorank_fast.errors import DataError, RecipeError

SOURCE = "/data/tiny"


def _doc(d: str) -> str:
    return f"text of document {d}"


def _doc_id(text: str) -> str:
    return text.removeprefix("text of document ")


@pytest.fixture
def tiny() -> tuple[BeirData, dict[str, dict[str, float]]]:
    """Four queries over twenty documents, and a hand-written run ranked d-by-d.

    q1: relevant d1 (2), d2 (1), d3 (1); judged non-relevant d4; the run ranks d1 and d4
        inside the top 6, and d19, d20 below it.
    q2: relevant d5; its run has two candidates only (fewer than a group needs).
    q3: relevant d6; its run ranks only d6 itself (no negative candidate).
    q4: relevant d7, d8; the run has one candidate.
    """
    corpus = {f"d{i}": _doc(f"d{i}") for i in range(1, 21)}
    queries = {"q1": "query one", "q2": "query two", "q3": "query three", "q4": "query four"}
    qrels = {
        "q1": {"d1": 2, "d2": 1, "d3": 1, "d4": 0},
        "q2": {"d5": 1},
        "q3": {"d6": 1},
        "q4": {"d7": 1, "d8": 1},
    }
    run = {
        "q1": {d: 10.0 - i for i, d in enumerate(["d9", "d1", "d4", "d10", "d11", "d12", "d19", "d20"])},
        "q2": {"d13": 3.0, "d5": 2.0, "d14": 1.0},
        "q3": {"d6": 1.0},
        "q4": {"d7": 2.0, "d15": 1.0},
    }
    return BeirData.from_dicts(corpus, queries, qrels, source=SOURCE), run


# --- the split -------------------------------------------------------------------------------


IDS = [f"q{i}" for i in range(50)]


def test_split_is_deterministic_and_order_independent():
    train, held = split_query_ids(IDS, 0.3, 7, source=SOURCE)
    assert (train, held) == split_query_ids(IDS, 0.3, 7, source=SOURCE)
    shuffled = list(IDS)
    random.Random(1).shuffle(shuffled)
    train2, held2 = split_query_ids(shuffled, 0.3, 7, source=SOURCE)
    assert set(train2) == set(train) and set(held2) == set(held)
    # both lists keep the input order
    assert train2 == [q for q in shuffled if q in set(train)]
    assert held2 == [q for q in shuffled if q in set(held)]
    assert train == [q for q in IDS if q in set(train)]


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.5, 0.77])
def test_split_covers_every_id_once(fraction):
    train, held = split_query_ids(IDS, fraction, 0, source=SOURCE)
    assert not set(train) & set(held)
    assert sorted(train + held) == sorted(IDS)
    assert len(held) == round(fraction * len(IDS))


def test_split_depends_on_the_seed():
    held = {seed: set(split_query_ids(IDS, 0.3, seed, source=SOURCE)[1]) for seed in range(3)}
    assert held[0] != held[1] and held[0] != held[2]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan"), True])
def test_split_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(RecipeError, match=r"data\.held_out.*/data/tiny"):
        split_query_ids(IDS, fraction, 0, source=SOURCE)


@pytest.mark.parametrize(("ids", "fraction", "side"), [(IDS[:4], 0.1, "no held-out"), (IDS[:4], 0.9, "no training")])
def test_split_rejects_an_empty_side(ids, fraction, side):
    with pytest.raises(RecipeError, match=rf"data\.held_out: {fraction:g} of the 4 queries of /data/tiny.*{side}"):
        split_query_ids(ids, fraction, 0, source=SOURCE)


def test_split_rejects_no_queries():
    with pytest.raises(RecipeError, match=r"data\.held_out.* 0 queries"):
        split_query_ids([], 0.5, 0, source=SOURCE)


def test_split_rejects_duplicate_ids():
    with pytest.raises(RecipeError, match=r"data\.held_out.*/data/tiny.*duplicate query ids 'q1'"):
        split_query_ids(["q0", "q1", "q2", "q1"], 0.5, 0, source=SOURCE)


def test_check_disjoint():
    check_disjoint(["a", "b"], ["c"], train_source="train/", held_out_source="eval/")
    with pytest.raises(DataError, match=r"eval/: 2 held-out queries .* train/: 'c', 'b'") as err:
        check_disjoint(["a", "b", "c"], ["c", "d", "b"], train_source="train/", held_out_source="eval/")
    assert err.value.reason == "held_out_overlap"


# --- mining --------------------------------------------------------------------------------


def _check_negatives(data, run, examples, depth, n_pos):
    """Every negative is in the query's top ``depth`` and none is judged relevant."""
    for ex in examples:
        qid = ex.source.rsplit(" ", 1)[1]
        assert ex.source == f"{SOURCE}: query {qid}"
        assert ex.query == data.queries[qid]
        relevant = {d for d, r in data.qrels[qid].items() if r > 0}
        top = set(list(run[qid])[:depth])
        negatives = [_doc_id(t) for t in ex.docs[n_pos(ex) :]]
        assert negatives and all(d in top and d not in relevant for d in negatives), (qid, negatives)


def test_mine_groups(tiny):
    data, run = tiny
    examples, skipped = mine_groups(data, ["q1", "q2", "q3"], run, group_size=4, depth=6, seed=0, source=SOURCE)
    # q1: one group per relevant doc (d1, d2, d3 in doc-id order); q2: one; q3: skipped
    assert [(_doc_id(ex.docs[0]), ex.labels[0]) for ex in examples] == [("d1", 2), ("d2", 1), ("d3", 1), ("d5", 1)]
    assert skipped == {"no_bm25_negative": 1}
    assert all(len(ex.docs) == 4 and ex.labels[1:] == [0.0] * 3 for ex in examples)
    assert all(ex.teacher_scores is None and ex.instruction is None for ex in examples)
    _check_negatives(data, run, examples, 6, lambda ex: 1)
    # q1's candidates within depth 6: d9, d4 (judged non-relevant: a fine negative), d10, d11, d12
    for ex in examples[:3]:
        assert len(set(ex.docs[1:])) == 3
    # q2 has 2 candidates (d13, d14): both used, one repeated
    assert set(examples[3].docs[1:]) == {_doc("d13"), _doc("d14")}
    again, _ = mine_groups(data, ["q1", "q2", "q3"], run, group_size=4, depth=6, seed=0, source=SOURCE)
    assert again == examples


def test_mine_groups_only_given_queries_and_seeded(tiny):
    data, run = tiny
    examples, _ = mine_groups(data, ["q2"], run, group_size=3, depth=6, seed=0, source=SOURCE)
    assert {ex.query for ex in examples} == {"query two"}
    negatives = {
        seed: [ex.docs for ex in mine_groups(data, ["q1"], run, group_size=3, depth=6, seed=seed, source=SOURCE)[0]]
        for seed in range(6)
    }
    assert len({str(v) for v in negatives.values()}) > 1


def test_mining_rejects_unknown_queries(tiny):
    data, run = tiny
    with pytest.raises(DataError, match=r"/data/tiny: query 'q9' is not in the collection"):
        mine_groups(data, ["q9"], run, group_size=2, depth=5, seed=0, source=SOURCE)
    with pytest.raises(DataError, match=r"/data/tiny: query 'q9' is not in the collection"):
        mine_pairs(data, ["q1", "q9"], run, depth=5, seed=0, source=SOURCE)
    with pytest.raises(DataError, match=r"no entry in the BM25 run"):
        mine_pairs(data, ["q1"], {}, depth=5, seed=0, source=SOURCE)


def test_mine_pairs(tiny):
    data, run = tiny
    examples, skipped = mine_pairs(data, ["q4", "q1", "q3", "q2"], run, depth=6, seed=0, source=SOURCE)
    assert [ex.query for ex in examples] == ["query four", "query one", "query two"]
    assert skipped == {"no_bm25_negative": 1}
    for ex in examples:
        p = len(ex.docs) // 2
        assert len(ex.docs) == 2 * p and ex.labels == [1.0] * p + [0.0] * p
        assert len(set(ex.docs)) == len(ex.docs)
    _check_negatives(data, run, examples, 6, lambda ex: len(ex.docs) // 2)
    # q1: three positives, five candidates; q4: two positives, one candidate -> one pair
    assert [_doc_id(t) for t in examples[1].docs[:3]] == ["d1", "d2", "d3"]
    assert len(examples[0].docs) == 2 and _doc_id(examples[0].docs[0]) in {"d7", "d8"}
    assert examples[0].docs[1] == _doc("d15")
    assert mine_pairs(data, ["q4", "q1", "q3", "q2"], run, depth=6, seed=0, source=SOURCE) == (examples, skipped)


def test_mine_pairs_depth_and_cap(tiny):
    data, run = tiny
    # depth 2: q1's candidates are d9 only (d1 is relevant) -> one pair
    (ex,), _ = mine_pairs(data, ["q1"], run, depth=2, seed=0, source=SOURCE)
    assert ex.labels == [1.0, 0.0] and ex.docs[1] == _doc("d9")
    (ex,), _ = mine_pairs(data, ["q1"], run, depth=8, seed=3, source=SOURCE, max_positives_per_query=2)
    pos = [_doc_id(t) for t in ex.docs[:2]]
    assert ex.labels == [1.0, 1.0, 0.0, 0.0] and pos == sorted(pos) and set(pos) <= {"d1", "d2", "d3"}
    _check_negatives(data, run, [ex], 8, lambda ex: 2)


def test_positives_depth_keeps_the_first_stages_positives_only(tiny):
    data, run = tiny
    # q1's relevant documents: d1 at rank 2 of the run, d2 and d3 not ranked; q4's d7 at rank 1
    groups, skipped = mine_groups(data, ["q1", "q4", "q2"], run, group_size=3, depth=6, seed=0, source=SOURCE,
                                  positives_depth=1)  # fmt: skip
    assert [(ex.query, _doc_id(ex.docs[0])) for ex in groups] == [("query four", "d7")]
    assert skipped == {"no_positive_in_depth": 2}  # q1 (d1 is at rank 2), q2 (d5 at rank 2)
    groups, skipped = mine_groups(data, ["q1", "q4"], run, group_size=3, depth=6, seed=0, source=SOURCE,
                                  positives_depth=8)  # fmt: skip
    assert [_doc_id(ex.docs[0]) for ex in groups] == ["d1", "d7"] and skipped == {}
    # the negatives are those mined without the option: it chooses positives, nothing else
    every, _ = mine_groups(data, ["q1", "q4"], run, group_size=3, depth=6, seed=0, source=SOURCE)
    assert [ex.docs for ex in groups] == [every[0].docs, every[3].docs]
    (pair,), skipped = mine_pairs(data, ["q1"], run, depth=6, seed=0, source=SOURCE, positives_depth=2)
    assert pair.labels == [1.0, 0.0] and _doc_id(pair.docs[0]) == "d1" and skipped == {}
    with pytest.raises(ValueError, match="positives_depth must be an integer >= 1"):
        mine_groups(data, ["q1"], run, group_size=3, depth=6, seed=0, source=SOURCE, positives_depth=0)


# --- the real collection -------------------------------------------------------------------


@pytest.mark.skipif(not os.environ.get("PRORANK_VASWANI"), reason="PRORANK_VASWANI is not set")
def test_vaswani_split_and_pairs():
    from prorank_fast.evaluation.first_stage import bm25_first_stage

    folder = os.environ["PRORANK_VASWANI"]
    data = load_beir(folder)
    run = bm25_first_stage(data, k=30)
    train, held = split_query_ids(list(data.queries), 0.3, 0, source=folder)
    assert len(data.queries) == 93
    assert not set(train) & set(held) and set(train) | set(held) == set(data.queries)
    assert len(held) == round(0.3 * 93)
    check_disjoint(train, held, train_source=folder, held_out_source=folder)

    examples, skipped = mine_pairs(data, train, run, depth=30, seed=0, source=folder)
    assert len(examples) + sum(skipped.values()) == len(train) and len(examples) > 0.9 * len(train)
    held_texts = {data.queries[q] for q in held}
    train_texts = {data.queries[q] for q in train}
    assert not held_texts & train_texts  # otherwise the next check proves nothing
    assert not {ex.query for ex in examples} & held_texts
    for ex in examples:
        qid = ex.source.rsplit(" ", 1)[1]
        assert qid in set(train) and ex.query == data.queries[qid]
        p = len(ex.docs) // 2
        relevant_texts = {data.corpus[d] for d, r in data.qrels[qid].items() if r > 0}
        assert not set(ex.docs[p:]) & relevant_texts
        assert set(ex.docs[:p]) <= relevant_texts
