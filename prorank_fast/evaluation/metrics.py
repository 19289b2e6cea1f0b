"""Metrics of a run against qrels, by ir-measures (pytrec_eval), and their table."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@100")


def evaluate_run(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    measures: Sequence[Any] = DEFAULT_MEASURES,
) -> dict[str, float]:
    """Mean of each measure over the queries of ``qrels`` (ir-measures, pytrec_eval).

    Averaged over every query in ``qrels``: a query absent from the run (or with an empty
    list) counts as 0, as does a query with no judgement above 0; queries of the run
    that ``qrels`` lacks are ignored. That is ir-measures' pytrec_eval behaviour (checked
    in tests/test_evaluate.py), unlike plain trec_eval without ``-c``. Documents are
    ranked by score, ties by doc id descending (trec_eval's rule); the run's order is
    not used. pytrec_eval compares scores as float32: scores closer than that are ties.

    Args:
        run: query id -> {doc id: score}.
        qrels: query id -> {doc id: relevance}; graded gains for nDCG, relevance >= 1 for
            binary measures (RR, R).
        measures: ir-measures names ("nDCG@10", "RR@10", "R@100", "P@5", "MAP", ...) or
            measure objects.

    Returns:
        {name: value}, names in the order given, with RR@k reported as "MRR@k" and R@k as
        "Recall@k" (e.g. {"nDCG@10": ..., "MRR@10": ..., "Recall@100": ...}); any
        other measure under ir-measures' own name.
    """
    import ir_measures

    parsed = [ir_measures.parse_measure(m) if isinstance(m, str) else m for m in measures]
    if not qrels:
        raise ValueError("evaluate_run: qrels is empty")
    run_f = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items()}
    nan = [q for q, docs in run_f.items() if any(math.isnan(s) for s in docs.values())]
    if nan:
        raise ValueError(f"evaluate_run: NaN scores in the run for queries {nan[:5]}")
    qrels_i = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    # Pinned to pytrec_eval where it can serve all measures: its missing-query rule is
    # the one documented above; another provider is used only for what it cannot serve.
    provider = ir_measures.pytrec_eval
    calc = provider.calc_aggregate if all(provider.supports(m) for m in parsed) else ir_measures.calc_aggregate
    values = calc(parsed, qrels_i, run_f)
    return {_display_name(m): float(values[m]) for m in parsed}


def _display_name(measure: Any) -> str:
    params = dict(measure.params)
    if set(params) == {"cutoff"}:
        if measure.NAME == "RR":
            return f"MRR@{params['cutoff']}"
        if measure.NAME == "R":
            return f"Recall@{params['cutoff']}"
    return str(measure)


def format_metrics_table(rows: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """A plain-text table, one row per system: ``{"BM25": {"nDCG@10": 0.44, ...}, ...}``.
    Columns are the union of measure names in first-seen order; absent cells are "-"."""
    cols: list[str] = []
    for metrics in rows.values():
        cols.extend(c for c in metrics if c not in cols)
    name_w = max([len("system"), *(len(r) for r in rows)])
    widths = [max(len(c), digits + 2) for c in cols]
    lines = ["  ".join(["system".ljust(name_w), *(c.rjust(w) for c, w in zip(cols, widths, strict=True))])]
    for name, metrics in rows.items():
        cells = [
            (f"{metrics[c]:.{digits}f}" if c in metrics else "-").rjust(w) for c, w in zip(cols, widths, strict=True)
        ]
        lines.append("  ".join([name.ljust(name_w), *cells]))
    return "\n".join(lines)
