"""The fused linear GRPO loss (and log-probs): CPU time and peak memory, GPU speed, memory and correctness.

CPU (``python -m benchmarks.grpo_loss``, ``prorank-fast bench cpu``, ``pytest benchmarks/test_grpo_loss.py``):
time and peak memory growth of one forward+backward. Rows (same inputs, same loss; N packed
completion tokens, S equal-length completions, fp32):

* ours           ``fused_linear_grpo_loss(..., impl="torch")``: the chunked PyTorch path, never [N, V] logits
* materialized   ``eager_grpo_loss``: full logits, log-softmax + gather, TRL's formulas
* liger_chunked  ``LigerFusedLinearGRPOLoss(compiled=False)`` on the [S, T, H] view

Time: median (p20, p80) of ``--rounds`` calls after ``--warmup`` calls, in this process.
Memory: each row in a fresh subprocess, peak RSS growth of one call over the post-setup,
post-warm-up RSS (``_memory.cpu_peak_growth``: VmHWM reset through /proc/self/clear_refs,
glibc trimmed and its mmap threshold fixed so that RSS follows live tensors).

    python -m benchmarks.grpo_loss                 # the table
    python -m benchmarks.grpo_loss --json out.json # and the numbers
    pytest benchmarks/                             # the same through pytest-benchmark

Target (printed, not asserted): ours' peak memory growth <= 1/10 of the materialized baseline's.

GPU suite: section c (``bench``): forward+backward in bf16 of ours, ours with impl="torch", PyTorch
eager, torch.compile(eager) (cold compile on the first shape only), Liger chunked and Liger's Triton
op (+ logits GEMM; "skipped: not carried" without liger-kernel), time (CUDA events), peak extra
memory, speedups, fraction of the three-GEMM roofline; and the GRPO and log-probs cases of
section b (``check_cases``).

Baselines, defined once so that every row times the same thing:

* ``eager_grpo_loss``: materialized logits (the GEMM in the input dtype), upcast to fp32,
  log-softmax + gather, entropy under ``no_grad`` in row chunks (TRL logs it that way), then
  TRL's formulas (``reference.grpo_loss_from_logprobs``). Its compiled form is the
  ``torch.compile`` row.
* Liger chunked: ``LigerFusedLinearGRPOLoss`` on the padded [S, T, H] view of the packed rows.
* Liger Triton: ``liger_kernel.transformers.grpo_loss.triton_grpo_loss`` on full logits
  [S, T + 1, V] (it drops the last position, as TRL's ``logits_to_keep + 1``), logits GEMM
  included in the timed region.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from prorank_fast.kernels import fused_linear_grpo_loss, fused_linear_logprobs, reference

from . import _common as C
from . import _memory
from . import harness as H

# ---------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------


def materialized_logprobs(hidden, weight, token_ids, temperature: float = 1.0, entropy_chunk: int = 1024):
    """Full [N, V] logits in the input dtype, upcast to fp32, log-softmax, gather.

    Returns (logp [N] fp32 differentiable, entropy [N] fp32 detached)."""
    logits = (hidden @ weight.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = torch.cat([-(c.exp() * c).sum(-1) for c in logsm.detach().split(entropy_chunk)])
    return logp, entropy


def eager_grpo_loss(
    hidden,
    weight,
    token_ids,
    advantages,
    seq_ids,
    old_logprobs=None,
    ref_logprobs=None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    temperature: float = 1.0,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length=None,
    reference=reference,
):
    """The PyTorch eager baseline: materialized logits + TRL's formulas. (loss, metrics).

    ``reference``: the kernels.reference module, bound as a default argument so that a
    torch.compile of this function does not trace a module lookup."""
    logp, entropy = materialized_logprobs(hidden, weight, token_ids, temperature)
    return reference.grpo_loss_from_logprobs(
        logp,
        advantages,
        seq_ids,
        old_logprobs,
        ref_logprobs,
        entropy=entropy,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
    )


# Liger (optional everywhere: the GPU machines do not have it unless a wheel is carried)


def liger_chunked_module(*, use_ref: bool, compiled: bool, chunk_size: int, **settings):
    """``LigerFusedLinearGRPOLoss``; ``settings``: beta, epsilon_low, epsilon_high, loss_type,
    importance_sampling_level, temperature (its own keyword names)."""
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(use_ref_model=use_ref, compiled=compiled, chunk_size=chunk_size, **settings)


def liger_triton_grpo_fn():
    """Liger's Triton GRPO op on full logits [B, L + 1, V] (TRL's ``logits_to_keep + 1`` layout)."""
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        return triton_grpo_loss
    except ImportError:
        # liger_kernel.transformers imports every model patch; if one of them does not import
        # against the installed transformers, call the autograd Function directly (0.8.5 order).
        from liger_kernel.ops.grpo_loss import GrpoLossFunction

    def triton_grpo_loss(logits, old_logp, ref_logp, completion_ids, advantages, completion_mask=None, **kw):
        loss, kl_mean, clip_ratio = GrpoLossFunction.apply(
            logits,
            old_logp,
            ref_logp,
            completion_ids,
            advantages,
            completion_mask,
            kw.get("temperature", 1.0),
            kw.get("beta", 0.04),
            kw.get("eps_low", 0.2),
            kw.get("eps_high", 0.2),
            True,  # inplace
            kw.get("loss_type", "dapo"),
            kw.get("max_completion_length"),
            True,  # reduce
            kw.get("importance_sampling_level", "token"),
            1.0,
            1.05,
            None,
            kw.get("delta"),
            False,
            kw.get("num_items_in_batch"),
            None,
        )
        return loss, [kl_mean, clip_ratio]

    return triton_grpo_loss


# ---------------------------------------------------------------------------------------
# Forward + backward of each variant over the same inputs
# ---------------------------------------------------------------------------------------


@dataclass
class GRPOSettings:
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    temperature: float = 1.0
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"


def grpo_step(
    variant: str,
    x: C.GRPOInputs,
    cfg: GRPOSettings,
    *,
    impl: str = "torch",
    liger_compiled: bool = False,
    liger_chunk_size: int = 1,
    compile_kwargs: dict | None = None,
) -> C.Step:
    """Build the forward(+loss) of one variant. Variants:

    ours / ours_torch  fused_linear_grpo_loss (impl as given / impl="torch")
    ours_overlap       the same with schedule="overlap" (next chunk's logits GEMM on a side stream)
    eager              eager_grpo_loss (materialized logits)
    compile            torch.compile(eager_grpo_loss)
    reference          kernels.reference.grpo_loss_reference (fp32 materialized spec; entropy with grad)
    liger_chunked      LigerFusedLinearGRPOLoss on the [S, T, H] view
    liger_triton       logits GEMM on [S, T + 1, H] + liger's Triton grpo_loss
    """
    common = asdict(cfg)  # beta, epsilon_low/high, temperature, loss_type, importance_sampling_level
    args = (x.hidden, x.weight, x.token_ids, x.advantages, x.seq_ids, x.old_logprobs, x.ref_logprobs)
    wrt = (x.hidden, x.weight)
    if variant in ("ours", "ours_torch", "ours_overlap"):
        use_impl = "torch" if variant == "ours_torch" else impl
        schedule = "overlap" if variant == "ours_overlap" else "serial"
        f = lambda: fused_linear_grpo_loss(*args, **common, impl=use_impl, schedule=schedule)[0]
        return C.Step(variant, f, wrt, note=f"impl={use_impl}, schedule={schedule}")
    if variant == "eager":
        return C.Step(variant, lambda: eager_grpo_loss(*args, **common)[0], wrt)
    if variant == "compile":
        compiled = torch.compile(functools.partial(eager_grpo_loss, reference=reference), **(compile_kwargs or {}))
        return C.Step(variant, lambda: compiled(*args, **common)[0], wrt, note="torch.compile(eager)")
    if variant == "reference":
        return C.Step(variant, lambda: reference.grpo_loss_reference(*args, **common)[0], wrt)
    if x.seq_len is None:
        raise ValueError("Liger variants need equal-length sequences (padded layout)")
    s, t, h = x.num_sequences, x.seq_len, x.hidden.shape[1]
    ids2 = x.token_ids.view(s, t)
    old2, ref2 = x.old_logprobs.view(s, t), x.ref_logprobs.view(s, t)
    if variant == "liger_chunked":
        mod = liger_chunked_module(
            **common, use_ref=cfg.beta != 0.0, compiled=liger_compiled, chunk_size=liger_chunk_size
        )
        mask = torch.ones(s, t, device=x.hidden.device, dtype=torch.long)

        def fn():
            loss, _ = mod(
                x.hidden.view(s, t, h),
                x.weight,
                ids2,
                mask,
                x.advantages,
                ref_per_token_logps=ref2,
                old_per_token_logps=old2,
            )
            return loss

        return C.Step(variant, fn, wrt, note=f"compiled={liger_compiled}, chunk_size={liger_chunk_size}")
    if variant == "liger_triton":
        op = liger_triton_grpo_fn()
        # TRL layout: T + 1 positions per sequence, the last one dropped by the op. A separate leaf
        # (made before timing) so the padding copy is not in the timed region.
        hp = torch.cat([x.hidden.detach().view(s, t, h), x.hidden.new_zeros(s, 1, h)], dim=1).requires_grad_()
        mask = torch.ones(s, t, device=x.hidden.device, dtype=torch.long)

        def fn():
            logits = hp @ x.weight.t()
            loss, _ = op(
                logits,
                old2,
                ref2,
                ids2,
                x.advantages,
                mask,
                temperature=cfg.temperature,
                beta=cfg.beta,
                eps_low=cfg.epsilon_low,
                eps_high=cfg.epsilon_high,
                loss_type=cfg.loss_type,
                importance_sampling_level=cfg.importance_sampling_level,
                reduce=True,
            )
            return loss

        return C.Step(variant, fn, (hp, x.weight), note="logits GEMM over S*(T+1) rows included")
    raise ValueError(f"unknown variant {variant!r}")


# ---------------------------------------------------------------------------------------
# CPU: time and peak memory growth
# ---------------------------------------------------------------------------------------

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
class CPUConfig(H.BenchConfig):
    n: int = 2048
    h: int = 64
    v: int = 32000
    s: int = 64
    beta: float = 0.04
    loss_type: str = "dapo"
    seed: int = 0
    rounds: int = 5
    warmup: int = 1

    def settings(self) -> GRPOSettings:
        return GRPOSettings(beta=self.beta, loss_type=self.loss_type)

    def describe(self) -> str:
        return (
            f"N={self.n} H={self.h} V={self.v} S={self.s} (T={self.n // self.s}) fp32, "
            f"loss_type={self.loss_type}, beta={self.beta} with ref and old log-probs"
        )


@dataclass
class Timing(H.Stat):
    rounds: int = 0

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        return cls.of(samples, rounds=len(samples))


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


def unavailable(variant: str) -> str:
    """Why a variant cannot run here ('' when it can)."""
    if variant == "liger_chunked" and C.liger_version() is None:
        return "liger-kernel not installed"
    return ""


def make_inputs(cfg: CPUConfig) -> C.GRPOInputs:
    return C.make_grpo_inputs(cfg.n, cfg.h, cfg.v, cfg.s, dtype=torch.float32, device="cpu", seed=cfg.seed)


def build_step(variant: str, x: C.GRPOInputs, cfg: CPUConfig) -> C.Step:
    name = {"ours": "ours_torch", "materialized": "eager"}.get(variant, variant)
    return grpo_step(name, x, cfg.settings(), liger_compiled=False, liger_chunk_size=1)


def time_step(step: C.Step, rounds: int, warmup: int) -> tuple[Timing, float]:
    samples, (loss, _grads) = H.time_calls(step.fwd_bwd, rounds, warmup)
    return Timing.from_samples(samples), float(loss)


def measure_memory(variant: str, cfg: CPUConfig, timeout: float = 600.0) -> tuple[int | None, str]:
    """Peak RSS growth of one forward+backward of ``variant``, in a fresh subprocess."""
    cmd = [sys.executable, "-m", "benchmarks.grpo_loss", "--child-memory", variant, *cfg.to_argv()]
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
            log(f"[grpo_loss] {variant}: skipped ({reason})")
            continue
        step = build_step(variant, x, cfg)
        timing, loss = time_step(step, cfg.rounds, cfg.warmup)
        peak, method = measure_memory(variant, cfg) if memory else (None, "not measured")
        report.add(Result(variant, timing, peak, method, loss, note=step.note))
        log(f"[grpo_loss] {variant}: {timing.median * 1e3:.1f} ms, peak growth {H.fmt_bytes(peak)}")
    return report


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
        if r.skipped:
            rows.append([label, "skipped: " + r.skipped, "-", "-", "-"])
            continue
        t = r.timing
        tcol = f"{t.median * 1e3:.1f} [{t.p20 * 1e3:.1f}, {t.p80 * 1e3:.1f}]" if t else "-"
        diff = "-"
        if base is not None and base.loss is not None and r.loss is not None:
            diff = f"{H.rel_diff(r.loss, base.loss):.1e}"
        rows.append([label, tcol, H.fmt_bytes(r.peak_bytes), f"{r.loss:.6f}" if r.loss is not None else "-", diff])
    out = [
        f"CPU fused GRPO loss, forward+backward: {report.config.describe()}",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, liger-kernel {C.liger_version() or 'missing'}",
        "",
        H.markdown_table(
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
        ratio_rows.append([other_label, H.fmt_ratio(t, 3), H.fmt_ratio(m, 3), target])
    out.append(H.markdown_table(["ratio", "time", "peak memory", "target"], ratio_rows))
    methods = {r.memory_method for r in res.values() if r.memory_method and not r.skipped}
    if methods:
        out.append("")
        out.append("memory: one call per fresh subprocess after one warm-up; " + "; ".join(sorted(methods)))
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = H.cpu_parser(
        "python -m benchmarks.grpo_loss",
        __doc__,
        CPUConfig,
        VARIANTS,
        variants_help=f"comma-separated subset of {VARIANTS + EXTRA_VARIANTS} (default: %(default)s)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--child-memory", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = CPUConfig.from_args(args)
    if args.child_memory:
        _child_memory(args.child_memory, cfg)
        return 0
    variants = H.parse_variants(args.variants, VARIANTS + EXTRA_VARIANTS)
    report = run(cfg, variants, memory=not args.no_memory, log=lambda s: print(s, file=sys.stderr, flush=True))
    table = report.table()
    if args.json:
        payload = {"config": asdict(cfg), "results": {k: asdict(v) for k, v in report.results.items()}}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=H.json_default)
    print(table, flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# GPU suite, section b: the GRPO and log-probs correctness cases
# ---------------------------------------------------------------------------------------


def check_cases(suite: H.Suite, x: C.GRPOInputs, gen: torch.Generator) -> list[H.CheckCase]:
    """GRPO token level (dapo), sequence level (grpo), log-probs (+entropy; the gradient of
    sum g * logp with random g drawn from ``gen``)."""
    impl, beta = suite.args.impl, suite.args.beta
    grpo_args = (x.token_ids, x.advantages, x.seq_ids, x.old_logprobs, x.ref_logprobs)
    g = torch.randn(suite.args.check_n, device=suite.device, generator=gen)

    def grpo(level, loss_type, schedule="serial"):
        kw = dict(beta=beta, loss_type=loss_type, importance_sampling_level=level)

        def pack(out):
            loss, metrics = out
            return {"loss": loss, "kl": metrics["kl"], "entropy": metrics["entropy"]}, loss

        return H.CheckCase(
            f"grpo {level} ({loss_type})" + (f", {schedule}" if schedule != "serial" else ""),
            lambda h, w: pack(reference.grpo_loss_reference(h, w, *grpo_args, **kw)),
            lambda h, w: pack(eager_grpo_loss(h, w, *grpo_args, **kw)),
            lambda h, w: pack(fused_linear_grpo_loss(h, w, *grpo_args, **kw, impl=impl, schedule=schedule)),
        )

    def logprobs():
        def pack(out):
            logp, entropy = out if isinstance(out, tuple) else (out, None)
            outputs = {"logp": logp} if entropy is None else {"logp": logp, "entropy": entropy}
            return outputs, (g.to(logp.dtype) * logp).sum()

        return H.CheckCase(
            "logprobs (+entropy)",
            lambda h, w: pack(reference.linear_logprobs_reference(h, w, x.token_ids)),
            lambda h, w: pack(materialized_logprobs(h, w, x.token_ids)),
            lambda h, w: pack(fused_linear_logprobs(h, w, x.token_ids, return_entropy=True, impl=impl)),
        )

    return [grpo("token", "dapo"), grpo("token", "dapo", "overlap"), grpo("sequence", "grpo"), logprobs()]


# ---------------------------------------------------------------------------------------
# GPU suite, section c: fused GRPO forward+backward
# ---------------------------------------------------------------------------------------

GPU_VARIANTS = ("ours", "ours_overlap", "ours_torch", "eager", "compile", "liger_chunked", "liger_triton")
GPU_LABELS = {
    "ours": "ours",
    "ours_overlap": 'ours schedule="overlap"',
    "ours_torch": 'ours impl="torch" (chunked)',
    "eager": "PyTorch eager (materialized)",
    "compile": "torch.compile(eager)",
    "liger_chunked": "Liger chunked",
    "liger_triton": "Liger Triton op + logits GEMM",
}
TARGETS = {
    "roofline": 0.80,  # ours / three-GEMM roofline
    "vs_liger_chunked": 1.5,  # speedup over Liger chunked
    "vs_eager": 1.0,  # not slower than eager
}
GPU_SMOKE = dict(shapes="256x32x1000,128x48x1003", seq_len=32, min_reps=2, max_reps=3, warmup=1, target_s=0.05)


def add_gpu_args(p) -> None:
    g = p.add_argument_group("c. bench")
    g.add_argument("--shapes", default="16384x896x151936,8192x3584x152064", help="NxHxV,...")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per completion: S = N / seq_len")
    g.add_argument("--bench-dtype", default="bf16", choices=tuple(H.DTYPES))
    g.add_argument("--variants", default=",".join(GPU_VARIANTS))
    g.add_argument("--beta", type=float, default=0.04)
    g.add_argument("--loss-type", default="dapo")
    g.add_argument("--liger-chunk-size", type=int, default=1, help="Liger's default is 1 (one sequence per chunk)")
    g.add_argument("--liger-compiled", default="auto", choices=("auto", "0", "1"), help="auto: Liger default on CUDA")
    g.add_argument(
        "--compile-all-shapes", action="store_true", help="torch.compile(eager) at every shape (default: the first)"
    )
    H.add_timing_args(g)


def finish_gpu_args(p, args) -> None:
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in GPU_VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {GPU_VARIANTS}")
    shapes = []
    for part in args.shapes.split(","):
        if part.strip():
            n, h, v = (int(x) for x in part.lower().split("x"))
            shapes.append((n, h, v))
    args.shapes = shapes


LIGER_NOT_CARRIED = "skipped: not carried"  # no liger-kernel: carry its wheel in .whl/ (benchmarks/README.md)
COMPILE_FIRST_SHAPE = "skipped: cold compile on the first shape only (--compile-all-shapes)"


def _variant_unavailable(suite: H.Suite, variant: str, shape_index: int = 0) -> str:
    if variant in ("liger_chunked", "liger_triton") and C.liger_version() is None:
        return LIGER_NOT_CARRIED
    if variant == "compile" and shape_index > 0 and not suite.args.compile_all_shapes:
        return COMPILE_FIRST_SHAPE
    if variant == "liger_triton" and suite.device.type != "cuda" and not C.env_flag("TRITON_INTERPRET"):
        return "skipped: needs CUDA (Triton)"
    if variant == "ours_torch" and suite.args.impl == "torch":
        return "skipped: same as ours here"
    return ""


def _bench_row(suite: H.Suite, row: dict, step: C.Step) -> None:
    """First call (compiles / autotunes), peak extra memory, then the timed calls."""
    dev = suite.device
    row["note"] = step.note
    t_first = time.perf_counter()
    loss, _grads = step.fwd_bwd()
    H.sync(dev)
    row["first_call_s"] = time.perf_counter() - t_first
    row["loss"] = float(loss)
    del _grads
    row["peak_bytes"] = _memory.peak_extra(step.fwd_bwd, dev)["peak_bytes"]
    row.update(suite.timer(step.fwd_bwd))
    row["status"] = "ok"


def gpu_section(suite: H.Suite) -> None:
    a, dev = suite.args, suite.device
    dtype = H.DTYPES[a.bench_dtype]
    cfg = GRPOSettings(beta=a.beta, loss_type=a.loss_type)
    liger_compiled = dev.type == "cuda" if a.liger_compiled == "auto" else a.liger_compiled == "1"
    flops_peak = H.peak_flops(suite)
    for shape_index, (n, h, v) in enumerate(a.shapes):
        shape = f"N={n} H={h} V={v}"
        if n % a.seq_len:
            suite.bench.append(dict(shape=shape, variant="-", status=f"N not a multiple of --seq-len {a.seq_len}"))
            suite.row_done("bench")
            continue
        s = n // a.seq_len
        try:
            x = C.make_grpo_inputs(n, h, v, s, dtype=dtype, device=dev, seed=a.seed)
        except Exception as exc:  # noqa: BLE001
            suite.bench.append(dict(shape=shape, variant="inputs", status=H.describe_failure(exc)))
            H.cleanup(dev)
            suite.row_done("bench")
            continue
        roofline_s = 6 * n * h * v / flops_peak if flops_peak else None
        rows = []  # this shape's rows, also in suite.bench as soon as each one is finished
        for variant in a.variants:
            row = dict(shape=shape, n=n, h=h, v=v, s=s, variant=variant, label=GPU_LABELS[variant])
            if variant == "ours":
                row["label"] = f'ours impl="{a.impl}"'
            reason = _variant_unavailable(suite, variant, shape_index)
            if reason or suite.over_budget():
                row["status"] = reason or H.SKIPPED
                rows.append(row)
                suite.bench.append(row)
                suite.row_done("bench")
                continue
            try:
                step = grpo_step(variant, x, cfg, impl=a.impl, liger_compiled=liger_compiled,
                                 liger_chunk_size=a.liger_chunk_size, compile_kwargs={"dynamic": False})  # fmt: skip
                _bench_row(suite, row, step)
                if roofline_s:
                    row["roofline_frac"] = roofline_s / row["median"]
                    row["tflops"] = 6 * n * h * v / row["median"] / 1e12
            except Exception as exc:  # noqa: BLE001
                H.record_failure(row, exc)
            step = None
            H.cleanup(dev)
            rows.append(row)
            suite.bench.append(row)
            _relate(rows)
            suite.log(
                f"bench {shape} {variant}: {row['status']}"
                + (f" {row['median'] * 1e3:.2f} ms, peak +{H.fmt_bytes(row['peak_bytes'])}" if "median" in row else "")
            )
            suite.row_done("bench")
        del x
        H.cleanup(dev)


def _relate(rows: list[dict]) -> None:
    """Speedup and memory ratio against ours, loss against eager, over one shape's rows so far."""
    ours = H.add_speedups(rows)
    base_loss = next((r["loss"] for r in rows if r["variant"] == "eager" and "loss" in r), None)
    for r in rows:
        if ours is not None and "median" in r and r.get("peak_bytes"):
            r["mem_ratio_ours"] = ours["peak_bytes"] / r["peak_bytes"]
        if base_loss is not None and "loss" in r:
            r["loss_rel_diff"] = H.rel_diff(r["loss"], base_loss)


def gpu_render(suite: H.Suite) -> list[str]:
    a = suite.args
    flops_peak = H.peak_flops(suite)
    peak_txt = f"{flops_peak / 1e12:.0f} TFLOP/s" if flops_peak else "n/a"
    md = [
        "",
        f"## c. Fused GRPO forward+backward ({a.bench_dtype}, {a.loss_type}, beta={a.beta}, "
        f"{a.seq_len} tokens per completion)",
        "",
        f"Roofline = 6*N*H*V FLOPs at the measured matmul peak ({peak_txt}). 'speedup' = this row's time / "
        "ours; 'mem ours/this' = ours' peak extra memory / this row's. Peak extra = max allocated during "
        "one call minus allocated before it (inputs).",
        "",
    ]

    def cells(r):
        return [
            r["label"],
            H.fmt_ms_range(r),
            H.fmt_bytes(r.get("peak_bytes")),
            H.fmt_ratio(r.get("speedup_of_ours")),
            H.fmt_ratio(r.get("mem_ratio_ours")),
            f"{100 * r['roofline_frac']:.0f}%" if "roofline_frac" in r else "-",
            f"{r['tflops']:.0f}" if "tflops" in r else "-",
            H.fmt_err(r.get("loss_rel_diff")),
            f"{r.get('first_call_s', 0):.1f}",
        ]

    headers = ["shape", "variant", "ms median [p20, p80]", "peak extra", "speedup", "mem ours/this", "roofline",
               "TFLOP/s", "loss vs eager", "1st call s"]  # fmt: skip
    md.append(H.rows_table(headers, suite.bench, cells, lead=lambda r: [r["shape"]]))
    return md


def gpu_targets(suite: H.Suite) -> list[list[str]]:
    rows = []
    for shape in dict.fromkeys(r["shape"] for r in suite.bench):
        by = {r["variant"]: r for r in suite.bench if r["shape"] == shape}
        ours = by.get("ours", {})
        if "median" not in ours:
            rows.append([f"{shape}: ours", ours.get("status", "not run"), "n/a"])
            continue
        frac = ours.get("roofline_frac")
        rows.append(
            [
                f"{shape}: >= {TARGETS['roofline']:.0%} of three-GEMM roofline",
                f"{frac:.0%}" if frac else "n/a",
                "n/a" if frac is None else ("met" if frac >= TARGETS["roofline"] else "MISSED"),
            ]
        )
        for key, label, need in (
            ("liger_chunked", ">= 1.5x faster than Liger chunked", TARGETS["vs_liger_chunked"]),
            ("eager", "not slower than eager", TARGETS["vs_eager"]),
        ):
            other = by.get(key, {})
            sp = other.get("speedup_of_ours")
            if sp is None:
                rows.append([f"{shape}: {label}", other.get("status", "not run"), "n/a"])
            else:
                rows.append([f"{shape}: {label}", f"{sp:.2f}x", "met" if sp >= need else "MISSED"])
        lc = by.get("liger_chunked", {})
        if ours.get("peak_bytes") is not None and lc.get("peak_bytes") is not None:
            ok = ours["peak_bytes"] <= lc["peak_bytes"]
            rows.append(
                [
                    f"{shape}: peak extra memory <= Liger chunked",
                    f"{H.fmt_bytes(ours['peak_bytes'])} vs {H.fmt_bytes(lc['peak_bytes'])}",
                    "met" if ok else "MISSED",
                ]
            )
        else:
            rows.append([f"{shape}: peak extra memory <= Liger chunked", lc.get("status", "not run"), "n/a"])
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
