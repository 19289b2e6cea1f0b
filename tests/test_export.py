"""An exported folder loads in other libraries as it is and scores like Reranker.

sentence-transformers' ``CrossEncoder(path)`` and transformers' ``AutoModelForCausalLM`` on a
folder written by ``write_ecosystem_files`` (what ``export_model`` calls) against
``Reranker.from_pretrained(path)``: the same prompt token ids and the same scores (fp32, 5e-5 on
scores spread ~1 apart), with and without instruction, with a demo tokenizer and, when
PRORANK_QWEN2_TOKENIZER is set, the real Qwen2 one. No training, no download.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from rerank_helpers import PAIRS, demo_tokenizer, export_tiny, qwen2_tokenizer_path

from prorank_fast.data import TEMPLATES, get_template
from prorank_fast.export import chat_template
from prorank_fast.rerank import Reranker

pytest.importorskip("sentence_transformers")
from sentence_transformers import CrossEncoder  # noqa: E402

SCORE_ATOL = 5e-5
INSTRUCTION = "Find the passage that answers the question"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return demo_tokenizer(tmp_path_factory.mktemp("demo_tok"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    return export_tiny(tmp_path_factory.mktemp("export"), tokenizer)


def _st_token_ids(ce, pairs, prompt=None) -> list[list[int]]:
    """The token ids sentence-transformers feeds the model (left padding removed)."""
    out = []
    for pair in pairs:
        feats = ce[0].preprocess([pair], prompt=prompt)
        out.append(feats["input_ids"][0][feats["attention_mask"][0].bool()].tolist())
    return out


def _assert_close(a, b, atol=SCORE_ATOL):
    a, b = [float(x) for x in a], [float(x) for x in b]
    assert len(a) == len(b)
    worst = max(abs(x - y) for x, y in zip(a, b, strict=True))
    assert worst <= atol, (worst, a, b)


def test_export_writes_the_files_other_loaders_read(exported):
    config = json.loads((exported / "config.json").read_text())
    entry = config["prorank"]
    assert entry["template"] == "prorank" and entry["output_tokens"] == ["1", "0"]
    assert entry["token_weights"] == [1.0, -1.0] and entry["max_length"] == 320
    assert entry["sentence_transformers"] is True and entry["tokenizer_parity"] is True
    assert entry["vllm_hf_overrides"] == {
        "architectures": ["Qwen2ForSequenceClassification"],
        "classifier_from_token": ["0", "1"],
        "method": "from_2_way_softmax",
    }
    logit_score = json.loads((exported / "1_LogitScore" / "config.json").read_text())
    assert [logit_score["true_token_id"], logit_score["false_token_id"]] == entry["output_token_ids"]
    st = json.loads((exported / "config_sentence_transformers.json").read_text())
    assert st["model_type"] == "CrossEncoder" and st["activation_fn"].endswith("Identity")
    assert (exported / "chat_template.jinja").is_file()


def test_crossencoder_matches_reranker(exported):
    reranker = Reranker.from_pretrained(exported)
    ce = CrossEncoder(str(exported))
    assert type(ce[1]).__name__ == "LogitScore"
    assert ce[0].max_seq_length == reranker.max_length == 320
    # the same prompts token for token, then the same scores
    assert _st_token_ids(ce, PAIRS) == reranker.tokenize(PAIRS)
    ours = reranker.predict(PAIRS)
    _assert_close(ce.predict(PAIRS, batch_size=2), ours)
    assert max(ours) - min(ours) > 0.5, ours  # the check can fail: pairs score differently
    # the instruction: CrossEncoder's prompt= (a system message) is our instruction
    assert _st_token_ids(ce, PAIRS, prompt=INSTRUCTION) == reranker.tokenize(PAIRS, INSTRUCTION)
    with_instruction = reranker.predict(PAIRS, instruction=INSTRUCTION)
    _assert_close(ce.predict(PAIRS, prompt=INSTRUCTION), with_instruction)
    assert max(abs(a - b) for a, b in zip(ours, with_instruction, strict=True)) > 1e-3
    # rank: the same order as CrossEncoder.rank, raw scores
    docs = [d for _, d in PAIRS]
    ours_rank = reranker.rank("what is the capital of france", docs, top_k=3)
    st_rank = ce.rank("what is the capital of france", docs, top_k=3)
    assert [r["corpus_id"] for r in ours_rank] == [r["corpus_id"] for r in st_rank]
    _assert_close([r["score"] for r in ours_rank], [r["score"] for r in st_rank])


def test_truncated_document_matches(exported):
    """A document longer than max_length: we cut the document; sentence-transformers cuts the
    rendered prompt and restores the template's suffix -- the same ids."""
    reranker = Reranker.from_pretrained(exported)
    ce = CrossEncoder(str(exported))
    pair = [("cat", "the cat sat on the mat " * 200 + "end")]
    ids = reranker.tokenize(pair)
    assert len(ids[0]) == 320
    assert _st_token_ids(ce, pair) == ids
    _assert_close(ce.predict(pair), reranker.predict(pair))


def test_default_instruction_is_in_the_export(tmp_path, tokenizer):
    folder = export_tiny(tmp_path, tokenizer, instruction=INSTRUCTION)
    reranker = Reranker.from_pretrained(folder)
    assert reranker.instruction == INSTRUCTION
    ce = CrossEncoder(str(folder))
    assert _st_token_ids(ce, PAIRS[:2]) == reranker.tokenize(PAIRS[:2], INSTRUCTION)
    _assert_close(ce.predict(PAIRS), reranker.predict(PAIRS))


def test_automodel_logit_difference_is_the_score(exported):
    from transformers import AutoModelForCausalLM

    reranker = Reranker.from_pretrained(exported)
    lm = AutoModelForCausalLM.from_pretrained(str(exported), dtype=torch.float32).eval()
    pos, neg = reranker.output_ids
    expected = []
    with torch.no_grad():
        for ids in reranker.tokenize(PAIRS):
            z = lm(input_ids=torch.tensor([ids])).logits[0, -1]
            expected.append(float(z[pos] - z[neg]))
    _assert_close(reranker.predict(PAIRS), expected)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("instruction", [None, INSTRUCTION])
def test_chat_template_renders_our_prompt(tokenizer, name, instruction):
    tpl = get_template(name)
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy: the template is set on it
    tokenizer.chat_template = chat_template(tpl)
    query, doc = "what is bm25", 'BM25 ranks documents.\n\nTwo paragraphs "quoted" {{ braces }}'
    messages = [{"role": "query", "content": query}, {"role": "document", "content": doc}]
    if instruction:
        messages.insert(0, {"role": "system", "content": instruction})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == tpl.text(query, doc, instruction)
    structured = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]
    assert tokenizer.apply_chat_template(structured, tokenize=False) == text
    with pytest.raises(Exception, match="role query"):
        tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False)


def test_autotokenizer_agrees_after_export(exported):
    """AutoTokenizer builds Qwen2Tokenizer (NFC) for a qwen2 model; the export adopts NFC so that
    every loader tokenizes alike (the demo tokenizer has no normalizer of its own)."""
    from transformers import AutoTokenizer

    from prorank_fast.modeling import load_tokenizer

    text = "cafe\u0301 \u212b"  # not NFC
    auto, ours = AutoTokenizer.from_pretrained(str(exported)), load_tokenizer(exported)
    assert type(auto).__name__ == "Qwen2Tokenizer"
    assert auto.encode(text, add_special_tokens=False) == ours.encode(text, add_special_tokens=False)


def test_other_token_weights_skip_sentence_transformers(tmp_path, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = export_tiny(tmp_path, tokenizer, token_weights=(2.0, -1.0))
    entry = json.loads((folder / "config.json").read_text())["prorank"]
    assert entry["sentence_transformers"] is False and entry["vllm_hf_overrides"] is None
    assert not (folder / "modules.json").exists()
    reranker = Reranker.from_pretrained(folder)
    assert reranker.token_weights == (2.0, -1.0)


def test_export_model_writes_ecosystem_files(tmp_path, tokenizer):
    """export_model (the training run's final/) goes through write_ecosystem_files."""
    from prorank_fast.config import load_recipe
    from prorank_fast.export import export_model
    from prorank_fast.modeling import build_tiny_model
    from prorank_fast.scoring import RerankerScorer

    cfg = load_recipe(None, ["data.max_length=300", "data.min_query_tokens=8"])
    lm = build_tiny_model({"initializer_range": 0.2}, len(tokenizer), tokenizer.pad_token_id)
    tpl = get_template(cfg.data.template)
    output_ids = tpl.output_token_ids(tokenizer)
    wrapped = RerankerScorer(lm, output_ids, (1.0, -1.0), "bce")
    target = tmp_path / "final"
    export_model(wrapped, lm, tokenizer, target, cfg, output_ids, (1.0, -1.0), is_main=True)
    entry = json.loads((target / "config.json").read_text())["prorank"]
    assert entry["max_length"] == 300 and entry["min_query_tokens"] == 8 and entry["sentence_transformers"]
    _assert_close(CrossEncoder(str(target)).predict(PAIRS), Reranker.from_pretrained(target).predict(PAIRS))


@pytest.mark.skipif(qwen2_tokenizer_path() is None, reason="PRORANK_QWEN2_TOKENIZER not set")
def test_real_qwen2_tokenizer(tmp_path):
    from prorank_fast.modeling import load_tokenizer

    tokenizer = load_tokenizer(qwen2_tokenizer_path())
    folder = export_tiny(tmp_path, tokenizer, max_length=256)
    reranker = Reranker.from_pretrained(folder)
    assert reranker.output_ids == (16, 15)
    ce = CrossEncoder(str(folder))
    assert (ce[1].true_token_id, ce[1].false_token_id) == (16, 15)
    assert _st_token_ids(ce, PAIRS) == reranker.tokenize(PAIRS)
    _assert_close(ce.predict(PAIRS), reranker.predict(PAIRS))
    _assert_close(ce.predict(PAIRS, prompt=INSTRUCTION), reranker.predict(PAIRS, instruction=INSTRUCTION))
    # Known limit of any string chat template: text ending in punctuation glues to the template's
    # "\n" (".\n" is one Qwen2 token). Same text, one boundary token different.
    pair = [("what is x?", "A document.")]
    ours, theirs = reranker.tokenize(pair)[0], _st_token_ids(ce, pair)[0]
    assert tokenizer.decode(ours) == tokenizer.decode(theirs) == get_template("prorank").text(*pair[0])
    assert len(theirs) == len(ours) - 2


def test_chat_template_file_is_the_tokenizers(exported):
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(str(exported))
    assert auto.chat_template == Path(exported, "chat_template.jinja").read_text()
