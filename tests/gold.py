"""Comparison against a float64 gold, shared by the kernel tests: an error bound relative
to the gold's norm (DESIGN.md: the error of plain PyTorch in the dtype plus a slack)."""

import torch


def err(a, b):
    return (a.detach().double() - b.detach().double()).norm().item()


def assert_close(a, b, rtol=1e-5, atol=1e-7, what=""):
    assert a is not None, f"{what}: got None"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    e = err(a, b)
    bound = rtol * b.detach().double().norm().item() + atol
    assert e <= bound, f"{what}: |ours - gold| = {e:.3e} > {bound:.3e} (|gold| = {b.double().norm().item():.3e})"
