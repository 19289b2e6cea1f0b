"""BEIR collections, each split by query id into training and held-out queries (`data.held_out`;
`data.train` one folder or a list): stage-2 groups and stage-1 pairs come from the training
queries' judgements (those within BM25's top `data.positives_depth`, when set) with negatives mined
from BM25's top `data.negatives_depth` (minus the judged relevant) within the same collection;
evaluation reranks BM25's top `data.eval_first_stage_k` of the held-out queries only, collection by
collection. No query is on both sides."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..config import Recipe
from ..data import BeirData, Example, load_beir
from ..data.readers import split_folder_spec
from ..data.splits import check_disjoint, mine_groups, mine_pairs, split_query_ids
from ..errors import RecipeError
from ..evaluation import bm25_first_stage


@dataclass
class SplitCollection:
    """What a split collection gives the stages."""

    name: str  # the folder's name (unique among data.train's): how tables and files name it
    collection: BeirData
    train_ids: list[str]
    held_out_ids: list[str]
    groups: list[Example]  # stage 2, training queries
    pairs: list[Example]  # stage 1, training queries (label-balanced)
    held_out_pairs: list[Example]  # stage 1 evaluation, held-out queries (label-balanced)
    eval_data: BeirData  # the held-out queries
    eval_run: dict  # BM25's top eval_first_stage_k of the held-out queries
    skipped: dict


def same_collection(a: str | None, b: str | None) -> bool:
    """Whether two data specs name the same folder (the same collection read twice)."""
    if not a or not b or a == "demo" or b == "demo":
        return False
    pa, pb = split_folder_spec(a)[0], split_folder_spec(b)[0]
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def train_specs(cfg: Recipe) -> list[str]:
    """data.train as a list (one spec, or the collections a split trains on)."""
    return [cfg.data.train] if isinstance(cfg.data.train, str) else list(cfg.data.train)


def split_collections(cfg: Recipe) -> list[SplitCollection]:
    """split_collection of every folder in data.train, named by the folder (with its position where two
    folders share a name)."""
    specs = train_specs(cfg)
    if len(specs) > 1 and cfg.data.eval is not None:
        raise RecipeError(
            f"data.train lists {len(specs)} collections, each split by data.held_out: data.eval must be null, "
            f"got {cfg.data.eval!r}"
        )
    names = [split_folder_spec(spec)[0].name or "collection" for spec in specs]
    names = [n if names.count(n) == 1 else f"{n}{i}" for i, n in enumerate(names)]
    return [split_collection(cfg, spec, name) for spec, name in zip(specs, names, strict=True)]


def split_collection(cfg: Recipe, spec: str | None = None, name: str | None = None) -> SplitCollection:
    """Split one BEIR folder (`folder[:split]`; default data.train) by data.held_out and mine its
    examples within it."""
    d = cfg.data
    spec = spec if spec is not None else train_specs(cfg)[0]
    path, qrels_split = split_folder_spec(spec)
    folder = str(path)
    if d.eval is not None and not same_collection(d.eval, spec):
        raise RecipeError(
            f"data.held_out={d.held_out} splits data.train={spec!r} into training and held-out queries: "
            f"data.eval must be null or the same folder, got {d.eval!r}"
        )
    if not Path(folder).is_dir():
        raise RecipeError(f"data.held_out needs data.train to be a BEIR folder, got {spec!r}")
    collection = load_beir(folder, split=qrels_split or "test")
    train_ids, held_out_ids = split_query_ids(list(collection.queries), d.held_out, d.split_seed, source=folder)
    check_disjoint(train_ids, held_out_ids, train_source=f"{folder} (training)", held_out_source=f"{folder} (held out)")
    run = bm25_first_stage(collection, k=max(d.negatives_depth, d.eval_first_stage_k, d.positives_depth or 0))
    mining = dict(depth=d.negatives_depth, positives_depth=d.positives_depth, seed=cfg.train.seed, source=folder)
    groups, skipped = mine_groups(collection, train_ids, run, group_size=d.group_size, **mining)
    pairs, skipped_pairs = mine_pairs(collection, train_ids, run, **mining)
    held_out_pairs, _ = mine_pairs(collection, held_out_ids, run, **mining)
    if not groups:
        raise RecipeError(f"{folder}: the {len(train_ids)} training queries gave no training group (data.held_out)")
    eval_run = {q: dict(list(run[q].items())[: d.eval_first_stage_k]) for q in held_out_ids}
    skipped = {**{f"groups_{k}": v for k, v in skipped.items()}, **{f"pairs_{k}": v for k, v in skipped_pairs.items()}}
    return SplitCollection(
        name or path.name, collection, train_ids, held_out_ids, groups, pairs, held_out_pairs,
        collection.subset(held_out_ids), eval_run, skipped,
    )  # fmt: skip


def balanced_subset(prompts: list, n: int, seed: int) -> list:
    """At most n prompts, half of each label where both exist, drawn with a seeded RNG (kept in
    their original order): a held-out accuracy over them is over balanced pairs."""
    if len(prompts) <= n:
        return prompts
    rng = random.Random(f"balanced:{seed}")
    by_label = {label: [i for i, p in enumerate(prompts) if p.label == label] for label in (0, 1)}
    half = n // 2
    take = {label: min(len(ids), half) for label, ids in by_label.items()}
    spare = n - sum(take.values())
    for label in (1, 0):  # a short side's share goes to the other
        extra = min(spare, len(by_label[label]) - take[label])
        take[label] += extra
        spare -= extra
    chosen = sorted(i for label, ids in by_label.items() for i in rng.sample(ids, take[label]))
    return [prompts[i] for i in chosen]
