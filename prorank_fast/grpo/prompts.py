"""Stage-1 prompts: binary-labelled (query, document) pairs as template token ids, and the
end-of-turn ids that close a completion."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import Stage1InputError


@dataclass
class Stage1Prompt:
    """One binary-labelled (query, document) prompt, tokenized with the template."""

    ids: list[int]
    label: int  # 1 relevant, 0 not
    source: str  # "file:line" of the record


def stage1_prompts(examples, tokenizer, template, *, max_length: int, min_query_tokens: int, instruction=None):
    """Every (query, document, label) of `examples` as a Stage1Prompt.

    Raises Stage1InputError (naming the record) for a label outside {0, 1} or an empty
    query / document: checked for all records before any prompt is built.
    """
    for ex in examples:
        if not ex.query.strip():
            raise Stage1InputError(f"{ex.source}: field 'query': empty query (stage 1 needs a prompt)")
        for k, (doc, label) in enumerate(zip(ex.docs, ex.labels, strict=True)):
            if label not in (0, 1):
                raise Stage1InputError(
                    f"{ex.source}: field 'label' (document {k}): stage 1 needs binary labels 0/1, got {label!r}"
                )
            if not doc.strip():
                raise Stage1InputError(f"{ex.source}: field 'document' (document {k}): empty document")
    prompts = []
    for ex in examples:
        for doc, label in zip(ex.docs, ex.labels, strict=True):
            ids = template.build(
                tokenizer, ex.query, doc, instruction=ex.instruction or instruction,
                max_length=max_length, min_query_tokens=min_query_tokens,
            )  # fmt: skip
            prompts.append(Stage1Prompt(ids, int(label), ex.source))
    if not prompts:
        raise Stage1InputError("stage 1: no prompts in the training data")
    return prompts


def stop_token_ids(tokenizer) -> tuple[int, ...]:
    """End-of-turn / EOS ids that end a completion: <|im_end|> (Qwen chat) and eos."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(int(im_end))
    return tuple(sorted(ids))


def digit_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokens that are digits (with or without a leading space marker): an answer
    token next to one is part of a number (rewards.parse_answer)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return frozenset(i for i, t in enumerate(tokens) if t and t.lstrip("Ġ▁ ").isdigit())
