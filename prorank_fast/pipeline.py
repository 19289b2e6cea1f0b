"""What the loop needs around it: preparing tokenizer / template / model / data, scoring
for evaluation, progress, plots, export. Kept apart from trainer.py so that the loop
reads as the loop."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data as data_mod
from . import evaluate as eval_mod
from .config import Recipe
from .model import load_model, load_tokenizer


@dataclass
class Prepared:
    tokenizer: object
    template: object
    output_ids: tuple[int, ...]
    model: torch.nn.Module
    groups: list
    read_stats: object
    eval_data: object | None = None
    bm25_run: dict | None = None
    bm25_metrics: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    stage1_prompts: list = field(default_factory=list)  # grpo_stage.Stage1Prompt, training
    stage1_eval_prompts: list = field(default_factory=list)  # held-out, for accuracy before/after


def _demo_paths(cfg: Recipe, out: Path, d) -> dict:
    """The generated demo collection lives in OUTPUT_DIR/demo (made once, by rank 0)."""
    from .demo import make_demo

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


def _tokenizer(cfg: Recipe, out: Path, train_spec: str, d):
    if cfg.model.tokenizer:
        return load_tokenizer(cfg.model.tokenizer)
    if cfg.model.name_or_path:
        return load_tokenizer(cfg.model.name_or_path)
    # a tiny model from scratch: a small tokenizer trained on the training text, saved once
    from .demo import train_demo_tokenizer

    tok_dir = out / "tokenizer"
    if d.main and not (tok_dir / "tokenizer.json").exists():
        examples, _ = data_mod.read_examples(
            train_spec, format=cfg.data.format, skip_bad_records=cfg.data.skip_bad_records
        )
        texts = [ex.query for ex in examples] + [doc for ex in examples for doc in ex.docs]
        train_demo_tokenizer(texts, vocab_size=cfg.model.tokenizer_vocab_size, out_dir=tok_dir)
    d.barrier()
    return load_tokenizer(str(tok_dir))


def prepare(cfg: Recipe, out: Path, d) -> Prepared:
    paths = {"train": cfg.data.train, "eval": cfg.data.eval}
    if cfg.stage1.enabled:
        paths["stage1_train"] = cfg.stage1.train or cfg.data.train
        paths["stage1_eval"] = cfg.stage1.eval
    if "demo" in paths.values():
        demo = _demo_paths(cfg, out, d)
        paths = {k: (demo[k] if v == "demo" else v) for k, v in paths.items()}
    tokenizer = _tokenizer(cfg, out, paths["train"], d)
    template = data_mod.get_template(cfg.data.template)
    output_ids = template.output_token_ids(tokenizer)
    group_size = cfg.data.group_size if cfg.stage2.loss in ("listwise", "distill") else None
    examples, stats = data_mod.read_examples(
        paths["train"], format=cfg.data.format, group_size=group_size, skip_bad_records=cfg.data.skip_bad_records,
        max_examples=cfg.data.max_examples, instruction=cfg.data.instruction, seed=cfg.train.seed,
    )  # fmt: skip
    if cfg.stage2.loss == "distill" and any(ex.teacher_scores is None for ex in examples):
        raise ValueError(f"{paths['train']}: stage2.loss=distill needs teacher scores (pos_scores/neg_scores)")
    if cfg.stage2.loss in ("bce", "mse"):
        _labels_to_unit_interval(examples, paths["train"])
    groups = data_mod.tokenize_examples(examples, tokenizer, template, cfg.data.max_length, cfg.data.min_query_tokens)
    stage1_prompts, stage1_eval = [], []
    if cfg.stage1.enabled:  # read and checked before any model is built: bad input fails first
        stage1_prompts = _stage1_prompts(cfg, paths["stage1_train"], tokenizer, template)
        if paths.get("stage1_eval"):
            stage1_eval = _stage1_prompts(cfg, paths["stage1_eval"], tokenizer, template)
            stage1_eval = stage1_eval[: cfg.stage1.max_eval_pairs]
    model = _seeded_model(cfg, tokenizer, d)
    prep = Prepared(tokenizer, template, output_ids, model, groups, stats, paths=paths)
    prep.stage1_prompts, prep.stage1_eval_prompts = stage1_prompts, stage1_eval
    if paths["eval"]:
        prep.eval_data = eval_mod.load_beir(paths["eval"])
        prep.bm25_run = eval_mod.bm25_first_stage(prep.eval_data, k=cfg.data.eval_first_stage_k)
        prep.bm25_metrics = eval_mod.evaluate_run(prep.bm25_run, prep.eval_data.qrels)
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
    from .grpo_stage import stage1_prompts

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
        raise data_mod.DataError(f"{source}: labels must be >= 0 for bce/mse, found {low}")
    if top > 1.0:
        for ex in examples:
            ex.labels = [label / top for label in ex.labels]


def score_pairs(model, prep: Prepared, cfg: Recipe, pairs: list[tuple[str, str]], device) -> list[float]:
    """Scores of (query, document) pairs through the training root `model` (so FSDP gathers the
    parameters), packed into batches of cfg.train.max_tokens tokens by Reranker."""
    from .rerank import Reranker

    reranker = Reranker(
        prep.model, prep.tokenizer, template=prep.template, output_ids=prep.output_ids,
        token_weights=cfg.stage2.token_weights, instruction=cfg.data.instruction, max_length=cfg.data.max_length,
        min_query_tokens=cfg.data.min_query_tokens, max_tokens=cfg.train.max_tokens, device=device, scorer=model,
    )  # fmt: skip
    return reranker.predict(pairs, show_progress_bar=False)


def evaluate_model(model, prep: Prepared, cfg: Recipe, d) -> dict:
    """nDCG@10 of the model reranking BM25's top-k, next to BM25's own."""
    if prep.eval_data is None:
        return {}
    was_training = model.training
    model.eval()

    def score_fn(pairs):
        return score_pairs(model, prep, cfg, pairs, d.device)

    run = eval_mod.rerank_run(prep.bm25_run, prep.eval_data, score_fn, k=cfg.data.eval_first_stage_k)
    metrics = eval_mod.evaluate_run(run, prep.eval_data.qrels)
    model.train(was_training)
    return {
        "ndcg@10": metrics["nDCG@10"],
        "bm25_ndcg@10": prep.bm25_metrics["nDCG@10"],
        "queries": len(prep.eval_data.queries),
    }


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value and (abs(value) < 1e-2 or abs(value) >= 1e4) else f"{value:.4f}"
    return str(value)


class _Progress:
    def __init__(self, d, start: int, total: int, desc: str, keys: tuple[str, ...]):
        self.bar = None
        self.keys = keys
        if d.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: _short(record[k]) for k in self.keys if k in record})
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(d, start: int, total: int, desc: str = "stage 2", keys=("loss", "lr", "tokens_per_s")) -> _Progress:
    return _Progress(d, start, total, desc, keys)


# panels of curves.png, drawn for the keys a run's metrics.jsonl has (stage 1 logs the GRPO ones)
PLOT_PANELS = (
    ("loss", ("loss",)),
    ("learning rate", ("lr",)),
    ("reward", ("reward", "reward_format", "reward_correctness")),
    ("valid format rate", ("valid_format_rate",)),
    ("kl / entropy", ("kl", "entropy")),
    ("clip ratio", ("clip_ratio_low", "clip_ratio_high", "clip_ratio_region")),
    ("completion length", ("completion_length",)),
    ("zero-variance groups", ("zero_variance_groups",)),
)


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Curves from metrics.jsonl: loss and schedule, and for stage 1 rewards, format rate,
    KL, entropy, clip ratios, completion length and zero-variance groups."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    panels = [(title, [k for k in keys if k in rows[0]]) for title, keys in PLOT_PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    cols = min(4, len(panels))
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3.2 * n_rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=key)
        ax.set(xlabel="step", title=title)
        if len(keys) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def export(model, prep: Prepared, cfg: Recipe, target: Path, d) -> None:
    """save_pretrained (safetensors) + tokenizer + the output-set ids and template in config.json,
    written to a temporary folder and renamed into place."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return
    lm_state = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        if key.startswith("lm."):
            lm_state[key[3:]] = value
    tmp = target.with_name(f".tmp_{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    prep.model.save_pretrained(tmp, state_dict=lm_state, safe_serialization=True)
    prep.tokenizer.save_pretrained(tmp)
    # config.json["prorank"], chat template, sentence-transformers files (prorank_fast/export.py)
    from .export import write_ecosystem_files

    write_ecosystem_files(
        tmp, prep.tokenizer, cfg.data.template, prep.output_ids, cfg.stage2.token_weights, cfg.data.instruction,
        cfg.data.max_length, cfg.data.min_query_tokens,
    )  # fmt: skip
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def dry_run_report(cfg: Recipe, prep: Prepared) -> dict:
    n_params = sum(p.numel() for p in prep.model.parameters())
    return {
        "recipe": cfg.source,
        "parameters": n_params,
        "output_ids": list(prep.output_ids),
        "train_groups": len(prep.groups),
    }
