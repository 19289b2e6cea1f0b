"""Before any training: tokenizer, template, model, tokenized training groups, held-out
data with its BM25 first stage, stage-1 prompts. Bad input fails here, before a model is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import data as data_mod
from ..config import Recipe
from ..errors import DataError
from ..evaluation import bm25_first_stage, evaluate_run, load_beir
from ..grpo import stage1_prompts
from ..modeling import load_model, load_tokenizer
from .collection import balanced_subset, same_collection, split_collections, train_specs


@dataclass
class HeldOutSet:
    """One collection's held-out queries: what the model reranks (BM25's top k) and BM25's figures."""

    name: str
    data: object  # BeirData
    bm25_run: dict
    bm25_metrics: dict


@dataclass
class Prepared:
    tokenizer: object
    template: object
    output_ids: tuple[int, ...]
    model: torch.nn.Module
    groups: list
    read_stats: object
    held_out: list[HeldOutSet] = field(default_factory=list)  # one per collection; [] skips nDCG
    paths: dict = field(default_factory=dict)
    stage1_prompts: list = field(default_factory=list)  # grpo.Stage1Prompt, training
    stage1_eval_prompts: list = field(default_factory=list)  # held-out, for accuracy before/after
    token_weights: tuple[float, ...] = (1.0, -1.0)  # stage2.token_weights, or the template's
    split: dict = field(default_factory=dict)  # data.held_out: the split's sizes (summary.json)


def _demo_paths(cfg: Recipe, out: Path, d) -> dict:
    """The generated demo collection lives in OUTPUT_DIR/demo (made once, by rank 0)."""
    from ..data.demo import make_demo

    target = out / "demo"
    if d.main and not (target / "stage1_train.jsonl").exists():
        make_demo(target, num_queries=cfg.data.demo_queries, docs_per_topic=cfg.data.demo_docs_per_topic,
                  seed=cfg.data.demo_seed)  # fmt: skip
    d.barrier()
    return {
        "train": str(target / "train.jsonl"),
        "eval": str(target / "eval"),
        "stage1_train": str(target / "stage1_train.jsonl"),
        "stage1_eval": str(target / "stage1_eval.jsonl"),
    }


def _tokenizer(cfg: Recipe, out: Path, train_specs: list[str], d):
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    if cfg.model.name_or_path:
        return load_tokenizer(cfg.model.name_or_path)
    # a tiny model from scratch: a small tokenizer trained on the training text, saved once
    from ..data.demo import train_demo_tokenizer

    tok_dir = out / "tokenizer"
    if d.main and not (tok_dir / "tokenizer.json").exists():
        texts = []
        for spec in train_specs:
            examples, _ = data_mod.read_examples(
                spec, format=cfg.data.format, skip_bad_records=cfg.data.skip_bad_records
            )
            texts += [ex.query for ex in examples] + [doc for ex in examples for doc in ex.docs]
        train_demo_tokenizer(texts, vocab_size=cfg.model.tokenizer_vocab_size, out_dir=tok_dir)
    d.barrier()
    return load_tokenizer(str(tok_dir))


def prepare(cfg: Recipe, out: Path, d) -> Prepared:
    if cfg.data.held_out is not None:
        return _prepare_split(cfg, out, d)
    if same_collection(cfg.data.train, cfg.data.eval):
        raise DataError(
            f"data.train and data.eval are the same collection ({cfg.data.eval}): every evaluation query would "
            "also be a training query; set data.held_out to split it by query id"
        )
    paths = {"train": cfg.data.train, "eval": cfg.data.eval}
    if cfg.stage1.enabled:
        paths["stage1_train"] = cfg.stage1.train or cfg.data.train
        paths["stage1_eval"] = cfg.stage1.eval
    if "demo" in paths.values():
        demo = _demo_paths(cfg, out, d)
        paths = {k: (demo[k] if v == "demo" else v) for k, v in paths.items()}
    tokenizer, template, output_ids = _tokenizer_and_template(cfg, out, [paths["train"]], d)
    group_size = cfg.data.group_size if cfg.stage2.loss in ("listwise", "distill") else None
    examples, stats = data_mod.read_examples(
        paths["train"], format=cfg.data.format, group_size=group_size, skip_bad_records=cfg.data.skip_bad_records,
        max_examples=cfg.data.max_examples, instruction=cfg.data.instruction, seed=cfg.train.seed,
    )  # fmt: skip
    _check_stage2_labels(cfg, examples, paths["train"])
    groups = data_mod.tokenize_examples(examples, tokenizer, template, cfg.data.max_length, cfg.data.min_query_tokens)
    stage1_train, stage1_eval = [], []
    if cfg.stage1.enabled:  # read and checked before any model is built: bad input fails first
        stage1_train = _stage1_prompts(cfg, paths["stage1_train"], tokenizer, template)
        if paths.get("stage1_eval"):
            stage1_eval = _stage1_prompts(cfg, paths["stage1_eval"], tokenizer, template)
            stage1_eval = balanced_subset(stage1_eval, cfg.stage1.max_eval_pairs, cfg.train.seed)
    model = _seeded_model(cfg, tokenizer, d)
    prep = Prepared(tokenizer, template, output_ids, model, groups, stats, paths=paths)
    prep.stage1_prompts, prep.stage1_eval_prompts = stage1_train, stage1_eval
    prep.token_weights = tuple(cfg.stage2.token_weights or template.token_weights)
    if paths["eval"]:
        eval_data = load_beir(paths["eval"])
        bm25_run = bm25_first_stage(eval_data, k=cfg.data.eval_first_stage_k)
        name = Path(paths["eval"]).name or "eval"
        prep.held_out = [HeldOutSet(name, eval_data, bm25_run, evaluate_run(bm25_run, eval_data.qrels))]
    return prep


def _tokenizer_and_template(cfg: Recipe, out: Path, train_specs: list[str], d):
    tokenizer = _tokenizer(cfg, out, train_specs, d)
    template = data_mod.get_template(cfg.data.template)
    # the template's chat tokens and output tokens, checked before any model is loaded
    output_ids = template.check_tokenizer(tokenizer, cfg.model.tokenizer or cfg.model.name_or_path or "demo tokenizer")
    return tokenizer, template, output_ids


def _check_stage2_labels(cfg: Recipe, examples, source: str) -> None:
    if cfg.stage2.loss == "distill" and any(ex.teacher_scores is None for ex in examples):
        raise DataError(f"{source}: stage2.loss=distill needs teacher scores (pos_scores/neg_scores)")
    if cfg.stage2.loss in ("bce", "mse"):
        _labels_to_unit_interval(examples, source)


def _prepare_split(cfg: Recipe, out: Path, d) -> Prepared:
    """prepare() for data.held_out: each collection of data.train split by query id
    (stages/collection.py); training examples of all of them together (the step plan shuffles
    them, so steps interleave collections), held-out sets one per collection."""
    splits = split_collections(cfg)
    sources = ", ".join(f"{s.name} ({len(s.train_ids)} training queries)" for s in splits)
    examples = [ex for s in splits for ex in s.groups]
    tokenizer, template, output_ids = _tokenizer_and_template(cfg, out, train_specs(cfg), d)
    _check_stage2_labels(cfg, examples, sources)
    dc = cfg.data
    groups = data_mod.tokenize_examples(examples, tokenizer, template, dc.max_length, dc.min_query_tokens)
    skipped = {f"{s.name}:{k}" if len(splits) > 1 else k: v for s in splits for k, v in s.skipped.items()}
    stats = data_mod.ReadStats(sources, len(examples), len(examples), skipped)
    stage1_train, stage1_eval = [], []
    if cfg.stage1.enabled:
        build = dict(max_length=dc.max_length, min_query_tokens=dc.min_query_tokens, instruction=dc.instruction)
        held_out_pairs = [ex for s in splits for ex in s.held_out_pairs]
        if cfg.stage1.train is None:
            stage1_train = stage1_prompts([ex for s in splits for ex in s.pairs], tokenizer, template, **build)
        else:
            stage1_train = _stage1_prompts(cfg, cfg.stage1.train, tokenizer, template)
        if cfg.stage1.eval is None and held_out_pairs:
            stage1_eval = stage1_prompts(held_out_pairs, tokenizer, template, **build)
        elif cfg.stage1.eval is not None:
            stage1_eval = _stage1_prompts(cfg, cfg.stage1.eval, tokenizer, template)
        stage1_eval = balanced_subset(stage1_eval, cfg.stage1.max_eval_pairs, cfg.train.seed)
    model = _seeded_model(cfg, tokenizer, d)
    held_out = sum(len(s.held_out_ids) for s in splits)
    paths = {"train": sources, "eval": f"{', '.join(s.name for s in splits)} ({held_out} held-out queries)"}
    prep = Prepared(tokenizer, template, output_ids, model, groups, stats, paths=paths)
    prep.stage1_prompts, prep.stage1_eval_prompts = stage1_train, stage1_eval
    prep.token_weights = tuple(cfg.stage2.token_weights or template.token_weights)
    prep.held_out = [
        HeldOutSet(s.name, s.eval_data, s.eval_run, evaluate_run(s.eval_run, s.eval_data.qrels)) for s in splits
    ]
    prep.split = {"train_queries": sum(len(s.train_ids) for s in splits), "held_out_queries": held_out,
                  "training_groups": len(groups), "stage1_pairs": len(stage1_train),
                  "stage1_eval_pairs": len(stage1_eval)}  # fmt: skip
    if len(splits) > 1:
        prep.split["collections"] = {
            s.name: {"train_queries": len(s.train_ids), "held_out_queries": len(s.held_out_ids),
                     "training_groups": len(s.groups)} for s in splits
        }  # fmt: skip
    return prep


def _seeded_model(cfg: Recipe, tokenizer, d) -> torch.nn.Module:
    # Seed right before the weights are drawn: every rank (FSDP shards each rank's own init)
    # and every run, fresh or resumed, builds the same model whatever preparation consumed.
    torch.manual_seed(cfg.train.seed)
    return load_model(cfg.model, tokenizer, d.device)  # on its device: Liger kernels apply on CUDA only


def initial_model(cfg: Recipe, prep: Prepared, d) -> torch.nn.Module:
    """A fresh copy of the starting weights (what prepare() built before any training)."""
    return _seeded_model(cfg, prep.tokenizer, d)


def _stage1_prompts(cfg: Recipe, spec: str, tokenizer, template) -> list:
    examples, _ = data_mod.read_examples(
        spec, format=cfg.data.format, skip_bad_records=cfg.data.skip_bad_records, instruction=cfg.data.instruction,
        seed=cfg.train.seed, binary_labels=True,
    )  # fmt: skip
    return stage1_prompts(
        examples, tokenizer, template, max_length=cfg.data.max_length, min_query_tokens=cfg.data.min_query_tokens,
        instruction=cfg.data.instruction,
    )  # fmt: skip


def load_exported(cfg: Recipe, folder: Path, d) -> torch.nn.Module:
    """A model saved by export() (stage 1's final/), loaded as the recipe's model is: the same
    attention implementation, dtype, checkpointing and device."""
    import dataclasses

    model_cfg = dataclasses.replace(cfg.model, name_or_path=str(folder))
    return load_model(model_cfg, load_tokenizer(str(folder)), d.device)


def _labels_to_unit_interval(examples, source: str) -> None:
    """bce / mse need targets in [0, 1]: graded labels (0..g_max) are divided by g_max."""
    top = max((label for ex in examples for label in ex.labels), default=1.0)
    low = min((label for ex in examples for label in ex.labels), default=0.0)
    if low < 0:
        raise DataError(f"{source}: labels must be >= 0 for bce/mse, found {low}")
    if top > 1.0:
        for ex in examples:
            ex.labels = [label / top for label in ex.labels]
