"""GPU suite section "stage1": the stage-1 GRPO step at the Qwen2.5-0.5B configuration.

A randomly initialized Qwen2ForCausalLM of the Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads,
2 KV heads, intermediate 4864, vocab 151936, tied head), bf16 parameters. One step = P=8 random prompts
of L=256 tokens, G=8 sampled completions of exactly T=4 tokens each, rewards (format + correctness) and
group advantages, the policy forward + backward over every completion, AdamW (fused on CUDA): the rows
of ``benchmarks/stage1.py`` (``stage1.Stage1Step``), each on its own copy of the same initial weights:

* ours  shared prefix: one packed prefill per prompt for sampling, the policy pass with the prompts once
        (``PolicyForGRPO(head="grpo")``, ``fused_linear_grpo_loss``)
* full  G independent full sequences: ``generate(num_return_sequences=G)`` (each prompt prefilled G
        times), ``lm(...)`` over [P*G, L+T] with full bf16 logits, fp32 log_softmax, the reference loss;
        its groups go through in several forwards when the logits pass a budget (halved again on OOM)

Settings come from ``PRORANK_GPU_S1_<KEY>`` (LAYERS, PROMPTS, PROMPT_LEN, GROUP_SIZE, NEW_TOKENS, LR,
LOGITS_MIB); ``--smoke`` shrinks everything to a tiny CPU run. Called by ``benchmarks.gpu_suite``
(section "stage1"); results go to ``suite.stage1``.
"""

from __future__ import annotations

import os
import statistics
import time
import traceback

import torch

from . import _common as C
from . import _memory

LABELS = {
    "ours": "ours: shared prefix, one prefill per prompt, fused_linear_grpo_loss",
    "full": "G full sequences: generate(G), full [P*G, L+T, V] logits",
}
VARIANTS = ("ours", "full")
SPEEDUP_TARGET = 4.0
QWEN2_0P5B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
)
DEFAULTS = dict(layers=24, prompts=8, prompt_len=256, group_size=8, new_tokens=4, lr=1e-5, logits_mib=8192)
SMOKE = dict(layers=2, prompts=2, prompt_len=16, group_size=2, new_tokens=2, lr=1e-3, logits_mib=1)


def settings(smoke: bool) -> dict:
    out = dict(SMOKE if smoke else DEFAULTS)
    for key, default in list(out.items()):
        value = os.environ.get(f"PRORANK_GPU_S1_{key.upper()}")
        if value is not None:
            out[key] = type(default)(value)
    return out


def _model(s: dict, device, seed: int, smoke: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg_kw = dict(QWEN2_0P5B, num_hidden_layers=s["layers"])
    if smoke:
        cfg_kw.update(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                      vocab_size=1000)  # fmt: skip
    config = Qwen2Config(**cfg_kw)
    torch.manual_seed(seed)
    with torch.device(device):
        lm = Qwen2ForCausalLM(config)
    return lm.to(torch.bfloat16).train(), config


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _cleanup(device) -> None:
    if torch.device(device).type == "cuda":
        import gc

        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _failure(exc: BaseException) -> str:
    if _is_oom(exc):
        return "OOM"
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    return "ERROR " + (msg[:160] + "..." if len(msg) > 160 else msg)


def _row(suite, s1, variant: str, lm, cfg, data, gpf) -> dict:
    dev = suite.device
    row = dict(variant=variant, label=LABELS[variant])
    while True:
        try:
            step = s1.Stage1Step(variant, lm, cfg, groups_per_forward=gpf, fused_adam=dev.type == "cuda")
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
            row["phases_ms"] = {k: statistics.median(p[k] * 1e3 for p in step.phases) for k in s1.PHASES}
            row["status"] = "ok"
            return row
        except Exception as exc:  # noqa: BLE001 - reported in the table
            step = None
            _cleanup(dev)
            current = gpf or cfg.prompts
            if _is_oom(exc) and variant == "full" and current > 1:
                gpf = max(1, current // 2)
                suite.log(f"stage1 full OOM; {gpf} group(s) per forward")
                continue
            row["status"] = _failure(exc)
            if not _is_oom(exc):
                traceback.print_exc()
            return row


def section_stage1(suite) -> None:
    """Run the section; results in ``suite.stage1`` (rows, settings, the equal-work check)."""
    from . import stage1 as s1

    out = getattr(suite, "stage1", None)
    if out is None:
        out = {}
        suite.stage1 = out
    rows = out.setdefault("rows", [])
    if suite.over_budget():
        rows += [dict(variant=v, label=LABELS[v], status="skipped (time budget)") for v in VARIANTS]
        return
    a, dev = suite.args, suite.device
    s = settings(a.smoke)
    lm, config = _model(s, dev, a.seed, a.smoke)
    cfg = s1.Stage1Config(
        vocabs=str(config.vocab_size), prompts=s["prompts"], group_size=s["group_size"], prompt_len=s["prompt_len"],
        new_tokens=s["new_tokens"], lr=s["lr"], weight_decay=0.0, seed=a.seed, full_logits_mib=s["logits_mib"],
        max_tokens=s["prompts"] * (s["prompt_len"] + s["group_size"] * s["new_tokens"]),
    )  # fmt: skip
    data = s1.make_steps(cfg, 4, id_high=min(config.vocab_size, 1024))
    tokens = cfg.prompts * cfg.prompt_len + cfg.prompts * cfg.group_size * cfg.new_tokens
    out.update(
        settings=s, layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size,
        params=sum(p.numel() for p in lm.parameters()), tokens=tokens,
        tokens_through_full=cfg.prompts * cfg.group_size * (cfg.prompt_len + cfg.new_tokens),
    )  # fmt: skip
    gpf = s1.groups_per_forward(cfg, config.vocab_size)
    try:  # the two rows compute the same loss on the same completions (bf16: to bf16 precision)
        ours = s1.Stage1Step("ours", lm, cfg)
        full = s1.Stage1Step("full", lm, cfg, groups_per_forward=1)
        out["check"] = s1.equal_work_check(ours, full, data[0], a.seed + 1)
    except Exception as exc:  # noqa: BLE001
        out["check"] = {"error": _failure(exc)}
    ours = full = None
    _cleanup(dev)
    for variant in VARIANTS:
        if suite.over_budget():
            rows.append(dict(variant=variant, label=LABELS[variant], status="skipped (time budget)"))
            continue
        row = _row(suite, s1, variant, lm, cfg, data, gpf if variant == "full" else None)
        if "median" in row:
            row["tokens_per_s"] = tokens / row["median"]
            row["completions_per_s"] = cfg.prompts * cfg.group_size / row["median"]
        rows.append(row)
        _cleanup(dev)
        suite.log(
            f"stage1 {variant}: {row['status']}"
            + (f" {row['median'] * 1e3:.1f} ms, {row['tokens_per_s']:.0f} tok/s" if "median" in row else "")
        )
    ours_row = next((r for r in rows if r["variant"] == "ours" and "median" in r), None)
    for r in rows:
        if ours_row is not None and "median" in r:
            r["speedup_of_ours"] = r["median"] / ours_row["median"]
    del lm
    _cleanup(dev)


def render(suite) -> list[str]:
    s1 = getattr(suite, "stage1", {}) or {}
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
    rows = []
    for r in s1.get("rows", []):
        if "median" not in r:
            rows.append([r.get("label", r["variant"]), r.get("status", "-")] + ["-"] * 6)
            continue
        ph = r.get("phases_ms", {})
        rows.append(
            [
                r["label"],
                f"{C.fmt_ms(r['median'])} [{C.fmt_ms(r['p20'])}, {C.fmt_ms(r['p80'])}]",
                " / ".join(f"{ph[k]:.1f}" for k in ("rollout", "fwd_bwd", "optim")) if ph else "-",
                f"{r['tokens_per_s']:.0f}",
                f"{r['completions_per_s']:.0f}",
                C.fmt_bytes(r.get("peak_bytes")),
                C.fmt_ratio(r.get("speedup_of_ours")),
                f"{r.get('first_call_s', 0):.1f}",
            ]
        )
    md.append(
        C.markdown_table(
            [
                "variant",
                "ms/step median [p20, p80]",
                "rollout / fwd+bwd / AdamW ms",
                "tokens/s",
                "completions/s",
                "peak extra",
                "this / ours",
                "1st call s",
            ],
            rows,
        )
    )
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


def targets(suite) -> list[list[str]]:
    """The section's row of the suite's Targets table."""
    rows = (getattr(suite, "stage1", {}) or {}).get("rows", [])
    full = next((r for r in rows if r["variant"] == "full"), {})
    ours = next((r for r in rows if r["variant"] == "ours"), {})
    sp = full.get("speedup_of_ours")
    label = f"stage-1 step: ours >= {SPEEDUP_TARGET:.0f}x faster than G full sequences (Qwen2.5-0.5B configuration)"
    if sp is None:
        return [[label, ours.get("status") or full.get("status") or "not measured", "n/a"]]
    return [[label, f"{sp:.2f}x", "met" if sp >= SPEEDUP_TARGET else "MISSED"]]
