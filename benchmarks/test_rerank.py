"""CPU reranking throughput through pytest-benchmark: ``pytest benchmarks/test_rerank.py``.

The rows of ``python -m benchmarks.rerank`` (see ``benchmarks/rerank.py``): ours (``Reranker.predict``)
and sentence-transformers' ``CrossEncoder.predict`` on the same exported tiny model and the same pairs,
at V=1024 and V=151936, in one pytest-benchmark group, and one table (documents/s, ratio) printed at the
end of the session.

Smaller than the command's default so that the file stays around a minute on 2 quiet cores: 4 queries x
50 documents per call, 1 warm-up + 3 timed calls per row. ``PRORANK_BENCH_RR_<FIELD>`` overrides any
field (``PRORANK_BENCH_RR_QUERIES=10 PRORANK_BENCH_RR_DOCS=100`` for the command's size).

Before any timing, ``test_rerank_same_scores`` checks that both rows score every pair alike (fp32,
5e-5) and that the scores differ across pairs. Nothing about speed is asserted.
"""

from __future__ import annotations

import pytest

from benchmarks import rerank

PYTEST_DEFAULTS = dict(queries=4, docs=50, rounds=3, warmup=1)
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
    """ours' scores of every pair, per vocabulary size (the other row is compared with them)."""
    return {}


@pytest.mark.parametrize("vocab", CFG.vocab_list)
def test_rerank_same_scores(vocab, workload, reference_scores):
    reason = rerank.st_unavailable()
    if reason:
        pytest.skip(reason)
    folder = rerank.exported_folder(workload, CFG, vocab)
    ours = rerank.make_scorer("ours", folder, CFG)(workload.pairs)
    st = rerank.make_scorer("st", folder, CFG)(workload.pairs)
    assert rerank.max_diff(st, ours) <= rerank.SCORE_ATOL, rerank.max_diff(st, ours)
    assert max(ours) - min(ours) > 1e-3, "all pairs score alike: the comparison would prove nothing"
    reference_scores[vocab] = ours


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
        result.max_score_diff = rerank.max_diff(scores, reference_scores[vocab])
        assert result.max_score_diff <= rerank.SCORE_ATOL, (variant, result.max_score_diff)
    benchmark.extra_info.update(docs_per_s=result.docs_per_s.median)
    rerank_report.add(result)
