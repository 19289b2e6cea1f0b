"""Batch-invariant linear: a row's result never depends on the other rows of the call.

A GEMM library picks its kernel, blocking and split of the reduction from the shape, so the
same row of x multiplied by the same weight can round differently when x has 2, 7 or 3000
rows (measured on CPU: MKL/oneDNN fp32 gives one set of bits for M = 1, another for M = 2-3,
another from M = 7 on). A reranker that packs a variable number of tokens per call then gives
a pair a score that depends on its neighbours. Here every row's arithmetic is fixed by
construction:

* CPU: the rows go through the library in tiles of exactly ``tile_rows_for(weight)`` rows (the
  last tile zero-padded; the count depends on the weight's shape alone), so every GEMM call with
  a weight has the same shape and hence the same kernel; a row's output is a function of its own
  inputs and of that shape only. One more input picks MKL's
  kernel: the thread count. On its AVX2 / AVX-512 code paths (Intel CPUs; AMD gets a generic
  path) MKL's sgemm splits a tile's reduction by thread, so 1 thread and 2 round differently
  (SmolLM2's MLP down projection, K 1536 -> 576: 1.5e-5 on a score). MKL's strict conditional
  numerical reproducibility mode keeps ?gemm bitwise equal for any thread count; it can be
  chosen only before MKL's first call, so importing this module chooses it (`mkl_reproducibility`).
* CUDA: a Triton matmul with fixed block sizes, one program per output tile, the reduction
  over K in one fixed order, no split-K: a row's output does not depend on M at all.

Under autocast the op computes where ``F.linear`` would: in autocast's dtype (bf16), every tile
alike, and returns that dtype. (A GEMM with ``out=`` opts out of autocast and a plain one does
not, so the tiles once ran in fp32 and a call's padded last tile in bf16: a row's precision, and
a pair's score, then depended on where the row fell.)

The backward (``x.requires_grad``) is an ordinary matmul: invariance is a property of the
scores and of the sampler's log-probs, not of gradients.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import launch_table
from ._utils import triton_available

__all__ = ["TILE_ROWS", "batch_invariant_linear", "forget_weight_casts", "mkl_reproducibility", "tile_rows_for"]

# Rows per GEMM call on CPU for weights of at least _TILE_MACS / TILE_ROWS elements (every
# projection of SmolLM2 and larger): 128 keeps the zero-padding of a short call small. A smaller
# weight takes more rows, doubling until a tile is _TILE_MACS multiply-adds (at most
# _MAX_TILE_ROWS): at hidden 64 a 128-row tile is a ~0.5M-MAC GEMM whose per-call cost, on one
# thread, made invariance cost 14% of a rerank (benchmarks/rerank.py, invariant vs not). The tile
# depends on the weight's shape only, never on the call's rows, so a row's bits still do not.
TILE_ROWS = 128
_TILE_MACS = 2**23
_MAX_TILE_ROWS = 2048
# The CUDA kernel's blocks, warps and stages come from launch_table (MATMUL_*): fixed, since a
# change of blocks would change the rounding of every row.
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # tl.dot has no fp64 into fp32
# mkl_service.h: MKL_CBWR_ALL, MKL_CBWR_AUTO, MKL_CBWR_COMPATIBLE, MKL_CBWR_STRICT
_CBWR_ALL, _CBWR_AUTO, _CBWR_COMPATIBLE, _CBWR_STRICT = -1, 2, 3, 0x10000
_MKL_DTYPES = (torch.float32, torch.float64)  # torch's CPU matmul takes MKL for these, oneDNN for bf16 / fp16


@functools.lru_cache(maxsize=1)
def _mkl_service():
    """MKL's service functions inside torch's CPU library (MKL is linked in statically), or None."""
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in ("libtorch_cpu.so", "torch_cpu.dll", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.exists(path):
            try:
                lib = ctypes.CDLL(path)  # already loaded by torch: the same handle, no second copy
                return lib if hasattr(lib, "mkl_serv_cbwr_set") and hasattr(lib, "mkl_serv_cbwr_get") else None
            except OSError:
                return None
    return None


def _choose_strict_cnr() -> str:
    lib = _mkl_service()
    if lib is None:
        return "no MKL in torch's CPU library: nothing to choose"
    if os.environ.get("MKL_CBWR"):
        return f"MKL_CBWR={os.environ['MKL_CBWR']} (the environment's; left as it is)"
    if lib.mkl_serv_cbwr_set(_CBWR_AUTO | _CBWR_STRICT) != 0:  # -8: MKL has run already
        return (
            "not strict: MKL ran before prorank_fast.kernels was imported "
            "(import it first, or set MKL_CBWR=AUTO,STRICT)"
        )
    return "strict"


_MKL_CHOICE = _choose_strict_cnr()
_mkl_checked = False


def mkl_reproducibility() -> tuple[bool, str]:
    """(whether MKL's sgemm gives the same bits for any thread count, why): true where there is no
    MKL, in strict CNR mode, and in MKL_CBWR=COMPATIBLE (one generic path, no split reduction)."""
    lib = _mkl_service()
    if lib is None:
        return True, _MKL_CHOICE
    mode = lib.mkl_serv_cbwr_get(_CBWR_ALL)
    return bool(mode & _CBWR_STRICT) or mode & 0xFFFF == _CBWR_COMPATIBLE, _MKL_CHOICE


if triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _invariant_matmul_kernel(
        x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K,
        stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
        HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        """out[M, N] = x[M, K] @ w[N, K].T (+ bias), fp32 accumulation, K in one fixed order."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        # grouped order for L2 reuse; it changes which program computes a tile, not how
        group = GROUP_M * num_n
        first_m = (pid // group) * GROUP_M
        rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % rows_in_group
        pid_n = (pid % group) // rows_in_group
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k
            a = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=(offs_m[:, None] < M) & (ks[None, :] < K),
                other=0.0,
            )
            b = tl.load(
                w_ptr + offs_n[None, :] * stride_wn + ks[:, None] * stride_wk,
                mask=(offs_n[None, :] < N) & (ks[:, None] < K),
                other=0.0,
            )
            if IEEE:  # fp32 inputs: no TF32 rounding
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(
            out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc.to(out_ptr.dtype.element_ty),
            mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
        )


def _triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    lt = launch_table
    grid = (triton.cdiv(m, lt.MATMUL_BLOCK_M) * triton.cdiv(n, lt.MATMUL_BLOCK_N),)
    _invariant_matmul_kernel[grid](
        x, weight, bias if bias is not None else weight, out, m, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        **lt.KERNELS["invariant_matmul"].launch(
            HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=lt.MATMUL_BLOCK_M,
            BLOCK_N=lt.MATMUL_BLOCK_N, BLOCK_K=lt.MATMUL_BLOCK_K, GROUP_M=lt.MATMUL_GROUP_M,
        ),
    )  # fmt: skip
    return out


def _warn_unless_reproducible(dtype: torch.dtype) -> None:
    global _mkl_checked
    if dtype in _MKL_DTYPES and not _mkl_checked:
        _mkl_checked = True
        reproducible, why = mkl_reproducibility()
        if not reproducible:
            warnings.warn(
                f"batch_invariant_linear: MKL's sgemm may round differently with the thread count ({why})",
                RuntimeWarning,
                stacklevel=3,
            )


def tile_rows_for(weight: torch.Tensor) -> int:
    """Rows per library GEMM for ``weight`` [N, K]: ``TILE_ROWS``, doubled while a tile is under
    ``_TILE_MACS`` multiply-adds, up to ``_MAX_TILE_ROWS``."""
    rows, macs = TILE_ROWS, weight.shape[0] * weight.shape[1]
    while rows < _MAX_TILE_ROWS and rows * macs < _TILE_MACS:
        rows *= 2
    return rows


def _tiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    m, k = x.shape
    full = m - m % tile
    out = torch.empty((m, weight.shape[0]), device=x.device, dtype=torch.result_type(x, weight))
    w_t = weight.t()
    for start in range(0, full, tile):
        torch.matmul(x[start : start + tile], w_t, out=out[start : start + tile])
    if full < m:
        last = x.new_zeros((tile, k))
        last[: m - full] = x[full:]
        out[full:] = (last @ w_t)[: m - full]
    if bias is not None:
        out += bias  # elementwise: no reduction, nothing to vary
    return out


# weight -> ((data_ptr, version, dtype), the weight in that dtype): each weight cast once per version,
# as autocast's cache casts a parameter once per autocast region. Without it every call made (and,
# with gradients, kept for backward) its own copy: 212 MB per SmolLM2 decoder pass under bf16
# autocast, and stage 1's policy pass runs one pass per completion token. An optimizer step bumps
# the version; at most one copy per weight is kept, and it goes with the weight.
_CASTS = WeakIdKeyDictionary()  # by identity: a tensor's == is elementwise


def _cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == dtype:
        return weight
    key = (weight.data_ptr(), weight._version, dtype)
    hit = _CASTS.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    cast = weight.detach().to(dtype)
    _CASTS[weight] = (key, cast)
    return cast


def forget_weight_casts() -> None:
    """Drop every cached cast. The trainer calls it after each optimizer step: an in-place update
    bumps a weight's version, but a weight refilled by other means (FSDP's all-gather into the
    same storage) might not."""
    _CASTS.clear()


# The last input cast to the compute dtype: q, k and v (gate and up) read the same hidden states, and
# each call would otherwise cast them and, with gradients, keep its own copy for backward (3 of
# SmolLM2's ~31 KiB of activations per token and layer under bf16 autocast). Weak references both
# ways: the entry holds neither the input nor its cast alive, and an input that is gone never hits.
_last_input_cast: tuple | None = None


def _input_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as contiguous [rows, K] rows in `dtype`; a cast is shared with the previous call on the same x."""
    global _last_input_cast
    casts = x.dtype != dtype
    if casts and _last_input_cast is not None:
        x_ref, version, cast_dtype, rows_ref = _last_input_cast
        rows = rows_ref()
        if rows is not None and x_ref() is x and version == x._version and cast_dtype == dtype:
            return rows
    rows = x.detach().reshape(-1, x.shape[-1]).to(dtype)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    if casts:
        _last_input_cast = (weakref.ref(x), x._version, dtype, weakref.ref(rows))
    return rows


class _InvariantLinear(torch.autograd.Function):
    """x @ weight.T in `dtype` (x's rows and the weight cast to it inside): the backward returns x's
    gradient in x's dtype and the weight's in the weight's, as autocast's casts would."""

    @staticmethod
    def forward(ctx, x, weight, bias, tile, use_triton, dtype):
        rows = _input_rows(x, dtype)
        ctx.save_for_backward(rows, weight)
        ctx.has_bias, ctx.x_shape, ctx.x_dtype = bias is not None, x.shape, x.dtype
        w = _cast(weight, dtype)
        out = _triton_linear(rows, w, bias) if use_triton else _tiled_linear(rows, w, bias, tile)
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])
        gx = (grad @ _cast(weight, rows.dtype)).to(ctx.x_dtype).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        gw = (grad.t() @ rows).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gb = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


def batch_invariant_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tile_rows: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` whose every output row is bitwise independent of the other rows.

    Args:
        x: [..., K] (flattened to rows). weight: [N, K]. bias: [N] or None.
        tile_rows: rows per library GEMM (default ``tile_rows_for(weight)``, by the weight's
            shape); a fixed tile is what makes rows invariant, so compare only results computed
            with the same tile.
        impl: "auto" (the Triton kernel on CUDA, library tiles elsewhere), "tiles" (library
            GEMMs on fixed tiles on any device), "triton".

    On CUDA this needs Triton (a ValueError says so otherwise); on CPU it uses the GEMM library
    on fixed tiles (the Triton kernel runs there only in the tests, under the interpreter).
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"batch_invariant_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree")
    tile = tile_rows_for(weight) if tile_rows is None else int(tile_rows)
    if tile < 1:
        raise ValueError(f"tile_rows must be >= 1, got {tile_rows}")
    if impl not in ("auto", "tiles", "triton"):
        raise ValueError(f"impl must be one of ('auto', 'tiles', 'triton'), got {impl!r}")
    # fp64 takes the library on fixed tiles (tl.dot has no fp64 into an fp32 accumulator)
    dtype = _compute_dtype(x)
    use_triton = impl == "triton" or (impl == "auto" and x.is_cuda and dtype in _TRITON_DTYPES)
    if use_triton and dtype not in _TRITON_DTYPES:
        raise ValueError(f"batch_invariant_linear impl='triton' takes bf16, fp16 or fp32, got {dtype}")
    if use_triton and not triton_available():
        raise ValueError("batch_invariant=True on CUDA needs triton (pip install triton)")
    if not use_triton:
        _warn_unless_reproducible(dtype)
    bias = bias.to(dtype) if bias is not None else None
    with torch.autocast(x.device.type, enabled=False):  # the casts are autocast's, done once for all tiles
        return _InvariantLinear.apply(x, weight, bias, tile, use_triton, dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype F.linear computes in for x: autocast's where it is on for x's device (it casts
    fp32 / fp16 / bf16 operands, not fp64), else x's (the weight follows x)."""
    device = x.device.type
    if x.dtype in _TRITON_DTYPES and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
