"""CPU reranking throughput: ours (``Reranker.predict``) against sentence-transformers' ``CrossEncoder.predict``.

Both load the same exported folder (``prorank_fast.export.write_ecosystem_files``: what ``prorank-fast
train`` writes to ``final/``) and score the same (query, document) pairs:

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
    pytest benchmarks/test_cpu_rerank.py            # the same through pytest-benchmark

Throughput: documents (pairs) per second of one predict() call over all pairs (tokenization included in
both rows), median [p20, p80] over ``rounds`` timed calls per row, rows interleaved call by call.
Before timing, both rows' scores of the same pairs are compared (they must agree to 5e-5, fp32).
Target (printed, not asserted): ours >= 2x sentence-transformers in documents/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import _common as C

C.load_kernels()

from .stage2 import QWEN_VOCAB, Throughput, _load, cpu_counters, other_cpus  # noqa: E402

VARIANTS = ("ours", "st")
LABELS = {
    "ours": "ours: Reranker.predict (packed, varlen, 2 head rows)",
    "st": "sentence-transformers CrossEncoder.predict",
}
GROUP = "cpu-rerank"
SPEEDUP_TARGET = 2.0  # ours / st, documents/s
SCORE_ATOL = 5e-5  # the rows score the same pairs (fp32)
OTHER_CPUS_WARNING = 0.2


@dataclass
class RerankConfig:
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

    @classmethod
    def from_env(cls, **defaults) -> RerankConfig:
        """``defaults`` over the class defaults, overridden by ``PRORANK_BENCH_RR_<FIELD>``."""
        cfg = cls(**defaults)
        for f in fields(cls):
            value = os.environ.get(f"PRORANK_BENCH_RR_{f.name.upper()}")
            if value is not None:
                setattr(cfg, f.name, type(getattr(cfg, f.name))(value))
        return cfg

    @property
    def vocab_list(self) -> list[int]:
        return [int(v) for v in str(self.vocabs).split(",") if v.strip()]

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
    from prorank_fast import data as D
    from prorank_fast.config import load_recipe
    from prorank_fast.demo import make_demo, train_demo_tokenizer
    from prorank_fast.model import load_tokenizer

    recipe = load_recipe(None)
    tmp = tempfile.TemporaryDirectory(prefix="prorank-rerank-bench-")
    root = Path(tmp.name)
    d = recipe.data
    paths = make_demo(root / "demo", num_queries=d.demo_queries, docs_per_topic=d.demo_docs_per_topic, seed=d.demo_seed)
    examples, _ = D.read_examples(str(paths.train))
    texts = [ex.query for ex in examples] + [doc for ex in examples for doc in ex.docs]
    train_demo_tokenizer(texts, vocab_size=cfg.tokenizer_vocab, out_dir=root / "tokenizer")
    tokenizer = load_tokenizer(root / "tokenizer")
    corpus = list(dict.fromkeys(doc for ex in examples for doc in ex.docs))
    queries = list(dict.fromkeys(ex.query for ex in examples))[: cfg.queries]
    if len(queries) < cfg.queries or len(corpus) < cfg.docs:
        have = f"{len(queries)} queries and {len(corpus)} documents"
        raise ValueError(f"the demo has {have}; asked for {cfg.queries} x {cfg.docs}")
    pairs = []
    for qi, query in enumerate(queries):
        start = (qi * cfg.docs) % len(corpus)  # each query its own slice of the corpus (wrapping)
        pairs += [(query, corpus[(start + j) % len(corpus)]) for j in range(cfg.docs)]
    return Workload(pairs=pairs, tokenizer=tokenizer, tiny=dict(recipe.model.tiny), tmp=tmp)


def exported_folder(wl: Workload, cfg: RerankConfig, vocab: int) -> Path:
    """The tiny model with vocabulary ``vocab``, random weights (seeded), exported as pipeline.export does."""
    if vocab not in wl.folders:
        from prorank_fast.data import get_template
        from prorank_fast.export import write_ecosystem_files
        from prorank_fast.model import build_tiny_model

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
        from prorank_fast.rerank import Reranker

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
    docs_per_s: Throughput | None = None
    ms_per_100: Throughput | None = None
    calls: int = 0
    max_score_diff: float | None = None  # vs ours, on every pair
    skipped: str = ""


class Runner:
    """Times ``scorer(pairs)`` calls (perf_counter); the first ``warmup`` calls are not counted."""

    def __init__(self, variant: str, scorer, pairs, warmup: int):
        self.variant, self.scorer, self.pairs, self.warmup = variant, scorer, pairs, warmup
        self.seconds: list[float] = []
        self.scores: list[float] | None = None

    def __call__(self) -> list[float]:
        t0 = time.perf_counter()
        scores = self.scorer(self.pairs)
        self.seconds.append(time.perf_counter() - t0)
        self.scores = scores
        return scores

    def result(self, vocab: int) -> Result:
        timed = self.seconds[self.warmup :] or self.seconds
        n = len(self.pairs)
        return Result(
            vocab,
            self.variant,
            docs_per_s=Throughput.of([n / t for t in timed]),
            ms_per_100=Throughput.of([t * 1e3 * 100 / n for t in timed]),
            calls=len(timed),
        )


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True)) if a else 0.0


@dataclass
class Report:
    config: RerankConfig
    pairs: int = 0
    threads: int = 0
    load_before: float | None = None
    load_after: float | None = None
    counters: tuple | None = None
    other_cpus: float | None = None
    results: dict = field(default_factory=dict)  # (vocab, variant) -> Result

    def add(self, result: Result) -> None:
        self.results[(result.vocab, result.variant)] = result

    def finish(self) -> None:
        self.load_after = _load()
        self.other_cpus = other_cpus(self.counters, cpu_counters())

    def speedup(self, vocab: int) -> float | None:
        ours, st = self.results.get((vocab, "ours")), self.results.get((vocab, "st"))
        if ours is None or st is None or ours.skipped or st.skipped:
            return None
        return ours.docs_per_s.median / st.docs_per_s.median

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
                    "1.00" if variant == "ours" else C.fmt_ratio(sp),
                    "-" if r.max_score_diff is None else f"{r.max_score_diff:.1e}",
                ]
            )
        out = [
            f"CPU reranking throughput: {cfg.describe()}",
            f"torch {torch.__version__}, {self.threads} threads, {os.cpu_count()} cpus",
        ]
        if self.other_cpus is not None:
            line = f"machine load: other processes used {self.other_cpus:.2f} of {os.cpu_count()} CPUs on average"
            if self.other_cpus > OTHER_CPUS_WARNING:
                line += " -- WARNING: the CPUs were shared, the timings are unreliable"
            out.append(line)
        out += [
            "",
            C.markdown_table(
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
        out.append(C.markdown_table(["documents/s ratio", "value", f"target >= {SPEEDUP_TARGET:g}x"], ratio_rows))
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
    report = Report(cfg, pairs=len(wl.pairs), threads=torch.get_num_threads(), load_before=_load())
    report.counters = cpu_counters()
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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerank", description=__doc__.split("\n\n")[0])
    defaults = RerankConfig()
    for f in fields(RerankConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of %(default)s")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = RerankConfig()
    for f in fields(RerankConfig):
        if getattr(args, f.name) is not None:
            setattr(cfg, f.name, getattr(args, f.name))
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {VARIANTS}")
    if cfg.rounds < 1 or cfg.warmup < 0 or cfg.queries < 1 or cfg.docs < 1:
        raise SystemExit("--rounds, --queries and --docs must be >= 1, --warmup >= 0")
    report = run(cfg, variants, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        payload = {
            "config": asdict(cfg),
            "pairs": report.pairs,
            "threads": report.threads,
            "other_cpus": report.other_cpus,
            "results": [asdict(r) for r in report.results.values()],
            "speedup_vs_st": {v: report.speedup(v) for v in cfg.vocab_list},
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, default=str))
    print(report.table(), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
