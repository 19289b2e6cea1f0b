"""Shared-prefix reranking and duplicate pairs (Reranker, shared_prefix=True, the default).

Each query's prompt prefix (template head, instruction, query) runs once per packed batch and its
documents attend to its keys/values; identical prompts of a call are scored once. Checked here:
the scores equal the unshared path's within 1e-5 (fp32), bit for bit with exact_shared_prefix;
the work done (tokens through the model,
counted on the scorer) is one prefix per query per batch plus each distinct prompt's rest; both
templates. Batch invariance within the shared mode: tests/test_batch_invariance.py.
On the tiny random Qwen2 of rerank_helpers (demo tokenizer).
"""

from __future__ import annotations

import pytest
import torch
from rerank_helpers import demo_tokenizer, export_tiny
from test_batch_invariance import WORDS, _differ, _pairs

from prorank_fast.rerank import Reranker
from prorank_fast.scoring import RerankerScorer


class Counting(torch.nn.Module):
    """A scorer wrapper that counts the forwards and the tokens they run."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.tokens = inner, 0, 0

    def forward(self, batch):
        self.calls += 1
        self.tokens += int(batch.num_tokens)
        return self.inner(batch)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module", params=["prorank", "qwen3"])
def reranker(request, tmp_path_factory, tokenizer):
    folder = export_tiny(tmp_path_factory.mktemp(f"export-{request.param}"), tokenizer, template=request.param)
    return Reranker.from_pretrained(folder, device="cpu")


@pytest.fixture(scope="module")
def pairs():
    return _pairs(24)


@pytest.fixture(scope="module")
def reference(reranker, pairs):
    assert reranker.shared_prefix
    return reranker.predict(pairs)


@pytest.fixture
def counting(reranker):
    inner = reranker._scorer
    reranker._scorer = Counting(inner)
    yield reranker._scorer
    reranker._scorer = inner


def test_the_prefix_is_the_template_part_before_the_document(reranker, pairs):
    ids, prefix_lengths = reranker._prompts(pairs)
    for (query, doc), seq, p in zip(pairs, ids, prefix_lengths, strict=True):
        head, rest = reranker.tokenizer.decode(seq[:p]), reranker.tokenizer.decode(seq[p:])
        assert head.rstrip().endswith(query + reranker.template.document_label)
        assert rest.startswith(" " + doc.split()[0])
    by_query = {}
    for (query, _), seq, p in zip(pairs, ids, prefix_lengths, strict=True):
        by_query.setdefault(query, set()).add(tuple(seq[:p]))
    assert all(len(v) == 1 for v in by_query.values())  # one prefix per query


def _predict(reranker, pairs, *, shared=True, exact=False):
    saved = reranker.shared_prefix, reranker.exact_shared_prefix
    reranker.shared_prefix, reranker.exact_shared_prefix = shared, exact
    try:
        return reranker.predict(pairs)
    finally:
        reranker.shared_prefix, reranker.exact_shared_prefix = saved


def test_shared_equals_unshared_within_rounding(reranker, pairs, reference):
    plain = _predict(reranker, pairs, shared=False)
    assert max(abs(a - b) for a, b in zip(reference, plain, strict=True)) <= 1e-5
    assert max(reference) - min(reference) > 0.5  # distinct scores: a wrong token or position would show


def test_exact_shared_prefix_equals_unshared_bit_for_bit(reranker, pairs, reference):
    # attention on fixed key blocks: a document after its cached prefix rounds as its whole prompt
    exact = _predict(reranker, pairs, exact=True)
    assert not _differ(_predict(reranker, pairs, shared=False, exact=True), exact)
    assert max(abs(a - b) for a, b in zip(exact, reference, strict=True)) <= 1e-5  # still attention


def test_exact_shared_prefix_needs_batch_invariance_on_cpu(reranker):
    with pytest.raises(ValueError, match="exact_shared_prefix=True needs batch_invariant=True on CPU"):
        Reranker(reranker.model, reranker.tokenizer, batch_invariant=False, exact_shared_prefix=True)
    with pytest.raises(ValueError, match="exact_shared_prefix=True needs .* on cuda"):  # nothing is moved: a scorer
        Reranker(reranker.model, reranker.tokenizer, scorer=reranker._scorer, device="cuda", exact_shared_prefix=True)


def test_each_prefix_runs_once_per_batch_and_duplicates_once(reranker, pairs, counting):
    ids, prefix_lengths = reranker._prompts(pairs)
    prefixes = {tuple(s[:p]) for s, p in zip(ids, prefix_lengths, strict=True)}
    distinct = {tuple(s): p for s, p in zip(ids, prefix_lengths, strict=True)}
    expected = sum(len(p) for p in prefixes) + sum(len(s) - p for s, p in distinct.items())
    reranker.predict(pairs + pairs[:10] + pairs[3:5], max_tokens=10**6)
    assert (counting.calls, counting.tokens) == (2, expected)  # one prefix pass, one pass of the rest
    counting.calls = counting.tokens = 0
    reranker.shared_prefix = False
    try:
        reranker.predict(pairs + pairs[:10], max_tokens=10**6)
    finally:
        reranker.shared_prefix = True
    assert (counting.calls, counting.tokens) == (1, sum(len(s) for s in distinct))  # duplicates once here too


def test_a_query_spanning_batches_reruns_its_prefix(reranker, counting):
    query = "what is the capital of france"
    docs = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(8)]
    pairs = [(query, d) for d in docs]
    whole = reranker.predict(pairs, max_tokens=10**6)
    ids, prefix_lengths = reranker._prompts(pairs)
    counting.calls = counting.tokens = 0
    assert not _differ(reranker.predict(pairs, max_tokens=3 * max(len(s) for s in ids)), whole)
    assert counting.calls >= 4 and counting.calls % 2 == 0  # prefix pass + rest pass per batch
    batches = counting.calls // 2
    assert counting.tokens == batches * prefix_lengths[0] + sum(len(s) - prefix_lengths[0] for s in ids)


def test_score_token_ids_shares_given_prefixes(reranker, pairs, reference):
    ids, prefix_lengths = reranker._prompts(pairs)
    assert not _differ(reranker.score_token_ids(ids, prefix_lengths=prefix_lengths), reference)
    unshared = reranker.score_token_ids(ids)  # no prefix_lengths: nothing shared, duplicates still once
    assert max(abs(a - b) for a, b in zip(unshared, reference, strict=True)) <= 1e-5
    with pytest.raises(ValueError, match="3 prefix_lengths for"):
        reranker.score_token_ids(ids, prefix_lengths=[1, 2, 3])


def test_a_given_scorer_shares_too_and_a_wrong_attention_is_an_error(reranker, pairs, reference):
    """The trainer's held-out evaluation passes its RerankerScorer root: the passes go through it."""
    model = reranker.model
    scorer = RerankerScorer(model, reranker.output_ids, reranker.token_weights)
    kwargs = dict(template=reranker.template, max_length=reranker.max_length, scorer=scorer,
                  min_query_tokens=reranker.min_query_tokens)  # fmt: skip
    given = Reranker(model, reranker.tokenizer, **kwargs)
    assert not _differ(given.predict(pairs), reference)
    model.set_attn_implementation("sdpa")  # attention that ignores the shared prefix
    try:
        with pytest.raises(RuntimeError, match="shared_prefix=True: .*prorank_varlen"):
            given.predict(pairs[:2])
    finally:
        model.set_attn_implementation("prorank_varlen")
