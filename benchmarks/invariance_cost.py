"""What CPU batch invariance costs at the GEMM: fixed row tiles against one library call, on MKL's path
for this CPU and on its Intel paths, with MKL in strict CNR mode (what importing the kernels chooses)
and not (the environment's MKL_CBWR=AUTO).

Each (MKL path, MKL mode) runs in its own process, since MKL fixes its mode at its first call:

* path ``native``: MKL as it runs on this CPU (AMD: a generic sgemm; Intel: AVX2 / AVX-512);
* path ``intel``: MKL's Intel paths, forced on other x86 CPUs by ``_common.INTEL_SHIM_C`` preloaded
  (skipped on Intel, where it is ``native``, and where it cannot run);
* mode ``strict`` (MKL_CBWR unset: the kernels choose AUTO,STRICT) or ``auto`` (MKL_CBWR=AUTO, left as
  it is).

Per process: one SmolLM2-135M layer's linears (q, k, v, o, gate, up, down: 576 -> 576, 192, 192, 576,
1536, 1536, 1536 -> 576) on M rows, fp32 and under bf16 autocast, at 1 and 2 threads, M = 4160 (a
stage-1 prompt pass, 16 prompts of 260 tokens) and M = 128 (a decode step of 16 x 8 completions) and
M = 16 (a decode step of 2 prompts' completions, padded to a tile): the layer's ms through
``F.linear`` (all rows in one call) and through ``batch_invariant_linear`` (its tiles: 128 rows for these weights),
median of ``--rounds`` after one warm-up, and their ratio. The weights are parameters (as in a model, no
gradients recorded): under autocast both paths cast each once, not per call. Rows of both modes side by side; the last
column is strict's tiles against auto's tiles (what strict CNR costs where invariance needs it).

    python -m benchmarks.invariance_cost [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import _common as C
from . import harness as H

LAYER = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]  # (K, N)
ROWS = (4160, 128, 16)

_CHILD = r"""
import json, statistics, sys, time, torch
import torch.nn.functional as F
from prorank_fast.kernels.invariant_matmul import batch_invariant_linear, mkl_reproducibility
layer, rows, rounds = json.loads(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
# parameters, as in a model: autocast caches a parameter's bf16 cast per region, as ours does per version
weights = [torch.nn.Parameter(torch.randn(n, k) / k**0.5) for k, n in layer]
torch.set_grad_enabled(False)
def timed(fn):
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
out = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    for bf16 in (False, True):
        for m in rows:
            xs = {k: torch.randn(m, k) for k, _ in layer}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                plain = timed(lambda: [F.linear(xs[w.shape[1]], w) for w in weights])
                tiles = timed(lambda: [batch_invariant_linear(xs[w.shape[1]], w) for w in weights])
            out.append({"threads": threads, "dtype": "bf16 autocast" if bf16 else "fp32", "rows": m,
                        "plain_ms": plain, "tiles_ms": tiles})
print(json.dumps({"mkl": mkl_reproducibility(), "rows": out}))
"""


def child(env_extra: dict, rounds: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"} | env_extra
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(LAYER), json.dumps(ROWS), str(rounds)],
        env=env, capture_output=True, text=True, cwd=C.ROOT,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(rounds: int, log=print) -> dict:
    paths = {"native": {}}
    with tempfile.TemporaryDirectory(prefix="prorank-intel-shim-") as tmp:
        intel = C.intel_mkl_env(Path(tmp))
        if intel:  # {} on Intel: the native path is already Intel's
            paths["intel"] = intel
        results = {}
        counters = H.cpu_counters()
        for path, env in paths.items():
            for mode, extra in (("strict", {}), ("auto", {"MKL_CBWR": "AUTO"})):
                log(f"[invariance_cost] MKL path {path}, mode {mode}")
                results[(path, mode)] = child({**env, **extra}, rounds)
        other = H.other_cpus(counters, H.cpu_counters())
    return {"results": results, "other_cpus": other, "intel_shim": "intel" in paths}


def table(report: dict) -> str:
    res = report["results"]
    load = f"machine load: other processes used {report['other_cpus']:.2f} of {os.cpu_count()} CPUs on average"
    if report["other_cpus"] > H.OTHER_CPUS_WARNING:
        load += " -- WARNING: the CPUs were shared, the timings are unreliable"
    lines = [
        f"Batch-invariant GEMM tiles on CPU: one SmolLM2-135M layer's 7 linears, ms (median); {C.describe_cpu()}; "
        f"torch {C.versions().get('torch', '?')}; MKL's Intel paths forced by the shim: {report['intel_shim']}",
        load,
        "",
    ]
    for (path, mode), r in res.items():
        lines.append(f"- path {path}, mode {mode}: mkl_reproducibility() = {r['mkl']}")
    headers = ["MKL path", "threads", "dtype", "rows", "strict: F.linear", "strict: tiles", "tiles / F.linear",
               "auto: F.linear", "auto: tiles", "tiles / F.linear", "strict tiles / auto tiles"]  # fmt: skip
    rows = []
    for path in dict.fromkeys(p for p, _ in res):
        strict, auto = res[(path, "strict")]["rows"], res[(path, "auto")]["rows"]
        for s, a in zip(strict, auto, strict=True):
            rows.append([path, s["threads"], s["dtype"], s["rows"], f"{s['plain_ms']:.2f}", f"{s['tiles_ms']:.2f}",
                         f"{s['tiles_ms'] / s['plain_ms']:.2f}", f"{a['plain_ms']:.2f}", f"{a['tiles_ms']:.2f}",
                         f"{a['tiles_ms'] / a['plain_ms']:.2f}", f"{s['tiles_ms'] / a['tiles_ms']:.2f}"])  # fmt: skip
    return "\n".join(lines + ["", H.markdown_table(headers, rows)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.invariance_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    report = run(args.rounds, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        payload = {**report, "results": [{"path": p, "mode": m, **r} for (p, m), r in report["results"].items()]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
