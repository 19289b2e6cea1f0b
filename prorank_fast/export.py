"""What an exported folder needs so that other libraries load it as it is.

``export_model`` writes ``save_pretrained`` safetensors + the tokenizer, then calls
:func:`write_ecosystem_files`, which adds:

* ``config.json["prorank"]``: template, output-set token ids and weights, instruction,
  max_length (what :class:`prorank_fast.rerank.Reranker` reads), plus the vLLM overrides;
* ``chat_template.jinja``: the prompt template as a chat template with ``query`` /
  ``document`` roles (and an optional ``system`` message = the instruction), the roles
  sentence-transformers and vLLM's score API give a (query, document) pair;
* sentence-transformers files (``modules.json``, ``config_sentence_transformers.json``,
  ``sentence_bert_config.json``, ``1_LogitScore/config.json``): ``CrossEncoder(path)`` builds
  Transformer(text-generation) + LogitScore on *our* output-set ids (it defaults to "yes"/"no")
  with the identity activation, so that its ``predict`` returns the same raw score
  ``z[pos] - z[neg]`` as ``Reranker.predict``.

Two facts shape it (transformers 5.24, sentence-transformers 6.2):

1. ``AutoTokenizer`` ignores ``tokenizer_class`` for a ``qwen2`` model and rebuilds
   ``Qwen2Tokenizer`` from the vocabulary and merges with Qwen2's pipeline (NFC normalizer,
   Qwen2 split regex). A tokenizer trained with ``tokenizers`` (the demo's) has no normalizer,
   so the two disagree on non-NFC text. :func:`align_tokenizer_files` adopts the normalizer that
   AutoTokenizer builds into ``tokenizer.json`` when that (and only that) makes every loader
   tokenize alike, and warns otherwise.
2. A chat template renders a string that is tokenized whole, while our prompts are built at
   token-id level (each piece encoded apart, as mxbai-rerank-v2's own code does). The two
   agree token for token except where a query or document ends in punctuation or whitespace:
   Qwen2's pre-tokenizer glues that to the template's following "\\n" (e.g. ".\\n" is one token),
   so sentence-transformers / vLLM see one different token there. Documented in the README;
   :class:`~prorank_fast.rerank.Reranker` is the exact path.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

from .data.templates import PromptTemplate, get_template
from .io import atomic_write_dir

__all__ = [
    "CHAT_TEMPLATE_FILE",
    "export_model",
    "PRORANK_KEY",
    "align_tokenizer_files",
    "chat_template",
    "prorank_config",
    "vllm_hf_overrides",
    "write_ecosystem_files",
    "write_sentence_transformers_files",
]

PRORANK_KEY = "prorank"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
LOGIT_SCORE_DIR = "1_LogitScore"

# Strings whose token ids must agree between our tokenizer and AutoTokenizer's: the template
# pieces are added per template; these cover normalization (NFC-sensitive forms), punctuation,
# digits, whitespace runs and special tokens.
_TOKENIZER_PROBES = (
    "what is the capital of France?",
    " A document.\nWith two lines,  double  spaces\tand a tab.",
    "cafe\u0301 \u212b \u00c5 \ufb01 na\u00efve \u00fcber 123 4567",
    "<|im_start|>user\nquery<|im_end|>\n<|endoftext|>",
)


def prorank_config(
    tokenizer,
    template: str | PromptTemplate,
    output_ids: Sequence[int],
    token_weights: Sequence[float],
    instruction: str | None,
    max_length: int,
    min_query_tokens: int | None = None,
) -> dict:
    """The ``config.json["prorank"]`` entry (JSON-ready)."""
    tpl = get_template(template)
    entry = {
        "template": tpl.name,
        "output_token_ids": [int(i) for i in output_ids],
        "output_tokens": [tokenizer.convert_ids_to_tokens(int(i)) for i in output_ids],
        "token_weights": [float(w) for w in token_weights],
        "instruction": instruction,
        "max_length": int(max_length),
    }
    if min_query_tokens is not None:
        entry["min_query_tokens"] = int(min_query_tokens)
    return entry


def _is_logit_difference(output_ids: Sequence[int], token_weights: Sequence[float]) -> bool:
    """score = z[a] - z[b]: what LogitScore(true, false) and vLLM's from_2_way_softmax compute."""
    return len(output_ids) == 2 and [float(w) for w in token_weights] == [1.0, -1.0]


def vllm_hf_overrides(config: dict, template: str | PromptTemplate) -> dict | None:
    """vLLM's ``hf_overrides`` that serve a *ForCausalLM export as a score model:
    ``{"architectures": ["<Arch>ForSequenceClassification"], "classifier_from_token": [neg, pos],
    "method": "from_2_way_softmax"}`` (vLLM's docs for mxbai-rerank-v2). from_2_way_softmax scores
    ``softmax([z[neg], z[pos]])[1] = sigmoid(z[pos] - z[neg])``. None when the score is not that
    logit difference or the architecture is not a *ForCausalLM."""
    tpl = get_template(template)
    entry = config.get(PRORANK_KEY, {})
    if not _is_logit_difference(entry.get("output_token_ids", ()), entry.get("token_weights", ())):
        return None
    archs = config.get("architectures") or []
    if not archs or not archs[0].endswith("ForCausalLM"):
        return None
    return {
        "architectures": [archs[0].removesuffix("ForCausalLM") + "ForSequenceClassification"],
        "classifier_from_token": [tpl.negative_token, tpl.positive_token],
        "method": "from_2_way_softmax",
    }


def _jinja_str(text: str) -> str:
    # A JSON string is a valid Jinja string literal (Jinja decodes \n, \", \\ and \uXXXX the same way).
    return json.dumps(text)


def chat_template(template: str | PromptTemplate, instruction: str | None = None) -> str:
    """A Jinja chat template that renders ``template.text(query, document, instruction)``.

    Messages: one with role ``query`` and one with role ``document`` (sentence-transformers'
    pair roles; vLLM's score templates use the same), optionally one with role ``system``
    whose content is the instruction (sentence-transformers puts ``CrossEncoder.predict(...,
    prompt=...)`` there). Without a system message ``instruction`` (else the template's
    default instruction) is used. Content may be a string or a list of ``{"text": ...}`` parts.
    Whatever ``add_generation_prompt`` says, the prompt ends with the assistant header: the
    score is read at that last position.
    """
    tpl = get_template(template)
    default = instruction or tpl.default_instruction
    before, marker, after = tpl.instruction_format.partition("{instruction}")
    if not marker:
        raise ValueError(f"template {tpl.name!r}: instruction_format has no {{instruction}} field")
    lines = [
        "{#- prorank-fast: template " + tpl.name + ", built by prorank_fast.export.chat_template -#}",
        "{%- set ns = namespace(query=none, document=none, instruction="
        + (_jinja_str(default) if default else "none")
        + ") -%}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}",
        "{%- else -%}{%- set text = message['content'] | map(attribute='text') | join('') -%}{%- endif -%}",
        "{%- if message['role'] == 'query' -%}{%- set ns.query = text -%}",
        "{%- elif message['role'] == 'document' -%}{%- set ns.document = text -%}",
        "{%- elif message['role'] == 'system' and text -%}{%- set ns.instruction = text -%}{%- endif -%}",
        "{%- endfor -%}",
        "{%- if ns.query is none or ns.document is none -%}"
        "{{- raise_exception('this reranker template needs one message with role query and one with role document')"
        " -}}{%- endif -%}",
        "{{- " + _jinja_str(tpl.prefix) + " -}}",
        "{%- if ns.instruction -%}{{- "
        + _jinja_str(before)
        + " ~ ns.instruction ~ "
        + _jinja_str(after)
        + " -}}{%- endif -%}",
        "{{- "
        + _jinja_str(tpl.query_label + " ")
        + " ~ ns.query ~ "
        + _jinja_str(tpl.document_label + " ")
        + " ~ ns.document ~ "
        + _jinja_str(tpl.suffix)
        + " -}}",
    ]
    return "\n".join(lines) + "\n"


def _encodings(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def align_tokenizer_files(folder: str | Path, tokenizer, probes: Sequence[str] = ()) -> bool:
    """Make ``AutoTokenizer.from_pretrained(folder)`` tokenize like ``tokenizer`` (the one saved there).

    If they disagree on the probe strings, adopt AutoTokenizer's normalizer into the saved
    ``tokenizer.json`` when that makes them agree (see the module docstring, fact 1); otherwise
    leave the files as they were and warn. Returns whether the two agree in the end.
    """
    from transformers import AutoTokenizer

    from .modeling import load_tokenizer

    folder = Path(folder)
    texts = list(_TOKENIZER_PROBES) + [p for p in probes if p]
    want = _encodings(tokenizer, texts)
    try:
        auto = AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001 - a loader that fails is reported, the export stays usable
        warnings.warn(f"{folder}: AutoTokenizer cannot load the exported tokenizer ({exc})", stacklevel=2)
        return False
    if _encodings(auto, texts) == want:
        return True
    tok_json = folder / "tokenizer.json"
    auto_normalizer = json.loads(auto.backend_tokenizer.to_str()).get("normalizer")
    if tok_json.is_file():
        original = tok_json.read_text(encoding="utf-8")
        data = json.loads(original)
        if data.get("normalizer") != auto_normalizer:
            data["normalizer"] = auto_normalizer
            tok_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
            ours, auto = load_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
            if _encodings(ours, texts) == _encodings(auto, texts):
                return True
            tok_json.write_text(original, encoding="utf-8")
    warnings.warn(
        f"{folder}: transformers' AutoTokenizer loads this tokenizer as {type(auto).__name__} and tokenizes "
        "differently from the saved tokenizer.json: sentence-transformers and vLLM will not reproduce "
        "Reranker's scores exactly",
        stacklevel=2,
    )
    return False


def write_sentence_transformers_files(
    folder: str | Path, output_ids: Sequence[int], token_weights: Sequence[float], max_length: int
) -> bool:
    """modules.json + config_sentence_transformers.json + sentence_bert_config.json + the LogitScore
    config, so that ``CrossEncoder(folder)`` scores like Reranker. Returns False (writes nothing)
    when the score is not ``z[a] - z[b]`` or ``z[a]``, which LogitScore cannot express."""
    folder = Path(folder)
    ids = [int(i) for i in output_ids]
    weights = [float(w) for w in token_weights]
    if _is_logit_difference(ids, weights):
        logit_score = {"true_token_id": ids[0], "false_token_id": ids[1]}
    elif len(ids) == 1 and weights == [1.0]:
        logit_score = {"true_token_id": ids[0], "false_token_id": None}
    else:
        return False
    logit_score["module_input_name"] = "causal_logits"
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": LOGIT_SCORE_DIR,
            "type": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore",
        },
    ]
    st_config = {
        "model_type": "CrossEncoder",
        # raw z[pos] - z[neg], as Reranker.predict; CrossEncoder's default for one label would be a sigmoid
        "activation_fn": "torch.nn.modules.linear.Identity",
        "prompts": {},
        "default_prompt_name": None,
    }
    try:
        import sentence_transformers
        import torch
        import transformers

        st_config["__version__"] = {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
        }
    except ImportError:
        pass
    method = {"method": "forward", "method_output_name": "logits"}
    transformer_config = {
        "transformer_task": "text-generation",
        # pinned rather than inferred: a pair always goes through the chat template as flat messages
        "modality_config": {"text": dict(method), "message": {**method, "format": "flat"}},
        "module_output_name": "causal_logits",
        # truncation at our max_length; sentence-transformers then restores the template's suffix
        "max_seq_length": int(max_length),
    }
    (folder / LOGIT_SCORE_DIR).mkdir(exist_ok=True)
    for path, payload in (
        (folder / "modules.json", modules),
        (folder / "config_sentence_transformers.json", st_config),
        (folder / "sentence_bert_config.json", transformer_config),
        (folder / LOGIT_SCORE_DIR / "config.json", logit_score),
    ):
        path.write_text(json.dumps(payload, indent=2) + "\n")
    return True


def write_ecosystem_files(
    folder: str | Path,
    tokenizer,
    template: str | PromptTemplate,
    output_ids: Sequence[int],
    token_weights: Sequence[float],
    instruction: str | None,
    max_length: int,
    min_query_tokens: int | None = None,
) -> dict:
    """Complete a folder that already holds ``save_pretrained`` weights, config.json and the tokenizer.

    Writes config.json["prorank"] (see :func:`prorank_config`; with ``vllm_hf_overrides`` and
    ``sentence_transformers`` / ``tokenizer_parity`` flags), chat_template.jinja, the
    sentence-transformers files, and aligns tokenizer.json with AutoTokenizer. Returns the
    ``prorank`` entry written.
    """
    folder = Path(folder)
    tpl = get_template(template)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    entry = prorank_config(tokenizer, tpl, output_ids, token_weights, instruction, max_length, min_query_tokens)
    config[PRORANK_KEY] = entry

    (folder / CHAT_TEMPLATE_FILE).write_text(chat_template(tpl, instruction), encoding="utf-8")
    tok_config_path = folder / "tokenizer_config.json"
    if tok_config_path.is_file():
        tok_config = json.loads(tok_config_path.read_text())
        # an inline chat template (e.g. Qwen2's chat one) would compete with chat_template.jinja
        if tok_config.pop("chat_template", None) is not None:
            tok_config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n")

    pieces = [tpl.prefix, tpl.query_label, tpl.document_label, tpl.suffix, tpl.positive_token, tpl.negative_token]
    entry["tokenizer_parity"] = align_tokenizer_files(folder, tokenizer, pieces)
    entry["sentence_transformers"] = write_sentence_transformers_files(folder, output_ids, token_weights, max_length)
    entry["vllm_hf_overrides"] = vllm_hf_overrides(config, tpl)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return entry


def export_model(root, lm, tokenizer, target: str | Path, cfg, output_ids: Sequence[int],
                 token_weights: Sequence[float], *, is_main: bool) -> None:  # fmt: skip
    """Save the trained model as a folder every loader reads: ``save_pretrained`` safetensors,
    the tokenizer, then :func:`write_ecosystem_files` (template, output ids, chat template,
    sentence-transformers files), built beside `target` and renamed into place.

    root: the training root (a RerankerScorer or PolicyForGRPO, FSDP-sharded or not) whose
    state holds the weights under ``lm.``; lm: the *ForCausalLM inside it (its config and class
    write the files); cfg: the Recipe (its data section: template, instruction, lengths).
    Every rank must call it (gathering a sharded state is collective); only the main rank writes.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return
    lm_state = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        if key.startswith("lm."):
            lm_state[key[3:]] = value

    def fill(folder: Path) -> None:
        lm.save_pretrained(folder, state_dict=lm_state, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        write_ecosystem_files(
            folder, tokenizer, cfg.data.template, output_ids, token_weights, cfg.data.instruction,
            cfg.data.max_length, cfg.data.min_query_tokens,
        )  # fmt: skip

    atomic_write_dir(target, fill)
