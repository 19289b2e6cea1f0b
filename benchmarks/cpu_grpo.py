"""CPU benchmark of the fused linear GRPO loss: time and peak memory growth of one forward+backward.

Rows (same inputs, same loss; N packed completion tokens, S equal-length completions, fp32):

* ours           ``fused_linear_grpo_loss(..., impl="torch")``: the chunked PyTorch path, never [N, V] logits
* materialized   ``_common.eager_grpo_loss``: full logits, log-softmax + gather, TRL's formulas
* liger_chunked  ``LigerFusedLinearGRPOLoss(compiled=False)`` on the [S, T, H] view

Time: median (p20, p80) of ``--rounds`` calls after ``--warmup`` calls, in this process.
Memory: each row in a fresh subprocess, peak RSS growth of one call over the post-setup,
post-warm-up RSS (``_memory.cpu_peak_growth``: VmHWM reset through /proc/self/clear_refs,
glibc trimmed and its mmap threshold fixed so that RSS follows live tensors).

    python -m benchmarks.cpu_grpo                 # the table
    python -m benchmarks.cpu_grpo --json out.json # and the numbers
    pytest benchmarks/                            # the same through pytest-benchmark

Target (printed, not asserted): ours' peak memory growth <= 1/10 of the materialized baseline's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from . import _common as C
from . import _memory

VARIANTS = ("ours", "materialized", "liger_chunked")
EXTRA_VARIANTS = ("reference",)  # kernels.reference.grpo_loss_reference (entropy with grad): opt-in
LABELS = {
    "ours": 'ours (impl="torch", chunked)',
    "materialized": "PyTorch materialized logits",
    "liger_chunked": "Liger chunked (compiled=False)",
    "reference": "kernels.reference (fp32 spec)",
}
MEMORY_TARGET = 0.10  # ours / materialized
GROUP = "cpu-grpo-fwd-bwd"
_CHILD_TAG = "@@prorank-bench-memory "


@dataclass
class CPUConfig:
    n: int = 2048
    h: int = 64
    v: int = 32000
    s: int = 64
    beta: float = 0.04
    loss_type: str = "dapo"
    seed: int = 0
    rounds: int = 5
    warmup: int = 1

    @classmethod
    def from_env(cls) -> CPUConfig:
        """Defaults, overridden by ``PRORANK_BENCH_<FIELD>`` (e.g. ``PRORANK_BENCH_ROUNDS=3``) for pytest runs."""
        cfg = cls()
        for f in fields(cls):
            value = os.environ.get(f"PRORANK_BENCH_{f.name.upper()}")
            if value is not None:
                setattr(cfg, f.name, type(getattr(cfg, f.name))(value))
        return cfg

    def settings(self) -> C.GRPOSettings:
        return C.GRPOSettings(beta=self.beta, loss_type=self.loss_type)

    def describe(self) -> str:
        return (
            f"N={self.n} H={self.h} V={self.v} S={self.s} (T={self.n // self.s}) fp32, "
            f"loss_type={self.loss_type}, beta={self.beta} with ref and old log-probs"
        )

    def to_argv(self) -> list[str]:
        out = []
        for f in fields(self):
            out += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return out


@dataclass
class Timing:
    median: float
    p20: float
    p80: float
    rounds: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        qs = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [samples[0]] * 9
        return cls(median=statistics.median(samples), p20=qs[1], p80=qs[7], rounds=len(samples))


@dataclass
class Result:
    variant: str
    timing: Timing | None = None
    peak_bytes: int | None = None
    memory_method: str = ""
    loss: float | None = None
    skipped: str = ""
    note: str = ""


@dataclass
class Report:
    config: CPUConfig
    results: dict[str, Result] = field(default_factory=dict)

    def add(self, result: Result) -> None:
        self.results[result.variant] = result

    def table(self) -> str:
        return format_table(self)


# ---------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------


def unavailable(variant: str) -> str:
    """Why a variant cannot run here ('' when it can)."""
    if variant == "liger_chunked" and C.liger_version() is None:
        return "liger-kernel not installed"
    return ""


def make_inputs(cfg: CPUConfig) -> C.GRPOInputs:
    return C.make_grpo_inputs(cfg.n, cfg.h, cfg.v, cfg.s, dtype=torch.float32, device="cpu", seed=cfg.seed)


def build_step(variant: str, x: C.GRPOInputs, cfg: CPUConfig) -> C.Step:
    name = {"ours": "ours_torch", "materialized": "eager"}.get(variant, variant)
    return C.grpo_step(name, x, cfg.settings(), liger_compiled=False, liger_chunk_size=1)


def time_step(step: C.Step, rounds: int, warmup: int) -> tuple[Timing, float]:
    loss = None
    for _ in range(warmup):
        step.fwd_bwd()
    samples = []
    for _ in range(max(rounds, 1)):
        t0 = time.perf_counter()
        loss, _grads = step.fwd_bwd()
        samples.append(time.perf_counter() - t0)
    return Timing.from_samples(samples), float(loss)


def measure_memory(variant: str, cfg: CPUConfig, timeout: float = 600.0) -> tuple[int | None, str]:
    """Peak RSS growth of one forward+backward of ``variant``, in a fresh subprocess."""
    cmd = [sys.executable, "-m", "benchmarks.cpu_grpo", "--child-memory", variant, *cfg.to_argv()]
    env = _memory.child_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(C.ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(cmd, cwd=C.ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_CHILD_TAG):
            data = json.loads(line[len(_CHILD_TAG) :])
            return data["peak_bytes"], data["method"]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return None, "child failed: " + " | ".join(tail)


def _child_memory(variant: str, cfg: CPUConfig) -> None:
    x = make_inputs(cfg)
    step = build_step(variant, x, cfg)
    mem = _memory.cpu_peak_growth(step.fwd_bwd, warmup=True)
    print(_CHILD_TAG + json.dumps({"peak_bytes": mem["peak_bytes"], "method": mem["method"]}), flush=True)


def run(cfg: CPUConfig, variants=VARIANTS, memory: bool = True, log=print) -> Report:
    report = Report(cfg)
    x = make_inputs(cfg)
    for variant in variants:
        reason = unavailable(variant)
        if reason:
            report.add(Result(variant, skipped=reason))
            log(f"[cpu_grpo] {variant}: skipped ({reason})")
            continue
        step = build_step(variant, x, cfg)
        timing, loss = time_step(step, cfg.rounds, cfg.warmup)
        peak, method = measure_memory(variant, cfg) if memory else (None, "not measured")
        report.add(Result(variant, timing, peak, method, loss, note=step.note))
        log(f"[cpu_grpo] {variant}: {timing.median * 1e3:.1f} ms, peak growth {C.fmt_bytes(peak)}")
    return report


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def format_table(report: Report) -> str:
    res = report.results
    ours = res.get("ours")
    base = res.get("materialized")
    rows = []
    for variant, r in res.items():
        label = LABELS.get(variant, variant)
        if variant == "ours":
            label = C.resolve_ops().label("grpo_loss") + ' (impl="torch", chunked)'
        if r.skipped:
            rows.append([label, "skipped: " + r.skipped, "-", "-", "-"])
            continue
        t = r.timing
        tcol = f"{t.median * 1e3:.1f} [{t.p20 * 1e3:.1f}, {t.p80 * 1e3:.1f}]" if t else "-"
        diff = "-"
        if base is not None and base.loss is not None and r.loss is not None:
            diff = f"{abs(r.loss - base.loss) / max(abs(base.loss), 1e-30):.1e}"
        rows.append([label, tcol, C.fmt_bytes(r.peak_bytes), f"{r.loss:.6f}" if r.loss is not None else "-", diff])
    out = [
        f"CPU fused GRPO loss, forward+backward: {report.config.describe()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, liger-kernel {C.liger_version() or 'missing'}",
        "",
        C.markdown_table(
            ["variant", "time ms median [p20, p80]", "peak RSS growth", "loss", "loss rel. diff vs materialized"], rows
        ),
        "",
    ]
    ratio_rows = []
    for other_key, other_label in (("materialized", "ours / materialized"), ("liger_chunked", "ours / Liger chunked")):
        other = res.get(other_key)
        if ours is None or other is None or ours.skipped or other.skipped:
            ratio_rows.append([other_label, "-", "-", ""])
            continue
        t = _ratio(ours.timing.median if ours.timing else None, other.timing.median if other.timing else None)
        m = _ratio(ours.peak_bytes, other.peak_bytes)
        target = ""
        if other_key == "materialized" and m is not None:
            target = f"memory target <= {MEMORY_TARGET:.2f}: {'met' if m <= MEMORY_TARGET else 'MISSED'}"
        ratio_rows.append([other_label, C.fmt_ratio(t, 3), C.fmt_ratio(m, 3), target])
    out.append(C.markdown_table(["ratio", "time", "peak memory", "target"], ratio_rows))
    methods = {r.memory_method for r in res.values() if r.memory_method and not r.skipped}
    if methods:
        out.append("")
        out.append("memory: one call per fresh subprocess after one warm-up; " + "; ".join(sorted(methods)))
    ops = C.resolve_ops()
    if ops.source.get("grpo_loss") != "kernels":
        out.append("WARNING: fused_linear_grpo_loss is still a placeholder; 'ours' ran kernels.reference instead.")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cpu_grpo", description=__doc__.split("\n\n")[0])
    defaults = CPUConfig()
    for f in fields(CPUConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None)
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {VARIANTS + EXTRA_VARIANTS} (default: %(default)s)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> CPUConfig:
    cfg = CPUConfig()
    for f in fields(CPUConfig):
        value = getattr(args, f.name)
        if value is not None:
            setattr(cfg, f.name, value)
    return cfg


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_from_args(args)
    if args.child_memory:
        _child_memory(args.child_memory, cfg)
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS + EXTRA_VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS + EXTRA_VARIANTS}")
    report = run(cfg, variants, memory=not args.no_memory, log=lambda s: print(s, file=sys.stderr, flush=True))
    table = report.table()
    if args.json:
        payload = {"config": asdict(cfg), "results": {k: asdict(v) for k, v in report.results.items()}}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
