"""CPU stage-2 training-step benchmark through pytest-benchmark: ``pytest benchmarks/test_stage2_step.py``.

The rows of ``python -m benchmarks.stage2_step`` (see ``benchmarks/stage2_step.py``): ours (packed, varlen
attention, restricted-vocabulary loss), the plain transformers way (padded, full-vocabulary
logits), sentence-transformers' CrossEncoder with LogitScore, each at V=1024 and V=151936, in one
pytest-benchmark group, and one table (pairs/s, tokens/s, ratios) printed at the end of the session.

Smaller than the command's default so that the file stays under ~2 minutes on 2 quiet cores: steps
of 2 groups of 8 prompts (max_tokens=2048, 16 pairs) instead of ~10 groups, 1 warm-up + 3 timed
steps per row (the padded row at V=151936 alone takes ~8 s a step). ``PRORANK_BENCH_S2_<FIELD>``
overrides any field (``PRORANK_BENCH_S2_MAX_TOKENS=9216`` for the command's step size).

Before any timing, ``test_stage2_same_loss`` checks that the rows compute the same thing: the same
loss on the same batch at the same initial weights (fp32, rel. 1e-4), and at the smallest vocabulary
the same gradients. Nothing about speed is asserted.
"""

from __future__ import annotations

import math

import pytest

from benchmarks import harness as H
from benchmarks import stage2_step

PYTEST_DEFAULTS = dict(rounds=3, warmup=1, max_tokens=2048)
CFG = stage2_step.Stage2Config.from_env(**PYTEST_DEFAULTS)
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def workload():
    wl = stage2_step.build_workload(CFG, CFG.warmup + CFG.rounds)
    yield wl
    wl.tmp.cleanup()


@pytest.fixture(scope="module")
def stage2_report(print_at_end, workload):
    report = stage2_step.Report(CFG, waste=workload.waste).start()
    timed = workload.batches[CFG.warmup :] or workload.batches
    report.pairs_per_step = sum(b.num_pairs for b in timed) / len(timed)
    report.tokens_per_step = sum(b.num_tokens for b in timed) / len(timed)
    print_at_end(report, "prorank-fast CPU stage-2 step benchmark (throughput)")
    yield report
    report.finish()  # the machine's load over this file's benchmarks only


@pytest.mark.parametrize("vocab", CFG.vocab_list)
def test_stage2_same_loss(vocab, workload):
    """ours, padded (and st where it runs): the same loss on batch 0 at the same initial weights."""
    variants = [v for v in stage2_step.VARIANTS if not stage2_step.unavailable(v)]
    steps = {v: stage2_step.make_step(v, workload, CFG, vocab) for v in variants}
    batch = workload.batches[0]
    losses = {v: s.loss(batch) for v, s in steps.items()}
    assert all(math.isfinite(x) for x in losses.values()), losses
    for v in variants[1:]:
        assert H.rel_diff(losses[v], losses["ours"]) <= stage2_step.LOSS_RTOL, (v, losses)
    if vocab != min(CFG.vocab_list):
        return
    gold = steps["ours"].gradients(batch)
    assert gold, "no gradients"
    for v in variants[1:]:
        grads = steps[v].gradients(batch)
        assert grads.keys() == gold.keys(), (v, sorted(set(grads) ^ set(gold)))
        num = sum((grads[n].double() - gold[n].double()).pow(2).sum() for n in gold).sqrt()
        den = sum(gold[n].double().pow(2).sum() for n in gold).sqrt()
        assert float(num / den) <= GRAD_RTOL, (v, float(num / den))


@pytest.mark.benchmark(group=stage2_step.GROUP, disable_gc=True)
@pytest.mark.parametrize("variant", stage2_step.VARIANTS)
@pytest.mark.parametrize("vocab", CFG.vocab_list)
def test_cpu_stage2_step(benchmark, vocab, variant, workload, stage2_report):
    reason = stage2_step.unavailable(variant)
    if reason:
        stage2_report.add(stage2_step.Result(vocab, variant, skipped=reason))
        pytest.skip(reason)
    step = stage2_step.make_step(variant, workload, CFG, vocab)
    runner = stage2_step.Runner(step, workload.batches, CFG.warmup)
    check = step.loss(workload.batches[0])
    benchmark.extra_info.update(vocab=vocab, variant=variant, config=CFG.describe(), note=step.note)

    loss = benchmark.pedantic(runner, rounds=CFG.rounds, warmup_rounds=CFG.warmup, iterations=1)
    assert math.isfinite(loss)

    result = stage2_step.finish_result(runner, vocab, check)  # its own records: pairs and tokens vary by step
    benchmark.extra_info.update(pairs_per_s=result.pairs_per_s.median, tokens_per_s=result.tokens_per_s.median)
    stage2_report.add(result)
    ours = stage2_report.results.get((vocab, "ours"))
    if ours is not None and ours.check_loss is not None and variant != "ours":
        assert H.rel_diff(check, ours.check_loss) <= stage2_step.LOSS_RTOL, (variant, check, ours.check_loss)
