"""The one BEIR / NanoBEIR loader: a folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv) or
a `datasets` collection in NanoBEIR's layout, cleaned by one set of rules. Training
(data.readers) and evaluation both read collections through it.

Shapes (plain dicts, as pytrec_eval and ir-measures take them):

- corpus:  ``dict[str, str]``              doc id -> text ("title text", title may be empty)
- queries: ``dict[str, str]``              query id -> text
- qrels:   ``dict[str, dict[str, int]]``   query id -> {doc id: graded relevance}
- run:     ``dict[str, dict[str, float]]`` query id -> {doc id: score}; higher is better."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BeirFormatError
from .records import iter_jsonl

Run = dict[str, dict[str, float]]


Qrels = dict[str, dict[str, int]]


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


def _iter_jsonl(path: Path):
    """(line number, record) through the one JSONL reader (data.records)."""
    for loc, rec in iter_jsonl(path):
        yield loc.index, rec


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
