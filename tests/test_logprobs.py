"""fused_linear_logprobs (+ entropy) against reference.linear_logprobs_reference (fp64 gold).

Forward and backward of loss = (logp * r1).sum() + (entropy * r2).sum() with random r1, r2, on
impl="torch" and impl="triton" (the interpreter on CPU); tolerance fp32 ~1e-5 relative to the norm.
"""

from __future__ import annotations

import pytest
import torch
from gold import assert_close, err

from prorank_fast.kernels import fused_linear_logprobs, reference

IMPLS = ("torch", "triton")


@pytest.fixture
def chunk8(monkeypatch):
    monkeypatch.setenv("PRORANK_CHUNK_ROWS", "8")


def make(N=24, H=16, V=1000, *, seed=0, bias=True, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * (scale / H**0.5)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    tokens = torch.randint(0, V, (N,), generator=g)
    r1 = torch.randn(N, generator=g)
    r2 = torch.randn(N, generator=g)
    return hidden, weight, b, tokens, r1, r2


def leaves(*ts, dtype=None):
    return [None if t is None else t.detach().clone().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def gold(hidden, weight, bias, tokens, r1, r2, temperature):
    h, w, b = leaves(hidden, weight, bias, dtype=torch.float64)
    logp, ent = reference.linear_logprobs_reference(h, w, tokens, b, temperature)
    loss = (logp * r1.double()).sum() + (ent * r2.double()).sum()
    params = [t for t in (h, w, b) if t is not None]
    grads = list(torch.autograd.grad(loss, params))
    if b is None:
        grads.append(None)
    return logp.detach(), ent.detach(), grads


def ours(hidden, weight, bias, tokens, r1, r2, temperature, impl, *, with_entropy=True, upstream=1.0):
    h, w, b = leaves(hidden, weight, bias)
    if with_entropy:
        logp, ent = fused_linear_logprobs(h, w, tokens, bias=b, temperature=temperature, return_entropy=True, impl=impl)
        loss = (logp * r1).sum() + (ent * r2).sum()
    else:
        logp = fused_linear_logprobs(h, w, tokens, bias=b, temperature=temperature, impl=impl)
        ent = None
        loss = (logp * r1).sum()
    (loss * upstream).backward()
    return logp.detach(), None if ent is None else ent.detach(), [h.grad, w.grad, None if b is None else b.grad]


def check(hidden, weight, bias, tokens, r1, r2, temperature, impl, rtol=1e-5):
    logp, ent, grads = ours(hidden, weight, bias, tokens, r1, r2, temperature, impl)
    g_logp, g_ent, g_grads = gold(hidden, weight, bias, tokens, r1, r2, temperature)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == (hidden.shape[0],) and ent.shape == (hidden.shape[0],)
    assert_close(logp, g_logp, rtol=rtol, what="logp")
    assert_close(ent, g_ent, rtol=rtol, what="entropy")
    for name, a, g, x in zip(("hidden", "weight", "bias"), grads, g_grads, (hidden, weight, bias), strict=True):
        if g is None:
            assert a is None
            continue
        assert a.dtype == x.dtype, f"grad {name}: dtype {a.dtype} != {x.dtype}"
        assert_close(a.float(), g, rtol=rtol, what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("V", [1000, 4097])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_entropy_match_reference(chunk8, impl, V, temperature):
    check(*make(V=V, seed=1), temperature, impl)


def test_logprobs_qwen_vocab_torch(chunk8):
    """V = 151936 (Qwen2): the bound is twice the error of plain fp32 PyTorch plus 1e-5 relative
    (a sum over 151936 logits costs plain fp32 ~5e-5 relative on the hidden gradient)."""
    args = make(N=10, H=8, V=151936, seed=14)
    hidden, weight, bias, tokens, r1, r2 = args
    logp, ent, grads = ours(*args, 0.7, "torch")
    g_logp, g_ent, g_grads = gold(*args, 0.7)
    h, w, b = leaves(hidden, weight, bias)
    p_logp, p_ent = reference.linear_logprobs_reference(h, w, tokens, b, 0.7)
    ((p_logp * r1).sum() + (p_ent * r2).sum()).backward()
    plain = [p_logp.detach(), p_ent.detach(), h.grad, w.grad, b.grad]
    names = ("logp", "entropy", "hidden", "weight", "bias")
    for name, a, g, p in zip(names, [logp, ent, *grads], [g_logp, g_ent, *g_grads], plain, strict=True):
        bound = 2 * err(p, g) + 1e-5 * g.double().norm().item() + 1e-7
        assert err(a, g) <= bound, f"{name}: {err(a, g):.3e} > {bound:.3e} (plain fp32 {err(p, g):.3e})"


def test_logprobs_auto_impl_on_cpu():
    check(*make(N=12, V=200, seed=15), 1.0, "auto")


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_no_bias_default_chunking(impl):
    check(*make(V=333, seed=2, bias=False), 1.3, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_single_row(impl):
    check(*make(N=1, V=1000, seed=3), 0.7, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk", ["1", "5"])
def test_logprobs_chunk_sizes(monkeypatch, impl, chunk):
    monkeypatch.setenv("PRORANK_CHUNK_ROWS", chunk)
    check(*make(N=13, V=257, seed=4), 0.9, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_without_entropy(chunk8, impl):
    """return_entropy=False returns a tensor (not a tuple) whose gradient is the log-prob term alone."""
    hidden, weight, bias, tokens, r1, _ = make(V=500, seed=5)
    logp, ent, grads = ours(hidden, weight, bias, tokens, r1, None, 0.8, impl, with_entropy=False)
    assert ent is None
    g_logp, _, g_grads = gold(hidden, weight, bias, tokens, r1, torch.zeros_like(r1), 0.8)
    assert_close(logp, g_logp, what="logp")
    for name, a, g in zip(("hidden", "weight", "bias"), grads, g_grads, strict=True):
        assert_close(a, g, what=f"grad {name}")
    out = fused_linear_logprobs(hidden, weight, tokens, bias=bias, temperature=0.8, impl=impl)
    assert isinstance(out, torch.Tensor) and out.shape == (24,)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_entropy_only_gradient(impl):
    """Backward through the entropy alone (logp unused)."""
    hidden, weight, bias, tokens, _, r2 = make(N=12, V=300, seed=6)
    h, w, b = leaves(hidden, weight, bias)
    _, ent = fused_linear_logprobs(h, w, tokens, bias=b, temperature=0.7, return_entropy=True, impl=impl)
    (ent * r2).sum().backward()
    _, _, g_grads = gold(hidden, weight, bias, tokens, torch.zeros_like(r2), r2, 0.7)
    for name, a, g in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), g_grads, strict=True):
        assert_close(a, g, what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_extreme_logits(chunk8, impl):
    """Logits ~1e4, half the tokens the argmax: finite, and no worse than plain fp32 PyTorch."""
    hidden, weight, bias, tokens, r1, r2 = make(N=24, V=1000, seed=7, scale=1e4 / 4.0)
    with torch.no_grad():
        logits = reference.linear_logits_reference(hidden.double(), weight.double(), bias.double(), 0.7)
        assert logits.abs().max() > 5e3
        tokens[::2] = logits[::2].argmax(-1)
    logp, ent, grads = ours(hidden, weight, bias, tokens, r1, r2, 0.7, impl)
    g_logp, g_ent, g_grads = gold(hidden, weight, bias, tokens, r1, r2, 0.7)
    h, w, b = leaves(hidden, weight, bias)
    p_logp, p_ent = reference.linear_logprobs_reference(h, w, tokens, b, 0.7)
    ((p_logp * r1).sum() + (p_ent * r2).sum()).backward()
    plain = [p_logp.detach(), p_ent.detach(), h.grad, w.grad, b.grad]
    names = ("logp", "entropy", "hidden", "weight", "bias")
    for name, a, g, p in zip(names, [logp, ent, *grads], [g_logp, g_ent, *g_grads], plain, strict=True):
        assert torch.isfinite(a).all(), name
        bound = 4 * err(p, g) + 1e-5 * g.double().norm().item() + 1e-6
        assert err(a, g) <= bound, f"{name}: {err(a, g):.3e} > {bound:.3e} (plain fp32 {err(p, g):.3e})"
    assert (logp[::2] > -1e-3).all()  # argmax tokens: probability ~1
    assert (ent >= -1e-6).all()


def test_logprobs_bf16():
    """bf16 hidden/weight/bias accepted; fp32 outputs; grads in bf16; bf16-level error vs the fp64 gold."""
    hidden, weight, bias, tokens, r1, r2 = make(N=32, V=1000, seed=8, dtype=torch.bfloat16)
    logp, ent, grads = ours(hidden, weight, bias, tokens, r1, r2, 0.7, "torch")
    g_logp, g_ent, g_grads = gold(hidden, weight, bias, tokens, r1, r2, 0.7)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in grads)
    assert_close(logp, g_logp, rtol=2e-2, atol=1e-3, what="bf16 logp")
    assert_close(ent, g_ent, rtol=2e-2, atol=1e-3, what="bf16 entropy")
    for name, a, g in zip(("hidden", "weight", "bias"), grads, g_grads, strict=True):
        assert_close(a.float(), g, rtol=5e-2, atol=1e-4, what=f"bf16 grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_frozen_head_and_upstream_scale(impl):
    hidden, weight, bias, tokens, r1, r2 = make(N=16, V=300, seed=9)
    h = hidden.clone().requires_grad_(True)
    logp, ent = fused_linear_logprobs(h, weight, tokens, bias=bias, temperature=0.7, return_entropy=True, impl=impl)
    (3.0 * ((logp * r1).sum() + (ent * r2).sum())).backward()
    _, _, g_grads = gold(hidden, weight, bias, tokens, r1, r2, 0.7)
    assert weight.grad is None and bias.grad is None
    assert_close(h.grad, 3.0 * g_grads[0], what="grad hidden x3")


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_no_grad(impl):
    hidden, weight, bias, tokens, r1, r2 = make(N=16, V=300, seed=10)
    h, w = leaves(hidden, weight)
    with torch.no_grad():
        logp, ent = fused_linear_logprobs(h, w, tokens, bias=bias, temperature=0.7, return_entropy=True, impl=impl)
    assert not logp.requires_grad and not ent.requires_grad
    g_logp, g_ent, _ = gold(hidden, weight, bias, tokens, r1, r2, 0.7)
    assert_close(logp, g_logp, what="logp")
    assert_close(ent, g_ent, what="entropy")


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_strided_inputs_and_int32_ids(impl):
    hidden, weight, bias, tokens, r1, r2 = make(N=20, V=300, seed=11)
    g_logp, g_ent, g_grads = gold(hidden, weight, bias, tokens, r1, r2, 0.7)
    h = hidden.t().contiguous().t().requires_grad_(True)
    w = weight.t().contiguous().t().requires_grad_(True)
    b = torch.stack([bias, torch.zeros_like(bias)], 1)[:, 0].detach().requires_grad_(True)
    tok = torch.stack([tokens.int(), tokens.int()], 1)[:, 0]
    assert not (h.is_contiguous() or w.is_contiguous() or b.is_contiguous() or tok.is_contiguous())
    logp, ent = fused_linear_logprobs(h, w, tok, bias=b, temperature=0.7, return_entropy=True, impl=impl)
    ((logp * r1).sum() + (ent * r2).sum()).backward()
    assert_close(logp.detach(), g_logp, what="logp")
    assert_close(ent.detach(), g_ent, what="entropy")
    for name, a, g in zip(("hidden", "weight", "bias"), (h.grad, w.grad, b.grad), g_grads, strict=True):
        assert_close(a, g, what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_empty(impl):
    hidden, weight, bias, tokens, _, _ = make(N=3, V=50, seed=12)
    h = hidden[:0].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp, ent = fused_linear_logprobs(h, w, tokens[:0], bias=bias, return_entropy=True, impl=impl)
    assert logp.shape == (0,) and ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert h.grad.shape == (0, 16) and w.grad.abs().sum() == 0


def _bad():
    hidden, weight, bias, tokens, _, _ = make(N=6, H=8, V=50, seed=13)
    bad_tok = tokens.clone()
    bad_tok[0] = 50
    neg_tok = tokens.clone()
    neg_tok[1] = -3
    base = dict(hidden=hidden, weight=weight, token_ids=tokens, bias=bias)
    cases = [
        ("hidden_size", dict(weight=weight[:, :5]), "hidden"),
        ("hidden_3d", dict(hidden=hidden[None]), "hidden"),
        ("weight_1d", dict(weight=weight[0]), "weight"),
        ("token_len", dict(token_ids=tokens[:4]), "token_ids"),
        ("token_high", dict(token_ids=bad_tok), "token_ids"),
        ("token_neg", dict(token_ids=neg_tok), "token_ids"),
        ("token_float", dict(token_ids=tokens.float()), "token_ids"),
        ("bias_len", dict(bias=bias[:10]), "bias"),
        ("temp0", dict(temperature=0.0), "temperature"),
        ("temp_neg", dict(temperature=-0.5), "temperature"),
        ("temp_nan", dict(temperature=float("nan")), "temperature"),
        ("impl", dict(impl="numpy"), "impl"),
    ]
    return base, cases


_BASE, _BAD = _bad()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", [c[0] for c in _BAD])
def test_logprobs_bad_arguments(impl, case):
    _, change, match = next(c for c in _BAD if c[0] == case)
    args = {**_BASE, "impl": impl, **change}
    hidden, weight, tokens = args.pop("hidden"), args.pop("weight"), args.pop("token_ids")
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(hidden, weight, tokens, **args)
