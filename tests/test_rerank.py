"""Reranker: packed varlen scoring against a plain per-pair forward, rank() order and shape,
batching invariance, the in-memory constructor, bad input, and the `prorank-fast rank` CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from rerank_helpers import PAIRS, demo_tokenizer, export_tiny

from prorank_fast.data import DataError, get_template
from prorank_fast.rerank import Reranker, read_pairs_jsonl

ATOL = 5e-5  # fp32; scores spread ~1 apart


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    return export_tiny(tmp_path_factory.mktemp("export"), tokenizer)


@pytest.fixture(scope="module")
def reranker(exported):
    return Reranker.from_pretrained(exported, device="cpu")


def _plain_scores(model, seqs, output_ids) -> list[float]:
    """One unpacked forward per prompt (sdpa, full logits), z[pos] - z[neg] at the last position."""
    model.set_attn_implementation("sdpa")
    out = []
    with torch.no_grad():
        for ids in seqs:
            z = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            out.append(float(z[output_ids[0]] - z[output_ids[1]]))
    return out


def test_predict_equals_a_plain_forward_per_pair(exported, reranker):
    from transformers import AutoModelForCausalLM

    seqs = reranker.tokenize(PAIRS)
    tpl = get_template("prorank")
    assert seqs == [tpl.build(reranker.tokenizer, q, d, max_length=320, min_query_tokens=16) for q, d in PAIRS]
    plain = _plain_scores(AutoModelForCausalLM.from_pretrained(str(exported)), seqs, reranker.output_ids)
    scores = reranker.predict(PAIRS)
    assert isinstance(scores, list) and all(isinstance(s, float) for s in scores)
    assert max(abs(a - b) for a, b in zip(scores, plain, strict=True)) <= ATOL, (scores, plain)
    assert max(scores) - min(scores) > 0.5  # distinct scores: a swapped order would show


@pytest.mark.parametrize("max_tokens", [1, 200, 10_000])
def test_batching_does_not_change_scores(reranker, max_tokens):
    """One prompt per batch, a few per batch, all in one: the same scores in input order."""
    pairs = PAIRS * 3
    _ = reranker.predict(pairs[:1])
    reference = reranker.predict(pairs, max_tokens=10**6)
    got = reranker.predict(pairs, max_tokens=max_tokens)
    assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) <= 1e-5
    assert reference[: len(PAIRS)] == pytest.approx(reference[len(PAIRS) : 2 * len(PAIRS)], abs=1e-5)


def test_rank_sorts_best_first_ties_in_input_order(reranker):
    query = "what is the capital of france"
    docs = ["dogs bark at night", "paris is the capital of france", "dogs bark at night", "the cat sat on the mat"]
    scores = reranker.predict([(query, d) for d in docs])
    ranked = reranker.rank(query, docs)
    assert [r["corpus_id"] for r in ranked] == sorted(range(len(docs)), key=lambda i: -scores[i])
    assert [r["text"] for r in ranked] == [docs[r["corpus_id"]] for r in ranked]
    assert [r["score"] for r in ranked] == sorted(scores, reverse=True)
    dupes = [r["corpus_id"] for r in ranked if r["corpus_id"] in (0, 2)]
    assert dupes == [0, 2]  # equal scores keep input order
    top = reranker.rank(query, docs, top_k=2, normalize=True, return_documents=False)
    assert [r["corpus_id"] for r in top] == [r["corpus_id"] for r in ranked[:2]]
    assert set(top[0]) == {"corpus_id", "score"}
    assert top[0]["score"] == pytest.approx(1 / (1 + math.exp(-ranked[0]["score"])), abs=1e-7)
    assert reranker.rank(query, []) == []


def test_in_memory_constructor_matches_from_pretrained(exported, tokenizer, reranker):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exported))
    model.train()
    direct = Reranker(model, tokenizer, template="prorank", max_length=320, min_query_tokens=16)
    assert direct.output_ids == reranker.output_ids and direct.token_weights == (1.0, -1.0)
    assert direct.predict(PAIRS) == pytest.approx(reranker.predict(PAIRS), abs=1e-5)
    assert model.training  # a call leaves a model in training mode as it found it


def test_instruction_changes_the_prompt(reranker):
    plain = reranker.tokenize(PAIRS[:1])[0]
    instructed = reranker.tokenize(PAIRS[:1], instruction="Find the answer")[0]
    assert len(instructed) > len(plain)
    assert "instruction: Find the answer\n" in reranker.tokenizer.decode(instructed)


def test_bad_input_raises_clearly(tmp_path, reranker, tokenizer):
    with pytest.raises(TypeError, match="wrap a single pair"):
        reranker.predict(("q", "d"))
    with pytest.raises(TypeError, match=r"pairs\[1\]: the document must be a string"):
        reranker.predict([("q", "d"), ("q", 3)])
    with pytest.raises(TypeError, match="one query"):
        reranker.rank(["q"], ["d"])
    folder = tmp_path / "plain"
    export_tiny(folder, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    del config["prorank"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no 'prorank' entry"):
        Reranker.from_pretrained(folder)
    loaded = Reranker.from_pretrained(folder, template="prorank")  # an mxbai-style folder: template given
    assert loaded.output_ids == reranker.output_ids
    with pytest.raises(FileNotFoundError, match="config.json"):
        Reranker.from_pretrained(tmp_path / "missing")


def test_progress_bar_on_request(reranker, capsys):
    reranker.predict(PAIRS, show_progress_bar=True)
    assert "rerank" in capsys.readouterr().err
    reranker.predict(PAIRS)  # few pairs: no bar by default
    assert "rerank" not in capsys.readouterr().err


def test_import_is_lazy():
    code = "import sys, prorank_fast; assert 'torch' not in sys.modules; print(prorank_fast.Reranker.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "Reranker", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# prorank-fast rank


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_rank_cli_scores_each_line(tmp_path, exported, reranker):
    from prorank_fast.cli import main

    rows = [{"query": q, "document": d, "id": i} for i, (q, d) in enumerate(PAIRS)]
    rows[1] = {"query": PAIRS[1][0], "text": PAIRS[1][1], "id": 1, "score": "old"}  # alias; old score replaced
    src = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out" / "scores.jsonl"
    assert main(["rank", str(exported), "--input", str(src), "--output", str(out), "--device", "cpu"]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in got] == list(range(len(PAIRS)))
    assert got[1]["text"] == PAIRS[1][1] and "document" not in got[1]
    expected = reranker.predict(PAIRS)
    assert [g["score"] for g in got] == pytest.approx(expected, abs=1e-5)


def test_rank_cli_no_shared_prefix(tmp_path, exported, reranker):
    """--no-shared-prefix: every prompt runs whole; the scores are the unshared path's, bit for bit."""
    from prorank_fast.cli import main

    src = _write_jsonl(tmp_path / "pairs.jsonl", [{"query": q, "document": d} for q, d in PAIRS])
    out = tmp_path / "scores.jsonl"
    assert main(["rank", str(exported), "--input", str(src), "--output", str(out), "--no-shared-prefix"]) == 0
    got = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    reranker.shared_prefix = False
    try:
        assert got == reranker.predict(PAIRS)
    finally:
        reranker.shared_prefix = True
    assert got == pytest.approx(reranker.predict(PAIRS), abs=1e-5)


def test_rank_cli_exact_shared_prefix(tmp_path, exported):
    """--exact-shared-prefix: the shared prefix and whole prompts give the same bits; without
    batch invariance the flag is an error naming the setting."""
    from prorank_fast.cli import main

    src = _write_jsonl(tmp_path / "pairs.jsonl", [{"query": q, "document": d} for q, d in PAIRS])
    runs = {}
    for name, extra in (("shared", []), ("whole", ["--no-shared-prefix"])):
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(["rank", str(exported), "--input", str(src), "--output", str(out), "--exact-shared-prefix", *extra])
            == 0
        )
        runs[name] = [json.loads(line)["score"] for line in out.read_text().splitlines()]
    assert runs["shared"] == runs["whole"]
    with pytest.raises(SystemExit, match="exact_shared_prefix=True needs batch_invariant=True"):
        main(["rank", str(exported), "--input", str(src), "--exact-shared-prefix", "--batch-invariant", "off"])


def test_rank_cli_stdout(tmp_path, exported, capsys):
    from prorank_fast.cli import main

    src = _write_jsonl(tmp_path / "p.jsonl", [{"query": "cat", "doc": "the cat sat"}, ""])
    assert main(["rank", str(exported), "--input", str(src), "--max-tokens", "512", "--normalize"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and 0.0 < json.loads(lines[0])["score"] < 1.0


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"document": "d"}', "line 2: field 'query': missing"),
        ('{"query": "q"}', "line 2: field 'document': missing (also accepted: doc, text)"),
        ('{"query": "q", "document": 5}', "line 2: field 'document': expected a string, got int"),
        ('{"query": "q", "document": ', "line 2: invalid JSON"),
        ('["q", "d"]', "line 2: expected a JSON object"),
    ],
)
def test_rank_cli_bad_input_names_file_line_field(tmp_path, exported, line, message):
    from prorank_fast.cli import main

    src = _write_jsonl(tmp_path / "bad.jsonl", ['{"query": "q", "document": "d"}', line])
    with pytest.raises(SystemExit) as err:
        main(["rank", str(exported), "--input", str(src)])
    assert str(src) in str(err.value) and message in str(err.value), str(err.value)
    with pytest.raises(DataError):
        read_pairs_jsonl(src)


def test_rank_cli_missing_file(tmp_path, exported):
    from prorank_fast.cli import main

    with pytest.raises(SystemExit, match="no such file"):
        main(["rank", str(exported), "--input", str(tmp_path / "nope.jsonl")])
