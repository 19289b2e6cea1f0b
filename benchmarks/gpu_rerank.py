"""GPU suite section "rerank": reranking throughput at the Qwen2.5-0.5B configuration.

One query = ``--rr-docs`` (100) prompts of random token ids: a fixed template part (``--rr-template-len``
tokens, the prorank template is ~90 with the Qwen2 tokenizer), a query (``--rr-query-len``) and a
document of ~``--rr-doc-len`` (300) tokens (uniform +- ``--rr-doc-jitter``). A randomly initialised
Qwen2ForCausalLM of the Qwen2.5-0.5B shape (tied head, vocab 151936) in bf16 scores them:

* ours         ``Reranker.score_token_ids``: length-sorted packed batches of ``--rr-max-tokens`` tokens,
               prorank_varlen attention (flash-attn / torch varlen), last position, 2 head rows
* padded_last  transformers the sentence-transformers way: batches of ``--rr-padded-batch`` prompts in
               input order, left-padded, sdpa + attention mask, ``logits_to_keep=1`` (full-vocabulary logits
               of the last position only)
* padded_full  transformers the mxbai-rerank library way: the same batches, logits of every position
               (``model(**inputs).logits[:, -1]``)

Reported: s/query and documents/s (median [p20, p80] over timed calls of one query each), the speedup
of ours, and the largest score difference against ours (bf16). Orientation, not a measurement of ours:
mixedbread publishes 0.67 s/query for mxbai-rerank-base-v2 (same architecture) on an A100 for its
benchmark's 100-document queries.

Tokenization is not timed (random ids; the GPU machines carry no Qwen tokenizer).
"""

from __future__ import annotations

import time
import traceback

import torch

from . import _common as C

VARIANTS = ("ours", "padded_last", "padded_full")
LABELS = {
    "ours": "ours: Reranker, packed varlen, 2 head rows",
    "padded_last": "transformers padded, sdpa, logits_to_keep=1 (sentence-transformers' way)",
    "padded_full": "transformers padded, sdpa, all-position logits (mxbai-rerank's way)",
}
MXBAI_BASE_V2_A100_S_PER_QUERY = 0.67  # mixedbread's published figure (orientation only)
SMOKE = dict(rr_layers=2, rr_docs=8, rr_doc_len=32, rr_doc_jitter=8, rr_template_len=12, rr_query_len=4)


def add_args(p) -> None:
    g = p.add_argument_group("f. rerank")
    g.add_argument("--rr-layers", type=int, default=24)
    g.add_argument("--rr-docs", type=int, default=100, help="documents per query")
    g.add_argument("--rr-doc-len", type=int, default=300, help="mean document length (tokens)")
    g.add_argument("--rr-doc-jitter", type=int, default=100, help="document lengths uniform in len +- jitter")
    g.add_argument("--rr-template-len", type=int, default=90, help="fixed template tokens per prompt")
    g.add_argument("--rr-query-len", type=int, default=16)
    g.add_argument("--rr-max-tokens", type=int, default=65536, help="ours: tokens per packed batch")
    g.add_argument("--rr-padded-batch", type=int, default=32, help="padded rows: prompts per forward")
    g.add_argument("--rr-variants", default=",".join(VARIANTS))


def _model(suite):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .gpu_suite import QWEN2_0P5B

    a = suite.args
    cfg_kw = dict(QWEN2_0P5B, num_hidden_layers=a.rr_layers)
    if a.smoke:
        cfg_kw.update(
            hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, vocab_size=1000
        )
    config = Qwen2Config(**cfg_kw)
    config.use_cache = False
    torch.manual_seed(a.seed)
    with torch.device(suite.device):
        lm = Qwen2ForCausalLM(config)
    dtype = torch.bfloat16 if suite.device.type == "cuda" else torch.float32
    return lm.to(dtype).eval(), config


def _prompts(suite, vocab: int) -> list[list[int]]:
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


def section_rerank(suite) -> None:
    from prorank_fast.rerank import Reranker

    a, dev = suite.args, suite.device
    out = suite.rerank
    rows = out.setdefault("rows", [])
    variants = [v.strip() for v in a.rr_variants.split(",") if v.strip()]
    if suite.over_budget():
        rows += [dict(variant=v, label=LABELS[v], status="skipped (time budget)") for v in variants]
        return
    lm, config = _model(suite)
    prompts = _prompts(suite, config.vocab_size)
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
        row = dict(variant=variant, label=LABELS[variant])
        if suite.over_budget():
            rows.append({**row, "status": "skipped (time budget)"})
            continue
        batch = a.rr_padded_batch
        while True:
            try:
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
                break
            except Exception as exc:  # noqa: BLE001 - reported in the table
                from .gpu_suite import _cleanup, _describe_failure, _is_oom

                _cleanup(dev)
                if _is_oom(exc) and variant != "ours" and batch > 1:
                    batch //= 2
                    suite.log(f"rerank {variant} OOM; {batch} prompts per forward")
                    continue
                row["status"] = _describe_failure(exc)
                if not _is_oom(exc):
                    traceback.print_exc()
                break
        if "median" in row:
            row["s_per_query"] = row["median"]
            row["docs_per_s"] = len(prompts) / row["median"]
        rows.append(row)
        suite.log(
            f"rerank {variant}: {row['status']}"
            + (f" {row['median']:.3f} s/query, {row['docs_per_s']:.0f} docs/s" if "median" in row else "")
        )
    ours = next((r for r in rows if r["variant"] == "ours" and "median" in r), None)
    for r in rows:
        if ours is not None and "median" in r:
            r["speedup_of_ours"] = r["median"] / ours["median"]
        if "ours" in scores and r["variant"] in scores:
            ref = scores["ours"]
            r["max_score_diff"] = float((scores[r["variant"]] - ref).abs().max())
            r["score_spread"] = float(ref.max() - ref.min())
    del lm


def render(suite) -> list[str]:
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
    rows = []
    for r in rr.get("rows", []):
        if "median" not in r:
            rows.append([r.get("label", r["variant"]), r.get("status", "-")] + ["-"] * 5)
            continue
        rows.append(
            [
                r["label"],
                f"{r['median']:.4f} [{r['p20']:.4f}, {r['p80']:.4f}]",
                f"{r['docs_per_s']:.0f}",
                C.fmt_ratio(r.get("speedup_of_ours")),
                "-" if r.get("max_score_diff") is None else f"{r['max_score_diff']:.1e} of {r['score_spread']:.2f}",
                r.get("note", ""),
                f"{r.get('first_call_s', 0):.1f}",
            ]
        )
    md.append(
        C.markdown_table(
            [
                "variant",
                "s/query median [p20, p80]",
                "docs/s",
                "speedup",
                "max |score - ours| of spread",
                "note",
                "1st call s",
            ],
            rows,
        )  # fmt: skip
    )
    return md


def targets(suite) -> list[list[str]]:
    rows = suite.rerank.get("rows", [])
    ours = next((r for r in rows if r["variant"] == "ours"), {})
    last = next((r for r in rows if r["variant"] == "padded_last"), {})
    sp = last.get("speedup_of_ours")
    out = [
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
    return out
