"""CPU stage-1 (GRPO) step benchmark through pytest-benchmark: ``pytest benchmarks/test_stage1_step.py``.

A tiny version of ``python -m benchmarks.stage1_step`` (see ``benchmarks/stage1_step.py``): ours (shared prefix,
one prefill per prompt, fused loss) and the same algorithm over G independent full sequences
(transformers ``generate``, full-vocabulary logits, reference loss). What is asserted is that the two
rows do the same work, not their speed:

* the same loss and parameter gradients on the same completions (random advantages), at V=1024 and
  V=151936 (fp32, rel. 1e-4);
* greedy sampling (temperature 0) gives the same completions through ``sample_group_completions``
  (shared prefix) and ``lm.generate`` (G full sequences);
* every timed step gives a finite loss and G completions of exactly T tokens per prompt.

TRL's GRPOTrainer row is left to the command (its trainer setup alone takes seconds); this file does
not need trl. Sizes: 2 prompts x 48 tokens, G=4, T=4, 1 warm-up + 2 timed steps per row (~25 s of CPU;
40 s wall on 2 busy cores); ``PRORANK_BENCH_S1_<FIELD>`` overrides any field.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import stage1_step
from prorank_fast.grpo import sample_group_completions

PYTEST_DEFAULTS = dict(vocabs=f"1024,{stage1_step.QWEN_VOCAB}", prompts=2, prompt_len=48, group_size=4, new_tokens=4,
                       rounds=2, warmup=1)  # fmt: skip
CFG = stage1_step.Stage1Config.from_env(**PYTEST_DEFAULTS)
TIMED_VOCAB = min(CFG.vocab_list)


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.fixture(scope="module")
def steps():
    return stage1_step.make_steps(CFG, CFG.warmup + CFG.rounds)


def _step(variant: str, vocab: int, models: dict) -> stage1_step.Stage1Step:
    lm = stage1_step.base_model(vocab, CFG.seed, models=models)
    gpf = stage1_step.groups_per_forward(CFG, vocab) if variant == "full" else None
    return stage1_step.Stage1Step(variant, lm, CFG, groups_per_forward=gpf)


@pytest.mark.parametrize("vocab", CFG.vocab_list)
def test_stage1_same_loss_and_grads(vocab, models, steps):
    ours, full = _step("ours", vocab, models), _step("full", vocab, models)
    check = stage1_step.equal_work_check(ours, full, steps[0], CFG.seed + 1)
    assert math.isfinite(check["loss_ours"]) and check["loss_ours"] != 0.0, check
    assert check["loss_rel_diff"] <= stage1_step.LOSS_RTOL, check
    assert check["grad_rel_diff"] <= stage1_step.GRAD_RTOL, check


def test_stage1_greedy_samples_equal(models, steps):
    """Both samplers draw from the same distribution: at temperature 0 they pick the same tokens."""
    ours, full = _step("ours", TIMED_VOCAB, models), _step("full", TIMED_VOCAB, models)
    prompts = steps[0].prompts
    mine = sample_group_completions(
        ours.policy, prompts, group_size=CFG.group_size, max_new_tokens=CFG.new_tokens, stop_ids=(), temperature=0.0
    )
    ids = torch.tensor(prompts).repeat_interleave(CFG.group_size, dim=0)  # greedy: no num_return_sequences
    with torch.no_grad():
        out = full.lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=CFG.new_tokens, min_new_tokens=CFG.new_tokens, pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    assert mine == out[:, ids.shape[1] :].tolist()


@pytest.mark.benchmark(group=stage1_step.GROUP, disable_gc=True)
@pytest.mark.parametrize("variant", ["ours", "full"])
def test_cpu_stage1_step(benchmark, variant, models, steps):
    step = _step(variant, TIMED_VOCAB, models)
    benchmark.extra_info.update(vocab=TIMED_VOCAB, variant=variant, config=CFG.describe(), note=step.note)
    calls = iter(range(10**6))

    def one():
        i = next(calls)
        return step.train_step(steps[i % len(steps)], seed=i)

    loss = benchmark.pedantic(one, rounds=CFG.rounds, warmup_rounds=CFG.warmup, iterations=1)
    assert math.isfinite(loss)
    rollouts = step.rollouts(steps[0], seed=0)
    assert len(rollouts.completions) == CFG.prompts * CFG.group_size
    assert all(len(c) == CFG.new_tokens for c in rollouts.completions)
    result = stage1_step.step_result(step, TIMED_VOCAB, CFG.warmup)
    benchmark.extra_info.update({f"{k}_ms": v for k, v in result.phases_ms.items()})
