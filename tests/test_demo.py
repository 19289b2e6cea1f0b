"""prorank_fast.data.demo: the generated collection (deterministic, held-out queries, hard for
BM25 but learnable) and the tokenizer trained on the fly."""

import json
from pathlib import Path

import pytest

from prorank_fast.data import get_template, read_examples
from prorank_fast.data.demo import DOMAINS, demo_texts, make_demo, train_demo_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo(tmp_path_factory.mktemp("demo") / "demo")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _beir(folder: Path):
    corpus = {r["_id"]: r["text"] for r in map(json.loads, (folder / "corpus.jsonl").read_text().splitlines())}
    queries = {r["_id"]: r["text"] for r in map(json.loads, (folder / "queries.jsonl").read_text().splitlines())}
    qrels: dict[str, dict[str, int]] = {}
    for line in (folder / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, did, score = line.split("\t")
        qrels.setdefault(qid, {})[did] = int(score)
    return corpus, queries, qrels


def test_deterministic_for_a_seed(demo, tmp_path):
    again = make_demo(tmp_path / "again")
    assert _files(again.root) == _files(demo.root)
    other = make_demo(tmp_path / "other", seed=7)
    assert other.train.read_bytes() != demo.train.read_bytes()
    assert set(_files(demo.root)) == {
        "train.jsonl", "eval/corpus.jsonl", "eval/queries.jsonl", "eval/qrels/test.tsv",
        "stage1_train.jsonl", "stage1_eval.jsonl",
    }  # fmt: skip


def test_stage1_pairs_are_binary_balanced_and_split_like_the_queries(demo):
    train, _ = read_examples(demo.stage1_train, binary_labels=True)
    held, _ = read_examples(demo.stage1_eval, binary_labels=True)
    for examples in (train, held):
        labels = [label for ex in examples for label in ex.labels]
        assert set(labels) == {0.0, 1.0} and sum(labels) * 2 == len(labels)
    assert not {ex.query for ex in train} & {ex.query for ex in held}
    eval_queries = {json.loads(line)["text"] for line in (demo.eval / "queries.jsonl").read_text().splitlines()}
    assert {ex.query for ex in held} == eval_queries


def test_layout_split_and_grades(demo):
    examples, stats = read_examples(demo.train, group_size=8)
    assert stats.skipped == {} and len({e.query for e in examples}) == 90  # 120 queries, a quarter held out
    # one group per positive: a grade-2 (specific) or grade-1 (partly relevant) document
    assert len(examples) > 5 * 90
    assert all(len(e.docs) == 8 and e.labels == [1.0] + [0.0] * 7 for e in examples)
    assert {e.teacher_scores[0] for e in examples} == {1.0, 2.0}
    corpus, queries, qrels = _beir(demo.eval)
    assert len(queries) == 30 and set(qrels) == set(queries) and len(corpus) == 120 * 6
    train_queries = {e.query for e in examples}
    assert not train_queries & set(queries.values())  # held out
    train_docs = {d for e in read_examples(demo.train)[0] for d in e.docs}
    assert train_docs <= set(corpus.values())  # the corpus has every document
    for qid, judged in qrels.items():
        assert set(judged.values()) <= {1, 2} and 2 in judged.values(), qid
    # every word of a held-out query occurs in some training query: the test is fair
    train_words = {w for q in train_queries for w in q.split()}
    assert {w for q in queries.values() for w in q.split()} <= train_words
    lengths = [len(t.split()) for t in corpus.values()]
    assert 15 <= min(lengths) and max(lengths) <= 40 and 22 <= sum(lengths) / len(lengths) <= 32


def test_other_sizes_and_bad_arguments(tmp_path):
    small = make_demo(tmp_path / "s", num_queries=12, docs_per_topic=3, seed=1)
    corpus, queries, _ = _beir(small.eval)
    assert len(corpus) == 36 and len(queries) == 3
    with pytest.raises(ValueError, match="num_queries"):
        make_demo(tmp_path / "x", num_queries=1000)
    with pytest.raises(ValueError, match="docs_per_topic"):
        make_demo(tmp_path / "x", docs_per_topic=2)


def _ndcg10(run, qrels) -> float:
    import ir_measures
    from ir_measures import nDCG

    return ir_measures.calc_aggregate([nDCG @ 10], qrels, run)[nDCG @ 10]


def test_bm25_is_far_from_perfect_and_meaning_helps(demo):
    import bm25s

    corpus, queries, qrels = _beir(demo.eval)
    ids = list(corpus)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([corpus[d] for d in ids], show_progress=False), show_progress=False)
    qids = list(queries)
    hits, scores = retriever.retrieve(
        bm25s.tokenize([queries[q] for q in qids], show_progress=False), k=30, show_progress=False
    )
    run = {q: {ids[j]: float(s) for j, s in zip(hits[i], scores[i], strict=True)} for i, q in enumerate(qids)}
    bm25 = _ndcg10(run, qrels)
    assert 0.1 < bm25 < 0.8, bm25

    # Someone who knows the synonym sets, reranking BM25's top 30: distinct surface forms
    # of the query's concepts in the document. What a learned model can get to.
    clusters = {c[0]: set(c) for concepts in DOMAINS.values() for c in concepts}

    def meaning(query: str, doc: str) -> float:
        forms = set().union(*(clusters.get(w, set()) for w in query.split()))
        return len(forms & set(doc.replace(".", " ").split()))

    reranked = {q: {d: meaning(queries[q], corpus[d]) + 1e-3 * s for d, s in run[q].items()} for q in qids}
    assert _ndcg10(reranked, qrels) > bm25 + 0.2


def test_demo_tokenizer(demo, tmp_path):
    from transformers import AutoTokenizer

    texts = demo_texts(demo)
    tok = train_demo_tokenizer(texts, vocab_size=512, out_dir=tmp_path / "tok")
    assert len(tok) == 512 and tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert special in tok.all_special_tokens and len(tok.encode(special, add_special_tokens=False)) == 1
    for token in ("0", "1", "yes", "no"):
        assert len(tok.encode(token, add_special_tokens=False)) == 1, token
    for text in texts[:200] + ["naïve café ☕ <b>tags</b>\n\ttabs"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded.pad_token_id == tok.pad_token_id and reloaded.bos_token is None
    template = get_template("prorank")
    one, zero = template.output_token_ids(reloaded)
    assert (one, zero) == (reloaded.convert_tokens_to_ids("1"), reloaded.convert_tokens_to_ids("0"))
    assert get_template("qwen3").output_token_ids(reloaded)[0] == reloaded.convert_tokens_to_ids("yes")
    ids = template.build(reloaded, "car engine", texts[3], max_length=512)
    assert reloaded.decode(ids) == template.text("car engine", texts[3])
    assert ids == template.build(tok, "car engine", texts[3], max_length=512)
    assert len(ids) < 250  # the template's text is in the training data, so prompts stay short
