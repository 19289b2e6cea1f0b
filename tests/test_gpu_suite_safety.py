"""The GPU suite is safe to run once (issue 11, item 7), checked on CPU at --smoke sizes.

* a kill in the middle of a section keeps every finished row: a fake slow row
  (``PRORANK_GPU_SUITE_TEST_STALL``) holds the kernels process, the test SIGKILLs it; the rows before
  are in the report on disk (and in $OUT), the parent notes how that process died and the model
  sections still run in theirs; the preflight process (run off CUDA with ``--preflight-process``)
  aborts (``PRORANK_GPU_SUITE_TEST_CRASH``, a stand-in for a device fault), so the model sections
  run on the SDPA backend and the report says why;
* a child past its time limit is killed (``run_child``), and exit statuses read as the report says;
* the preflight compares the varlen backend with SDPA and catches a wrong causal alignment;
* torch.compile's cold compile runs on the first shape only; Liger rows without liger-kernel read
  "skipped: not carried".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the suite lives in the checkout's benchmarks/ (not installed)

from benchmarks import gpu_suite, grpo_loss  # noqa: E402
from benchmarks import harness as H  # noqa: E402


def _report(folder: Path) -> dict | None:
    for path in folder.glob("gpu_suite_cpu_*.json"):
        try:
            return json.loads(path.read_text())
        except ValueError:  # not possible with atomic writes: a test failure below would say so
            return {"torn": path.read_text()}
    return None


def test_kill_mid_section_keeps_finished_rows(tmp_path):
    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    env = dict(os.environ, OUT=str(out), OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.pop("PRORANK_VARLEN_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env[H.STALL_ENV] = "bench:3"  # rows 1-3 of section c finish, the 4th sleeps
    env[gpu_suite.CRASH_ENV] = "preflight"
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--sections", "peak,bench,stage2",
           "--variants", "ours,eager", "--out-dir", str(results), "--preflight-process"]  # fmt: skip
    log = (tmp_path / "log.txt").open("w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            data = _report(results) if results.exists() else None
            if data and len(data.get("bench", [])) >= 3:
                break
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)  # the kernels process is now in its fake slow row
        kernels = data["parts"]["kernels"]
        assert kernels["status"] == "running", data["parts"]
        os.kill(kernels["pid"], signal.SIGKILL)

        # on disk right after the kill: every finished row, in both files, in both places
        for folder in (results, out):
            data = _report(folder)
            assert data is not None and "torn" not in data, folder
            rows = [(r["shape"], r["variant"], r["status"]) for r in data["bench"]]
            assert rows == [
                ("N=256 H=32 V=1000", "ours", "ok"),
                ("N=256 H=32 V=1000", "eager", "ok"),
                ("N=128 H=48 V=1003", "ours", "ok"),
            ], rows
            assert "gbps" in data["peak"]["copy"]
            md = next(folder.glob("gpu_suite_cpu_*.md")).read_text()
            bench = md[md.index("## c. Fused GRPO") : md.index("## Targets")]
            table = [line.split("|")[1:3] for line in bench.splitlines() if line.startswith("| N=")]
            assert [(shape.strip(), label.strip()) for shape, label in table] == [
                ("N=256 H=32 V=1000", 'ours impl="torch"'),
                ("N=256 H=32 V=1000", "PyTorch eager (materialized)"),
                ("N=128 H=48 V=1003", 'ours impl="torch"'),
            ], md
            assert "kernels (peak, bench): running when this report was written" in md
        assert not list(results.glob(".*.tmp")), "a temporary file was left behind"

        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 3, text[-3000:]  # a part died
    report = text[text.index("# prorank-fast GPU suite") :]
    assert "[gpu_suite" not in report, "the report must be printed last"
    assert "kernels (peak, bench): died: killed by signal 9 (SIGKILL)" in report
    assert "the rows it finished are above" in report
    data = _report(results)
    assert [r["variant"] for r in data["bench"]] == ["ours", "eager", "ours"]
    assert data["parts"]["kernels"]["status"] == "died: killed by signal 9 (SIGKILL)"
    # the model part ran in its own process after the kernels process died, on SDPA: the preflight died
    assert data["parts"]["preflight"]["status"] == "died: killed by signal 6 (SIGABRT)", data["parts"]
    assert data["parts"]["models"]["status"] == "done", data["parts"]
    pf = data["preflight"]
    assert pf["status"] == "FAIL: the preflight process died: killed by signal 6 (SIGABRT)", pf
    assert pf["models_backend"] == "sdpa", pf
    assert [r["status"] for r in data["stage2"]["rows"]] == ["ok", "ok"], data["stage2"]
    assert data["stage2"]["rows"][0]["note"].startswith("varlen backend sdpa"), data["stage2"]
    assert "the model sections ran on the SDPA backend" in report
    assert "## e. Stage-2 step" in report and "## Preflight of the model sections" in report
    assert json.loads(next(out.glob("gpu_suite_cpu_*.json")).read_text()) == data


def test_run_child_time_limit_and_exit_statuses():
    t0 = time.time()
    status, secs = gpu_suite.run_child([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), t0 + 1)
    assert status.startswith("killed: still running at its time limit") and secs < 10, (status, secs)
    status, _ = gpu_suite.run_child([sys.executable, "-c", "raise SystemExit(7)"], dict(os.environ), t0 + 30)
    assert status == "died: exit status 7"
    assert gpu_suite.describe_exit(0) == "done"
    assert gpu_suite.describe_exit(-signal.SIGSEGV) == "died: killed by signal 11 (SIGSEGV)"


def test_preflight_catches_a_misaligned_causal_mask(monkeypatch):
    from prorank_fast.modeling import attention

    assert H.preflight_varlen("cpu")["status"].startswith("skipped")  # no varlen backend on CPU
    ok = H.preflight_varlen("cpu", backend="sdpa")
    assert ok["status"] == "PASS" and [r["quantity"] for r in ok["rows"]] == ["out", "grad_q", "grad_k", "grad_v"]

    def top_left(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):  # the classic bug: diagonal at the top
        bq, bk = cu_q.tolist(), cu_k.tolist()
        outs = []
        for i in range(len(bq) - 1):
            qs, ks, vs = (x[b[i] : b[i + 1]].transpose(0, 1)[None] for x, b in ((q, bq), (k, bk), (v, bk)))
            mask = torch.ones(qs.shape[2], ks.shape[2], dtype=torch.bool).tril()
            o = torch.nn.functional.scaled_dot_product_attention(
                qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True
            )
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    monkeypatch.setitem(attention._detected, "torch_varlen", top_left)
    bad = H.preflight_varlen("cpu", backend="torch_varlen")
    assert bad["status"].startswith("FAIL: out error"), bad["status"]
    assert {r["quantity"] for r in bad["rows"] if r["status"] == "FAIL"} == {"out", "grad_q", "grad_k", "grad_v"}


@pytest.mark.parametrize("compile_all", [False, True])
def test_compile_first_shape_only_and_liger_not_carried(monkeypatch, compile_all):
    suite = SimpleNamespace(
        args=SimpleNamespace(impl="triton", compile_all_shapes=compile_all), device=torch.device("cuda")
    )
    assert grpo_loss._variant_unavailable(suite, "compile", 0) == ""
    assert grpo_loss._variant_unavailable(suite, "compile", 1) == ("" if compile_all else grpo_loss.COMPILE_FIRST_SHAPE)
    monkeypatch.setattr(grpo_loss.C, "liger_version", lambda: None)
    for variant in ("liger_chunked", "liger_triton"):
        assert grpo_loss._variant_unavailable(suite, variant, 0) == "skipped: not carried"


def test_quick_profile_and_explicit_flags():
    args = gpu_suite.parse_args(["--quick"])
    assert args.sections == ["peak", "check", "bench", "stage2"] and args.variants == ["ours", "ours_overlap"]
    assert args.budget_s + args.grace_s <= 150
    args = gpu_suite.parse_args(["--quick", "--budget-s", "300", "--variants", "ours,eager"])
    assert args.budget_s == 300 and args.variants == ["ours", "eager"]
    full = gpu_suite.parse_args([])
    assert full.budget_s + full.grace_s <= 330 and full.sections == list(gpu_suite.SECTIONS)
