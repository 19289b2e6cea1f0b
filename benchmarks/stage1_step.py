"""The stage-1 (GRPO) training step: ours (shared prefix) against G independent full sequences (and TRL on CPU).

CPU: one step = P prompts of exactly L tokens, G sampled completions of exactly T tokens each (no stop
token: every completion runs to max_new_tokens), rewards (format + correctness, the trainer's
registered functions) and group advantages (scale "group"), the policy forward + backward over
every completion, and an AdamW step. Every row starts from the same initial weights, uses the same
prompts, G, T, lr and loss (dapo, beta 0, epsilon 0.2), and is timed over the same number of steps
after warm-up. Rows, at each vocabulary size V:

* ours   the trainer's own pieces: ``generate_rollouts`` (``sample_group_completions``: one packed
         prefill of the P prompts, G completions decoded from their keys/values through
         ``attention.SharedPrefix``), then ``Rollouts.group_batch`` / ``micro_batches`` and
         ``PolicyForGRPO(head="grpo")``: the prompts once with gradients, the completions' inputs in
         a second packed row reading the prompts' keys/values, ``fused_linear_grpo_loss`` (never
         [N, V] logits)
* full   the same algorithm over G independent full sequences: ``lm.generate(num_return_sequences=G,
         do_sample=True, min_new_tokens=T)`` (each prompt prefilled G times, KV cache, sdpa), then the
         [P*G, L+T] sequences through ``lm(...)`` with full [.., V] logits, log_softmax, gather of the
         completion tokens, ``kernels.reference.grpo_loss_from_logprobs`` (TRL's formulas); at large V
         the groups go through in several forwards (gradient accumulation) under a logits budget
* trl    ``trl.GRPOTrainer`` (optional: skipped when trl is not installed) on a copy of the same model,
         the same prompts as text through a word-level tokenizer whose ids are the prompt ids
         ("w17" -> 17), reward functions equivalent to format + correctness, num_generations=G,
         max_completion_length=T with min_new_tokens=T, the same lr / weight decay / loss; a step =
         the time between two ``on_step_end`` callbacks (sampling included), warm-up steps dropped

The model is the embedded default's tiny Qwen2 (recipes/tiny.yaml: hidden 64, 2 layers, 4 heads,
2 KV heads, tied head) at V=1024 (the demo tokenizer's size) and V=151936 (Qwen's vocabulary, same
backbone), fp32; prompts are random token ids (the same at every V). From a random initialization
the sampled answers are almost never "1"/"0", so the rewards are ~0 and the advantages ~0: the step
still does all of its work (autograd does not skip zeros). Unlike the trainer, which drops groups
without reward variance, every row here trains every group, so that the work does not depend on luck.

    python -m benchmarks.stage1_step                  # the table (prorank-fast bench stage1)
    python -m benchmarks.stage1_step --vocabs 1024 --rounds 10 --json s1.json
    pytest benchmarks/test_stage1_step.py             # correctness (equal loss and grads) + a tiny timing

Before timing, at each V, ours and full compute the loss and the parameter gradients of the same
completions with random advantages: they must agree (loss rel. <= 1e-4, grads rel. <= 1e-4 in fp32).
Target (printed, not asserted): ours >= 4x faster than full per step.

GPU suite, section ``stage1``: the same ``Stage1Step`` rows (ours and full) at the Qwen2.5-0.5B
configuration (random init, bf16 parameters; see "GPU suite" below).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch

from prorank_fast.grpo import (
    GRPOOptions,
    PolicyForGRPO,
    RewardContext,
    Rollouts,
    Stage1Prompt,
    compute_rewards,
    generate_rollouts,
    group_advantages,
    micro_batches,
)
from prorank_fast.kernels import reference
from prorank_fast.modeling import resolve_backend

from . import _common as C
from . import _memory
from . import harness as H

VARIANTS = ("ours", "full", "trl")
LABELS = {
    "ours": "ours: shared prefix, one prefill per prompt, fused_linear_grpo_loss",
    "full": "G full sequences: generate(num_return_sequences=G), full [P*G, L+T, V] logits",
    "trl": "TRL GRPOTrainer",
}
GROUP = "cpu-stage1-step"
SPEEDUP_TARGET = 4.0  # ours / full, step time
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-4
QWEN_VOCAB = 151936
OUTPUT_IDS = (16, 15)  # "1", "0" in the Qwen2 tokenizer; any two ids of the vocabulary do here
REWARDS = ("format", "correctness")
PHASES = ("rollout", "fwd_bwd", "optim")


@dataclass
class Stage1Config(H.BenchConfig):
    ENV_PREFIX = "PRORANK_BENCH_S1_"

    vocabs: str = f"1024,{QWEN_VOCAB}"
    prompts: int = 8  # P prompts per step
    group_size: int = 8  # G
    prompt_len: int = 256  # L
    new_tokens: int = 4  # T, forced
    rounds: int = 5
    warmup: int = 1
    threads: int = 0  # torch.set_num_threads; 0 keeps torch's default
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_tokens: int = 9216  # ours' micro-batch budget (prompt once + its completions per group)
    # Largest fp32 [rows, L+T, V] logits tensor the full row may hold per forward (MiB): whole groups per
    # forward up to it, gradients accumulated. 0: the whole step in one forward.
    full_logits_mib: int = 1024

    def describe(self) -> str:
        return (
            f"P={self.prompts} prompts x L={self.prompt_len} tokens, G={self.group_size}, T={self.new_tokens} "
            f"completion tokens (forced), rewards format+correctness, dapo, beta 0, AdamW (lr {self.lr}, "
            f"wd {self.weight_decay}), fp32; {self.warmup} warm-up + {self.rounds} timed steps per row"
        )


# ---------------------------------------------------------------------------------------
# Workload
# ---------------------------------------------------------------------------------------


@dataclass
class StepData:
    prompts: list[list[int]]  # P prompts of L ids
    labels: list[int]  # P binary labels


def make_steps(cfg: Stage1Config, num_steps: int, id_high: int = 1024) -> list[StepData]:
    """Random prompts (ids in [2, id_high), the same at every vocabulary size), alternating labels."""
    gen = torch.Generator().manual_seed(cfg.seed)
    out = []
    for _ in range(num_steps):
        prompts = [torch.randint(2, id_high, (cfg.prompt_len,), generator=gen).tolist() for _ in range(cfg.prompts)]
        out.append(StepData(prompts, [i % 2 for i in range(cfg.prompts)]))
    return out


def tiny_config() -> dict:
    from prorank_fast.config import load_recipe

    return dict(load_recipe(None).model.tiny)


def base_model(vocab: int, seed: int, tiny: dict | None = None, models: dict | None = None):
    """The shared initial weights at vocabulary ``vocab`` (seeded); rows deep-copy it."""
    if models is not None and vocab in models:
        return models[vocab]
    from prorank_fast.modeling import build_tiny_model

    torch.manual_seed(seed)
    lm = build_tiny_model(dict(tiny or tiny_config(), vocab_size=vocab), vocab, 0, torch.float32)
    if models is not None:
        models[vocab] = lm
    return lm


def groups_per_forward(cfg: Stage1Config, vocab: int, group_size: int | None = None, seq_len: int | None = None):
    """Groups per forward of the full row so that its fp32 logits stay under ``full_logits_mib``."""
    if cfg.full_logits_mib <= 0:
        return None
    per_group = (group_size or cfg.group_size) * (seq_len or cfg.prompt_len + cfg.new_tokens) * vocab * 4
    fit = (cfg.full_logits_mib * 2**20) // per_group
    return None if fit >= cfg.prompts else max(1, int(fit))


# ---------------------------------------------------------------------------------------
# One step per variant (device-agnostic: the GPU suite uses it too)
# ---------------------------------------------------------------------------------------


class Stage1Step:
    """One variant's stage-1 step on its own copy of ``lm`` (the shared initial weights).

    ``train_step(step)``: rollouts (sampling, rewards, advantages), zero_grad, the policy forward +
    backward over every group, AdamW step; returns the loss and records the phases' seconds in
    ``self.phases``. ``loss_and_grads(prompts, completions, advantages)``: the loss of given
    completions and the LM's parameter gradients (no optimizer step): the equal-work check.
    """

    def __init__(self, variant: str, lm, cfg: Stage1Config, *, groups_per_forward: int | None = None,
                 fused_adam: bool = False):  # fmt: skip
        if variant not in ("ours", "full"):
            raise ValueError(f"Stage1Step runs ours | full, not {variant!r}")
        self.variant, self.cfg = variant, cfg
        self.groups_per_forward = groups_per_forward
        self.lm = copy.deepcopy(lm)
        self.device = next(self.lm.parameters()).device
        self.lm.config.use_cache = variant == "full"  # generate's KV cache; ours keeps its own
        self.lm.set_attn_implementation("prorank_varlen" if variant == "ours" else "sdpa")
        self.policy = PolicyForGRPO(self.lm) if variant == "ours" else None
        self.lm.train()
        kw = {"fused": True} if fused_adam else {}
        self.optimizer = torch.optim.AdamW(self.lm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **kw)
        self.ctx = RewardContext(OUTPUT_IDS, stop_ids=())  # no stop token: exactly new_tokens per completion
        self.options = GRPOOptions(loss_type="dapo", max_completion_length=cfg.new_tokens)
        self.phases: list[dict[str, float]] = []
        self.calls = 0
        if variant == "ours":
            self.note = f"varlen backend {resolve_backend(self.device, self.lm.dtype)}; shared prefix"
        else:
            gpf = groups_per_forward or cfg.prompts
            self.note = f"sdpa, KV-cache generate; {math.ceil(cfg.prompts / gpf)} policy forward(s) per step"

    # -- rollouts --------------------------------------------------------------------------

    def rollouts(self, data: StepData, seed: int) -> Rollouts:
        cfg = self.cfg
        if self.variant == "ours":
            g = SimpleNamespace(
                group_size=cfg.group_size, max_new_tokens=cfg.new_tokens, temperature=1.0, top_p=1.0,
                rewards=list(REWARDS), reward_weights=[1.0, 1.0], scale_rewards="group",
            )  # fmt: skip
            prompts = [Stage1Prompt(p, label, "bench") for p, label in zip(data.prompts, data.labels, strict=True)]
            return generate_rollouts(
                self.policy, prompts, g, self.ctx, generator=torch.Generator(device=self.device).manual_seed(seed),
                max_tokens=cfg.max_tokens, device=self.device, d=None,
            )  # fmt: skip
        completions = self.generate(data.prompts, seed)
        per_completion = [label for label in data.labels for _ in range(cfg.group_size)]
        rewards, parts = compute_rewards(list(REWARDS), [1.0, 1.0], completions, per_completion, self.ctx)
        advantages, zero_var = group_advantages(rewards, cfg.group_size, "group")
        return Rollouts(data.prompts, data.labels, completions, advantages.float(), rewards, parts, zero_var,
                        cfg.group_size)  # fmt: skip

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """transformers' sampling: each prompt expanded to G rows and prefilled G times (group-major)."""
        cfg = self.cfg
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("the full row needs prompts of one length (no padding)")
        ids = torch.tensor(prompts, dtype=torch.int64, device=self.device)
        torch.manual_seed(seed)
        out = self.lm.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=cfg.group_size,
            max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
            pad_token_id=0, eos_token_id=None, use_cache=True,
        )  # fmt: skip
        return out[:, ids.shape[1] :].tolist()

    # -- the policy pass -------------------------------------------------------------------

    def _backward(self, prompts, completions, advantages: torch.Tensor) -> float:
        """Loss over every completion (group-major, G per prompt), backward; returns the loss."""
        cfg = self.cfg
        g = cfg.group_size
        total_tokens = float(sum(len(c) for c in completions))
        loss_sum = 0.0
        if self.variant == "ours":
            rollouts = Rollouts(prompts, [0] * len(prompts), completions, advantages, advantages, {},
                                torch.zeros(len(prompts), dtype=torch.bool), g)  # fmt: skip
            for mb in micro_batches(rollouts, list(range(len(prompts))), cfg.max_tokens):
                batch = rollouts.group_batch(mb).to(self.device)
                loss, _metrics = self.policy(batch, head="grpo", options=self.options, num_items_in_batch=total_tokens)
                loss.backward()
                loss_sum += float(loss.detach())
            return loss_sum
        per = (self.groups_per_forward or len(prompts)) * g
        seqs = torch.tensor([prompts[s // g] + c for s, c in enumerate(completions)], device=self.device)
        comp = torch.tensor(completions, device=self.device)
        length, t = len(prompts[0]), comp.shape[1]
        for start in range(0, seqs.shape[0], per):
            rows = seqs[start : start + per]
            logits = self.lm(input_ids=rows, use_cache=False).logits.float()  # [rows, L+T, V]
            logsm = torch.log_softmax(logits, dim=-1)[:, length - 1 : length - 1 + t]  # predict the completion
            logp = logsm.gather(-1, comp[start : start + per, :, None]).reshape(-1)
            with torch.no_grad():  # the entropy metric, as TRL logs it and as ours' loss returns it
                entropy = -(logsm.exp() * logsm).sum(-1).reshape(-1)
            seq_ids = torch.arange(rows.shape[0], device=self.device).repeat_interleave(t)
            loss, _metrics = reference.grpo_loss_from_logprobs(
                logp, advantages[start : start + per].to(self.device), seq_ids, entropy=entropy, loss_type="dapo",
                max_completion_length=cfg.new_tokens, num_items_in_batch=total_tokens,
            )  # fmt: skip
            loss.backward()
            loss_sum += float(loss.detach())
            del logits, logsm, logp, loss
        return loss_sum

    def train_step(self, data: StepData, seed: int) -> float:
        t0 = time.perf_counter()
        rollouts = self.rollouts(data, seed)
        H.sync(self.device)
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(rollouts.prompts, rollouts.completions, rollouts.advantages)
        H.sync(self.device)
        t2 = time.perf_counter()
        self.optimizer.step()
        H.sync(self.device)
        t3 = time.perf_counter()
        self.phases.append({"rollout": t1 - t0, "fwd_bwd": t2 - t1, "optim": t3 - t2, "step": t3 - t0})
        self.calls += 1
        return loss

    def loss_and_grads(self, prompts, completions, advantages) -> tuple[float, dict[str, torch.Tensor]]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._backward(prompts, completions, torch.as_tensor(advantages, dtype=torch.float32))
        grads = {n: p.grad.detach().float().clone() for n, p in self.lm.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grads


def grad_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||a - b|| / ||b|| over all parameters (fp64); inf when the parameter sets differ."""
    if a.keys() != b.keys():
        return math.inf
    num = sum(float((a[n].double().cpu() - b[n].double().cpu()).pow(2).sum()) for n in b)
    den = sum(float(b[n].double().cpu().pow(2).sum()) for n in b)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)


def equal_work_check(ours: Stage1Step, full: Stage1Step, data: StepData, seed: int) -> dict:
    """ours and full on the same completions (random ids) with random advantages: loss and gradients."""
    gen = torch.Generator().manual_seed(seed)
    cfg = ours.cfg
    n = len(data.prompts) * cfg.group_size
    vocab = ours.lm.config.vocab_size
    completions = torch.randint(0, vocab, (n, cfg.new_tokens), generator=gen).tolist()
    advantages = torch.randn(n, generator=gen)
    loss_o, grads_o = ours.loss_and_grads(data.prompts, completions, advantages)
    loss_f, grads_f = full.loss_and_grads(data.prompts, completions, advantages)
    return {
        "loss_ours": loss_o,
        "loss_full": loss_f,
        "loss_rel_diff": abs(loss_o - loss_f) / max(abs(loss_f), 1e-30),
        "grad_rel_diff": grad_rel_diff(grads_o, grads_f),
    }


# ---------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------


def trl_unavailable() -> str:
    """Why the TRL row cannot run here ('' when it can)."""
    try:
        import trl  # noqa: F401
        from trl import GRPOConfig, GRPOTrainer  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return f"trl not importable ({type(exc).__name__}: {str(exc)[:120]}); pip install trl==1.16.0"
    try:
        import datasets  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"datasets not importable ({type(exc).__name__})"
    return ""


def word_tokenizer(vocab: int):
    """A word-level tokenizer whose id i >= 2 is the word "w<i>": "w5 w17" <-> [5, 17], exactly; id 0 is
    "<pad>" (also unk), id 1 "<eos>" (special tokens are matched inside words, so no "w" names for them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<pad>")


def trl_trainer(model, reward_funcs, dataset, tokenizer, *, callbacks=(), rollout_func=None, **settings):
    """``trl.GRPOTrainer`` around ``model`` in this one process, quiet: ``GRPOConfig(**settings)`` plus the
    plumbing every TRL row here shares (no saving, no logging or progress output, no shuffling, no dataloader
    workers, one accumulation step, fp32 unless the model is bf16; a throwaway output_dir)."""
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    plumbing = dict(
        output_dir=tempfile.mkdtemp(prefix="prorank-trl-"), gradient_accumulation_steps=1, logging_steps=10**6,
        save_strategy="no", report_to="none", use_cpu=model.device.type == "cpu", bf16=model.dtype == torch.bfloat16,
        shuffle_dataset=False, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=GRPOConfig(**{**plumbing, **settings}), train_dataset=dataset,
        processing_class=tokenizer, callbacks=list(callbacks), rollout_func=rollout_func,
    )  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print its log dicts to stdout
    return trainer


def run_trl(lm, cfg: Stage1Config, steps: list[StepData], log=print) -> dict:
    """trl.GRPOTrainer over ``steps`` (one per optimizer step): per-step seconds and the last loss."""
    from datasets import Dataset
    from transformers import TrainerCallback

    vocab = lm.config.vocab_size
    tokenizer = word_tokenizer(vocab)
    texts = [" ".join(f"w{t}" for t in p) for s in steps for p in s.prompts]
    labels = [label for s in steps for label in s.labels]
    flat = [p for s in steps for p in s.prompts]
    if tokenizer(text=texts)["input_ids"] != flat:
        raise RuntimeError("the word tokenizer does not give back the prompt ids")
    ds = Dataset.from_dict({"prompt": texts, "label": labels})
    words = {int(OUTPUT_IDS[0]): f"w{OUTPUT_IDS[0]}", int(OUTPUT_IDS[1]): f"w{OUTPUT_IDS[1]}"}

    def answer(text: str):  # exactly one output-set token (TRL passes the decoded completion)
        w = text.split()
        return w[0] if len(w) == 1 and w[0] in words.values() else None

    def format_reward(completions, **kw):
        return [1.0 if answer(c) is not None else 0.0 for c in completions]

    def correctness_reward(completions, label, **kw):
        want = {1: words[OUTPUT_IDS[0]], 0: words[OUTPUT_IDS[1]]}
        return [1.0 if answer(c) == want[y] else 0.0 for c, y in zip(completions, label, strict=True)]

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    clock = Clock()
    model = copy.deepcopy(lm)
    model.set_attn_implementation("sdpa")
    model.config.use_cache = True
    trainer = trl_trainer(
        model, [format_reward, correctness_reward], ds, tokenizer, callbacks=[clock],
        per_device_train_batch_size=cfg.prompts * cfg.group_size, num_generations=cfg.group_size,
        max_completion_length=cfg.new_tokens, generation_kwargs={"min_new_tokens": cfg.new_tokens},
        temperature=1.0, top_p=1.0, top_k=0, max_steps=len(steps), learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay, lr_scheduler_type="constant", warmup_steps=0, beta=0.0, loss_type="dapo",
        epsilon=0.2, scale_rewards="group", num_iterations=1, seed=cfg.seed,
    )  # fmt: skip
    t0 = time.perf_counter()
    result = trainer.train()
    ends = [t0, *clock.ends]
    seconds = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    del trainer, model
    return {"seconds": seconds, "loss": float(result.training_loss), "note": f"trl {_version('trl')}, sdpa"}


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


# ---------------------------------------------------------------------------------------
# Measurement (CPU)
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    vocab: int
    variant: str
    step_ms: H.Stat | None = None
    phases_ms: dict = field(default_factory=dict)  # phase -> median ms
    steps: int = 0
    other_cpus: float | None = None  # CPUs other processes used while this row ran
    skipped: str = ""
    note: str = ""


@dataclass
class Report(H.VocabReport):
    config: Stage1Config
    checks: dict = field(default_factory=dict)  # vocab -> equal_work_check dict (or {"error": ...})

    def table(self) -> str:
        return format_table(self)


def unavailable(variant: str) -> str:
    return trl_unavailable() if variant == "trl" else ""


def step_result(step: Stage1Step, vocab: int, warmup: int) -> Result:
    timed = step.phases[warmup:] or step.phases
    return Result(
        vocab,
        step.variant,
        step_ms=H.Stat.of([p["step"] * 1e3 for p in timed]),
        phases_ms={k: statistics.median(p[k] * 1e3 for p in timed) for k in PHASES},
        steps=len(timed),
        note=step.note,
    )


def run(cfg: Stage1Config, variants=VARIANTS, log=print) -> Report:
    """At each V: the equal-work check, then ours and full interleaved (step i of each, then i + 1),
    then TRL's trainer over the same steps."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    n_steps = cfg.warmup + cfg.rounds
    steps = make_steps(cfg, n_steps)
    report = Report(cfg).start()
    tiny = tiny_config()
    for vocab in cfg.vocab_list:
        lm = base_model(vocab, cfg.seed, tiny)
        runners: dict[str, Stage1Step] = {}
        for variant in [v for v in variants if v in ("ours", "full")]:
            try:
                gpf = groups_per_forward(cfg, vocab) if variant == "full" else None
                runners[variant] = Stage1Step(variant, lm, cfg, groups_per_forward=gpf)
            except Exception as exc:  # noqa: BLE001 - a row that cannot run says why
                report.add(Result(vocab, variant, skipped=H.failed(exc)))
        if "ours" in runners and "full" in runners:
            try:
                report.checks[vocab] = equal_work_check(runners["ours"], runners["full"], steps[0], cfg.seed + 1)
                c = report.checks[vocab]
                log(
                    f"[stage1] V={vocab} equal work: loss rel {c['loss_rel_diff']:.1e}, "
                    f"grads rel {c['grad_rel_diff']:.1e}"
                )
            except Exception as exc:  # noqa: BLE001
                report.checks[vocab] = {"error": H.failed(exc)}
        start = H.cpu_counters()
        failed: dict[str, str] = {}
        for i in range(n_steps):
            for variant, step in runners.items():
                if variant in failed:
                    continue
                try:
                    step.train_step(steps[i], seed=cfg.seed * 1000 + i)
                except Exception as exc:  # noqa: BLE001
                    failed[variant] = H.failed(exc)
                    log(f"[stage1] V={vocab} {variant}: {failed[variant]}")
            log(f"[stage1] V={vocab}: step {i + 1}/{n_steps} done" + (" (warm-up)" if i < cfg.warmup else ""))
        busy = H.other_cpus(start, H.cpu_counters())
        for variant, step in runners.items():
            if variant in failed:
                report.add(Result(vocab, variant, skipped=failed[variant]))
                continue
            result = step_result(step, vocab, cfg.warmup)
            result.other_cpus = busy
            report.add(result)
            log(f"[stage1] V={vocab} {variant}: {result.step_ms.median:.0f} ms/step")
        del runners
        if "trl" in variants:
            reason = trl_unavailable()
            if reason:
                report.add(Result(vocab, "trl", skipped=reason))
            else:
                start = H.cpu_counters()
                try:
                    out = run_trl(lm, cfg, steps, log=log)
                    timed = out["seconds"][cfg.warmup :] or out["seconds"]
                    result = Result(vocab, "trl", step_ms=H.Stat.of([s * 1e3 for s in timed]), steps=len(timed),
                                    note=out["note"])  # fmt: skip
                    log(f"[stage1] V={vocab} trl: {result.step_ms.median:.0f} ms/step")
                except Exception as exc:  # noqa: BLE001
                    result = Result(vocab, "trl", skipped=H.failed(exc))
                    log(f"[stage1] V={vocab} trl: {result.skipped}")
                result.other_cpus = H.other_cpus(start, H.cpu_counters())
                report.add(result)
    report.finish()
    return report


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def speedup(report: Report, vocab: int, other: str) -> float | None:
    """``other``'s median step time / ours'."""
    return report.ratio(vocab, other, lambda r: r.step_ms.median, lower_is_better=True)


def format_table(report: Report) -> str:
    cfg = report.config
    rows = []
    for (vocab, variant), r in report.results.items():
        label = LABELS.get(variant, variant)
        if r.skipped:
            rows.append([vocab, label, r.skipped] + ["-"] * 5)
            continue
        ph = r.phases_ms
        sp = speedup(report, vocab, variant)
        busy = r.other_cpus
        rows.append(
            [
                vocab,
                label,
                r.step_ms.fmt(0),
                f"{ph['rollout']:.0f}" if ph else "-",
                f"{ph['fwd_bwd']:.0f}" if ph else "-",
                f"{ph['optim']:.0f}" if ph else "-",
                "1.00" if variant == "ours" else H.fmt_ratio(sp),
                "-" if busy is None else f"{busy:.2f}" + (" (!)" if busy > H.OTHER_CPUS_WARNING else ""),
            ]
        )
    tokens = cfg.prompts * cfg.prompt_len + cfg.prompts * cfg.group_size * cfg.new_tokens
    out = [
        f"CPU stage-1 GRPO step (rollouts + policy forward/backward + AdamW): {cfg.describe()}",
        f"tiny Qwen2 (recipes/tiny.yaml); torch {torch.__version__}, {report.threads} threads, {os.cpu_count()} cpus; "
        f"{tokens} distinct tokens per step ({cfg.prompts * cfg.group_size} completions)",
    ]
    if report.other_cpus is not None:
        line = f"machine load: other processes used {report.other_cpus:.2f} of {os.cpu_count()} CPUs on average"
        if report.load_before is not None:
            line += f"; 1-min load average {report.load_before:.2f} at the start, {report.load_after or 0:.2f} "
            line += "at the end"
        if report.other_cpus > H.OTHER_CPUS_WARNING:
            line += " -- WARNING: the CPUs were shared, the timings are noisy"
        out.append(line)
    out += [
        "",
        H.markdown_table(
            [
                "V",
                "variant",
                "ms/step median [p20, p80]",
                "rollout ms",
                "fwd+bwd ms",
                "AdamW ms",
                "this / ours",
                "CPUs used by others",
            ],
            rows,
        ),
        "",
    ]
    ratio_rows = []
    for vocab in cfg.vocab_list:
        for other, name in (("full", "full sequences (i)"), ("trl", "TRL GRPOTrainer (ii)")):
            if (vocab, other) not in report.results:
                continue
            sp = speedup(report, vocab, other)
            target = ""
            if other == "full" and sp is not None:
                target = f">= {SPEEDUP_TARGET:.0f}x: {'met' if sp >= SPEEDUP_TARGET else 'MISSED'}"
            ratio_rows.append([f"V={vocab}: {name} / ours", "-" if sp is None else f"{sp:.2f}x", target])
    if ratio_rows:
        out += [H.markdown_table(["step-time ratio", "value", "target"], ratio_rows), ""]
    checks = []
    for vocab, c in report.checks.items():
        if "error" in c:
            checks.append(f"V={vocab}: {c['error']}")
            continue
        ok = c["loss_rel_diff"] <= LOSS_RTOL and c["grad_rel_diff"] <= GRAD_RTOL
        checks.append(
            f"V={vocab}: loss {c['loss_ours']:.6f} vs {c['loss_full']:.6f} (rel. {c['loss_rel_diff']:.1e}), "
            f"grads rel. {c['grad_rel_diff']:.1e} ({'PASS' if ok else 'FAIL'})"
        )
    if checks:
        out.append(
            f"equal work, ours vs full on the same completions with random advantages (rel. <= {LOSS_RTOL:g}): "
            + "; ".join(checks)
        )
    notes: dict[str, set] = {}
    for (_vocab, variant), r in report.results.items():
        if r.note and not r.skipped:
            notes.setdefault(variant, set()).add(r.note)
    for variant, texts in notes.items():
        out.append(f"- {variant}: " + " | ".join(sorted(texts)))
    out.append(
        "- rollout = sampling + rewards + advantages; TRL's step (between two on_step_end callbacks) is not split. "
        "'(!)': other processes used > 0.2 CPU while the row ran."
    )
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    return H.cpu_parser("python -m benchmarks.stage1_step", __doc__, Stage1Config, VARIANTS).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = Stage1Config.from_args(args)
    variants = H.parse_variants(args.variants, VARIANTS)
    if cfg.rounds < 1 or cfg.warmup < 0:
        raise SystemExit("--rounds must be >= 1 and --warmup >= 0")
    report = run(cfg, variants, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        payload = {
            "config": asdict(cfg),
            "threads": report.threads,
            "results": [asdict(r) for r in report.results.values()],
            "checks": report.checks,
            "speedup_vs_full": {v: speedup(report, v, "full") for v in cfg.vocab_list},
            "speedup_vs_trl": {v: speedup(report, v, "trl") for v in cfg.vocab_list},
            "other_cpus": report.other_cpus,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2, default=str)
    print(report.table(), flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# GPU suite, section "stage1": the stage-1 step at the Qwen2.5-0.5B configuration
#
# A randomly initialized Qwen2ForCausalLM of the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads,
# 2 KV heads, intermediate 4864, vocab 151936, tied head), bf16 parameters. One step = P=8 random
# prompts of L=256 tokens, G=8 sampled completions of exactly T=4 tokens each, rewards (format +
# correctness) and group advantages, the policy forward + backward over every completion, AdamW
# (fused on CUDA): the rows of ``Stage1Step``, each on its own copy of the same initial weights:
#
# * ours  shared prefix: one packed prefill per prompt for sampling, the policy pass with the prompts
#         once (``PolicyForGRPO(head="grpo")``, ``fused_linear_grpo_loss``)
# * full  G independent full sequences: ``generate(num_return_sequences=G)`` (each prompt prefilled G
#         times), ``lm(...)`` over [P*G, L+T] with full bf16 logits, fp32 log_softmax, the reference
#         loss; its groups go through in several forwards when the logits pass a budget (halved
#         again on OOM)
#
# Settings come from ``PRORANK_GPU_S1_<KEY>`` (LAYERS, PROMPTS, PROMPT_LEN, GROUP_SIZE, NEW_TOKENS, LR,
# LOGITS_MIB); ``--smoke`` shrinks everything to a tiny CPU run. Results go to ``suite.stage1``.
# ---------------------------------------------------------------------------------------

GPU_LABELS = {
    "ours": "ours: shared prefix, one prefill per prompt, fused_linear_grpo_loss",
    "full": "G full sequences: generate(G), full [P*G, L+T, V] logits",
}
GPU_VARIANTS = ("ours", "full")
GPU_DEFAULTS = dict(layers=24, prompts=8, prompt_len=256, group_size=8, new_tokens=4, lr=1e-5, logits_mib=8192)
GPU_SMOKE_SETTINGS = dict(layers=2, prompts=2, prompt_len=16, group_size=2, new_tokens=2, lr=1e-3, logits_mib=1)


def gpu_settings(smoke: bool) -> dict:
    out = dict(GPU_SMOKE_SETTINGS if smoke else GPU_DEFAULTS)
    for key, default in list(out.items()):
        value = os.environ.get(f"PRORANK_GPU_S1_{key.upper()}")
        if value is not None:
            out[key] = type(default)(value)
    return out


def _gpu_row(suite: H.Suite, variant: str, lm, cfg: Stage1Config, data, gpf: int | None) -> dict:
    dev = suite.device
    row = dict(variant=variant, label=GPU_LABELS[variant])

    def attempt(groups_per_forward: int) -> dict:
        step = Stage1Step(variant, lm, cfg, groups_per_forward=groups_per_forward, fused_adam=dev.type == "cuda")
        row["note"] = step.note
        calls = iter(range(10**9))

        def fn(step=step, calls=calls):
            i = next(calls)
            return step.train_step(data[i % len(data)], seed=i)

        t0 = time.perf_counter()
        fn()
        row["first_call_s"] = time.perf_counter() - t0
        row["peak_bytes"] = _memory.peak_extra(fn, dev)["peak_bytes"]
        step.phases.clear()
        # --smoke: the code paths only, in as few calls as time_fn allows
        row.update(suite.timer(fn, warmup=0, min_reps=1, max_reps=1) if suite.args.smoke else suite.timer(fn))
        row["phases_ms"] = {k: statistics.median(p[k] * 1e3 for p in step.phases) for k in PHASES}
        row["status"] = "ok"
        return row

    try:
        return H.halve_on_oom(suite, attempt, gpf or cfg.prompts, halve=variant == "full",
                              message="stage1 full OOM; {} group(s) per forward")  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return H.record_failure(row, exc)


def gpu_section(suite: H.Suite) -> None:
    """Run the section; results in ``suite.stage1`` (rows, settings, the equal-work check)."""
    out = suite.stage1
    rows = out.setdefault("rows", [])
    if suite.over_budget():
        rows += suite.skipped_rows(GPU_VARIANTS, GPU_LABELS)
        suite.row_done("stage1")
        return
    a, dev = suite.args, suite.device
    s = gpu_settings(a.smoke)
    lm, config = C.qwen2_model(s["layers"], dev, torch.bfloat16, smoke=a.smoke, seed=a.seed)
    lm.train()
    cfg = Stage1Config(
        vocabs=str(config.vocab_size), prompts=s["prompts"], group_size=s["group_size"], prompt_len=s["prompt_len"],
        new_tokens=s["new_tokens"], lr=s["lr"], weight_decay=0.0, seed=a.seed, full_logits_mib=s["logits_mib"],
        max_tokens=s["prompts"] * (s["prompt_len"] + s["group_size"] * s["new_tokens"]),
    )  # fmt: skip
    data = make_steps(cfg, 4, id_high=min(config.vocab_size, 1024))
    tokens = cfg.prompts * cfg.prompt_len + cfg.prompts * cfg.group_size * cfg.new_tokens
    out.update(
        settings=s, layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size,
        params=sum(p.numel() for p in lm.parameters()), tokens=tokens,
        tokens_through_full=cfg.prompts * cfg.group_size * (cfg.prompt_len + cfg.new_tokens),
    )  # fmt: skip
    gpf = groups_per_forward(cfg, config.vocab_size)
    try:  # the two rows compute the same loss on the same completions (bf16: to bf16 precision)
        ours = Stage1Step("ours", lm, cfg)
        full = Stage1Step("full", lm, cfg, groups_per_forward=1)
        out["check"] = equal_work_check(ours, full, data[0], a.seed + 1)
    except Exception as exc:  # noqa: BLE001
        out["check"] = {"error": H.describe_failure(exc)}
    ours = full = None
    H.cleanup(dev)
    suite.row_done("stage1")  # the equal-work check
    for variant in GPU_VARIANTS:
        if suite.over_budget():
            rows += suite.skipped_rows([variant], GPU_LABELS)
            suite.row_done("stage1")
            continue
        row = _gpu_row(suite, variant, lm, cfg, data, gpf if variant == "full" else None)
        if "median" in row:
            row["tokens_per_s"] = tokens / row["median"]
            row["completions_per_s"] = cfg.prompts * cfg.group_size / row["median"]
        rows.append(row)
        H.add_speedups(rows)
        H.cleanup(dev)
        suite.log(
            f"stage1 {variant}: {row['status']}"
            + (f" {row['median'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tok/s" if "median" in row else "")
        )
        suite.row_done("stage1")
    del lm
    H.cleanup(dev)


def gpu_render(suite: H.Suite) -> list[str]:
    s1 = suite.stage1
    md = ["", "## Stage-1 GRPO step at the Qwen2.5-0.5B configuration", ""]
    s = s1.get("settings")
    if s and "params" in s1:
        md += [
            f"Random init, bf16 parameters, {s1['layers']} layers, hidden {s1['hidden']}, vocab {s1['vocab']} (tied), "
            f"{s1['params'] / 1e6:.1f}M parameters. One step = {s['prompts']} random prompts of {s['prompt_len']} "
            f"tokens, G={s['group_size']} completions of exactly {s['new_tokens']} tokens (no stop token), rewards "
            "format + correctness, group advantages, policy forward + backward over every completion (dapo, beta 0), "
            "AdamW (fused on CUDA). Each row trains its own copy of the same initial weights. tokens/s = the step's "
            f"distinct tokens ({s1['tokens']}: prompts once + completions) / step time; the full row pushes "
            f"{s1['tokens_through_full']} tokens through the model in its policy pass alone.",
            "",
        ]

    def cells(r):
        ph = r.get("phases_ms", {})
        return [
            r["label"],
            H.fmt_ms_range(r),
            " / ".join(f"{ph[k]:.1f}" for k in ("rollout", "fwd_bwd", "optim")) if ph else "-",
            f"{r['tokens_per_s']:.0f}",
            f"{r['completions_per_s']:.0f}",
            H.fmt_bytes(r.get("peak_bytes")),
            H.fmt_ratio(r.get("speedup_of_ours")),
            f"{r.get('first_call_s', 0):.1f}",
        ]

    headers = ["variant", "ms/step median [p20, p80]", "rollout / fwd+bwd / AdamW ms", "tokens/s", "completions/s",
               "peak extra", "this / ours", "1st call s"]  # fmt: skip
    md.append(H.rows_table(headers, s1.get("rows", []), cells))
    c = s1.get("check")
    if c:
        md += [
            "",
            "Equal work (same completions, random advantages, bf16): "
            + (
                c["error"]
                if "error" in c
                else f"loss ours {c['loss_ours']:.5f} vs full {c['loss_full']:.5f} (rel. {c['loss_rel_diff']:.1e}), "
                f"grads rel. {c['grad_rel_diff']:.1e}"
            ),
        ]
    notes = [f"{r['variant']}: {r['note']}" for r in s1.get("rows", []) if r.get("note")]
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    return md


def gpu_targets(suite: H.Suite) -> list[list[str]]:
    """The section's row of the suite's Targets table."""
    rows = suite.stage1.get("rows", [])
    full = next((r for r in rows if r["variant"] == "full"), {})
    ours = next((r for r in rows if r["variant"] == "ours"), {})
    sp = full.get("speedup_of_ours")
    label = f"stage-1 step: ours >= {SPEEDUP_TARGET:.0f}x faster than G full sequences (Qwen2.5-0.5B configuration)"
    if sp is None:
        return [[label, ours.get("status") or full.get("status") or "not measured", "n/a"]]
    return [[label, f"{sp:.2f}x", "met" if sp >= SPEEDUP_TARGET else "MISSED"]]


if __name__ == "__main__":
    raise SystemExit(main())
