"""Every Triton kernel compiled ahead of time for sm_80 / sm_90 / sm_100: registers, shared memory,
spills, occupancy and compile time per configuration, without a GPU.

    prorank-fast bench compile                          # every configuration, sm_80, sm_90, sm_100
    prorank-fast bench compile --targets sm_90,sm_100 --json out.json --markdown out.md
    python -m benchmarks.compile_check --kernels score_fwd,score_bwd_rows --targets sm_90

The configurations are those of ``kernels/launch_table.py`` (the table the launchers read their
launch constants from): per kernel, every flag combination x the training dtypes x both size
classes (``core``, what the defaults launch), each other argument value one at a time (``axis``:
dtypes, ids, vocabulary and row counts, strides, alignment, integers equal to 1) and the
least-specialised launch (``generic``); ``launch_table.configurations`` says exactly which.
``kernels/aot.py`` compiles them in a pool of ``--workers`` processes and reads each cubin with the
cuobjdump of the triton wheel. Per configuration and target: registers per thread, shared memory
per block (static + Triton's dynamic), LOCAL / STACK bytes (a spill: triton 3.9's ptxas reports
spills as STACK), threads per block, resident blocks per SM and what limits them (registers,
threads, shared memory, the 32-block cap; CUDA occupancy rules, see ``aot.occupancy``) and the
compile seconds (cold: Triton's cache makes a rerun a few seconds).

Kernel developers run it when they change a kernel; tests/test_compile.py runs a reduced profile
(``--reduced``) on every CI run and fails on a compile error or a spill in a core configuration.
The process exits 1 when a configuration does not compile.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections import defaultdict

from prorank_fast.kernels import _utils

INSTALL_HINT = "prorank-fast bench compile needs triton (the GPU kernels' compiler): pip install triton"


def parse_args(argv=None) -> argparse.Namespace:
    from prorank_fast.kernels import aot, launch_table

    p = argparse.ArgumentParser(prog="prorank-fast bench compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(aot.TARGETS), help=f"comma list of {', '.join(aot.TARGETS)}")
    p.add_argument("--kernels", default="", help=f"comma list (default all): {', '.join(launch_table.KERNELS)}")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="compile processes (default: CPUs)")
    p.add_argument("--reduced", action="store_true", help="the test's profile (see aot.jobs)")
    p.add_argument("--json", default=None, metavar="FILE", help="every row and the versions, as JSON")
    p.add_argument("--markdown", default=None, metavar="FILE", help="the printed report, also to FILE")
    return p.parse_args(argv)


def _kib(n: int) -> str:
    return f"{n / 1024:.1f}K" if n >= 1024 else str(n)


def _cell(r) -> str:
    if r is None:
        return ""
    if r.error:
        return "**ERROR**"
    spill = f"**L{r.local} S{r.stack}**" if r.spills else "-"
    return f"{r.regs} · {_kib(r.shared)} · {spill} · {r.blocks_per_sm} ({r.occupancy:.0%}) · {r.seconds:.2f}"


def render(results, meta: dict) -> str:
    targets = meta["targets"]
    lines = [
        f"# Kernel compile check: triton {meta['triton']}, {', '.join(targets)}",
        "",
        f"{meta['date']}, {meta['host']}; {meta['configurations']} configurations, {len(results)} compiles "
        f"({meta['errors']} errors, {meta['spills']} with spills), {meta['wall_s']:.0f} s wall with "
        f"{meta['workers']} workers, {meta['compile_s']:.0f} s of compiling. `prorank-fast bench compile`; "
        "configurations from kernels/launch_table.py (core: every flag combination x bf16/fp16/fp32 x both "
        "size classes; axis: one argument changed; generic: odd sizes and strides, misaligned pointers).",
        "",
        "## Per kernel and target",
        "",
        "| kernel | target | threads | configs | registers (min-max) | shared max | spills (core) | "
        "blocks/SM min (occupancy) | limited by | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    from prorank_fast.kernels import launch_table

    by_kt = defaultdict(list)
    for r in results:
        by_kt[(r.kernel, r.target)].append(r)
    order = {name: i for i, name in enumerate(launch_table.KERNELS)}
    for (kernel, target), rows in sorted(by_kt.items(), key=lambda kv: (order[kv[0][0]], targets.index(kv[0][1]))):
        ok = [r for r in rows if not r.error]
        worst = min(ok, key=lambda r: r.blocks_per_sm) if ok else None
        spills = sum(r.spills for r in ok)
        core_spills = sum(r.spills for r in ok if r.group == "core")
        errors = len(rows) - len(ok)
        lines.append(
            f"| {kernel} | {target} | {rows[0].threads} | {len(rows)}{f' ({errors} ERRORS)' if errors else ''} | "
            f"{min((r.regs for r in ok), default=0)}-{max((r.regs for r in ok), default=0)} | "
            f"{_kib(max((r.shared for r in ok), default=0))} | {spills} ({core_spills}) | "
            f"{worst.blocks_per_sm if worst else '-'} ({worst.occupancy:.0%}) | {worst.limiter if worst else '-'} | "
            f"{sum(r.seconds for r in rows):.1f} |"
        )
    lines += [
        "",
        "## Every configuration",
        "",
        "Cell: registers/thread · shared bytes/block · spills (LOCAL, STACK bytes; - for none) · "
        "resident blocks/SM (occupancy) · compile s. Empty: not compiled for that target (--reduced).",
    ]
    rows_by_cfg: dict[tuple, dict] = defaultdict(dict)
    for r in sorted(results, key=lambda r: order[r.kernel]):  # stable: the table's order within a kernel
        rows_by_cfg[(r.kernel, r.config, r.group)][r.target] = r
    kernel = None
    for (k, config, group), cells in rows_by_cfg.items():
        if k != kernel:
            kernel = k
            threads = next(iter(cells.values())).threads
            lines += ["", f"### {k} ({threads} threads)", "", f"| configuration | group | {' | '.join(targets)} |"]
            lines.append("|---|---|" + "---|" * len(targets))
        lines.append(f"| {config} | {group} | " + " | ".join(_cell(cells.get(t)) for t in targets) + " |")
    errors = [r for r in results if r.error]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {short_error(r.error)}" for r in errors]
    return "\n".join(lines) + "\n"


def short_error(error: str) -> str:
    """First and last line of a compile error (where it is, and why)."""
    lines = [line for line in error.splitlines() if line.strip()]
    return " ... ".join(dict.fromkeys([lines[0], lines[-1]])) if lines else ""


def to_json(results, meta: dict) -> str:
    """{"meta", "columns", "rows"}: one row per line (small, and diffs line by line)."""
    columns = list(results[0].as_dict()) if results else []
    rows = ",\n".join(
        json.dumps([short_error(v) if c == "error" else v for c, v in r.as_dict().items()], separators=(",", ":"))
        for r in results
    )
    return f'{{"meta": {json.dumps(meta)},\n"columns": {json.dumps(columns)},\n"rows": [\n{rows}\n]}}\n'


def main(argv=None) -> int:
    if not _utils.triton_available():
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    import triton

    from prorank_fast.kernels import aot

    args = parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    kernels = [k for k in args.kernels.split(",") if k] or None
    try:
        todo = aot.jobs(kernels, targets, reduced=args.reduced)
    except ValueError as exc:
        raise SystemExit(f"prorank-fast bench compile: {exc}") from exc
    done = [0]

    def progress(r) -> None:
        done[0] += 1
        if r.error or done[0] % 50 == 0 or done[0] == len(todo):
            print(f"[{done[0]}/{len(todo)}] {r.error.splitlines()[0] if r.error else ''}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = aot.compile_jobs(todo, workers=args.workers, progress=progress)
    meta = {
        "triton": triton.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "targets": targets,
        "workers": args.workers,
        "reduced": args.reduced,
        "configurations": len({(r.kernel, r.config) for r in results}),
        "errors": sum(bool(r.error) for r in results),
        "spills": sum(r.spills for r in results if not r.error),
        "wall_s": time.perf_counter() - start,
        "compile_s": sum(r.seconds for r in results),
    }
    report = render(results, meta)
    print(report)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report)
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(results, meta))
    return 1 if meta["errors"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
