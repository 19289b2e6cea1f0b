"""A BEIR collection split by query id for training (data.held_out): what prepare() hands the
stages comes from the training queries only, evaluation sees the held-out ones only, and a
split that cannot be made fails before any model is built. Real text: Vaswani."""

from __future__ import annotations

import os

import pytest

from prorank_fast.config import load_recipe
from prorank_fast.errors import DataError, RecipeError
from prorank_fast.loop import setup_distributed
from prorank_fast.stages import prepare
from prorank_fast.stages.collection import split_collection

VASWANI = os.environ.get("PRORANK_VASWANI")
pytestmark = pytest.mark.skipif(not VASWANI, reason="PRORANK_VASWANI (the Vaswani collection) not set")

SPLIT = [
    "data.eval=null", "data.held_out=0.3", "stage1.enabled=true", "stage1.train=null", "stage1.eval=null",
    "data.max_length=160", "data.min_query_tokens=16", "data.eval_first_stage_k=10", "data.group_size=4",
]  # fmt: skip


def _recipe(*overrides):
    return load_recipe(None, [f"data.train={VASWANI}", *SPLIT, *overrides])


def _qid(example) -> str:
    return example.source.rsplit("query ", 1)[1]


def test_split_collection_trains_on_training_queries_and_evaluates_the_others():
    split = split_collection(_recipe())
    train, held = set(split.train_ids), set(split.held_out_ids)
    assert not train & held and train | held == set(split.collection.queries) and len(held) == 28
    assert {_qid(ex) for ex in split.groups} <= train and {_qid(ex) for ex in split.pairs} <= train
    assert {_qid(ex) for ex in split.held_out_pairs} <= held
    assert set(split.eval_data.queries) == held and set(split.eval_run) == held
    assert all(len(docs) <= 10 for docs in split.eval_run.values())
    labels = [y for ex in split.pairs for y in ex.labels]
    assert labels.count(1) == labels.count(0) > 0  # label-balanced stage-1 pairs
    for ex in split.groups:  # negatives: never a document judged relevant for the query
        relevant = {split.collection.corpus[d] for d, r in split.collection.qrels[_qid(ex)].items() if r > 0}
        assert ex.labels[0] > 0 and all(doc not in relevant for doc in ex.docs[1:])
    again = split_collection(_recipe())
    assert again.held_out_ids == split.held_out_ids and [e.docs for e in again.groups] == [e.docs for e in split.groups]


def test_prepare_with_a_split(tmp_path):
    prep = prepare(_recipe("stage1.max_eval_pairs=40"), tmp_path, setup_distributed("cpu"))
    assert prep.split["held_out_queries"] == 28 and prep.split["train_queries"] == 65
    (held,) = prep.held_out
    assert held.name == "vaswani" or held.name == os.path.basename(VASWANI.rstrip("/"))
    assert set(held.bm25_run) == set(held.data.queries) and len(held.data.queries) == 28
    assert len(prep.groups) == prep.split["training_groups"] > 0
    eval_labels = [p.label for p in prep.stage1_eval_prompts]
    assert len(eval_labels) == 40 and eval_labels.count(1) == 20
    assert 0 < held.bm25_metrics["nDCG@10"] < 1


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["data.held_out=0.001"], RecipeError, "no held-out"),
        (["data.held_out=0.999"], RecipeError, "no training"),
        (["data.eval=demo"], RecipeError, "data.eval must be null or the same folder"),
    ],
)
def test_a_split_that_cannot_be_made_fails_naming_the_setting(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        prepare(_recipe(*overrides), tmp_path, setup_distributed("cpu"))


def test_the_same_collection_for_training_and_evaluation_needs_a_split(tmp_path):
    cfg = load_recipe(None, [f"data.train={VASWANI}", f"data.eval={VASWANI}", "stage1.enabled=false"])
    with pytest.raises(DataError, match="set data.held_out"):
        prepare(cfg, tmp_path, setup_distributed("cpu"))


CISI, CACM = os.environ.get("PRORANK_CISI"), os.environ.get("PRORANK_CACM")
needs_two = pytest.mark.skipif(not (CISI and CACM), reason="PRORANK_CISI and PRORANK_CACM (the collections) not set")


@needs_two
def test_several_collections_split_each_and_evaluate_each(tmp_path):
    """data.train lists two BEIR folders: each is split by query id, its groups are mined within it
    (no document of the other collection), and each gets its own held-out set and table."""
    from prorank_fast.stages.collection import split_collections

    cfg = load_recipe(None, [f"data.train=[{CISI},{CACM}]", *SPLIT])
    splits = split_collections(cfg)
    assert [s.name for s in splits] == [os.path.basename(CISI.rstrip("/")), os.path.basename(CACM.rstrip("/"))]
    for split, other in (splits, splits[::-1]):
        assert set(split.eval_data.queries) == set(split.held_out_ids) and split.groups
        docs = set(split.collection.corpus.values())
        assert all(doc in docs for ex in split.groups for doc in ex.docs)
        assert not any(doc in set(other.collection.corpus.values()) - docs for ex in split.groups for doc in ex.docs)

    # through `prorank-fast train` (tiny model, two stage-2 steps): per-collection held-out nDCG@10
    # with BM25's beside it, their mean, in summary.json, the table and metrics.jsonl
    import json
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", f"output_dir={out}", f"data.train=[{CISI},{CACM}]",
           *SPLIT, "stage1.enabled=false", "stage2.max_steps=2", "stage2.eval_every=1", "data.eval_first_stage_k=5",
           "model.tokenizer_vocab_size=512", "stage2.checkpoint_every=0"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    names = [os.path.basename(CISI.rstrip("/")), os.path.basename(CACM.rstrip("/"))]
    per = summary["held_out"]["collections"]
    assert list(per) == names
    for key in ("ndcg@10_bm25", "ndcg@10_zero_shot", "ndcg@10_stage2_alone"):
        assert summary["held_out"][key] == pytest.approx(sum(per[n][key] for n in names) / 2), key
    assert summary["held_out"]["queries"] == sum(per[n]["queries"] for n in names)
    assert [per[s.name]["queries"] for s in splits] == [len(s.held_out_ids) for s in splits]
    split = summary["split"]
    assert split["training_groups"] == sum(len(s.groups) for s in splits)
    assert split["collections"][splits[1].name]["held_out_queries"] == len(splits[1].held_out_ids)
    for name in names:
        assert f"{name}: {per[name]['queries']} held-out queries" in proc.stdout
        assert (out / f"held_out_after.{name}.trec").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(f"held_out_ndcg@10/{name}" in rows[-1] for name in names), rows[-1]
    assert rows[-1]["held_out_ndcg@10/" + names[0]] == per[names[0]]["ndcg@10_stage2_alone"]
