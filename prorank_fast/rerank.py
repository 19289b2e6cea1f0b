"""Inference: score (query, document) pairs and rank documents with a trained reranker.

    from prorank_fast import Reranker

    reranker = Reranker.from_pretrained("runs/tiny/final")          # a folder export_model wrote
    reranker.predict([("what is bm25", "BM25 is a ranking function ..."), ...])   # [float], z["1"] - z["0"]
    reranker.rank("what is bm25", documents, top_k=10)               # [{"corpus_id", "score", "text"}]

How a call runs: prompts are built at token-id level with the export's template
(:meth:`PromptTemplate.build_group`, documents encoded in one batched tokenizer call, only the
document truncated), ordered (a query's prompts together, longest first; without shared
prefixes simply longest first) and cut into packed batches of at most ``max_tokens`` tokens
(no padding: ``position_ids`` restart per sequence, ``cu_seqlens``). The backbone runs
once per packed batch with varlen attention ("prorank_varlen": flash-attn or torch varlen on
CUDA, SDPA per document on CPU), exactly as :class:`~prorank_fast.scoring.RerankerScorer`
runs it in training; only each sequence's last position reaches the head, and only the K
output-set rows of the LM head are read (:func:`prorank_fast.kernels.restricted_vocab_score`).
bf16 on CUDA, fp32 on CPU by default.

Shared prefixes (``shared_prefix=True``, the default): a template puts the system turn, the
instruction and the query before the document, so every prompt of one query starts with the
same tokens. ``predict`` knows where that part ends (the template's pieces before the
document, a function of the query alone); a packed batch then runs in two passes through the
same scorer: the batch's query prefixes once (their keys/values kept per layer, a
:class:`~prorank_fast.modeling.SharedPrefix` store), then the documents' remaining tokens, each
attending to its query's stored keys/values and its own tokens, positions continuing after
the prefix. A query whose documents span several batches has its prefix recomputed in each
(the same tokens, so the same keys/values). Identical prompts of one call are scored once and
the score copied. Batch invariance holds in either mode: a prompt's split point depends on
its own query only, the prefix pass treats each prefix as its own sequence, and every linear
is per-row invariant, so a score never depends on what else is in the call. With batch
invariance the two modes differ by rounding only (fp32: ~1e-7 on the tiny test model, ~1e-5
on a 30-layer one, as a padded forward differs from either); with ``exact_shared_prefix`` as
well, attention runs on fixed blocks (modeling.blocked_attention) and they give the same bits.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from .data.records import iter_jsonl, text_field
from .errors import DataError
from .modeling import (
    ATTN_IMPLEMENTATION,
    SharedPrefix,
    batch_invariant_linears,
    enable_autocast,
    load_tokenizer,
    resolve_dtype,
    set_varlen_backend,
)
from .packing import PrefixPass, pack_sequences, shared_prefix_batches
from .scoring import RerankerScorer

__all__ = ["DEFAULT_MAX_TOKENS", "PROGRESS_MIN_PAIRS", "Reranker"]

DEFAULT_MAX_TOKENS = 16384  # tokens per packed batch
PROGRESS_MIN_PAIRS = 1024  # show_progress_bar=None shows a bar from this many pairs on
_DEFAULT_MIN_QUERY_TOKENS = 64  # data.min_query_tokens' default


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_pairs(pairs: Sequence) -> list[tuple[str, str]]:
    if isinstance(pairs, tuple) and len(pairs) == 2 and all(isinstance(x, str) for x in pairs):
        raise TypeError("predict() takes a list of (query, document) pairs; wrap a single pair in a list")
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise TypeError(f"pairs[{i}]: expected a (query, document) pair, got {type(pair).__name__}")
        query, document = pair
        for name, value in (("query", query), ("document", document)):
            if not isinstance(value, str):
                raise TypeError(f"pairs[{i}]: the {name} must be a string, got {type(value).__name__}")
        out.append((query, document))
    return out


class Reranker:
    """A *ForCausalLM reranker: ``score = sum_k w_k * z[token_k]`` at the prompt's last position.

    Build it with :meth:`from_pretrained` (an exported folder) or directly on an in-memory
    model and tokenizer (e.g. during training)::

        Reranker(model, tokenizer, template="prorank", output_ids=(16, 15), token_weights=(1.0, -1.0))

    Args:
        model: a transformers *ForCausalLM (decoder at ``model.model``, LM head without bias).
            Its attention implementation is switched to "prorank_varlen" (packed batches need it);
            it is put in eval mode during a call and back in its own mode after.
        tokenizer: a fast tokenizer.
        template: a template name ("prorank", "qwen3") or a PromptTemplate.
        output_ids: the output-set token ids; None = the template's tokens under this tokenizer.
        token_weights: one weight per output id; None = the template's (z[pos] - z[neg]).
        instruction: the default instruction (None: the template's own default, if any).
        max_length: tokens per prompt, template included (only the document is cut).
        min_query_tokens: the query is never cut below this many tokens.
        max_tokens: tokens per packed batch (raised to max_length if smaller).
        device: where the model runs (default: the model's device).
        scorer: the module whose forward scores a packed batch; None wraps `model` in a
            RerankerScorer. The trainer passes its own (FSDP-sharded) root, which gathers the
            parameters in its forward: the model is then used as it is (not moved, not switched).
        batch_invariant: a pair's score is bitwise the same whatever else is in the call (order,
            neighbours, duplicates, max_tokens, CPU threads): the model's linears run on fixed
            row tiles (:func:`~prorank_fast.modeling.batch_invariant_linears`). None (the default):
            on on CPU (measured cost ~15%), off on CUDA until the GPU suite has measured the
            fixed-block Triton matmul it uses there against cuBLAS.
        shared_prefix: each query's prompt prefix (template head, instruction, query) runs once per
            packed batch and its documents attend to its keys/values (see the module docstring);
            scores equal the unshared path's within rounding (bit for bit with
            `exact_shared_prefix`). Needs the "prorank_varlen" attention
            (a given `scorer` must route ``batch.model_inputs()`` to it, as RerankerScorer does).
            Default True.
        exact_shared_prefix: attention on fixed blocks (:func:`~prorank_fast.modeling.blocked_attention`)
            as well, so that a pair scores the same bits with and without the shared prefix.
            Needs batch_invariant on CPU (an error otherwise). Costs ~15-25% on CPU (measured in
            benchmarks/rerank.py), hence off by default.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        template: str | data_mod.PromptTemplate = "prorank",
        output_ids: Sequence[int] | None = None,
        token_weights: Sequence[float] | None = None,
        instruction: str | None = None,
        max_length: int = 512,
        min_query_tokens: int = _DEFAULT_MIN_QUERY_TOKENS,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        device: str | torch.device | None = None,
        scorer: torch.nn.Module | None = None,
        batch_invariant: bool | None = None,
        shared_prefix: bool = True,
        exact_shared_prefix: bool = False,
    ):

        self.template = data_mod.get_template(template)
        self.tokenizer = tokenizer
        self.output_ids = tuple(int(i) for i in (output_ids or self.template.output_token_ids(tokenizer)))
        self.token_weights = tuple(float(w) for w in (token_weights or self.template.token_weights))
        if len(self.token_weights) != len(self.output_ids):
            raise ValueError(f"{len(self.token_weights)} token_weights for {len(self.output_ids)} output_ids")
        if max_length < 1 or min_query_tokens < 1 or max_tokens < 1:
            raise ValueError(f"max_length, min_query_tokens and max_tokens must be >= 1 (got {max_length}, "
                             f"{min_query_tokens}, {max_tokens})")  # fmt: skip
        self.instruction = instruction
        self.max_length = int(max_length)
        self.min_query_tokens = min(int(min_query_tokens), self.max_length - 1) or 1
        self.max_tokens = max(int(max_tokens), self.max_length)  # a prompt always fits a batch
        self.shared_prefix = bool(shared_prefix)
        if scorer is not None:
            self.device = torch.device(device) if device is not None else torch.device("cpu")
            self.model, self._scorer = scorer, scorer
        else:
            if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
                model.set_attn_implementation(ATTN_IMPLEMENTATION)
            self.device = torch.device(device) if device is not None else next(model.parameters()).device
            self.model = model.to(self.device)
            # The training forward (scoring.RerankerScorer): decoder over the packed row, last positions, K head rows.
            self._scorer = RerankerScorer(self.model, self.output_ids, self.token_weights)
        self.batch_invariant = bool(batch_invariant) if batch_invariant is not None else self.device.type == "cpu"
        self.exact_shared_prefix = bool(exact_shared_prefix)
        if self.exact_shared_prefix and (not self.batch_invariant or self.device.type != "cpu"):
            raise ValueError(
                "exact_shared_prefix=True needs batch_invariant=True on CPU (its fixed-block attention is "
                f"CPU code); got batch_invariant={self.batch_invariant} on {self.device}"
            )

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_length: int | None = None,
        instruction: str | None = None,
        template: str | None = None,
        varlen_backend: str | None = None,
        autocast: str | None = None,
        batch_invariant: bool | None = None,
        shared_prefix: bool = True,
        exact_shared_prefix: bool = False,
    ) -> Reranker:
        """Load a folder written by ``export.export_model`` (``final/``): safetensors, tokenizer and
        ``config.json["prorank"]`` (template, output_token_ids, token_weights, instruction, max_length).

        device: default cuda if available, else cpu. dtype: default bfloat16 on CUDA, float32 on CPU.
        max_length / instruction / template override the export's. A folder without a "prorank"
        entry (e.g. mxbai-rerank-v2 itself) loads when ``template`` is given.
        varlen_backend: force "flash_attn" | "torch_varlen" | "sdpa" (process-wide; default: auto).
        autocast: "bfloat16" runs the decoder under torch.autocast (the head stays in `dtype`).
        batch_invariant: scores independent of the rest of the call, bit for bit (see the class).
        shared_prefix: each query's prefix computed once per packed batch (see the class).
        exact_shared_prefix: shared-prefix scores bitwise equal to whole prompts' (see the class).
        """
        from transformers import AutoModelForCausalLM

        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected a folder written by prorank-fast export)")
        entry = json.loads(config_path.read_text()).get("prorank")
        if entry is None and template is None:
            raise ValueError(
                f"{config_path}: no 'prorank' entry (template and output-set ids); not a prorank-fast export. "
                "Pass template='prorank' (or 'qwen3') to load it anyway."
            )
        entry = dict(entry or {})
        device = torch.device(device) if device is not None else _default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        dtype = resolve_dtype(dtype)
        if varlen_backend is not None:
            set_varlen_backend(varlen_backend)
        tokenizer = load_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
        if autocast:
            enable_autocast(model, resolve_dtype(autocast))
        use_template = template or entry.get("template", "prorank")
        same_template = template is None or template == entry.get("template")
        return cls(
            model,
            tokenizer,
            template=use_template,
            output_ids=entry.get("output_token_ids") if same_template else None,
            token_weights=entry.get("token_weights", (1.0, -1.0)) if same_template else (1.0, -1.0),
            instruction=instruction if instruction is not None else entry.get("instruction"),
            max_length=max_length or entry.get("max_length", 512),
            min_query_tokens=entry.get("min_query_tokens", _DEFAULT_MIN_QUERY_TOKENS),
            max_tokens=max_tokens,
            device=device,
            batch_invariant=batch_invariant,
            shared_prefix=shared_prefix,
            exact_shared_prefix=exact_shared_prefix,
        )

    # -- scoring ---------------------------------------------------------------------------

    def tokenize(self, pairs: Sequence[tuple[str, str]], instruction: str | None = None) -> list[list[int]]:
        """Prompt token ids of each pair ([len(pairs)] lists, each at most max_length), in order.
        Pairs that share a query are built together (the query encoded once)."""
        return self._prompts(pairs, instruction)[0]

    def _prompts(
        self, pairs: Sequence[tuple[str, str]], instruction: str | None = None
    ) -> tuple[list[list[int]], list[int]]:
        """(:meth:`tokenize`'s ids, the query prefix length of each prompt: its tokens before the
        document, the same for every prompt of a query and a function of that query alone)."""
        pairs = _check_pairs(pairs)
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        instruction = instruction if instruction is not None else self.instruction
        examples = [
            data_mod.Example(query, [pairs[i][1] for i in idx], [0.0] * len(idx), None, instruction, f"query {n}")
            for n, (query, idx) in enumerate(by_query.items())
        ]
        groups = data_mod.tokenize_examples(
            examples, self.tokenizer, self.template, self.max_length, self.min_query_tokens
        )
        ids: list[list[int]] = [[] for _ in pairs]
        prefix_lengths = [0] * len(pairs)
        for (query, idx), group in zip(by_query.items(), groups, strict=True):
            start = self._prefix_length(query, instruction)
            for i, seq in zip(idx, group.input_ids, strict=True):
                ids[i], prefix_lengths[i] = seq, start
        return ids, prefix_lengths

    def _prefix_length(self, query: str, instruction: str | None) -> int:
        """Tokens before the document in every prompt of ``query`` (template head, instruction,
        the query as cut to fit, document label): built around a marker document; 0 when no
        document token fits max_length (every prompt of the query is then the same)."""
        marker = -1
        ids = self.template.build_group(
            self.tokenizer, query, [""], instruction, self.max_length, self.min_query_tokens, document_ids=[[marker]]
        )[0]
        return ids.index(marker) if marker in ids else 0

    # no_grad, not inference_mode: attention.py's per-document SDPA caches by tensor._version,
    # which inference tensors do not have.
    @torch.no_grad()
    def score_token_ids(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        max_tokens: int | None = None,
        show_progress_bar: bool | None = None,
        prefix_lengths: Sequence[int] | None = None,
    ) -> list[float]:
        """Scores [len(sequences)] (fp32 values as Python floats) of prompts given as token ids.

        prefix_lengths: for each sequence, how many of its first tokens form a prefix that other
        sequences starting with the same tokens share (predict passes each query's template
        part); with ``shared_prefix`` on, each distinct prefix runs once per packed batch. None:
        nothing shared. Identical sequences (with the same prefix length) are scored once.
        """
        if len(sequences) == 0:
            return []
        if prefix_lengths is not None and len(prefix_lengths) != len(sequences):
            raise ValueError(f"{len(prefix_lengths)} prefix_lengths for {len(sequences)} sequences")
        share = self.shared_prefix and prefix_lengths is not None
        # Identical prompts (same tokens, same split) are scored once: `where[i]` is sequence i's unique item.
        items: list[tuple[tuple[int, ...], int]] = []
        index: dict[tuple[tuple[int, ...], int], int] = {}
        where = []
        for i, seq in enumerate(sequences):
            seq = tuple(seq.tolist() if isinstance(seq, torch.Tensor) else seq)
            if not seq:
                raise ValueError(f"sequences[{i}] is empty (every prompt needs a token)")
            # the prefix leaves at least one token to the second pass, where the score is read
            key = (seq, min(max(int(prefix_lengths[i]), 0), len(seq) - 1) if share else 0)
            where.append(index.setdefault(key, len(items)))
            if where[-1] == len(items):
                items.append(key)
        copies = [0] * len(items)
        for u in where:
            copies[u] += 1
        budget = max(int(max_tokens or self.max_tokens), max(len(seq) for seq, _ in items))
        batches = shared_prefix_batches(items, budget)
        show = len(sequences) >= PROGRESS_MIN_PAIRS if show_progress_bar is None else show_progress_bar
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(sequences), desc="rerank", unit="pair", dynamic_ncols=True)
        scores = [0.0] * len(items)
        was_training = self.model.training
        self.model.eval()  # restored below: the model may be one that is being trained
        try:
            for batch in batches:
                with batch_invariant_linears(self.model, self.batch_invariant, attention=self.exact_shared_prefix):
                    out = self._score_batch([items[u] for u in batch])
                for u, s in zip(batch, out.float().cpu().tolist(), strict=True):
                    scores[u] = s
                if bar is not None:
                    bar.update(sum(copies[u] for u in batch))
        finally:
            self.model.train(was_training)
            if bar is not None:
                bar.close()
        return [scores[u] for u in where]

    def _score_batch(self, items: list[tuple[tuple[int, ...], int]]) -> torch.Tensor:
        """Scores [len(items)] of one packed batch of (tokens, prefix length) items.

        Without prefixes: one packed pass. With them: pass 1 runs each distinct prefix once as a
        sequence of its own (positions from 0), its keys/values kept in a SharedPrefix store;
        pass 2 runs every item's tokens after its prefix (positions continuing), attending to its
        prefix's stored keys/values and then causally to its own tokens; scores come from pass 2.
        """
        if not any(p for _, p in items):
            packed = pack_sequences([seq for seq, _ in items], [0.0] * len(items)).to(self.device)
            return self._scorer(packed)
        slot: dict[tuple[int, ...], int] = {}
        prefixes: list[tuple[int, ...]] = []
        for seq, p in items:
            if p and slot.setdefault(seq[:p], len(prefixes)) == len(prefixes):
                prefixes.append(seq[:p])
        store = SharedPrefix()
        nothing = torch.empty(0, dtype=torch.int64)
        lengths = [len(x) for x in prefixes]
        store.begin_pass([nothing] * len(prefixes), lengths, append=True, device=self.device)
        self._scorer(PrefixPass(prefixes, [0] * len(prefixes), store, self.device))
        if not store.keys:
            raise RuntimeError(
                "shared_prefix=True: the model's attention never read the shared prefix (it needs the "
                f"{ATTN_IMPLEMENTATION!r} attention implementation); pass shared_prefix=False"
            )
        starts = [0, *itertools.accumulate(lengths)]
        attend = [torch.arange(starts[slot[seq[:p]]], starts[slot[seq[:p]]] + p) if p else nothing for seq, p in items]
        rest = [seq[p:] for seq, p in items]
        store.begin_pass(attend, [len(x) for x in rest], append=False, device=self.device)
        return self._scorer(PrefixPass(rest, [p for _, p in items], store, self.device))

    def predict(
        self,
        pairs: Sequence[tuple[str, str]],
        *,
        instruction: str | None = None,
        normalize: bool = False,
        max_tokens: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[float]:
        """Scores of (query, document) pairs, in input order: ``sum_k w_k z[token_k]`` (by default
        the logit difference z[pos] - z[neg]); ``normalize=True`` applies a sigmoid (vLLM's
        from_2_way_softmax). ``show_progress_bar=None`` shows a tqdm bar from 1024 pairs on.
        ``instruction`` overrides the reranker's for this call. Each query's prefix runs once per
        packed batch (``shared_prefix``); identical pairs are scored once."""
        ids, prefix_lengths = self._prompts(pairs, instruction)
        scores = self.score_token_ids(
            ids, max_tokens=max_tokens, show_progress_bar=show_progress_bar, prefix_lengths=prefix_lengths
        )
        return [1.0 / (1.0 + math.exp(-s)) for s in scores] if normalize else scores

    def rank(
        self,
        query: str,
        documents: Iterable[str],
        top_k: int | None = None,
        *,
        instruction: str | None = None,
        normalize: bool = False,
        return_documents: bool = True,
        max_tokens: int | None = None,
        show_progress_bar: bool | None = None,
    ) -> list[dict]:
        """Documents sorted by score, best first (sentence-transformers' CrossEncoder.rank shape):
        ``[{"corpus_id": index in documents, "score": float, "text": document}]``, ties in input
        order, at most ``top_k`` entries (None: all); ``"text"`` only with ``return_documents``."""
        if isinstance(query, list | tuple):
            raise TypeError("rank() takes one query (a string) and a list of documents")
        documents = list(documents)
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        scores = self.predict(
            [(query, d) for d in documents], instruction=instruction, normalize=normalize, max_tokens=max_tokens,
            show_progress_bar=show_progress_bar,
        )  # fmt: skip
        order = sorted(range(len(documents)), key=lambda i: -scores[i])  # stable: ties keep input order
        results = []
        for i in order[:top_k] if top_k is not None else order:
            item = {"corpus_id": i, "score": scores[i]}
            if return_documents:
                item["text"] = documents[i]
            results.append(item)
        return results

    def __repr__(self) -> str:
        name = type(self.model).__name__
        return (
            f"Reranker({name}, template={self.template.name!r}, output_ids={self.output_ids}, "
            f"token_weights={self.token_weights}, max_length={self.max_length}, device={self.device}, "
            f"batch_invariant={self.batch_invariant}, shared_prefix={self.shared_prefix}, "
            f"exact_shared_prefix={self.exact_shared_prefix})"
        )


# ---------------------------------------------------------------------------------------
# JSONL in, JSONL out (`prorank-fast rank`)

DOCUMENT_FIELDS = ("document", "doc", "text")  # the first present is the document


def read_pairs_jsonl(path: str | Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """Records of a JSONL file (``.jsonl`` or ``.jsonl.gz``) and their (query, document) pairs.

    Each non-blank line is a JSON object with a string ``query`` and a string ``document``
    (or ``doc`` / ``text``); other fields are kept in the records as they are.

    Raises:
        data.DataError: naming the file, the line (1-based) and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", reason="io")
    records, pairs = [], []
    for loc, rec in iter_jsonl(path):
        query = text_field(rec, "query", loc)
        key = next((k for k in DOCUMENT_FIELDS if k in rec), None)
        if key is None:
            raise loc.error("document", f"missing (also accepted: {', '.join(DOCUMENT_FIELDS[1:])})", "missing_field")
        records.append(rec)
        pairs.append((query, text_field(rec, key, loc)))
    return records, pairs


def write_scores_jsonl(records: Sequence[dict], scores: Sequence[float], out) -> None:
    """One line per record, its fields then ``"score"`` (replacing any it had), to a text stream."""
    for rec, score in zip(records, scores, strict=True):
        row = {k: v for k, v in rec.items() if k != "score"}
        row["score"] = score
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
