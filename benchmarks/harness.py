"""How every benchmark measures and reports: one timing and statistics harness for all themes.

* statistics: median and p20/p80 of repeated measurements (``quantiles``, ``Stat``), relative
  differences and errors;
* timing: wall-clock calls with warm-up (``time_calls``, ``Runner`` for interleaved rows), and
  ``time_fn``, CUDA events around each call on CUDA (perf_counter on CPU), as many calls as fit
  in a target time;
* machine load: the 1-minute load average and the CPUs that other processes used while a CPU
  benchmark ran (``cpu_counters`` / ``other_cpus``: busy time from /proc/stat minus ours);
* failures of a GPU row (OOM, errors) as the tables print them, and retries at half the size on OOM;
* formatting: markdown tables, ms, bytes, ratios, errors;
* the CPU suites' configurations (dataclass fields = ``--flags`` and ``PRORANK_BENCH_*`` overrides);
* the GPU suite's run context (``Suite``: arguments, time budget, log, timer, and ``row_done``,
  which rewrites the report after every finished row) and its theme-free parts: a. measured peaks
  (the roofline's and MFU's denominator), the driver of b. correctness (ours and plain PyTorch
  against a float64 gold; the cases come from the themes), and the preflight of the model
  sections (the varlen attention backend against SDPA, ``preflight_varlen``).

Peak memory is measured by ``_memory``. Imports go downward only: ``_common`` / ``_memory`` /
``harness`` -> the theme files -> ``gpu_suite``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

import torch

from . import _common as C

# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of the samples (inclusive method; one sample: itself three times)."""
    samples = list(samples)
    if len(samples) > 1:
        qs = statistics.quantiles(samples, n=10, method="inclusive")
        return statistics.median(samples), qs[1], qs[7]
    return samples[0], samples[0], samples[0]


@dataclass
class Stat:
    """Median and p20/p80 of a measurement's samples."""

    median: float
    p20: float
    p80: float

    @classmethod
    def of(cls, samples: Sequence[float], **extra) -> Stat:
        return cls(*quantiles(samples), **extra)

    def fmt(self, digits: int = 0) -> str:
        return f"{self.median:.{digits}f} [{self.p20:.{digits}f}, {self.p80:.{digits}f}]"


def rel_diff(a: float | None, b: float | None) -> float | None:
    """|a - b| / |b| (None when either is None)."""
    if a is None or b is None:
        return None
    return abs(a - b) / max(abs(b), 1e-30)


def rel_err(out: torch.Tensor, gold: torch.Tensor) -> float:
    """||out - gold|| / ||gold|| in fp64 (NaN when out holds a non-finite value)."""
    a, b = out.detach().double().flatten(), gold.detach().double().flatten()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], rounds: int, warmup: int) -> tuple[list[float], object]:
    """``warmup`` untimed calls, then ``rounds`` (at least 1) calls timed with perf_counter.
    Returns (seconds per timed call, the last call's result)."""
    for _ in range(warmup):
        fn()
    samples, out = [], None
    for _ in range(max(rounds, 1)):
        t0 = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - t0)
    return samples, out


class Runner:
    """Calls ``fn(i)`` for i = 0, 1, ... and times each call (perf_counter); the first ``warmup``
    calls are recorded but not counted. Rows that alternate call by call (one Runner each) see the
    same machine load."""

    def __init__(self, fn: Callable[[int], object], warmup: int):
        self.fn, self.warmup = fn, warmup
        self.seconds: list[float] = []
        self.outputs: list = []

    def __call__(self):
        i = len(self.seconds)
        t0 = time.perf_counter()
        out = self.fn(i)
        self.seconds.append(time.perf_counter() - t0)
        self.outputs.append(out)
        return out

    def timed(self) -> list[tuple[int, float]]:
        """(call index, seconds) of the counted calls (all calls when none is past the warm-up)."""
        calls = list(enumerate(self.seconds))
        return calls[self.warmup :] or calls


def time_fn(fn, device: torch.device, *, warmup: int, min_reps: int, max_reps: int, target_s: float) -> dict:
    """Median, p20, p80 seconds of ``fn()``: CUDA events around each call on CUDA, perf_counter on CPU.
    The number of timed calls aims at ``target_s`` seconds, within [min_reps, max_reps]."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    estimate = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max(target_s / estimate, min_reps), max_reps))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends, strict=True):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        samples = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends, strict=True)]
    else:
        samples = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t)
    median, p20, p80 = quantiles(samples)
    return {"median": median, "p20": p20, "p80": p80, "reps": len(samples)}


# ---------------------------------------------------------------------------------------
# Machine load (CPU benchmarks on shared cores)
# ---------------------------------------------------------------------------------------

OTHER_CPUS_WARNING = 0.2  # CPUs used by other processes during a run above which the tables warn


def load_avg() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_counters() -> tuple[float, float, float] | None:
    """(CPU seconds busy on the whole machine, CPU seconds of this process, wall seconds), or None
    without /proc/stat. Two snapshots give the CPUs that other processes used in between."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None
    busy = sum(ticks[:3]) + sum(ticks[5:8])  # user nice system + irq softirq steal (not idle, iowait)
    own = os.times()  # children that were waited for count as ours (pytest's memory subprocesses)
    return busy / hz, own.user + own.system + own.children_user + own.children_system, time.perf_counter()


def other_cpus(start, end) -> float | None:
    """CPUs used on average by other processes between two ``cpu_counters`` snapshots."""
    if start is None or end is None or end[2] <= start[2]:
        return None
    return max(0.0, ((end[0] - start[0]) - (end[1] - start[1])) / (end[2] - start[2]))


@dataclass(kw_only=True)
class VocabReport:
    """A CPU suite's results, keyed (vocabulary size, variant), and the machine's load while they
    ran: ``start()`` before the rows, ``finish()`` after."""

    threads: int = 0
    load_before: float | None = None  # 1-minute load average when the run started / ended
    load_after: float | None = None
    counters: tuple | None = None  # cpu_counters() when the timing started
    other_cpus: float | None = None  # CPUs other processes used on average while the rows ran
    results: dict = field(default_factory=dict)  # (vocab, variant) -> a result with .vocab, .variant, .skipped

    def add(self, result) -> None:
        self.results[(result.vocab, result.variant)] = result

    def start(self):
        self.threads = torch.get_num_threads()
        self.load_before = load_avg()
        self.counters = cpu_counters()
        return self

    def finish(self) -> None:
        self.load_after = load_avg()
        self.other_cpus = other_cpus(self.counters, cpu_counters())

    def ratio(self, vocab: int, other: str, value: Callable, *, lower_is_better: bool = False) -> float | None:
        """How many times better ours is than ``other`` by ``value(result)`` (None unless both ran)."""
        ours, row = self.results.get((vocab, "ours")), self.results.get((vocab, other))
        if ours is None or row is None or ours.skipped or row.skipped:
            return None
        return value(row) / value(ours) if lower_is_better else value(ours) / value(row)


# ---------------------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------------------

SKIPPED = "skipped (time budget)"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def cleanup(device) -> None:
    """Free what a finished row held (CUDA: also return cached blocks, so the next row's peak
    starts from a clean pool). A no-op on CPU, where gc.collect() would only cost time."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def describe_failure(exc: BaseException) -> str:
    """A GPU-suite table cell: OOM, not implemented, or ERROR with the message."""
    if is_oom(exc):
        return "OOM"
    if isinstance(exc, NotImplementedError):
        return "not implemented"
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return "ERROR " + (msg[:160] + "..." if len(msg) > 160 else msg)


def failed(exc: BaseException) -> str:
    """A CPU-suite table cell: why a row could not run."""
    return "failed: " + f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")[:200]


def record_failure(row: dict, exc: BaseException) -> dict:
    """The row's status says why it failed; the traceback is printed unless it was OOM / not implemented."""
    row["status"] = describe_failure(exc)
    if not is_oom(exc) and not isinstance(exc, NotImplementedError):
        traceback.print_exc()
    return row


def halve_on_oom(suite: Suite, attempt: Callable[[int], object], size: int, *, halve: bool = True, message: str):
    """``attempt(size)``; on OOM (while ``halve`` and size > 1) again at half the size, logging
    ``message.format(size)``. Any other failure, or OOM at size 1, is raised."""
    while True:
        try:
            return attempt(size)
        except Exception as exc:
            cleanup(suite.device)
            if not (halve and size > 1 and is_oom(exc)):
                raise
            size = max(1, size // 2)
            suite.log(message.format(size))


# ---------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}" if x < 0.01 else f"{x * 1e3:.1f}"


def fmt_ms_range(r: dict) -> str:
    """``median [p20, p80]`` in ms of a ``time_fn`` result."""
    return f"{fmt_ms(r['median'])} [{fmt_ms(r['p20'])}, {fmt_ms(r['p80'])}]"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_err(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.1e}" if math.isfinite(x) else "nan"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def rows_table(headers: Sequence[str], rows: Sequence[dict], cells: Callable[[dict], list], lead=None) -> str:
    """A GPU section's table: ``cells(r)`` for each timed row ("median" in r); a row that did not
    run shows its label and status, "-" elsewhere. ``lead(r)``: leading columns of every row."""
    out = []
    for r in rows:
        first = lead(r) if lead else []
        if "median" in r:
            out.append(first + cells(r))
        else:
            rest = len(headers) - len(first) - 2
            out.append(first + [r.get("label", r["variant"]), r.get("status", "-")] + ["-"] * rest)
    return markdown_table(headers, out)


def json_default(o):
    """``json.dump(default=...)`` for the CPU suites' numbers: NaN -> null."""
    return None if isinstance(o, float) and math.isnan(o) else o


# ---------------------------------------------------------------------------------------
# The CPU suites' configurations and command lines
# ---------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Base of a CPU suite's configuration: each field is a ``--flag`` of its command and can be
    overridden under pytest by ``<ENV_PREFIX><FIELD>`` (e.g. ``PRORANK_BENCH_S2_ROUNDS=3``)."""

    ENV_PREFIX: ClassVar[str] = "PRORANK_BENCH_"

    @classmethod
    def from_env(cls, **defaults):
        """``defaults`` over the class defaults, overridden by ``<ENV_PREFIX><FIELD>``."""
        cfg = cls(**defaults)
        for f in fields(cls):
            value = os.environ.get(f"{cls.ENV_PREFIX}{f.name.upper()}")
            if value is not None:
                setattr(cfg, f.name, type(getattr(cfg, f.name))(value))
        return cfg

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        defaults = cls()
        for f in fields(cls):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None)

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        cfg = cls()
        for f in fields(cls):
            value = getattr(args, f.name)
            if value is not None:
                setattr(cfg, f.name, value)
        return cfg

    def to_argv(self) -> list[str]:
        out = []
        for f in fields(self):
            out += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return out

    @property
    def vocab_list(self) -> list[int]:
        """The ``vocabs`` field ("1024,151936") as ints."""
        return [int(v) for v in str(self.vocabs).split(",") if v.strip()]


def cpu_parser(prog: str, doc: str, config: type[BenchConfig], variants: Sequence[str], variants_help: str = ""):
    """A CPU suite's command line: the config's fields, --variants, --json."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    config.add_args(p)
    p.add_argument(
        "--variants", default=",".join(variants), help=variants_help or "comma-separated subset of %(default)s"
    )
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p


def parse_variants(text: str, allowed: Sequence[str]) -> list[str]:
    variants = [v.strip() for v in text.split(",") if v.strip()]
    for v in variants:
        if v not in allowed:
            raise SystemExit(f"unknown variant {v!r}; choose from {tuple(allowed)}")
    return variants


# ---------------------------------------------------------------------------------------
# The GPU suite's run context
# ---------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_timing_args(g) -> None:
    """How each row of the GPU suite is timed (``Suite.timer``)."""
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--min-reps", type=int, default=5)
    g.add_argument("--max-reps", type=int, default=50)
    g.add_argument("--target-s", type=float, default=1.0, help="timed seconds per row (within min/max reps)")


# Test hook: "<section>:<k>" makes the row after the k-th finished row of that section a fake slow
# row (it sleeps for an hour), so that a test can kill the run in the middle of a section.
STALL_ENV = "PRORANK_GPU_SUITE_TEST_STALL"


@dataclass
class Suite:
    """One run of the GPU suite (one process of it): its arguments, the time budget, the log, the
    timer and every section's results (filled by the sections, rendered by ``gpu_suite``).

    Every section calls ``row_done(section)`` after each row it adds; ``checkpoint`` (set by
    ``gpu_suite``) then rewrites the whole report on disk, atomically, so that a run killed at any
    moment keeps every row it finished."""

    args: argparse.Namespace
    t0: float = field(default_factory=time.perf_counter)
    info: dict = field(default_factory=dict)
    peak: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    bench: list = field(default_factory=list)
    score: dict = field(default_factory=dict)
    preflight: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)
    rerank: dict = field(default_factory=dict)
    stage1: dict = field(default_factory=dict)
    parts: dict = field(default_factory=dict)  # process name -> sections, status, seconds (gpu_suite)
    notes: list = field(default_factory=list)
    checkpoint: Callable[[], object] | None = field(default=None, repr=False)
    rows_done: dict = field(default_factory=dict)  # section -> rows finished in this process

    @property
    def device(self) -> torch.device:
        return self.args.device

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def log(self, msg: str) -> None:
        print(f"[gpu_suite {self.elapsed():6.1f}s] {msg}", flush=True)

    def timer(self, fn, **overrides):
        a = self.args
        kw = dict(warmup=a.warmup, min_reps=a.min_reps, max_reps=a.max_reps, target_s=a.target_s)
        kw.update(overrides)
        return time_fn(fn, self.device, **kw)

    def skipped_rows(self, variants: Sequence[str], labels: dict) -> list[dict]:
        """Rows for variants left out by the time budget."""
        return [dict(variant=v, label=labels[v], status=SKIPPED) for v in variants]

    def row_done(self, section: str) -> None:
        """A section finished a row (measured, failed or skipped): write the report now. A failure
        to write is logged, never raised: the measurement goes on."""
        self.rows_done[section] = done = self.rows_done.get(section, 0) + 1
        if self.checkpoint is not None:
            try:
                self.checkpoint()
            except Exception as exc:  # noqa: BLE001 - a full disk must not stop the run
                self.log(f"could not write the report: {describe_failure(exc)}")
        if os.environ.get(STALL_ENV) == f"{section}:{done}":
            self.log(f"{STALL_ENV}: row {done + 1} of {section} is a fake slow row (sleeps for an hour)")
            time.sleep(3600)


def add_speedups(rows: list[dict]) -> dict | None:
    """``speedup_of_ours`` = this row's median / ours' on every timed row; returns ours' row."""
    ours = next((r for r in rows if r["variant"] == "ours" and "median" in r), None)
    for r in rows:
        if ours is not None and "median" in r:
            r["speedup_of_ours"] = r["median"] / ours["median"]
    return ours


# ---------------------------------------------------------------------------------------
# a. Measured peaks
# ---------------------------------------------------------------------------------------


def add_peak_args(p) -> None:
    g = p.add_argument_group("a. peak")
    g.add_argument("--matmul-size", type=int, default=8192)
    g.add_argument("--copy-mib", type=int, default=2048, help="bytes copied per call (read + write counted)")
    g.add_argument("--peak-tflops", type=float, default=None, help="roofline peak when section a is skipped")


PEAK_SMOKE = dict(matmul_size=256, copy_mib=16)


def _matmul_peak(suite: Suite) -> dict:
    a, dev = suite.args, suite.device
    m, dtype = a.matmul_size, torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    x = torch.randn(m, m, device=dev, generator=gen).to(dtype)  # random data: zeros run faster
    y = torch.randn(m, m, device=dev, generator=gen).to(dtype)
    out = torch.empty(m, m, device=dev, dtype=dtype)
    t = suite.timer(lambda: torch.matmul(x, y, out=out), warmup=3, min_reps=10, max_reps=100, target_s=1.0)
    return {"size": m, "tflops": 2 * m**3 / t["median"] / 1e12, **t}


def _copy_bandwidth(suite: Suite) -> dict:
    a, dev = suite.args, suite.device
    nbytes = a.copy_mib * 2**20
    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    t = suite.timer(lambda: dst.copy_(src), warmup=3, min_reps=10, max_reps=100, target_s=0.5)
    return {"bytes": nbytes, "gbps": 2 * nbytes / t["median"] / 1e9, **t}


def section_peak(suite: Suite) -> None:
    a = suite.args
    try:
        suite.peak["matmul"] = _matmul_peak(suite)
        mm = suite.peak["matmul"]
        suite.log(f"bf16 matmul {a.matmul_size}^3: {mm['tflops']:.1f} TFLOP/s (median of {mm['reps']})")
    except Exception as exc:  # noqa: BLE001 - reported in the table
        suite.peak["matmul"] = {"size": a.matmul_size, "error": describe_failure(exc)}
    cleanup(suite.device)
    suite.row_done("peak")
    try:
        suite.peak["copy"] = _copy_bandwidth(suite)
        suite.log(f"copy {a.copy_mib} MiB: {suite.peak['copy']['gbps']:.0f} GB/s (read + write)")
    except Exception as exc:  # noqa: BLE001
        suite.peak["copy"] = {"bytes": a.copy_mib * 2**20, "error": describe_failure(exc)}
    cleanup(suite.device)
    suite.row_done("peak")


def peak_flops(suite: Suite) -> float | None:
    """The bf16 matmul peak measured in section a (or --peak-tflops), FLOP/s."""
    if "tflops" in suite.peak.get("matmul", {}):
        return suite.peak["matmul"]["tflops"] * 1e12
    return suite.args.peak_tflops * 1e12 if suite.args.peak_tflops else None


def render_peak(suite: Suite) -> list[str]:
    md = ["", "## a. Measured peaks", ""]
    mm, cp = suite.peak.get("matmul", {}), suite.peak.get("copy", {})
    rows = [
        [
            f"bf16 matmul {mm.get('size')}^3",
            f"{mm['tflops']:.1f} TFLOP/s" if "tflops" in mm else mm.get("error", "-"),
            f"{fmt_ms(mm.get('median'))} ms median of {mm.get('reps', '-')}",
        ],
        [
            f"copy {fmt_bytes(cp.get('bytes'))}",
            f"{cp['gbps']:.0f} GB/s (read+write)" if "gbps" in cp else cp.get("error", "-"),
            f"{fmt_ms(cp.get('median'))} ms median of {cp.get('reps', '-')}",
        ],
    ]
    md.append(markdown_table(["measure", "value", "timing"], rows))
    return md


# ---------------------------------------------------------------------------------------
# b. Correctness: ours and plain PyTorch against a float64 gold (cases from the themes)
# ---------------------------------------------------------------------------------------

SLACK = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def add_check_args(p) -> None:
    g = p.add_argument_group("b. check")
    g.add_argument("--check-n", type=int, default=4096)
    g.add_argument("--check-h", type=int, default=896)
    g.add_argument("--check-v", type=int, default=151936)
    g.add_argument("--check-s", type=int, default=16, help="completions (random lengths) in the GRPO checks")
    g.add_argument("--check-score-b", type=int, default=256)
    g.add_argument("--check-dtypes", default="bf16,fp32")
    g.add_argument("--gold-dtype", default="fp64", choices=("fp64", "fp32"), help="dtype of the reference run")


CHECK_SMOKE = dict(check_n=96, check_h=32, check_v=1000, check_s=6, check_score_b=16)


def finish_check_args(p, args) -> None:
    args.check_dtypes = [DTYPES[d.strip()] for d in args.check_dtypes.split(",") if d.strip()]


@dataclass
class CheckCase:
    """One op checked three ways; each fn(h, w) -> (named forward outputs, scalar to differentiate)."""

    name: str
    gold: Callable
    plain: Callable
    ours: Callable


def run_case(fn, hidden: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """fn(h, w) -> (named forward outputs, scalar to differentiate). Returns outputs + both grads."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    outputs, objective = fn(h, w)
    gh, gw = torch.autograd.grad(objective, [h, w])
    result = {k: v.detach() for k, v in outputs.items()}
    result["grad_hidden"] = gh
    result["grad_weight"] = gw
    return result


def _compare(name: str, dname: str, gold: dict, results: dict, slack: float) -> list[dict]:
    rows = []
    for q in gold:
        row = dict(case=name, dtype=dname, quantity=q, slack=slack)
        errs = {}
        for who in ("plain", "ours"):
            r = results[who]
            if isinstance(r, str):
                errs[who] = r
            elif q not in r:
                errs[who] = "not returned"
            else:
                errs[who] = rel_err(r[q], gold[q])
        row.update(ours=errs["ours"], plain=errs["plain"])
        if isinstance(errs["ours"], str):
            row["status"] = "FAIL" if errs["ours"] != "not returned" else "n/a"
        else:
            plain = errs["plain"] if isinstance(errs["plain"], float) else 0.0
            row["bound"] = plain + slack
            ok = math.isfinite(errs["ours"]) and errs["ours"] <= row["bound"]
            row["status"] = "PASS" if ok else "FAIL"
        rows.append(row)
    return rows


def section_check(suite: Suite, *case_sources: Callable) -> None:
    """Inputs drawn once in fp32 (random completion lengths), cast to each checked dtype; every
    ``case_source(suite, inputs, generator) -> [CheckCase]`` adds its cases, in order."""
    a, dev = suite.args, suite.device
    gold_dtype = torch.float64 if a.gold_dtype == "fp64" else torch.float32
    x = C.make_grpo_inputs(
        a.check_n, a.check_h, a.check_v, a.check_s, dtype=torch.float32, device=dev, seed=a.seed, equal_lengths=False
    )
    gen = torch.Generator(device=dev).manual_seed(a.seed + 1)
    cases = [case for source in case_sources for case in source(suite, x, gen)]
    for dtype in a.check_dtypes:
        hidden = x.hidden.detach().to(dtype)
        weight = x.weight.detach().to(dtype)
        dname = {v: k for k, v in DTYPES.items()}[dtype]
        for case in cases:
            if suite.over_budget():
                suite.checks.append(dict(case=case.name, dtype=dname, quantity="-", status=SKIPPED))
                suite.row_done("check")
                continue
            try:
                gold = run_case(case.gold, hidden.to(gold_dtype), weight.to(gold_dtype))
            except Exception as exc:  # noqa: BLE001
                suite.checks.append(dict(case=case.name, dtype=dname, quantity="gold", status=describe_failure(exc)))
                cleanup(dev)
                suite.row_done("check")
                continue
            results = {}
            for who, fn in (("plain", case.plain), ("ours", case.ours)):
                try:
                    results[who] = run_case(fn, hidden, weight)
                except Exception as exc:  # noqa: BLE001
                    results[who] = describe_failure(exc)
                    if who == "ours" and not isinstance(exc, NotImplementedError | torch.OutOfMemoryError):
                        traceback.print_exc()
                cleanup(dev)
            rows = _compare(case.name, dname, gold, results, SLACK[dtype])
            suite.checks += rows
            del gold, results
            cleanup(dev)
            fails = [r for r in rows if r["status"] == "FAIL"]
            suite.log(f"check {case.name} {dname}: {'FAIL ' + str(len(fails)) if fails else 'PASS'}")
            suite.row_done("check")
    del x
    cleanup(dev)


def render_checks(suite: Suite) -> list[str]:
    a = suite.args
    gold = "float64" if a.gold_dtype == "fp64" else "float32"
    md = [
        "",
        f"## b. Correctness vs kernels.reference in {gold} (N={a.check_n} in {a.check_s} completions, "
        f'H={a.check_h}, V={a.check_v}, score B={a.check_score_b}; ours impl="{a.impl}")',
        "",
        "Relative error ||x - gold|| / ||gold||; PASS when ours <= plain + slack (fp32 1e-5, bf16 1e-2).",
        "",
    ]
    rows = [
        [r["case"], r["dtype"], r["quantity"], fmt_err(r.get("ours")), fmt_err(r.get("plain")),
         fmt_err(r.get("bound")), r["status"]]
        for r in suite.checks
    ]  # fmt: skip
    md.append(markdown_table(["op", "dtype", "quantity", "ours", "plain", "bound", "result"], rows))
    n_fail = sum(r["status"] == "FAIL" for r in suite.checks)
    md += ["", f"{len(suite.checks) - n_fail} of {len(suite.checks)} checks without FAIL ({n_fail} FAIL)."]
    return md


def check_targets(suite: Suite) -> list[list[str]]:
    n_fail = sum(r["status"] == "FAIL" for r in suite.checks)
    return [["correctness checks", f"{n_fail} FAIL of {len(suite.checks)}", "met" if not n_fail else "MISSED"]]


# ---------------------------------------------------------------------------------------
# Preflight of the model sections: the varlen attention backend against SDPA
# ---------------------------------------------------------------------------------------

# (query tokens, key tokens) per sequence. Stage 1's shared prefix attends from the last tokens of
# a longer key sequence (completions after their prompt: causal, aligned bottom-right); the last
# sequence is a plain packed one (stage 2, rerank).
PREFLIGHT_SEQS = ((1, 300), (4, 260), (37, 517), (16, 80), (129, 129))
PREFLIGHT_HEADS = (14, 2, 64)  # query heads, KV heads, head dim (Qwen2.5-0.5B's GQA)
PREFLIGHT_SLACK = 1e-2  # bf16, as section b


def preflight_varlen(device, *, seed: int = 0, backend: str | None = None) -> dict:
    """The varlen attention backend the model sections would run (``backend``; None: resolved as
    they resolve it, ``prorank_fast.modeling.resolve_backend``) against SDPA, forward and backward,
    bf16, GQA 14/2 heads of dim 64, causal sequences with more keys than queries (``PREFLIGHT_SEQS``).
    Both run through ``prorank_fast.modeling.attention.varlen_attention``; the gold is SDPA in fp32.
    PASS when the backend's relative error <= SDPA's own bf16 error + 1e-2 on the output and on the
    gradients of q, k and v. A resolved "sdpa" is skipped (nothing else would run).

    Returns {"status": "PASS" | "FAIL: why" | "skipped: why", "backend", "shape", "rows", "seconds"}."""
    t0 = time.perf_counter()
    device = torch.device(device)
    hq, hkv, d = PREFLIGHT_HEADS
    lq, lk = [q for q, _ in PREFLIGHT_SEQS], [k for _, k in PREFLIGHT_SEQS]
    result: dict = {
        "backend": backend,
        "shape": f"bf16, GQA {hq}/{hkv} heads of dim {d}, {len(lq)} causal sequences of {min(lq)}-{max(lq)} "
        f"queries over {min(lk)}-{max(lk)} keys (queries = the last tokens, as stage 1's shared prefix)",
        "rows": [],
    }
    try:
        from prorank_fast.modeling import attention

        if backend is None:
            result["backend"] = backend = attention.resolve_backend(device, torch.bfloat16)
            if backend == "sdpa":
                why = "forced" if attention.get_varlen_backend() == "sdpa" else "no flash-attn / torch varlen here"
                result["status"] = f"skipped: the model sections run SDPA ({why}; device {device.type})"
                return result
        gen = torch.Generator().manual_seed(seed)
        q0, k0, v0 = (torch.randn(sum(n), h, d, generator=gen) for n, h in ((lq, hq), (lk, hkv), (lk, hkv)))
        g0 = torch.randn(sum(lq), hq, d, generator=gen)
        cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(n)], dtype=torch.int32, device=device) for n in (lq, lk))

        def run(dtype: torch.dtype, which: str) -> dict[str, torch.Tensor]:
            q, k, v = (x.to(device=device, dtype=dtype).requires_grad_() for x in (q0, k0, v0))
            o = attention.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), scale=d**-0.5, causal=True,
                                           backend=which)  # fmt: skip
            dq, dk, dv = torch.autograd.grad(o, (q, k, v), g0.to(device=device, dtype=dtype))
            return {"out": o.detach(), "grad_q": dq, "grad_k": dk, "grad_v": dv}

        gold, plain, ours = run(torch.float32, "sdpa"), run(torch.bfloat16, "sdpa"), run(torch.bfloat16, backend)
        sync(device)
        for name in gold:
            err, base = rel_err(ours[name], gold[name]), rel_err(plain[name], gold[name])
            bound = base + PREFLIGHT_SLACK
            status = "PASS" if math.isfinite(err) and err <= bound else "FAIL"
            result["rows"].append(dict(quantity=name, ours=err, sdpa=base, bound=bound, status=status))
        bad = [r for r in result["rows"] if r["status"] == "FAIL"]
        result["status"] = (
            "FAIL: " + ", ".join(f"{r['quantity']} error {fmt_err(r['ours'])} > {fmt_err(r['bound'])}" for r in bad)
            if bad
            else "PASS"
        )
    except Exception as exc:  # noqa: BLE001 - the verdict says why
        traceback.print_exc()
        result["status"] = "FAIL: " + describe_failure(exc)
    finally:
        result["seconds"] = time.perf_counter() - t0
    return result


def render_preflight(suite: Suite) -> list[str]:
    pf = suite.preflight
    md = ["", "## Preflight of the model sections: varlen attention against SDPA", ""]
    if not pf:
        return md + ["Not run (yet)."]
    ran = pf.get("models_backend")
    status = pf.get("status", "?")
    what = "" if not pf.get("rows") else f"{pf.get('backend')} against SDPA (gold: SDPA in fp32), {pf.get('shape')}; "
    md.append(
        f"**{status}**"
        + (f": {what}{pf['seconds']:.1f} s" if what else "")
        + ". The model sections ran with the "
        + (f"{ran} backend." if ran else "backend they resolve (not started yet).")
    )
    if pf.get("rows"):
        rows = [[r["quantity"], fmt_err(r["ours"]), fmt_err(r["sdpa"]), fmt_err(r["bound"]), r["status"]]
                for r in pf["rows"]]  # fmt: skip
        md += ["", markdown_table(["quantity", pf.get("backend", "backend"), "SDPA bf16", "bound", "result"], rows)]
    return md
