"""BEIR-format evaluation: load a collection, BM25 first stage (bm25s), rerank the top k,
score with ir-measures (pytrec_eval), read and write TREC run files.

Shapes used throughout (plain dicts, as pytrec_eval and ir-measures take them):

- corpus:  ``dict[str, str]``              doc id -> text ("title text", title may be empty)
- queries: ``dict[str, str]``              query id -> text
- qrels:   ``dict[str, dict[str, int]]``   query id -> {doc id: graded relevance}
- run:     ``dict[str, dict[str, float]]`` query id -> {doc id: score}; higher is better.
  Evaluators rank by score (ties by doc id, trec_eval's rule); a run's dict order is
  its ranking where this module produces it, and only breaks ties among equal scores
  where this module consumes it.

Nothing here computes a metric by hand: BM25 is bm25s, metrics are ir-measures.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "BeirData",
    "BeirFormatError",
    "DEFAULT_MEASURES",
    "bm25_first_stage",
    "evaluate_reranker",
    "evaluate_run",
    "first_stage_candidates",
    "format_metrics_table",
    "load_beir",
    "load_collection",
    "load_hf_beir",
    "read_trec_run",
    "rerank_run",
    "write_trec_run",
]

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]
ScoreFn = Callable[[list[tuple[str, str]]], Any]

DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@100")


class BeirFormatError(ValueError):
    """A BEIR folder or a run file that cannot be read as it is. The message names the
    file, the line (1-based) and the field where that applies."""


# ---------------------------------------------------------------------------------------
# Loading


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
        return _clean(
            dict(corpus),
            dict(queries),
            {q: dict(d) for q, d in qrels.items()},
            source=source,
            query_lines=None,
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


def load_beir(folder: str | os.PathLike, split: str = "test") -> BeirData:
    """Read a BEIR folder: ``corpus.jsonl`` ({_id, title?, text}), ``queries.jsonl``
    ({_id, text}) and ``qrels/<split>.tsv`` (query-id, corpus-id, score; tab-separated,
    one header line).

    Kept: the queries that have judgements in ``split``. Ids are strings (JSON numbers are
    converted). Extra JSON fields are ignored.

    Errors (:class:`BeirFormatError`, a ValueError, naming file, line and field): a
    missing file (the message lists the splits that exist), invalid JSON, a missing or
    mistyped field, a duplicate id in the corpus or the queries, a qrels row that is not
    3 fields or whose score is not an integer, two different scores for one (query, doc)
    pair, an empty text for a judged query, a judged query absent from queries.jsonl.

    Counted in ``warnings`` / ``skipped`` and dropped, never used silently: judgements of
    documents absent from the corpus (and queries left without judgements by that),
    repeated identical qrels rows, empty queries outside the split, empty documents
    (kept: they just never match), queries with no judgement above 0 (kept: they score 0
    on every measure, as in trec_eval).

    Returns:
        BeirData with ``source`` set to the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise BeirFormatError(f"{folder}: not a directory (expected a BEIR folder)")
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        found = sorted(p.stem for p in (folder / "qrels").glob("*.tsv")) if (folder / "qrels").is_dir() else []
        raise BeirFormatError(
            f"{qrels_path}: qrels file for split {split!r} not found"
            + (f"; splits present: {', '.join(found)}" if found else "; no qrels/*.tsv in this folder")
        )
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise BeirFormatError(f"{folder / name}: file not found (a BEIR folder has corpus.jsonl, queries.jsonl)")

    warnings: list[str] = []
    skipped: dict[str, int] = {}
    qrels = _read_qrels(qrels_path, warnings, skipped)

    queries: dict[str, str] = {}
    query_lines: dict[str, int] = {}
    empty_other = 0
    queries_path = folder / "queries.jsonl"
    for lineno, rec in _iter_jsonl(queries_path):
        qid = _str_field(rec, "_id", queries_path, lineno)
        text = _str_field(rec, "text", queries_path, lineno, allow_empty=True)
        if qid in query_lines:
            raise BeirFormatError(
                f"{queries_path} line {lineno}: field '_id': duplicate query id {qid!r} "
                f"(first at line {query_lines[qid]})"
            )
        query_lines[qid] = lineno
        if qid not in qrels:
            if not text.strip():
                empty_other += 1
            continue  # another split's query: not kept, not an error
        queries[qid] = text.strip()
    if empty_other:
        skipped["empty_query_outside_split"] = empty_other
        warnings.append(f"{queries_path}: {empty_other} empty queries without judgements in {split!r} ignored")

    corpus: dict[str, str] = {}
    corpus_path = folder / "corpus.jsonl"
    for lineno, rec in _iter_jsonl(corpus_path):
        did = _str_field(rec, "_id", corpus_path, lineno)
        text = _str_field(rec, "text", corpus_path, lineno, allow_empty=True)
        title = _str_field(rec, "title", corpus_path, lineno, allow_empty=True, default="")
        if did in corpus:
            first = next(n for n, r in _iter_jsonl(corpus_path) if str(r.get("_id")) == did)
            raise BeirFormatError(
                f"{corpus_path} line {lineno}: field '_id': duplicate document id {did!r} (first at line {first})"
            )
        title, text = title.strip(), text.strip()
        corpus[did] = f"{title} {text}" if title and text else (title or text)

    return _clean(
        corpus,
        queries,
        qrels,
        source=str(folder),
        query_lines=query_lines,
        qrels_name=str(qrels_path),
        queries_name=str(queries_path),
        warnings=warnings,
        skipped=skipped,
    )


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BeirFormatError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise BeirFormatError(f"{path} line {lineno}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


_MISSING = object()


def _str_field(rec: dict, key: str, path: Path, lineno: int, *, allow_empty: bool = False, default: Any = _MISSING):
    value = rec.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is not _MISSING:
            return default
        raise BeirFormatError(f"{path} line {lineno}: field {key!r} missing")
    if key == "_id" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BeirFormatError(f"{path} line {lineno}: field {key!r} must be a string, got {type(value).__name__}")
    if key == "_id" and (not value or value != value.strip() or any(c.isspace() for c in value)):
        # TREC run files are whitespace-separated: such an id could never round-trip.
        raise BeirFormatError(f"{path} line {lineno}: field '_id': {value!r} is empty or contains whitespace")
    if not allow_empty and not value.strip():
        raise BeirFormatError(f"{path} line {lineno}: field {key!r} is empty")
    return value


def _read_qrels(path: Path, warnings: list[str], skipped: dict[str, int]) -> Qrels:
    qrels: Qrels = {}
    where: dict[tuple[str, str], int] = {}
    repeated = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 3:
                parts = line.split()  # tolerate space-separated files, but still 3 fields
            if len(parts) != 3:
                raise BeirFormatError(
                    f"{path} line {lineno}: expected 3 tab-separated fields (query-id, corpus-id, score), "
                    f"got {len(parts)}: {line[:80]!r}"
                )
            qid, did, score = (p.strip() for p in parts)
            if lineno == 1 and not _is_int(score):
                continue  # the header line ("query-id corpus-id score")
            for name, value in (("query-id", qid), ("corpus-id", did)):
                if not value or any(c.isspace() for c in value):
                    raise BeirFormatError(f"{path} line {lineno}: field {name!r}: {value!r} is empty or has whitespace")
            if not _is_int(score):
                raise BeirFormatError(f"{path} line {lineno}: field 'score': {score!r} is not an integer")
            rel = int(score)
            prev = qrels.setdefault(qid, {}).get(did)
            if prev is not None:
                if prev != rel:
                    raise BeirFormatError(
                        f"{path} line {lineno}: field 'score': ({qid}, {did}) judged {rel} here and {prev} "
                        f"at line {where[qid, did]}"
                    )
                repeated += 1
                continue
            qrels[qid][did] = rel
            where[qid, did] = lineno
    if not qrels:
        raise BeirFormatError(f"{path}: no judgements")
    if repeated:
        skipped["qrels_repeated_row"] = repeated
        warnings.append(f"{path}: {repeated} repeated identical rows ignored")
    return qrels


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def _clean(
    corpus: dict[str, str],
    queries: dict[str, str],
    qrels: Qrels,
    *,
    source: str,
    query_lines: dict[str, int] | None,
    qrels_name: str,
    queries_name: str,
    warnings: list[str] | None = None,
    skipped: dict[str, int] | None = None,
) -> BeirData:
    """The checks shared by every way in: judged queries need text; judgements of absent
    documents are dropped and counted; queries restricted to the judged ones."""
    warnings = [] if warnings is None else warnings
    skipped = {} if skipped is None else skipped

    for qid in qrels:
        where = f" (line {query_lines[qid]})" if query_lines and qid in query_lines else ""
        if qid not in queries:
            raise BeirFormatError(f"{qrels_name}: query id {qid!r} is judged but absent from {queries_name}")
        if not isinstance(queries[qid], str) or not queries[qid].strip():
            raise BeirFormatError(f"{queries_name}{where}: field 'text': query {qid!r} is empty")

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
        raise BeirFormatError(f"{qrels_name}: no judgement names a document of the corpus")

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


# ---------------------------------------------------------------------------------------
# Loading: `datasets` collections (NanoBEIR layout)

_HF_SUBSETS = ("corpus", "queries", "qrels")
_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load_collection(spec: str | os.PathLike, split: str | None = None) -> BeirData:
    """An evaluation collection from a BEIR folder or a `datasets` collection.

    Args:
        spec: a BEIR folder (:func:`load_beir`); ``hf:<hub name>`` (e.g.
            ``hf:zeta-alpha-ai/NanoMSMARCO``) or ``hf:<local folder>`` in the NanoBEIR layout
            (:func:`load_hf_beir`). A folder with ``corpus/``, ``queries/`` and ``qrels/``
            sub-folders and no ``corpus.jsonl`` is read as the latter without the prefix.
        split: the qrels split; None: "test" for a BEIR folder, see :func:`load_hf_beir`
            for a `datasets` collection.

    Raises:
        BeirFormatError: as the loader called.
    """
    spec = str(spec)
    if spec.startswith("hf:"):
        return load_hf_beir(spec[3:], split)
    path = Path(spec)
    if path.is_dir() and not (path / "corpus.jsonl").exists() and all((path / s).is_dir() for s in _HF_SUBSETS):
        return load_hf_beir(spec, split)
    return load_beir(path, split or "test")


def load_hf_beir(name: str, split: str | None = None) -> BeirData:
    """Read a collection laid out as NanoBEIR is on the hub (``zeta-alpha-ai/NanoMSMARCO``):
    three subsets (configs), ``corpus`` (``_id``, ``text``, ``title``?), ``queries``
    (``_id``, ``text``) and ``qrels`` (``query-id``, ``corpus-id``, ``score``?). Without a
    ``score`` column every row judges its document relevant (1): NanoBEIR's qrels have none.

    ``name`` is a hub name (``datasets.load_dataset(name, subset)``: needs the network or
    the datasets cache) or a local folder with one sub-folder per subset, each a
    ``save_to_disk`` folder or data files named as on the hub
    (``<split>-00000-of-00001.parquet``, ``<split>.jsonl``: the split is the file name up
    to its first "-" or ".").

    Splits: qrels use ``split`` (an error listing the splits when it is absent); with
    ``split=None``, their only split, else "test". corpus and queries: the same split name
    if they have it, else their only split (NanoBEIR has one, "train", everywhere).

    Same checks, cleaning and counters as :func:`load_beir`; errors (BeirFormatError) name
    the dataset, the subset, the split, the row (0-based, as `datasets` indexes rows) and
    the field.
    """
    local = Path(name).expanduser()
    if not local.is_dir() and name.startswith((".", "/", "~")):
        raise BeirFormatError(f"{name}: no such folder (a `datasets` collection: corpus/, queries/, qrels/)")
    folder = local if local.is_dir() else None

    qrels_ds, qrels_split = _pick_split(_load_hf_subset(name, "qrels", folder), name, "qrels", split)
    tables = {"qrels": (qrels_ds, qrels_split)}
    for subset in ("corpus", "queries"):
        loaded = _load_hf_subset(name, subset, folder)
        tables[subset] = _pick_split(loaded, name, subset, qrels_split, required=False)
    where = {s: f"{name} [{s}" + (f", split {sp!r}" if sp else "") + "]" for s, (_, sp) in tables.items()}

    warnings: list[str] = []
    skipped: dict[str, int] = {}
    cols = _hf_columns(qrels_ds, where["qrels"], ("query-id", "corpus-id"), ("score",))
    scores = cols.get("score")
    qrels: Qrels = {}
    first_row: dict[tuple[str, str], int] = {}
    repeated = 0
    for i, (raw_q, raw_d) in enumerate(zip(cols["query-id"], cols["corpus-id"], strict=True)):
        qid = _hf_id(raw_q, where["qrels"], i, "query-id")
        did = _hf_id(raw_d, where["qrels"], i, "corpus-id")
        rel = 1 if scores is None else _hf_int(scores[i], where["qrels"], i, "score")
        prev = qrels.setdefault(qid, {}).get(did)
        if prev is not None:
            if prev != rel:
                raise BeirFormatError(
                    f"{where['qrels']} row {i}: field 'score': ({qid}, {did}) judged {rel} here and {prev} "
                    f"at row {first_row[qid, did]}"
                )
            repeated += 1
            continue
        qrels[qid][did] = rel
        first_row[qid, did] = i
    if not qrels:
        raise BeirFormatError(f"{where['qrels']}: no judgements")
    if repeated:
        skipped["qrels_repeated_row"] = repeated
        warnings.append(f"{where['qrels']}: {repeated} repeated identical rows ignored")

    cols = _hf_columns(tables["queries"][0], where["queries"], ("_id", "text"), ())
    queries: dict[str, str] = {}
    rows: dict[str, int] = {}
    empty_other = 0
    for i, (raw_id, raw_text) in enumerate(zip(cols["_id"], cols["text"], strict=True)):
        qid = _hf_id(raw_id, where["queries"], i, "_id")
        if qid in rows:
            raise BeirFormatError(
                f"{where['queries']} row {i}: field '_id': duplicate query id {qid!r} (first at row {rows[qid]})"
            )
        rows[qid] = i
        text = _hf_text(raw_text, where["queries"], i, "text").strip()
        if qid not in qrels:
            empty_other += not text
            continue  # another split's query
        if not text:
            raise BeirFormatError(f"{where['queries']} row {i}: field 'text': query {qid!r} is empty")
        queries[qid] = text
    if empty_other:
        skipped["empty_query_outside_split"] = empty_other
        warnings.append(f"{where['queries']}: {empty_other} empty queries without judgements ignored")

    cols = _hf_columns(tables["corpus"][0], where["corpus"], ("_id", "text"), ("title",))
    titles = cols.get("title")
    corpus: dict[str, str] = {}
    rows = {}
    for i, (raw_id, raw_text) in enumerate(zip(cols["_id"], cols["text"], strict=True)):
        did = _hf_id(raw_id, where["corpus"], i, "_id")
        if did in rows:
            raise BeirFormatError(
                f"{where['corpus']} row {i}: field '_id': duplicate document id {did!r} (first at row {rows[did]})"
            )
        rows[did] = i
        text = _hf_text(raw_text, where["corpus"], i, "text").strip()
        title = "" if titles is None else _hf_text(titles[i], where["corpus"], i, "title").strip()
        corpus[did] = f"{title} {text}" if title and text else (title or text)

    return _clean(
        corpus,
        queries,
        qrels,
        source=f"hf:{name}",
        query_lines=None,
        qrels_name=where["qrels"],
        queries_name=where["queries"],
        warnings=warnings,
        skipped=skipped,
    )


def _load_hf_subset(name: str, subset: str, folder: Path | None):
    import datasets

    try:
        if folder is None:
            return datasets.load_dataset(name, subset)
        path = folder / subset
        if not path.is_dir():
            raise BeirFormatError(f"{path}: not found (a `datasets` collection folder has corpus/, queries/, qrels/)")
        if any((path / m).is_file() for m in _SAVED_MARKERS):
            return datasets.load_from_disk(str(path))
        files = sorted(
            p
            for p in path.rglob("*")
            if p.suffix in _FILE_BUILDERS and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise BeirFormatError(f"{path}: neither a save_to_disk folder nor data files ({', '.join(_FILE_BUILDERS)})")
        builders = {_FILE_BUILDERS[p.suffix] for p in files}
        if len(builders) > 1:
            raise BeirFormatError(f"{path}: data files of several types ({', '.join(sorted(builders))})")
        by_split: dict[str, list[str]] = {}
        for p in files:
            by_split.setdefault(p.name.replace(".", "-").split("-", 1)[0], []).append(str(p))
        return datasets.load_dataset(builders.pop(), data_files=by_split)
    except BeirFormatError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFound, DatasetNotFound, connection errors)
        raise BeirFormatError(f"{name} [{subset}]: cannot load with datasets: {type(exc).__name__}: {exc}") from exc


def _pick_split(loaded, name: str, subset: str, wanted: str | None, *, required: bool | None = None):
    """(dataset, split name or None) from a Dataset or a DatasetDict; see :func:`load_hf_beir`."""
    if not hasattr(loaded, "keys"):  # a plain Dataset (save_to_disk of one split): nothing to choose
        return loaded, None
    splits = list(loaded.keys())
    required = wanted is not None if required is None else required
    if wanted is not None and wanted in loaded:
        return loaded[wanted], wanted
    if not required and len(splits) == 1:
        return loaded[splits[0]], splits[0]
    if wanted is None and "test" in loaded:
        return loaded["test"], "test"
    ask = f"no split {wanted!r}" if required else "several splits, name one (--split)"
    raise BeirFormatError(f"{name} [{subset}]: {ask}; splits: {', '.join(splits) or 'none'}")


def _hf_columns(ds, where: str, required: Sequence[str], optional: Sequence[str]) -> dict[str, list]:
    names = list(ds.column_names)
    missing = [c for c in required if c not in names]
    if missing:
        raise BeirFormatError(f"{where}: field {missing[0]!r} missing (columns: {', '.join(names)})")
    return {c: list(ds[c]) for c in (*required, *optional) if c in names}


def _hf_id(value: Any, where: str, row: int, name: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise BeirFormatError(f"{where} row {row}: field {name!r} must be a string, got {type(value).__name__}")
    if not value or any(c.isspace() for c in value):
        # TREC run files are whitespace-separated: such an id could never round-trip.
        raise BeirFormatError(f"{where} row {row}: field {name!r}: {value!r} is empty or contains whitespace")
    return value


def _hf_text(value: Any, where: str, row: int, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BeirFormatError(f"{where} row {row}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _hf_int(value: Any, where: str, row: int, name: str) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _is_int(value.strip()):
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BeirFormatError(f"{where} row {row}: field {name!r}: {value!r} is not an integer")
    return value


# ---------------------------------------------------------------------------------------
# First stage


def bm25_first_stage(
    data: BeirData,
    k: int = 100,
    *,
    stemmer: Any = None,
    k1: float = 1.5,
    b: float = 0.75,
    query_ids: Iterable[str] | None = None,
) -> Run:
    """BM25 (bm25s, Lucene's variant) over ``data.corpus`` for every query of ``data``.

    Tokenization is ``bm25s.tokenize`` (lower-case, ``\\w\\w+`` tokens, stopwords "en"),
    with ``stemmer`` if given: a callable list[str] -> list[str], or an object with
    ``stemWords`` such as ``Stemmer.Stemmer("english")`` (PyStemmer). k1, b: bm25s's
    defaults (Anserini's BEIR baselines use k1=0.9, b=0.4).

    Deterministic: all scores are computed, and the top k is chosen by score, then doc
    id descending (trec_eval's tie rule), so equal scores at the cut never depend on a
    partition's whims, and a k=100 run equals the first 100 of a k=1000 run as any
    evaluator ranks it. Documents that
    share no term with the query (score 0) are not returned: a list may be shorter than k.

    Args:
        data: the collection.
        k: documents kept per query (>= 1).
        query_ids: a subset of ``data.queries`` (default: all, in their order).

    Returns:
        run: query id -> {doc id: BM25 score (float)}, in rank order (dict order).
    """
    import bm25s

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    doc_ids = list(data.corpus)
    qids = list(data.queries) if query_ids is None else list(query_ids)
    corpus_tokens = bm25s.tokenize(
        [data.corpus[d] for d in doc_ids], stopwords="en", stemmer=stemmer, show_progress=False
    )
    retriever = bm25s.BM25(k1=k1, b=b, method="lucene")
    retriever.index(corpus_tokens, show_progress=False)
    # Queries as strings, mapped through the index's own vocabulary: tokenizing them
    # with return_ids would number tokens in a second, unrelated vocabulary.
    query_tokens = bm25s.tokenize(
        [data.queries[q] for q in qids], stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False
    )
    # Ties go to the larger doc id (string order), the rule trec_eval and pytrec_eval
    # rank by: the top k kept here is then the top k they see in any deeper list.
    id_order = np.empty(len(doc_ids), dtype=np.int64)
    id_order[np.argsort(np.array(doc_ids, dtype=object), kind="stable")] = np.arange(len(doc_ids))
    run: Run = {}
    for qid, tokens in zip(qids, query_tokens, strict=True):
        known = [t for t in tokens if t in retriever.vocab_dict]
        if not known:
            run[qid] = {}
            continue
        scores = np.asarray(retriever.get_scores(known))
        pos = np.flatnonzero(scores > 0)
        if len(pos) > k:
            cand = scores[pos]
            kth = np.partition(cand, len(cand) - k)[len(cand) - k]
            pos = pos[cand >= kth]
        pos = pos[np.lexsort((-id_order[pos], -scores[pos]))][:k]
        run[qid] = {doc_ids[i]: float(scores[i]) for i in pos}
    return run


# ---------------------------------------------------------------------------------------
# Reranking


def rerank_run(
    first_stage_run: Mapping[str, Mapping[str, float]],
    data: BeirData,
    score_fn: ScoreFn,
    k: int | None = None,
    batch_size: int = 256,
    *,
    show_progress: bool = False,
) -> Run:
    """Rescore the top ``k`` candidates of each query with ``score_fn``.

    The first-stage rank is the order by first-stage score, ties kept in the run's dict
    order (the rank order for runs from :func:`bm25_first_stage` and :func:`read_trec_run`).
    Candidates beyond the top k are dropped. Queries of the run that ``data`` does not
    have are skipped (a run file may cover other splits); queries of ``data`` absent from
    the run get no entry (and score 0 in :func:`evaluate_run`).

    Args:
        first_stage_run: query id -> {doc id: score}.
        data: texts of queries and documents.
        score_fn: list of (query text, document text) pairs, length <= batch_size ->
            as many scores (list, 1-d numpy array or 1-d tensor); higher = more relevant.
            Called with pairs of several queries together, so it can batch across them.
        k: candidates per query (None: all).
        batch_size: pairs per score_fn call.

    Returns:
        run: query id -> {doc id: score}, in reranked order (dict order). Scores are
        score_fn's, except that a score equal to the one above it once both are rounded
        to float32 (the precision pytrec_eval compares at) is set one float32 ulp below
        it, so the order is strictly decreasing: every evaluator re-sorts by score and
        would otherwise break ties by doc id, not by first-stage rank.

    Raises:
        ValueError: a candidate absent from ``data.corpus``; score_fn returned the wrong
            number of scores or a NaN.
    """
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 or None, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    candidates: dict[str, list[str]] = {}
    absent: list[str] = []
    for qid, docs in first_stage_run.items():
        if qid not in data.queries:
            continue
        ranked = sorted(docs, key=lambda d: -float(docs[d]))  # stable: ties keep dict order
        ranked = ranked if k is None else ranked[:k]
        absent.extend(f"{qid}/{d}" for d in ranked if d not in data.corpus)
        candidates[qid] = ranked
    if absent:
        raise ValueError(
            f"rerank_run: {len(absent)} candidate documents are absent from the corpus "
            f"({data.source or 'collection'}), e.g. {', '.join(absent[:3])}; is the run from another collection?"
        )

    pairs = [(qid, did) for qid, docs in candidates.items() for did in docs]
    scores = np.empty(len(pairs), dtype=np.float64)
    starts = range(0, len(pairs), batch_size)
    if show_progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="rerank", unit="batch")
    for start in starts:
        chunk = pairs[start : start + batch_size]
        out = score_fn([(data.queries[q], data.corpus[d]) for q, d in chunk])
        if hasattr(out, "detach"):  # a torch tensor, possibly on GPU; no torch import here
            out = out.detach().float().cpu().numpy()
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.shape[0] != len(chunk):
            raise ValueError(f"score_fn returned {out.shape[0]} scores for {len(chunk)} pairs")
        if np.isnan(out).any():
            raise ValueError(f"score_fn returned NaN for pairs {start}..{start + len(chunk) - 1}")
        scores[start : start + len(chunk)] = out

    run: Run = {}
    i = 0
    for qid, docs in candidates.items():
        s = scores[i : i + len(docs)]
        i += len(docs)
        order = np.lexsort((np.arange(len(docs)), -s))  # by score, then first-stage rank
        run[qid] = dict(zip((docs[j] for j in order), _strictly_decreasing(s[order]), strict=True))
    return run


def _strictly_decreasing(sorted_desc: np.ndarray) -> list[float]:
    # pytrec_eval compares scores as float32 (checked: 0.5 and 0.5 - 2**-27 tie there),
    # so the order must be strict after rounding to float32, not just in float64.
    out = sorted_desc.astype(np.float64).copy()
    neg_inf = np.float32(-np.inf)
    for j in range(1, len(out)):
        above = np.float32(out[j - 1])
        if np.float32(out[j]) >= above:
            out[j] = float(np.nextafter(above, neg_inf))
    return [float(x) for x in out]


# ---------------------------------------------------------------------------------------
# Metrics


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


# ---------------------------------------------------------------------------------------
# TREC run files


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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


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
                    f"{path} line {lineno}: expected 6 fields (qid Q0 docid rank score tag), got {len(parts)}"
                )
            qid, _, did, rank_s, score_s, _tag = parts
            try:
                rank = int(rank_s)
            except ValueError:
                raise BeirFormatError(f"{path} line {lineno}: field 'rank': {rank_s!r} is not an integer") from None
            try:
                score = float(score_s)
            except ValueError:
                raise BeirFormatError(f"{path} line {lineno}: field 'score': {score_s!r} is not a number") from None
            if math.isnan(score):
                raise BeirFormatError(f"{path} line {lineno}: field 'score': NaN")
            if (qid, did) in seen:
                raise BeirFormatError(
                    f"{path} line {lineno}: field 'docid': {did!r} listed twice for query {qid!r} "
                    f"(first at line {seen[qid, did]})"
                )
            if corpus is not None and did not in corpus:
                raise BeirFormatError(
                    f"{path} line {lineno}: field 'docid': {did!r} (query {qid!r}) is not in the corpus; "
                    "is the run from another collection?"
                )
            seen[qid, did] = lineno
            rows.setdefault(qid, []).append((rank, lineno, did, score))
    return {qid: {did: score for _, _, did, score in sorted(docs)} for qid, docs in rows.items()}


# ---------------------------------------------------------------------------------------
# Reranker evaluation (`prorank-fast eval`)


def evaluate_reranker(
    score_fn: ScoreFn,
    data: BeirData,
    first_stage_run: Mapping[str, Mapping[str, float]],
    k: int = 100,
    out_dir: str | os.PathLike | None = None,
    *,
    first_stage_name: str = "BM25",
    reranker_name: str = "reranker",
    run_source: str | None = None,
    measures: Sequence[Any] = DEFAULT_MEASURES,
    batch_size: int = 256,
    show_progress: bool = False,
    info: Mapping[str, Any] | None = None,
) -> dict:
    """Rerank the first stage's top ``k`` with ``score_fn`` and score both runs side by side.

    Both rows are measured on the same candidates: the first-stage row is its top ``k``
    per query (by score, ties in the run's order), the set the reranker reorders, so
    Recall@k is the same in both and nDCG/MRR differ by the reranking alone. Metrics are
    :func:`evaluate_run`'s, averaged over every judged query of ``data``.

    Counted in ``skipped`` / ``warnings`` (never silently applied): the loading counters of
    ``data``; ``run_query_not_evaluated``, queries of the run that ``data`` does not
    evaluate (another split, another collection), dropped; ``query_without_candidates``,
    judged queries absent from the run or with an empty list (BM25: no term in common
    with the corpus), which score 0 in both rows.

    Args:
        score_fn: list of (query text, document text) -> as many scores, higher = more
            relevant (see :func:`rerank_run`).
        data: the collection.
        first_stage_run: query id -> {doc id: score} (:func:`bm25_first_stage`,
            :func:`read_trec_run`).
        k: candidates reranked per query (>= 1).
        out_dir: if given, ``first_stage.trec``, ``reranker.trec`` (TREC runs, the exact
            inputs of the metrics) and ``metrics.json`` (the returned dict) are written there.
        first_stage_name, reranker_name: row names in the table and in ``metrics``.
        run_source: where the first-stage run came from (a file), for messages.
        measures: ir-measures names, as :func:`evaluate_run` takes them.
        batch_size: pairs per score_fn call.
        info: extra JSON-able fields for the report (the model path, the command line).

    Returns:
        The report: ``metrics`` ({first_stage_name: {...}, reranker_name: {...}}),
        ``collection``, ``first_stage``, ``reranker``, ``skipped``, ``warnings``,
        ``files`` (absent without out_dir), ``pairs``, ``seconds``, and ``info``'s fields.

    Raises:
        BeirFormatError: no query of the run is judged in ``data`` (a run of another split
            or collection), none has a candidate, or a candidate is absent from the corpus
            (:func:`first_stage_candidates`); the message names ``run_source``.
        ValueError: k < 1, first_stage_name == reranker_name; bad scores from score_fn
            (:func:`rerank_run`).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if first_stage_name == reranker_name:
        raise ValueError(f"first_stage_name and reranker_name must differ, both are {first_stage_name!r}")
    source = run_source or first_stage_name
    first, skipped, warnings = first_stage_candidates(data, first_stage_run, k, source=source)

    t0 = time.perf_counter()
    reranked = rerank_run(first, data, score_fn, k=None, batch_size=batch_size, show_progress=show_progress)
    seconds = time.perf_counter() - t0
    pairs = sum(len(docs) for docs in first.values())

    metrics = {
        first_stage_name: evaluate_run(first, data.qrels, measures),
        reranker_name: evaluate_run(reranked, data.qrels, measures),
    }
    report: dict[str, Any] = {
        "metrics": metrics,
        "collection": {
            "source": data.source,
            "queries": len(data.queries),
            "documents": len(data.corpus),
            "judgements": sum(len(d) for d in data.qrels.values()),
        },
        "first_stage": {"name": first_stage_name, "source": source, "k": k},
        "reranker": {"name": reranker_name},
        "pairs": pairs,
        "seconds": {"rerank": round(seconds, 3)},
        "pairs_per_second": round(pairs / seconds, 1) if seconds > 0 else None,
        "skipped": skipped,
        "warnings": warnings,
        **(info or {}),
    }
    if out_dir is not None:
        out = Path(out_dir)
        files = {
            "first_stage_run": str(out / "first_stage.trec"),
            "reranker_run": str(out / "reranker.trec"),
            "metrics": str(out / "metrics.json"),
        }
        report["files"] = files
        write_trec_run(first, files["first_stage_run"], tag=_run_tag(first_stage_name))
        write_trec_run(reranked, files["reranker_run"], tag=_run_tag(reranker_name))
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, files["metrics"])
    return report


def first_stage_candidates(
    data: BeirData, first_stage_run: Mapping[str, Mapping[str, float]], k: int, *, source: str = "first stage"
) -> tuple[Run, dict[str, int], list[str]]:
    """The top ``k`` of the run for every judged query of ``data``, checked; cheap, so a
    command can call it to fail on bad input before it loads a model.

    Returns:
        (run, skipped, warnings): query id -> {doc id: score} in the collection's query
        order (an empty dict for a query without candidates), then ``data``'s counters and
        warnings with ``run_query_not_evaluated`` and ``query_without_candidates`` added
        (see :func:`evaluate_reranker`).

    Raises:
        BeirFormatError: naming ``source``: no query of the run is judged in ``data``; no
            judged query has a candidate; a candidate absent from the corpus.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    skipped = dict(data.skipped)
    warnings = list(data.warnings)

    foreign = [q for q in first_stage_run if q not in data.queries]
    if first_stage_run and len(foreign) == len(first_stage_run):
        raise BeirFormatError(
            f"{source}: none of the run's {len(foreign)} queries is a judged query of {data.source or 'the data'} "
            f"(e.g. {', '.join(foreign[:3])}; collection queries e.g. {', '.join(list(data.queries)[:3])}); "
            "wrong split or collection?"
        )
    if foreign:
        skipped["run_query_not_evaluated"] = len(foreign)
        warnings.append(
            f"{source}: {len(foreign)} queries of the run are not judged queries of this split, ignored "
            f"(e.g. {', '.join(foreign[:3])})"
        )

    first: Run = {}
    empty: list[str] = []
    for qid in data.queries:  # the collection's order: the written runs do not depend on the run file's
        docs = first_stage_run.get(qid) or {}
        if not docs:
            empty.append(qid)
        ranked = sorted(docs, key=lambda d: -float(docs[d]))[:k]  # stable: ties keep the run's order
        first[qid] = {d: float(docs[d]) for d in ranked}
    if empty:
        skipped["query_without_candidates"] = len(empty)
        warnings.append(
            f"{source}: {len(empty)} of {len(data.queries)} judged queries have no first-stage candidates "
            f"(they score 0 in both rows; e.g. {', '.join(empty[:3])})"
        )
    if len(empty) == len(data.queries):
        raise BeirFormatError(f"{source}: no judged query has a first-stage candidate; nothing to rerank")
    absent = [f"{q}/{d}" for q, docs in first.items() for d in docs if d not in data.corpus]
    if absent:
        raise BeirFormatError(
            f"{source}: {len(absent)} candidates are absent from the corpus of {data.source or 'the data'} "
            f"(e.g. {', '.join(absent[:3])}); is the run from another collection?"
        )
    return first, skipped, warnings


def _run_tag(name: str) -> str:
    # The tag is one whitespace-free field of a TREC line.
    return "_".join(name.split()) or "run"
