"""GPU suite: one command on a lent H100/H200, a markdown report printed last.

    bash benchmarks/run_gpu_suite.sh            # installs a carried liger wheel from .whl/, then runs this
    python -m benchmarks.gpu_suite [flags]      # the same without the wheel step
    python -m benchmarks.gpu_suite --smoke      # everything at tiny sizes on CPU (impl="torch", Triton rows skipped)

Sections (``--sections``, in this order):

a. peak      bf16 matmul TFLOP/s (8192^3 torch.matmul) and device copy bandwidth, measured in this run.
b. check     the kernels (impl="triton") against a float64 run of kernels.reference at real sizes
             (N of a few thousand, V=151936), in bf16 and fp32: relative errors of ours and of plain
             PyTorch in the same dtype; PASS when ours <= plain + slack (fp32 1e-5, bf16 1e-2).
c. bench     fused GRPO forward+backward, bf16: time (median, p20, p80; CUDA events) and peak extra
             memory of ours, ours with impl="torch", PyTorch eager, torch.compile(eager), Liger chunked,
             Liger's Triton grpo_loss (+ logits GEMM); speedups; fraction of the three-GEMM roofline.
d. score     restricted_vocab_score_loss forward+backward (B pairs) vs one Qwen2.5-0.5B backbone
             forward+backward step (random init, bf16, sdpa).
e. stage2    a whole stage-2 training step (forward + backward + AdamW) at the Qwen2.5-0.5B
             configuration (random init, bf16 parameters) on ~300-token random prompts in groups of 8,
             a ~16k-token micro-batch: ours (packed, prorank_varlen attention, restricted_vocab_score_loss)
             vs padded transformers (sdpa, full-vocabulary logits); tokens/s and MFU.
f. rerank    reranking throughput at the Qwen2.5-0.5B configuration (benchmarks/gpu_rerank.py): 100 documents of
             ~300 tokens per query, ours (Reranker, packed varlen) vs padded transformers forwards; s/query.
g. stage1    the stage-1 GRPO step (sampling + policy forward/backward + AdamW) at the Qwen2.5-0.5B configuration
             (benchmarks/gpu_stage1.py): 8 prompts x 256 tokens, G=8, 4 tokens; ours (shared prefix) vs G full
             sequences (generate + full-vocabulary logits); step ms and tokens/s.
h. report    markdown with card, versions, date and all rows, written to
             benchmarks/results/gpu_suite_<card>_<date>.md (and $OUT when set) and printed last.

Nothing is asserted about speed; the process exits 0 unless the suite itself crashes
(``--strict`` also makes a failed correctness check exit 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _common as C
from . import _memory, gpu_rerank, gpu_stage1

SECTIONS = ("peak", "check", "bench", "score", "stage2", "rerank", "stage1")
VARIANTS = ("ours", "ours_torch", "eager", "compile", "liger_chunked", "liger_triton")
VARIANT_LABELS = {
    "ours": "ours",
    "ours_torch": 'ours impl="torch" (chunked)',
    "eager": "PyTorch eager (materialized)",
    "compile": "torch.compile(eager)",
    "liger_chunked": "Liger chunked",
    "liger_triton": "Liger Triton op + logits GEMM",
}
SLACK = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TARGETS = {
    "roofline": 0.80,  # ours / three-GEMM roofline
    "vs_liger_chunked": 1.5,  # speedup over Liger chunked
    "vs_eager": 1.0,  # not slower than eager
    "score_ratio": 0.01,  # score head+loss / backbone step
    "stage2_mfu": 0.35,  # ours' stage-2 step, model FLOPs / measured matmul peak
}
STAGE2_VARIANTS = ("ours", "padded")
STAGE2_LABELS = {
    "ours": "ours: packed, prorank_varlen, restricted_vocab_score_loss",
    "padded": "transformers: padded, sdpa, full [B,T,V] logits",
}
QWEN2_0P5B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------


def _shapes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        if part.strip():
            n, h, v = (int(x) for x in part.lower().split("x"))
            out.append((n, h, v))
    return out


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
    g = p.add_argument_group("a. peak")
    g.add_argument("--matmul-size", type=int, default=8192)
    g.add_argument("--copy-mib", type=int, default=2048, help="bytes copied per call (read + write counted)")
    g.add_argument("--peak-tflops", type=float, default=None, help="roofline peak when section a is skipped")
    g = p.add_argument_group("b. check")
    g.add_argument("--check-n", type=int, default=4096)
    g.add_argument("--check-h", type=int, default=896)
    g.add_argument("--check-v", type=int, default=151936)
    g.add_argument("--check-s", type=int, default=16, help="completions (random lengths) in the GRPO checks")
    g.add_argument("--check-score-b", type=int, default=256)
    g.add_argument("--check-dtypes", default="bf16,fp32")
    g.add_argument("--gold-dtype", default="fp64", choices=("fp64", "fp32"), help="dtype of the reference run")
    g = p.add_argument_group("c. bench")
    g.add_argument("--shapes", default="16384x896x151936,8192x3584x152064", help="NxHxV,...")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per completion: S = N / seq_len")
    g.add_argument("--bench-dtype", default="bf16", choices=tuple(DTYPES))
    g.add_argument("--variants", default=",".join(VARIANTS))
    g.add_argument("--beta", type=float, default=0.04)
    g.add_argument("--loss-type", default="dapo")
    g.add_argument("--liger-chunk-size", type=int, default=1, help="Liger's default is 1 (one sequence per chunk)")
    g.add_argument("--liger-compiled", default="auto", choices=("auto", "0", "1"), help="auto: Liger default on CUDA")
    g.add_argument("--warmup", type=int, default=2)
    g.add_argument("--min-reps", type=int, default=5)
    g.add_argument("--max-reps", type=int, default=50)
    g.add_argument("--target-s", type=float, default=1.0, help="timed seconds per row (within min/max reps)")
    g = p.add_argument_group("d. score")
    g.add_argument("--score-b", type=int, default=256, help="pairs per step (rows of the score head)")
    g.add_argument("--score-h", type=int, default=896)
    g.add_argument("--score-v", type=int, default=151936)
    g.add_argument("--backbone-layers", type=int, default=24)
    g.add_argument("--backbone-batch", type=int, default=256, help="sequences per step")
    g.add_argument("--backbone-seq", type=int, default=256, help="tokens per sequence")
    g.add_argument("--backbone-micro", type=int, default=64, help="sequences per micro-batch (halved on OOM)")
    g = p.add_argument_group("e. stage2")
    g.add_argument("--s2-layers", type=int, default=24)
    g.add_argument("--s2-seq-len", type=int, default=300, help="mean prompt length (tokens)")
    g.add_argument("--s2-seq-jitter", type=int, default=60, help="lengths uniform in seq-len +- jitter")
    g.add_argument("--s2-group-size", type=int, default=8)
    g.add_argument("--s2-max-tokens", type=int, default=16384, help="micro-batch budget: whole groups up to it")
    g.add_argument("--s2-variants", default=",".join(STAGE2_VARIANTS))
    g.add_argument("--s2-lr", type=float, default=1e-5)
    gpu_rerank.add_args(p)
    args = p.parse_args(argv)
    if args.smoke:
        smoke = dict(
            device=args.device or "cpu",
            matmul_size=256,
            copy_mib=16,
            check_n=96,
            check_h=32,
            check_v=1000,
            check_s=6,
            check_score_b=16,
            shapes="256x32x1000,128x48x1003",
            seq_len=32,
            min_reps=2,
            max_reps=3,
            warmup=1,
            target_s=0.05,
            score_b=16,
            score_h=32,
            score_v=1000,
            backbone_layers=2,
            backbone_batch=8,
            backbone_seq=32,
            backbone_micro=4,
            s2_layers=2,
            s2_seq_len=32,
            s2_seq_jitter=8,
            s2_max_tokens=640,
        )
        smoke.update(gpu_rerank.SMOKE)
        for k, v in smoke.items():
            if k == "device" or getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.device = torch.device(args.device or "cuda")
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    for s in args.sections:
        if s not in SECTIONS:
            p.error(f"unknown section {s!r}; choose from {SECTIONS}")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; choose from {VARIANTS}")
    args.s2_variants = [v.strip() for v in args.s2_variants.split(",") if v.strip()]
    for v in args.s2_variants:
        if v not in STAGE2_VARIANTS:
            p.error(f"unknown stage-2 variant {v!r}; choose from {STAGE2_VARIANTS}")
    if not 0 <= args.s2_seq_jitter < args.s2_seq_len:
        p.error("--s2-seq-jitter must be in [0, --s2-seq-len)")
    args.shapes = _shapes(args.shapes)
    args.check_dtypes = [DTYPES[d.strip()] for d in args.check_dtypes.split(",") if d.strip()]
    if args.impl is None:
        args.impl = "triton" if args.device.type == "cuda" else "torch"
    return args


# ---------------------------------------------------------------------------------------
# Timing, memory, failures
# ---------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, *, warmup: int, min_reps: int, max_reps: int, target_s: float) -> dict:
    """Median, p20, p80 seconds of ``fn()``: CUDA events around each call on CUDA, perf_counter on CPU.
    The number of timed calls aims at ``target_s`` seconds, within [min_reps, max_reps]."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
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
    if len(samples) > 1:
        qs = statistics.quantiles(samples, n=10, method="inclusive")
        p20, p80 = qs[1], qs[7]
    else:
        p20 = p80 = samples[0]
    return {"median": statistics.median(samples), "p20": p20, "p80": p80, "reps": len(samples)}


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _cleanup(device: torch.device) -> None:
    """Free what a finished row held (CUDA: also return cached blocks, so the next row's peak
    starts from a clean pool). A no-op on CPU, where gc.collect() would only cost time."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _describe_failure(exc: BaseException) -> str:
    if _is_oom(exc):
        return "OOM"
    if isinstance(exc, NotImplementedError):
        return "not implemented"
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return "ERROR " + (msg[:160] + "..." if len(msg) > 160 else msg)


# ---------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------


@dataclass
class Suite:
    args: argparse.Namespace
    t0: float = field(default_factory=time.perf_counter)
    info: dict = field(default_factory=dict)
    peak: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    bench: list = field(default_factory=list)
    score: dict = field(default_factory=dict)
    stage2: dict = field(default_factory=dict)
    rerank: dict = field(default_factory=dict)
    stage1: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

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


# --- a. peaks ----------------------------------------------------------------------------


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
        suite.peak["matmul"] = {"size": a.matmul_size, "error": _describe_failure(exc)}
    _cleanup(suite.device)
    try:
        suite.peak["copy"] = _copy_bandwidth(suite)
        suite.log(f"copy {a.copy_mib} MiB: {suite.peak['copy']['gbps']:.0f} GB/s (read + write)")
    except Exception as exc:  # noqa: BLE001
        suite.peak["copy"] = {"bytes": a.copy_mib * 2**20, "error": _describe_failure(exc)}
    _cleanup(suite.device)


def peak_flops(suite: Suite) -> float | None:
    if "tflops" in suite.peak.get("matmul", {}):
        return suite.peak["matmul"]["tflops"] * 1e12
    return suite.args.peak_tflops * 1e12 if suite.args.peak_tflops else None


# --- b. correctness ------------------------------------------------------------------------


def _run_case(fn, hidden: torch.Tensor, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """fn(h, w) -> (named forward outputs, scalar to differentiate). Returns outputs + both grads."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    outputs, objective = fn(h, w)
    gh, gw = torch.autograd.grad(objective, [h, w])
    result = {k: v.detach() for k, v in outputs.items()}
    result["grad_hidden"] = gh
    result["grad_weight"] = gw
    return result


def _check_cases(suite: Suite, ops: C.Ops, x: C.GRPOInputs, g: torch.Tensor, labels: dict):
    """(name, gold_fn, plain_fn, ours_fn); each fn(h, w) -> (outputs, objective)."""
    ref = C.load_kernels().reference
    impl = suite.args.impl
    beta = suite.args.beta
    grpo_args = (x.token_ids, x.advantages, x.seq_ids, x.old_logprobs, x.ref_logprobs)
    b = suite.args.check_score_b

    def grpo(level, loss_type):
        kw = dict(beta=beta, loss_type=loss_type, importance_sampling_level=level)

        def pack(out):
            loss, metrics = out
            return {"loss": loss, "kl": metrics["kl"], "entropy": metrics["entropy"]}, loss

        return (
            f"grpo {level} ({loss_type})",
            lambda h, w: pack(ref.grpo_loss_reference(h, w, *grpo_args, **kw)),
            lambda h, w: pack(C.eager_grpo_loss(h, w, *grpo_args, **kw)),
            lambda h, w: pack(ops.grpo_loss(h, w, *grpo_args, **kw, impl=impl)),
        )

    def logprobs():
        def pack(out):
            logp, entropy = out if isinstance(out, tuple) else (out, None)
            outputs = {"logp": logp} if entropy is None else {"logp": logp, "entropy": entropy}
            return outputs, (g.to(logp.dtype) * logp).sum()

        return (
            "logprobs (+entropy)",
            lambda h, w: pack(ref.linear_logprobs_reference(h, w, x.token_ids)),
            lambda h, w: pack(C.materialized_logprobs(h, w, x.token_ids)),
            lambda h, w: pack(ops.logprobs(h, w, x.token_ids, return_entropy=True, impl=impl)),
        )

    def score(loss, group_size):
        lab = labels[loss]
        kw = dict(loss=loss, group_size=group_size)

        def gold(h, w):
            s = ref.restricted_vocab_score_reference(h[:b], w)
            value = ref.score_loss_reference(s, lab.to(s.dtype), **kw)
            return {"loss": value, "scores": s}, value

        def pack(out):
            value, s = out
            return {"loss": value, "scores": s}, value

        return (
            f"score {loss}" + (f" (group {group_size})" if group_size else ""),
            gold,
            lambda h, w: pack(C.eager_score_loss(h[:b], w, lab, **kw)),
            lambda h, w: pack(
                ops.score_loss(h[:b], w, lab, token_ids=(16, 15), token_weights=(1.0, -1.0), **kw, impl=impl)
            ),
        )

    return [grpo("token", "dapo"), grpo("sequence", "grpo"), logprobs(), score("bce", None), score("listwise", 8)]


def section_check(suite: Suite, ops: C.Ops) -> None:
    a, dev = suite.args, suite.device
    gold_dtype = torch.float64 if a.gold_dtype == "fp64" else torch.float32
    x = C.make_grpo_inputs(
        a.check_n, a.check_h, a.check_v, a.check_s, dtype=torch.float32, device=dev, seed=a.seed, equal_lengths=False
    )
    gen = torch.Generator(device=dev).manual_seed(a.seed + 1)
    g = torch.randn(a.check_n, device=dev, generator=gen)
    b = a.check_score_b
    if b % 8:
        raise ValueError("--check-score-b must be a multiple of 8 (listwise groups)")
    labels = {
        "bce": torch.rand(b, device=dev, generator=gen),
        "listwise": torch.randint(0, 3, (b,), device=dev).float(),
    }
    labels["listwise"].view(-1, 8)[:, 0] += 1.0  # every group has a positive
    cases = _check_cases(suite, ops, x, g, labels)
    for dtype in a.check_dtypes:
        hidden = x.hidden.detach().to(dtype)
        weight = x.weight.detach().to(dtype)
        slack = SLACK[dtype]
        dname = {v: k for k, v in DTYPES.items()}[dtype]
        for name, gold_fn, plain_fn, ours_fn in cases:
            if suite.over_budget():
                suite.checks.append(dict(case=name, dtype=dname, quantity="-", status="skipped (time budget)"))
                continue
            try:
                gold = _run_case(gold_fn, hidden.to(gold_dtype), weight.to(gold_dtype))
            except Exception as exc:  # noqa: BLE001
                suite.checks.append(dict(case=name, dtype=dname, quantity="gold", status=_describe_failure(exc)))
                _cleanup(dev)
                continue
            results = {}
            for who, fn in (("plain", plain_fn), ("ours", ours_fn)):
                try:
                    results[who] = _run_case(fn, hidden, weight)
                except Exception as exc:  # noqa: BLE001
                    results[who] = _describe_failure(exc)
                    if who == "ours" and not isinstance(exc, NotImplementedError | torch.OutOfMemoryError):
                        traceback.print_exc()
                _cleanup(dev)
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
                        errs[who] = C.rel_err(r[q], gold[q])
                row.update(ours=errs["ours"], plain=errs["plain"])
                if isinstance(errs["ours"], str):
                    row["status"] = "FAIL" if errs["ours"] != "not returned" else "n/a"
                else:
                    plain = errs["plain"] if isinstance(errs["plain"], float) else 0.0
                    row["bound"] = plain + slack
                    ok = math.isfinite(errs["ours"]) and errs["ours"] <= row["bound"]
                    row["status"] = "PASS" if ok else "FAIL"
                suite.checks.append(row)
            del gold, results
            _cleanup(dev)
            fails = [r for r in suite.checks if r["case"] == name and r["dtype"] == dname and r["status"] == "FAIL"]
            suite.log(f"check {name} {dname}: {'FAIL ' + str(len(fails)) if fails else 'PASS'}")
    del x
    _cleanup(dev)


# --- c. fused GRPO forward+backward --------------------------------------------------------


def _variant_unavailable(suite: Suite, variant: str) -> str:
    if variant in ("liger_chunked", "liger_triton") and C.liger_version() is None:
        return "skipped: liger-kernel missing"
    if variant == "liger_triton" and suite.device.type != "cuda" and not C.env_flag("TRITON_INTERPRET"):
        return "skipped: needs CUDA (Triton)"
    if variant == "ours_torch" and suite.args.impl == "torch":
        return "skipped: same as ours here"
    return ""


def section_bench(suite: Suite, ops: C.Ops) -> None:
    a, dev = suite.args, suite.device
    dtype = DTYPES[a.bench_dtype]
    cfg = C.GRPOSettings(beta=a.beta, loss_type=a.loss_type)
    liger_compiled = dev.type == "cuda" if a.liger_compiled == "auto" else a.liger_compiled == "1"
    flops_peak = peak_flops(suite)
    for n, h, v in a.shapes:
        shape = f"N={n} H={h} V={v}"
        if n % a.seq_len:
            suite.bench.append(dict(shape=shape, variant="-", status=f"N not a multiple of --seq-len {a.seq_len}"))
            continue
        s = n // a.seq_len
        try:
            x = C.make_grpo_inputs(n, h, v, s, dtype=dtype, device=dev, seed=a.seed)
        except Exception as exc:  # noqa: BLE001
            suite.bench.append(dict(shape=shape, variant="inputs", status=_describe_failure(exc)))
            _cleanup(dev)
            continue
        roofline_s = 6 * n * h * v / flops_peak if flops_peak else None
        rows = []
        for variant in a.variants:
            row = dict(shape=shape, n=n, h=h, v=v, s=s, variant=variant, label=VARIANT_LABELS[variant])
            if variant == "ours":
                row["label"] = ops.label("grpo_loss") + f' impl="{a.impl}"'
            reason = _variant_unavailable(suite, variant)
            if reason or suite.over_budget():
                row["status"] = reason or "skipped (time budget)"
                rows.append(row)
                continue
            try:
                step = C.grpo_step(
                    variant,
                    x,
                    cfg,
                    ops=ops,
                    impl=a.impl,
                    liger_compiled=liger_compiled,
                    liger_chunk_size=a.liger_chunk_size,
                    compile_kwargs={"dynamic": False},
                )
                row["note"] = step.note
                t_first = time.perf_counter()
                loss, _grads = step.fwd_bwd()  # compiles / autotunes
                _sync(dev)
                row["first_call_s"] = time.perf_counter() - t_first
                row["loss"] = float(loss)
                del _grads
                mem = _memory.peak_extra(step.fwd_bwd, dev)
                row["peak_bytes"] = mem["peak_bytes"]
                row.update({k: v for k, v in suite.timer(step.fwd_bwd).items()})
                row["status"] = "ok"
                if roofline_s:
                    row["roofline_frac"] = roofline_s / row["median"]
                    row["tflops"] = 6 * n * h * v / row["median"] / 1e12
            except Exception as exc:  # noqa: BLE001
                row["status"] = _describe_failure(exc)
                if not _is_oom(exc) and not isinstance(exc, NotImplementedError):
                    traceback.print_exc()
            step = None
            _cleanup(dev)
            rows.append(row)
            suite.log(
                f"bench {shape} {variant}: {row['status']}"
                + (f" {row['median'] * 1e3:.2f} ms, peak +{C.fmt_bytes(row['peak_bytes'])}" if "median" in row else "")
            )
        ours = next((r for r in rows if r["variant"] == "ours" and "median" in r), None)
        base_loss = next((r["loss"] for r in rows if r["variant"] == "eager" and "loss" in r), None)
        for r in rows:
            if ours is not None and "median" in r:
                r["speedup_of_ours"] = r["median"] / ours["median"]
                if r.get("peak_bytes"):
                    r["mem_ratio_ours"] = ours["peak_bytes"] / r["peak_bytes"]
            if base_loss is not None and "loss" in r:
                r["loss_rel_diff"] = abs(r["loss"] - base_loss) / max(abs(base_loss), 1e-30)
        suite.bench.extend(rows)
        del x
        _cleanup(dev)


# --- d. score head vs backbone step --------------------------------------------------------


def _backbone(suite: Suite):
    from transformers import Qwen2Config, Qwen2Model

    a = suite.args
    cfg_kw = dict(QWEN2_0P5B, num_hidden_layers=a.backbone_layers)
    if a.smoke:
        cfg_kw.update(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=1000
        )
    config = Qwen2Config(**cfg_kw)
    config._attn_implementation = "sdpa"
    with torch.device(suite.device):
        model = Qwen2Model(config)
    model.to(torch.bfloat16).train()
    return model, config


def _time_heads(suite: Suite, ops: C.Ops) -> None:
    a, dev, out = suite.args, suite.device, suite.score
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    hidden = torch.randn(a.score_b, a.score_h, device=dev, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(a.score_v, a.score_h, device=dev, generator=gen) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.rand(a.score_b, device=dev, generator=gen)
    heads = {
        "ours": lambda: ops.score_loss(hidden, weight, labels, token_ids=(16, 15), loss="bce", impl=a.impl)[0],
        "plain": lambda: C.eager_score_loss(hidden, weight, labels, loss="bce")[0],
    }
    for who, fn in heads.items():
        step = C.Step(who, fn, (hidden, weight))
        try:
            out[f"{who}_head"] = suite.timer(step.fwd_bwd)
            out[f"{who}_head"]["peak_bytes"] = _memory.peak_extra(step.fwd_bwd, dev)["peak_bytes"]
        except Exception as exc:  # noqa: BLE001
            out[f"{who}_head"] = {"status": _describe_failure(exc)}
        _cleanup(dev)


def _time_backbone(suite: Suite) -> None:
    a, dev, out = suite.args, suite.device, suite.score
    try:
        model, config = _backbone(suite)
    except Exception as exc:  # noqa: BLE001
        out["backbone"] = {"status": _describe_failure(exc)}
        traceback.print_exc()
        return
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    ids = torch.randint(0, config.vocab_size, (a.backbone_batch, a.backbone_seq), device=dev, generator=gen)
    micro = min(a.backbone_micro, a.backbone_batch)
    while True:

        def step(micro=micro):
            model.zero_grad(set_to_none=True)
            for chunk in ids.split(micro):
                last = model(input_ids=chunk).last_hidden_state[:, -1]
                last.float().pow(2).mean().backward()

        try:
            step()
            reps = dict(warmup=min(a.warmup, 1), min_reps=min(a.min_reps, 3), max_reps=10)
            out["backbone"] = suite.timer(step, target_s=min(a.target_s * 2, 2.0), **reps)
            out["backbone"].update(
                params=params,
                layers=config.num_hidden_layers,
                micro=micro,
                batch=a.backbone_batch,
                seq=a.backbone_seq,
                tokens=a.backbone_batch * a.backbone_seq,
            )
            return
        except Exception as exc:  # noqa: BLE001
            model.zero_grad(set_to_none=True)
            _cleanup(dev)
            if _is_oom(exc) and micro > 1:
                micro //= 2
                suite.log(f"backbone OOM; micro-batch -> {micro}")
                continue
            out["backbone"] = {"status": _describe_failure(exc)}
            traceback.print_exc()
            return


def section_score(suite: Suite, ops: C.Ops) -> None:
    a, out = suite.args, suite.score
    out.update(b=a.score_b, h=a.score_h, v=a.score_v)
    _time_heads(suite, ops)
    _cleanup(suite.device)
    if suite.over_budget():
        out["backbone"] = {"status": "skipped (time budget)"}
    else:
        _time_backbone(suite)
        _cleanup(suite.device)
    bb = out.get("backbone", {}).get("median")
    for who in ("ours", "plain"):
        head = out.get(f"{who}_head", {}).get("median")
        if bb and head:
            out[f"{who}_ratio"] = head / bb
    suite.log(
        f"score head {C.fmt_ms(out.get('ours_head', {}).get('median'))} ms vs backbone step "
        f"{C.fmt_ms(bb)} ms: ratio {C.fmt_ratio(out.get('ours_ratio'), 5)}"
    )


# --- e. stage-2 training step at the Qwen2.5-0.5B configuration -----------------------------


def _stage2_model(suite: Suite):
    """A randomly initialized Qwen2ForCausalLM of the Qwen2.5-0.5B shape (tied head), bf16 parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    a = suite.args
    cfg_kw = dict(QWEN2_0P5B, num_hidden_layers=a.s2_layers)
    if a.smoke:
        cfg_kw.update(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=1000
        )
    config = Qwen2Config(**cfg_kw)
    config.use_cache = False
    torch.manual_seed(a.seed)
    with torch.device(suite.device):
        lm = Qwen2ForCausalLM(config)
    lm.to(torch.bfloat16).train()
    return lm, config


def _stage2_batch(suite: Suite, vocab: int, s2):
    """Whole groups of random prompts (lengths uniform in seq_len +- jitter, random ids, the first
    prompt of each group the positive) until the next group would pass --s2-max-tokens."""
    from types import SimpleNamespace

    a = suite.args
    g = a.s2_group_size
    gen = torch.Generator().manual_seed(a.seed)
    lo, hi = a.s2_seq_len - a.s2_seq_jitter, a.s2_seq_len + a.s2_seq_jitter
    groups, tokens = [], 0
    while True:
        lengths = torch.randint(lo, hi + 1, (g,), generator=gen).tolist()
        if groups and tokens + sum(lengths) > a.s2_max_tokens:
            break
        ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
        groups.append(SimpleNamespace(input_ids=ids, labels=[1.0] + [0.0] * (g - 1), teacher_scores=None))
        tokens += sum(lengths)
    return s2.make_batch(groups, device=suite.device)


def _stage2_row(suite: Suite, s2, variant: str, lm, batch, pad_id: int) -> dict:
    """Time one variant's training step; the padded row halves its groups per forward on OOM."""
    a, dev = suite.args, suite.device
    row = dict(variant=variant, label=STAGE2_LABELS[variant])
    groups_per_forward = None
    while True:
        step = None
        try:
            step = s2.Stage2Step(
                variant,
                lm,
                (16, 15),
                pad_id,
                lr=a.s2_lr,
                groups_per_forward=groups_per_forward,
                fused_adam=dev.type == "cuda",
            )
            step.prepare(batch)
            row["note"] = step.note
            row["forwards"] = len(step._chunks(batch))
            row["tokens_through"] = (
                batch.num_tokens if variant == "ours" else sum(c[0].numel() for c in step._chunks(batch))
            )
            row["loss0"] = step.loss(batch)  # the initial weights: the same for every row
            t_first = time.perf_counter()
            step.train_step(batch)
            _sync(dev)
            row["first_call_s"] = time.perf_counter() - t_first

            def fn(step=step):
                return step.train_step(batch)

            row["peak_bytes"] = _memory.peak_extra(fn, dev)["peak_bytes"]
            row.update(suite.timer(fn))
            row["status"] = "ok"
            return row
        except Exception as exc:  # noqa: BLE001 - reported in the table
            step = None
            _cleanup(dev)
            current = groups_per_forward or batch.num_groups
            if _is_oom(exc) and variant == "padded" and current > 1:
                groups_per_forward = max(1, current // 2)
                suite.log(f"stage2 padded OOM; {groups_per_forward} group(s) per forward")
                continue
            row["status"] = _describe_failure(exc)
            if not _is_oom(exc):
                traceback.print_exc()
            return row


def section_stage2(suite: Suite) -> None:
    a, dev, out = suite.args, suite.device, suite.stage2
    rows = out.setdefault("rows", [])
    if suite.over_budget():
        rows += [dict(variant=v, label=STAGE2_LABELS[v], status="skipped (time budget)") for v in a.s2_variants]
        return
    from . import stage2 as s2  # the trainer's pieces (prorank_fast.score_stage, packing)

    lm, config = _stage2_model(suite)
    batch = _stage2_batch(suite, config.vocab_size, s2)
    lengths = batch.lengths
    p_ne = C.non_embedding_params(lm)
    flops = C.stage2_model_flops(p_ne, config.num_hidden_layers, config.hidden_size, lengths)
    out.update(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        params=sum(p.numel() for p in lm.parameters()),
        params_non_embedding=p_ne,
        pairs=batch.num_pairs,
        groups=batch.num_groups,
        group_size=batch.group_size,
        tokens=batch.num_tokens,
        min_len=min(lengths),
        max_len=max(lengths),
        model_flops=flops,
    )
    flops_peak = peak_flops(suite)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    for variant in a.s2_variants:
        if suite.over_budget():
            rows.append(dict(variant=variant, label=STAGE2_LABELS[variant], status="skipped (time budget)"))
            continue
        row = _stage2_row(suite, s2, variant, lm, batch, pad_id)
        if "median" in row:
            row["tokens_per_s"] = batch.num_tokens / row["median"]
            row["pairs_per_s"] = batch.num_pairs / row["median"]
            row["tflops"] = flops / row["median"] / 1e12
            if flops_peak:
                row["mfu"] = flops / row["median"] / flops_peak
        rows.append(row)
        _cleanup(dev)
        suite.log(
            f"stage2 {variant}: {row['status']}"
            + (f" {row['median'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tok/s" if "median" in row else "")
            + (f", MFU {100 * row['mfu']:.1f}%" if "mfu" in row else "")
        )
    ours = next((r for r in rows if r["variant"] == "ours" and "median" in r), None)
    for r in rows:
        if ours is not None and "median" in r:
            r["speedup_of_ours"] = r["median"] / ours["median"]
        if ours is not None and r.get("loss0") is not None:
            r["loss_rel_diff"] = abs(r["loss0"] - ours["loss0"]) / max(abs(ours["loss0"]), 1e-30)
    del lm, batch
    _cleanup(dev)


# --- f. report ------------------------------------------------------------------------------


def _e(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.1e}" if math.isfinite(x) else "nan"


def render(suite: Suite) -> str:
    a, info = suite.args, suite.info
    md = [f"# prorank-fast GPU suite: {info['card']}, {info['date']}", ""]
    md.append(
        C.markdown_table(
            ["item", "value"],
            [[k, v] for k, v in info.items() if k not in ("date", "stamp") and not k.startswith("_")]
            + [["wall time", f"{suite.elapsed():.0f} s"]],
        )
    )
    flops_peak = peak_flops(suite)
    if "peak" in a.sections:
        md += ["", "## a. Measured peaks", ""]
        rows = []
        mm, cp = suite.peak.get("matmul", {}), suite.peak.get("copy", {})
        rows.append(
            [
                f"bf16 matmul {mm.get('size')}^3",
                f"{mm['tflops']:.1f} TFLOP/s" if "tflops" in mm else mm.get("error", "-"),
                f"{C.fmt_ms(mm.get('median'))} ms median of {mm.get('reps', '-')}",
            ]
        )
        rows.append(
            [
                f"copy {C.fmt_bytes(cp.get('bytes'))}",
                f"{cp['gbps']:.0f} GB/s (read+write)" if "gbps" in cp else cp.get("error", "-"),
                f"{C.fmt_ms(cp.get('median'))} ms median of {cp.get('reps', '-')}",
            ]
        )
        md.append(C.markdown_table(["measure", "value", "timing"], rows))
    if "check" in a.sections:
        gold = "float64" if a.gold_dtype == "fp64" else "float32"
        md += [
            "",
            f"## b. Correctness vs kernels.reference in {gold} (N={a.check_n} in {a.check_s} completions, "
            f'H={a.check_h}, V={a.check_v}, score B={a.check_score_b}; ours impl="{a.impl}")',
            "",
            "Relative error ||x - gold|| / ||gold||; PASS when ours <= plain + slack (fp32 1e-5, bf16 1e-2).",
            "",
        ]
        rows = [
            [
                r["case"],
                r["dtype"],
                r["quantity"],
                _e(r.get("ours")),
                _e(r.get("plain")),
                _e(r.get("bound")),
                r["status"],
            ]
            for r in suite.checks
        ]
        md.append(C.markdown_table(["op", "dtype", "quantity", "ours", "plain", "bound", "result"], rows))
        n_fail = sum(r["status"] == "FAIL" for r in suite.checks)
        md += ["", f"{len(suite.checks) - n_fail} of {len(suite.checks)} checks without FAIL ({n_fail} FAIL)."]
    if "bench" in a.sections:
        peak_txt = f"{flops_peak / 1e12:.0f} TFLOP/s" if flops_peak else "n/a"
        md += [
            "",
            f"## c. Fused GRPO forward+backward ({a.bench_dtype}, {a.loss_type}, beta={a.beta}, "
            f"{a.seq_len} tokens per completion)",
            "",
            f"Roofline = 6*N*H*V FLOPs at the measured matmul peak ({peak_txt}). 'speedup' = this row's time / "
            "ours; 'mem ours/this' = ours' peak extra memory / this row's. Peak extra = max allocated during "
            "one call minus allocated before it (inputs).",
            "",
        ]
        rows = []
        for r in suite.bench:
            if "median" not in r:
                rows.append([r["shape"], r.get("label", r["variant"]), r.get("status", "-")] + ["-"] * 7)
                continue
            rows.append(
                [
                    r["shape"],
                    r["label"],
                    f"{C.fmt_ms(r['median'])} [{C.fmt_ms(r['p20'])}, {C.fmt_ms(r['p80'])}]",
                    C.fmt_bytes(r.get("peak_bytes")),
                    C.fmt_ratio(r.get("speedup_of_ours")),
                    C.fmt_ratio(r.get("mem_ratio_ours")),
                    f"{100 * r['roofline_frac']:.0f}%" if "roofline_frac" in r else "-",
                    f"{r['tflops']:.0f}" if "tflops" in r else "-",
                    _e(r.get("loss_rel_diff")),
                    f"{r.get('first_call_s', 0):.1f}",
                ]
            )
        md.append(
            C.markdown_table(
                [
                    "shape",
                    "variant",
                    "ms median [p20, p80]",
                    "peak extra",
                    "speedup",
                    "mem ours/this",
                    "roofline",
                    "TFLOP/s",
                    "loss vs eager",
                    "1st call s",
                ],
                rows,
            )
        )
    if "score" in a.sections:
        sc = suite.score
        md += [
            "",
            f"## d. Score head + loss vs Qwen2.5-0.5B-shaped backbone step (B={sc.get('b')}, H={sc.get('h')}, "
            f"V={sc.get('v')})",
            "",
        ]
        rows = []
        for who, label in (("ours", ops_label(suite, "score_loss")), ("plain", "plain PyTorch head")):
            hd = sc.get(f"{who}_head", {})
            rows.append(
                [
                    f"{label}: restricted_vocab_score_loss fwd+bwd" if who == "ours" else label + " fwd+bwd",
                    f"{C.fmt_ms(hd['median'])} [{C.fmt_ms(hd['p20'])}, {C.fmt_ms(hd['p80'])}]"
                    if "median" in hd
                    else hd.get("status", "-"),
                    C.fmt_bytes(hd.get("peak_bytes")),
                    f"{100 * sc[who + '_ratio']:.3f}%" if who + "_ratio" in sc else "-",
                ]
            )
        bb = sc.get("backbone", {})
        bb_label = (
            f"backbone fwd+bwd: {bb['layers']} layers, {bb['params'] / 1e6:.0f}M params, "
            f"{bb['batch']}x{bb['seq']} tokens (micro-batch {bb['micro']})"
            if "median" in bb
            else "backbone fwd+bwd"
        )
        rows.append(
            [
                bb_label,
                f"{C.fmt_ms(bb['median'])} [{C.fmt_ms(bb['p20'])}, {C.fmt_ms(bb['p80'])}]"
                if "median" in bb
                else bb.get("status", "-"),
                "-",
                "100%",
            ]
        )
        md.append(C.markdown_table(["row", "ms median [p20, p80]", "peak extra", "of backbone step"], rows))
    if "stage2" in a.sections:
        md += render_stage2(suite)
    if "rerank" in a.sections:
        md += gpu_rerank.render(suite)
    if "stage1" in a.sections:
        md += gpu_stage1.render(suite)
    md += ["", "## Targets", ""]
    md.append(C.markdown_table(["target", "measured", "result"], targets(suite)))
    if suite.notes:
        md += ["", "Notes:"] + [f"- {n}" for n in suite.notes]
    return "\n".join(md) + "\n"


def render_stage2(suite: Suite) -> list[str]:
    s2 = suite.stage2
    peak = peak_flops(suite)
    md = ["", "## e. Stage-2 step at the Qwen2.5-0.5B configuration", ""]
    if "params" in s2:
        md += [
            f"Random init, bf16 parameters, {s2['layers']} layers, hidden {s2['hidden']}, vocab {s2['vocab']} (tied), "
            f"{s2['params'] / 1e6:.1f}M parameters ({s2['params_non_embedding'] / 1e6:.1f}M non-embedding). One step = "
            f"{s2['pairs']} random prompts ({s2['groups']} listwise groups of {s2['group_size']}, lengths "
            f"{s2['min_len']}-{s2['max_len']}, {s2['tokens']} tokens, one ~{suite.args.s2_max_tokens}-token "
            "micro-batch): forward + backward + AdamW (fused on CUDA). Each row trains its own copy of the same "
            "initial weights.",
            "",
            "MFU = model FLOPs / step time / the bf16 matmul peak measured in section a"
            + (f" ({peak / 1e12:.0f} TFLOP/s)" if peak else " (not measured: MFU n/a)")
            + "; model FLOPs = 6 * P_non_embedding * N + 12 * layers * hidden * sum_i len_i^2 "
            f"= {s2['model_flops'] / 1e12:.2f} TFLOP, N = real tokens (padding and the LM head are not counted, "
            "so both rows do the same useful work). tokens/s counts real tokens.",
            "",
        ]
    rows = []
    for r in s2.get("rows", []):
        if "median" not in r:
            rows.append([r.get("label", r["variant"]), r.get("status", "-")] + ["-"] * 9)
            continue
        padding = r.get("tokens_through", 0) / max(s2.get("tokens", 1), 1) - 1.0
        rows.append(
            [
                r["label"],
                f"{C.fmt_ms(r['median'])} [{C.fmt_ms(r['p20'])}, {C.fmt_ms(r['p80'])}]",
                f"{r['tokens_per_s']:.0f}",
                f"{r['pairs_per_s']:.0f}",
                f"{r['tflops']:.1f}",
                f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                C.fmt_bytes(r.get("peak_bytes")),
                C.fmt_ratio(r.get("speedup_of_ours")),
                f"{100 * padding:.0f}%, {r.get('forwards', 1)} fwd",
                f"{r['loss0']:.5f} ({_e(r.get('loss_rel_diff'))})" if r.get("loss0") is not None else "-",
                f"{r.get('first_call_s', 0):.1f}",
            ]
        )
    md.append(
        C.markdown_table(
            [
                "variant",
                "ms/step median [p20, p80]",
                "tokens/s",
                "pairs/s",
                "model TFLOP/s",
                "MFU",
                "peak extra",
                "speedup",
                "padding, forwards",
                "loss batch 0 (vs ours)",
                "1st call s",
            ],
            rows,
        )
    )
    notes = [f"{r['variant']}: {r['note']}" for r in s2.get("rows", []) if r.get("note")]
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    return md


def ops_label(suite: Suite, name: str) -> str:
    ops = suite.info.get("_ops")
    return ops.label(name) if ops else "ours"


def targets(suite: Suite) -> list[list[str]]:
    rows = []
    shapes = list(dict.fromkeys(r["shape"] for r in suite.bench))
    for shape in shapes:
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
                    f"{C.fmt_bytes(ours['peak_bytes'])} vs {C.fmt_bytes(lc['peak_bytes'])}",
                    "met" if ok else "MISSED",
                ]
            )
        else:
            rows.append([f"{shape}: peak extra memory <= Liger chunked", lc.get("status", "not run"), "n/a"])
    ratio = suite.score.get("ours_ratio")
    if "score" in suite.args.sections:
        rows.append(
            [
                "score head+loss < 1% of a 0.5B backbone step",
                f"{100 * ratio:.3f}%" if ratio is not None else "not measured",
                "n/a" if ratio is None else ("met" if ratio < TARGETS["score_ratio"] else "MISSED"),
            ]
        )
    if "stage2" in suite.args.sections:
        ours = next((r for r in suite.stage2.get("rows", []) if r["variant"] == "ours"), {})
        mfu = ours.get("mfu")
        rows.append(
            [
                f"stage-2 step MFU >= {TARGETS['stage2_mfu']:.0%} (ours, Qwen2.5-0.5B configuration)",
                f"{100 * mfu:.1f}%"
                if mfu is not None
                else "no matmul peak (run section peak or pass --peak-tflops)"
                if ours.get("status") == "ok"
                else ours.get("status", "not measured"),
                "n/a" if mfu is None else ("met" if mfu >= TARGETS["stage2_mfu"] else "MISSED"),
            ]
        )
    if "rerank" in suite.args.sections:
        rows += gpu_rerank.targets(suite)
    if "stage1" in suite.args.sections:
        rows += gpu_stage1.targets(suite)
    if "check" in suite.args.sections:
        n_fail = sum(r["status"] == "FAIL" for r in suite.checks)
        rows.append(["correctness checks", f"{n_fail} FAIL of {len(suite.checks)}", "met" if not n_fail else "MISSED"])
    return rows


def environment(suite: Suite, ops: C.Ops) -> dict:
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
        "kernels": ", ".join(f"{k}: {s}" for k, s in ops.source.items()),
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


def write_report(suite: Suite, text: str) -> list[Path]:
    a = suite.args
    if a.out_dir:
        out_dir = Path(a.out_dir)
    elif a.smoke:
        import tempfile

        out_dir = Path(tempfile.gettempdir()) / "prorank-gpu-suite-smoke"
    else:
        out_dir = C.ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_suite_{C.slug(suite.info['card'])}_{suite.info['stamp']}"
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(text)
    payload = {
        "info": {k: v for k, v in suite.info.items() if not k.startswith("_")},
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
    suite = Suite(args)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: CUDA is not available (use --smoke to run on CPU)", file=sys.stderr)
        return 2
    ops = C.resolve_ops()
    if ops.any_standin:
        suite.notes.append("some kernels are placeholders: their rows ran kernels.reference (labelled STAND-IN)")
    suite.info = environment(suite, ops)
    suite.info["stamp"] = C.utc_now().strftime("%Y%m%d-%H%M")
    suite.info["_ops"] = ops
    suite.log(f"{suite.info['card']}; torch {torch.__version__}; liger {suite.info['liger-kernel']}; impl {args.impl}")
    if args.smoke:
        suite.notes.append("--smoke: tiny sizes on CPU; timings and ratios mean nothing, only the code paths ran")
    torch.manual_seed(args.seed)
    sections = {
        "peak": lambda: section_peak(suite),
        "check": lambda: section_check(suite, ops),
        "bench": lambda: section_bench(suite, ops),
        "score": lambda: section_score(suite, ops),
        "stage2": lambda: section_stage2(suite),
        "rerank": lambda: gpu_rerank.section_rerank(suite),
        "stage1": lambda: gpu_stage1.section_stage1(suite),
    }
    for name in args.sections:
        suite.log(f"section {name}")
        try:
            sections[name]()
        except Exception as exc:  # noqa: BLE001 - a section crash must not lose the others
            traceback.print_exc()
            suite.notes.append(f"section {name} crashed: {_describe_failure(exc)}")
        _cleanup(args.device)
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
