"""Stage 1 (GRPO prompt warmup): the shared-prefix pass against G independent full sequences,
sampling from one prefill, rewards, advantages, micro-batch normalisation, bad input."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from prorank_fast.config import RecipeError, load_recipe
from prorank_fast.data import Example
from prorank_fast.errors import Stage1InputError
from prorank_fast.grpo import (
    REWARD_FUNCTIONS,
    GRPOOptions,
    PolicyForGRPO,
    RewardContext,
    Rollouts,
    compute_rewards,
    group_advantages,
    make_group_batch,
    micro_batches,
    micro_scale,
    resolve_reward,
    sample_group_completions,
    stage1_prompts,
)
from prorank_fast.grpo.rewards import grade_shares, parse_answer
from prorank_fast.kernels.reference import grpo_loss_from_logprobs
from prorank_fast.modeling import backbone, build_tiny_model

V = 97
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = build_tiny_model(TINY, V, 0, torch.float32)
    model.set_attn_implementation("prorank_varlen")
    return model


def _random_case(lengths, completion_lengths, seed=1):
    """Prompts of the given lengths and, per prompt, completions of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in lengths]
    completions, owner = [], []
    for p, lens in enumerate(completion_lengths):
        for n in lens:
            completions.append(torch.randint(1, V, (n,), generator=g).tolist())
            owner.append(p)
    return prompts, completions, owner


def _full_sequence_logprobs(lm, prompts, completions, owner):
    """The reference: each completion as its own full sequence, standard SDPA attention, full logits."""
    lm.set_attn_implementation("sdpa")
    try:
        out = []
        for comp, p in zip(completions, owner, strict=True):
            ids = torch.tensor([prompts[p] + comp])
            logp = torch.log_softmax(lm(input_ids=ids).logits[0].float(), dim=-1)
            start = len(prompts[p]) - 1
            out.append(logp[start : start + len(comp)].gather(1, torch.tensor(comp)[:, None])[:, 0])
        return torch.cat(out)
    finally:
        lm.set_attn_implementation("prorank_varlen")


def _grads(lm):
    return {n: p.grad.detach().clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "completion_lengths",
    [
        [[1, 1, 1], [1, 1, 1], [1, 1, 1]],  # one-token answers: the whole group is one forward
        [[2, 2, 2], [2, 2, 2], [2, 2, 2]],  # answer + end token
        [[1, 3, 2], [4, 1, 1], [2, 5, 3]],  # mixed lengths
    ],
    ids=["one-token", "two-token", "mixed"],
)
def test_shared_prefix_logprobs_and_grads_equal_full_sequences(lm, completion_lengths):
    prompts, completions, owner = _random_case([7, 12, 3], completion_lengths)
    batch = make_group_batch(prompts, completions, owner)
    policy = PolicyForGRPO(lm)
    w = torch.randn(batch.token_ids.numel(), generator=torch.Generator().manual_seed(5))

    lm.zero_grad(set_to_none=True)
    ours = policy(batch, head="logprobs")
    (ours * w).sum().backward()
    ours_grads = _grads(lm)

    lm.zero_grad(set_to_none=True)
    ref = _full_sequence_logprobs(lm, prompts, completions, owner)
    (ref * w).sum().backward()
    ref_grads = _grads(lm)

    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert ours_grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(ours_grads[name], g, rtol=1e-5, atol=1e-5 * max(1.0, float(g.abs().max())))


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_shared_prefix_grpo_loss_equals_full_sequence_reference(lm, loss_type):
    """The fused loss through the shared-prefix pass = TRL's formula on full-sequence log-probs."""
    prompts, completions, owner = _random_case([9, 5], [[1, 2, 3, 1], [2, 2, 1, 4]], seed=3)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75, 0.5, -1.0, 1.5, -0.25])
    batch = make_group_batch(prompts, completions, owner, adv)
    g = torch.Generator().manual_seed(9)
    n = batch.token_ids.numel()
    batch.old_logprobs = -3.0 + 0.1 * torch.randn(n, generator=g)
    batch.ref_logprobs = -3.0 + 0.1 * torch.randn(n, generator=g)
    opts = GRPOOptions(beta=0.05, loss_type=loss_type, max_completion_length=4)

    lm.zero_grad(set_to_none=True)
    loss, metrics = PolicyForGRPO(lm)(batch, head="grpo", options=opts)
    loss.backward()
    ours_grads = _grads(lm)

    lm.zero_grad(set_to_none=True)
    logp = _full_sequence_logprobs(lm, prompts, completions, owner)
    ref_loss, _ = grpo_loss_from_logprobs(
        logp, batch.advantages, batch.seq_ids, batch.old_logprobs, batch.ref_logprobs,
        beta=0.05, loss_type=loss_type, max_completion_length=4,
    )  # fmt: skip
    ref_loss.backward()
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in _grads(lm).items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-5, atol=1e-5 * max(1.0, float(grad.abs().max())))
    assert float(metrics["kl"]) > 0


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_micro_batches_add_up_to_the_whole_step(lm, loss_type):
    """Splitting a step's groups into micro-batches (scaled by micro_scale, dapo by
    num_items_in_batch) gives the gradient of the step as one batch."""
    prompts, completions, owner = _random_case([6, 8, 4], [[1, 2], [3, 1], [2, 2]], seed=4)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.7, -0.7])
    rollouts = Rollouts(prompts, [1, 0, 1], completions, adv, adv.double(), {}, torch.zeros(3, dtype=torch.bool), 2)
    opts = GRPOOptions(loss_type=loss_type, max_completion_length=3)
    policy = PolicyForGRPO(lm)
    whole = rollouts.group_batch([0, 1, 2])
    tokens, seqs = whole.num_completion_tokens, whole.num_completions
    dapo_items = float(tokens) if loss_type == "dapo" else None

    lm.zero_grad(set_to_none=True)
    policy(whole, head="grpo", options=opts, num_items_in_batch=dapo_items)[0].backward()
    one = _grads(lm)

    lm.zero_grad(set_to_none=True)
    mbs = micro_batches(rollouts, [0, 1, 2], max_tokens=12)
    assert len(mbs) > 1
    for mb in mbs:
        b = rollouts.group_batch(mb)
        loss, _ = policy(b, head="grpo", options=opts, num_items_in_batch=dapo_items)
        (loss * micro_scale(loss_type, b.num_completion_tokens, b.num_completions, tokens, seqs)).backward()
    for name, grad in _grads(lm).items():
        torch.testing.assert_close(grad, one[name], rtol=1e-5, atol=1e-6)


def test_sampling_prefills_each_prompt_once_and_greedy_matches_full_decoding(lm):
    prompts, _, _ = _random_case([7, 12, 3], [[], [], []], seed=2)
    seen = []
    hook = lm.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    try:
        comps = sample_group_completions(
            PolicyForGRPO(lm), prompts, group_size=4, max_new_tokens=3, stop_ids=[0], temperature=0.0
        )
    finally:
        hook.remove()
    # one prefill of all prompts' tokens, then one token per completion per decode step
    assert seen[0] == sum(len(p) for p in prompts)
    assert all(n <= 3 * 4 for n in seen[1:]) and len(seen) <= 3
    lm.set_attn_implementation("sdpa")
    try:
        for p, prompt in enumerate(prompts):
            ids, greedy = torch.tensor([prompt]), []
            with torch.no_grad():
                for _ in range(3):
                    t = int(lm(input_ids=ids).logits[0, -1].argmax())
                    greedy.append(t)
                    ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            assert comps[4 * p : 4 * p + 4] == [greedy] * 4
    finally:
        lm.set_attn_implementation("prorank_varlen")


def test_sampling_is_seeded_and_stops_at_the_stop_token(lm):
    prompts, _, _ = _random_case([5, 9], [[], []], seed=6)
    policy = PolicyForGRPO(lm)

    def draw(seed, stop):
        return sample_group_completions(
            policy, prompts, group_size=8, max_new_tokens=4, stop_ids=stop, temperature=1.5,
            generator=torch.Generator().manual_seed(seed),
        )  # fmt: skip

    a, b = draw(1, [0]), draw(1, [0])
    assert a == b and draw(2, [0]) != a
    assert len(a) == 16 and len({tuple(c) for c in a}) > 1  # the G samples differ
    # with every token but one a stop token, completions end right after the first stop token
    stops = list(range(1, V))
    for comp in draw(3, stops):
        assert comp[-1] in stops or len(comp) == 4
        assert all(t not in stops for t in comp[:-1])


CTX = RewardContext(output_ids=(16, 15), stop_ids=(2,))


def test_format_and_correctness_rewards():
    comps = [[16], [15], [16, 2], [15, 2], [16, 5], [7], [16, 15], [], [2]]
    labels = [1, 1, 1, 0, 1, 0, 1, 0, 0]
    total, parts = compute_rewards(("format", "correctness"), (1.0, 2.0), comps, labels, CTX)
    assert parts["format"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert parts["correctness"].tolist() == [1, 0, 1, 1, 0, 0, 0, 0, 0]
    assert total.tolist() == [3, 1, 3, 3, 0, 0, 0, 0, 0]


def test_rewards_are_pluggable_by_module_path(monkeypatch):
    module = types.ModuleType("my_rewards")
    module.shortest = lambda comps, labels, ctx: [1.0 / len(c) for c in comps]
    monkeypatch.setitem(sys.modules, "my_rewards", module)
    total, parts = compute_rewards(("my_rewards:shortest",), (1.0,), [[16], [16, 2]], [1, 1], CTX)
    assert total.tolist() == [1.0, 0.5]
    with pytest.raises(Stage1InputError, match="unknown reward 'nope'"):
        resolve_reward("nope")
    with pytest.raises(Stage1InputError, match="cannot import"):
        resolve_reward("my_rewards:missing")


def test_group_advantages_follow_trl():
    rewards = torch.tensor([1.0, 0.0, 2.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    grouped = rewards.view(-1, 3)
    centred = grouped - grouped.mean(1, keepdim=True)
    adv, zero = group_advantages(rewards, 3, "group")
    torch.testing.assert_close(adv.view(-1, 3), centred / (grouped.std(1, keepdim=True) + 1e-4))
    assert zero.tolist() == [False, True]
    adv, _ = group_advantages(rewards, 3, "batch")
    torch.testing.assert_close(adv.view(-1, 3), centred / (rewards.std() + 1e-4))
    adv, _ = group_advantages(rewards, 3, "none")
    torch.testing.assert_close(adv.view(-1, 3), centred)
    assert adv[3:].abs().sum() == 0  # a zero-variance group carries no advantage


class _Tok:
    """The few tokenizer calls PromptTemplate.build makes, over characters."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 200 + 1 for c in t] for t in texts]}

    def encode(self, text, add_special_tokens=False):
        return [ord(c) % 200 + 1 for c in text]


def test_stage1_prompts_reject_non_binary_labels_and_empty_text():
    good = Example("what is bm25", ["a ranking function"], [1.0], None, None, "pairs.jsonl:1")
    with pytest.raises(Stage1InputError, match=r"pairs.jsonl:7: field 'label' \(document 0\).*got 2.0"):
        stage1_prompts([good, Example("q", ["d"], [2.0], None, None, "pairs.jsonl:7")], None, None,
                       max_length=64, min_query_tokens=4)  # fmt: skip
    with pytest.raises(Stage1InputError, match="pairs.jsonl:3: field 'query'"):
        stage1_prompts([Example("  ", ["d"], [1.0], None, None, "pairs.jsonl:3")], None, None,
                       max_length=64, min_query_tokens=4)  # fmt: skip
    with pytest.raises(Stage1InputError, match="pairs.jsonl:4: field 'document'"):
        stage1_prompts([Example("q", [""], [0.0], None, None, "pairs.jsonl:4")], None, None,
                       max_length=64, min_query_tokens=4)  # fmt: skip


@pytest.mark.parametrize(
    "override, message",
    [
        ("stage1.group_size=1", "stage1.group_size must be >= 2"),
        ("stage1.max_new_tokens=0", "stage1.max_new_tokens must be >= 1"),
        ("stage1.scale_rewards=sometimes", "stage1.scale_rewards must be one of"),
        ("stage1.rewards=[format]", "same, non-zero length"),
    ],
)
def test_bad_stage1_settings_fail_when_the_recipe_loads(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("tiny", ["stage1.enabled=true", override])


def test_parse_answer_grades_and_extracts_the_answer():
    ctx = RewardContext(output_ids=(16, 15), stop_ids=(2,), digit_ids=frozenset({16, 15, 17}))
    cases = {
        (16,): (16, "exact"),
        (15, 2): (15, "exact"),
        (16, 2, 7): (16, "first"),  # the end token then more: not the exact format
        (16, 7, 8): (16, "first"),
        (7, 8, 15, 9): (15, "anywhere"),
        (7, 15, 16, 9): (None, "none"),  # "01": a number, not an answer
        (7, 17, 16, 9): (None, "none"),  # glued to another digit
        (7, 8, 2, 16): (None, "none"),  # after the end token nothing counts
        (): (None, "none"),
    }
    for completion, expected in cases.items():
        assert parse_answer(list(completion), ctx) == expected, completion
    comps = [list(c) for c in cases]
    labels = [1, 0, 1, 0, 0, 1, 1, 1, 0]
    graded = REWARD_FUNCTIONS["graded_format"](comps, labels, ctx)
    assert graded == [1.0, 1.0, 0.5, 0.5, 0.25, 0.0, 0.0, 0.0, 0.0]
    assert REWARD_FUNCTIONS["parsed_correctness"](comps, labels, ctx) == [1, 1, 1, 0, 1, 0, 0, 0, 0]
    # the strict rewards are unchanged by the parser: exact answers only
    assert REWARD_FUNCTIONS["correctness"](comps, labels, ctx) == [1, 1, 0, 0, 0, 0, 0, 0, 0]
    shares = grade_shares(comps, ctx)
    assert shares == {"format_exact": 2 / 9, "format_first": 2 / 9, "format_anywhere": 1 / 9, "format_none": 4 / 9}


def test_balanced_prompt_order_alternates_labels():
    from prorank_fast.stages.stage1 import _batch, _prompt_order

    labels = [1] * 10 + [0] * 30
    order = _prompt_order(labels, seed=3, epoch=0, balance=True)
    assert len(order) == 20 and len(set(order)) == 20
    assert [labels[i] for i in order] == [1, 0] * 10
    batch = _batch(order, 1, 8, seed=3, index=1)
    assert sorted(labels[i] for i in batch) == [0] * 4 + [1] * 4 and set(batch) == set(order[8:16])
    assert _prompt_order(labels, 3, 0, True) == order and _prompt_order(labels, 3, 1, True) != order
    assert sorted(_prompt_order(labels, 3, 0, False)) == list(range(40))


def test_rollouts_concat_keeps_groups_and_advantages():
    ctx = RewardContext(output_ids=(16, 15), stop_ids=(2,))

    def rollouts(comps, labels):
        per = [y for y in labels for _ in range(2)]
        rewards, parts = compute_rewards(("format", "correctness"), (1.0, 1.0), comps, per, ctx)
        adv, zero = group_advantages(rewards, 2, "group")
        r = Rollouts([[1, 2]] * len(labels), labels, comps, adv.float(), rewards, parts, zero, 2)
        r.extra["answer_stats"] = grade_shares(comps, ctx)
        return r

    a = rollouts([[16], [15], [7], [7]], [1, 0])
    b = rollouts([[15], [15]], [0])
    both = Rollouts.concat([a, b])
    assert both.completions == a.completions + b.completions and both.labels == [1, 0, 0]
    assert both.kept_groups() == [0] and both.extra["draws"] == 2
    torch.testing.assert_close(both.advantages, torch.cat([a.advantages, b.advantages]))
    assert both.extra["answer_stats"]["format_exact"] == 4 / 6


def test_answer_entropy_floor_adds_its_penalty_and_raises_the_entropy(lm):
    """The penalty is coef * sum_p max(0, floor - H_p) * penalty_scale, where H_p is the entropy of
    softmax(z[output_ids]) at prompt p's last position; its gradient raises H."""
    lm = copy.deepcopy(lm)
    with torch.no_grad():  # a confident answer: the random model's is a coin (entropy ~ ln 2)
        lm.lm_head.weight[16] *= 40.0
    prompts, completions, owner = _random_case([5, 7], [[1, 2], [1]], seed=3)
    batch = make_group_batch(prompts, completions, owner, advantages=[0.5, -0.5, 1.0, -1.0][: len(completions)])
    policy = PolicyForGRPO(lm)
    base = GRPOOptions()
    floor = GRPOOptions(output_ids=(16, 15), answer_entropy_floor=0.69, answer_entropy_coef=2.0)
    loss0, _ = policy(batch, head="grpo", options=base)
    loss1, metrics = policy(batch, head="grpo", options=floor, penalty_scale=0.25)
    with torch.no_grad():  # each prompt alone, its last position
        last = torch.stack([backbone(lm)(input_ids=torch.tensor([p])).last_hidden_state[0, -1] for p in prompts])
        entropy = torch.distributions.Categorical(logits=last @ lm.lm_head.weight[[16, 15]].t()).entropy()
    assert float(entropy.min()) < 0.5
    torch.testing.assert_close(metrics["answer_entropy"], entropy.mean(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss1 - loss0, 2.0 * (0.69 - entropy).clamp(min=0).sum() * 0.25, atol=1e-5, rtol=1e-4)
    # the penalty's gradient points against the answer entropy's: descending it raises the entropy
    params = [p for p in lm.parameters() if p.requires_grad]
    penalty = policy(batch, head="grpo", options=floor)[0] - policy(batch, head="grpo", options=base)[0]
    entropy_now = policy(batch, head="grpo", options=floor)[1]["answer_entropy"]
    assert entropy_now.requires_grad is False  # a metric: detached
    g_penalty = torch.autograd.grad(penalty, params, allow_unused=True)
    states = policy._states(batch)[: batch.num_prompts]
    h = torch.distributions.Categorical(logits=states @ lm.lm_head.weight[[16, 15]].t()).entropy().sum()
    g_entropy = torch.autograd.grad(h, params, allow_unused=True)
    pairs = [(a, b) for a, b in zip(g_penalty, g_entropy, strict=True) if a is not None and b is not None]
    dot = sum(float((a * b).sum()) for a, b in pairs)
    assert dot < 0
