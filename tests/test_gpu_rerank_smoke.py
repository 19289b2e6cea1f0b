"""The GPU suite's rerank section (section f, benchmarks/rerank.py) at tiny sizes on CPU:
``python -m benchmarks.gpu_suite --smoke --sections rerank``. Runs in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_suite_rerank_section_smoke(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--sections", "rerank", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "## f. Reranking at the Qwen2.5-0.5B configuration" in proc.stdout
    assert "rerank s/query (ours)" in proc.stdout
    data = json.loads(next(tmp_path.glob("gpu_suite_cpu_*.json")).read_text())
    rows = {r["variant"]: r for r in data["rerank"]["rows"]}
    assert set(rows) == {"ours", "ours_invariant", "padded_last", "padded_full"}, rows
    for variant, r in rows.items():
        assert r["status"] == "ok" and r["s_per_query"] > 0 and r["docs_per_s"] > 0, (variant, r)
    # fp32 on CPU: the padded forwards score the same prompts as the packed one
    assert rows["padded_last"]["max_score_diff"] <= 1e-4 * max(1.0, rows["ours"]["score_spread"]), rows
    assert rows["padded_full"]["max_score_diff"] <= 1e-4 * max(1.0, rows["ours"]["score_spread"]), rows
    # on CPU "ours" is batch-invariant already (the default there): the same scores, bit for bit
    assert rows["ours_invariant"]["max_score_diff"] == 0.0, rows
    assert rows["ours"]["score_spread"] > 0, rows
