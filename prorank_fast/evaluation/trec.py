"""TREC run files: write a run, read one back (checked against the corpus)."""

from __future__ import annotations

import math
import os
from collections.abc import Container, Mapping
from pathlib import Path

from ..data.beir import Run
from ..errors import BeirFormatError
from ..io import atomic_write_text


def write_trec_run(run: Mapping[str, Mapping[str, float]], path: str | os.PathLike, tag: str) -> None:
    """Write the standard 6-column TREC format, ``qid Q0 docid rank score tag``, rank from
    1 by score descending (ties in the run's dict order). Scores are written with
    ``repr`` so they read back bit-identical. Written to a temporary file, then renamed.

    Raises:
        ValueError: an id or the tag is empty or contains whitespace; a NaN score.
    """
    _check_token(tag, "tag")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for qid, docs in run.items():
        _check_token(qid, "query id")
        for rank, did in enumerate(sorted(docs, key=lambda d: -float(docs[d])), 1):
            _check_token(did, "doc id")
            score = float(docs[did])
            if math.isnan(score):
                raise ValueError(f"write_trec_run: NaN score for query {qid!r}, doc {did!r}")
            lines.append(f"{qid} Q0 {did} {rank} {score!r} {tag}\n")
    atomic_write_text(path, "".join(lines))


def _check_token(value: str, what: str) -> None:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        raise ValueError(f"write_trec_run: {what} {value!r} is empty or contains whitespace")


def read_trec_run(path: str | os.PathLike, *, corpus: Container[str] | None = None) -> Run:
    """Read a 6-column TREC run (``qid Q0 docid rank score tag``, whitespace-separated).

    Args:
        path: the run file.
        corpus: if given, every docid must be in it (a run of another collection would
            otherwise be reranked or scored as if its documents were non-relevant).

    Returns:
        run: query id -> {doc id: score}; queries in file order, documents in rank-column
        order (so ties in score keep the file's ranking).

    Raises:
        BeirFormatError (a ValueError) naming file, line and field: not 6 fields, a rank
        that is not an integer, a score that is not a finite-or-infinite float (NaN is
        refused), a document listed twice for one query, a docid absent from ``corpus``,
        a missing file.
    """
    path = Path(path)
    if not path.is_file():
        raise BeirFormatError(f"{path}: run file not found")
    rows: dict[str, list[tuple[int, int, str, float]]] = {}
    seen: dict[tuple[str, str], int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise BeirFormatError(
                    f"{path}: line {lineno}: expected 6 fields (qid Q0 docid rank score tag), got {len(parts)}"
                )
            qid, _, did, rank_s, score_s, _tag = parts
            try:
                rank = int(rank_s)
            except ValueError:
                raise BeirFormatError(f"{path}: line {lineno}: field 'rank': {rank_s!r} is not an integer") from None
            try:
                score = float(score_s)
            except ValueError:
                raise BeirFormatError(f"{path}: line {lineno}: field 'score': {score_s!r} is not a number") from None
            if math.isnan(score):
                raise BeirFormatError(f"{path}: line {lineno}: field 'score': NaN")
            if (qid, did) in seen:
                raise BeirFormatError(
                    f"{path}: line {lineno}: field 'docid': {did!r} listed twice for query {qid!r} "
                    f"(first at line {seen[qid, did]})"
                )
            if corpus is not None and did not in corpus:
                raise BeirFormatError(
                    f"{path}: line {lineno}: field 'docid': {did!r} (query {qid!r}) is not in the corpus; "
                    "is the run from another collection?"
                )
            seen[qid, did] = lineno
            rows.setdefault(qid, []).append((rank, lineno, did, score))
    return {qid: {did: score for _, _, did, score in sorted(docs)} for qid, docs in rows.items()}
