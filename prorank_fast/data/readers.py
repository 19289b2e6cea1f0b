"""Training data: readers that turn a data spec into Examples (one query with its documents).

- JSONL (``.jsonl``, ``.json``, ``.jsonl.gz``) and Parquet files whose records are
  * groups (FlagEmbedding): ``{query, pos: [...], neg: [...], pos_scores?, neg_scores?, prompt?}``
  * pointwise: ``{query, document, label}``; records of one query become one Example
  * columns (sentence-transformers style): ``{query, docs: [...], labels: [...]}`` or ``{query, docs, scores}``
- BEIR folders (``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``), optionally ``folder:split``,
  read by the one BEIR loader (data.beir: the rules evaluation uses) and turned into Examples here
- ``hf:...`` specs read with the ``datasets`` library (see :func:`read_examples`).

Every record is validated; a bad one raises :class:`DataError` naming the file, the line
(1-based, text files) or row (0-based, tables) and the field, or is skipped and counted in
:class:`ReadStats` with ``skip_bad_records=True``."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import DataError
from .beir import read_beir_folder
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


# The BEIR loader's counters (BeirData.skipped) go to ReadStats.skipped as they are, except
# these: "query_without_relevant_doc" is a query evaluation keeps (it scores 0) but that
# cannot make a training example, a bad record of its own (counted as no_positive).
_BEIR_COUNTERS_NOT_SKIPS = ("query_without_relevant_doc",)


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
    binary_labels: bool,
) -> list[Example]:
    """Examples from a BEIR folder read by the one BEIR loader (data.beir), with its rules
    and its cleaning; what is training's own is here: the default split (train, else dev,
    else test, else the only qrels file), one example per judged query with its relevant
    documents by label and its negatives (judged non-relevant first, then unjudged ones)
    sampled with ``random.Random(f"{seed}:{qid}")``, empty documents never used, and the
    checks of a training example (a positive, a negative, binary labels for stage 1).

    skip_bad_records (``guard``): a problem of one query (no judgement above 0, no
    negative, a label outside {0, 1} with ``binary_labels``) is a bad record, skipped and
    counted; what the loader drops by its own rules (judgements of absent documents,
    repeated rows, ...) is dropped whatever skip_bad_records says and counted in
    ``stats.skipped`` under the loader's names; what the loader rejects (a malformed line,
    an id with whitespace, a judged query without text, ...) stays an error.
    """
    read = read_beir_folder(folder, split)
    data = read.data
    stats.records += read.records
    for reason, count in data.skipped.items():
        if reason not in _BEIR_COUNTERS_NOT_SKIPS:
            stats.skipped[reason] = stats.skipped.get(reason, 0) + count

    # an empty document (kept by the loader: it never matches in evaluation) is neither a
    # positive nor a negative here; the loader has counted it (empty_document)
    corpus_ids = [d for d, text in data.corpus.items() if text]
    examples: list[Example] = []

    def make_example(loc: Loc, qid: str) -> Example:
        labels = {d: float(r) for d, r in data.qrels[qid].items() if data.corpus[d]}
        qloc = read.query_locs[qid]
        if binary_labels:
            for d, label in labels.items():
                if label not in (0, 1):
                    line = read.qrels_lines[qid, d]
                    raise line.error("score", f"stage 1 needs binary labels 0/1, got {int(label)}", "non_binary_label")
        relevant = sorted((d for d, s in labels.items() if s > 0), key=lambda d: -labels[d])
        if not relevant:
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
            data.queries[qid], [data.corpus[d] for d in docs], [labels.get(d, 0.0) for d in docs], None, instruction,
            qloc.source,
        )  # fmt: skip
        if group_size:
            example = shape_group(example, group_size, rng, fields=("score", "corpus-id"), where=qloc.where)
        return example

    for qid in data.qrels:
        if max_examples is not None and len(examples) >= max_examples:
            break
        example = guard(make_example, read.first_qrels_loc(qid), qid)
        if example is not None:
            examples.append(example)
    return examples


def split_folder_spec(spec: str) -> tuple[Path, str | None]:
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
            A BEIR folder is read by the one BEIR loader (:func:`~.beir.load_beir`, its
            rules): what it drops (judgements of absent documents, repeated rows, ...) is
            dropped and counted in ``ReadStats.skipped`` either way, what it rejects (a
            malformed line, an id with whitespace, ...) stays an error; skipped here are a
            query's own problems (no positive, no negative, a non-binary label).
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
        path, spec_split = split_folder_spec(spec)
        if path.is_dir():
            if is_saved_dataset(path) and format != "beir":
                dataset, name = load_hf(f"hf:{path}", split or spec_split)
                records = dataset_records(dataset, name, stats)
            elif format in ("auto", "beir") and (path / "corpus.jsonl").is_file():
                examples = _read_beir(
                    path, split or spec_split, group_size=group_size, guard=guard, stats=stats,
                    instruction=instruction, seed=seed, max_examples=max_examples, binary_labels=binary_labels,
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
