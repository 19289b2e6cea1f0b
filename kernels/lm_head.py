"""The LM-head chunk machinery that every fused loss of this package runs on.

Rows of hidden states go through the LM head in chunks: one GEMM (cuBLAS on GPU) writes a
chunk's raw logits [rows, V] into one reused buffer, a row kernel reduces each row with an
online log-sum-exp (log-prob of a token, entropy) and, for a backward, rewrites the row in
place as dL/dlogits; two GEMMs then give the hidden and weight gradients. Memory beyond
inputs and gradients: one [chunk, V] buffer plus O(N). Never [N, V].

Layers (Liger-Kernel style): ``@triton.jit`` row kernels (``online_row_stats``,
``write_grad_logits``, also called from grpo.py's fused row kernel), their launchers and
the PyTorch equivalents (``ROW_OPS``), the chunk driver (``LMHeadChunks``), the argument
check (``validate_linear_tokens``). logprobs.py and grpo.py build their autograd Functions
on these.
"""

from __future__ import annotations

import torch

from . import _utils, launch_table
from ._utils import triton_available
from .invariant_matmul import batch_invariant_linear

if triton_available():
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

# Launch constants (tile width launch_table.ROW_BLOCK, launch_table.ROW_WARPS warps): wide tiles keep
# each program's loads long (the row kernels are bandwidth-bound); fixed, so a new token count never
# triggers a recompile. The launch table owns them, with what else the compile check needs to build
# every launch of these kernels (tests/test_compile.py).


# ---------------------------------------------------------------------------------------
# Triton row kernels. One program per row of a [rows, V] raw-logits chunk.
# ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def online_row_stats(row_ptr, bias_ptr, tok, V, inv_t, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """(lse, logp of tok, entropy) of z = (row + bias) * inv_t, in one sweep over the row.

        Entropy is accumulated as sum e^(z-m) * (z-m) relative to the running max m, so that
        logits of magnitude 1e4 do not cancel catastrophically in lse - E[z].

        The target's logit is picked out of the tiles as they stream by (kept per lane, summed
        once at the end), never re-read from the row afterwards: a caller may rewrite the row in
        place right after this returns (write_grad_logits), and the warps of one program do not
        wait for each other between the two, so a late read of row[tok] could see a gradient.
        """
        m = -float("inf")
        s = 0.0
        a = 0.0
        zt_lanes = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=-float("inf")).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            zt_lanes = tl.where(cols == tok, z, zt_lanes)
            z = z * inv_t
            m_new = tl.maximum(m, tl.max(z, axis=0))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new)
            # where() before multiplying: -inf * 0 would be nan on the first tile / masked columns
            shift = tl.where(s > 0.0, m - m_new, 0.0) * s
            a = scale * (a + shift) + tl.sum(e * tl.where(mask, z - m_new, 0.0), axis=0)
            s = s * scale + tl.sum(e, axis=0)
            m = m_new
        lse = m + tl.log(s)
        zt = tl.sum(zt_lanes, axis=0)  # one lane holds row[tok] + bias[tok], the others 0: exact
        logp = zt * inv_t - lse
        entropy = tl.log(s) - a / s
        return lse, logp, entropy

    @triton.jit
    def write_grad_logits(
        row_ptr, bias_ptr, tok, lse, g_logp, g_ent, entropy, V, inv_t,
        HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        """Overwrite the raw logits of one row with dL/draw:
        (g_logp * (onehot - p) - g_ent * p * (log p + H)) * inv_t."""
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z += tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            logprob = z * inv_t - lse
            p = tl.exp(logprob)
            dz = -g_logp * p
            if HAS_ENT_GRAD:
                dz -= g_ent * p * (logprob + entropy)
            dz = tl.where(cols == tok, dz + g_logp, dz) * inv_t
            tl.store(row_ptr + cols, dz.to(row_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _row_stats_kernel(
        logits_ptr, stride_row, bias_ptr, tok_ptr, logp_ptr, lse_ptr, ent_ptr, V, inv_t,
        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        tok = tl.load(tok_ptr + row).to(tl.int64)
        lse, logp, entropy = online_row_stats(logits_ptr + row * stride_row, bias_ptr, tok, V, inv_t, HAS_BIAS, BLOCK)
        tl.store(logp_ptr + row, logp)
        tl.store(lse_ptr + row, lse)
        tl.store(ent_ptr + row, entropy)

    @triton.jit
    def _grad_logits_kernel(
        logits_ptr, stride_row, bias_ptr, tok_ptr, lse_ptr, g_logp_ptr, g_ent_ptr, ent_ptr, V, inv_t,
        HAS_BIAS: tl.constexpr, HAS_ENT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        tok = tl.load(tok_ptr + row).to(tl.int64)
        lse = tl.load(lse_ptr + row)
        g_logp = tl.load(g_logp_ptr + row)
        g_ent = 0.0
        entropy = 0.0
        if HAS_ENT_GRAD:
            g_ent = tl.load(g_ent_ptr + row)
            entropy = tl.load(ent_ptr + row)
        write_grad_logits(
            logits_ptr + row * stride_row, bias_ptr, tok, lse, g_logp, g_ent, entropy, V, inv_t,
            HAS_BIAS, HAS_ENT_GRAD, BLOCK,
        )  # fmt: skip


def block_for_vocab(V: int) -> int:
    return launch_table.row_block(V)


def triton_row_stats(raw: torch.Tensor, bias, tok: torch.Tensor, inv_t: float):
    rows, V = raw.shape
    logp = torch.empty(rows, device=raw.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ent = torch.empty_like(logp)
    if rows:
        _row_stats_kernel[(rows,)](
            raw, raw.stride(0), bias if bias is not None else raw, tok, logp, lse, ent, V, inv_t,
            **launch_table.KERNELS["row_stats"].launch(HAS_BIAS=bias is not None, BLOCK=block_for_vocab(V)),
        )  # fmt: skip
    return logp, lse, ent


def triton_grad_logits(raw, bias, tok, lse, g_logp, inv_t, g_ent=None, ent=None) -> torch.Tensor:
    rows, V = raw.shape
    if rows:
        has_ent = g_ent is not None
        _grad_logits_kernel[(rows,)](
            raw, raw.stride(0), bias if bias is not None else raw, tok, lse, g_logp,
            g_ent if has_ent else g_logp, ent if has_ent else lse, V, inv_t,
            **launch_table.KERNELS["grad_logits"].launch(
                HAS_BIAS=bias is not None, HAS_ENT_GRAD=has_ent, BLOCK=block_for_vocab(V)
            ),
        )  # fmt: skip
    return raw


# ---------------------------------------------------------------------------------------
# The same row operations in PyTorch (impl="torch"): O(chunk x V) temporaries.
# ---------------------------------------------------------------------------------------


def _scaled_logits(raw: torch.Tensor, bias, inv_t: float) -> torch.Tensor:
    z = raw.float()
    if bias is not None:
        z = z + bias.float()
    return z * inv_t


def torch_row_stats(raw: torch.Tensor, bias, tok: torch.Tensor, inv_t: float):
    z = _scaled_logits(raw, bias, inv_t)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, tok.long().unsqueeze(1)).squeeze(1) - lse
    z.sub_(lse.unsqueeze(1))  # z now holds log p
    ent = -(z.exp() * z).sum(-1)
    return logp, lse, ent


def torch_grad_logits(raw, bias, tok, lse, g_logp, inv_t, g_ent=None, ent=None) -> torch.Tensor:
    logprob = _scaled_logits(raw, bias, inv_t).sub_(lse.unsqueeze(1))
    p = logprob.exp()
    dz = p * (-g_logp).unsqueeze(1)
    if g_ent is not None:
        dz -= g_ent.unsqueeze(1) * p * (logprob + ent.unsqueeze(1))
    dz.scatter_add_(1, tok.long().unsqueeze(1), g_logp.unsqueeze(1))
    raw.copy_(dz.mul_(inv_t))
    return raw


ROW_OPS = {
    "torch": (torch_row_stats, torch_grad_logits),
    "triton": (triton_row_stats, triton_grad_logits),
}


def row_stats_op(impl: str, batch_invariant: bool = False):
    """The row-stats op of ``impl``; with ``batch_invariant``, one whose result for a row never
    depends on the other rows of the chunk. The Triton kernel is (one program per row, one
    block size); the PyTorch one then runs row by row: a [rows, V] log-sum-exp splits its
    element-wise work across threads at offsets that depend on the row count."""
    stats = ROW_OPS[impl][0]
    if impl != "torch" or not batch_invariant:
        return stats

    def per_row(raw, bias, tok, inv_t):
        parts = [stats(raw[r : r + 1], bias, tok[r : r + 1], inv_t) for r in range(raw.shape[0])]
        if not parts:
            return stats(raw, bias, tok, inv_t)
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))

    return per_row


# ---------------------------------------------------------------------------------------
# Chunk driver: the GEMMs around the row kernels, shared with grpo.py.
# ---------------------------------------------------------------------------------------


class LMHeadChunks:
    """Iterates [rows, V] raw-logit chunks of hidden @ weight.T and accumulates the gradient
    GEMMs of hidden, weight and bias.

    GEMMs run in the operands' common dtype (bf16 on GPU in training): that is where the
    FLOPs are, and it is what plain PyTorch does; the row kernels upcast to fp32. The
    weight gradient accumulates in place in the weight's dtype (one rounding per chunk),
    as Liger's fused linear cross-entropy does, so no fp32 [V, H] copy is needed.

    ``batch_invariant``: each chunk's logits GEMM runs on ``batch_invariant_linear``, so a row's
    logits (and, with ``row_stats_op(impl, True)``, its log-prob) do not depend on the other
    rows: the sampler's log-probs then equal the policy pass's bit for bit.

    Schedules: ``serial`` reuses one buffer, each chunk's logits GEMM after the previous
    chunk's row kernel and gradient GEMMs. ``overlap`` alternates two buffers and runs the
    logits GEMM of chunk i+1 on a side stream while the current stream runs chunk i's row
    kernel and gradient GEMMs (the row kernel is bandwidth-bound, the GEMM compute-bound).
    Both schedules do the same arithmetic in the same order per chunk, so their results are
    identical; without CUDA streams ``overlap`` runs serially on its two buffers. The byte
    budget covers all buffers (``_utils.chunk_plan``).
    """

    def __init__(
        self, hidden, weight, bias, *, need_hidden_grad, need_weight_grad, need_bias_grad,
        chunk_rows=None, chunk_bytes=None, schedule="serial", batch_invariant=False,
    ):  # fmt: skip
        dtype = hidden.dtype if hidden.dtype == weight.dtype else torch.promote_types(hidden.dtype, weight.dtype)
        self.hidden = hidden.contiguous() if hidden.dtype == dtype else hidden.to(dtype).contiguous()
        self.weight = weight.contiguous() if weight.dtype == dtype else weight.to(dtype).contiguous()
        self.bias = bias
        self.n, self.vocab = hidden.shape[0], weight.shape[0]
        self.batch_invariant = batch_invariant
        self.schedule = _utils.resolve_schedule(schedule)
        n_buffers = 2 if self.schedule == "overlap" else 1
        self.rows, self.transient_bytes = _utils.chunk_plan(
            self.n, self.vocab, dtype, hidden.device, chunk_rows=chunk_rows, chunk_bytes=chunk_bytes, buffers=n_buffers
        )
        n_buffers = min(n_buffers, max(1, -(-self.n // self.rows)))  # one chunk needs one buffer
        shape = (self.rows, self.vocab)
        self.buffers = [torch.empty(shape, device=hidden.device, dtype=dtype) for _ in range(n_buffers)]
        self.grad_hidden = torch.empty_like(hidden) if need_hidden_grad else None
        self.grad_weight = torch.zeros_like(weight) if need_weight_grad else None
        self.grad_bias = torch.zeros(self.vocab, device=hidden.device, dtype=torch.float32) if need_bias_grad else None

    @property
    def needs_grad(self) -> bool:
        return any(g is not None for g in (self.grad_hidden, self.grad_weight, self.grad_bias))

    def _logits(self, index: int, start: int, end: int) -> torch.Tensor:
        raw = self.buffers[index % len(self.buffers)][: end - start]
        if self.batch_invariant:  # a row's logits independent of the chunk's other rows
            raw.copy_(batch_invariant_linear(self.hidden[start:end], self.weight))
        else:
            torch.matmul(self.hidden[start:end], self.weight.t(), out=raw)
        return raw

    def __iter__(self):
        """Yields (start, end, raw logits view [end - start, V]); the caller finishes with a
        chunk (row kernel, ``backward_chunk``) before it asks for the next one."""
        bounds = [(start, min(start + self.rows, self.n)) for start in range(0, self.n, self.rows)]
        if len(self.buffers) == 1 or not self.hidden.is_cuda:
            for index, (start, end) in enumerate(bounds):
                yield start, end, self._logits(index, start, end)
            return
        yield from self._overlapped(bounds)

    def _overlapped(self, bounds):
        main = torch.cuda.current_stream(self.hidden.device)
        side = torch.cuda.Stream(self.hidden.device)
        side.wait_stream(main)  # the inputs were written on the main stream
        ready = []

        def prefetch(index):
            if index > 0:
                # the buffer chunk `index` reuses was read by chunk index - 2's gradient GEMMs
                free = torch.cuda.Event()
                free.record(main)
                side.wait_event(free)
            with torch.cuda.stream(side):
                raw = self._logits(index, *bounds[index])
            event = torch.cuda.Event()
            event.record(side)
            ready.append((raw, event))

        try:
            prefetch(0)
            for index, (start, end) in enumerate(bounds):
                if index + 1 < len(bounds):
                    prefetch(index + 1)
                raw, event = ready[index]
                main.wait_event(event)
                yield start, end, raw
        finally:
            # order every side-stream write before the main stream's later work (also when the
            # caller stops early), so the buffers may be freed on the main stream
            main.wait_stream(side)

    def backward_chunk(self, start: int, end: int, grad_raw: torch.Tensor) -> None:
        """grad_raw [rows, V] = dL/d(hidden @ weight.T) for rows start:end."""
        if self.grad_hidden is not None:
            if self.grad_hidden.dtype == grad_raw.dtype:
                torch.matmul(grad_raw, self.weight, out=self.grad_hidden[start:end])
            else:
                self.grad_hidden[start:end].copy_(grad_raw @ self.weight)
        if self.grad_weight is not None:
            if self.grad_weight.dtype == grad_raw.dtype:
                self.grad_weight.addmm_(grad_raw.t(), self.hidden[start:end])
            else:
                self.grad_weight.add_(grad_raw.t() @ self.hidden[start:end])
        if self.grad_bias is not None:
            self.grad_bias.add_(grad_raw.float().sum(0))

    def grads(self, bias):
        gb = self.grad_bias.to(bias.dtype) if self.grad_bias is not None else None
        return self.grad_hidden, self.grad_weight, gb


def validate_linear_tokens(hidden, weight, token_ids, bias, temperature, mode="full"):
    _utils.check_linear(hidden, weight, bias)
    _utils.check_vector("token_ids", token_ids, hidden.shape[0], device=hidden.device)
    _utils.check_token_ids("token_ids", token_ids, weight.shape[0], mode)
    _utils.check_temperature(temperature)
