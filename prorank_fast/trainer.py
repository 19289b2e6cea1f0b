"""The one training loop: FSDP2, AdamW, warmup + cosine, accumulation, clipping,
atomic resumable checkpoints, progress, metrics, export.

One process on CPU (`prorank-fast train`) or many under `torchrun --nproc_per_node N`
(gloo on CPU, nccl on GPU). Micro-batches are planned globally by token budget; optimizer
step i consumes the next world_size x grad_accum of them, rank r taking every world_size-th,
so the data a step sees does not depend on how many processes share it, and a step's
position in the data follows from its index alone (what makes resume exact).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Recipe
from .packing import collate, plan_micro_batches
from .score_stage import RerankerForTraining, batch_inputs, loss_units

CHECKPOINTS = "checkpoints"
LATEST = "latest"


# ---------------------------------------------------------------------------------------
# Processes and devices
# ---------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def setup_distributed(device_pref: str) -> Dist:
    """Init the process group when launched by torchrun (WORLD_SIZE set)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, local_rank, device)


def set_seed(seed: int) -> None:
    # numpy's global RNG is not used: data code takes seeded numpy Generators
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------
# Model wrapping: FSDP2 per decoder layer, then the root
# ---------------------------------------------------------------------------------------


def shard(wrapper: RerankerForTraining, d: Dist, *, compile_layers: bool) -> torch.nn.Module:
    """fully_shard each decoder layer, then the root (the wrapper, so the LM head and the
    embeddings are gathered in its forward). bf16 parameters / fp32 reduction on GPU."""
    layers = wrapper.lm.model.layers
    if compile_layers:
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer)
    if not d.distributed:
        return wrapper
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if d.device.type == "cuda":
        # labels / teacher scores stay fp32: inputs are not cast, activations follow the bf16 params
        kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(wrapper, **kwargs)
    return wrapper


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint, written to a temporary folder then renamed
# ---------------------------------------------------------------------------------------


class Checkpointer:
    """output_dir/checkpoints/step_000050/ (DCP shards + per-rank extra state) and a
    `latest` file naming the newest complete one. A checkpoint becomes visible only by an
    atomic rename after every rank has written, so a run killed at any moment leaves the
    previous checkpoint intact."""

    def __init__(self, output_dir: Path, d: Dist, keep: int):
        self.root = output_dir / CHECKPOINTS
        self.d = d
        self.keep = max(1, keep)

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int, model, optimizer, scheduler, extra: dict) -> Path:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        name = f"step_{step:07d}"
        final, tmp = self.root / name, self.root / f".tmp_{name}"
        if self.d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.d.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")  # one process: expected
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        torch.save(
            {"step": step, "scheduler": scheduler.state_dict(), "rng": rng_state(), **extra},
            tmp / f"extra_rank{self.d.rank}.pt",
        )
        self.d.barrier()
        if self.d.main:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _atomic_write(self.root / LATEST, name)
            for old in sorted(self.root.glob("step_*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.d.barrier()
        return final

    def load(self, path: Path, model, optimizer, scheduler) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        extra = torch.load(path / f"extra_rank{self.d.rank}.pt", weights_only=False)
        self.loaded_step = int(extra["step"])
        scheduler.load_state_dict(extra["scheduler"])
        set_rng_state(extra["rng"])
        return extra


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# Data order: a step's micro-batches follow from its index
# ---------------------------------------------------------------------------------------


class StepPlan:
    """Micro-batch plans per epoch (seed + epoch), cut to whole steps of per_step batches."""

    def __init__(self, groups, max_tokens: int, seed: int, per_step: int):
        self.groups, self.max_tokens, self.seed, self.per_step = groups, max_tokens, seed, per_step
        self._plans: dict[int, list[list[int]]] = {}
        first, self.stats = plan_micro_batches(groups, max_tokens, seed=seed)
        self._plans[0] = first
        self.steps_per_epoch = len(first) // per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training data packs into {len(first)} micro-batches of train.max_tokens={max_tokens}, "
                f"fewer than one step needs (world size x train.grad_accum = {per_step}): "
                "lower train.max_tokens or train.grad_accum, or add data"
            )

    def plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans[epoch] = plan_micro_batches(self.groups, self.max_tokens, seed=self.seed + epoch)[0]
        return self._plans[epoch]

    def step_batches(self, step: int) -> list[list[int]]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        plan = self.plan(epoch)
        return plan[offset * self.per_step : (offset + 1) * self.per_step]


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


@dataclass
class LoopSettings:
    """What differs between the stages' runs of the one loop."""

    name: str  # progress-bar label: "stage 1" | "stage 2"
    out: Path  # checkpoints/ and metrics.jsonl go here
    max_steps: int
    lr: float
    warmup_ratio: float
    checkpoint_every: int
    postfix: tuple[str, ...] = ("loss", "lr", "tokens_per_s")  # record keys shown in the progress bar


def run_loop(model, step_fn, settings: LoopSettings, tcfg, d: Dist, init_state) -> dict:
    """The one training loop: AdamW, warmup + cosine, clipping, resumable checkpoints,
    metrics.jsonl, progress.

    step_fn(step, state) runs forward and backward of this rank's share of optimizer step
    `step` and returns its record (global figures: loss, tokens, ...); `state` is a dict saved
    with every checkpoint (evaluations before training, rollouts kept across iterations).
    init_state() makes the first one when no checkpoint exists. Returns {"state", "last",
    "start_step", "loop_time", "tokens"}.
    """
    from . import pipeline

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay, eps=1e-8
    )
    warmup = int(settings.warmup_ratio * settings.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, settings.max_steps, warmup))
    ckpt = Checkpointer(settings.out, d, tcfg.keep_checkpoints)
    metrics_path = settings.out / "metrics.jsonl"

    start_step, state = 0, None
    latest = ckpt.latest()
    if latest is not None:
        state = ckpt.load(latest, model, optimizer, scheduler)["state"]
        start_step = ckpt.loaded_step
        if d.main:
            print(f"resuming {settings.name} from {latest} (step {start_step})", flush=True)
            _truncate_metrics(metrics_path, start_step)
    elif d.main and metrics_path.exists():
        metrics_path.unlink()
    if state is None:
        state = init_state()

    progress = pipeline.progress_bar(d, start_step, settings.max_steps, settings.name, settings.postfix)
    last, tokens_seen, t_loop, t_start = {}, 0, time.time(), time.time()
    model.train()
    for step in range(start_step, settings.max_steps):
        t_step = time.time()
        record = step_fn(step, state)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        done = step + 1
        tokens_seen += int(record.get("tokens", 0))
        last = {
            "step": done,
            **record,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": record.get("tokens", 0) / max(time.time() - t_step, 1e-9),
            "time": time.time() - t_start,
        }
        if d.main and (done % tcfg.log_every == 0 or done == settings.max_steps):
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
        progress.update(last)
        if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.max_steps:
            ckpt.save(done, model, optimizer, scheduler, {"state": state})
    progress.close()
    loop_time = time.time() - t_loop
    ckpt.save(settings.max_steps, model, optimizer, scheduler, {"state": state})
    if d.main:
        pipeline.plot_metrics(metrics_path, settings.out / "curves.png")
    return {"state": state, "last": last, "start_step": start_step, "loop_time": loop_time, "tokens": tokens_seen}


def train(recipe: Recipe, *, dry_run: bool = False) -> dict:
    """Run the recipe: stage 1 (when stage1.enabled) then stage 2 from its weights; returns
    the summary (also in OUTPUT_DIR/summary.json)."""
    from . import pipeline

    t_start = time.time()
    cfg, tcfg = recipe, recipe.train
    d = setup_distributed(tcfg.device)
    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    out = Path(tcfg.output_dir)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    d.barrier()

    set_seed(tcfg.seed)
    prep = pipeline.prepare(cfg, out, d)  # tokenizer, template, model, groups, eval data, stage-1 prompts
    if dry_run:
        return pipeline.dry_run_report(cfg, prep)

    summary = {"recipe": cfg.source}
    if cfg.stage1.enabled:
        from .grpo_stage import run_stage1

        stage1 = run_stage1(cfg, prep, d, out / "stage1")
        summary["stage1"] = stage1
        if cfg.stage1.compare_stage2_alone:
            # the same stage 2 from the same start, without stage 1 (reported next to the chained run)
            alone = run_stage2(cfg, prep, pipeline.initial_model(cfg, prep, d), d, out / "stage2_alone")
            summary["ndcg@10_stage2_alone"] = alone.get("ndcg@10_after")
        prep.model = pipeline.load_exported(cfg, Path(stage1["final_model"]), d)
    summary.update(run_stage2(cfg, prep, prep.model, d, out))
    summary["wall_time_s"] = time.time() - t_start
    if d.main:
        _atomic_write(out / "summary.json", json.dumps(summary, indent=2))
    d.barrier()
    return summary


def run_stage2(cfg: Recipe, prep, lm, d: Dist, out: Path) -> dict:
    """Stage 2 on `lm` (trained in place); checkpoints, metrics and final/ under `out`."""
    from . import pipeline

    tcfg = cfg.train
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    wrapper = RerankerForTraining(
        lm, prep.output_ids, cfg.stage2.token_weights, cfg.stage2.loss, cfg.stage2.temperature
    )
    model = shard(wrapper, d, compile_layers=cfg.model.compile)
    steps = StepPlan(prep.groups, tcfg.max_tokens, tcfg.seed, d.world * tcfg.grad_accum)

    def step_fn(step: int, state: dict) -> dict:
        mine = steps.step_batches(step)[d.rank :: d.world]
        batches = [collate([prep.groups[i] for i in ids]).to(d.device) for ids in mine]
        local = [loss_units(b, cfg.stage2.loss) for b in batches]
        units_total, tokens_total = d.all_sum([sum(local), sum(b.num_tokens for b in batches)])
        loss_sum = 0.0
        for i, batch in enumerate(batches):
            if d.distributed and hasattr(model, "set_requires_gradient_sync"):
                model.set_requires_gradient_sync(i == len(batches) - 1)
            loss, _scores = model(**batch_inputs(batch))
            # FSDP averages gradients over ranks: scale so the step's gradient is the mean over all units
            (loss * (d.world / units_total)).backward()
            loss_sum += float(loss.detach())
        (global_loss,) = d.all_sum([loss_sum])
        return {"loss": global_loss / units_total, "tokens": int(tokens_total)}

    settings = LoopSettings("stage 2", out, tcfg.max_steps, tcfg.lr, tcfg.warmup_ratio, tcfg.checkpoint_every)
    result = run_loop(
        model, step_fn, settings, tcfg, d, lambda: {"eval_before": pipeline.evaluate_model(model, prep, cfg, d)}
    )
    eval_before = result["state"]["eval_before"]
    eval_after = pipeline.evaluate_model(model, prep, cfg, d)
    pipeline.export(model, prep, cfg, out / "final", d)
    return {
        "stage2_loss": cfg.stage2.loss,
        "stage2_final_loss": result["last"].get("loss", float("nan")),
        "steps": tcfg.max_steps,
        "resumed_from_step": result["start_step"],
        "world_size": d.world,
        "ndcg@10_before": eval_before.get("ndcg@10"),
        "ndcg@10_after": eval_after.get("ndcg@10"),
        "bm25_ndcg@10": eval_after.get("bm25_ndcg@10"),
        "eval_queries": eval_after.get("queries"),
        "packing_waste": steps.stats.waste,
        "train_tokens_per_s": result["tokens"] / max(result["loop_time"], 1e-9),
        "final_model": str(out / "final"),
    }


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run logged after the checkpoint it resumes from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    _atomic_write(path, "".join(line + "\n" for line in kept))
