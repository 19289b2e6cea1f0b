"""`prorank-fast` command line.

Subcommands that exist today:
  bench [cpu|gpu] [ARGS...]   the kernel benchmarks (benchmarks/cpu_grpo.py, benchmarks/gpu_suite.py)

The benchmark suites live in the source checkout (``benchmarks/``, beside the package),
not in the installed wheel: ``bench`` needs an editable install or a checkout on sys.path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

BENCH_SUITES = {"cpu": "benchmarks.cpu_grpo", "gpu": "benchmarks.gpu_suite"}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="prorank-fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "bench",
        help="run a kernel benchmark suite and print its table",
        description="Run a benchmark suite; arguments after the suite name go to it (try `bench cpu --help`).",
    )
    bench.add_argument("suite", nargs="?", choices=sorted(BENCH_SUITES), default="cpu")
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        result = _import_suite(args.suite).main(rest)
        return int(result or 0)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
