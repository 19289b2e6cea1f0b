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
from .packing import pack_sequences
from .score_stage import batch_inputs


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


def _demo_paths(cfg: Recipe, out: Path, d) -> dict:
    """The generated demo collection lives in OUTPUT_DIR/demo (made once, by rank 0)."""
    from .demo import make_demo

    target = out / "demo"
    if d.main and not (target / "train.jsonl").exists():
        make_demo(target, num_queries=cfg.data.demo_queries, docs_per_topic=cfg.data.demo_docs_per_topic,
                  seed=cfg.data.demo_seed)  # fmt: skip
    d.barrier()
    return {"train": str(target / "train.jsonl"), "eval": str(target / "eval")}


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
    if "demo" in (cfg.data.train, cfg.data.eval):
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
    # Seed right before the weights are drawn: every rank (FSDP shards each rank's own init)
    # and every run, fresh or resumed, builds the same model whatever preparation consumed.
    torch.manual_seed(cfg.train.seed)
    model = load_model(cfg.model, tokenizer, d.device)  # on its device: Liger kernels apply on CUDA only
    prep = Prepared(tokenizer, template, output_ids, model, groups, stats, paths=paths)
    if paths["eval"]:
        prep.eval_data = eval_mod.load_beir(paths["eval"])
        prep.bm25_run = eval_mod.bm25_first_stage(prep.eval_data, k=cfg.data.eval_first_stage_k)
        prep.bm25_metrics = eval_mod.evaluate_run(prep.bm25_run, prep.eval_data.qrels)
    return prep


def _labels_to_unit_interval(examples, source: str) -> None:
    """bce / mse need targets in [0, 1]: graded labels (0..g_max) are divided by g_max."""
    top = max((label for ex in examples for label in ex.labels), default=1.0)
    low = min((label for ex in examples for label in ex.labels), default=0.0)
    if low < 0:
        raise data_mod.DataError(f"{source}: labels must be >= 0 for bce/mse, found {low}")
    if top > 1.0:
        for ex in examples:
            ex.labels = [label / top for label in ex.labels]


@torch.no_grad()
def score_pairs(model, prep: Prepared, cfg: Recipe, pairs: list[tuple[str, str]], device) -> list[float]:
    """Scores of (query, document) pairs in packed batches of cfg.train.max_tokens tokens."""
    ids = [
        prep.template.build(prep.tokenizer, q, doc, instruction=cfg.data.instruction,
                            max_length=cfg.data.max_length, min_query_tokens=cfg.data.min_query_tokens)
        for q, doc in pairs
    ]  # fmt: skip
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together
    scores = [0.0] * len(ids)
    budget = max(cfg.train.max_tokens, cfg.data.max_length)
    batch: list[int] = []
    used = 0

    def flush():
        if not batch:
            return
        packed = pack_sequences([ids[i] for i in batch], [0.0] * len(batch)).to(device)
        out = model(**batch_inputs(packed, with_labels=False))
        for i, s in zip(batch, out.float().cpu().tolist(), strict=True):
            scores[i] = s

    for i in order:
        if used + len(ids[i]) > budget:
            flush()
            batch, used = [], 0
        batch.append(i)
        used += len(ids[i])
    flush()
    return scores


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


class _Progress:
    def __init__(self, d, start: int, total: int):
        self.bar = None
        if d.main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, desc="stage 2", unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}"
            )
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_bar(d, start: int, total: int) -> _Progress:
    return _Progress(d, start, total)


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """Loss and learning-rate curves from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics_path.exists():
        return
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot(steps, [r["loss"] for r in rows])
    ax_loss.set(xlabel="step", ylabel="stage-2 loss", title="loss")
    ax_lr.plot(steps, [r["lr"] for r in rows])
    ax_lr.set(xlabel="step", ylabel="learning rate", title="schedule")
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
    config_path = tmp / "config.json"
    config = json.loads(config_path.read_text())
    config["prorank"] = {
        "template": cfg.data.template,
        "output_token_ids": list(prep.output_ids),
        "output_tokens": [prep.tokenizer.convert_ids_to_tokens(i) for i in prep.output_ids],
        "token_weights": list(cfg.stage2.token_weights),
        "instruction": cfg.data.instruction,
        "max_length": cfg.data.max_length,
    }
    config_path.write_text(json.dumps(config, indent=2))
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
