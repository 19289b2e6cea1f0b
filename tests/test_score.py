"""restricted_vocab_score / restricted_vocab_score_loss against the fp64 reference.

impl="triton" runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py): fp32, small shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from prorank_fast.kernels import reference, restricted_vocab_score, restricted_vocab_score_loss

IMPLS = ("torch", "triton")
REL = 1e-5  # fp32 vs fp64 gold, relative to the gold's magnitude


def _assert_close(got: torch.Tensor, gold: torch.Tensor, rel: float = REL, what: str = "") -> None:
    assert got.shape == gold.shape, (what, got.shape, gold.shape)
    scale = max(float(gold.detach().abs().max()) if gold.numel() else 0.0, 1.0)
    err = float((got.detach().double() - gold.detach().double()).abs().max()) if gold.numel() else 0.0
    assert err <= rel * scale, f"{what}: max abs err {err:.3e} > {rel:.1e} * {scale:.3e}"


def _make(batch: int, hidden_size: int, vocab: int, *, with_bias: bool = True, dtype=torch.float32):
    # Weights scaled so that scores are O(1): the losses keep useful gradients.
    hidden = torch.randn(batch, hidden_size, dtype=dtype)
    weight = (torch.randn(vocab, hidden_size) * 0.2).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    return hidden, weight, bias


def _leaves(*tensors, dtype=None):
    return [
        None if t is None else (t.detach().to(dtype) if dtype else t.detach().clone()).requires_grad_() for t in tensors
    ]


def _grads(out: torch.Tensor, inputs, grad_out: torch.Tensor | None = None):
    present = [t for t in inputs if t is not None]
    got = torch.autograd.grad(out, present, grad_out)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


SCORE_CASES = {
    # name: (B, H, V, token_ids, token_weights, with_bias); None ids -> the API default (16, 15) / (1, -1)
    "default_ids_v1000": (8, 64, 1000, None, None, True),
    "duplicates_v4097": (64, 48, 4097, (4096, 3, 4096, 0), (0.5, -2.0, 1.5, 1.0), True),
    "b1_v4097_nobias": (1, 64, 4097, (16, 15), (1.0, -1.0), False),
    "k1_odd_shapes": (33, 17, 1000, (999,), (3.0,), True),
    "k9_more_than_a_block": (5, 64, 1000, tuple(range(100, 109)), tuple(0.25 * i - 0.9 for i in range(9)), True),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_score_forward_backward_matches_fp64_reference(impl, case):
    B, H, V, ids, tw, with_bias = SCORE_CASES[case]
    hidden, weight, bias = _make(B, H, V, with_bias=with_bias)
    kwargs = {} if ids is None else {"token_ids": ids, "token_weights": tw}
    ref_ids, ref_tw = (16, 15) if ids is None else ids, (1.0, -1.0) if tw is None else tw
    g = torch.randn(B)

    h, w, b = _leaves(hidden, weight, bias)
    s = restricted_vocab_score(h, w, bias=b, impl=impl, **kwargs)
    assert s.dtype == torch.float32 and s.shape == (B,)
    dh, dw, db = _grads(s, [h, w, b], g)

    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    s64 = reference.restricted_vocab_score_reference(h64, w64, ref_ids, ref_tw, b64)
    gh, gw, gb = _grads(s64, [h64, w64, b64], g.double())

    _assert_close(s, s64, what="score")
    _assert_close(dh, gh, what="grad hidden")
    _assert_close(dw, gw, what="grad weight")
    assert dw.shape == (V, H) and dw.dtype == weight.dtype
    if with_bias:
        _assert_close(db, gb, what="grad bias")

    # Rows outside the output set get exactly zero; rows inside get a real gradient
    # (unless duplicates cancel, which no case here does).
    in_set = torch.zeros(V, dtype=torch.bool)
    in_set[list(ref_ids)] = True
    assert bool((dw[~in_set] == 0).all())
    assert bool((dw[in_set].abs().sum(-1) > 0).all())
    if with_bias:
        assert bool((db[~in_set] == 0).all())


def test_triton_every_loop_runs_several_blocks(monkeypatch):
    """Tiny block sizes so that the row, column, token and partial-reduction loops (and their
    masked tails) all run more than once at test shapes."""
    from prorank_fast.kernels import score as score_mod

    for name, value in (("_BLOCK_B", 4), ("_BLOCK_H", 16), ("_BLOCK_K", 2), ("_BLOCK_P", 2)):
        monkeypatch.setattr(score_mod, name, value)
    B, H, V = 37, 50, 1000
    ids, tw = (5, 999, 5, 0, 321), (1.0, -0.75, 0.5, 2.0, -1.5)
    hidden, weight, bias = _make(B, H, V)
    g = torch.randn(B)
    h, w, b = _leaves(hidden, weight, bias)
    s = restricted_vocab_score(h, w, ids, tw, bias=b, impl="triton")
    got = _grads(s, [h, w, b], g)
    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    s64 = reference.restricted_vocab_score_reference(h64, w64, ids, tw, b64)
    gold = _grads(s64, [h64, w64, b64], g.double())
    _assert_close(s, s64, what="score")
    for name, a, c in zip(("hidden", "weight", "bias"), got, gold, strict=True):
        _assert_close(a, c, what=f"grad {name}")


@pytest.mark.parametrize("impl", IMPLS)
def test_duplicate_ids_equal_merged_weights(impl):
    hidden, weight, bias = _make(6, 32, 1000)
    h1, w1, b1 = _leaves(hidden, weight, bias)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    s1 = restricted_vocab_score(h1, w1, (7, 7, 9), (0.5, 1.5, -1.0), bias=b1, impl=impl)
    s2 = restricted_vocab_score(h2, w2, (7, 9), (2.0, -1.0), bias=b2, impl=impl)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-5)
    for a, c in zip(_grads(s1.sum(), [h1, w1, b1]), _grads(s2.sum(), [h2, w2, b2]), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_only_requested_grads(impl):
    """Frozen head (weight without grad) and frozen backbone (hidden without grad)."""
    hidden, weight, bias = _make(9, 32, 1000)
    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    gh, gw, gb = _grads(reference.restricted_vocab_score_reference(h64, w64, bias=b64).sum(), [h64, w64, b64])

    h = hidden.clone().requires_grad_()
    restricted_vocab_score(h, weight, bias=bias, impl=impl).sum().backward()
    _assert_close(h.grad, gh, what="grad hidden (frozen head)")

    w, b = _leaves(weight, bias)
    restricted_vocab_score(hidden, w, bias=b, impl=impl).sum().backward()
    _assert_close(w.grad, gw, what="grad weight (frozen backbone)")
    _assert_close(b.grad, gb, what="grad bias (frozen backbone)")


@pytest.mark.parametrize("impl", IMPLS)
def test_never_builds_batch_by_vocab_logits(impl):
    """A 2**40-row head (one stored row, stride 0): [B, V] logits could not be allocated."""
    H, V = 16, 1 << 40
    row = torch.randn(1, H)
    weight = row.expand(V, H)
    hidden = torch.randn(4, H)
    s = restricted_vocab_score(hidden, weight, (V - 1, 5), (2.0, -0.5), impl=impl)
    _assert_close(s, (hidden.double() @ row.double().t()).squeeze(-1) * 1.5, what="score")


@pytest.mark.parametrize("impl", IMPLS)
def test_tensor_token_arguments_match_sequences(impl):
    hidden, weight, bias = _make(5, 32, 1000)
    s_seq = restricted_vocab_score(hidden, weight, (3, 500), (1.0, -0.5), bias=bias, impl=impl)
    s_ten = restricted_vocab_score(
        hidden, weight, torch.tensor([3, 500], dtype=torch.int32), torch.tensor([1.0, -0.5]), bias=bias, impl=impl
    )
    assert torch.equal(s_seq, s_ten)


def test_auto_is_torch_on_cpu():
    hidden, weight, bias = _make(5, 32, 1000)
    s_auto = restricted_vocab_score(hidden, weight, bias=bias)
    s_torch = restricted_vocab_score(hidden, weight, bias=bias, impl="torch")
    assert torch.equal(s_auto, s_torch)


def test_bf16_inputs_torch_impl_close_to_fp32():
    hidden, weight, bias = _make(16, 64, 1000)
    ids, tw = (16, 15, 999), (1.0, -1.0, 0.5)
    labels = torch.rand(16)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        h, w, b = _leaves(hidden, weight, bias, dtype=dtype)
        loss, s = restricted_vocab_score_loss(h, w, labels, token_ids=ids, token_weights=tw, bias=b, impl="torch")
        assert s.dtype == torch.float32 and loss.dtype == torch.float32
        grads = _grads(s, [h, w, b], torch.ones(16))
        assert [t.dtype for t in grads] == [dtype] * 3
        out[dtype] = (loss, s, *grads)
    for name, a, c in zip(
        ("loss", "score", "grad hidden", "grad weight", "grad bias"),
        out[torch.bfloat16],
        out[torch.float32],
        strict=True,
    ):
        _assert_close(a, c, rel=2e-2, what=f"bf16 {name}")


# ---------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------


def _graded_labels(batch: int, group: int) -> torch.Tensor:
    lab = torch.randint(0, 4, (batch,)).float()
    lab.view(-1, group)[:, 0] = 3.0  # no group sums to 0
    return lab


LOSS_CASES = {
    # name: (loss kwargs builder(B) -> dict, B)
    "bce_soft": (lambda B: {"loss": "bce", "labels": torch.rand(B)}, 12),
    "bce_hard_sum": (lambda B: {"loss": "bce", "labels": (torch.rand(B) > 0.5).float(), "reduction": "sum"}, 12),
    "mse_soft": (lambda B: {"loss": "mse", "labels": torch.rand(B)}, 12),
    "listwise_first_positive": (lambda B: {"loss": "listwise", "labels": None, "group_size": 4}, 12),
    "listwise_graded_sum": (
        lambda B: {"loss": "listwise", "labels": _graded_labels(B, 6), "group_size": 6, "reduction": "sum"},
        12,
    ),
    "distill_t2": (
        lambda B: {
            "loss": "distill",
            "labels": None,
            "group_size": 4,
            "teacher_scores": 3 * torch.randn(B),
            "temperature": 2.0,
        },
        12,
    ),
    "distill_t05_sum_one_group": (
        lambda B: {
            "loss": "distill",
            "labels": None,
            "group_size": B,
            "teacher_scores": torch.randn(B),
            "temperature": 0.5,
            "reduction": "sum",
        },
        8,
    ),
    "bce_b1": (lambda B: {"loss": "bce", "labels": torch.tensor([0.3])}, 1),
    "mse_b1_sum": (lambda B: {"loss": "mse", "labels": torch.tensor([0.9]), "reduction": "sum"}, 1),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_forward_backward_matches_fp64_reference(impl, case):
    build, B = LOSS_CASES[case]
    kw = build(B)
    labels = kw.pop("labels")
    ids, tw = (16, 15, 700), (1.0, -1.0, 0.25)
    hidden, weight, bias = _make(B, 32, 1000)

    h, w, b = _leaves(hidden, weight, bias)
    loss, s = restricted_vocab_score_loss(h, w, labels, token_ids=ids, token_weights=tw, bias=b, impl=impl, **kw)
    assert loss.shape == () and loss.dtype == torch.float32 and s.shape == (B,)
    grads = _grads(loss, [h, w, b])

    h64, w64, b64 = _leaves(hidden, weight, bias, dtype=torch.float64)
    s64 = reference.restricted_vocab_score_reference(h64, w64, ids, tw, b64)
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss64 = reference.score_loss_reference(s64, None if labels is None else labels.double(), **kw64)
    gold = _grads(loss64, [h64, w64, b64])

    _assert_close(loss, loss64, what="loss")
    _assert_close(s, s64, what="score")
    for name, a, c in zip(("hidden", "weight", "bias"), grads, gold, strict=True):
        _assert_close(a, c, what=f"grad {name}")
    assert float(grads[0].abs().max()) > 0  # the loss really reaches the backbone


def test_loss_mean_is_sum_over_items_or_groups():
    hidden, weight, _ = _make(12, 32, 1000)
    labels = torch.rand(12)
    mean, _ = restricted_vocab_score_loss(hidden, weight, labels, impl="torch")
    total, _ = restricted_vocab_score_loss(hidden, weight, labels, reduction="sum", impl="torch")
    torch.testing.assert_close(total, mean * 12)
    mean, _ = restricted_vocab_score_loss(hidden, weight, None, loss="listwise", group_size=4, impl="torch")
    total, _ = restricted_vocab_score_loss(
        hidden, weight, None, loss="listwise", group_size=4, reduction="sum", impl="torch"
    )
    torch.testing.assert_close(total, mean * 3)


def test_listwise_without_labels_is_first_item_positive():
    hidden, weight, bias = _make(8, 32, 1000)
    one_hot = torch.tensor([1.0, 0, 0, 0] * 2)
    a, _ = restricted_vocab_score_loss(hidden, weight, None, loss="listwise", group_size=4, bias=bias, impl="torch")
    b, _ = restricted_vocab_score_loss(hidden, weight, one_hot, loss="listwise", group_size=4, bias=bias, impl="torch")
    torch.testing.assert_close(a, b)
    c, _ = restricted_vocab_score_loss(
        hidden, weight, one_hot.roll(1), loss="listwise", group_size=4, bias=bias, impl="torch"
    )
    assert not math.isclose(float(a), float(c))


# ---------------------------------------------------------------------------------------
# Bad arguments: ValueError naming the argument, before any work
# ---------------------------------------------------------------------------------------

_B, _H, _V = 8, 16, 64


def _score_call(**over):
    args = {
        "hidden": torch.randn(_B, _H),
        "weight": torch.randn(_V, _H),
        "token_ids": (16, 15),
        "token_weights": (1.0, -1.0),
        "bias": None,
    }
    args.update(over)
    return lambda impl: restricted_vocab_score(
        args["hidden"], args["weight"], args["token_ids"], args["token_weights"], bias=args["bias"], impl=impl
    )


def _loss_call(labels="default", **over):
    kw = {"loss": "bce"}
    kw.update(over)
    lab = torch.rand(_B) if isinstance(labels, str) else labels
    return lambda impl: restricted_vocab_score_loss(torch.randn(_B, _H), torch.randn(_V, _H), lab, impl=impl, **kw)


BAD = {
    "hidden_1d": (_score_call(hidden=torch.randn(_H)), r"hidden"),
    "hidden_int": (_score_call(hidden=torch.ones(_B, _H, dtype=torch.long)), r"hidden"),
    "hidden_size_mismatch": (_score_call(weight=torch.randn(_V, _H + 1)), r"hidden and weight"),
    "weight_3d": (_score_call(weight=torch.randn(2, _V, _H)), r"weight"),
    "bias_shape": (_score_call(bias=torch.randn(_V + 1)), r"bias"),
    "token_id_too_large": (_score_call(token_ids=(16, _V)), r"token_ids"),
    "token_id_negative": (_score_call(token_ids=(-1, 15)), r"token_ids"),
    "token_ids_empty": (_score_call(token_ids=(), token_weights=()), r"token_ids"),
    "token_ids_float": (_score_call(token_ids=(16.0, 15.0)), r"token_ids"),
    "token_ids_2d_tensor": (_score_call(token_ids=torch.tensor([[16, 15]])), r"token_ids"),
    "token_weights_length": (_score_call(token_weights=(1.0, -1.0, 0.5)), r"token_weights"),
    "token_weights_nan": (_score_call(token_weights=(1.0, float("nan"))), r"token_weights"),
    "impl_unknown": (_score_call(), r"impl"),  # impl replaced below
    "loss_unknown": (_loss_call(loss="hinge"), r"loss"),
    "reduction_unknown": (_loss_call(reduction="max"), r"reduction"),
    "temperature_zero": (_loss_call(temperature=0.0), r"temperature"),
    "temperature_nan": (_loss_call(temperature=float("nan")), r"temperature"),
    "labels_missing_bce": (_loss_call(labels=None), r"labels"),
    "labels_missing_mse": (_loss_call(labels=None, loss="mse"), r"labels"),
    "labels_shape": (_loss_call(labels=torch.rand(_B + 1)), r"labels"),
    "labels_not_tensor": (_loss_call(labels=[0.5] * _B), r"labels"),
    "labels_above_one_bce": (_loss_call(labels=torch.full((_B,), 1.5)), r"labels"),
    "labels_negative_mse": (_loss_call(labels=torch.full((_B,), -0.1), loss="mse"), r"labels"),
    "labels_nan": (_loss_call(labels=torch.full((_B,), float("nan"))), r"labels"),
    "group_size_missing_listwise": (_loss_call(labels=None, loss="listwise"), r"group_size"),
    "group_size_not_dividing": (_loss_call(labels=None, loss="listwise", group_size=3), r"group_size"),
    "group_size_zero": (_loss_call(labels=None, loss="listwise", group_size=0), r"group_size"),
    "group_size_missing_distill": (
        _loss_call(labels=None, loss="distill", teacher_scores=torch.randn(_B)),
        r"group_size",
    ),
    "listwise_group_sums_to_zero": (
        _loss_call(labels=torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), loss="listwise", group_size=4),
        r"labels",
    ),
    "listwise_negative_label": (
        _loss_call(labels=torch.tensor([1.0, -1, 0, 0, 1, 0, 0, 0]), loss="listwise", group_size=4),
        r"labels",
    ),
    "listwise_labels_inf": (
        _loss_call(labels=torch.tensor([float("inf"), 0, 0, 0, 1, 0, 0, 0]), loss="listwise", group_size=4),
        r"labels",
    ),
    "teacher_missing": (_loss_call(labels=None, loss="distill", group_size=4), r"teacher_scores"),
    "teacher_shape": (
        _loss_call(labels=None, loss="distill", group_size=4, teacher_scores=torch.randn(_B, 1)),
        r"teacher_scores",
    ),
    "teacher_inf": (
        _loss_call(labels=None, loss="distill", group_size=4, teacher_scores=torch.full((_B,), float("inf"))),
        r"teacher_scores",
    ),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_raise_value_error_naming_them(impl, case):
    call, match = BAD[case]
    if case == "impl_unknown":
        impl = "cuda"
    with pytest.raises(ValueError, match=match):
        call(impl)
