"""The launch table: the one description of every Triton kernel launch in this package.

Per launched ``@triton.jit`` kernel (``KERNELS``): where it lives, its fixed launch constants
(num_warps, block sizes: its launcher reads them here, through ``Kernel.launch``), its constexpr
flags and the values they take, and what the launcher can pass for every other argument: the
caller's choices (``axes``: dtypes, sizes, strides, alignment) and ``args``, which maps one choice
of all of them to the kernel's arguments exactly as the launcher computes them. The compile check
(``kernels/aot.py``: tests/test_compile.py and ``prorank-fast bench compile``) enumerates its
configurations here (``configurations``) and specialises the arguments as Triton does at launch
(``specialize``) to build ``triton.compile``'s signature (``compile_args``).

Pure Python: importing this needs neither torch nor triton, so the launchers can import it freely.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

FLOATS = ("bf16", "fp16", "fp32", "fp64")  # what the ops' check_floating lets through
CORE_FLOATS = ("bf16", "fp16", "fp32")  # the training dtypes: every flag combination, spill-checked
IDS = ("i64", "i32", "i16", "i8", "u8")  # what check_token_ids lets through (passed without a cast)

# The row kernels (lm_head.py, grpo.py): one program per row of a [rows, V] logits chunk, 16 warps
# sweeping tiles of ROW_BLOCK columns; a vocabulary below ROW_BLOCK gets the next power of two.
ROW_BLOCK = 4096
ROW_WARPS = 16
ROW_BLOCKS = tuple(1 << k for k in range(ROW_BLOCK.bit_length() - 1, -1, -1))  # 4096, 2048, ..., 1

# The score kernels (score.py): one program per SCORE_BLOCK_B rows of hidden; the backward's second
# stage reduces SCORE_BLOCK_P row-block partials per step. 8 warps, not 4: with 4, triton 3.6's
# ptxas spills (4 bytes) in the fp32 backward at a row count that is not a multiple of 16 on sm_90,
# and strided fp32 views need up to 255 registers; 8 warps halve each thread's share of the
# [32, 128] tile (at most ~64 registers in the default configurations, no spill with 3.6 or 3.9).
SCORE_BLOCK_B = 32
SCORE_BLOCK_H = 128
SCORE_BLOCK_K = 8  # output-set tokens per inner step (K is usually 2)
SCORE_BLOCK_P = 32
SCORE_WARPS = 8

# The batch-invariant matmul (invariant_matmul.py): fixed tiles, so a row's rounding never depends
# on M. 8 warps, not 4: with 4, the fp32 (IEEE dot) tile with a bias needs 255 registers and spills
# 16 bytes on sm_90 (triton 3.9); 64 x 64 tiles with 4 warps spill too (fp32 without a bias).
MATMUL_BLOCK_M = 64
MATMUL_BLOCK_N = 128
MATMUL_BLOCK_K = 32
MATMUL_GROUP_M = 8
MATMUL_WARPS = 8
MATMUL_STAGES = 3


def row_block(vocab: int) -> int:
    """Columns per tile of the row kernels: ROW_BLOCK, or the next power of two above a smaller V."""
    return min(ROW_BLOCK, 1 << max(vocab - 1, 0).bit_length())


@dataclass(frozen=True)
class Tensor:
    """A tensor argument as Triton sees it at launch: element type, and whether data_ptr() % 16 == 0."""

    dtype: str
    aligned: bool = True


@dataclass(frozen=True)
class Kernel:
    """One launched kernel: its launch constants and the domain of its launcher's arguments.

    ``constexprs``: every ``tl.constexpr`` parameter -> the values the launcher may pass (first: the
    default). ``flags``: the constexprs that are crossed in full with the ``core`` axes (the others
    are fixed block sizes, or follow from an axis, like the row kernels' BLOCK from V). ``axes``: the
    caller's other choices -> values (first: the default). ``generic``: the axis values of the
    least-specialised launch (odd sizes and strides, misaligned pointers). ``args``: configuration
    (flags and axes) -> {parameter: Tensor | int | float | constexpr value}, as the launcher passes
    them. ``reachable``: which flag combinations the launcher can produce.
    """

    name: str
    module: str  # module of prorank_fast.kernels that defines the kernel
    fn: str  # the @triton.jit function's name there
    num_warps: int
    num_stages: int | None  # None: Triton's default
    constexprs: Mapping[str, tuple]
    flags: tuple[str, ...]
    axes: Mapping[str, tuple]
    core: Mapping[str, tuple]  # axes -> the values crossed with every flag combination
    generic: Mapping[str, object]
    args: Callable[[dict], dict]
    reachable: Callable[[dict], bool] = field(default=lambda flags: True)
    # flags that only change O(1) scalar code per program (no loop, no load of the row): crossed in
    # full only with the first core combination and the default loop flags (see ``configurations``)
    scalar_flags: tuple[str, ...] = ()
    # tl.dot inside: lowered differently per target (mma / wgmma / tcgen05), so the compile check's
    # reduced profile compiles every configuration of it for every target
    target_specific: bool = False

    def launch(self, **constexprs) -> dict:
        """Keyword arguments of one launch: the constexprs given plus the launch options. A constexpr
        the table does not have (or lacks), or a flag value it does not list, raises: the compile
        check would not have compiled that kernel. Block sizes are not checked here (tests shrink
        them to run every loop several times in the interpreter); tests/test_compile.py checks the
        values that real launches pass."""
        if set(constexprs) != set(self.constexprs):
            raise KeyError(
                f"{self.name}: the launch passes constexprs {sorted(constexprs)}, the launch table has "
                f"{sorted(self.constexprs)} (kernels/launch_table.py)"
            )
        for key in self.flags:
            value = constexprs[key]
            if value not in self.constexprs[key]:
                raise ValueError(
                    f"{self.name}: {key}={value!r} is not in the launch table's {self.constexprs[key]} "
                    "(kernels/launch_table.py)"
                )
        return {**constexprs, **self.options()}

    def options(self) -> dict:
        """The launch options (triton.compile's ``options``)."""
        stages = {} if self.num_stages is None else {"num_stages": self.num_stages}
        return {"num_warps": self.num_warps, **stages}

    def defaults(self) -> dict:
        return {**{f: self.constexprs[f][0] for f in self.flags}, **{a: v[0] for a, v in self.axes.items()}}

    def flag_combinations(self) -> list[dict]:
        values = itertools.product(*(self.constexprs[f] for f in self.flags))
        combos = [dict(zip(self.flags, v, strict=True)) for v in values]
        return [c for c in combos if self.reachable(c)]


# ---------------------------------------------------------------------------------------
# Helpers shared by the ``args`` functions
# ---------------------------------------------------------------------------------------


def _same(value: str, like: str) -> str:
    return like if value == "same" else value


def _vocab_args(c: dict) -> dict:
    """The arguments every row kernel shares: the [rows, V] chunk (always a fresh buffer: aligned,
    row stride V), the bias or, without one, the chunk again as a dummy pointer."""
    logits = Tensor(c["dtype"])
    bias = Tensor(_same(c["bias"], c["dtype"]), c["aligned"]) if c["HAS_BIAS"] else logits
    V = c["V"]
    return dict(logits_ptr=logits, stride_row=V, bias_ptr=bias, V=V, inv_t=1.0, BLOCK=row_block(V))


_ROW_AXES = {
    "dtype": FLOATS,  # the logits chunk's dtype: hidden's and weight's common dtype
    "bias": ("same", *FLOATS),  # the bias's own dtype (passed without a cast)
    "ids": IDS,
    # 151936: Qwen2 (a multiple of 16), 50257: GPT-2 (odd); then every smaller tile: V = 2^k down to 1
    "V": (151936, 50257, *ROW_BLOCKS[1:]),
    # chunk slices of the caller's tensors start anywhere (a chunk of any row count; views)
    "aligned": (True, False),
}
_ROW_GENERIC = {"V": 50257, "aligned": False}


def _row_stats_args(c: dict) -> dict:
    p = Tensor("fp32")  # logp, lse, entropy: fresh allocations
    return dict(**_vocab_args(c), tok_ptr=Tensor(c["ids"], c["aligned"]), logp_ptr=p, lse_ptr=p, ent_ptr=p)


def _grad_logits_args(c: dict) -> dict:
    s = Tensor("fp32", c["aligned"])  # lse, g_logp, g_ent, ent: slices of [N] fp32 tensors
    return dict(
        **_vocab_args(c), tok_ptr=Tensor(c["ids"], c["aligned"]), lse_ptr=s, g_logp_ptr=s, g_ent_ptr=s, ent_ptr=s
    )


def _grpo_args(c: dict) -> dict:
    s = Tensor("fp32", c["aligned"])  # advantages, old, ref, token weights and the outputs: fp32 slices
    out = {k: s for k in ("logp_ptr", "ent_ptr", "loss_ptr", "kl_ptr", "low_ptr", "high_ptr")}
    scalars = dict(beta=0.0, eps_low=0.2, eps_high=0.2, delta=0.0)  # Python floats: fp32, never specialised
    return dict(
        **_vocab_args(c), tok_ptr=Tensor(c["ids"], c["aligned"]), seq_ptr=Tensor(c["seq_ids"], c["aligned"]),
        adv_ptr=s, old_ptr=s, ref_ptr=s, c_ptr=s, **out, **scalars,
    )  # fmt: skip


def _score_common(c: dict) -> tuple[dict, str, str]:
    """hidden [B, H] and weight [V, H] as the caller passes them (any strides, own dtypes), the
    output-set ids [K] int64 and weights [K] fp32 (fresh, built by the op)."""
    H = c["H"]
    w_dtype = _same(c["weight"], c["dtype"])
    b_dtype = _same(c.get("bias", "same"), w_dtype)
    args = dict(
        H_ptr=Tensor(c["dtype"], c["aligned"]), W_ptr=Tensor(w_dtype, c["aligned"]),
        ids_ptr=Tensor("i64"), tw_ptr=Tensor("fp32"), hidden_size=H, n_tok=c["K"],
        stride_hb=H if c["stride_hb"] == "H" else c["stride_hb"], stride_hh=c["stride_hh"],
        stride_wv=H if c["stride_wv"] == "H" else c["stride_wv"], stride_wh=c["stride_wh"],
    )  # fmt: skip
    return args, w_dtype, b_dtype


def _score_fwd_args(c: dict) -> dict:
    args, _, b_dtype = _score_common(c)
    s = Tensor("fp32")
    bias = Tensor(b_dtype, c["aligned"]) if c["HAS_BIAS"] else s  # dummy pointer without a bias
    return dict(
        **args, Bias_ptr=bias, S_ptr=s, n_rows=c["B"], stride_bias=c["stride_bias"] if c["HAS_BIAS"] else 0,
        HAS_BIAS=c["HAS_BIAS"], BLOCK_B=SCORE_BLOCK_B, BLOCK_H=SCORE_BLOCK_H, BLOCK_K=SCORE_BLOCK_K,
    )  # fmt: skip


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _score_bwd_rows_args(c: dict) -> dict:
    args, _, _ = _score_common(c)
    H = c["H"]
    g = Tensor("fp32", c["aligned"])  # grad_s.float().contiguous(): the caller's tensor when already so
    return dict(
        **args, G_ptr=g,
        DH_ptr=Tensor(c["dtype"]) if c["NEED_DH"] else g, PR_ptr=Tensor("fp32") if c["NEED_DW"] else g,
        PG_ptr=Tensor("fp32") if c["NEED_DB"] else g, n_rows=c["B"],
        stride_dhb=H if c["NEED_DH"] else 0, stride_dhh=1 if c["NEED_DH"] else 0,  # dh: a fresh [B, H]
        NEED_DH=c["NEED_DH"], NEED_DW=c["NEED_DW"], NEED_DB=c["NEED_DB"],
        BLOCK_B=SCORE_BLOCK_B, BLOCK_H=SCORE_BLOCK_H, BLOCK_K=SCORE_BLOCK_K,
    )  # fmt: skip


def _score_bwd_reduce_args(c: dict) -> dict:
    w_dtype = _same(c["weight"], c["dtype"])
    b_dtype = _same(c["bias"], w_dtype)
    H, g = c["H"], Tensor("fp32", c["aligned"])  # g: the dummy pointer when a partial is not needed
    return dict(
        PR_ptr=Tensor("fp32") if c["NEED_DW"] else g, PG_ptr=Tensor("fp32") if c["NEED_DB"] else g,
        ids_ptr=Tensor("i64"), tw_ptr=Tensor("fp32"),
        DW_ptr=Tensor(w_dtype) if c["NEED_DW"] else g, DB_ptr=Tensor(b_dtype) if c["NEED_DB"] else g,
        n_parts=_cdiv(c["B"], SCORE_BLOCK_B), hidden_size=H, n_tok=c["K"],
        stride_dwv=H if c["NEED_DW"] else 0, stride_dwh=1 if c["NEED_DW"] else 0,  # dw, db: fresh zeros
        stride_db=1 if c["NEED_DB"] else 0,
        NEED_DW=c["NEED_DW"], NEED_DB=c["NEED_DB"], BLOCK_P=SCORE_BLOCK_P, BLOCK_H=SCORE_BLOCK_H, BLOCK_K=SCORE_BLOCK_K,
    )  # fmt: skip


def _matmul_args(c: dict) -> dict:
    """x's rows made contiguous [M, K], weight and bias cast to x's dtype (the caller's own tensors
    when they have it already: any strides, any alignment), a fresh out [M, N]."""
    K, N, dtype = c["K"], c["N"], c["dtype"]
    w = Tensor(dtype, c["aligned"])
    return dict(
        x_ptr=Tensor(dtype, c["aligned"]), w_ptr=w, bias_ptr=Tensor(dtype, c["aligned"]) if c["HAS_BIAS"] else w,
        out_ptr=Tensor(dtype), M=c["M"], N=N, K=K, stride_xm=K, stride_xk=1,
        stride_wn=K if c["stride_wn"] == "K" else c["stride_wn"], stride_wk=c["stride_wk"], stride_om=N, stride_on=1,
        IEEE=dtype == "fp32", BLOCK_M=MATMUL_BLOCK_M, BLOCK_N=MATMUL_BLOCK_N, BLOCK_K=MATMUL_BLOCK_K,
        GROUP_M=MATMUL_GROUP_M,
    )  # fmt: skip


# B: n_rows 4096 / 100 / 1 gives a multiple of 16, an odd count and 1, and so does the backward's
# n_parts = ceil(B / 32) (128, 4, 1). H: Qwen2.5-0.5B's 896, an odd 900, 1. K: "1"/"0" (2), 16, one token.
# Strides: "H" = contiguous rows; the others a view's (a multiple of 16, odd, or 1 for a transposed one).
_SCORE_SIZES = {"B": (4096, 100, 1), "H": (896, 900, 1), "K": (2, 16, 1)}
_SCORE_HIDDEN = {
    "dtype": FLOATS,
    "stride_hb": ("H", 33152, 903, 1),
    "stride_hh": (1, 4096, 3),
    "weight": ("same", *FLOATS),
    "stride_wv": ("H", 1792, 903, 1),
    "stride_wh": (1, 151936, 3),
    "aligned": (True, False),
}
_SCORE_GENERIC = {"B": 100, "H": 900, "stride_hb": 903, "stride_hh": 3, "stride_wv": 903, "stride_wh": 3,
                  "aligned": False}  # fmt: skip
_BOOL = (False, True)
# Core: the training dtypes x the per-call size as it comes (a multiple of 16 or not, e.g. a vocabulary
# of 151936 or 50257, a batch of 4096 or 100 rows): what the defaults launch.
_ROW_CORE = {"dtype": CORE_FLOATS, "V": (151936, 50257)}
_SCORE_CORE = {"dtype": CORE_FLOATS, "B": (4096, 100)}


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Kernel(
            name="row_stats", module="lm_head", fn="_row_stats_kernel", num_warps=ROW_WARPS, num_stages=None,
            constexprs={"HAS_BIAS": _BOOL, "BLOCK": ROW_BLOCKS}, flags=("HAS_BIAS",),
            axes=_ROW_AXES, core=_ROW_CORE, generic=_ROW_GENERIC, args=_row_stats_args,
        ),
        Kernel(
            name="grad_logits", module="lm_head", fn="_grad_logits_kernel", num_warps=ROW_WARPS, num_stages=None,
            constexprs={"HAS_BIAS": _BOOL, "HAS_ENT_GRAD": _BOOL, "BLOCK": ROW_BLOCKS},
            flags=("HAS_BIAS", "HAS_ENT_GRAD"),
            axes=_ROW_AXES, core=_ROW_CORE, generic=_ROW_GENERIC, args=_grad_logits_args,
        ),
        Kernel(
            name="grpo_token_rows", module="grpo", fn="_grpo_token_rows_kernel", num_warps=ROW_WARPS, num_stages=None,
            # first values: the default training call (no bias, on-policy, beta=0, no delta, gradients)
            constexprs={
                "HAS_BIAS": _BOOL, "HAS_OLD": _BOOL, "USE_KL": _BOOL, "HAS_DELTA": _BOOL,
                "WRITE_GRAD": (True, False), "BLOCK": ROW_BLOCKS,
            },
            flags=("HAS_BIAS", "HAS_OLD", "USE_KL", "HAS_DELTA", "WRITE_GRAD"),
            axes={**_ROW_AXES, "seq_ids": IDS}, core=_ROW_CORE, generic=_ROW_GENERIC, args=_grpo_args,
            scalar_flags=("HAS_OLD", "USE_KL", "HAS_DELTA"),  # only _grpo_token_math, once per row
        ),
        Kernel(
            name="score_fwd", module="score", fn="_score_fwd_kernel", num_warps=SCORE_WARPS, num_stages=None,
            constexprs={"HAS_BIAS": _BOOL, "BLOCK_B": (SCORE_BLOCK_B,), "BLOCK_H": (SCORE_BLOCK_H,),
                        "BLOCK_K": (SCORE_BLOCK_K,)},
            flags=("HAS_BIAS",),
            axes={**_SCORE_SIZES, **_SCORE_HIDDEN, "bias": ("same", *FLOATS), "stride_bias": (1, 16, 3)},
            core=_SCORE_CORE, generic={**_SCORE_GENERIC, "stride_bias": 3}, args=_score_fwd_args,
        ),
        Kernel(
            name="score_bwd_rows", module="score", fn="_score_bwd_rows_kernel", num_warps=SCORE_WARPS, num_stages=None,
            constexprs={"NEED_DH": (True, False), "NEED_DW": (True, False), "NEED_DB": _BOOL,
                        "BLOCK_B": (SCORE_BLOCK_B,), "BLOCK_H": (SCORE_BLOCK_H,), "BLOCK_K": (SCORE_BLOCK_K,)},
            flags=("NEED_DH", "NEED_DW", "NEED_DB"),
            axes={**_SCORE_SIZES, **_SCORE_HIDDEN}, core=_SCORE_CORE, generic=_SCORE_GENERIC,
            args=_score_bwd_rows_args, reachable=lambda f: any(f.values()),  # backward returns early without grads
        ),
        Kernel(
            name="score_bwd_reduce", module="score", fn="_score_bwd_reduce_kernel",
            num_warps=SCORE_WARPS, num_stages=None,
            constexprs={"NEED_DW": (True, False), "NEED_DB": _BOOL, "BLOCK_P": (SCORE_BLOCK_P,),
                        "BLOCK_H": (SCORE_BLOCK_H,), "BLOCK_K": (SCORE_BLOCK_K,)},
            flags=("NEED_DW", "NEED_DB"),
            axes={**_SCORE_SIZES, "dtype": FLOATS, "weight": ("same", *FLOATS), "bias": ("same", *FLOATS),
                  "aligned": (True, False)},
            core=_SCORE_CORE, generic={"B": 100, "H": 900, "aligned": False}, args=_score_bwd_reduce_args,
            reachable=lambda f: any(f.values()),  # launched only for a weight or bias gradient
        ),
        Kernel(
            name="invariant_matmul", module="invariant_matmul", fn="_invariant_matmul_kernel",
            num_warps=MATMUL_WARPS, num_stages=MATMUL_STAGES,
            constexprs={"HAS_BIAS": _BOOL, "IEEE": _BOOL, "BLOCK_M": (MATMUL_BLOCK_M,), "BLOCK_N": (MATMUL_BLOCK_N,),
                        "BLOCK_K": (MATMUL_BLOCK_K,), "GROUP_M": (MATMUL_GROUP_M,)},
            flags=("HAS_BIAS",),
            # M: tokens of a packed batch; N: a linear's outputs (the LM head's V); K: its inputs
            # no fp64: batch_invariant_linear sends it to the library on fixed tiles instead
            axes={"dtype": CORE_FLOATS, "M": (4096, 100, 1), "N": (151936, 50257, 1), "K": (896, 900, 1),
                  "stride_wn": ("K", 903, 1), "stride_wk": (1, 151936, 3), "aligned": (True, False)},
            core={"dtype": CORE_FLOATS, "M": (4096, 100)},
            generic={"M": 100, "N": 50257, "K": 900, "stride_wn": 903, "stride_wk": 3, "aligned": False},
            args=_matmul_args, target_specific=True,
        ),
    )
}  # fmt: skip


# ---------------------------------------------------------------------------------------
# Configurations of the compile check
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One configuration of one kernel: flag and axis values, and how the check treats it.

    ``group``: ``core`` (the flag combinations x the training dtypes x both size classes, everything
    else at its default: what the defaults launch; a spill here fails the check), ``axis`` (one axis
    away from the defaults) or ``generic`` (the least-specialised launch: odd sizes and strides, misaligned
    pointers). ``configurations`` says exactly which."""

    kernel: str
    values: tuple[tuple[str, object], ...]
    group: str

    @property
    def as_dict(self) -> dict:
        return dict(self.values)

    def label(self) -> str:
        """Flags, then the axes that differ from the kernel's defaults."""
        k = KERNELS[self.kernel]
        d = self.as_dict
        defaults = k.defaults()
        flags = " ".join(f"{f}={int(d[f]) if isinstance(d[f], bool) else d[f]}" for f in k.flags)
        axes = " ".join(f"{a}={d[a]}" for a in k.axes if d[a] != defaults[a] and a not in k.core)
        core = " ".join(f"{a}={d[a]}" for a in k.core)
        return " ".join(x for x in (core, flags, axes) if x)


def _all_on(k: Kernel, flags: tuple[str, ...] | None = None) -> dict:
    names = k.flags if flags is None else flags
    return {f: True if isinstance(k.constexprs[f][0], bool) else k.constexprs[f][0] for f in names}


def configurations(name: str) -> list[Config]:
    """The compile check's configurations of one kernel (see ``Config.group``), deduplicated by what
    Triton would compile (configurations whose specialised signatures agree are one binary; the first
    is kept).

    core: each combination of the core values (dtype x size class) with every reachable combination
    of the flags that shape the loops, the kernel's ``scalar_flags`` all at their defaults and all
    on; with the first core combination (bf16, the first size) also every combination of the scalar
    flags under the default loop flags. axis: each other value of each axis, one at a time, the rest
    and the flags at their defaults (every boolean flag on where the value changes nothing under the
    default flags, like a bias dtype without a bias). generic: the ``generic`` values with each core
    combination, with the default flags and with every boolean flag on."""
    k = KERNELS[name]
    base = {a: v[0] for a, v in k.axes.items()}
    default_flags = {f: k.constexprs[f][0] for f in k.flags}
    all_on = _all_on(k)
    flag_sets = [default_flags] + ([all_on] if k.reachable(all_on) and all_on != default_flags else [])
    scalar_sets = [{f: k.constexprs[f][0] for f in k.scalar_flags}, _all_on(k, k.scalar_flags)]
    loop_defaults = {f: v for f, v in default_flags.items() if f not in k.scalar_flags}
    candidates: list[tuple[dict, str]] = []
    for i, values in enumerate(itertools.product(*k.core.values())):
        for flags in k.flag_combinations():
            scalar_ok = {f: flags[f] for f in k.scalar_flags} in scalar_sets
            loops_default = all(flags[f] == v for f, v in loop_defaults.items())
            if scalar_ok or (i == 0 and loops_default):
                candidates.append(({**base, **dict(zip(k.core, values, strict=True)), **flags}, "core"))
    plain = signature_key(name, {**base, **default_flags})
    for axis, values in k.axes.items():
        for value in values[1:]:
            if value not in k.core.get(axis, ()):
                cfg = {**base, axis: value, **default_flags}
                if signature_key(name, cfg) == plain and k.reachable(all_on):  # e.g. a bias dtype, no bias
                    cfg.update(all_on)
                candidates.append((cfg, "axis"))
    for values in itertools.product(*k.core.values()):
        for flags in flag_sets:
            candidates.append(({**base, **dict(zip(k.core, values, strict=True)), **k.generic, **flags}, "generic"))
    seen, out = set(), []
    for cfg, group in candidates:
        key = signature_key(name, cfg)
        if key not in seen:
            seen.add(key)
            out.append(Config(name, tuple(cfg.items()), group))
    return out


# ---------------------------------------------------------------------------------------
# Triton's launch-time specialisation, and triton.compile's arguments
# ---------------------------------------------------------------------------------------


def specialize(value) -> tuple[str, object]:
    """(type, specialisation) of one launch argument as Triton 3.x's launcher makes it
    (``native_specialize_impl``, default backend rules): an int equal to 1 becomes the constexpr 1;
    other ints are i32 (i64 from 2**31 on), "D" when divisible by 16; a tensor is a pointer to its
    dtype, "D" when its data_ptr() is divisible by 16; a Python float is fp32, never specialised;
    constexpr values stay as they are. aot.py checks this against Triton's own function."""
    if isinstance(value, Tensor):
        return "*" + value.dtype, "D" if value.aligned else ""
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        kind = "i32" if -(2**31) <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return kind, "D" if value % 16 == 0 else ""
    if isinstance(value, float):
        return "fp32", None
    raise TypeError(f"no launch specialisation for {value!r}")


def launch_args(name: str, cfg: dict) -> dict:
    """Every argument of one configuration's launch: its flags and ``args(cfg)``."""
    k = KERNELS[name]
    return {**{f: cfg[f] for f in k.flags}, **k.args(cfg)}


def launch_signature(name: str, args: Mapping[str, object], param_names: list[str] | None = None):
    """{parameter: specialisation} for the arguments of one launch: ("constexpr", value) for a
    tl.constexpr parameter, else ``specialize(value)``."""
    k = KERNELS[name]
    names = param_names if param_names is not None else list(args)
    return {p: ("constexpr", args[p]) if p in k.constexprs else specialize(args[p]) for p in names}


def signature_key(name: str, cfg: dict) -> tuple:
    return tuple(sorted(launch_signature(name, launch_args(name, cfg)).items(), key=lambda kv: kv[0]))


def compile_args(name: str, cfg: dict, param_names: list[str], spec: Callable | None = None):
    """(signature, constexprs, attrs) for ``triton.compile(ASTSource(fn, signature, constexprs, attrs))``
    of one configuration, for a kernel whose parameters are ``param_names`` in order.
    ``spec`` specialises one value (default: ``specialize``; aot.py passes Triton's own)."""
    k = KERNELS[name]
    args = launch_args(name, cfg)
    missing = [p for p in param_names if p not in args]
    extra = [p for p in args if p not in param_names]
    if missing or extra:
        raise KeyError(f"{name}: the table's args() misses {missing} / has unknown {extra} (kernels/launch_table.py)")
    spec = spec or specialize
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(param_names):
        if p in k.constexprs:
            signature[p], constexprs[(i,)] = "constexpr", args[p]
            continue
        kind, special = spec(args[p])
        signature[p] = kind
        if kind == "constexpr":
            constexprs[(i,)] = special
        elif isinstance(special, str) and special:
            attrs[(i,)] = special  # "D": the caller maps it to the backend's attribute (tt.divisibility 16)
    return signature, constexprs, attrs


def all_configurations(kernels: list[str] | None = None) -> Iterator[Config]:
    for name in kernels or list(KERNELS):
        yield from configurations(name)
