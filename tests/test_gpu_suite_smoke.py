"""The GPU suite's code paths at tiny sizes on CPU: ``python -m benchmarks.gpu_suite --smoke``.

Every section runs, the stage-2 training step (section e) included, in the suite's processes:
kernels (a-d), then models (e-g; the preflight says "skipped" on CPU). What happens when one of
them dies is in test_gpu_suite_safety.py.

Runs in a subprocess (its own torch state). Liger's Triton row and ``impl="triton"`` need CUDA
or the interpreter and are skipped here; torch.compile on CPU costs ~30 s of C++ builds, so it
runs only with ``PRORANK_BENCH_SMOKE_COMPILE=1`` (and only at the first shape).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from import_probe import ROOT, check_records, probe_env

# The suite lives in the checkout's benchmarks/ (not installed); run it as `python -m` from the root.


def test_gpu_suite_smoke(tmp_path):
    variants = "ours,eager,liger_chunked,liger_triton"
    if os.environ.get("PRORANK_BENCH_SMOKE_COMPILE", "0") == "1":
        variants += ",compile"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env = probe_env(env, tmp_path / "imports")  # the root on PYTHONPATH, and what `import kernels` gives
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--variants", variants, "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_records(tmp_path / "imports", processes=3)  # the suite, its kernels part, its models part
    out = proc.stdout
    assert "## Targets" in out and "## a. Measured peaks" in out
    assert out.rindex("[gpu_suite") < out.index("# prorank-fast GPU suite"), "the report must be printed last"

    reports = list(tmp_path.glob("gpu_suite_cpu_*.json"))
    assert len(reports) == 1 and list(tmp_path.glob("gpu_suite_cpu_*.md"))
    data = json.loads(reports[0].read_text())
    assert data["checks"] and all(r["status"] == "PASS" for r in data["checks"]), data["checks"]
    rows = [(r["shape"], r["variant"], r["status"]) for r in data["bench"]]
    liger = importlib.util.find_spec("liger_kernel") is not None
    must_run = {"ours", "eager"} | ({"liger_chunked"} if liger else set())
    assert all(status == "ok" for _, variant, status in rows if variant in must_run), rows
    assert not any(status.startswith(("ERROR", "OOM")) for *_, status in rows), rows
    if not liger:
        assert all(status == "skipped: not carried" for _, v, status in rows if v.startswith("liger")), rows
    shapes = list(dict.fromkeys(shape for shape, *_ in rows))
    for shape, variant, status in rows:
        if variant == "compile":  # cold compile at the first shape only
            assert (status == "ok") == (shape == shapes[0]), rows
    assert {n: p["status"] for n, p in data["parts"].items()} == {"kernels": "done", "models": "done"}, data["parts"]
    assert data["preflight"]["status"].startswith("skipped"), data["preflight"]
    assert data["preflight"]["models_backend"] == "sdpa", data["preflight"]
    assert "median" in data["score"]["ours_head"] and "median" in data["score"]["backbone"], data["score"]

    # e. the stage-2 training step (packed ours vs padded transformers) at tiny sizes
    assert "## e. Stage-2 step at the Qwen2.5-0.5B configuration" in out and "stage-2 step MFU" in out
    stage2 = {r["variant"]: r for r in data["stage2"]["rows"]}
    assert set(stage2) == {"ours", "padded"}, data["stage2"]
    for variant, r in stage2.items():
        assert r["status"] == "ok" and r["median"] > 0 and r["tokens_per_s"] > 0 and "mfu" in r, (variant, r)
    # bf16 on both sides: the same loss at the same initial weights, to bf16 precision
    assert stage2["padded"]["loss_rel_diff"] <= 2e-2, stage2["padded"]
