"""Truly on-policy stage 1: the log-probs the sampler records for the tokens it draws equal, bit
for bit, the ones the policy pass computes for the same tokens with the same weights (fp32, CPU),
whatever micro-batches the two group the prompts in. Then the rollout log-probs are the old
log-probs: the importance ratio is exactly 1 and the loss and gradients are those of old=None.
"""

from __future__ import annotations

import pytest
import torch
from test_grpo_stage import TINY, V, _random_case

from prorank_fast.grpo import GRPOOptions, PolicyForGRPO, Rollouts, make_group_batch, sample_group_completions
from prorank_fast.modeling import build_tiny_model

OPTIONS = GRPOOptions(temperature=0.7, batch_invariant=True)


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = build_tiny_model(TINY, V, 0, torch.float32)
    model.set_attn_implementation("prorank_varlen")
    return model


def _sample(policy, prompts, max_new_tokens, options=OPTIONS, seed=3):
    return sample_group_completions(
        policy, prompts, group_size=4, max_new_tokens=max_new_tokens, stop_ids=[0], temperature=1.3,
        generator=torch.Generator().manual_seed(seed), options=options, with_logprobs=True,
    )  # fmt: skip


def test_one_token_rollout_logprobs_are_the_policy_pass_bitwise(lm):
    prompts, _, _ = _random_case([7, 12, 3, 30, 5], [[]] * 5, seed=2)
    policy = PolicyForGRPO(lm)
    completions, sampled = _sample(policy, prompts, 1)
    # the policy pass groups prompts differently from the sampler: [3, 0] and [1, 4, 2]
    for groups in ([3, 0], [1, 4, 2]):
        comps = [completions[p * 4 + j] for p in groups for j in range(4)]
        batch = make_group_batch([prompts[p] for p in groups], comps, [i for i in range(len(groups)) for _ in range(4)])
        ours = policy(batch, head="logprobs", options=OPTIONS).detach()
        rollout = torch.cat([sampled[p * 4 + j] for p in groups for j in range(4)])
        assert torch.equal(ours, rollout), (ours - rollout).abs().max()


def test_rollout_logprobs_as_old_give_ratio_one_and_the_on_policy_loss(lm):
    prompts, _, _ = _random_case([9, 4, 15], [[]] * 3, seed=4)
    policy = PolicyForGRPO(lm)
    completions, sampled = _sample(policy, prompts, 1)
    advantages = torch.linspace(-1.0, 1.0, len(completions))
    no_zero_variance = torch.zeros(3, dtype=torch.bool)
    rollouts = Rollouts(prompts, [0, 1, 0], completions, advantages, advantages, {}, no_zero_variance, 4)
    rollouts.sample_logprobs = sampled
    batch = rollouts.group_batch([0, 1, 2])
    results = []
    for old in (None, rollouts.sampled_logprobs([0, 1, 2])):
        batch.old_logprobs = old
        lm.zero_grad(set_to_none=True)
        loss, metrics = policy(batch, head="grpo", options=OPTIONS)
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in lm.parameters() if p.grad is not None]))
    (loss_none, _, grads_none), (loss_old, metrics_old, grads_old) = results
    assert float(metrics_old["log_ratio_max"]) == 0.0
    assert torch.equal(loss_old, loss_none)
    assert all(torch.equal(a, b) for a, b in zip(grads_old, grads_none, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_token_completions_answer_and_end_token_are_bitwise_too(lm, seed):
    """The shipped recipes' completions (the answer, then the end token): the second token's
    decode step and the policy's completion row both run one query over the same keys."""
    prompts, _, _ = _random_case([7, 12, 3, 40], [[]] * 4, seed=5 + seed)
    policy = PolicyForGRPO(lm)
    completions, sampled = _sample(policy, prompts, 2, seed=8 + seed)
    assert any(len(c) == 2 for c in completions)
    batch = make_group_batch(prompts, completions, [i for i in range(4) for _ in range(4)])
    assert torch.equal(policy(batch, head="logprobs", options=OPTIONS).detach(), torch.cat(sampled))


@pytest.mark.parametrize("max_new_tokens", [3, 6])
def test_longer_completions_are_bitwise_too(lm, max_new_tokens):
    """With batch invariance each token of the policy pass's completion row attends as the
    sampler's decode step did: every token's log-prob is the sampler's, bit for bit, whatever the
    lengths (mixed here: stop token 0 ends some early), and gradients flow as in one pass."""
    prompts, _, _ = _random_case([7, 12, 3], [[]] * 3, seed=5)
    policy = PolicyForGRPO(lm)
    completions, sampled = _sample(policy, prompts, max_new_tokens, seed=8)
    batch = make_group_batch(prompts, completions, [i for i in range(3) for _ in range(4)])
    ours = policy(batch, head="logprobs", options=OPTIONS)
    assert torch.equal(ours.detach(), torch.cat(sampled))
    lm.zero_grad(set_to_none=True)
    ours.sum().backward()
    by_token = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad(set_to_none=True)
    policy(batch, head="logprobs", options=GRPOOptions(temperature=0.7)).sum().backward()
    for a, b in zip(by_token, [p.grad for p in lm.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # one pass: the same gradient to rounding
    lm.zero_grad(set_to_none=True)


def test_longer_completions_are_bitwise_under_bf16_autocast(lm):
    """As the SmolLM2 recipe runs it: the decoder under bf16 autocast (q and k leave the rotary
    table in fp32, v in bf16), sampler and policy pass alike; the backward runs too."""
    prompts, _, _ = _random_case([7, 12, 3], [[]] * 3, seed=6)
    policy = PolicyForGRPO(lm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        completions, sampled = _sample(policy, prompts, 4, seed=9)
        assert max(len(c) for c in completions) > 2
        batch = make_group_batch(prompts, completions, [i for i in range(3) for _ in range(4)])
        ours = policy(batch, head="logprobs", options=OPTIONS)
    assert torch.equal(ours.detach(), torch.cat(sampled))
    lm.zero_grad(set_to_none=True)
    ours.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lm.parameters())
    lm.zero_grad(set_to_none=True)


def test_without_batch_invariance_the_logprobs_still_agree_to_rounding(lm):
    prompts, _, _ = _random_case([7, 12, 3, 30, 5], [[]] * 5, seed=2)
    policy = PolicyForGRPO(lm)
    plain = GRPOOptions(temperature=0.7, batch_invariant=False)
    completions, sampled = _sample(policy, prompts, 1, options=plain)
    batch = make_group_batch(prompts[:2], completions[:8], [0] * 4 + [1] * 4)
    ours = policy(batch, head="logprobs", options=plain).detach()
    assert torch.allclose(ours, torch.cat(sampled[:8]), rtol=0, atol=1e-5)
