"""Shared pieces of the CPU and GPU benchmarks: the ops under test, the baselines, inputs, tables.

Baselines, defined once so that every suite times the same thing:

* ``eager_grpo_loss``: materialized logits (the GEMM in the input dtype), upcast to fp32,
  log-softmax + gather, entropy under ``no_grad`` in row chunks (TRL logs it that way), then
  TRL's formulas (``reference.grpo_loss_from_logprobs``). Its compiled form is the
  ``torch.compile`` row.
* Liger chunked: ``LigerFusedLinearGRPOLoss`` on the padded [S, T, H] view of the packed rows.
* Liger Triton: ``liger_kernel.transformers.grpo_loss.triton_grpo_loss`` on full logits
  [S, T + 1, V] (it drops the last position, as TRL's ``logits_to_keep + 1``), logits GEMM
  included in the timed region.
* Stage 2, the plain transformers way: ``pad_sequences`` (the same token ids, padded, with an
  attention mask) and ``full_logits_scores`` (``lm(...).logits``, full [B, T, V], read at the last
  real token); ``stage2_model_flops`` is the MFU numerator of the GPU suite's stage-2 section.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib
import importlib.util
import math
import os
import platform
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# The ops under test
# ---------------------------------------------------------------------------------------


def load_kernels():
    """Import ``prorank_fast.kernels``; on a bare machine (package not installed) load ``<root>/kernels``
    under that name, as setup.py's package_dir would."""
    try:
        return importlib.import_module("prorank_fast.kernels")
    except ModuleNotFoundError as exc:
        if exc.name not in ("prorank_fast.kernels", "prorank_fast"):
            raise
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import prorank_fast

    spec = importlib.util.spec_from_file_location(
        "prorank_fast.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["prorank_fast.kernels"] = module
    spec.loader.exec_module(module)
    prorank_fast.kernels = module
    return module


def _standin_grpo(*args, impl=None, **kwargs):
    return load_kernels().reference.grpo_loss_reference(*args, **kwargs)


def _standin_logprobs(hidden, weight, token_ids, *, bias=None, temperature=1.0, return_entropy=False, impl=None):
    logp, entropy = load_kernels().reference.linear_logprobs_reference(hidden, weight, token_ids, bias, temperature)
    return (logp, entropy) if return_entropy else logp


def _standin_score_loss(
    hidden,
    weight,
    labels,
    *,
    token_ids=(16, 15),
    token_weights=(1.0, -1.0),
    loss="bce",
    group_size=None,
    teacher_scores=None,
    temperature=1.0,
    impl=None,
):
    ref = load_kernels().reference
    s = ref.restricted_vocab_score_reference(hidden, weight, token_ids, token_weights)
    value = ref.score_loss_reference(
        s, labels, loss=loss, group_size=group_size, teacher_scores=teacher_scores, temperature=temperature
    )
    return value, s


@dataclass
class Ops:
    """The three public ops, or materializing stand-ins (from ``reference``) where the kernels
    module still holds a placeholder raising NotImplementedError. ``source[name]`` says which."""

    grpo_loss: Callable
    logprobs: Callable
    score_loss: Callable
    source: dict[str, str] = field(default_factory=dict)

    @property
    def any_standin(self) -> bool:
        return any(v != "kernels" for v in self.source.values())

    def label(self, name: str) -> str:
        return "ours" if self.source.get(name) == "kernels" else "ours [STAND-IN: reference]"


_OPS: Ops | None = None


def resolve_ops(allow_standin: bool = True) -> Ops:
    """Probe each public op once on tiny CPU inputs (impl="torch"); a NotImplementedError means
    the kernel is not written yet and the reference stands in (labelled as such in every table)."""
    global _OPS
    if _OPS is not None:
        return _OPS
    k = load_kernels()
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(4, 8, generator=g), torch.randn(32, 8, generator=g)
    ids = torch.tensor([1, 2, 3, 4])
    probes = {
        "grpo_loss": (
            k.fused_linear_grpo_loss,
            _standin_grpo,
            lambda f: f(h, w, ids, torch.ones(2), torch.tensor([0, 0, 1, 1]), impl="torch"),
        ),
        "logprobs": (k.fused_linear_logprobs, _standin_logprobs, lambda f: f(h, w, ids, impl="torch")),
        "score_loss": (
            k.restricted_vocab_score_loss,
            _standin_score_loss,
            lambda f: f(h, w, torch.rand(4, generator=g), token_ids=(16, 15), impl="torch"),
        ),
    }
    chosen, source = {}, {}
    for name, (real, standin, probe) in probes.items():
        try:
            probe(real)
            chosen[name], source[name] = real, "kernels"
        except NotImplementedError:
            if not allow_standin:
                raise
            chosen[name], source[name] = standin, "stand-in (kernels.reference)"
    _OPS = Ops(source=source, **chosen)
    return _OPS


# ---------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------


def materialized_logprobs(hidden, weight, token_ids, temperature: float = 1.0, entropy_chunk: int = 1024):
    """Full [N, V] logits in the input dtype, upcast to fp32, log-softmax, gather.

    Returns (logp [N] fp32 differentiable, entropy [N] fp32 detached)."""
    logits = (hidden @ weight.t()).float()
    if temperature != 1.0:
        logits = logits / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        entropy = torch.cat([-(c.exp() * c).sum(-1) for c in logsm.detach().split(entropy_chunk)])
    return logp, entropy


def eager_grpo_loss(
    hidden,
    weight,
    token_ids,
    advantages,
    seq_ids,
    old_logprobs=None,
    ref_logprobs=None,
    *,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    temperature: float = 1.0,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length=None,
    reference=None,
):
    """The PyTorch eager baseline: materialized logits + TRL's formulas. (loss, metrics).

    ``reference``: the kernels.reference module, passed in by callers that torch.compile this
    function (so that dynamo does not trace the import machinery)."""
    ref = reference if reference is not None else load_kernels().reference
    logp, entropy = materialized_logprobs(hidden, weight, token_ids, temperature)
    return ref.grpo_loss_from_logprobs(
        logp,
        advantages,
        seq_ids,
        old_logprobs,
        ref_logprobs,
        entropy=entropy,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        max_completion_length=max_completion_length,
    )


def eager_score_loss(hidden, weight, labels, *, token_ids=(16, 15), token_weights=(1.0, -1.0), loss="bce", **kw):
    """Plain PyTorch restricted score in the input dtype (gather K rows, one small GEMM), fp32 loss."""
    ref = load_kernels().reference
    ids = torch.as_tensor(token_ids, device=weight.device, dtype=torch.long)
    w = torch.as_tensor(token_weights, device=weight.device, dtype=torch.float32)
    s = (hidden @ weight[ids].t()).float() @ w
    return ref.score_loss_reference(s, labels, loss=loss, **kw), s


# ---------------------------------------------------------------------------------------
# Stage 2 (score learning): the padded baselines and the FLOP count
# ---------------------------------------------------------------------------------------


def pad_sequences(
    seqs: Sequence[Sequence[int]], pad_id: int, *, side: str = "right", device="cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same token ids as a padded batch (what a tokenizer with ``padding=True`` returns).

    Returns input_ids [B, T] int64 (T = the longest sequence), attention_mask [B, T] int64
    (1 = token) and last [B] int64, the index of each sequence's last real token (T - 1 for
    every row with left padding).
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    lengths = [len(s) for s in seqs]
    width = max(lengths)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(width - len(s), width)
        ids[i, cols] = torch.as_tensor(list(s), dtype=torch.long)
        mask[i, cols] = 1
    last = torch.tensor(lengths, dtype=torch.long) - 1 if side == "right" else torch.full((len(seqs),), width - 1)
    return ids.to(device), mask.to(device), last.to(device)


def full_logits_scores(lm, input_ids, attention_mask, last, token_ids=(16, 15), token_weights=(1.0, -1.0)):
    """The plain transformers way: ``lm(input_ids, attention_mask).logits`` materializes the full
    [B, T, V] logits; the score is read at each row's last real token, ``sum_k w_k z[token_k]``
    (``z["1"] - z["0"]`` by default). Returns scores [B] (differentiable, in the logits' dtype)."""
    logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    z = logits[torch.arange(logits.shape[0], device=logits.device), last]  # [B, V]
    s = z[:, token_ids[0]] * token_weights[0]
    for tok, w in zip(token_ids[1:], token_weights[1:], strict=True):
        s = s + z[:, tok] * w
    return s


def non_embedding_params(model: torch.nn.Module) -> int:
    """Parameters outside the input embedding and the LM head (tied or not)."""
    skip = set()
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            skip |= {id(p) for p in module.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def stage2_model_flops(params_non_embedding: int, layers: int, hidden: int, lengths: Sequence[int]) -> float:
    """Model FLOPs of one training step (forward + backward) over sequences of ``lengths`` tokens:

        6 * P_non_embedding * N  +  12 * layers * hidden * sum_i len_i^2

    N = sum(lengths) real tokens (padding is not useful work and is not counted); the second
    term is the attention score/value products, 12 * layers * hidden * seq_len per token with
    seq_len = the token's own sequence length (PaLM's convention: no discount for causality).
    The LM head (tied embedding) is not counted: a reranker needs it at one position per
    sequence and for two of its rows.
    """
    n = sum(lengths)
    return 6.0 * params_non_embedding * n + 12.0 * layers * hidden * float(sum(x * x for x in lengths))


# ---------------------------------------------------------------------------------------
# Liger (optional everywhere: the GPU machines do not have it unless a wheel is carried)
# ---------------------------------------------------------------------------------------


def liger_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("liger-kernel")
    except Exception:
        try:
            import liger_kernel  # noqa: F401
        except Exception:
            return None
        return "unknown"


def liger_chunked_module(
    *,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    loss_type: str,
    importance_sampling_level: str,
    temperature: float,
    use_ref: bool,
    compiled: bool,
    chunk_size: int,
):
    from liger_kernel.chunked_loss.grpo_loss import LigerFusedLinearGRPOLoss

    return LigerFusedLinearGRPOLoss(
        beta=beta,
        compiled=compiled,
        use_ref_model=use_ref,
        chunk_size=chunk_size,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        loss_type=loss_type,
        importance_sampling_level=importance_sampling_level,
        temperature=temperature,
    )


def liger_triton_grpo_fn():
    """Liger's Triton GRPO op on full logits [B, L + 1, V] (TRL's ``logits_to_keep + 1`` layout)."""
    try:
        from liger_kernel.transformers.grpo_loss import triton_grpo_loss

        return triton_grpo_loss
    except ImportError:
        # liger_kernel.transformers imports every model patch; if one of them does not import
        # against the installed transformers, call the autograd Function directly (0.8.5 order).
        from liger_kernel.ops.grpo_loss import GrpoLossFunction

    def triton_grpo_loss(logits, old_logp, ref_logp, completion_ids, advantages, completion_mask=None, **kw):
        loss, kl_mean, clip_ratio = GrpoLossFunction.apply(
            logits,
            old_logp,
            ref_logp,
            completion_ids,
            advantages,
            completion_mask,
            kw.get("temperature", 1.0),
            kw.get("beta", 0.04),
            kw.get("eps_low", 0.2),
            kw.get("eps_high", 0.2),
            True,  # inplace
            kw.get("loss_type", "dapo"),
            kw.get("max_completion_length"),
            True,  # reduce
            kw.get("importance_sampling_level", "token"),
            1.0,
            1.05,
            None,
            kw.get("delta"),
            False,
            kw.get("num_items_in_batch"),
            None,
        )
        return loss, [kl_mean, clip_ratio]

    return triton_grpo_loss


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def chunked_logprobs(hidden, weight, token_ids, chunk_rows: int = 2048) -> torch.Tensor:
    """fp32 log-probs of token_ids without holding the [N, V] logits (to make old/ref log-probs)."""
    out = torch.empty(hidden.shape[0], device=hidden.device, dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk_rows):
        logits = (hidden[i : i + chunk_rows] @ weight.t()).float()
        out[i : i + chunk_rows] = logits.gather(-1, token_ids[i : i + chunk_rows, None]).squeeze(-1) - logits.logsumexp(
            -1
        )
    return out


def random_lengths(n: int, s: int, generator: torch.Generator) -> torch.Tensor:
    """A random composition of n into s positive parts (s <= n)."""
    if s == 1:
        return torch.tensor([n])
    cuts = torch.randperm(n - 1, generator=generator)[: s - 1].sort().values + 1
    edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([n])])
    return edges.diff()


@dataclass
class GRPOInputs:
    hidden: torch.Tensor  # [N, H] leaf, requires grad
    weight: torch.Tensor  # [V, H] leaf, requires grad
    token_ids: torch.Tensor  # [N] int64
    advantages: torch.Tensor  # [S] fp32
    seq_ids: torch.Tensor  # [N] int64
    old_logprobs: torch.Tensor  # [N] fp32
    ref_logprobs: torch.Tensor  # [N] fp32
    seq_len: int | None  # T when all sequences have the same length (Liger's padded layout), else None

    @property
    def num_sequences(self) -> int:
        return self.advantages.numel()


def make_grpo_inputs(
    n: int,
    h: int,
    v: int,
    s: int,
    *,
    dtype=torch.float32,
    device="cpu",
    seed: int = 0,
    equal_lengths: bool = True,
    logit_std: float = 2.0,
    logprob_noise: float = 0.1,
) -> GRPOInputs:
    """Random but realistic GRPO inputs: logits of std ``logit_std``; old/ref log-probs are the
    current ones plus N(0, logprob_noise) so that ratios sit near 1 and some tokens clip."""
    device = torch.device(device)
    if equal_lengths and n % s:
        raise ValueError(f"N={n} is not a multiple of S={s} (equal-length sequences)")
    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, device=device, generator=gen).to(dtype)
    weight = (torch.randn(v, h, device=device, generator=gen) * (logit_std / math.sqrt(h))).to(dtype)
    token_ids = torch.randint(0, v, (n,), device=device, generator=gen)
    advantages = torch.randn(s, device=device, generator=gen)
    if equal_lengths:
        lengths = torch.full((s,), n // s)
    else:
        lengths = random_lengths(n, s, cpu_gen)
    seq_ids = torch.repeat_interleave(torch.arange(s), lengths).to(device)
    logp = chunked_logprobs(hidden, weight, token_ids)
    old = logp + logprob_noise * torch.randn(n, device=device, generator=gen)
    ref = logp + logprob_noise * torch.randn(n, device=device, generator=gen)
    return GRPOInputs(
        hidden=hidden.requires_grad_(),
        weight=weight.requires_grad_(),
        token_ids=token_ids,
        advantages=advantages,
        seq_ids=seq_ids,
        old_logprobs=old,
        ref_logprobs=ref,
        seq_len=n // s if equal_lengths else None,
    )


# ---------------------------------------------------------------------------------------
# Forward + backward steps of each variant over the same inputs
# ---------------------------------------------------------------------------------------


@dataclass
class GRPOSettings:
    beta: float = 0.04
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    temperature: float = 1.0
    loss_type: str = "dapo"
    importance_sampling_level: str = "token"


@dataclass
class Step:
    """``fn()`` runs the forward and returns the scalar loss; ``wrt`` are the leaves to differentiate."""

    name: str
    fn: Callable[[], torch.Tensor]
    wrt: Sequence[torch.Tensor]
    note: str = ""

    def fwd_bwd(self):
        loss = self.fn()
        grads = torch.autograd.grad(loss, list(self.wrt))
        return loss.detach(), grads


def grpo_step(
    variant: str,
    x: GRPOInputs,
    cfg: GRPOSettings,
    *,
    ops: Ops | None = None,
    impl: str = "torch",
    liger_compiled: bool = False,
    liger_chunk_size: int = 1,
    compile_kwargs: dict | None = None,
) -> Step:
    """Build the forward(+loss) of one variant. Variants:

    ours / ours_torch  fused_linear_grpo_loss (impl as given / impl="torch")
    eager              eager_grpo_loss (materialized logits)
    compile            torch.compile(eager_grpo_loss)
    reference          kernels.reference.grpo_loss_reference (fp32 materialized spec; entropy with grad)
    liger_chunked      LigerFusedLinearGRPOLoss on the [S, T, H] view
    liger_triton       logits GEMM on [S, T + 1, H] + liger's Triton grpo_loss
    """
    common = dict(
        beta=cfg.beta,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        temperature=cfg.temperature,
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
    )
    args = (x.hidden, x.weight, x.token_ids, x.advantages, x.seq_ids, x.old_logprobs, x.ref_logprobs)
    wrt = (x.hidden, x.weight)
    if variant in ("ours", "ours_torch"):
        ops = ops or resolve_ops()
        use_impl = "torch" if variant == "ours_torch" else impl
        f = ops.grpo_loss
        return Step(variant, lambda: f(*args, **common, impl=use_impl)[0], wrt, note=f"impl={use_impl}")
    if variant == "eager":
        return Step(variant, lambda: eager_grpo_loss(*args, **common)[0], wrt)
    if variant == "compile":
        ref = load_kernels().reference
        compiled = torch.compile(functools.partial(eager_grpo_loss, reference=ref), **(compile_kwargs or {}))
        return Step(variant, lambda: compiled(*args, **common)[0], wrt, note="torch.compile(eager)")
    if variant == "reference":
        ref = load_kernels().reference
        return Step(variant, lambda: ref.grpo_loss_reference(*args, **common)[0], wrt)
    if x.seq_len is None:
        raise ValueError("Liger variants need equal-length sequences (padded layout)")
    s, t, h = x.num_sequences, x.seq_len, x.hidden.shape[1]
    ids2 = x.token_ids.view(s, t)
    old2, ref2 = x.old_logprobs.view(s, t), x.ref_logprobs.view(s, t)
    if variant == "liger_chunked":
        mod = liger_chunked_module(
            **common, use_ref=cfg.beta != 0.0, compiled=liger_compiled, chunk_size=liger_chunk_size
        )
        mask = torch.ones(s, t, device=x.hidden.device, dtype=torch.long)

        def fn():
            loss, _ = mod(
                x.hidden.view(s, t, h),
                x.weight,
                ids2,
                mask,
                x.advantages,
                ref_per_token_logps=ref2,
                old_per_token_logps=old2,
            )
            return loss

        return Step(variant, fn, wrt, note=f"compiled={liger_compiled}, chunk_size={liger_chunk_size}")
    if variant == "liger_triton":
        op = liger_triton_grpo_fn()
        # TRL layout: T + 1 positions per sequence, the last one dropped by the op. A separate leaf
        # (made before timing) so the padding copy is not in the timed region.
        hp = torch.cat([x.hidden.detach().view(s, t, h), x.hidden.new_zeros(s, 1, h)], dim=1).requires_grad_()
        mask = torch.ones(s, t, device=x.hidden.device, dtype=torch.long)

        def fn():
            logits = hp @ x.weight.t()
            loss, _ = op(
                logits,
                old2,
                ref2,
                ids2,
                x.advantages,
                mask,
                temperature=cfg.temperature,
                beta=cfg.beta,
                eps_low=cfg.epsilon_low,
                eps_high=cfg.epsilon_high,
                loss_type=cfg.loss_type,
                importance_sampling_level=cfg.importance_sampling_level,
                reduce=True,
            )
            return loss

        return Step(variant, fn, (hp, x.weight), note="logits GEMM over S*(T+1) rows included")
    raise ValueError(f"unknown variant {variant!r}")


# ---------------------------------------------------------------------------------------
# Errors, formatting, environment
# ---------------------------------------------------------------------------------------


def rel_err(out: torch.Tensor, gold: torch.Tensor) -> float:
    """||out - gold|| / ||gold|| in fp64 (NaN when out holds a non-finite value)."""
    a, b = out.detach().double().flatten(), gold.detach().double().flatten()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.3f}" if x < 0.01 else f"{x * 1e3:.1f}"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def fmt_ratio(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
    sep = "| " + " | ".join("-" * w for w in widths) + " |"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception:
            out[name] = "missing"
    out["liger-kernel"] = liger_version() or "missing"
    return out


def git_commit() -> str:
    """HEAD read from .git without running git (absent on the device machine's copy)."""
    try:
        head = (ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = ROOT / ".git" / head[5:]
            if ref.exists():
                return ref.read_text().strip()[:12]
            packed = ROOT / ".git" / "packed-refs"
            for line in packed.read_text().splitlines() if packed.exists() else []:
                if line.endswith(head[5:]):
                    return line.split()[0][:12]
            return "unknown"
        return head[:12]
    except OSError:
        return "unknown"


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")
