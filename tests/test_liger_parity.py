"""FusedLinearGRPOLoss is a drop-in for liger_kernel's LigerFusedLinearGRPOLoss.

Same constructor arguments, same forward inputs ([B, T, H] + a padded attention mask with a
fully masked row), same outputs: the loss, the metrics tuple ((kl,) if beta != 0, then
(clip_ratio,), Liger's token-weighted clip ratio at sequence level too), and the gradients of
_input, lin_weight and bias. Liger runs with compiled=False; both sides are fp32.
"""

from __future__ import annotations

import pytest
import torch
from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

from prorank_fast.kernels import FusedLinearGRPOLoss, reference

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
LEVELS = ("token", "sequence")
B, T, H, V = 5, 8, 16, 300


def make_batch(*, seed=0, temperature=1.0, with_bias=False, all_masked=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    bias = torch.randn(V, generator=g) * 0.5 if with_bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([8, 0, 5, 3, 7])  # row 1 fully masked
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    mask[4, 2] = 0  # a hole inside a completion (tool-output tokens are masked like this)
    if all_masked:
        mask.zero_()
    adv = torch.randn(B, generator=g)
    with torch.no_grad():
        flat = reference.linear_logprobs_reference(
            x.reshape(-1, H).double(),
            weight.double(),
            tokens.reshape(-1),
            None if bias is None else bias.double(),
            temperature,
        )[0].reshape(B, T)
    shift = 0.45 * torch.randn(B, 1, generator=g, dtype=torch.float64)
    old = (flat + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64) + shift).float()
    ref = (flat + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    # junk (finite) at padded positions: it must not leak into anything
    old = torch.where(mask.bool(), old, torch.full_like(old, -7.0))
    ref = torch.where(mask.bool(), ref, torch.full_like(ref, 3.0))
    return dict(x=x, weight=weight, bias=bias, tokens=tokens, mask=mask, adv=adv, old=old, ref=ref)


def run(module, batch, *, with_old, with_ref, num_items_in_batch=None, ref_input=None, ref_weight=None):
    x = batch["x"].clone().requires_grad_(True)
    w = batch["weight"].clone().requires_grad_(True)
    b = None if batch["bias"] is None else batch["bias"].clone().requires_grad_(True)
    kwargs = {}
    if num_items_in_batch is not None:
        kwargs["num_items_in_batch"] = num_items_in_batch
    loss, metrics = module(
        x,
        w,
        batch["tokens"],
        batch["mask"],
        batch["adv"],
        bias=b,
        ref_per_token_logps=batch["ref"] if with_ref else None,
        old_per_token_logps=batch["old"] if with_old else None,
        ref_input=ref_input,
        ref_weight=ref_weight,
        **kwargs,
    )
    loss.backward()
    return loss.detach(), metrics, (x.grad, w.grad, None if b is None else b.grad)


def assert_close(a, b, rtol=1e-5, atol=1e-7, what=""):
    assert a is not None and b is not None, f"{what}: None ({a is None}, {b is None})"
    a = torch.as_tensor(a).detach()
    b = torch.as_tensor(b).detach()
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite"
    e = (a.double() - b.double()).norm().item()
    bound = rtol * b.double().norm().item() + atol
    assert e <= bound, f"{what}: |ours - liger| = {e:.3e} > {bound:.3e} (ours {a}, liger {b})"


def assert_same_as_liger(ours_out, liger_out, *, with_bias=False):
    loss, metrics, grads = ours_out
    l_loss, l_metrics, l_grads = liger_out
    assert_close(loss, l_loss, atol=1e-6, what="loss")
    assert isinstance(metrics, tuple), f"metrics must be a tuple like Liger's, got {type(metrics).__name__}"
    assert len(metrics) == len(l_metrics), f"{len(metrics)} metrics, Liger returns {len(l_metrics)}"
    for i, (m, lm) in enumerate(zip(metrics, l_metrics, strict=True)):
        assert torch.as_tensor(m).dim() == 0
        assert_close(m, lm, atol=1e-6, what=f"metric {i}")
    names = ("_input", "lin_weight", "bias") if with_bias else ("_input", "lin_weight")
    for name, a, b in zip(names, grads, l_grads, strict=False):
        assert_close(a, b, what=f"grad {name}")


def modules(impl="torch", **cfg):
    ours = FusedLinearGRPOLoss(compiled=False, impl=impl, **cfg)
    liger = LigerFusedLinearGRPOLoss(compiled=False, **cfg)
    return ours, liger


def _cfg(loss_type, level, beta, temperature):
    return dict(
        beta=beta,
        use_ref_model=beta != 0.0,
        loss_type=loss_type,
        importance_sampling_level=level,
        temperature=temperature,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=T + 3 if loss_type == "dr_grpo" else None,
    )


MATRIX = [
    pytest.param(lt, lvl, beta, with_old, temp, id=f"{lt}-{lvl}-b{beta}-{'old' if with_old else 'noold'}-t{temp}")
    for lt in LOSS_TYPES
    for lvl in LEVELS
    for beta in (0.0, 0.04)
    for with_old in (True, False)
    for temp in (1.0, 0.8)
]


@pytest.mark.parametrize("loss_type,level,beta,with_old,temperature", MATRIX)
def test_module_matches_liger(loss_type, level, beta, with_old, temperature):
    batch = make_batch(seed=1, temperature=temperature)
    ours, liger = modules(**_cfg(loss_type, level, beta, temperature))
    ours_out = run(ours, batch, with_old=with_old, with_ref=beta != 0.0)
    liger_out = run(liger, batch, with_old=with_old, with_ref=beta != 0.0)
    assert_same_as_liger(ours_out, liger_out)
    assert len(ours_out[1]) == (2 if beta != 0.0 else 1)
    if with_old:
        assert liger_out[1][-1] > 0  # clipping happens: the clip metric comparison is not vacuous
    # the fully masked row and the padded positions get exactly no gradient
    x_grad = ours_out[2][0]
    assert x_grad[1].abs().sum() == 0
    assert x_grad[~batch["mask"].bool()].abs().sum() == 0


TRITON_CASES = [
    ("grpo", "sequence", 0.04, True, 0.8),
    ("dapo", "token", 0.04, True, 1.0),
    ("bnpo", "token", 0.0, True, 0.8),
    ("dr_grpo", "sequence", 0.0, False, 1.0),
]


@pytest.mark.parametrize("loss_type,level,beta,with_old,temperature", TRITON_CASES)
def test_module_triton_matches_liger(monkeypatch, loss_type, level, beta, with_old, temperature):
    monkeypatch.setenv("PRORANK_CHUNK_ROWS", "8")
    batch = make_batch(seed=2, temperature=temperature, with_bias=True)
    ours, liger = modules(impl="triton", **_cfg(loss_type, level, beta, temperature))
    assert_same_as_liger(
        run(ours, batch, with_old=with_old, with_ref=beta != 0.0),
        run(liger, batch, with_old=with_old, with_ref=beta != 0.0),
        with_bias=True,
    )


@pytest.mark.parametrize("level", LEVELS)
def test_module_bias_delta_chunking(monkeypatch, level):
    """Bias, delta (two-sided clipping), several row chunks."""
    monkeypatch.setenv("PRORANK_CHUNK_ROWS", "8")
    batch = make_batch(seed=3, temperature=0.8, with_bias=True)
    cfg = {**_cfg("grpo", level, 0.04, 0.8), "delta": 1.5}
    ours, liger = modules(**cfg)
    assert_same_as_liger(
        run(ours, batch, with_old=True, with_ref=True),
        run(liger, batch, with_old=True, with_ref=True),
        with_bias=True,
    )


def test_module_defaults_match_liger():
    """Default constructor (beta=0.04, use_ref_model=True, dapo, token, eps 0.2)."""
    batch = make_batch(seed=4)
    ours = FusedLinearGRPOLoss()
    liger = LigerFusedLinearGRPOLoss(compiled=False)
    assert ours.beta == liger.beta and ours.loss_type == liger.loss_type
    assert_same_as_liger(
        run(ours, batch, with_old=True, with_ref=True), run(liger, batch, with_old=True, with_ref=True)
    )


@pytest.mark.parametrize("num_items", [60, torch.tensor(45.0)])
def test_module_num_items_in_batch(num_items):
    batch = make_batch(seed=5)
    ours, liger = modules(**_cfg("dapo", "token", 0.04, 1.0))
    assert_same_as_liger(
        run(ours, batch, with_old=True, with_ref=True, num_items_in_batch=num_items),
        run(liger, batch, with_old=True, with_ref=True, num_items_in_batch=num_items),
    )


def test_module_ref_model_inputs():
    """use_ref_model=True with ref_input / ref_weight instead of ref_per_token_logps (Liger's chunk_size 2)."""
    batch = make_batch(seed=6, temperature=0.9)
    g = torch.Generator().manual_seed(60)
    ref_input = batch["x"] + 0.1 * torch.randn(B, T, H, generator=g)
    ref_weight = batch["weight"] + 0.05 * torch.randn(V, H, generator=g)
    cfg = {**_cfg("bnpo", "token", 0.04, 0.9), "chunk_size": 2}
    ours, liger = modules(**cfg)
    ours_out = run(ours, batch, with_old=True, with_ref=False, ref_input=ref_input, ref_weight=ref_weight)
    liger_out = run(liger, batch, with_old=True, with_ref=False, ref_input=ref_input, ref_weight=ref_weight)
    assert_same_as_liger(ours_out, liger_out)
    assert ours_out[1][0] > 1e-4  # the KL to the perturbed reference is really there


def test_module_frozen_head_matches_liger():
    batch = make_batch(seed=7)
    ours, liger = modules(**_cfg("grpo", "token", 0.04, 1.0))
    outs = []
    for module in (ours, liger):
        x = batch["x"].clone().requires_grad_(True)
        w = batch["weight"].clone()  # requires_grad=False
        loss, metrics = module(
            x, w, batch["tokens"], batch["mask"], batch["adv"], ref_per_token_logps=batch["ref"],
            old_per_token_logps=batch["old"],
        )  # fmt: skip
        loss.backward()
        assert w.grad is None
        outs.append((loss.detach(), metrics, (x.grad,)))
    assert_same_as_liger(*outs)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_module_all_rows_masked(loss_type):
    batch = make_batch(seed=8, all_masked=True)
    ours, liger = modules(**_cfg(loss_type, "token", 0.04, 1.0))
    ours_out = run(ours, batch, with_old=True, with_ref=True)
    liger_out = run(liger, batch, with_old=True, with_ref=True)
    assert_same_as_liger(ours_out, liger_out)
    assert ours_out[0].item() == 0.0


def test_module_upstream_gradient_and_no_grad():
    batch = make_batch(seed=9)
    ours, liger = modules(**_cfg("dapo", "sequence", 0.04, 1.0))
    results = []
    for module in (ours, liger):
        x = batch["x"].clone().requires_grad_(True)
        w = batch["weight"].clone().requires_grad_(True)
        args = (batch["tokens"], batch["mask"], batch["adv"])
        kw = dict(ref_per_token_logps=batch["ref"], old_per_token_logps=batch["old"])
        loss, metrics = module(x, w, *args, **kw)
        (2.5 * loss).backward()
        results.append((loss.detach(), metrics, (x.grad, w.grad)))
    assert_same_as_liger(*results)
    with torch.no_grad():
        loss_ng, metrics_ng = ours(batch["x"], batch["weight"], *args, **kw)
    assert_close(loss_ng, results[1][0], atol=1e-6, what="no_grad loss")
    for m, lm in zip(metrics_ng, results[1][1], strict=True):
        assert_close(m, lm, atol=1e-6, what="no_grad metric")
