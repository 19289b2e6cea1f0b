"""`prorank-fast` command line.

Subcommands that exist today:
  train [RECIPE] [key=value ...] [--dry-run]   stage-2 training; no RECIPE = the embedded default (tiny)
  bench [cpu|stage2|gpu] [ARGS...]             the benchmarks (benchmarks/cpu_grpo.py, stage2.py, gpu_suite.py)

The benchmark suites live in the source checkout (``benchmarks/``, beside the package),
not in the installed wheel: ``bench`` needs an editable install or a checkout on sys.path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCH_SUITES = {"cpu": "benchmarks.cpu_grpo", "stage2": "benchmarks.stage2", "gpu": "benchmarks.gpu_suite"}


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

    from .config import RecipeError, load_recipe

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
    except RecipeError as exc:
        raise SystemExit(f"prorank-fast train: {exc}") from exc
    if dry_run:
        from .dry_run import dry_run as run_dry

        print(json.dumps(run_dry(recipe), indent=2))
        return 0
    from .data import DataError
    from .evaluate import BeirFormatError
    from .trainer import train

    try:
        summary = train(recipe)
    except (DataError, BeirFormatError, RecipeError) as exc:
        # bad input: the message names the file, line and field; no traceback needed
        raise SystemExit(f"prorank-fast train: {exc}") from exc
    if summary.get("ndcg@10_after") is not None:
        print(
            f"nDCG@10 on {summary['eval_queries']} held-out queries: before {summary['ndcg@10_before']:.4f}, "
            f"after {summary['ndcg@10_after']:.4f}, BM25 {summary['bm25_ndcg@10']:.4f}"
        )
    print(f"summary: {recipe.train.output_dir}/summary.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prorank-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return _train(args.items, dry_run=args.dry_run)
    if args.command == "bench":
        result = _import_suite(args.suite).main(rest)
        return int(result or 0)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
