"""The one training loop both stages run: AdamW, warmup + cosine, clipping, resumable
checkpoints, metrics.jsonl, progress.

Micro-batches are planned globally by token budget; optimizer step i consumes the next
world_size x grad_accum of them, rank r taking every world_size-th, so the data a step sees
does not depend on how many processes share it, and a step's position in the data follows
from its index alone (what makes resume exact)."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from prorank_fast.kernels.invariant_matmul import forget_weight_casts

from ..errors import RecipeError
from ..packing import plan_micro_batches
from .checkpoint import Checkpointer
from .distributed import Dist
from .progress import plot_metrics, progress_bar, truncate_metrics


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class StepPlan:
    """Micro-batch plans per epoch (seed + epoch), cut to whole steps of per_step batches."""

    def __init__(self, groups, max_tokens: int, seed: int, per_step: int):
        self.groups, self.max_tokens, self.seed, self.per_step = groups, max_tokens, seed, per_step
        self._plans: dict[int, list[list[int]]] = {}
        try:
            first, self.stats = plan_micro_batches(groups, max_tokens, seed=seed)
        except ValueError as e:  # a group over the budget: the recipe's lengths and budget disagree
            raise RecipeError(str(e)) from e
        self._plans[0] = first
        self.steps_per_epoch = len(first) // per_step
        if self.steps_per_epoch == 0:
            raise RecipeError(
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
    state_types: tuple[type, ...] = ()  # classes (to_state/from_state) the state may hold, for checkpoints
    # every this many steps, evaluate() -> {name: value} goes into that step's record (0 = never)
    evaluate_every: int = 0
    evaluate: Callable[[], dict] | None = None


def run_loop(model, step_fn, settings: LoopSettings, tcfg, d: Dist, init_state) -> dict:
    """The one training loop: AdamW, warmup + cosine, clipping, resumable checkpoints,
    metrics.jsonl, progress.

    step_fn(step, state) runs forward and backward of this rank's share of optimizer step
    `step` and returns its record (global figures: loss, tokens, ...); `state` is a dict saved
    with every checkpoint (evaluations before training, rollouts kept across iterations): plain
    JSON values, tuples, tensors and instances of settings.state_types.
    init_state() makes the first one when no checkpoint exists. Returns {"state", "last",
    "start_step", "loop_time", "tokens"}.
    """
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay, eps=1e-8
    )
    warmup = int(settings.warmup_ratio * settings.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, settings.max_steps, warmup))
    ckpt = Checkpointer(settings.out, d, tcfg.keep_checkpoints, settings.state_types)
    metrics_path = settings.out / "metrics.jsonl"

    start_step, state = 0, None
    latest = ckpt.latest()
    if latest is not None:
        state = ckpt.load(latest, model, optimizer, scheduler)
        start_step = ckpt.loaded_step
        if d.main:
            print(f"resuming {settings.name} from {latest} (step {start_step})", flush=True)
            truncate_metrics(metrics_path, start_step)
    elif d.main and metrics_path.exists():
        metrics_path.unlink()
    if state is None:
        state = init_state()

    progress = progress_bar(d, start_step, settings.max_steps, settings.name, settings.postfix)
    last, tokens_seen, t_loop, t_start = {}, 0, time.time(), time.time()
    model.train()
    for step in range(start_step, settings.max_steps):
        t_step = time.time()
        record = step_fn(step, state)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        forget_weight_casts()  # in-place steps bump versions, but FSDP's gathered weights may not
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        done = step + 1
        tokens_seen += int(record.get("tokens", 0))
        step_time = time.time() - t_step
        every = settings.evaluate_every
        if settings.evaluate is not None and every and done % every == 0 and done < settings.max_steps:
            # outside the step's time (tokens_per_s stays the step's); the stage evaluates after its last step
            record = {**record, **settings.evaluate()}
        last = {
            "step": done,
            **record,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": record.get("tokens", 0) / max(step_time, 1e-9),
            "time": time.time() - t_start,
        }
        if d.main and (done % tcfg.log_every == 0 or done == settings.max_steps):
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
        progress.update(last)
        if settings.checkpoint_every and done % settings.checkpoint_every == 0 and done < settings.max_steps:
            ckpt.save(done, model, optimizer, scheduler, state)
    progress.close()
    loop_time = time.time() - t_loop
    ckpt.save(settings.max_steps, model, optimizer, scheduler, state)
    if d.main:
        plot_metrics(metrics_path, settings.out / "curves.png")
    return {"state": state, "last": last, "start_step": start_step, "loop_time": loop_time, "tokens": tokens_seen}
