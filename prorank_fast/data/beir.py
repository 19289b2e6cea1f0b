"""The one BEIR / NanoBEIR loader: a folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or
a `datasets` collection in NanoBEIR's layout, cleaned by one set of rules. Training
(data.readers builds its Examples from :func:`read_beir_folder`) and evaluation
(:func:`load_beir`, :func:`load_collection`) read collections through it, so a collection
that one accepts the other accepts, cleaned the same way.

Shapes (plain dicts, as pytrec_eval and ir-measures take them):

- corpus:  ``dict[str, str]``              doc id -> text ("title text", title may be empty)
- queries: ``dict[str, str]``              query id -> text
- qrels:   ``dict[str, dict[str, int]]``   query id -> {doc id: graded relevance}
- run:     ``dict[str, dict[str, float]]`` query id -> {doc id: score}; higher is better.

Errors are :class:`~prorank_fast.errors.DataError` (``BeirFormatError`` is the same class),
worded as every data error is: ``"<file>: line <n>: field '<name>': <what>"`` (1-based lines
of text files), ``"<dataset> [<subset>, split '<s>']: row <i>: field '<name>': <what>"``
(0-based rows of `datasets` tables), or ``"<file>: <what>"`` for a whole-file problem."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BeirFormatError
from .records import Loc, iter_jsonl, type_name

Run = dict[str, dict[str, float]]


Qrels = dict[str, dict[str, int]]


# The split a folder read without one uses (the training reader's default): the first of
# these that has a qrels file, else the only qrels file.
DEFAULT_SPLITS = ("train", "dev", "test")


@dataclass
class BeirData:
    """An evaluation collection, cleaned: every query has text and at least one judgement,
    and every judged document is in the corpus.

    Attributes:
        corpus: doc id -> "title text" (just the text when the title is empty).
        queries: query id -> text; exactly the queries that have qrels (after cleaning).
        qrels: query id -> {doc id: relevance}; judgements of absent documents removed.
        warnings: human-readable lines for everything that was dropped or looks wrong;
            print them (issue 5's CLI does), they are never silently applied.
        skipped: counters behind the warnings, e.g. ``skipped["qrels_doc_not_in_corpus"]``.
        source: where the data came from (a folder path, "demo", a dataset name).
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: Qrels
    warnings: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def from_dicts(
        cls,
        corpus: Mapping[str, str],
        queries: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        *,
        source: str = "<memory>",
    ) -> BeirData:
        """Build from in-memory dicts (a generated demo collection, a `datasets` split)
        with the same checks and the same cleaning as :func:`load_beir`.

        Raises:
            BeirFormatError: a judged query without text, or an empty query text.
        """
        return clean_collection(
            dict(corpus),
            dict(queries),
            {q: dict(d) for q, d in qrels.items()},
            source=source,
            qrels_name=f"{source} qrels",
            queries_name=f"{source} queries",
        )

    def subset(self, query_ids: Iterable[str]) -> BeirData:
        """The same collection restricted to ``query_ids`` (unknown ids raise KeyError);
        the corpus is shared, not copied."""
        ids = list(query_ids)
        missing = [q for q in ids if q not in self.queries]
        if missing:
            raise KeyError(f"query ids not in this collection: {missing[:5]}")
        return BeirData(
            corpus=self.corpus,
            queries={q: self.queries[q] for q in ids},
            qrels={q: dict(self.qrels[q]) for q in ids},
            warnings=list(self.warnings),
            skipped=dict(self.skipped),
            source=self.source,
        )

    def __repr__(self) -> str:  # the default would print the whole corpus
        return (
            f"BeirData(source={self.source!r}, docs={len(self.corpus)}, queries={len(self.queries)}, "
            f"judgements={sum(len(d) for d in self.qrels.values())}, warnings={len(self.warnings)})"
        )


@dataclass
class BeirFolder:
    """What :func:`read_beir_folder` read: the cleaned collection and where its parts came
    from, for readers that name a record (the training reader's Example.source and errors).

    Attributes:
        data: the collection, exactly what :func:`load_beir` returns.
        split: the qrels split read (the one chosen when none was named).
        query_locs: query id -> its line in queries.jsonl (the kept queries).
        qrels_lines: (query id, doc id) -> its line in the qrels file (the kept judgements).
        records: corpus lines + query lines + qrels rows read (header and blank lines not).
    """

    data: BeirData
    split: str
    query_locs: dict[str, Loc]
    qrels_lines: dict[tuple[str, str], Loc]
    records: int

    def first_qrels_loc(self, qid: str) -> Loc:
        """The first qrels line that judges ``qid`` (a kept judgement)."""
        return min((self.qrels_lines[qid, did] for did in self.data.qrels[qid]), key=lambda loc: loc.index)


def load_beir(folder: str | os.PathLike, split: str | None = "test") -> BeirData:
    """Read a BEIR folder: ``corpus.jsonl`` ({_id, title?, text}), ``queries.jsonl``
    ({_id, text}) and ``qrels/<split>.tsv``.

    The rules (the same for training, which reads folders through :func:`read_beir_folder`):

    - Split: ``split`` names ``qrels/<split>.tsv``; ``None`` takes the first of train, dev,
      test that exists, else the only qrels file (training's default; evaluation's is test).
    - Qrels rows: ``query-id, corpus-id, score`` (BEIR) or ``query-id, iteration,
      corpus-id, score`` (TREC qrels, the iteration ignored), tab-separated or, failing
      that, whitespace-separated; every row of a file has the layout of its first row. The
      first non-blank line is a header when its last field is not a number. Scores are
      integers (graded relevance; negative values allowed, as in some TREC qrels).
    - Ids are strings (JSON integers are converted) without whitespace: TREC run files are
      whitespace-separated, so such an id could never round-trip through a run.
    - Kept: the queries that have judgements in the split. Extra JSON fields are ignored.
      Text is stripped; a document is ``"title text"`` (just one of them when the other is
      empty).

    Errors (:class:`BeirFormatError`, a ValueError, naming file, line and field, e.g.
    ``"corpus.jsonl: line 3: field '_id': duplicate document id 'd1' (first at line 1)"``):
    a missing file (the message lists the splits that exist), invalid JSON, a missing or
    mistyped field, an id that is empty or has whitespace, a duplicate id in the corpus or
    the queries, a qrels row with a wrong number of fields or a score that is not an
    integer, two different scores for one (query, doc) pair, an empty text for a judged
    query, a judged query absent from queries.jsonl. These are errors for training too,
    whatever ``skip_bad_records`` says: a collection is read whole or not at all.

    Counted in ``warnings`` / ``skipped`` and dropped, never used silently: judgements of
    documents absent from the corpus (and queries left without judgements by that),
    repeated identical qrels rows, empty queries outside the split, empty documents
    (kept: they just never match), queries with no judgement above 0 (kept: they score 0
    on every measure, as in trec_eval).

    Returns:
        BeirData with ``source`` set to the folder.
    """
    return read_beir_folder(folder, split).data


def read_beir_folder(folder: str | os.PathLike, split: str | None = "test") -> BeirFolder:
    """:func:`load_beir`'s reader (the same rules, the same result in ``.data``), with the
    split chosen and the lines where each kept query and judgement were read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirFormatError(f"{folder}: not a directory (expected a BEIR folder)", reason="io")
    qrels_path = _qrels_path(folder, split)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise BeirFormatError(
                f"{folder / name}: file not found (a BEIR folder has corpus.jsonl, queries.jsonl, qrels/)",
                reason="io",
            )

    warnings: list[str] = []
    skipped: dict[str, int] = {}
    qrels, qrels_lines, records = _read_qrels(qrels_path, warnings, skipped)

    queries: dict[str, str] = {}
    query_locs: dict[str, Loc] = {}
    seen: dict[str, int] = {}
    empty_other = 0
    queries_path = folder / "queries.jsonl"
    for loc, rec in iter_jsonl(queries_path):
        records += 1
        qid = id_value(rec.get("_id"), loc, "_id")
        text = text_value(rec.get("text"), loc, "text")
        if qid in seen:
            raise loc.error("_id", f"duplicate query id {qid!r} (first at line {seen[qid]})", "duplicate_id")
        seen[qid] = loc.index
        if qid not in qrels:
            empty_other += not text.strip()
            continue  # another split's query: not kept, not an error
        queries[qid] = text
        query_locs[qid] = loc
    if empty_other:
        skipped["empty_query_outside_split"] = empty_other
        warnings.append(
            f"{queries_path}: {empty_other} empty queries without judgements in {qrels_path.stem!r} ignored"
        )

    corpus: dict[str, str] = {}
    corpus_path = folder / "corpus.jsonl"
    for loc, rec in iter_jsonl(corpus_path):
        records += 1
        did = id_value(rec.get("_id"), loc, "_id")
        text = text_value(rec.get("text"), loc, "text").strip()
        title = text_value(rec.get("title"), loc, "title", default="").strip()
        if did in corpus:
            # found again rather than kept for every document: corpora have millions
            first = next(n.index for n, r in iter_jsonl(corpus_path) if str(r.get("_id")) == did)
            raise loc.error("_id", f"duplicate document id {did!r} (first at line {first})", "duplicate_id")
        corpus[did] = f"{title} {text}" if title and text else (title or text)

    data = clean_collection(
        corpus,
        queries,
        qrels,
        source=str(folder),
        qrels_name=str(qrels_path),
        queries_name=str(queries_path),
        query_locs=query_locs,
        qrels_locs={q: min((qrels_lines[q, d] for d in judged), key=lambda x: x.index) for q, judged in qrels.items()},
        warnings=warnings,
        skipped=skipped,
    )
    kept_lines = {(q, d): qrels_lines[q, d] for q, judged in data.qrels.items() for d in judged}
    kept_locs = {q: query_locs[q] for q in data.queries}
    return BeirFolder(data, qrels_path.stem, kept_locs, kept_lines, records)


def _qrels_path(folder: Path, split: str | None) -> Path:
    qrels_dir = folder / "qrels"
    found = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if split is None:
        preferred = [s for s in DEFAULT_SPLITS if s in found]
        if preferred or len(found) == 1:
            split = (preferred or found)[0]
        elif not found:
            raise BeirFormatError(f"{qrels_dir}: no qrels/<split>.tsv in this folder", reason="io")
        else:
            raise BeirFormatError(
                f"{qrels_dir}: no split named and none of {', '.join(DEFAULT_SPLITS)} present; "
                f"name one of: {', '.join(found)}",
                reason="io",
            )
    path = qrels_dir / f"{split}.tsv"
    if not path.is_file():
        raise BeirFormatError(
            f"{path}: qrels file for split {split!r} not found"
            + (f"; splits present: {', '.join(found)}" if found else "; no qrels/*.tsv in this folder"),
            reason="io",
        )
    return path


_MISSING = object()


def id_value(value: Any, loc: Loc, name: str) -> str:
    """An id: a string (a JSON integer is converted) without whitespace, not empty."""
    if value is None:
        raise loc.error(name, "missing", "missing_field")
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise loc.error(name, f"expected a string, got {type_name(value)}", "wrong_type")
    if not value or any(c.isspace() for c in value):
        # TREC run files are whitespace-separated: such an id could never round-trip.
        raise loc.error(name, f"{value!r} is empty or contains whitespace", "bad_id")
    return value


def text_value(value: Any, loc: Loc, name: str, *, default: Any = _MISSING) -> str:
    """A text field, empty allowed (the callers decide what an empty text means)."""
    if value is None:
        if default is not _MISSING:
            return default
        raise loc.error(name, "missing", "missing_field")
    if not isinstance(value, str):
        raise loc.error(name, f"expected a string, got {type_name(value)}", "wrong_type")
    return value


_INT = re.compile(r"[+-]?[0-9]+")


def is_int(s: str) -> bool:
    return _INT.fullmatch(s.strip()) is not None


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


_QRELS_FIELDS = {3: ("query-id", "corpus-id", "score"), 4: ("query-id", "iteration", "corpus-id", "score")}


def _read_qrels(
    path: Path, warnings: list[str], skipped: dict[str, int]
) -> tuple[Qrels, dict[tuple[str, str], Loc], int]:
    """(qrels, (query id, doc id) -> line, rows read); see :func:`load_beir` for the layout."""
    qrels: Qrels = {}
    lines: dict[tuple[str, str], Loc] = {}
    repeated = rows = 0
    width = first_row = None  # the layout (3 or 4 fields), fixed by the first row
    try:
        handle = open(path, encoding="utf-8")
    except OSError as exc:
        raise BeirFormatError(f"{path}: cannot open: {exc}", reason="io") from exc
    with handle:
        seen_first = False
        for lineno, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split("\t")
            if len(parts) not in _QRELS_FIELDS:
                parts = line.split()  # space-separated files (TREC's own layout)
            if not seen_first:
                seen_first = True
                if len(parts) in _QRELS_FIELDS and not _is_number(parts[-1]):
                    continue  # the header line ("query-id corpus-id score")
            loc = Loc(str(path), lineno)
            rows += 1
            if width is None and len(parts) in _QRELS_FIELDS:
                width, first_row = len(parts), lineno
            if len(parts) != width:
                expected = (
                    f"{width} fields ({', '.join(_QRELS_FIELDS[width])}) as at line {first_row}"
                    if width
                    else "3 tab-separated fields (query-id, corpus-id, score) or 4 (TREC: query-id, iteration, "
                    "corpus-id, score)"
                )
                raise loc.error(None, f"expected {expected}, got {len(parts)}: {line[:80]!r}", "bad_row")
            values = dict(zip(_QRELS_FIELDS[width], (p.strip() for p in parts), strict=True))
            qid = id_value(values["query-id"], loc, "query-id")
            did = id_value(values["corpus-id"], loc, "corpus-id")
            score = values["score"]
            if not is_int(score):
                raise loc.error("score", f"{score!r} is not an integer", "bad_label")
            rel = int(score)
            repeated += add_judgement(qrels, lines, qid, did, rel, loc)
    if not qrels:
        raise BeirFormatError(f"{path}: no judgements", reason="io")
    if repeated:
        skipped["qrels_repeated_row"] = repeated
        warnings.append(f"{path}: {repeated} repeated identical rows ignored")
    return qrels, lines, rows


def clean_collection(
    corpus: dict[str, str],
    queries: dict[str, str],
    qrels: Qrels,
    *,
    source: str,
    qrels_name: str,
    queries_name: str,
    query_locs: Mapping[str, Loc] | None = None,
    qrels_locs: Mapping[str, Loc] | None = None,
    warnings: list[str] | None = None,
    skipped: dict[str, int] | None = None,
) -> BeirData:
    """The checks shared by every way in: judged queries need text; judgements of absent
    documents are dropped and counted; queries restricted to the judged ones. ``query_locs``
    / ``qrels_locs`` (query id -> its line or row, the first judging it) name the record in
    errors where known."""
    warnings = [] if warnings is None else warnings
    skipped = {} if skipped is None else skipped

    for qid in qrels:
        if qid not in queries:
            message = f"query id {qid!r} is judged but absent from {queries_name}"
            if qrels_locs and qid in qrels_locs:
                raise qrels_locs[qid].error("query-id", message, "unknown_id")
            raise BeirFormatError(f"{qrels_name}: {message}", reason="unknown_id")
        if not isinstance(queries[qid], str) or not queries[qid].strip():
            message = f"query {qid!r} is empty"
            if query_locs and qid in query_locs:
                raise query_locs[qid].error("text", message, "empty_text")
            raise BeirFormatError(f"{queries_name}: field 'text': {message}", field="text", reason="empty_text")

    empty_docs = sum(1 for t in corpus.values() if not t.strip())
    if empty_docs:
        skipped["empty_document"] = empty_docs
        warnings.append(f"{source}: {empty_docs} documents have no text (kept; BM25 never returns them)")

    missing_docs = 0
    missing_examples: list[str] = []
    cleaned: Qrels = {}
    for qid, judged in qrels.items():
        kept = {}
        for did, rel in judged.items():
            if did in corpus:
                kept[did] = int(rel)
            else:
                missing_docs += 1
                if len(missing_examples) < 3:
                    missing_examples.append(f"{qid}/{did}")
        if kept:
            cleaned[qid] = kept
    if missing_docs:
        skipped["qrels_doc_not_in_corpus"] = missing_docs
        warnings.append(
            f"{qrels_name}: {missing_docs} judgements name documents absent from the corpus, dropped "
            f"(e.g. {', '.join(missing_examples)})"
        )
    lost = [q for q in qrels if q not in cleaned]
    if lost:
        skipped["query_without_judged_docs"] = len(lost)
        warnings.append(f"{qrels_name}: {len(lost)} queries lost every judgement that way and were dropped")
    if not cleaned:
        raise BeirFormatError(f"{qrels_name}: no judgement names a document of the corpus", reason="unknown_id")

    no_relevant = sum(1 for judged in cleaned.values() if max(judged.values()) <= 0)
    if no_relevant:
        skipped["query_without_relevant_doc"] = no_relevant
        warnings.append(f"{qrels_name}: {no_relevant} queries have no judgement above 0 (kept; they score 0)")

    return BeirData(
        corpus=corpus,
        queries={q: queries[q].strip() for q in cleaned},
        qrels=cleaned,
        warnings=warnings,
        skipped=skipped,
        source=source,
    )


def add_judgement(qrels: Qrels, seen: dict, qid: str, did: str, rel: int, loc: Loc) -> bool:
    """Record qrels[qid][did] = rel, `seen[qid, did]` = where. True when the same judgement
    was there already (a repeated row, counted by the caller); a different score for the pair
    is an error naming both places."""
    prev = qrels.setdefault(qid, {}).get(did)
    if prev is not None:
        if prev != rel:
            first = seen[qid, did]
            raise loc.error(
                "score",
                f"({qid}, {did}) judged {rel} here and {prev} at {first.kind} {first.index}",
                "conflicting_label",
            )
        return True
    qrels[qid][did] = rel
    seen[qid, did] = loc
    return False
