"""CPU reranking throughput through pytest-benchmark: ``pytest benchmarks/test_rerank.py``.

The rows of ``python -m benchmarks.rerank`` (see ``benchmarks/rerank.py``): ours (``Reranker.predict``:
shared prefix and batch-invariant, the defaults), ours without the shared prefix, ours not invariant, and
sentence-transformers' ``CrossEncoder.predict`` on the same exported tiny model and the same pairs (60-300
token documents), at V=1024 and V=151936, in one pytest-benchmark group, and one table (documents/s,
ratio) printed at the end of the session.

Smaller than the command's default so that the file stays around a minute on 2 quiet cores: 2 queries x
50 documents per call, 1 warm-up + 3 timed calls per row. ``PRORANK_BENCH_RR_<FIELD>`` overrides any
field (``PRORANK_BENCH_RR_QUERIES=10 PRORANK_BENCH_RR_DOCS=100`` for the command's size).

Before any timing, ``test_rerank_same_scores`` checks that every row scores every pair as
CrossEncoder does (fp32, 5e-5), our rows alike within 1e-5, and that the scores differ across pairs.
Nothing about speed is asserted.
"""

from __future__ import annotations

import pytest

from benchmarks import rerank

PYTEST_DEFAULTS = dict(queries=2, docs=50, rounds=3, warmup=1)
CFG = rerank.RerankConfig.from_env(**PYTEST_DEFAULTS)


@pytest.fixture(scope="module")
def workload():
    wl = rerank.build_workload(CFG)
    yield wl
    wl.tmp.cleanup()


@pytest.fixture(scope="module")
def rerank_report(print_at_end, workload):
    report = rerank.Report(CFG, pairs=len(workload.pairs)).start()
    print_at_end(report, "prorank-fast CPU reranking benchmark (documents/s)")
    yield report
    report.finish()


@pytest.fixture(scope="module")
def reference_scores(workload):
    """Every row's scores of every pair, per vocabulary size (the timed rows are compared with them)."""
    return {}


@pytest.mark.parametrize("vocab", CFG.vocab_list)
def test_rerank_same_scores(vocab, workload, reference_scores):
    reason = rerank.st_unavailable()
    if reason:
        pytest.skip(reason)
    folder = rerank.exported_folder(workload, CFG, vocab)
    scores = {v: rerank.make_scorer(v, folder, CFG)(workload.pairs) for v in rerank.VARIANTS}
    ours = scores["ours"]
    for variant, got in scores.items():
        assert rerank.max_diff(got, scores["st"]) <= rerank.SCORE_ATOL, (variant, rerank.max_diff(got, scores["st"]))
        if variant != "st":
            assert rerank.max_diff(got, ours) <= 1e-5, (variant, rerank.max_diff(got, ours))
    assert scores["ours_exact_unshared"] == scores["ours_exact"]  # exact_shared_prefix: the same bits
    assert max(ours) - min(ours) > 1e-3, "all pairs score alike: the comparison would prove nothing"
    reference_scores[vocab] = scores


@pytest.mark.benchmark(group=rerank.GROUP, disable_gc=True)
@pytest.mark.parametrize("variant", rerank.VARIANTS)
@pytest.mark.parametrize("vocab", CFG.vocab_list)
def test_cpu_rerank(benchmark, vocab, variant, workload, rerank_report, reference_scores):
    reason = rerank.st_unavailable() if variant == "st" else ""
    if reason:
        rerank_report.add(rerank.Result(vocab, variant, skipped=reason))
        pytest.skip(reason)
    folder = rerank.exported_folder(workload, CFG, vocab)
    runner = rerank.Runner(variant, rerank.make_scorer(variant, folder, CFG), workload.pairs, CFG.warmup)
    benchmark.extra_info.update(vocab=vocab, variant=variant, config=CFG.describe())
    scores = benchmark.pedantic(runner, rounds=CFG.rounds, warmup_rounds=CFG.warmup, iterations=1)
    assert len(scores) == len(workload.pairs)
    result = runner.result(vocab)
    if vocab in reference_scores:
        if variant != "ours":
            result.max_score_diff = rerank.max_diff(scores, reference_scores[vocab]["ours"])
        if variant != "st":
            result.max_diff_vs_st = rerank.max_diff(scores, reference_scores[vocab]["st"])
            assert result.max_diff_vs_st <= rerank.SCORE_ATOL, (variant, result.max_diff_vs_st)
    benchmark.extra_info.update(docs_per_s=result.docs_per_s.median)
    rerank_report.add(result)
