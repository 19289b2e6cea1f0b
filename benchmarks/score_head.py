"""The restricted-vocabulary score head and its loss (GPU suite sections b and d).

* section b (``check_cases``): ``restricted_vocab_score_loss`` against the float64 gold and plain
  PyTorch (``eager_score_loss``): BCE with soft labels, listwise over groups of 8 (graded labels);
* section d (``score``): the head + loss forward+backward (B pairs, bf16, a trainable LM head of
  Qwen's vocabulary) against one forward+backward step of a Qwen2.5-0.5B-shaped backbone (random
  init, bf16, sdpa; the step as micro-batches, halved on OOM). Target: head < 1% of the step.

There is no CPU command: on CPU the head is part of the stage-2 step (``stage2_step.py``).
"""

from __future__ import annotations

import argparse

import torch

from prorank_fast.kernels import reference, restricted_vocab_score_loss

from . import _common as C
from . import _memory
from . import harness as H

SCORE_RATIO_TARGET = 0.01  # score head+loss / backbone step
GPU_SMOKE = dict(score_b=16, score_h=32, score_v=1000, backbone_layers=2, backbone_batch=8, backbone_seq=32,
                 backbone_micro=4)  # fmt: skip


def eager_score_loss(hidden, weight, labels, *, token_ids=(16, 15), token_weights=(1.0, -1.0), loss="bce", **kw):
    """Plain PyTorch restricted score in the input dtype (gather K rows, one small GEMM), fp32 loss."""
    ids = torch.as_tensor(token_ids, device=weight.device, dtype=torch.long)
    w = torch.as_tensor(token_weights, device=weight.device, dtype=torch.float32)
    s = (hidden @ weight[ids].t()).float() @ w
    return reference.score_loss_reference(s, labels, loss=loss, **kw), s


# ---------------------------------------------------------------------------------------
# Section b: the score correctness cases
# ---------------------------------------------------------------------------------------


def check_cases(suite: H.Suite, x: C.GRPOInputs, gen: torch.Generator) -> list[H.CheckCase]:
    """Score BCE (soft labels drawn from ``gen``) and listwise (groups of 8, graded labels) on the
    first ``--check-score-b`` rows of the check's hidden states."""
    a, dev = suite.args, suite.device
    impl = a.impl
    b = a.check_score_b
    if b % 8:
        raise ValueError("--check-score-b must be a multiple of 8 (listwise groups)")
    labels = {
        "bce": torch.rand(b, device=dev, generator=gen),
        "listwise": torch.randint(0, 3, (b,), device=dev).float(),
    }
    labels["listwise"].view(-1, 8)[:, 0] += 1.0  # every group has a positive

    def score(loss, group_size):
        lab = labels[loss]
        kw = dict(loss=loss, group_size=group_size)

        def gold(h, w):
            s = reference.restricted_vocab_score_reference(h[:b], w)
            value = reference.score_loss_reference(s, lab.to(s.dtype), **kw)
            return {"loss": value, "scores": s}, value

        def pack(out):
            value, s = out
            return {"loss": value, "scores": s}, value

        return H.CheckCase(
            f"score {loss}" + (f" (group {group_size})" if group_size else ""),
            gold,
            lambda h, w: pack(eager_score_loss(h[:b], w, lab, **kw)),
            lambda h, w: pack(
                restricted_vocab_score_loss(h[:b], w, lab, token_ids=(16, 15), token_weights=(1.0, -1.0), **kw,
                                            impl=impl)
            ),
        )  # fmt: skip

    return [score("bce", None), score("listwise", 8)]


# ---------------------------------------------------------------------------------------
# Section d: score head vs backbone step
# ---------------------------------------------------------------------------------------


def add_gpu_args(p) -> None:
    g = p.add_argument_group("d. score")
    g.add_argument("--score-b", type=int, default=256, help="pairs per step (rows of the score head)")
    g.add_argument("--score-h", type=int, default=896)
    g.add_argument("--score-v", type=int, default=151936)
    g.add_argument("--backbone-layers", type=int, default=24)
    g.add_argument("--backbone-batch", type=int, default=256, help="sequences per step")
    g.add_argument("--backbone-seq", type=int, default=256, help="tokens per sequence")
    g.add_argument("--backbone-micro", type=int, default=64, help="sequences per micro-batch (halved on OOM)")


def _time_heads(suite: H.Suite) -> None:
    a, dev, out = suite.args, suite.device, suite.score
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    hidden = torch.randn(a.score_b, a.score_h, device=dev, generator=gen).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(a.score_v, a.score_h, device=dev, generator=gen) * 0.02).to(torch.bfloat16).requires_grad_()
    labels = torch.rand(a.score_b, device=dev, generator=gen)
    heads = {
        "ours": lambda: restricted_vocab_score_loss(hidden, weight, labels, token_ids=(16, 15), loss="bce",
                                                    impl=a.impl)[0],
        "plain": lambda: eager_score_loss(hidden, weight, labels, loss="bce")[0],
    }  # fmt: skip
    for who, fn in heads.items():
        step = C.Step(who, fn, (hidden, weight))
        try:
            out[f"{who}_head"] = suite.timer(step.fwd_bwd)
            out[f"{who}_head"]["peak_bytes"] = _memory.peak_extra(step.fwd_bwd, dev)["peak_bytes"]
        except Exception as exc:  # noqa: BLE001
            out[f"{who}_head"] = {"status": H.describe_failure(exc)}
        H.cleanup(dev)
        suite.row_done("score")


def _time_backbone(suite: H.Suite) -> None:
    a, dev, out = suite.args, suite.device, suite.score
    try:
        model, config = C.qwen2_model(a.backbone_layers, dev, torch.bfloat16, smoke=a.smoke, causal_lm=False,
                                      attn_implementation="sdpa")  # fmt: skip
        model.train()
    except Exception as exc:  # noqa: BLE001
        out["backbone"] = H.record_failure({}, exc)
        return
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    ids = torch.randint(0, config.vocab_size, (a.backbone_batch, a.backbone_seq), device=dev, generator=gen)

    def attempt(micro: int) -> dict:
        def step():
            model.zero_grad(set_to_none=True)
            for chunk in ids.split(micro):
                last = model(input_ids=chunk).last_hidden_state[:, -1]
                last.float().pow(2).mean().backward()

        try:
            step()
            reps = dict(warmup=min(a.warmup, 1), min_reps=min(a.min_reps, 3), max_reps=10)
            timing = suite.timer(step, target_s=min(a.target_s * 2, 2.0), **reps)
        except Exception:
            model.zero_grad(set_to_none=True)
            raise
        return dict(timing, params=params, layers=config.num_hidden_layers, micro=micro, batch=a.backbone_batch,
                    seq=a.backbone_seq, tokens=a.backbone_batch * a.backbone_seq)  # fmt: skip

    micro = min(a.backbone_micro, a.backbone_batch)
    try:
        out["backbone"] = H.halve_on_oom(suite, attempt, micro, message="backbone OOM; micro-batch -> {}")
    except Exception as exc:  # noqa: BLE001
        out["backbone"] = H.record_failure({}, exc)


def gpu_section(suite: H.Suite) -> None:
    a, out = suite.args, suite.score
    out.update(b=a.score_b, h=a.score_h, v=a.score_v)
    _time_heads(suite)
    H.cleanup(suite.device)
    if suite.over_budget():
        out["backbone"] = {"status": H.SKIPPED}
    else:
        _time_backbone(suite)
        H.cleanup(suite.device)
    bb = out.get("backbone", {}).get("median")
    for who in ("ours", "plain"):
        head = out.get(f"{who}_head", {}).get("median")
        if bb and head:
            out[f"{who}_ratio"] = head / bb
    suite.row_done("score")
    suite.log(
        f"score head {H.fmt_ms(out.get('ours_head', {}).get('median'))} ms vs backbone step "
        f"{H.fmt_ms(bb)} ms: ratio {H.fmt_ratio(out.get('ours_ratio'), 5)}"
    )


def gpu_render(suite: H.Suite) -> list[str]:
    sc = suite.score
    md = [
        "",
        f"## d. Score head + loss vs Qwen2.5-0.5B-shaped backbone step (B={sc.get('b')}, H={sc.get('h')}, "
        f"V={sc.get('v')})",
        "",
    ]
    rows = []
    for who, label in (("ours", "ours: restricted_vocab_score_loss fwd+bwd"), ("plain", "plain PyTorch head fwd+bwd")):
        hd = sc.get(f"{who}_head", {})
        rows.append(
            [
                label,
                H.fmt_ms_range(hd) if "median" in hd else hd.get("status", "-"),
                H.fmt_bytes(hd.get("peak_bytes")),
                f"{100 * sc[who + '_ratio']:.3f}%" if who + "_ratio" in sc else "-",
            ]
        )
    bb = sc.get("backbone", {})
    bb_label = (
        f"backbone fwd+bwd: {bb['layers']} layers, {bb['params'] / 1e6:.0f}M params, "
        f"{bb['batch']}x{bb['seq']} tokens (micro-batch {bb['micro']})"
        if "median" in bb
        else "backbone fwd+bwd"
    )
    rows.append([bb_label, H.fmt_ms_range(bb) if "median" in bb else bb.get("status", "-"), "-", "100%"])
    md.append(H.markdown_table(["row", "ms median [p20, p80]", "peak extra", "of backbone step"], rows))
    return md


def gpu_targets(suite: H.Suite) -> list[list[str]]:
    ratio = suite.score.get("ours_ratio")
    return [
        [
            "score head+loss < 1% of a 0.5B backbone step",
            f"{100 * ratio:.3f}%" if ratio is not None else "not measured",
            "n/a" if ratio is None else ("met" if ratio < SCORE_RATIO_TARGET else "MISSED"),
        ]
    ]


def main(argv=None) -> int:
    """No command of its own (GPU sections only): says how to run them."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.score_head", description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    print("score_head runs in the GPU suite: python -m benchmarks.gpu_suite --sections peak,check,score [--smoke]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
