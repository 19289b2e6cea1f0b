"""GPU suite: one command on a lent H100/H200, a markdown report printed last.

    bash benchmarks/run_gpu_suite.sh            # installs a carried liger wheel from .whl/, then runs this
    python -m benchmarks.gpu_suite [flags]      # the same without the wheel step
    python -m benchmarks.gpu_suite --smoke      # everything at tiny sizes on CPU (impl="torch", Triton rows skipped)

Sections (``--sections``, in this order; each lives in its theme's file):

a. peak      bf16 matmul TFLOP/s (8192^3 torch.matmul) and device copy bandwidth, measured in this run (harness.py).
b. check     the kernels (impl="triton") against a float64 run of kernels.reference at real sizes
             (N of a few thousand, V=151936), in bf16 and fp32: relative errors of ours and of plain
             PyTorch in the same dtype; PASS when ours <= plain + slack (fp32 1e-5, bf16 1e-2).
             Driver in harness.py, cases in grpo_loss.py (GRPO, log-probs) and score_head.py (score).
c. bench     fused GRPO forward+backward, bf16: time (median, p20, p80; CUDA events) and peak extra
             memory of ours, ours with impl="torch", PyTorch eager, torch.compile(eager), Liger chunked,
             Liger's Triton grpo_loss (+ logits GEMM); speedups; fraction of the three-GEMM roofline (grpo_loss.py).
d. score     restricted_vocab_score_loss forward+backward (B pairs) vs one Qwen2.5-0.5B backbone
             forward+backward step (random init, bf16, sdpa) (score_head.py).
e. stage2    a whole stage-2 training step (forward + backward + AdamW) at the Qwen2.5-0.5B
             configuration (random init, bf16 parameters) on ~300-token random prompts in groups of 8,
             a ~16k-token micro-batch: ours (packed, prorank_varlen attention, restricted_vocab_score_loss)
             vs padded transformers (sdpa, full-vocabulary logits); tokens/s and MFU (stage2_step.py).
f. rerank    reranking throughput at the Qwen2.5-0.5B configuration: 100 documents of ~300 tokens per query,
             ours (Reranker, packed varlen) vs padded transformers forwards; s/query (rerank.py).
g. stage1    the stage-1 GRPO step (sampling + policy forward/backward + AdamW) at the Qwen2.5-0.5B configuration:
             8 prompts x 256 tokens, G=8, 4 tokens; ours (shared prefix) vs G full sequences (generate +
             full-vocabulary logits); step ms and tokens/s (stage1_step.py).
h. report    markdown with card, versions, date and all rows, written to
             benchmarks/results/gpu_suite_<card>_<date>.md (and $OUT when set) and printed last.

This file only parses the arguments, runs the sections and writes the report (a partial one after
every section). Nothing is asserted about speed; the process exits 0 unless the suite itself crashes
(``--strict`` also makes a failed correctness check exit 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from . import _common as C
from . import grpo_loss, rerank, score_head, stage1_step, stage2_step
from . import harness as H


def section_check(suite: H.Suite) -> None:
    H.section_check(suite, grpo_loss.check_cases, score_head.check_cases)


# name -> (run, render, targets), in the order they run and are rendered
SECTIONS = {
    "peak": (H.section_peak, H.render_peak, None),
    "check": (section_check, H.render_checks, H.check_targets),
    "bench": (grpo_loss.gpu_section, grpo_loss.gpu_render, grpo_loss.gpu_targets),
    "score": (score_head.gpu_section, score_head.gpu_render, score_head.gpu_targets),
    "stage2": (stage2_step.gpu_section, stage2_step.gpu_render, stage2_step.gpu_targets),
    "rerank": (rerank.gpu_section, rerank.gpu_render, rerank.gpu_targets),
    "stage1": (stage1_step.gpu_section, stage1_step.gpu_render, stage1_step.gpu_targets),
}
TARGETS_ORDER = ("bench", "score", "stage2", "rerank", "stage1", "check")  # rows of the Targets table
SMOKE = dict(
    device="cpu",
    **H.PEAK_SMOKE,
    **H.CHECK_SMOKE,
    **grpo_loss.GPU_SMOKE,
    **score_head.GPU_SMOKE,
    **stage2_step.GPU_SMOKE,
    **rerank.GPU_SMOKE,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, impl='torch', Triton rows skipped")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--sections", default=",".join(SECTIONS), help="subset of %(default)s")
    p.add_argument("--impl", default=None, help="impl of 'ours': default triton on CUDA, torch on CPU")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip remaining rows past this wall time")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp dir with --smoke)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a correctness check fails")
    p.add_argument("--seed", type=int, default=0)
    H.add_peak_args(p)
    H.add_check_args(p)
    for theme in (grpo_loss, score_head, stage2_step, rerank):
        theme.add_gpu_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        args.device = args.device or SMOKE["device"]
        for k, v in SMOKE.items():
            if k != "device" and getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.device = torch.device(args.device or "cuda")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {tuple(SECTIONS)}")
    grpo_loss.finish_gpu_args(p, args)
    stage2_step.finish_gpu_args(p, args)
    H.finish_check_args(p, args)
    if args.impl is None:
        args.impl = "triton" if args.device.type == "cuda" else "torch"
    return args


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def render(suite: H.Suite) -> str:
    a, info = suite.args, suite.info
    items = [[k, v] for k, v in info.items() if k not in ("date", "stamp")]
    items.append(["wall time", f"{suite.elapsed():.0f} s"])
    md = [f"# prorank-fast GPU suite: {info['card']}, {info['date']}", "", H.markdown_table(["item", "value"], items)]
    for name, (_run, render_section, _targets) in SECTIONS.items():
        if name in a.sections:
            md += render_section(suite)
    rows = []
    for name in TARGETS_ORDER:
        if name in a.sections:
            rows += SECTIONS[name][2](suite)
    md += ["", "## Targets", "", H.markdown_table(["target", "measured", "result"], rows)]
    if suite.notes:
        md += ["", "Notes:"] + [f"- {n}" for n in suite.notes]
    return "\n".join(md) + "\n"


def environment(suite: H.Suite) -> dict:
    dev = suite.device
    v = C.versions()
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        card = torch.cuda.get_device_name(dev)
        hw = f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
        cuda = torch.version.cuda or "-"
    else:
        card, hw, cuda = "cpu", f"{os.cpu_count()} cpus, {torch.get_num_threads()} threads", "-"
    return {
        "card": card,
        "date": C.utc_now().strftime("%Y-%m-%d %H:%M UTC"),
        "hardware": hw,
        "torch": f"{v['torch']} (CUDA {cuda})",
        "triton": v["triton"],
        "transformers": v["transformers"],
        "liger-kernel": v["liger-kernel"] + (f" ({_liger_path()})" if v["liger-kernel"] != "missing" else ""),
        "python": v["python"],
        "commit": C.git_commit(),
        "source sha256": C.source_digest(),
        "ours impl": suite.args.impl,
        "tf32 matmul": str(torch.backends.cuda.matmul.allow_tf32),
        "mode": "SMOKE (tiny sizes, not a measurement)" if suite.args.smoke else "full",
    }


def _liger_path() -> str:
    try:
        import liger_kernel

        return str(Path(liger_kernel.__file__).parent)
    except Exception:  # noqa: BLE001
        return "?"


def write_report(suite: H.Suite, text: str) -> list[Path]:
    a = suite.args
    if a.out_dir:
        out_dir = Path(a.out_dir)
    elif a.smoke:
        out_dir = Path(tempfile.gettempdir()) / "prorank-gpu-suite-smoke"
    else:
        out_dir = C.ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_suite_{C.slug(suite.info['card'])}_{suite.info['stamp']}"
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(text)
    payload = {
        "info": suite.info,
        "args": {k: str(v) for k, v in vars(a).items()},
        "peak": suite.peak,
        "checks": suite.checks,
        "bench": suite.bench,
        "score": suite.score,
        "stage2": suite.stage2,
        "rerank": suite.rerank,
        "stage1": suite.stage1,
    }
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    paths = [md_path, json_path]
    if os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir():
        for p in (md_path, json_path):
            shutil.copy(p, Path(os.environ["OUT"]) / p.name)
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    suite = H.Suite(args)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available (use --smoke to run on CPU)", file=sys.stderr)
        return 2
    suite.info = environment(suite)
    suite.info["stamp"] = C.utc_now().strftime("%Y%m%d-%H%M")
    suite.log(f"{suite.info['card']}; torch {torch.__version__}; liger {suite.info['liger-kernel']}; impl {args.impl}")
    if args.smoke:
        suite.notes.append("--smoke: tiny sizes on CPU; timings and ratios mean nothing, only the code paths ran")
    torch.manual_seed(args.seed)
    for name in args.sections:
        suite.log(f"section {name}")
        try:
            SECTIONS[name][0](suite)
        except Exception as exc:  # noqa: BLE001 - a section crash must not lose the others
            traceback.print_exc()
            suite.notes.append(f"section {name} crashed: {H.describe_failure(exc)}")
        H.cleanup(args.device)
        # a partial report after every section: a run cut off by its time limit still leaves one
        write_report(suite, render(suite))
    text = render(suite)
    paths = write_report(suite, text)
    suite.log("wrote " + ", ".join(str(p) for p in paths))
    print("\n" + text, flush=True)
    n_fail = sum(r["status"] == "FAIL" for r in suite.checks)
    return 1 if (args.strict and n_fail) else 0


if __name__ == "__main__":
    raise SystemExit(main())
