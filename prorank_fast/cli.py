"""`prorank-fast` command line.

Subcommands that exist today:
  train [RECIPE] [key=value ...] [--dry-run]   stage 1 (GRPO) then stage 2, as the recipe says;
                                               no RECIPE = the embedded default (tiny)
  bench [cpu|stage1|stage2|rerank|gpu|compile] [ARGS...]
                                               the benchmarks (benchmarks/grpo_loss.py, stage1_step.py,
                                               stage2_step.py, rerank.py, gpu_suite.py, compile_check.py:
                                               every Triton kernel compiled for sm_80/90/100, no GPU needed)
  eval MODEL --data BEIR_DIR|hf:NAME [--run TREC | --first-stage bm25] [--k 100]
                                               rerank a first stage, write TREC runs + metrics.json
  rank MODEL --input PAIRS.jsonl [--output SCORES.jsonl] [--max-tokens N] [--device D]
                                               score {query, document} lines; each line back with "score"
  eval and rank take --no-shared-prefix: every prompt run whole (default: each query's prefix once per batch),
  and --batch-invariant on|off (default: on on CPU, off on CUDA): scores bitwise independent of the call

The benchmark suites live in the source checkout (``benchmarks/``, beside the package),
not in the installed wheel: ``bench`` needs an editable install or a checkout on sys.path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCH_SUITES = {
    "cpu": "benchmarks.grpo_loss",
    "stage1": "benchmarks.stage1_step",
    "stage2": "benchmarks.stage2_step",
    "rerank": "benchmarks.rerank",
    "gpu": "benchmarks.gpu_suite",
    "compile": "benchmarks.compile_check",
}
BATCH_INVARIANT_HELP = "scores bitwise independent of the rest of the call (default: on on CPU, off on CUDA)"
EXACT_SHARED_PREFIX_HELP = (
    "attention on fixed blocks too, so shared-prefix scores equal whole prompts' bit for bit "
    "(CPU, with batch invariance; ~15-25%% slower)"
)
NO_SHARED_PREFIX_HELP = (
    "run every prompt whole instead of each query's prefix once per batch (the scores differ by rounding only)"
)


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """The Reranker options that `eval` and `rank` share."""
    parser.add_argument("--max-tokens", type=int, default=None, help="tokens per packed batch (the reranker's default)")
    parser.add_argument("--no-shared-prefix", dest="shared_prefix", action="store_false", help=NO_SHARED_PREFIX_HELP)
    parser.add_argument("--batch-invariant", choices=["on", "off"], default=None, help=BATCH_INVARIANT_HELP)
    parser.add_argument("--exact-shared-prefix", action="store_true", help=EXACT_SHARED_PREFIX_HELP)


def _reranker_kwargs(args: argparse.Namespace, *names: str) -> dict:
    """Reranker.from_pretrained's keyword arguments from the scoring options and `names` (given ones only)."""
    kwargs = {name: getattr(args, name) for name in ("max_tokens", *names) if getattr(args, name) is not None}
    if not args.shared_prefix:
        kwargs["shared_prefix"] = False
    if args.batch_invariant is not None:
        kwargs["batch_invariant"] = args.batch_invariant == "on"
    if args.exact_shared_prefix:
        kwargs["exact_shared_prefix"] = True
    return kwargs


def _import_suite(name: str):
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "benchmarks" / "__init__.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        return importlib.import_module(BENCH_SUITES[name])
    except ModuleNotFoundError as exc:
        raise SystemExit(
            f"prorank-fast bench {name}: cannot import {BENCH_SUITES[name]} ({exc}); "
            "run from a source checkout installed with `pip install -e .`"
        ) from exc


def _train(items: list[str], *, dry_run: bool) -> int:
    import json

    from .config import load_recipe
    from .errors import InputError

    recipe_arg = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif recipe_arg is None:
            recipe_arg = item
        else:
            raise SystemExit(f"prorank-fast train: two recipes given ({recipe_arg!r}, {item!r})")
    try:
        recipe = load_recipe(recipe_arg, overrides)
    except InputError as exc:
        raise SystemExit(f"prorank-fast train: {exc}") from exc
    if dry_run:
        from .dry_run import dry_run as run_dry

        try:
            print(json.dumps(run_dry(recipe), indent=2))
        except InputError as exc:
            raise SystemExit(f"prorank-fast train --dry-run: {exc}") from exc
        return 0
    from .train import train

    try:
        summary = train(recipe)
    except InputError as exc:
        # bad input: the message names the file, line and field; no traceback needed
        raise SystemExit(f"prorank-fast train: {exc}") from exc
    table = summary.get("held_out", {})
    pairs = f", {table['pairs']} balanced stage-1 pairs" if table.get("pairs") else ""
    collections = table.get("collections") or {}
    mean = f" in {len(collections)} collections (nDCG@10: their mean)" if collections else ""
    print(f"held out: {table.get('queries')} queries{pairs}{mean}")
    for key, value in table.items():
        if key not in ("queries", "pairs", "collections") and value is not None:
            print(f"  {key:<30} {value if isinstance(value, str) else f'{value:.4f}'}")
    for name, rows in collections.items():
        print(f"{name}: {rows['queries']} held-out queries")
        for key, value in rows.items():
            if key != "queries" and value is not None:
                print(f"  {key:<30} {value:.4f}")
    print(f"wall time {summary['wall_time_s']:.0f} s; summary: {recipe.train.output_dir}/summary.json")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import re

    from .errors import InputError
    from .evaluation import (
        bm25_first_stage,
        evaluate_reranker,
        first_stage_candidates,
        format_metrics_table,
        load_collection,
        read_trec_run,
    )

    for flag, value in (("--k", args.k), ("--batch-size", args.batch_size), ("--max-tokens", args.max_tokens)):
        if value is not None and value < 1:
            raise SystemExit(f"prorank-fast eval: {flag} must be >= 1, got {value}")
    # Data and first stage before the model: bad input fails in seconds, not after a load.
    try:
        data = load_collection(args.data, args.split)
        if args.run:
            first = read_trec_run(args.run, corpus=data.corpus)
            first_name, source = "first_stage", args.run
        else:
            first = bm25_first_stage(data, k=args.k)
            first_name, source = "BM25", "bm25s"
        if args.held_out is not None:  # the held-out queries of a training split (data.held_out, data.split_seed)
            from .data.splits import split_query_ids

            _, held_out = split_query_ids(list(data.queries), args.held_out, args.split_seed, source=args.data)
            data = data.subset(held_out)
            first = {q: first[q] for q in held_out if q in first}
        first_stage_candidates(data, first, args.k, source=source)  # the checks evaluate_reranker makes
    except InputError as exc:
        raise SystemExit(f"prorank-fast eval: {exc}") from exc
    data_name = re.sub(r"[^\w.-]+", "_", args.data.removeprefix("hf:").rstrip("/").split("/")[-1]) or "data"
    out = Path(args.output_dir or Path("runs") / "eval" / data_name)

    from .rerank import Reranker

    try:
        reranker = Reranker.from_pretrained(args.model, **_reranker_kwargs(args, "device", "autocast"))
    except (FileNotFoundError, ValueError) as exc:  # not a model folder: say so without a traceback
        raise SystemExit(f"prorank-fast eval: {exc}") from exc

    def score_fn(pairs):
        return reranker.predict(pairs, show_progress_bar=False)  # one bar, rerank_run's, over all batches

    from .modeling import numeric_mode

    mode = numeric_mode(reranker.model.dtype, args.autocast)
    info = {"model": args.model, "data": args.data, "split": args.split, "numeric_mode": mode, "argv": sys.argv[1:]}
    try:
        report = evaluate_reranker(
            score_fn, data, first, k=args.k, out_dir=out, first_stage_name=first_name, run_source=source,
            batch_size=args.batch_size, show_progress=True, info=info,
        )  # fmt: skip
    except InputError as exc:
        raise SystemExit(f"prorank-fast eval: {exc}") from exc
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    c = report["collection"]
    print(f"{c['source']}: {c['queries']} queries, {c['documents']} documents; top {args.k} of {source} reranked")
    print(f"numeric mode: {mode}")
    print(format_metrics_table(report["metrics"]))
    if report["skipped"]:
        print("skipped: " + json.dumps(report["skipped"]))
    print(f"runs: {report['files']['first_stage_run']}, {report['files']['reranker_run']}")
    print(f"metrics: {report['files']['metrics']}")
    return 0


def _rank(args: argparse.Namespace) -> int:
    from .errors import InputError
    from .rerank import Reranker, read_pairs_jsonl, write_scores_jsonl

    if args.max_tokens is not None and args.max_tokens < 1:
        raise SystemExit(f"prorank-fast rank: --max-tokens must be >= 1, got {args.max_tokens}")
    try:  # the input before the model: bad input fails in seconds, naming file, line and field
        records, pairs = read_pairs_jsonl(args.input)
    except InputError as exc:
        raise SystemExit(f"prorank-fast rank: {exc}") from exc
    try:
        reranker = Reranker.from_pretrained(args.model, **_reranker_kwargs(args, "device"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"prorank-fast rank: {exc}") from exc
    scores = reranker.predict(pairs, instruction=args.instruction, normalize=args.normalize)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as out:
            write_scores_jsonl(records, scores, out)
        print(f"{len(scores)} scores: {args.output}", file=sys.stderr)
    else:
        write_scores_jsonl(records, scores, sys.stdout)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prorank-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser(
        "train",
        help="train a reranker (no recipe: the embedded tiny CPU demo)",
        description="Train with a recipe (a bundled name such as tiny or prorank-0.5b, or a YAML path) "
        "and key=value overrides, e.g. `prorank-fast train tiny output_dir=runs/demo train.lr=3e-4`.",
    )
    train.add_argument("items", nargs="*", metavar="RECIPE|key=value")
    train.add_argument("--dry-run", action="store_true", help="load and validate offline, train nothing")
    bench = sub.add_parser(
        "bench",
        help="run a kernel benchmark suite and print its table",
        description="Run a benchmark suite; arguments after the suite name go to it (try `bench cpu --help`).",
    )
    bench.add_argument("suite", nargs="?", choices=sorted(BENCH_SUITES), default="cpu")
    ev = sub.add_parser(
        "eval",
        help="rerank a first stage with a model; TREC runs and metrics (nDCG@10, MRR@10, Recall@100)",
        description="Rerank the top k of a first stage (BM25 by bm25s, or a TREC run file) with MODEL "
        "(a folder written by `prorank-fast train`), write both runs and metrics.json, print a table.",
    )
    ev.add_argument("model", metavar="MODEL")
    ev.add_argument("--data", required=True, help="a BEIR folder, or hf:<name or folder> (NanoBEIR layout)")
    first_stage = ev.add_mutually_exclusive_group()
    first_stage.add_argument("--run", metavar="TREC_RUN", help="first-stage run file (instead of BM25)")
    # default None, not "bm25": argparse ignores a value equal to the default in its exclusivity check
    first_stage.add_argument("--first-stage", choices=["bm25"], default=None, help="default: bm25")
    ev.add_argument("--k", type=int, default=100, help="candidates reranked per query (default 100)")
    ev.add_argument("--split", default=None, help="qrels split (default: test; a datasets collection: its only one)")
    ev.add_argument("--output-dir", default=None, help="default: runs/eval/<data name>")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the reranker's choice)")
    ev.add_argument("--batch-size", type=int, default=1024, help="pairs per predict() call (default 1024)")
    ev.add_argument(
        "--held-out",
        type=float,
        default=None,
        metavar="FRACTION",
        help="evaluate only the held-out queries of a training split (data.held_out)",
    )
    ev.add_argument("--split-seed", type=int, default=0, help="the split's seed (data.split_seed, default 0)")
    ev.add_argument("--autocast", choices=["bfloat16"], default=None, help="run the decoder under bf16 autocast")
    _add_scoring_options(ev)
    rk = sub.add_parser(
        "rank",
        help="score (query, document) pairs from a JSONL file with a model",
        description="Score each line {query, document (or doc/text), ...} of --input with MODEL (a folder "
        'written by `prorank-fast train`); write each line back with a "score" field (stdout without --output).',
    )
    rk.add_argument("model", metavar="MODEL")
    rk.add_argument("--input", required=True, metavar="PAIRS.jsonl")
    rk.add_argument("--output", default=None, metavar="SCORES.jsonl", help="default: stdout")
    rk.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    rk.add_argument("--instruction", default=None, help="instruction for every pair (default: the model's)")
    rk.add_argument("--normalize", action="store_true", help="sigmoid of the score (a probability)")
    _add_scoring_options(rk)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:  # bare `prorank-fast`: what it can do, not an argparse error
        parser.print_help()
        return 0
    if args.command == "bench":  # the suite parses the rest
        result = _import_suite(args.suite).main(rest)
        return int(result or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "rank":
        return _rank(args)
    if args.command == "train":
        return _train(args.items, dry_run=args.dry_run)
    if args.command == "eval":
        return _eval(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
