"""Records: where each came from (file and line, or table and row), its fields checked by
name, and the sources that yield them (JSONL, Parquet, `datasets`). The one JSONL reader."""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError

# datasets' packaged builders that take data_files: hf:json:/path/file.jsonl[:split]
_HF_FILE_BUILDERS = ("json", "parquet", "csv", "arrow", "text")


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
        skipped: reason -> count of bad records skipped (``skip_bad_records=True``); for
            a BEIR folder also what the BEIR loader dropped by its own rules (its
            ``BeirData.skipped`` names, e.g. ``qrels_doc_not_in_corpus``), skipped or not.
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
class Loc:
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


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _present(rec: dict, key: str, loc: Loc, optional: bool) -> Any:
    """``rec[key]``, or None when it is absent or null and optional; else a missing-field error."""
    value = rec.get(key)
    if value is None and not optional:
        raise loc.error(key, "missing", "missing_field")
    return value


def text_field(rec: dict, key: str, loc: Loc, *, optional: bool = False) -> str | None:
    value = _present(rec, key, loc, optional)
    if value is None:
        return None
    if not isinstance(value, str):
        raise loc.error(key, f"expected a string, got {type_name(value)}", "wrong_type")
    if not value.strip():
        raise loc.error(key, "empty text", "empty_text")
    return value


def texts_field(rec: dict, key: str, loc: Loc, *, optional: bool = False) -> list[str] | None:
    value = _present(rec, key, loc, optional)
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise loc.error(key, f"expected a list of strings, got {type_name(value)}", "wrong_type")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise loc.error(f"{key}[{i}]", f"expected a string, got {type_name(item)}", "wrong_type")
        if not item.strip():
            raise loc.error(f"{key}[{i}]", "empty text", "empty_text")
    return list(value)


def number_field(value: Any, key: str, loc: Loc) -> float:
    # bool is accepted (binary labels in `datasets` tables are often bool columns)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float):
        raise loc.error(key, f"expected a number, got {type_name(value)} {value!r}", "bad_label")
    value = float(value)
    if not math.isfinite(value):
        raise loc.error(key, f"expected a finite number, got {value}", "bad_label")
    return value


def numbers_field(rec: dict, key: str, loc: Loc, *, optional: bool = False) -> list[float] | None:
    value = _present(rec, key, loc, optional)
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        raise loc.error(key, f"expected a list of numbers, got {type_name(value)}", "bad_label")
    return [number_field(v, f"{key}[{i}]", loc) for i, v in enumerate(value)]


def instruction_field(rec: dict, loc: Loc, default: str | None) -> str | None:
    """A record's own instruction (`prompt`, FlagEmbedding's name, or `instruction`) wins
    over the reader's default; an empty one means none."""
    for key in ("prompt", "instruction"):
        value = rec.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise loc.error(key, f"expected a string, got {type_name(value)}", "wrong_type")
        if value.strip():
            return value
    return default


def jsonl_records(path: Path, stats: ReadStats) -> Iterator[tuple[Loc, dict | DataError]]:
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
            loc = Loc(str(path), lineno)
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield loc, loc.error(None, f"invalid JSON: {exc.msg} (column {exc.colno})", "invalid_json")
                continue
            if not isinstance(rec, dict):
                yield loc, loc.error(None, f"expected a JSON object, got {type_name(rec)}", "not_an_object")
                continue
            yield loc, rec


def parquet_records(path: Path, stats: ReadStats) -> Iterator[tuple[Loc, dict]]:
    import pyarrow.parquet as pq

    try:
        table_file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise DataError(f"{path}: not a readable Parquet file: {exc}", reason="io") from exc
    row = 0
    for batch in table_file.iter_batches(batch_size=1024):
        for rec in batch.to_pylist():
            stats.records += 1
            yield Loc(str(path), row, "row"), rec
            row += 1


def dataset_records(dataset, name: str, stats: ReadStats) -> Iterator[tuple[Loc, dict]]:
    for row, rec in enumerate(dataset):
        stats.records += 1
        yield Loc(name, row, "row"), rec


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json"))


def load_hf(spec: str, split: str | None = None):
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
        if is_saved_dataset(Path(name)):
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


def iter_jsonl(path: str | Path) -> Iterator[tuple[Loc, dict]]:
    """(loc, record) per non-blank line of a JSONL file (``.gz`` too); the first line that is
    not a JSON object raises DataError naming the file and line."""
    for loc, rec in jsonl_records(Path(path), ReadStats(str(path))):
        if isinstance(rec, DataError):
            raise rec
        yield loc, rec
