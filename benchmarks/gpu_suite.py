"""GPU suite: one command on a lent H100/H200, safe to run once; a markdown report printed last.

    bash benchmarks/run_gpu_suite.sh            # installs the wheels carried in .whl/, runs this under `timeout`
    python -m benchmarks.gpu_suite [flags]      # the same without the wheel step and the outer timeout
    python -m benchmarks.gpu_suite --quick      # check, bench (ours: serial, overlap), stage2, peak: <= 3 min
    python -m benchmarks.gpu_suite --smoke      # everything at tiny sizes on CPU (impl="torch", Triton rows skipped)

Sections (``--sections``, in this order; each lives in its theme's file):

a. peak      bf16 matmul TFLOP/s (8192^3 torch.matmul) and device copy bandwidth, measured in this run (harness.py).
b. check     the kernels (impl="triton") against a float64 run of kernels.reference at real sizes
             (N of a few thousand, V=151936), in bf16 and fp32: relative errors of ours and of plain
             PyTorch in the same dtype; PASS when ours <= plain + slack (fp32 1e-5, bf16 1e-2).
             Driver in harness.py, cases in grpo_loss.py (GRPO, log-probs) and score_head.py (score).
c. bench     fused GRPO forward+backward, bf16: time (median, p20, p80; CUDA events) and peak extra
             memory of ours (serial and overlapped schedules), ours with impl="torch", PyTorch eager,
             torch.compile(eager) (cold compile on the first shape only), Liger chunked, Liger's Triton
             grpo_loss (+ logits GEMM); speedups; fraction of the three-GEMM roofline (grpo_loss.py).
d. score     restricted_vocab_score_loss forward+backward (B pairs) vs one Qwen2.5-0.5B backbone
             forward+backward step (random init, bf16, sdpa) (score_head.py).
   preflight before the model sections: the varlen attention backend they would run against SDPA,
             forward and backward, bf16, GQA 14/2 heads of dim 64, causal with more keys than queries
             (stage 1's shared prefix) (harness.preflight_varlen). If it fails, the model sections run
             on the SDPA backend (PRORANK_VARLEN_BACKEND=sdpa) and the report says why; where no
             varlen backend runs (CPU) it says "skipped".
e. stage2    a whole stage-2 training step (forward + backward + AdamW) at the Qwen2.5-0.5B
             configuration (random init, bf16 parameters) on ~300-token random prompts in groups of 8,
             a ~16k-token micro-batch: ours (packed, prorank_varlen attention, restricted_vocab_score_loss)
             vs padded transformers (sdpa, full-vocabulary logits); tokens/s and MFU (stage2_step.py).
f. rerank    reranking throughput at the Qwen2.5-0.5B configuration: 100 documents of ~300 tokens per query,
             ours (Reranker, packed varlen) vs padded transformers forwards; s/query (rerank.py).
g. stage1    the stage-1 GRPO step (sampling + policy forward/backward + AdamW) at the Qwen2.5-0.5B configuration:
             8 prompts x 256 tokens, G=8, 4 tokens; ours (shared prefix) vs G full sequences (generate +
             full-vocabulary logits); step ms and tokens/s (stage1_step.py).
h. report    markdown with card, versions, date, the processes and all rows, written to
             benchmarks/results/gpu_suite_<card>_<date>.md + .json (copies in $OUT when set), printed last.

Processes. This process only plans, waits and writes the final report; it never touches the GPU.
The sections run in child processes (``--part``), one after the other, so that a device fault (an
illegal address poisons the CUDA context for good), a crash or a hang in one cannot lose another's
rows: "kernels" (peak, check, bench, score), "preflight" (CUDA only) and "models" (stage2, rerank,
stage1). Every child rewrites the whole report atomically (``prorank_fast.io``: a temporary file
in the same folder, then os.replace) after every row (``Suite.row_done``), so a kill at any moment
keeps every finished row; the next child resumes from the report's JSON. A child that exits
non-zero, dies of a signal or outlives its time limit (it is then killed) is named in the report,
with how it ended; the parent goes on with the next part.

Time. No row starts after ``--budget-s`` seconds of the run (300; the kernels part stops
``--models-reserve-s`` = 100 s earlier when model sections follow); a part still running
``--grace-s`` (25 s) past its last moment to start a row is killed, the preflight after 60 s. So the
run ends by budget + grace (325 s) at the latest; ``run_gpu_suite.sh`` adds an outer ``timeout``
(350 s from its start, install included; 170 s with ``--quick``, whose budget is 120 / 45 / 20 s).

Nothing is asserted about speed. Exit status: 0, or 3 when a part died (the report says which and
how), 1 with ``--strict`` when a correctness check failed, 2 without CUDA (and without --smoke).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from prorank_fast.io import atomic_write_text

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
# The processes of a run, in order: a device fault in one cannot lose another's rows.
KERNEL_SECTIONS = ("peak", "check", "bench", "score")
MODEL_SECTIONS = ("stage2", "rerank", "stage1")
PREFLIGHT_LIMIT_S = 60.0  # the preflight process is killed past this (it takes ~5 s, most of it startup)
SMOKE = dict(
    device="cpu",
    **H.PEAK_SMOKE,
    **H.CHECK_SMOKE,
    **grpo_loss.GPU_SMOKE,
    **score_head.GPU_SMOKE,
    **stage2_step.GPU_SMOKE,
    **rerank.GPU_SMOKE,
)
# --quick: correctness at real sizes, the fused GRPO rows (ours, serial and overlap) at both shapes, the stage-2 step
# (with the measured peak for the roofline and MFU); ~70 s expected on an H200, hard end 140 s.
QUICK = dict(
    sections="peak,check,bench,stage2",
    variants="ours,ours_overlap",
    budget_s=120.0,
    models_reserve_s=45.0,
    grace_s=20.0,
)
SMOKE_NOTE = "--smoke: tiny sizes on CPU; timings and ratios mean nothing, only the code paths ran"
CRASH_ENV = "PRORANK_GPU_SUITE_TEST_CRASH"  # test hook: the named part aborts (SIGABRT) after its first write
STATE = ("peak", "checks", "bench", "score", "preflight", "stage2", "rerank", "stage1", "parts", "notes")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, impl='torch', Triton rows skipped")
    p.add_argument("--quick", action="store_true", help=f"a short profile: {QUICK} (explicit flags win)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --smoke")
    p.add_argument("--sections", default=",".join(SECTIONS), help="subset of %(default)s")
    p.add_argument("--impl", default=None, help="impl of 'ours': default triton on CUDA, torch on CPU")
    p.add_argument("--budget-s", type=float, default=300.0, help="no row starts after this many seconds of the run")
    p.add_argument("--models-reserve-s", type=float, default=100.0, help="kernels: rows start until budget - this")
    p.add_argument("--grace-s", type=float, default=25.0, help="a part this long past its row deadline is killed")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temp dir with --smoke)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a correctness check fails")
    p.add_argument("--seed", type=int, default=0)
    # How the parent runs its children ("--part all": every section in this one process, for debugging).
    p.add_argument("--part", choices=("kernels", "preflight", "models", "all"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--stamp", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--started-at", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preflight-died", default=None, help=argparse.SUPPRESS)
    p.add_argument("--preflight-process", action="store_true", help=argparse.SUPPRESS)  # also off CUDA (tests)
    H.add_peak_args(p)
    H.add_check_args(p)
    for theme in (grpo_loss, score_head, stage2_step, rerank):
        theme.add_gpu_args(p)
    profile, _ = p.parse_known_args(argv)
    if profile.smoke:
        p.set_defaults(**SMOKE)
    if profile.quick:
        p.set_defaults(**QUICK)
    args = p.parse_args(argv)
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


def _part_line(name: str, part: dict) -> str:
    status = part.get("status", "?")
    if status == "running":
        status = "running when this report was written"
    secs = f", {part['seconds']:.0f} s" if part.get("seconds") is not None else ""
    sections = f" ({', '.join(part['sections'])})" if part.get("sections") else ""
    return f"{name}{sections}: {status}{secs}"


def _died(part: dict) -> bool:
    return part.get("status") not in ("done", "running", None)


def render(suite: H.Suite) -> str:
    a, info = suite.args, suite.info
    items = [[k, v] for k, v in info.items() if k not in ("date", "stamp")]
    items.append(["wall time", f"{suite.elapsed():.0f} s"])
    if suite.parts:
        items.append(["processes", "; ".join(_part_line(n, p) for n, p in suite.parts.items())])
    md = [f"# prorank-fast GPU suite: {info.get('card', '?')}, {info.get('date', '?')}", ""]
    md.append(H.markdown_table(["item", "value"], items))
    first_model = next((s for s in a.sections if s in MODEL_SECTIONS), None)
    blocks = [(n, SECTIONS[n][1]) for n in SECTIONS if n in a.sections]
    if first_model:
        blocks.insert([n for n, _ in blocks].index(first_model), ("preflight", H.render_preflight))
    for name, render_section in blocks:
        try:
            md += render_section(suite)
        except Exception as exc:  # noqa: BLE001 - a partial state must not cost the report
            md += ["", f"(section {name} could not be rendered: {H.describe_failure(exc)})"]
    rows = []
    for name in TARGETS_ORDER:
        if name in a.sections:
            try:
                rows += SECTIONS[name][2](suite)
            except Exception as exc:  # noqa: BLE001
                rows.append([name, f"could not be rendered: {H.describe_failure(exc)}", "n/a"])
    md += ["", "## Targets", "", H.markdown_table(["target", "measured", "result"], rows)]
    notes = list(suite.notes) + [
        f"process {_part_line(n, p)}"
        + (": the rows it finished are above; the rows it did not reach are missing" if p.get("sections") else "")
        for n, p in suite.parts.items()
        if _died(p)
    ]
    if notes:
        md += ["", "Notes:"] + [f"- {n}" for n in notes]
    return "\n".join(md) + "\n"


def environment(suite: H.Suite, *, probe_cuda: bool = True) -> dict:
    """The report's header. ``probe_cuda=False`` (the parent process): the card is not asked for."""
    a, dev = suite.args, suite.device
    v = C.versions()
    if dev.type == "cuda" and probe_cuda:
        props = torch.cuda.get_device_properties(dev)
        card = torch.cuda.get_device_name(dev)
        hw = f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    elif dev.type == "cuda":
        card, hw = "unknown", "no process of the run reached the GPU"
    else:
        card, hw = "cpu", f"{os.cpu_count()} cpus, {torch.get_num_threads()} threads"
    cuda = torch.version.cuda or "-"
    if a.smoke:
        mode = "SMOKE (tiny sizes, not a measurement)"
    else:
        mode = "quick (--quick)" if a.quick else "full"
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
        "ours impl": a.impl,
        "tf32 matmul": str(torch.backends.cuda.matmul.allow_tf32),
        "mode": mode,
    }


def _liger_path() -> str:
    try:
        import liger_kernel

        return str(Path(liger_kernel.__file__).parent)
    except Exception:  # noqa: BLE001
        return "?"


def out_dir(args: argparse.Namespace) -> Path:
    if args.out_dir:
        return Path(args.out_dir)
    if args.smoke:
        return Path(tempfile.gettempdir()) / "prorank-gpu-suite-smoke"
    return C.ROOT / "benchmarks" / "results"


def payload(suite: H.Suite) -> dict:
    return {
        "info": suite.info,
        "run_id": suite.args.run_id,
        "args": {k: str(v) for k, v in vars(suite.args).items()},
        **{name: getattr(suite, name) for name in STATE},
    }


def write_report(suite: H.Suite, text: str | None = None) -> list[Path]:
    """The report (markdown + JSON), each written atomically; copies in $OUT, also atomic."""
    text = render(suite) if text is None else text
    folder = out_dir(suite.args)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_suite_{C.slug(suite.info['card'])}_{suite.info['stamp']}"
    files = {f"{stem}.md": text, f"{stem}.json": json.dumps(payload(suite), indent=1, default=str)}
    paths = []
    for name, content in files.items():
        atomic_write_text(folder / name, content)
        paths.append(folder / name)
    if os.environ.get("OUT") and Path(os.environ["OUT"]).is_dir() and Path(os.environ["OUT"]) != folder:
        for name, content in files.items():
            atomic_write_text(Path(os.environ["OUT"]) / name, content)
    return paths


def find_report(args: argparse.Namespace) -> dict | None:
    """The JSON this run (``--run-id``) has written so far, or None."""
    for path in sorted(out_dir(args).glob(f"gpu_suite_*_{args.stamp}.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("run_id") == args.run_id:
            return data
    return None


def restore(suite: H.Suite, data: dict) -> None:
    suite.info = data["info"]
    for name in STATE:
        if name in data:
            setattr(suite, name, data[name])


def _suite(args: argparse.Namespace) -> H.Suite:
    suite = H.Suite(args)
    if args.started_at is not None:  # the run's clock, not this process's
        suite.t0 = time.perf_counter() - max(0.0, time.time() - args.started_at)
    return suite


# ---------------------------------------------------------------------------------------
# One process: a part of the run
# ---------------------------------------------------------------------------------------


def _prepare_models(suite: H.Suite) -> None:
    """Before the model sections: the preflight's verdict (from its own process, or run here when
    there was none: CPU, ``--part all``, ``--part models``); on FAIL the SDPA backend."""
    from prorank_fast.modeling import resolve_backend, set_varlen_backend

    a = suite.args
    if a.preflight_died:
        suite.preflight = {"status": f"FAIL: the preflight process {a.preflight_died}", "rows": []}
    elif not suite.preflight:
        suite.preflight = H.preflight_varlen(a.device, seed=a.seed)
        suite.log(f"preflight: {suite.preflight['status']}")
    if suite.preflight["status"].startswith("FAIL"):
        set_varlen_backend("sdpa")
        note = f"preflight {suite.preflight['status']}: the model sections ran on the SDPA backend"
        if note not in suite.notes:
            suite.notes.append(note)
    suite.preflight["models_backend"] = resolve_backend(a.device, torch.bfloat16)


def run_part(args: argparse.Namespace) -> int:
    suite = _suite(args)
    data = find_report(args) if args.resume else None
    if data:
        restore(suite, data)
    else:
        suite.info = environment(suite)
        suite.info["stamp"] = args.stamp or C.utc_now().strftime("%Y%m%d-%H%M")
    part = args.part
    if part == "kernels":
        sections = [s for s in args.sections if s in KERNEL_SECTIONS]
    elif part == "models":
        sections = [s for s in args.sections if s in MODEL_SECTIONS]
    else:
        sections = [] if part == "preflight" else list(args.sections)
    suite.parts[part] = {"sections": sections, "status": "running", "pid": os.getpid()}
    if args.smoke and SMOKE_NOTE not in suite.notes:
        suite.notes.append(SMOKE_NOTE)
    suite.checkpoint = lambda: write_report(suite)
    suite.log(f"{part}: {suite.info['card']}; torch {torch.__version__}; liger {suite.info['liger-kernel']}; "
              f"impl {args.impl}; rows start until {args.budget_s:.0f} s")  # fmt: skip
    write_report(suite)
    if os.environ.get(CRASH_ENV) == part:
        suite.log(f"{CRASH_ENV}: the {part} process aborts (a stand-in for a device fault)")
        os.abort()
    t0 = suite.elapsed()
    torch.manual_seed(args.seed)
    if part == "preflight":
        suite.preflight = H.preflight_varlen(args.device, seed=args.seed)
        suite.log(f"preflight: {suite.preflight['status']} ({suite.preflight['seconds']:.1f} s)")
    for name in sections:
        if name in MODEL_SECTIONS and not suite.preflight.get("models_backend"):
            _prepare_models(suite)  # before the first model section
        suite.log(f"section {name}")
        try:
            SECTIONS[name][0](suite)
        except Exception as exc:  # noqa: BLE001 - a section crash must not lose the others
            traceback.print_exc()
            suite.notes.append(f"section {name} crashed: {H.describe_failure(exc)}")
        H.cleanup(args.device)
        write_report(suite)
    suite.parts[part].update(status="done", seconds=round(suite.elapsed() - t0, 1))
    paths = write_report(suite)
    if part == "all":
        suite.log("wrote " + ", ".join(str(p) for p in paths))
        print("\n" + render(suite), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# The parent: runs the parts one after the other, each in its own process
# ---------------------------------------------------------------------------------------


class _Terminated(Exception):
    """SIGTERM reached the parent (the outer ``timeout`` of run_gpu_suite.sh, or a user)."""


def _raise_terminated(signum, frame):
    raise _Terminated


def describe_exit(returncode: int) -> str:
    if returncode == 0:
        return "done"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = "?"
        return f"died: killed by signal {-returncode} ({name})"
    return f"died: exit status {returncode}"


def run_child(cmd: list[str], env: dict, kill_at: float) -> tuple[str, float]:
    """Run ``cmd`` (in the repository root), wait until ``kill_at`` (time.time()) at the latest,
    SIGKILL it past that. Returns (status, seconds): "done", "died: ..." or "killed: ...". The child
    stays in this process group, so a signal to the group (the outer timeout) reaches it too."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=C.ROOT, env=env)
    try:
        status = describe_exit(proc.wait(timeout=max(kill_at - t0, 0.1)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = f"killed: still running at its time limit ({kill_at - t0:.0f} s)"
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return status, time.time() - t0


def orchestrate(args: argparse.Namespace, argv: list[str]) -> int:
    t_start = time.time()
    args.started_at = t_start
    args.stamp = args.stamp or C.utc_now().strftime("%Y%m%d-%H%M")
    args.run_id = f"{args.stamp}-{os.getpid()}-{int(t_start * 1000) % 100000}"
    folder = out_dir(args).resolve()  # the children run in the repository root
    args.out_dir = str(folder)
    common = [*argv, "--stamp", args.stamp, "--run-id", args.run_id, "--started-at", repr(t_start),
              "--out-dir", str(folder)]  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(C.ROOT), env.get("PYTHONPATH", "")) if p)
    kernels = [s for s in args.sections if s in KERNEL_SECTIONS]
    models = [s for s in args.sections if s in MODEL_SECTIONS]
    parts: dict[str, dict] = {}  # the parent's word on each process (it wins over the child's own)

    def log(msg: str) -> None:
        print(f"[gpu_suite {time.time() - t_start:6.1f}s] {msg}", flush=True)

    def run(name: str, sections: list[str], budget: float, kill_at: float, extra=(), extra_env=None) -> str:
        cmd = [sys.executable, "-m", "benchmarks.gpu_suite", *common, "--part", name, "--budget-s", repr(budget)]
        cmd += ["--resume"] if parts else []
        parts[name] = {"sections": sections, "status": "running"}
        log(f"process {name}: {' '.join(sections) or 'varlen attention vs SDPA'} (killed at {kill_at - t_start:.0f} s)")
        status, secs = run_child(cmd + list(extra), {**env, **(extra_env or {})}, kill_at)
        parts[name].update(status=status, seconds=round(secs, 1))
        log(f"process {name}: {status} after {secs:.0f} s")
        _merge(args, parts)
        return status

    terminated = False
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        hard_end = t_start + args.budget_s + args.grace_s
        if kernels:
            deadline = args.budget_s - (args.models_reserve_s if models else 0.0)
            run("kernels", kernels, deadline, t_start + deadline + args.grace_s)
        if models:
            died, backend_env = None, {}
            if args.device.type == "cuda" or args.preflight_process:
                status = run("preflight", [], args.budget_s, min(time.time() + PREFLIGHT_LIMIT_S, hard_end))
                verdict = ((find_report(args) or {}).get("preflight") or {}).get("status")
                if status != "done":
                    died = status
                elif verdict is None:
                    died = "wrote no verdict"
                if died or not verdict.startswith(("PASS", "skipped")):
                    backend_env = {"PRORANK_VARLEN_BACKEND": "sdpa"}
                    log(f"preflight {verdict or died}: the model sections run with PRORANK_VARLEN_BACKEND=sdpa")
            extra = ["--preflight-died", died] if died else []
            run("models", models, args.budget_s, hard_end, extra, backend_env)
    except (_Terminated, KeyboardInterrupt) as exc:
        terminated = True
        for part in parts.values():
            if part["status"] == "running":
                part["status"] = f"died: the run got {'SIGTERM' if isinstance(exc, _Terminated) else 'SIGINT'}"
        log("interrupted: writing the report with what is there")
    finally:
        signal.signal(signal.SIGTERM, previous)
    suite = _merge(args, parts)
    text = render(suite)
    paths = write_report(suite, text)
    log("wrote " + ", ".join(str(p) for p in paths))
    print("\n" + text, flush=True)
    if terminated:
        return 143
    if any(_died(p) for p in parts.values()):
        return 3
    n_fail = sum(r["status"] == "FAIL" for r in suite.checks)
    return 1 if (args.strict and n_fail) else 0


def _merge(args: argparse.Namespace, parts: dict[str, dict]) -> H.Suite:
    """The run's report as the children left it, with the parent's word on each process, written
    back at once (a later kill of the parent keeps it); without any report yet, a bare one."""
    suite = _suite(args)
    data = find_report(args)
    if data:
        restore(suite, data)
    else:
        suite.info = environment(suite, probe_cuda=False)
        suite.info["stamp"] = args.stamp
    for name, part in parts.items():
        suite.parts[name] = {**suite.parts.get(name, {}), **part}
    kernels_end = args.budget_s - (args.models_reserve_s if any(s in MODEL_SECTIONS for s in args.sections) else 0)
    suite.info["time limits"] = (
        f"rows start until {args.budget_s:.0f} s into the run (kernels part: {kernels_end:.0f} s); "
        f"a part is killed {args.grace_s:.0f} s past that (preflight: after {PREFLIGHT_LIMIT_S:.0f} s)"
    )
    if data:  # (a bare report is written by the final call only: a child would otherwise resume it)
        try:
            write_report(suite)
        except Exception as exc:  # noqa: BLE001 - the final write will try again
            print(f"gpu_suite: could not write the report: {H.describe_failure(exc)}", file=sys.stderr)
    return suite


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available (use --smoke to run on CPU)", file=sys.stderr)
        return 2
    if args.part is None:
        return orchestrate(args, argv)
    return run_part(args)


if __name__ == "__main__":
    raise SystemExit(main())
