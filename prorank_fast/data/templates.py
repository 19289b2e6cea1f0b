"""Prompt templates built at token-id level (no BOS): the fixed parts and the user text are
encoded separately and concatenated, so truncation can cut the document (and, as a last
resort, the query) without touching the template."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DataError, InputError
from .records import Example


@dataclass(frozen=True)
class PromptTemplate:
    """A relevance prompt, assembled from separately encoded pieces (no BOS):

    ``prefix + [instruction_format] + query_label + " " + query + document_label + " " + document + suffix``

    The label and its value are encoded apart, with the value's leading space kept in the
    value: for byte-level BPE (Qwen) a word boundary is a pre-token boundary, so the
    pieces decode to the exact template string and cutting the value never touches a label.
    """

    name: str
    prefix: str
    instruction_format: str
    query_label: str
    document_label: str
    suffix: str
    positive_token: str
    negative_token: str
    default_instruction: str | None = None
    # score = sum_k w_k z[token_k] over (positive, negative): the logit difference
    token_weights: tuple[float, float] = (1.0, -1.0)
    # The chat-format tokens the template is written in: each must be one token of the model's
    # vocabulary (a model without them would read the prompt as plain text).
    chat_tokens: tuple[str, ...] = ("<|im_start|>", "<|im_end|>")

    def text(self, query: str, document: str, instruction: str | None = None) -> str:
        """The prompt as a string (what :meth:`build` decodes to without truncation)."""
        instruction = instruction or self.default_instruction
        head = self.instruction_format.format(instruction=instruction) if instruction else ""
        return f"{self.prefix}{head}{self.query_label} {query}{self.document_label} {document}{self.suffix}"

    def output_token_ids(self, tokenizer) -> tuple[int, int]:
        """(positive_id, negative_id) of the output set, e.g. ("1", "0") -> (16, 15) with Qwen2.

        Raises:
            InputError: a token that the tokenizer does not encode as exactly one id.
        """
        ids = []
        for token in (self.positive_token, self.negative_token):
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1:
                raise InputError(
                    f"template {self.name!r}: output token {token!r} is {len(encoded)} tokens {encoded} "
                    f"with this tokenizer ({type(tokenizer).__name__}); it must be exactly one"
                )
            ids.append(int(encoded[0]))
        return ids[0], ids[1]

    def check_tokenizer(self, tokenizer, source: str) -> tuple[int, int]:
        """Check that the tokenizer of `source` (a model or tokenizer path) has every chat token
        of the template as one token, and the output tokens as one token each; returns the
        output ids. Raises InputError naming `source` and the missing tokens."""
        missing = []
        for token in self.chat_tokens:
            encoded = tokenizer.encode(token, add_special_tokens=False)
            if len(encoded) != 1 or encoded[0] == tokenizer.unk_token_id:
                missing.append(f"{token!r} -> {len(encoded)} tokens {encoded[:6]}")
        if missing:
            raise InputError(
                f"{source}: the tokenizer lacks the special tokens template {self.name!r} is written in "
                f"({'; '.join(missing)}): use a model with this chat format or another data.template"
            )
        try:
            return self.output_token_ids(tokenizer)
        except InputError as exc:
            raise InputError(f"{source}: {exc}") from None

    def build(
        self,
        tokenizer,
        query: str,
        document: str,
        instruction: str | None = None,
        max_length: int = 512,
        min_query_tokens: int = 64,
    ) -> list[int]:
        """Token ids of one prompt, at most ``max_length`` long.

        Truncation cuts the document's end first; only if the prompt with an empty
        document is still too long is the query's end cut, never below
        ``min_query_tokens`` (a shorter query is kept whole).

        Raises:
            DataError: the template, the instruction and the query floor exceed max_length.
        """
        return self.build_group(tokenizer, query, [document], instruction, max_length, min_query_tokens)[0]

    def build_group(
        self,
        tokenizer,
        query: str,
        documents: Sequence[str],
        instruction: str | None = None,
        max_length: int = 512,
        min_query_tokens: int = 64,
        *,
        source: str | None = None,
        document_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[list[int]]:
        """:meth:`build` for one query and several documents ([len(documents)] lists of
        ids); ``document_ids`` skips encoding when the caller encoded ``" " + doc`` already."""
        head, middle, suffix = _fixed_pieces(self, tokenizer, instruction or self.default_instruction)
        query_ids = _encode_user(tokenizer, [" " + query], max_length)[0]
        fixed = len(head) + len(middle) + len(suffix)
        room_for_query = max_length - fixed
        if len(query_ids) > room_for_query:
            floor = min(len(query_ids), min_query_tokens)
            if floor > room_for_query:
                where = f"{source}: " if source else ""
                raise DataError(
                    f"{where}max_length={max_length} is too small for template {self.name!r}: {fixed} template "
                    f"tokens + {floor} query tokens (min_query_tokens={min_query_tokens}) do not fit",
                    source=source,
                    field="max_length",
                    reason="too_long",
                )
            query_ids = query_ids[:room_for_query]
        room = max_length - fixed - len(query_ids)
        if document_ids is None:
            document_ids = _encode_user(tokenizer, [" " + d for d in documents], max(room, 1))
        start = head + query_ids + middle
        return [start + list(ids[:room]) + suffix for ids in document_ids]


_QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


PRORANK_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)


QWEN3_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)


TEMPLATES: dict[str, PromptTemplate] = {
    # mxbai-rerank-v2 (DESIGN.md), output set "1" / "0"
    "prorank": PromptTemplate(
        name="prorank",
        prefix=f"<|im_start|>system\n{_QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\n",
        instruction_format="instruction: {instruction}\n",
        query_label="query:",
        document_label="\ndocument:",
        suffix=f"\n{PRORANK_TASK}<|im_end|>\n<|im_start|>assistant\n",
        positive_token="1",
        negative_token="0",
    ),
    # Qwen3-Reranker's model card, output set "yes" / "no"; its default instruction
    "qwen3": PromptTemplate(
        name="qwen3",
        prefix=f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n",
        instruction_format="<Instruct>: {instruction}\n",
        query_label="<Query>:",
        document_label="\n<Document>:",
        suffix="<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        positive_token="yes",
        negative_token="no",
        default_instruction="Given a web search query, retrieve relevant passages that answer the query",
    ),
}


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    if isinstance(name, PromptTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}") from None


# Encoded fixed pieces per tokenizer (weakly held) and (template, instruction).
_FIXED_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _encode_user(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    """User text (query, document): a literal "<|im_end|>" in it stays text, never the
    control token, so a document cannot close the template's turn."""
    kwargs = {"add_special_tokens": False, "truncation": True, "max_length": max(max_length, 1)}
    try:
        out = tokenizer(texts, split_special_tokens=True, **kwargs)
    except TypeError:  # tokenizers without the option
        out = tokenizer(texts, **kwargs)
    return [list(ids) for ids in out["input_ids"]]


def _fixed_pieces(template: PromptTemplate, tokenizer, instruction: str | None):
    """(head, middle, suffix) ids: prefix + instruction + query label; document label; suffix."""
    try:
        cache = _FIXED_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    key = (template, instruction)
    if key not in cache:
        prefix, label_q, label_d, suffix = _encode(
            tokenizer, [template.prefix, template.query_label, template.document_label, template.suffix]
        )
        head = prefix
        if instruction:
            # the instruction is user text too, but the template owns its label
            formatted = template.instruction_format.format(instruction=instruction)
            head = head + _encode_user(tokenizer, [formatted], 1 << 30)[0]
        cache[key] = (head + label_q, label_d, suffix)
    return cache[key]


@dataclass
class TokenizedGroup:
    """One query's prompts: ``input_ids`` [num_docs][len_i] (each at most max_length),
    ``labels`` [num_docs], ``teacher_scores`` [num_docs] or None, ``source`` as in Example."""

    input_ids: list[list[int]]
    labels: list[float]
    teacher_scores: list[float] | None
    source: str


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    template: str | PromptTemplate,
    max_length: int,
    min_query_tokens: int,
    *,
    chunk: int = 1024,
) -> list[TokenizedGroup]:
    """Prompts for every (query, document) pair, documents encoded in batches of ``chunk``
    examples (one fast-tokenizer call each).

    Raises:
        DataError: a prompt that cannot fit max_length (names the example's source).
    """
    template = get_template(template)
    groups: list[TokenizedGroup] = []
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        flat = [" " + doc for ex in part for doc in ex.docs]
        # upper bound: a document never gets more than max_length tokens
        doc_ids = _encode_user(tokenizer, flat, max_length) if flat else []
        offset = 0
        for ex in part:
            ids = template.build_group(
                tokenizer, ex.query, ex.docs, ex.instruction, max_length, min_query_tokens,
                source=ex.source, document_ids=doc_ids[offset : offset + len(ex.docs)],
            )  # fmt: skip
            offset += len(ex.docs)
            teacher = list(ex.teacher_scores) if ex.teacher_scores is not None else None
            groups.append(TokenizedGroup(ids, list(ex.labels), teacher, ex.source))
    return groups
