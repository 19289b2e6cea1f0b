"""Stage 2 of `prorank-fast train`, step by step, against a plain trainer written from
transformers and torch alone (tests/reference_trainer.py): the same groups in the same order, the
same initial weights; the per-step losses and the final weights must agree to fp32 rounding.

Tolerances, from the two paths' arithmetic: both are fp32, but they sum in different orders (varlen
attention per document vs padded SDPA, a restricted head of 2 rows vs full-vocabulary logits, the
fused loss vs log_softmax), so each step's loss agrees to a few fp32 ulps of its terms; the weights
then drift apart only through Adam, whose update lr * m / (sqrt(v) + eps) is ~lr in size whatever
the gradient's size: a parameter whose gradient is ~0 can take a different sign of update (at
most lr x steps apart). So the final weights are compared by the difference of the two runs'
updates relative to the updates themselves, per tensor, and element-wise by how many elements
part by more than 1e-5. Measured on a 2-core AMD EPYC (torch 2.13 CPU), at 4608 and at 2304 tokens
per micro-batch: per-step losses within 2e-5 relative; update gaps 2e-7 to 7.7e-5 per tensor; the
largest element difference 3.5e-5, in 0.008% of one tensor's elements (lr x steps is 0.04). The
limits (2e-5; 5e-4; 0.1% of elements past 1e-5, none past lr x steps) leave room for other CPUs'
rounding; a wrong token, position, label or accumulation misses the loss limit by orders.
Batch invariance is a scoring and stage-1 setting: stage 2 trains without it. Two processes under
FSDP2 equal one with twice the accumulation (test_trainer.test_fsdp_two_processes_match_one), so
this check covers them too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from reference_trainer import plain_model, train_reference
from safetensors.torch import load_file

from prorank_fast.config import load_recipe
from prorank_fast.loop import StepPlan, setup_distributed
from prorank_fast.stages import prepare

STEPS = 20


@pytest.mark.parametrize("loss", ["listwise", "bce"])
def test_stage2_steps_match_a_plain_trainer(tmp_path, loss):
    out = tmp_path / "run"
    overrides = [
        f"output_dir={out}", "stage1.enabled=false", "data.demo_queries=40", "data.eval=null", f"stage2.loss={loss}",
        f"stage2.max_steps={STEPS}", "stage2.checkpoint_every=0", "train.max_tokens=2304", "train.grad_accum=2",
        "train.weight_decay=0.01",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "prorank_fast.cli", "train", *overrides], env=env,
                          capture_output=True, text=True, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = load_file(str(out / "final" / "model.safetensors"))

    # the same data and start, read the way the run read them (the demo and tokenizer it left in out/)
    cfg = load_recipe(None, overrides)
    d = setup_distributed("cpu")
    prep = prepare(cfg, out, d)
    plan = StepPlan(prep.groups, cfg.train.max_tokens, cfg.train.seed, d.world * cfg.train.grad_accum)
    steps = [plan.step_batches(s) for s in range(STEPS)]
    assert all(len(s) == 2 for s in steps)  # accumulation is part of what is compared
    model = plain_model(prep.model)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    s2, t = cfg.stage2, cfg.train
    losses, weights = train_reference(
        model, prep.groups, steps, output_ids=prep.output_ids, token_weights=prep.token_weights, loss=loss,
        lr=s2.lr, warmup_ratio=s2.warmup_ratio, betas=t.betas, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, pad_id=prep.tokenizer.pad_token_id or 0,
    )  # fmt: skip

    assert len(ours) == STEPS
    assert losses == pytest.approx(ours, rel=2e-5, abs=1e-6), list(zip(ours, losses, strict=True))
    moved = sum(float((weights[k] - start[k]).norm() ** 2) for k in weights) ** 0.5
    assert moved > 100 * s2.lr, moved  # both trained: the comparison is not between two untouched models
    compared = [k for k in weights if k in final]
    assert {k for k in weights if k not in final} <= {"lm_head.weight"}  # tied to the embeddings
    for name in compared:
        ref_update, our_update = weights[name] - start[name], final[name] - start[name]
        gap = (our_update - ref_update).norm() / ref_update.norm().clamp_min(1e-12)
        diff = (final[name] - weights[name]).abs()
        assert gap <= 5e-4, (name, float(gap))
        assert diff.max() <= s2.lr * STEPS and (diff > 1e-5).float().mean() <= 1e-3, (name, float(diff.max()))
    torch.testing.assert_close(final["model.embed_tokens.weight"], weights["model.embed_tokens.weight"])
