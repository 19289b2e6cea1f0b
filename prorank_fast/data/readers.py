"""Training data: readers that turn a data spec into Examples (one query with its documents).

- JSONL (``.jsonl``, ``.json``, ``.jsonl.gz``) and Parquet files whose records are
  * groups (FlagEmbedding): ``{query, pos: [...], neg: [...], pos_scores?, neg_scores?, prompt?}``
  * pointwise: ``{query, document, label}``; records of one query become one Example
  * columns (sentence-transformers style): ``{query, docs: [...], labels: [...]}`` or ``{query, docs, scores}``
- BEIR folders (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), optionally ``folder:split``
- ``hf:...`` specs read with the ``datasets`` library (see :func:`read_examples`).

Every record is validated; a bad one raises :class:`DataError` naming the file, the line
(1-based, text files) or row (0-based, tables) and the field, or is skipped and counted in
:class:`ReadStats` with ``skip_bad_records=True``."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import DataError
from .records import (
    Example,
    Loc,
    ReadStats,
    dataset_records,
    instruction_field,
    is_saved_dataset,
    jsonl_records,
    load_hf,
    number_field,
    numbers_field,
    parquet_records,
    text_field,
    texts_field,
    type_name,
)

FORMATS = ("auto", "groups", "pointwise", "columns", "beir")


_JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")


_PARQUET_SUFFIXES = (".parquet", ".pq")


def _parse_group(rec: dict, loc: Loc, instruction: str | None) -> Example:
    query = text_field(rec, "query", loc)
    pos = texts_field(rec, "pos", loc)
    if not pos:
        raise loc.error("pos", "no positive documents", "no_positive")
    neg = texts_field(rec, "neg", loc, optional=True) or []
    pos_scores = numbers_field(rec, "pos_scores", loc, optional=True)
    neg_scores = numbers_field(rec, "neg_scores", loc, optional=True)
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
    return Example(query, pos + neg, labels, teacher, instruction_field(rec, loc, instruction), loc.source)


def _parse_columns(rec: dict, loc: Loc, instruction: str | None) -> Example:
    query = text_field(rec, "query", loc)
    docs = texts_field(rec, "docs", loc)
    if not docs:
        raise loc.error("docs", "no documents", "missing_field")
    labels = numbers_field(rec, "labels", loc, optional=True)
    scores = numbers_field(rec, "scores", loc, optional=True)
    if labels is None and scores is None:
        raise loc.error("labels", "missing (a columns record needs labels or scores)", "missing_field")
    for name, values in (("labels", labels), ("scores", scores)):
        if values is not None and len(values) != len(docs):
            raise loc.error(name, f"{len(values)} values for {len(docs)} docs", "length_mismatch")
    # sentence-transformers treats a `scores` column as the label column; it doubles as
    # teacher scores for listwise distillation
    return Example(
        query, docs, labels if labels is not None else list(scores), scores, instruction_field(rec, loc, instruction),
        loc.source,
    )  # fmt: skip


def _parse_pointwise(rec: dict, loc: Loc, instruction: str | None) -> tuple[str, str, float, str | None]:
    query = text_field(rec, "query", loc)
    document = text_field(rec, "document", loc)
    if "label" not in rec or rec["label"] is None:
        raise loc.error("label", "missing", "missing_field")
    label = number_field(rec["label"], "label", loc)
    return query, document, label, instruction_field(rec, loc, instruction)


def _detect_schema(rec: dict, loc: Loc) -> str:
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

    def id_field(rec: dict, loc: Loc) -> str:
        value = rec.get("_id")
        if value is None:
            raise loc.error("_id", "missing", "missing_field")
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise loc.error("_id", f"expected a string, got {type_name(value)}", "wrong_type")
        return str(value)

    corpus: dict[str, str] = {}

    def corpus_doc(loc: Loc, rec) -> None:
        if isinstance(rec, DataError):
            raise rec
        doc_id, text = id_field(rec, loc), text_field(rec, "text", loc)
        title = rec.get("title") or ""
        if not isinstance(title, str):
            raise loc.error("title", f"expected a string, got {type_name(title)}", "wrong_type")
        if doc_id in corpus:
            raise loc.error("_id", f"duplicate document id {doc_id!r}", "duplicate_id")
        corpus[doc_id] = f"{title} {text}" if title.strip() else text

    for loc, rec in jsonl_records(folder / "corpus.jsonl", stats):
        guard(corpus_doc, loc, rec)

    queries: dict[str, tuple[str, Loc]] = {}

    def query_rec(loc: Loc, rec) -> None:
        if isinstance(rec, DataError):
            raise rec
        qid = id_field(rec, loc)
        if qid in queries:
            raise loc.error("_id", f"duplicate query id {qid!r}", "duplicate_id")
        # an empty query is only an error where it is judged (see below)
        text = rec.get("text")
        if not isinstance(text, str):
            raise loc.error("text", f"expected a string, got {type_name(text)}", "wrong_type")
        queries[qid] = (text, loc)

    for loc, rec in jsonl_records(folder / "queries.jsonl", stats):
        guard(query_rec, loc, rec)

    judged: dict[str, dict[str, float]] = {}
    first_line: dict[str, Loc] = {}

    def qrels_row(loc: Loc, line: str) -> None:
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
            guard(qrels_row, Loc(str(qrels_path), lineno), line.rstrip("\n"))

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

    def guard(fn: Callable, loc: Loc, *args):
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
        dataset, name = load_hf(spec, split)
        records: Iterable = dataset_records(dataset, name, stats)
    else:
        path, spec_split = _split_folder_spec(spec)
        if path.is_dir():
            if is_saved_dataset(path) and format != "beir":
                dataset, name = load_hf(f"hf:{path}", split or spec_split)
                records = dataset_records(dataset, name, stats)
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
            records = parquet_records(path, stats)
        elif path.name.endswith(_JSONL_SUFFIXES):
            records = jsonl_records(path, stats)
        else:
            raise DataError(f"{path}: unknown file type (expected {', '.join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)})")

    schema = None if format == "auto" else format
    examples: list[Example] = []
    pointwise: dict[tuple[str, str | None], tuple[Example, Loc]] = {}

    def one(loc: Loc, rec) -> None:
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

    def shape_pointwise(loc: Loc, example: Example) -> Example:
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
