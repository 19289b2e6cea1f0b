"""Training data: readers, prompt templates, truncation, tokenization.

Readers turn a data spec into :class:`Example` objects (one query with its documents):

- JSONL (``.jsonl``, ``.json``, ``.jsonl.gz``) and Parquet files whose records are
  * groups (FlagEmbedding): ``{query, pos: [...], neg: [...], pos_scores?, neg_scores?, prompt?}``
  * pointwise: ``{query, document, label}``; records of one query become one Example
  * columns (sentence-transformers style): ``{query, docs: [...], labels: [...]}`` or ``{query, docs, scores}``
- BEIR folders (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), optionally ``folder:split``
- ``hf:...`` specs read with the ``datasets`` library (see :func:`read_examples`).

Every record is validated; a bad one raises :class:`DataError` naming the file, the line
(1-based, text files) or row (0-based, tables) and the field, or is skipped and counted in
:class:`ReadStats` with ``skip_bad_records=True``.

Templates (:class:`PromptTemplate`) build prompts at token-id level (no BOS): the fixed
parts and the user text are encoded separately and concatenated, so truncation can cut
the document (and, as a last resort, the query) without touching the template.
"""

from __future__ import annotations

import gzip
import json
import math
import random
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DataError",
    "Example",
    "PromptTemplate",
    "ReadStats",
    "TEMPLATES",
    "TokenizedGroup",
    "get_template",
    "read_examples",
    "shape_group",
    "tokenize_examples",
]

FORMATS = ("auto", "groups", "pointwise", "columns", "beir")
_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")
# datasets' packaged builders that take data_files: hf:json:/path/file.jsonl[:split]
_HF_FILE_BUILDERS = ("json", "parquet", "csv", "arrow", "text")


class DataError(ValueError):
    """A record or a file that cannot be used. The message names the file (or dataset),
    the line (1-based) or row (0-based) and the field.

    Attributes:
        source: "file:line" / "name[row]" of the record, or None for a whole-file problem.
        field: the offending field, or None.
        reason: a short key counted in ReadStats.skipped when bad records are skipped.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None, reason: str = "invalid"):
        super().__init__(message)
        self.source = source
        self.field = field
        self.reason = reason


@dataclass
class Example:
    """One query with its documents.

    For groups the positives come first, then the negatives. ``labels`` and
    ``teacher_scores`` (when present) have one entry per document.
    ``source`` is "file:line" (text files) or "name[row]" (tables, datasets).
    """

    query: str
    docs: list[str]
    labels: list[float]
    teacher_scores: list[float] | None
    instruction: str | None
    source: str


@dataclass
class ReadStats:
    """What a read saw.

    Attributes:
        source: the spec that was read.
        records: records read (non-blank JSONL lines, table rows; for BEIR the corpus,
            query and qrels lines together), bad ones included.
        examples: Examples returned.
        skipped: reason -> count of bad records skipped (``skip_bad_records=True``).
    """

    source: str = ""
    records: int = 0
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def count_skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def summary(self) -> str:
        text = f"{self.source}: {self.records} records -> {self.examples} examples"
        if self.skipped:
            text += ", skipped " + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        return text


@dataclass(frozen=True)
class _Loc:
    """Where a record came from: a text file line (1-based) or a table row (0-based)."""

    origin: str
    index: int
    kind: str = "line"  # line | row

    @property
    def source(self) -> str:
        return f"{self.origin}:{self.index}" if self.kind == "line" else f"{self.origin}[{self.index}]"

    @property
    def where(self) -> str:
        return f"{self.origin}: {self.kind} {self.index}"

    @property
    def seed_key(self) -> str:
        """The record's place without the folder: a per-record seed must not change when the
        same file is read from another path (a resumed or second run in another directory)."""
        return f"{Path(self.origin).name}:{self.kind}{self.index}"

    def error(self, field_name: str | None, message: str, reason: str) -> DataError:
        where = self.where
        if field_name is not None:
            where += f": field {field_name!r}"
        return DataError(f"{where}: {message}", source=self.source, field=field_name, reason=reason)


# ---------------------------------------------------------------------------------------
# Field validation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _text(rec: dict, key: str, loc: _Loc, *, optional: bool = False) -> str | None:
    value = rec.get(key)
    if value is None:
        if optional:
            return None
        raise loc.error(key, "missing", "missing_field")
    if not isinstance(value, str):
        raise loc.error(key, f"expected a string, got {_type_name(value)}", "wrong_type")
    if not value.strip():
        raise loc.error(key, "empty text", "empty_text")
    return value


def _texts(rec: dict, key: str, loc: _Loc, *, optional: bool = False) -> list[str] | None:
    value = rec.get(key)
    if value is None:
        if optional:
            return None
        raise loc.error(key, "missing", "missing_field")
    if not isinstance(value, list | tuple):
        raise loc.error(key, f"expected a list of strings, got {_type_name(value)}", "wrong_type")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise loc.error(f"{key}[{i}]", f"expected a string, got {_type_name(item)}", "wrong_type")
        if not item.strip():
            raise loc.error(f"{key}[{i}]", "empty text", "empty_text")
    return list(value)


def _number(value: Any, key: str, loc: _Loc) -> float:
    # bool is accepted (binary labels in `datasets` tables are often bool columns)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        raise loc.error(key, f"expected a number, got {_type_name(value)} {value!r}", "bad_label")
    value = float(value)
    if not math.isfinite(value):
        raise loc.error(key, f"expected a finite number, got {value}", "bad_label")
    return value


def _numbers(rec: dict, key: str, loc: _Loc, *, optional: bool = False) -> list[float] | None:
    value = rec.get(key)
    if value is None:
        if optional:
            return None
        raise loc.error(key, "missing", "missing_field")
    if not isinstance(value, list | tuple):
        raise loc.error(key, f"expected a list of numbers, got {_type_name(value)}", "bad_label")
    return [_number(v, f"{key}[{i}]", loc) for i, v in enumerate(value)]


def _instruction(rec: dict, loc: _Loc, default: str | None) -> str | None:
    """A record's own instruction (`prompt`, FlagEmbedding's name, or `instruction`) wins
    over the reader's default; an empty one means none."""
    for key in ("prompt", "instruction"):
        value = rec.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise loc.error(key, f"expected a string, got {_type_name(value)}", "wrong_type")
        if value.strip():
            return value
    return default


# ---------------------------------------------------------------------------------------
# Record schemas


def _parse_group(rec: dict, loc: _Loc, instruction: str | None) -> Example:
    query = _text(rec, "query", loc)
    pos = _texts(rec, "pos", loc)
    if not pos:
        raise loc.error("pos", "no positive documents", "no_positive")
    neg = _texts(rec, "neg", loc, optional=True) or []
    pos_scores = _numbers(rec, "pos_scores", loc, optional=True)
    neg_scores = _numbers(rec, "neg_scores", loc, optional=True)
    for name, scores, docs in (("pos_scores", pos_scores, pos), ("neg_scores", neg_scores, neg)):
        if scores is not None and len(scores) != len(docs):
            docs_name = name.split("_")[0]
            raise loc.error(name, f"{len(scores)} scores for {len(docs)} {docs_name} documents", "length_mismatch")
    teacher = None
    if pos_scores is not None or neg_scores is not None:
        # a side without documents needs no scores; otherwise both sides must have them
        if pos_scores is None:
            raise loc.error("pos_scores", "missing while neg_scores is given", "length_mismatch")
        if neg_scores is None and neg:
            raise loc.error("neg_scores", "missing while pos_scores is given", "length_mismatch")
        teacher = pos_scores + (neg_scores or [])
    labels = [1.0] * len(pos) + [0.0] * len(neg)
    return Example(query, pos + neg, labels, teacher, _instruction(rec, loc, instruction), loc.source)


def _parse_columns(rec: dict, loc: _Loc, instruction: str | None) -> Example:
    query = _text(rec, "query", loc)
    docs = _texts(rec, "docs", loc)
    if not docs:
        raise loc.error("docs", "no documents", "missing_field")
    labels = _numbers(rec, "labels", loc, optional=True)
    scores = _numbers(rec, "scores", loc, optional=True)
    if labels is None and scores is None:
        raise loc.error("labels", "missing (a columns record needs labels or scores)", "missing_field")
    for name, values in (("labels", labels), ("scores", scores)):
        if values is not None and len(values) != len(docs):
            raise loc.error(name, f"{len(values)} values for {len(docs)} docs", "length_mismatch")
    # sentence-transformers treats a `scores` column as the label column; it doubles as
    # teacher scores for listwise distillation
    return Example(
        query, docs, labels if labels is not None else list(scores), scores, _instruction(rec, loc, instruction),
        loc.source,
    )  # fmt: skip


def _parse_pointwise(rec: dict, loc: _Loc, instruction: str | None) -> tuple[str, str, float, str | None]:
    query = _text(rec, "query", loc)
    document = _text(rec, "document", loc)
    if "label" not in rec or rec["label"] is None:
        raise loc.error("label", "missing", "missing_field")
    label = _number(rec["label"], "label", loc)
    return query, document, label, _instruction(rec, loc, instruction)


def _detect_schema(rec: dict, loc: _Loc) -> str:
    if "pos" in rec:
        return "groups"
    if "docs" in rec:
        return "columns"
    if "document" in rec:
        return "pointwise"
    raise loc.error(
        None,
        f"cannot tell the record format from its keys {sorted(rec)}: expected groups {{query, pos, neg}}, "
        "pointwise {query, document, label} or columns {query, docs, labels|scores}",
        "unknown_format",
    )


# ---------------------------------------------------------------------------------------
# Group shaping


def shape_group(
    example: Example,
    group_size: int,
    rng: random.Random,
    *,
    fields: tuple[str, str] = ("pos", "neg"),
    where: str | None = None,
) -> Example:
    """Shape a group to exactly ``group_size`` documents: the positive (highest label, ties
    broken by teacher score, then by order) first, then ``group_size - 1`` negatives
    (documents with a lower label): a seeded sample without replacement when there are
    enough, else all of them plus draws with replacement.

    Raises:
        DataError: no positive (every label <= 0 and all equal) or no negative (all labels
        equal); ``fields`` names the fields the message blames, ``where`` (default: the
        example's source) the record.
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    n = len(example.docs)
    teacher = example.teacher_scores
    best = max(range(n), key=lambda i: (example.labels[i], teacher[i] if teacher else 0.0))
    top = example.labels[best]
    negatives = [i for i in range(n) if example.labels[i] < top]
    if not negatives:
        if top <= 0:
            reason, name, why = "no_positive", fields[0], f"no document with a label above 0 (all {n} are {top:g})"
        else:
            reason, name, why = "no_negative", fields[1], f"no negative: all {n} documents have label {top:g}"
        where = where or example.source
        raise DataError(f"{where}: field {name!r}: {why}", source=example.source, field=name, reason=reason)
    need = group_size - 1
    if len(negatives) >= need:
        chosen = sorted(rng.sample(negatives, need))
    else:
        chosen = negatives + [rng.choice(negatives) for _ in range(need - len(negatives))]
    order = [best, *chosen]
    return Example(
        query=example.query,
        docs=[example.docs[i] for i in order],
        labels=[example.labels[i] for i in order],
        teacher_scores=[teacher[i] for i in order] if teacher else None,
        instruction=example.instruction,
        source=example.source,
    )


# ---------------------------------------------------------------------------------------
# Record sources


def _jsonl_records(path: Path, stats: ReadStats) -> Iterator[tuple[_Loc, dict | DataError]]:
    """(loc, record) per non-blank line; a line that is not a JSON object yields a DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        handle = opener(path, "rt", encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot open: {exc}", reason="io") from exc
    with handle:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = handle.readline()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}: line {lineno}: not UTF-8 text: {exc}", reason="io") from exc
            if not line:
                return
            if not line.strip():
                continue
            stats.records += 1
            loc = _Loc(str(path), lineno)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield loc, loc.error(None, f"invalid JSON: {exc.msg} (column {exc.colno})", "invalid_json")
                continue
            if not isinstance(rec, dict):
                yield loc, loc.error(None, f"expected a JSON object, got {_type_name(rec)}", "not_an_object")
                continue
            yield loc, rec


def _parquet_records(path: Path, stats: ReadStats) -> Iterator[tuple[_Loc, dict]]:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file: {exc}", reason="io") from exc
    row = 0
    for batch in table_file.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            stats.records += 1
            yield _Loc(str(path), row, "row"), rec
            row += 1


def _dataset_records(dataset, name: str, stats: ReadStats) -> Iterator[tuple[_Loc, dict]]:
    for row, rec in enumerate(dataset):
        stats.records += 1
        yield _Loc(name, row, "row"), rec


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def _load_hf(spec: str, split: str | None = None):
    """``hf:<builder>:<files>[:split]`` for datasets' file builders (json, parquet, csv, ...),
    ``hf:<folder>[:split]`` for a ``save_to_disk`` folder, ``hf:<hub name>[:split]`` otherwise;
    ``split`` overrides the one in the spec. Returns (dataset, display name)."""
    import datasets

    rest = spec[3:]
    builder, _, tail = rest.partition(":")
    try:
        if builder in _HF_FILE_BUILDERS and tail:
            files, spec_split = tail, None
            if not Path(files).exists() and ":" in files:
                files, spec_split = files.rsplit(":", 1)
            return datasets.load_dataset(builder, data_files=files, split=split or spec_split or "train"), files
        name, spec_split = rest, None
        if not Path(name).exists() and ":" in name:
            name, spec_split = name.rsplit(":", 1)
        split = split or spec_split
        if _is_saved_dataset(Path(name)):
            loaded = datasets.load_from_disk(name)
            if isinstance(loaded, datasets.DatasetDict):
                if split is None:
                    if len(loaded) != 1 and "train" not in loaded:
                        raise DataError(f"{spec}: name a split (hf:{name}:<split>); splits: {', '.join(loaded)}")
                    split = "train" if "train" in loaded else next(iter(loaded))
                if split not in loaded:
                    raise DataError(f"{spec}: no split {split!r}; splits: {', '.join(loaded)}")
                loaded = loaded[split]
            return loaded, name
        return datasets.load_dataset(name, split=split or "train"), name
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types (FileNotFound, DatasetNotFound, ...)
        raise DataError(f"{spec}: cannot load with datasets: {type(exc).__name__}: {exc}", reason="io") from exc


# ---------------------------------------------------------------------------------------
# BEIR


def _beir_split(folder: Path, split: str | None) -> Path:
    qrels_dir = folder / "qrels"
    found = sorted(p.stem for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if split is None:
        preferred = [s for s in ("train", "dev", "test") if s in found]
        if preferred:
            split = preferred[0]
        elif len(found) == 1:
            split = found[0]
        else:
            raise DataError(f"{qrels_dir}: name a split ({folder}:<split>); qrels files: {found or 'none'}")
    path = qrels_dir / f"{split}.tsv"
    if not path.is_file():
        raise DataError(f"{path}: no qrels for split {split!r}; present: {', '.join(found) or 'none'}", reason="io")
    return path


def _read_beir(
    folder: Path,
    split: str | None,
    *,
    group_size: int | None,
    guard: Callable,
    stats: ReadStats,
    instruction: str | None,
    seed: int,
    max_examples: int | None,
) -> list[Example]:
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: file not found (a BEIR folder has corpus.jsonl, queries.jsonl, qrels/)")
    qrels_path = _beir_split(folder, split)

    def id_field(rec: dict, loc: _Loc) -> str:
        value = rec.get("_id")
        if value is None:
            raise loc.error("_id", "missing", "missing_field")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise loc.error("_id", f"expected a string, got {_type_name(value)}", "wrong_type")
        return str(value)

    corpus: dict[str, str] = {}

    def corpus_doc(loc: _Loc, rec) -> None:
        if isinstance(rec, DataError):
            raise rec
        doc_id, text = id_field(rec, loc), _text(rec, "text", loc)
        title = rec.get("title") or ""
        if not isinstance(title, str):
            raise loc.error("title", f"expected a string, got {_type_name(title)}", "wrong_type")
        if doc_id in corpus:
            raise loc.error("_id", f"duplicate document id {doc_id!r}", "duplicate_id")
        corpus[doc_id] = f"{title} {text}" if title.strip() else text

    for loc, rec in _jsonl_records(folder / "corpus.jsonl", stats):
        guard(corpus_doc, loc, rec)

    queries: dict[str, tuple[str, _Loc]] = {}

    def query_rec(loc: _Loc, rec) -> None:
        if isinstance(rec, DataError):
            raise rec
        qid = id_field(rec, loc)
        if qid in queries:
            raise loc.error("_id", f"duplicate query id {qid!r}", "duplicate_id")
        # an empty query is only an error where it is judged (see below)
        text = rec.get("text")
        if not isinstance(text, str):
            raise loc.error("text", f"expected a string, got {_type_name(text)}", "wrong_type")
        queries[qid] = (text, loc)

    for loc, rec in _jsonl_records(folder / "queries.jsonl", stats):
        guard(query_rec, loc, rec)

    judged: dict[str, dict[str, float]] = {}
    first_line: dict[str, _Loc] = {}

    def qrels_row(loc: _Loc, line: str) -> None:
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) == 4:  # TREC layout: qid iter docid rel
            parts = [parts[0], parts[2], parts[3]]
        if len(parts) != 3:
            raise loc.error(
                None, f"expected 3 tab-separated fields (query-id, corpus-id, score), got {len(parts)}", "bad_row"
            )
        qid, doc_id, score_text = (p.strip() for p in parts)
        try:
            score = float(score_text)
        except ValueError:
            raise loc.error("score", f"expected a number, got {score_text!r}", "bad_label") from None
        if not math.isfinite(score):
            raise loc.error("score", f"expected a finite number, got {score_text!r}", "bad_label")
        if qid not in queries:
            raise loc.error("query-id", f"query {qid!r} is not in queries.jsonl", "unknown_id")
        if doc_id not in corpus:
            raise loc.error("corpus-id", f"document {doc_id!r} is not in corpus.jsonl", "unknown_id")
        judged.setdefault(qid, {})[doc_id] = score
        first_line.setdefault(qid, loc)

    with open(qrels_path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            if lineno == 1 and line.split()[-1].lower() in ("score", "relevance", "rel", "label"):
                continue  # header
            stats.records += 1
            guard(qrels_row, _Loc(str(qrels_path), lineno), line.rstrip("\n"))

    corpus_ids = list(corpus)
    examples: list[Example] = []

    def make_example(qid: str) -> Example:
        text, qloc = queries[qid]
        if not text.strip():
            raise qloc.error("text", "empty text (a judged query)", "empty_text")
        labels = judged[qid]
        relevant = sorted((d for d, s in labels.items() if s > 0), key=lambda d: -labels[d])
        if not relevant:
            loc = first_line[qid]
            raise loc.error("score", f"query {qid!r} has no judgement above 0", "no_positive")
        rng = random.Random(f"{seed}:{qid}")
        judged_neg = [d for d, s in labels.items() if s <= 0]
        need = group_size - 1 if group_size else max(len(relevant), len(judged_neg))
        negatives = rng.sample(judged_neg, need) if len(judged_neg) > need else list(judged_neg)
        # fill with random unjudged documents; the bound on tries covers tiny corpora
        unjudged = len(corpus_ids) - len(labels)
        taken = set(negatives)
        tries = 0
        while len(negatives) < need and len(taken) - len(judged_neg) < unjudged and tries < 100 * need:
            tries += 1
            doc_id = corpus_ids[rng.randrange(len(corpus_ids))]
            if doc_id not in labels and doc_id not in taken:
                taken.add(doc_id)
                negatives.append(doc_id)
        docs = relevant + negatives
        example = Example(
            text, [corpus[d] for d in docs], [labels.get(d, 0.0) for d in docs], None, instruction, qloc.source
        )
        if group_size:
            example = shape_group(example, group_size, rng, fields=("score", "corpus-id"), where=qloc.where)
        return example

    for qid in judged:
        if max_examples is not None and len(examples) >= max_examples:
            break
        example = guard(lambda _loc, q: make_example(q), first_line[qid], qid)
        if example is not None:
            examples.append(example)
    return examples


# ---------------------------------------------------------------------------------------
# The reader


def _split_folder_spec(spec: str) -> tuple[Path, str | None]:
    """``folder`` or ``folder:split`` for BEIR folders."""
    path = Path(spec)
    if not path.exists() and ":" in spec:
        head, split = spec.rsplit(":", 1)
        if Path(head).is_dir():
            return Path(head), split
    return path, None


def read_examples(
    spec: str | Path,
    *,
    format: str = "auto",
    group_size: int | None = None,
    skip_bad_records: bool = False,
    max_examples: int | None = None,
    instruction: str | None = None,
    seed: int = 0,
    split: str | None = None,
    binary_labels: bool = False,
) -> tuple[list[Example], ReadStats]:
    """Read training examples.

    Args:
        spec: a ``.jsonl`` / ``.json`` / ``.jsonl.gz`` or ``.parquet`` file; a BEIR folder
            (``folder`` or ``folder:split``; default split: train, else dev, else test, else
            the only qrels file); ``hf:json:<files>[:split]`` (also parquet, csv: datasets'
            file builders), ``hf:<save_to_disk folder>[:split]`` or ``hf:<hub name>[:split]``.
        format: auto | groups | pointwise | columns | beir. ``auto`` takes BEIR for a
            folder with corpus.jsonl and the record schema from the first record's keys
            (``pos`` -> groups, ``docs`` -> columns, ``document`` -> pointwise).
        group_size: None keeps every document; an int shapes each group to exactly that
            many documents (see :func:`shape_group`) and makes a group without a positive
            or a negative a bad record.
        skip_bad_records: count bad records in ``ReadStats.skipped`` instead of raising.
        max_examples: stop after this many examples.
        instruction: the instruction of records that carry none (``prompt`` / ``instruction``).
        seed: seeds negative sampling (per example, so a record's sample does not depend
            on which records precede it).
        split: the BEIR qrels split or the datasets split (overrides one given in ``spec``).
        binary_labels: a label outside {0, 1} is a bad record (stage 1's pairs).

    Returns:
        (examples, stats). Pointwise records are grouped by (query, instruction) in order
        of first appearance, documents in record order.

    Raises:
        DataError: a bad record (file, line/row, field named) unless skipped, or a spec
        that cannot be read.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if group_size is not None and group_size < 2:
        raise ValueError(f"group_size must be >= 2 (1 positive + negatives), got {group_size}")
    spec = str(spec)
    stats = ReadStats(source=spec)

    def guard(fn: Callable, loc: _Loc, *args):
        try:
            return fn(loc, *args)
        except DataError as exc:
            if not skip_bad_records:
                raise
            stats.count_skip(exc.reason)
            return None

    def finish(examples: list[Example]) -> tuple[list[Example], ReadStats]:
        if max_examples is not None:
            examples = examples[:max_examples]
        stats.examples = len(examples)
        return examples, stats

    if spec.startswith("hf:"):
        if format == "beir":
            raise DataError(f"{spec}: format=beir needs a BEIR folder, not a datasets name")
        dataset, name = _load_hf(spec, split)
        records: Iterable = _dataset_records(dataset, name, stats)
    else:
        path, spec_split = _split_folder_spec(spec)
        if path.is_dir():
            if _is_saved_dataset(path) and format != "beir":
                dataset, name = _load_hf(f"hf:{path}", split or spec_split)
                records = _dataset_records(dataset, name, stats)
            elif format in ("auto", "beir") and (path / "corpus.jsonl").is_file():
                examples = _read_beir(
                    path, split or spec_split, group_size=group_size, guard=guard, stats=stats,
                    instruction=instruction, seed=seed, max_examples=max_examples,
                )  # fmt: skip
                return finish(examples)
            else:
                raise DataError(f"{path}: a folder that is neither a BEIR folder (corpus.jsonl, queries.jsonl, qrels/) "
                                "nor a datasets save_to_disk folder")  # fmt: skip
        elif not path.exists():
            raise DataError(f"{path}: no such file or folder", reason="io")
        elif format == "beir":
            raise DataError(f"{path}: format=beir needs a folder (corpus.jsonl, queries.jsonl, qrels/)")
        elif path.name.endswith(_PARQUET_SUFFIXES):
            records = _parquet_records(path, stats)
        elif path.name.endswith(_JSONL_SUFFIXES):
            records = _jsonl_records(path, stats)
        else:
            raise DataError(f"{path}: unknown file type (expected {', '.join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)})")

    schema = None if format == "auto" else format
    examples: list[Example] = []
    pointwise: dict[tuple[str, str | None], tuple[Example, _Loc]] = {}

    def one(loc: _Loc, rec) -> None:
        nonlocal schema
        if isinstance(rec, DataError):
            raise rec
        if schema is None:
            schema = _detect_schema(rec, loc)
        if schema == "pointwise":
            query, document, label, instr = _parse_pointwise(rec, loc, instruction)
            if binary_labels and label not in (0, 1):
                raise loc.error("label", f"stage 1 needs binary labels 0/1, got {label!r}", "non_binary_label")
            entry = pointwise.get((query, instr))
            if entry is None:
                pointwise[(query, instr)] = (Example(query, [document], [label], None, instr, loc.source), loc)
            else:
                entry[0].docs.append(document)
                entry[0].labels.append(label)
            return
        example = _parse_group(rec, loc, instruction) if schema == "groups" else _parse_columns(rec, loc, instruction)
        if binary_labels and any(label not in (0, 1) for label in example.labels):
            bad = next(label for label in example.labels if label not in (0, 1))
            field_name = "pos_scores" if schema == "groups" else "labels"
            raise loc.error(field_name, f"stage 1 needs binary labels 0/1, got {bad!r}", "non_binary_label")
        if group_size:
            fields = ("pos", "neg") if schema == "groups" else ("labels", "labels")
            rng = random.Random(f"{seed}:{loc.seed_key}")
            example = shape_group(example, group_size, rng, fields=fields, where=loc.where)
        examples.append(example)

    for loc, rec in records:
        if schema != "pointwise" and max_examples is not None and len(examples) >= max_examples:
            break
        guard(one, loc, rec)

    def shape_pointwise(loc: _Loc, example: Example) -> Example:
        rng = random.Random(f"{seed}:{loc.seed_key}")
        return shape_group(example, group_size, rng, fields=("label", "label"), where=loc.where)

    if schema == "pointwise":
        for example, loc in pointwise.values():
            if group_size:
                example = guard(shape_pointwise, loc, example)
                if example is None:
                    continue
            examples.append(example)
    return finish(examples)


# ---------------------------------------------------------------------------------------
# Templates


@dataclass(frozen=True)
class PromptTemplate:
    """A relevance prompt, assembled from separately encoded pieces (no BOS):

    ``prefix + [instruction_format] + query_label + " " + query + document_label + " " + document + suffix``

    The label and its value are encoded apart, with the value's leading space kept in the
    value: for byte-level BPE (Qwen) a word boundary is a pre-token boundary, so the
    pieces decode to the exact template string and cutting the value never touches a label.
    """

    name: str
    prefix: str
    instruction_format: str
    query_label: str
    document_label: str
    suffix: str
    positive_token: str
    negative_token: str
    default_instruction: str | None = None

    def text(self, query: str, document: str, instruction: str | None = None) -> str:
        """The prompt as a string (what :meth:`build` decodes to without truncation)."""
        instruction = instruction or self.default_instruction
        head = self.instruction_format.format(instruction=instruction) if instruction else ""
        return f"{self.prefix}{head}{self.query_label} {query}{self.document_label} {document}{self.suffix}"

    def output_token_ids(self, tokenizer) -> tuple[int, int]:
        """(positive_id, negative_id) of the output set, e.g. ("1", "0") -> (16, 15) with Qwen2.

        Raises:
            ValueError: a token that the tokenizer does not encode as exactly one id.
        """
        ids = []
        for token in (self.positive_token, self.negative_token):
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise ValueError(
                    f"template {self.name!r}: output token {token!r} is {len(encoded)} tokens {encoded} "
                    f"with this tokenizer ({type(tokenizer).__name__}); it must be exactly one"
                )
            ids.append(int(encoded[0]))
        return ids[0], ids[1]

    def build(
        self,
        tokenizer,
        query: str,
        document: str,
        instruction: str | None = None,
        max_length: int = 512,
        min_query_tokens: int = 64,
    ) -> list[int]:
        """Token ids of one prompt, at most ``max_length`` long.

        Truncation cuts the document's end first; only if the prompt with an empty
        document is still too long is the query's end cut, never below
        ``min_query_tokens`` (a shorter query is kept whole).

        Raises:
            DataError: the template, the instruction and the query floor exceed max_length.
        """
        return self.build_group(tokenizer, query, [document], instruction, max_length, min_query_tokens)[0]

    def build_group(
        self,
        tokenizer,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        max_length: int = 512,
        min_query_tokens: int = 64,
        *,
        source: str | None = None,
        document_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[list[int]]:
        """:meth:`build` for one query and several documents ([len(documents)] lists of
        ids); ``document_ids`` skips encoding when the caller encoded ``" " + doc`` already."""
        head, middle, suffix = _fixed_pieces(self, tokenizer, instruction or self.default_instruction)
        query_ids = _encode_user(tokenizer, [" " + query], max_length)[0]
        fixed = len(head) + len(middle) + len(suffix)
        room_for_query = max_length - fixed
        if len(query_ids) > room_for_query:
            floor = min(len(query_ids), min_query_tokens)
            if floor > room_for_query:
                where = f"{source}: " if source else ""
                raise DataError(
                    f"{where}max_length={max_length} is too small for template {self.name!r}: {fixed} template "
                    f"tokens + {floor} query tokens (min_query_tokens={min_query_tokens}) do not fit",
                    source=source,
                    field="max_length",
                    reason="too_long",
                )
            query_ids = query_ids[:room_for_query]
        room = max_length - fixed - len(query_ids)
        if document_ids is None:
            document_ids = _encode_user(tokenizer, [" " + d for d in documents], max(room, 1))
        start = head + query_ids + middle
        return [start + list(ids[:room]) + suffix for ids in document_ids]


_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
PRORANK_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
QWEN3_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)

TEMPLATES: dict[str, PromptTemplate] = {
    # mxbai-rerank-v2 (DESIGN.md), output set "1" / "0"
    "prorank": PromptTemplate(
        name="prorank",
        prefix=f"<|im_start|>system\n{_QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n",
        instruction_format="instruction: {instruction}\n",
        query_label="query:",
        document_label="\ndocument:",
        suffix=f"\n{PRORANK_TASK}<|im_end|>\n<|im_start|>assistant\n",
        positive_token="1",
        negative_token="0",
    ),
    # Qwen3-Reranker's model card, output set "yes" / "no"; its default instruction
    "qwen3": PromptTemplate(
        name="qwen3",
        prefix=f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n",
        instruction_format="<Instruct>: {instruction}\n",
        query_label="<Query>:",
        document_label="\n<Document>:",
        suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        positive_token="yes",
        negative_token="no",
        default_instruction="Given a web search query, retrieve relevant passages that answer the query",
    ),
}


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    if isinstance(name, PromptTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None


# Encoded fixed pieces per tokenizer (weakly held) and (template, instruction).
_FIXED_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _encode_user(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """User text (query, document): a literal "<|im_end|>" in it stays text, never the
    control token, so a document cannot close the template's turn."""
    kwargs = {"add_special_tokens": False, "truncation": True, "max_length": max(max_length, 1)}
    try:
        out = tokenizer(texts, split_special_tokens=True, **kwargs)
    except TypeError:  # tokenizers without the option
        out = tokenizer(texts, **kwargs)
    return [list(ids) for ids in out["input_ids"]]


def _fixed_pieces(template: PromptTemplate, tokenizer, instruction: str | None):
    """(head, middle, suffix) ids: prefix + instruction + query label; document label; suffix."""
    try:
        cache = _FIXED_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    key = (template, instruction)
    if key not in cache:
        prefix, label_q, label_d, suffix = _encode(
            tokenizer, [template.prefix, template.query_label, template.document_label, template.suffix]
        )
        head = prefix
        if instruction:
            # the instruction is user text too, but the template owns its label
            formatted = template.instruction_format.format(instruction=instruction)
            head = head + _encode_user(tokenizer, [formatted], 1 << 30)[0]
        cache[key] = (head + label_q, label_d, suffix)
    return cache[key]


@dataclass
class TokenizedGroup:
    """One query's prompts: ``input_ids`` [num_docs][len_i] (each at most max_length),
    ``labels`` [num_docs], ``teacher_scores`` [num_docs] or None, ``source`` as in Example."""

    input_ids: list[list[int]]
    labels: list[float]
    teacher_scores: list[float] | None
    source: str


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    template: str | PromptTemplate,
    max_length: int,
    min_query_tokens: int,
    *,
    chunk: int = 1024,
) -> list[TokenizedGroup]:
    """Prompts for every (query, document) pair, documents encoded in batches of ``chunk``
    examples (one fast-tokenizer call each).

    Raises:
        DataError: a prompt that cannot fit max_length (names the example's source).
    """
    template = get_template(template)
    groups: list[TokenizedGroup] = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        flat = [" " + doc for ex in part for doc in ex.docs]
        # upper bound: a document never gets more than max_length tokens
        doc_ids = _encode_user(tokenizer, flat, max_length) if flat else []
        offset = 0
        for ex in part:
            ids = template.build_group(
                tokenizer, ex.query, ex.docs, ex.instruction, max_length, min_query_tokens,
                source=ex.source, document_ids=doc_ids[offset : offset + len(ex.docs)],
            )  # fmt: skip
            offset += len(ex.docs)
            teacher = list(ex.teacher_scores) if ex.teacher_scores is not None else None
            groups.append(TokenizedGroup(ids, list(ex.labels), teacher, ex.source))
    return groups
