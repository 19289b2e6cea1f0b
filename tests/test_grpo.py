"""fused_linear_grpo_loss against reference.grpo_loss_reference (fp64 gold, autograd grads).

Both implementations: impl="torch" (chunked PyTorch) and impl="triton" (the interpreter on CPU).
Tolerance (fp32): |ours - gold| <= 1e-5 * |gold| + atol, on the loss, the five metrics and the
gradients of hidden, weight and bias.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from gold import assert_close, err

from prorank_fast.kernels import fused_linear_grpo_loss, reference

IMPLS = ("torch", "triton")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
METRIC_KEYS = {"kl", "entropy", "clip_ratio_low", "clip_ratio_high", "clip_ratio_region", "log_ratio_max"}
# Settings that move every branch: temperature != 1, asymmetric clip, delta above 1 + epsilon_high.
COMMON = dict(temperature=0.7, epsilon_low=0.2, epsilon_high=0.28, delta=1.5)


@pytest.fixture
def chunk8(monkeypatch):
    """Several row chunks per call (PRORANK_CHUNK_ROWS is read at call time)."""
    monkeypatch.setenv("PRORANK_CHUNK_ROWS", "8")


@dataclasses.dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    token_ids: torch.Tensor
    advantages: torch.Tensor
    seq_ids: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None


def make_inputs(
    N=40,
    H=16,
    V=1000,
    S=7,
    *,
    seed=0,
    bias=True,
    seq_ids=None,
    logit_scale=2.0,
    temperature=0.7,
    old_noise=0.3,
    dtype=torch.float32,
):
    """Random packed batch. By default sequence ids 2 and 6 have no tokens (fully masked completions),
    sequence 3 has advantage 0 (its ratios straddle both clip bounds), ids are interleaved (unsorted),
    and old/ref log-probs sit around the true log-probs with a per-sequence shift so that token and
    sequence ratios leave the clip range on both sides."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (logit_scale / H**0.5)
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    token_ids = torch.randint(0, V, (N,), generator=g)
    if seq_ids is None:
        used = torch.tensor([i for i in range(S) if i not in (2, 6)] or [0])
        seq_ids = used[torch.randint(0, used.numel(), (N,), generator=g)]
    advantages = torch.randn(S, generator=g)
    if S > 3:
        advantages[3] = 0.0  # a group with equal rewards: zero advantage is common, and never clipped
    with torch.no_grad():
        logp, _ = reference.linear_logprobs_reference(
            hidden.double(), weight.double(), token_ids, None if b is None else b.double(), temperature
        )
    shift = old_noise * 1.5 * torch.randn(S, generator=g, dtype=torch.float64)
    if S > 3:
        shift[3] = 0.0
    old = (logp + old_noise * torch.randn(N, generator=g, dtype=torch.float64) + shift[seq_ids]).float()
    ref = (logp + old_noise * torch.randn(N, generator=g, dtype=torch.float64)).float()
    cast = lambda t: None if t is None else t.to(dtype)
    return Inputs(cast(hidden), cast(weight), cast(b), token_ids, advantages, seq_ids, old, ref)


def run_ours(inp: Inputs, impl: str, *, upstream=1.0, **kw):
    h = inp.hidden.detach().clone().requires_grad_(True)
    w = inp.weight.detach().clone().requires_grad_(True)
    b = None if inp.bias is None else inp.bias.detach().clone().requires_grad_(True)
    loss, metrics = fused_linear_grpo_loss(
        h, w, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=b, impl=impl, **kw
    )
    (loss * upstream).backward()
    return loss.detach(), metrics, (h.grad, w.grad, None if b is None else b.grad)


def run_gold(inp: Inputs, **kw):
    h = inp.hidden.detach().double().requires_grad_(True)
    w = inp.weight.detach().double().requires_grad_(True)
    b = None if inp.bias is None else inp.bias.detach().double().requires_grad_(True)
    loss, metrics = reference.grpo_loss_reference(
        h, w, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=b, **kw
    )
    # log_ratio_max (ours only): how far the old log-probs are from the policy's own
    logp, _ = reference.linear_logprobs_reference(h, w, inp.token_ids, b, kw.get("temperature", 1.0))
    metrics = {**metrics, "log_ratio_max": (logp - inp.old).abs().max() if inp.old is not None else torch.zeros(())}
    params = [h, w] + ([b] if b is not None else [])
    grads = list(torch.autograd.grad(loss, params))
    if b is None:
        grads.append(None)
    return loss.detach(), metrics, tuple(grads)


def check_metrics(metrics, gold_metrics, rtol=1e-5, atol=1e-6):
    assert isinstance(metrics, dict)
    assert set(metrics) == METRIC_KEYS
    for key in METRIC_KEYS:
        m = metrics[key]
        assert isinstance(m, torch.Tensor) and m.dim() == 0, f"{key} must be a 0-d tensor"
        assert not m.requires_grad, f"{key} must be detached"
        assert_close(m.float(), gold_metrics[key].float(), rtol=rtol, atol=atol, what=f"metric {key}")


def check_against_gold(inp, impl, *, loss_atol=1e-6, **kw):
    loss, metrics, grads = run_ours(inp, impl, **kw)
    gold_loss, gold_metrics, gold_grads = run_gold(inp, **kw)
    assert loss.dim() == 0
    assert_close(loss, gold_loss, atol=loss_atol, what="loss")
    check_metrics(metrics, gold_metrics)
    inputs = (inp.hidden, inp.weight, inp.bias)
    for name, a, b, x in zip(("hidden", "weight", "bias"), grads, gold_grads, inputs, strict=True):
        if b is None:
            assert a is None, f"grad {name} should be None"
            continue
        assert a.dtype == x.dtype, f"grad {name} dtype {a.dtype} != input dtype {x.dtype}"
        assert_close(a, b, what=f"grad {name}")
    return loss, gold_loss, gold_metrics


# ---------------------------------------------------------------------------------------
# The main matrix
# ---------------------------------------------------------------------------------------

VARIANTS = ("none", "old", "old+ref")


def _matrix():
    params = []
    for impl in IMPLS:
        for lt in LOSS_TYPES:
            for lvl in LEVELS:
                for beta in (0.0, 0.04):
                    for variant in VARIANTS:
                        params.append(
                            pytest.param(impl, lt, lvl, beta, variant, id=f"{impl}-{lt}-{lvl}-b{beta}-{variant}")
                        )
    return params


@pytest.mark.parametrize("impl,loss_type,level,beta,variant", _matrix())
def test_grpo_matches_reference(chunk8, impl, loss_type, level, beta, variant):
    inp = make_inputs(seed=2)
    if variant == "none":
        inp.old = inp.ref = None
    elif variant == "old":
        inp.ref = None
    _, gold_loss, gold_metrics = check_against_gold(
        inp,
        impl,
        beta=beta,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=12 if loss_type == "dr_grpo" else None,
        **COMMON,
    )
    if variant != "none":
        # not vacuous: both clip sides fire, and delta changes the loss
        assert gold_metrics["clip_ratio_low"] > 0 and gold_metrics["clip_ratio_high"] > 0
        no_delta, _, _ = run_gold(
            inp,
            beta=beta,
            loss_type=loss_type,
            importance_sampling_level=level,
            max_completion_length=12 if loss_type == "dr_grpo" else None,
            **{**COMMON, "delta": None},
        )
        if level == "token":
            assert abs(no_delta - gold_loss) > 1e-4
    if beta and variant == "old+ref":
        assert gold_metrics["kl"] > 0


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [1000, 4097])
def test_grpo_vocab_not_multiple_of_block(chunk8, impl, V):
    inp = make_inputs(N=24, V=V, seed=2)
    check_against_gold(inp, impl, beta=0.04, loss_type="grpo", **COMMON)


def run_plain_fp32(inp: Inputs, **kw):
    """Plain materializing fp32 PyTorch (the reference on fp32 leaves): the error floor of the dtype."""
    h, w, b = (t.detach().float().clone().requires_grad_(True) for t in (inp.hidden, inp.weight, inp.bias))
    loss, _ = reference.grpo_loss_reference(
        h, w, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=b, **kw
    )
    return (loss.detach(), *torch.autograd.grad(loss, (h, w, b)))


def test_grpo_qwen_vocab_torch(chunk8):
    """The Qwen2 vocabulary (151936, not a multiple of any block) on the chunked PyTorch path.

    A sum over 151936 logits costs plain fp32 ~5e-5 relative on the hidden gradient: the bound is
    twice the error of plain fp32 PyTorch plus the usual 1e-5 relative."""
    inp = make_inputs(N=10, H=8, V=151936, S=3, seed=22)
    kw = dict(beta=0.04, loss_type="grpo", importance_sampling_level="sequence", **COMMON)
    loss, metrics, grads = run_ours(inp, "torch", **kw)
    gold_loss, gold_metrics, gold_grads = run_gold(inp, **kw)
    plain = run_plain_fp32(inp, **kw)
    check_metrics(metrics, gold_metrics)
    names = ("loss", "hidden", "weight", "bias")
    for name, a, g, p in zip(names, (loss, *grads), (gold_loss, *gold_grads), plain, strict=True):
        bound = 2 * err(p, g) + 1e-5 * g.double().norm().item() + 1e-7
        assert err(a, g) <= bound, f"{name}: {err(a, g):.3e} > {bound:.3e} (plain fp32 {err(p, g):.3e})"


def test_grpo_auto_impl_on_cpu():
    """impl="auto" (the default) works on CPU tensors and agrees with the gold."""
    inp = make_inputs(N=16, V=200, seed=23)
    check_against_gold(inp, "auto", beta=0.04, loss_type="dapo", **COMMON)


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_no_bias_default_chunking(impl):
    """No bias, PRORANK_CHUNK_ROWS unset (one chunk), default clip settings."""
    inp = make_inputs(N=20, V=300, seed=3, bias=False, temperature=1.0)
    check_against_gold(inp, impl, beta=0.04, loss_type="bnpo")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", ["1", "7"])
def test_grpo_chunk_sizes(monkeypatch, impl, chunk):
    """Chunks of one row and chunks that do not divide N."""
    monkeypatch.setenv("PRORANK_CHUNK_ROWS", chunk)
    inp = make_inputs(N=17, V=200, seed=4)
    check_against_gold(inp, impl, beta=0.04, loss_type="grpo", importance_sampling_level="sequence", **COMMON)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type,level", [("grpo", "sequence"), ("dapo", "token"), ("dr_grpo", "token")])
def test_grpo_single_token(impl, loss_type, level):
    """N = 1, S = 1."""
    inp = make_inputs(N=1, V=300, S=1, seed=5, seq_ids=torch.zeros(1, dtype=torch.long))
    check_against_gold(
        inp,
        impl,
        beta=0.04,
        loss_type=loss_type,
        importance_sampling_level=level,
        max_completion_length=4 if loss_type == "dr_grpo" else None,
        **COMMON,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["one_sequence", "one_token_each", "sorted", "trailing_empty"])
def test_grpo_sequence_layouts(chunk8, impl, layout):
    N = 24
    if layout == "one_sequence":
        S, seq_ids = 1, torch.zeros(N, dtype=torch.long)
    elif layout == "one_token_each":
        S, seq_ids = N, torch.randperm(N)
    elif layout == "sorted":
        S, seq_ids = 5, torch.sort(torch.randint(0, 5, (N,))).values
    else:  # S much larger than the ids used: many fully masked completions at the end
        S, seq_ids = 12, torch.randint(0, 3, (N,))
    inp = make_inputs(N=N, V=300, S=S, seed=6, seq_ids=seq_ids)
    for loss_type, level in (("grpo", "sequence"), ("dapo", "token")):
        check_against_gold(inp, impl, beta=0.04, loss_type=loss_type, importance_sampling_level=level, **COMMON)


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_permutation_invariance(chunk8, impl):
    """Interleaving the rows of the completions changes nothing but the order of the hidden grads."""
    inp = make_inputs(N=30, V=300, S=5, seed=7)
    perm = torch.randperm(30)
    inp_p = Inputs(
        inp.hidden[perm], inp.weight, inp.bias, inp.token_ids[perm], inp.advantages, inp.seq_ids[perm],
        inp.old[perm], inp.ref[perm],
    )  # fmt: skip
    kw = dict(beta=0.04, loss_type="grpo", importance_sampling_level="sequence", **COMMON)
    loss, metrics, grads = run_ours(inp, impl, **kw)
    loss_p, metrics_p, grads_p = run_ours(inp_p, impl, **kw)
    assert_close(loss_p, loss, atol=1e-6, what="loss")
    for key in METRIC_KEYS:
        assert_close(metrics_p[key], metrics[key], atol=1e-6, what=key)
    assert_close(grads_p[0], grads[0][perm], what="grad hidden")
    assert_close(grads_p[1], grads[1], what="grad weight")
    assert_close(grads_p[2], grads[2], what="grad bias")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("num_items", [55.0, 7])
def test_grpo_num_items_in_batch(chunk8, impl, num_items):
    inp = make_inputs(N=24, V=300, seed=8)
    loss, _, _ = check_against_gold(inp, impl, beta=0.04, loss_type="dapo", num_items_in_batch=num_items, **COMMON)
    loss_local, _, _ = run_ours(inp, impl, beta=0.04, loss_type="dapo", **COMMON)
    assert_close(loss * num_items, loss_local * 24, rtol=1e-5, atol=1e-6, what="dapo normalizer")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_num_items_in_batch_tensor(impl):
    inp = make_inputs(N=16, V=200, seed=9)
    kw = dict(beta=0.04, loss_type="dapo", **COMMON)
    loss_t, _, _ = run_ours(inp, impl, num_items_in_batch=torch.tensor(40), **kw)
    gold, _, _ = run_gold(inp, num_items_in_batch=40, **kw)
    assert_close(loss_t, gold, atol=1e-6, what="loss")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mcl", [6, 50])
def test_grpo_dr_grpo_max_completion_length(impl, mcl):
    inp = make_inputs(N=24, V=300, seed=10)
    loss, _, _ = check_against_gold(inp, impl, beta=0.0, loss_type="dr_grpo", max_completion_length=mcl, **COMMON)
    loss_ref, _, _ = run_ours(inp, impl, beta=0.0, loss_type="dr_grpo", max_completion_length=2 * mcl, **COMMON)
    assert_close(loss_ref * 2, loss, atol=1e-6, what="dr_grpo normalizer")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_extreme_logits(chunk8, impl):
    """Logits of ~1e4: everything finite, and no worse than plain fp32 PyTorch (plus 1e-5 rel)."""
    N, V = 24, 1000
    inp = make_inputs(N=N, V=V, seed=11, logit_scale=1e4 / 4.0)  # |h| ~ 4 -> logits ~ 1e4
    # Half the tokens are the argmax (log-prob ~ 0), half random (log-prob ~ -1e4).
    with torch.no_grad():
        logits = reference.linear_logits_reference(inp.hidden.double(), inp.weight.double(), inp.bias.double(), 0.7)
        assert logits.abs().max() > 5e3
        inp.token_ids[::2] = logits[::2].argmax(-1)
        logp, _ = reference.linear_logprobs_reference(
            inp.hidden.double(), inp.weight.double(), inp.token_ids, inp.bias.double(), 0.7
        )
        g = torch.Generator().manual_seed(0)
        inp.old = (logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
        inp.ref = (logp + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)).float()
    keep_ratios_off_bounds(inp, margin=0.02)  # fp32 log-probs of ~-1e4 are off by ~1e-3
    kw = dict(beta=0.04, loss_type="grpo", **COMMON)
    loss, metrics, grads = run_ours(inp, impl, **kw)
    gold_loss, gold_metrics, gold_grads = run_gold(inp, **kw)
    assert torch.isfinite(gold_loss)
    # plain fp32 PyTorch on the same inputs: its error is the floor the kernel is held to
    h32 = inp.hidden.clone().requires_grad_(True)
    w32 = inp.weight.clone().requires_grad_(True)
    b32 = inp.bias.clone().requires_grad_(True)
    loss32, _ = reference.grpo_loss_reference(
        h32, w32, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=b32, **kw
    )
    grads32 = torch.autograd.grad(loss32, (h32, w32, b32))
    assert torch.isfinite(loss) and all(torch.isfinite(g_).all() for g_ in grads)
    # The loss is one number, and plain fp32 may be lucky on it: also allow what rounding the logits
    # (|z| ~ 1e4, one ulp ~ 1e-3) can do to it, eps32 * max|z| * |dL/dlogp|.
    lp = logp.clone().requires_grad_(True)
    loss_lp, _ = reference.grpo_loss_from_logprobs(
        lp, inp.advantages, inp.seq_ids, inp.old, inp.ref, **{k: v for k, v in kw.items() if k != "temperature"}
    )
    (dloss_dlogp,) = torch.autograd.grad(loss_lp, lp)
    assert abs(loss_lp.item() - gold_loss.item()) < 1e-6
    rounding = torch.finfo(torch.float32).eps * logits.abs().max().item() * dloss_dlogp.norm().item()
    names = ("loss", "hidden", "weight", "bias")
    triples = zip(names, (loss, *grads), (gold_loss, *gold_grads), (loss32, *grads32), strict=True)
    for name, ours, gold, plain in triples:
        bound = 4 * err(plain, gold) + 1e-5 * gold.double().norm().item() + 1e-6
        if name == "loss":
            bound += rounding
        assert err(ours, gold) <= bound, (
            f"{name}: {err(ours, gold):.3e} > {bound:.3e} (plain fp32 {err(plain, gold):.3e})"
        )
    for key in METRIC_KEYS:
        assert torch.isfinite(metrics[key])
    assert_close(metrics["clip_ratio_region"], gold_metrics["clip_ratio_region"].float(), atol=1e-6, what="clip")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_strided_inputs_and_int32_ids(chunk8, impl):
    """Non-contiguous views and int32 ids give the same result as contiguous int64 inputs."""
    inp = make_inputs(N=20, V=300, seed=20)
    kw = dict(beta=0.04, loss_type="grpo", importance_sampling_level="token", **COMMON)
    gold_loss, gold_metrics, gold_grads = run_gold(inp, **kw)

    def strided(t):  # same values, stride 2 along dim 0 (and a transposed layout for 2-D)
        if t.dim() == 1:
            return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]
        return t.t().contiguous().t()

    h = strided(inp.hidden).detach().requires_grad_(True)
    w = strided(inp.weight).detach().requires_grad_(True)
    b = strided(inp.bias).detach().requires_grad_(True)
    assert not h.is_contiguous() and not w.is_contiguous() and not b.is_contiguous()
    loss, metrics = fused_linear_grpo_loss(
        h,
        w,
        strided(inp.token_ids.int()),
        strided(inp.advantages),
        strided(inp.seq_ids.int()),
        strided(inp.old),
        strided(inp.ref),
        bias=b,
        impl=impl,
        **kw,
    )
    loss.backward()
    assert_close(loss.detach(), gold_loss, atol=1e-6, what="loss")
    check_metrics(metrics, gold_metrics)
    for name, a, g in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), gold_grads, strict=True):
        assert_close(a, g, what=f"grad {name}")


def test_grpo_mixed_dtypes():
    """fp32 hidden with a bf16 head: each gradient comes back in its input's dtype."""
    inp = make_inputs(N=16, V=200, seed=21)
    inp.weight = inp.weight.bfloat16()
    inp.bias = inp.bias.bfloat16()
    kw = dict(beta=0.04, loss_type="dapo", **COMMON)
    loss, _, grads = run_ours(inp, "torch", **kw)
    gold_loss, _, gold_grads = run_gold(inp, **kw)
    assert grads[0].dtype == torch.float32 and grads[1].dtype == torch.bfloat16 and grads[2].dtype == torch.bfloat16
    assert_close(loss, gold_loss, rtol=1e-5, atol=1e-6, what="loss")  # the GEMM runs in fp32
    for name, a, g in zip(("hidden", "weight", "bias"), grads, gold_grads, strict=True):
        assert_close(a.float(), g, rtol=1e-2, atol=1e-6, what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_empty_batch(impl):
    """N = 0 (every completion fully masked): loss 0, zero grads, finite metrics."""
    inp = make_inputs(N=4, V=50, S=3, seed=12)
    h = inp.hidden[:0].clone().requires_grad_(True)
    w = inp.weight.clone().requires_grad_(True)
    loss, metrics = fused_linear_grpo_loss(
        h,
        w,
        inp.token_ids[:0],
        inp.advantages,
        inp.seq_ids[:0],
        inp.old[:0],
        inp.ref[:0],
        beta=0.04,
        loss_type="grpo",
        impl=impl,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert h.grad is not None and h.grad.shape == (0, 16)
    assert w.grad is not None and w.grad.abs().sum() == 0
    assert all(torch.isfinite(m) for m in metrics.values())


# ---------------------------------------------------------------------------------------
# dtypes, frozen parameters, no_grad, upstream gradient
# ---------------------------------------------------------------------------------------


def keep_ratios_off_bounds(inp: Inputs, margin: float, temperature=COMMON["temperature"]):
    """A token's gradient jumps to 0 where its ratio crosses a clip bound or delta: move every token-level
    log-ratio at least ``margin`` away from log(1 - eps_low), log(1 + eps_high), log(delta), so that the
    rounding of a lower-precision run cannot flip one (the test would then fail for no fault)."""
    with torch.no_grad():
        logp, _ = reference.linear_logprobs_reference(
            inp.hidden.double(), inp.weight.double(), inp.token_ids, inp.bias.double(), temperature
        )
        bounds = torch.tensor([1 - COMMON["epsilon_low"], 1 + COMMON["epsilon_high"], COMMON["delta"]]).double().log()

        def distance():
            return ((logp - inp.old.double())[:, None] - bounds[None, :]).abs().min(1).values

        safe = torch.tensor([-0.5, 0.0, 0.326, 0.7], dtype=torch.float64)[torch.arange(logp.numel()) % 4]
        inp.old = torch.where(distance() < 2 * margin, (logp - safe).float(), inp.old)
        assert distance().min() >= margin


def test_grpo_bf16_inputs(chunk8):
    inp = make_inputs(N=32, V=1000, seed=13, dtype=torch.bfloat16)
    keep_ratios_off_bounds(inp, margin=0.05)  # bf16 logits are off by ~1e-2
    kw = dict(beta=0.04, loss_type="grpo", **COMMON)
    loss, metrics, grads = run_ours(inp, "torch", **kw)
    gold_loss, gold_metrics, gold_grads = run_gold(inp, **kw)  # fp64 on the bf16 values
    assert loss.dtype == torch.float32
    assert grads[0].dtype == torch.bfloat16 and grads[1].dtype == torch.bfloat16 and grads[2].dtype == torch.bfloat16
    assert_close(loss, gold_loss, rtol=2e-2, atol=1e-3, what="bf16 loss")
    for name, a, b in zip(("hidden", "weight", "bias"), grads, gold_grads, strict=True):
        assert_close(a.float(), b, rtol=5e-2, atol=1e-4, what=f"bf16 grad {name}")
    assert_close(metrics["entropy"], gold_metrics["entropy"].float(), rtol=2e-2, what="bf16 entropy")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_frozen_weight(impl):
    inp = make_inputs(N=16, V=200, seed=14)
    kw = dict(beta=0.04, loss_type="dapo", **COMMON)
    h = inp.hidden.clone().requires_grad_(True)
    w = inp.weight.clone()  # frozen head (LoRA / PEFT)
    b = inp.bias.clone()
    loss, _ = fused_linear_grpo_loss(
        h, w, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=b, impl=impl, **kw
    )
    loss.backward()
    gold_loss, _, gold_grads = run_gold(inp, **kw)
    assert w.grad is None and b.grad is None
    assert_close(loss.detach(), gold_loss, atol=1e-6, what="loss")
    assert_close(h.grad, gold_grads[0], what="grad hidden")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_frozen_hidden(impl):
    """Only the head trains: hidden does not require grad."""
    inp = make_inputs(N=16, V=200, seed=15)
    kw = dict(beta=0.0, loss_type="bnpo", **COMMON)
    w = inp.weight.clone().requires_grad_(True)
    loss, _ = fused_linear_grpo_loss(
        inp.hidden, w, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, bias=inp.bias, impl=impl, **kw
    )
    loss.backward()
    inp.ref = None
    _, _, gold_grads = run_gold(inp, **kw)
    assert_close(w.grad, gold_grads[1], what="grad weight")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_no_grad(impl):
    inp = make_inputs(N=16, V=200, seed=16)
    kw = dict(beta=0.04, loss_type="grpo", importance_sampling_level="sequence", **COMMON)
    loss, metrics, _ = run_ours(inp, impl, **kw)
    h = inp.hidden.clone().requires_grad_(True)
    with torch.no_grad():
        loss_ng, metrics_ng = fused_linear_grpo_loss(
            h, inp.weight, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=inp.bias, impl=impl, **kw
        )
    assert not loss_ng.requires_grad
    assert_close(loss_ng, loss, rtol=1e-6, atol=1e-7, what="no_grad loss")
    for key in METRIC_KEYS:
        assert_close(metrics_ng[key], metrics[key], rtol=1e-6, atol=1e-7, what=key)
    # Plain tensors that need no grad at all give a loss that needs none either.
    loss_plain, _ = fused_linear_grpo_loss(
        inp.hidden,
        inp.weight,
        inp.token_ids,
        inp.advantages,
        inp.seq_ids,
        inp.old,
        inp.ref,
        bias=inp.bias,
        impl=impl,
        **kw,
    )
    assert not loss_plain.requires_grad
    assert_close(loss_plain, loss, rtol=1e-6, atol=1e-7, what="plain loss")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_upstream_gradient(impl):
    inp = make_inputs(N=16, V=200, seed=17)
    kw = dict(beta=0.04, loss_type="grpo", **COMMON)
    _, _, grads = run_ours(inp, impl, upstream=3.0, **kw)
    _, _, gold_grads = run_gold(inp, **kw)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, gold_grads, strict=True):
        assert_close(a, 3.0 * b, what=f"grad {name} x3")


@pytest.mark.parametrize("impl", IMPLS)
def test_grpo_loss_in_a_larger_graph(impl):
    """The loss composes with other autograd ops (hidden comes out of a layer, loss is summed)."""
    inp = make_inputs(N=12, V=100, seed=18)
    kw = dict(beta=0.04, loss_type="dapo", **COMMON)
    lin = torch.nn.Linear(16, 16)
    x = inp.hidden.clone()
    loss, _ = fused_linear_grpo_loss(
        lin(x), inp.weight, inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref, bias=inp.bias, impl=impl, **kw
    )
    (0.5 * loss).backward()
    lin64 = torch.nn.Linear(16, 16).double()
    lin64.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    gold, _ = reference.grpo_loss_reference(
        lin64(x.double()), inp.weight.double(), inp.token_ids, inp.advantages, inp.seq_ids, inp.old, inp.ref,
        bias=inp.bias.double(), **kw,
    )  # fmt: skip
    (0.5 * gold).backward()
    assert_close(lin.weight.grad, lin64.weight.grad, what="upstream layer grad")


# ---------------------------------------------------------------------------------------
# Bad arguments
# ---------------------------------------------------------------------------------------


def _bad_cases():
    inp = make_inputs(N=6, V=50, S=3, H=8, seed=19)
    base = dict(
        hidden=inp.hidden,
        weight=inp.weight,
        token_ids=inp.token_ids,
        advantages=inp.advantages,
        seq_ids=inp.seq_ids,
        old_logprobs=inp.old,
        ref_logprobs=inp.ref,
        bias=inp.bias,
    )
    nan_adv = inp.advantages.clone()
    nan_adv[1] = float("nan")
    inf_adv = inp.advantages.clone()
    inf_adv[0] = float("inf")
    bad_tok = inp.token_ids.clone()
    bad_tok[2] = 50
    neg_tok = inp.token_ids.clone()
    neg_tok[0] = -1
    bad_seq = inp.seq_ids.clone()
    bad_seq[3] = 3
    neg_seq = inp.seq_ids.clone()
    neg_seq[0] = -1
    return base, [
        ("hidden_size", dict(weight=inp.weight[:, :7]), "hidden"),
        ("hidden_1d", dict(hidden=inp.hidden[0]), "hidden"),
        ("token_ids_len", dict(token_ids=inp.token_ids[:5]), "token_ids"),
        ("seq_ids_len", dict(seq_ids=inp.seq_ids[:5]), "seq_ids"),
        ("old_len", dict(old_logprobs=inp.old[:5]), "old_logprobs"),
        ("ref_len", dict(ref_logprobs=inp.ref[:4]), "ref_logprobs"),
        ("bias_len", dict(bias=inp.bias[:49]), "bias"),
        ("loss_type", dict(loss_type="ppo"), "loss_type"),
        ("level", dict(importance_sampling_level="seq"), "importance_sampling_level"),
        ("token_high", dict(token_ids=bad_tok), "token_ids"),
        ("token_neg", dict(token_ids=neg_tok), "token_ids"),
        ("adv_nan", dict(advantages=nan_adv), "advantages"),
        ("adv_inf", dict(advantages=inf_adv), "advantages"),
        ("seq_high", dict(seq_ids=bad_seq), "seq_ids"),
        ("seq_neg", dict(seq_ids=neg_seq), "seq_ids"),
        ("dr_grpo", dict(loss_type="dr_grpo"), "max_completion_length"),
        ("temp0", dict(temperature=0.0), "temperature"),
        ("temp_neg", dict(temperature=-1.0), "temperature"),
        ("impl", dict(impl="cuda"), "impl"),
    ]


_BASE, _BAD = _bad_cases()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [c[0] for c in _BAD])
def test_grpo_bad_arguments(impl, case):
    _, change, match = next(c for c in _BAD if c[0] == case)
    args = {**_BASE, "impl": impl, **change}
    positional = [args.pop(k) for k in ("hidden", "weight", "token_ids", "advantages", "seq_ids")]
    with pytest.raises(ValueError, match=match):
        fused_linear_grpo_loss(*positional, **args)
