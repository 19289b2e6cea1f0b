"""CPU fused GRPO loss benchmark through pytest-benchmark: ``pytest benchmarks/``.

One benchmark group, three rows (see ``benchmarks/cpu_grpo.py``): ours (impl="torch"), the
materialized PyTorch baseline, Liger's chunked loss (compiled=False). Each row is also run once
in a fresh subprocess for its peak RSS growth; the session ends with one table of time, memory
and the ours/baseline, ours/liger ratios. Sizes: ``PRORANK_BENCH_<FIELD>`` (e.g. ``PRORANK_BENCH_ROUNDS``).
Nothing about speed is asserted; only that every row computes the same finite loss.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import cpu_grpo

CFG = cpu_grpo.CPUConfig.from_env()


@pytest.fixture(scope="module")
def grpo_inputs():
    return cpu_grpo.make_inputs(CFG)


@pytest.mark.benchmark(group=cpu_grpo.GROUP, disable_gc=True)
@pytest.mark.parametrize("variant", cpu_grpo.VARIANTS)
def test_cpu_grpo_fwd_bwd(benchmark, variant, grpo_inputs, cpu_grpo_report):
    reason = cpu_grpo.unavailable(variant)
    if reason:
        cpu_grpo_report.add(cpu_grpo.Result(variant, skipped=reason))
        pytest.skip(reason)
    step = cpu_grpo.build_step(variant, grpo_inputs, CFG)
    benchmark.extra_info.update(variant=variant, config=CFG.describe(), note=step.note)

    loss, grads = benchmark.pedantic(step.fwd_bwd, rounds=CFG.rounds, warmup_rounds=CFG.warmup, iterations=1)
    assert math.isfinite(float(loss))
    assert all(bool(torch.isfinite(g).all()) for g in grads)

    if benchmark.stats is not None:  # benchmarks enabled: the fixture's own samples
        timing = cpu_grpo.Timing.from_samples(list(benchmark.stats.stats.data))
    else:  # --benchmark-disable: time a round ourselves so the table still has a number
        timing, _ = cpu_grpo.time_step(step, rounds=1, warmup=0)
    peak, method = cpu_grpo.measure_memory(variant, CFG)
    benchmark.extra_info.update(peak_rss_growth_bytes=peak, memory_method=method)

    cpu_grpo_report.add(cpu_grpo.Result(variant, timing, peak, method, float(loss), note=step.note))
    for other in cpu_grpo_report.results.values():  # every row computes the same loss
        if other.variant != variant and other.loss is not None:
            assert abs(float(loss) - other.loss) <= 1e-4 * max(abs(other.loss), 1e-3), (variant, other.variant)
