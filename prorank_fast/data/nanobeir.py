"""BEIR collections in NanoBEIR's `datasets` layout (subsets corpus, queries, qrels), read
with the same id checks, cleaning and messages as a BEIR folder (data.beir), and
load_collection: either kind from one spec."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import BeirFormatError
from .beir import BeirData, Qrels, add_judgement, clean_collection, id_value, is_int, load_beir, text_value
from .records import Loc

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

    Same rules, cleaning and counters as :func:`load_beir` (a null text cell reads as an
    empty text; a score may be a float column holding integers); errors (BeirFormatError)
    name the dataset, the subset, the split, the row (0-based, as `datasets` indexes rows)
    and the field: ``"<name> [qrels, split 'train']: row 4: field 'corpus-id': ..."``.
    """
    local = Path(name).expanduser()
    if not local.is_dir() and name.startswith((".", "/", "~")):
        raise BeirFormatError(
            f"{name}: no such folder (a `datasets` collection: corpus/, queries/, qrels/)", reason="io"
        )
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
    first_row: dict[tuple[str, str], Loc] = {}
    qrels_locs: dict[str, Loc] = {}
    repeated = 0
    for i, (raw_q, raw_d) in enumerate(zip(cols["query-id"], cols["corpus-id"], strict=True)):
        loc = Loc(where["qrels"], i, "row")
        qid = id_value(raw_q, loc, "query-id")
        did = id_value(raw_d, loc, "corpus-id")
        rel = 1 if scores is None else _hf_int(scores[i], loc, "score")
        if add_judgement(qrels, first_row, qid, did, rel, loc):
            repeated += 1
            continue
        qrels_locs.setdefault(qid, loc)
    if not qrels:
        raise BeirFormatError(f"{where['qrels']}: no judgements", reason="io")
    if repeated:
        skipped["qrels_repeated_row"] = repeated
        warnings.append(f"{where['qrels']}: {repeated} repeated identical rows ignored")

    cols = _hf_columns(tables["queries"][0], where["queries"], ("_id", "text"), ())
    queries: dict[str, str] = {}
    query_locs: dict[str, Loc] = {}
    rows: dict[str, int] = {}
    empty_other = 0
    for i, (raw_id, raw_text) in enumerate(zip(cols["_id"], cols["text"], strict=True)):
        loc = Loc(where["queries"], i, "row")
        qid = id_value(raw_id, loc, "_id")
        if qid in rows:
            raise loc.error("_id", f"duplicate query id {qid!r} (first at row {rows[qid]})", "duplicate_id")
        rows[qid] = i
        text = text_value(raw_text, loc, "text", default="")
        if qid not in qrels:
            empty_other += not text.strip()
            continue  # another split's query
        queries[qid] = text
        query_locs[qid] = loc
    if empty_other:
        skipped["empty_query_outside_split"] = empty_other
        warnings.append(f"{where['queries']}: {empty_other} empty queries without judgements ignored")

    cols = _hf_columns(tables["corpus"][0], where["corpus"], ("_id", "text"), ("title",))
    titles = cols.get("title")
    corpus: dict[str, str] = {}
    rows = {}
    for i, (raw_id, raw_text) in enumerate(zip(cols["_id"], cols["text"], strict=True)):
        loc = Loc(where["corpus"], i, "row")
        did = id_value(raw_id, loc, "_id")
        if did in rows:
            raise loc.error("_id", f"duplicate document id {did!r} (first at row {rows[did]})", "duplicate_id")
        rows[did] = i
        text = text_value(raw_text, loc, "text", default="").strip()
        title = "" if titles is None else text_value(titles[i], loc, "title", default="").strip()
        corpus[did] = f"{title} {text}" if title and text else (title or text)

    return clean_collection(
        corpus,
        queries,
        qrels,
        source=f"hf:{name}",
        qrels_name=where["qrels"],
        queries_name=where["queries"],
        query_locs=query_locs,
        qrels_locs=qrels_locs,
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
        raise BeirFormatError(
            f"{where}: field {missing[0]!r}: missing (columns: {', '.join(names)})",
            field=missing[0],
            reason="missing_field",
        )
    return {c: list(ds[c]) for c in (*required, *optional) if c in names}


def _hf_int(value: Any, loc: Loc, name: str) -> int:
    """A score from a typed column: an int, a float with an integer value (a float column),
    or a string of an integer."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and is_int(value):
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise loc.error(name, f"{value!r} is not an integer", "bad_label")
    return value
