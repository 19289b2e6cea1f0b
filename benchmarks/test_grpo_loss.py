"""CPU fused GRPO loss benchmark through pytest-benchmark: ``pytest benchmarks/test_grpo_loss.py``.

One benchmark group, three rows (see ``benchmarks/grpo_loss.py``): ours (impl="torch"), the
materialized PyTorch baseline, Liger's chunked loss (compiled=False). Each row is also run once
in a fresh subprocess for its peak RSS growth; the session ends with one table of time, memory
and the ours/baseline, ours/liger ratios. Sizes: ``PRORANK_BENCH_<FIELD>`` (e.g. ``PRORANK_BENCH_ROUNDS``).
Nothing about speed is asserted; only that every row computes the same finite loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import grpo_loss

CFG = grpo_loss.CPUConfig.from_env()


@pytest.fixture(scope="module")
def grpo_inputs():
    return grpo_loss.make_inputs(CFG)


@pytest.fixture(scope="module")
def grpo_report(print_at_end):
    return print_at_end(grpo_loss.Report(CFG), "prorank-fast CPU GRPO benchmark (time and peak memory)")


@pytest.mark.benchmark(group=grpo_loss.GROUP, disable_gc=True)
@pytest.mark.parametrize("variant", grpo_loss.VARIANTS)
def test_cpu_grpo_fwd_bwd(benchmark, variant, grpo_inputs, grpo_report):
    reason = grpo_loss.unavailable(variant)
    if reason:
        grpo_report.add(grpo_loss.Result(variant, skipped=reason))
        pytest.skip(reason)
    step = grpo_loss.build_step(variant, grpo_inputs, CFG)
    benchmark.extra_info.update(variant=variant, config=CFG.describe(), note=step.note)

    loss, grads = benchmark.pedantic(step.fwd_bwd, rounds=CFG.rounds, warmup_rounds=CFG.warmup, iterations=1)
    assert math.isfinite(float(loss))
    assert all(bool(torch.isfinite(g).all()) for g in grads)

    if benchmark.stats is not None:  # benchmarks enabled: the fixture's own samples
        timing = grpo_loss.Timing.from_samples(list(benchmark.stats.stats.data))
    else:  # --benchmark-disable: time a round ourselves so the table still has a number
        timing, _ = grpo_loss.time_step(step, rounds=1, warmup=0)
    peak, method = grpo_loss.measure_memory(variant, CFG)
    benchmark.extra_info.update(peak_rss_growth_bytes=peak, memory_method=method)

    grpo_report.add(grpo_loss.Result(variant, timing, peak, method, float(loss), note=step.note))
    for other in grpo_report.results.values():  # every row computes the same loss
        if other.variant != variant and other.loss is not None:
            assert abs(float(loss) - other.loss) <= 1e-4 * max(abs(other.loss), 1e-3), (variant, other.variant)
