"""One variable at a time: runs of a recipe that differ from a base by a few overrides, each with
its held-out table (per collection and mean) and its held-out nDCG@10 against tokens trained.

    python -m benchmarks.ablations [--recipe R] [--out DIR] [--stage2-only] NAME=key=value,key=value ...
    python -m benchmarks.ablations --out DIR --table-only

Each NAME runs `prorank-fast train R <overrides> output_dir=DIR/NAME` (a subprocess, as users run it;
a run whose summary.json exists is not run again, a killed one resumes), then every run under DIR is
tabulated into DIR/ablations.md. With --stage2-only, stage 1 is off: the rows are zero-shot -> stage 2.
The curve comes from metrics.jsonl (stage2.eval_every) and the summary's before/after.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def run(recipe: str, out: Path, overrides: list[str]) -> float:
    """One `prorank-fast train`; returns its wall seconds (0 when it had already finished)."""
    if (out / "summary.json").exists():
        return 0.0
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "prorank_fast.cli", "train", recipe, *overrides, f"output_dir={out}"]
    (out / "command.txt").write_text(" ".join(cmd[1:]) + "\n")
    t0 = time.perf_counter()
    with open(out / "train.log", "a") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t0


def curve(out: Path, summary: dict) -> list[dict]:
    """(step, tokens trained, held-out nDCG@10 mean and per collection) of the last stage-2 run in `out`."""
    points = [{"step": 0, "tokens": 0, "ndcg@10": summary.get("ndcg@10_before"),
               **_per_collection(summary.get("held_out_collections_before"))}]  # fmt: skip
    tokens = 0
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        tokens += record.get("tokens", 0)
        if record.get("held_out_ndcg@10") is not None:
            per = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("held_out_ndcg@10/")}
            points.append({"step": record["step"], "tokens": tokens, "ndcg@10": record["held_out_ndcg@10"], **per})
    if points[-1]["step"] != summary.get("steps"):  # stage2.eval_every 0: the summary's after-figure
        points.append({"step": summary.get("steps"), "tokens": tokens, "ndcg@10": summary.get("ndcg@10_after"),
                       **_per_collection(summary.get("held_out_collections_after"))})  # fmt: skip
    return points


def _per_collection(collections: dict | None) -> dict:
    return {name: c["ndcg@10"] for name, c in (collections or {}).items()}


def table(root: Path) -> str:
    """Markdown: one row per run (held-out nDCG@10 per collection and mean: BM25, the run's start,
    after), then each run's curve."""
    runs = sorted(p.parent for p in root.glob("*/summary.json"))
    if not runs:
        return f"no finished run under {root}"
    summaries = {r.name: json.loads((r / "summary.json").read_text()) for r in runs}
    names = list(next(iter(summaries.values())).get("held_out_collections_after") or {})
    head = "| run | overrides | steps | tokens | " + " | ".join(f"{n} start -> after" for n in names)
    head += " | mean BM25 | mean start | mean after | wall s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    curves = []
    for r in runs:
        s = summaries[r.name]
        command = (r / "command.txt").read_text().split() if (r / "command.txt").exists() else []
        overrides = [c for c in command[4:] if "=" in c and not c.startswith("output_dir=")]
        points = curve(r, s)
        before, after = s.get("held_out_collections_before") or {}, s.get("held_out_collections_after") or {}
        cells = [f"{before[n]['ndcg@10']:.4f} -> {after[n]['ndcg@10']:.4f}" if n in after else "" for n in names]
        lines.append(f"| {r.name} | {' '.join(overrides)} | {s.get('steps')} | {points[-1]['tokens']} | "
                     + " | ".join(cells)
                     + f" | {s.get('bm25_ndcg@10', 0):.4f} | {s.get('ndcg@10_before', 0):.4f} | "
                     f"{s.get('ndcg@10_after', 0):.4f} | {s.get('wall_time_s', 0):.0f} |")  # fmt: skip
        rows = [f"| {p['step']} | {p['tokens']} | {p['ndcg@10']:.4f} | "
                + " | ".join(f"{p[n]:.4f}" if n in p else "" for n in names) + " |" for p in points]  # fmt: skip
        curves.append(f"\n{r.name}: held-out nDCG@10 against tokens trained\n\n| step | tokens | mean | "
                      + " | ".join(names) + " |\n|" + "---|" * (3 + len(names)) + "\n" + "\n".join(rows))  # fmt: skip
    return "\n".join(lines) + "\n" + "\n".join(curves) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablations", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="smollm2-135m-multi")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--stage2-only", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("runs", nargs="*", help="NAME=key=value,key=value (NAME= alone: the recipe as it is)")
    args = parser.parse_args(argv)
    root = Path(args.out)
    if not args.table_only:
        for spec in args.runs:
            name, _, rest = spec.partition("=")
            overrides = [o for o in rest.split(",") if o] + (["stage1.enabled=false"] if args.stage2_only else [])
            print(f"[ablations] {name}: {' '.join(overrides) or '(the recipe)'}", flush=True)
            print(f"[ablations] {name}: {run(args.recipe, root / name, overrides):.0f} s", flush=True)
    text = table(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "ablations.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
