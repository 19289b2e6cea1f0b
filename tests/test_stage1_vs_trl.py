"""Stage 1 of `prorank-fast train` (``run_stage1``: the loop, micro-batches, the fused GRPO loss, AdamW) against
TRL's ``GRPOTrainer`` loss as the trl package ships it (``compute_loss`` -> ``_compute_loss``): 5 optimizer
steps each on the same rollouts (prompts, completions, rewards, old log-probs), from the same starting
weights, with the same optimizer (benchmarks/trl_reference.py says how). The old log-probs are the
starting weights' for all 5 steps (num_iterations = 5), so steps 2..5 are off-policy and the clip engages
(20-80% of the tokens; both sides log the clipped share, which must agree). The tiny default model:
SmolLM2 does not fit this file's time on 2 cores (its GGUF load alone takes 15-25 s, and the prompt
template alone is ~100 tokens). Every group of the rollouts has reward variance: our trainer drops the
others and normalises over the groups it keeps, where TRL counts them in its normalisers (the difference
is measured in benchmarks/trl_reference.py's docstring).

Tolerances, from the two paths' fp32 arithmetic. Both compute the same formulas in fp32, in different
orders: varlen attention per document and batch-invariant tiled matmuls (ours) against padded SDPA with
MKL matmuls over left-padded prompts, whose RoPE positions are shifted by the padding (TRL); our chunked
log-softmax against TRL's chunked fused LM head. Per-token log-probs (~ -7 at V=1024, where an fp32 ulp is
4.8e-7) then agree to 1-2 ulps: TRL's own old log-probs against ours, measured <= 9.5e-7, limit 1e-5.
The loss is a mean of per-token terms -A * clip(ratio) of size <= ~2 (group-standardised advantages), and
a log-prob error d moves a term by ~|A| * ratio * d: the step-1 losses agree to ~1e-6 absolute; later
steps add the effect of weights that differ by the update differences. Measured (seeds 0-5 at 1 thread,
0-3 at 2 threads, 2-core AMD EPYC, torch 2.13 CPU): <= 2.1e-6 absolute. Limit 2e-5 absolute, whatever the
loss's size (grpo's step-1 loss is the mean of each group's centred advantages: ~0, so no relative limit).
Advantages: both standardise the same small-integer rewards in fp32: equal (limit 1e-6). Weights: Adam's
update lr * m / (sqrt(v) + eps) is ~lr whatever the gradient's size, so an element whose gradient is ~0
can take a different sign of update (up to ~lr a step apart); as in test_reference_trainer.py they are
compared by the difference of the two runs' updates relative to the updates: over all parameters measured
<= 8.8e-5 (limit 5e-4), per tensor <= 4.0e-4 (a few such elements in a 2048-element tensor; limit 2e-3);
no element apart by more than lr x steps (measured <= 1.2e-4), at most 0.1% of the elements by more than
1e-5 (measured <= 8 of 157,632). Mutations of the loss (kernels/reference.py) miss the loss limit by three
to five orders of magnitude: grpo aggregated as a token mean (step 1: 0.077 against 0), dapo's normaliser
off by 1.5x (step 1: 0.116 against 0.077), the log-ratio's sign, the clip range 0.28 for 0.2, or max for
min in the clipped objective (step 2: 0.088, 0.048, -0.316 against 0.074).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from benchmarks.trl_reference import STEPS, run_both  # noqa: E402


@pytest.fixture
def one_thread():
    """The tiny model's matrices gain nothing from a second thread, and while another process keeps the
    second core busy, OpenMP's barriers cost seconds per step: one thread (rounding only changes a little)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_stage1_steps_match_trl(tmp_path, loss_type, one_thread):
    c = run_both(tmp_path / "run", loss_type)
    assert len(c.losses_ours) == len(c.losses_trl) == STEPS
    assert c.micro_batches >= 2  # our gradient accumulation is part of what is compared
    assert [r["lr"] for r in c.records] == pytest.approx(c.lrs_trl, rel=1e-12)  # the same schedule
    torch.testing.assert_close(c.advantages_ours, c.advantages_trl, rtol=0, atol=1e-6)
    assert c.old_logp_diff <= 1e-5, c.old_logp_diff
    assert max(c.loss_abs_diffs()) <= 2e-5, list(zip(c.losses_ours, c.losses_trl, strict=True))

    # the off-policy steps clip many tokens, and both count them alike
    ours_clip = [r["clip_ratio_region"] for r in c.records]
    assert ours_clip[0] == 0.0 and min(ours_clip[1:]) > 0.1, ours_clip
    assert ours_clip == pytest.approx(c.trl_clip["clip_ratio/region_mean"], abs=1e-6)

    def update(weights, name):
        return weights[name] - c.start[name]

    assert c.weights_ours.keys() == c.weights_trl.keys() == c.start.keys()
    moved = sum(float(update(c.weights_trl, k).norm() ** 2) for k in c.start) ** 0.5
    assert moved > 100 * c.lr, moved  # both trained: not a comparison between two untouched models
    gap = sum(float((update(c.weights_ours, k) - update(c.weights_trl, k)).norm() ** 2) for k in c.start) ** 0.5
    assert gap / moved <= 5e-4, gap / moved
    per_tensor = c.update_gaps()
    assert max(per_tensor.values()) <= 2e-3, max(per_tensor.items(), key=lambda kv: kv[1])
    diffs = torch.cat([(c.weights_ours[k] - c.weights_trl[k]).abs().flatten() for k in c.start])
    assert float(diffs.max()) <= c.lr * STEPS, float(diffs.max())
    assert (diffs > 1e-5).float().mean() <= 1e-3, int((diffs > 1e-5).sum())
