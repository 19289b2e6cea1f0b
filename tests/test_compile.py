"""The compile check: every Triton kernel of prorank_fast.kernels, compiled ahead of time for sm_80,
sm_90 and sm_100 (no GPU needed), in the configurations its launcher can pass.

What is covered (``kernels/launch_table.py`` is the one table; ``launch_table.configurations`` and
``aot.jobs(reduced=True)`` define it exactly):

* Which kernels: every ``@triton.jit`` function of the package is either a kernel of the launch table
  or called (directly or not) by one; every launched kernel is in the table; the table's arguments
  are exactly each kernel's parameters, its constexprs exactly the ``tl.constexpr`` ones.
* The launchers: they read num_warps / num_stages / block sizes from the table (``Kernel.launch``);
  real launches of every public op (recorded in the interpreter: dtypes, flags, odd and 1-sized
  shapes, strided views, int32 ids) pass only values whose Triton specialisation the table covers.
* Specialisation as Triton 3.x makes it at launch (its own ``native_specialize_impl``, checked
  against ``launch_table.specialize``): an int equal to 1 is a constexpr, other ints are i32 with or
  without divisibility by 16, pointers with or without 16-byte alignment.
* core (compiled for all three targets; a compile error or any spill, LOCAL or STACK, fails): every
  flag combination the launcher can produce x bf16 / fp16 / fp32 x both classes of the per-call size
  (vocabulary 151936 / 50257 for the row kernels, 4096 / 100 rows for the score kernels and the
  matmul), every other argument at its default (int64 ids, contiguous, aligned, H=896, K=2). For
  the GRPO row kernel the three flags that only change its once-per-row scalar epilogue (HAS_OLD,
  USE_KL, HAS_DELTA) are crossed in full in bf16 at V=151936 under the default loop flags, and
  otherwise taken all off and all on with every combination of the loop flags (HAS_BIAS, WRITE_GRAD).
* axis (a compile error fails; spills are reported by ``bench compile``): one argument away from the
  defaults at a time: fp64, the other dtype of a second tensor (bias, weight), int32/int16/int8/uint8
  ids, every smaller power-of-two tile of the row kernels (V = 2048 ... 1), integers equal to 1
  (B, H, K, V, strides), odd and multiple-of-16 strides, misaligned pointers.
* generic (a compile error fails): the least-specialised launch (odd sizes and strides, misaligned
  pointers) per core dtype, with the default flags and with every flag on.
* Targets: core for sm_80, sm_90 and sm_100; axis and generic for sm_90, except for a kernel with
  tl.dot (lowered per target and operand dtype: mma / wgmma / tcgen05), whose generic and dtype
  variants are compiled for all three. Elsewhere the targets differ only in the LLVM / ptxas back
  end, which the core set exercises for every dtype and flag on every target.
* KNOWN_PROBLEMS below: problems the check finds and a fix has not removed yet, named exactly and
  strict (none today).

Time (2 CPU cores, 2 worker processes, triton 3.9, 707 compiles): ~135 CPU-s from a cold Triton cache,
so ~70 s on two idle cores (117-132 s measured while another job held one of the two); ~10 s warm.
``prorank-fast bench compile`` compiles the full profile (every group on every target) and prints
registers, shared memory, spills and occupancy per configuration.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from prorank_fast.kernels import aot  # noqa: E402
from prorank_fast.kernels import launch_table as lt  # noqa: E402

KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"

# Problems the check finds that are not fixed yet. Strict: under the triton version named, the test
# fails when one is gone, so that its entry leaves with the fix. (kernel, target or None: all, substring of the
# configuration label, "error" | "spill", triton version prefix or "": any) -> why
KNOWN_PROBLEMS: dict[tuple[str, str | None, str, str, str], str] = {}


# ---------------------------------------------------------------------------------------
# The table covers every kernel (source scan: no compile, no import of triton needed)
# ---------------------------------------------------------------------------------------


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit" and getattr(target.value, "id", "") == "triton"


def _scan():
    """{(module, name): FunctionDef} of every @triton.jit function, and the (module, name) launched."""
    jit, launched = {}, set()
    for path in sorted(KERNELS_DIR.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                jit[(path.stem, node.name)] = node
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                name = getattr(node.func.value, "id", None)
                if name is not None:
                    launched.add((path.stem, name))
    launched = {key for key in launched if key in jit}
    return jit, launched


def test_every_jit_function_is_a_table_kernel_or_called_by_one():
    jit, launched = _scan()
    table = {(k.module, k.fn): k.name for k in lt.KERNELS.values()}
    assert set(table) <= set(jit), f"launch table entries without a @triton.jit function: {set(table) - set(jit)}"
    assert launched <= set(table), f"launched kernels missing from kernels/launch_table.py: {launched - set(table)}"
    assert set(table) <= launched, f"launch table kernels nobody launches: {set(table) - launched}"
    by_name = {key[1]: key for key in jit}
    assert len(by_name) == len(jit), "two @triton.jit functions share a name: calls cannot be resolved by name"
    reached, todo = set(table), list(table)
    while todo:  # device functions: called by name from a reached function (same module or imported)
        for node in ast.walk(jit[todo.pop()]):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in by_name:
                callee = by_name[node.func.id]
                if callee not in reached:
                    reached.add(callee)
                    todo.append(callee)
    orphans = sorted(f"{m}.{n}" for m, n in set(jit) - reached)
    assert not orphans, (
        f"@triton.jit functions neither in kernels/launch_table.py nor called by a kernel there: {orphans}"
    )


@pytest.mark.parametrize("name", list(lt.KERNELS))
def test_table_arguments_are_the_kernel_parameters(name):
    k = lt.KERNELS[name]
    jit, _ = _scan()
    fn = jit[(k.module, k.fn)]
    params = [a.arg for a in fn.args.args]
    constexpr = {a.arg for a in fn.args.args if a.annotation is not None and "constexpr" in ast.unparse(a.annotation)}
    assert set(k.constexprs) == constexpr, (
        f"{name}: table constexprs {sorted(k.constexprs)} vs kernel {sorted(constexpr)}"
    )
    assert set(k.flags) <= constexpr
    for cfg in lt.configurations(name)[:1] + lt.configurations(name)[-1:]:
        assert list(lt.compile_args(name, cfg.as_dict, params)[0]) == params
    if k.target_specific is False:
        assert "tl.dot" not in ast.unparse(fn), f"{name} uses tl.dot: mark it target_specific in the launch table"


def test_launch_refuses_what_the_table_lacks():
    k = lt.KERNELS["row_stats"]
    assert k.launch(HAS_BIAS=True, BLOCK=4096) == {"HAS_BIAS": True, "BLOCK": 4096, "num_warps": lt.ROW_WARPS}
    with pytest.raises(KeyError, match="row_stats: the launch passes constexprs"):
        k.launch(HAS_BIAS=True, BLOCK=4096, NEW_FLAG=True)
    with pytest.raises(ValueError, match="HAS_BIAS=None is not in the launch table"):
        k.launch(HAS_BIAS=None, BLOCK=4096)


def test_specialisation_is_tritons():
    """launch_table.specialize is Triton's launch-time rule (native_specialize_impl, the backend's defaults)."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    for value in (1, 0, 2, 16, 17, 896, 900, 151936, 50257, 2**31 - 1, 2**31, -3, 0.5, 1.0):
        assert native(BaseBackend, value, False, True, True)[:2] == lt.specialize(value), value
    for dtype in (torch.bfloat16, torch.float32, torch.int32, torch.uint8):
        base = torch.empty(64, dtype=dtype)
        for t in (base, base[1:]):
            assert native(BaseBackend, t, False, True, True)[:2] == lt.specialize(_as_table_tensor(t))


# ---------------------------------------------------------------------------------------
# Real launches stay inside the table (recorded in the interpreter, kernels not run)
# ---------------------------------------------------------------------------------------

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}  # fmt: skip


def _as_table_tensor(t: torch.Tensor) -> lt.Tensor:
    return lt.Tensor(_DTYPES[t.dtype], t.data_ptr() % 16 == 0)


def _domains(name: str) -> dict[str, set]:
    """Per parameter, every specialisation the table's configurations give it."""
    out: dict[str, set] = {}
    for cfg in lt.configurations(name):
        for p, spec in lt.launch_signature(name, lt.launch_args(name, cfg.as_dict)).items():
            out.setdefault(p, set()).add(spec)
    return out


class _Recorder:
    def __init__(self, name: str, kernel, log: list):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            names = self.kernel.arg_names
            values = {**dict(zip(names, args, strict=False)), **{k: v for k, v in kwargs.items() if k in names}}
            options = {k: v for k, v in kwargs.items() if k not in names}
            self.log.append((self.name, values, options))

        return launch


def _public_calls():
    """Calls of every public op that reach each kernel with varied dtypes, flags and shapes."""
    from prorank_fast.kernels import (
        batch_invariant_linear,
        fused_linear_grpo_loss,
        fused_linear_logprobs,
        restricted_vocab_score,
        restricted_vocab_score_loss,
    )

    g = torch.Generator().manual_seed(0)
    rows = [(torch.float32, 1000, 5, torch.int64), (torch.bfloat16, 151936, 3, torch.int32),
            (torch.float16, 4096, 17, torch.int64), (torch.float32, 1, 2, torch.int64)]  # fmt: skip
    for dtype, V, n, ids_dtype in rows:
        h = torch.randn(n, 8, generator=g).to(dtype).requires_grad_()
        w = torch.randn(V, 8, generator=g).to(dtype).requires_grad_()
        tok = torch.randint(0, V, (n,), generator=g).to(ids_dtype)
        for bias in (None, torch.zeros(V, dtype=dtype, requires_grad=True)):
            logp, ent = fused_linear_logprobs(h, w, tok, bias=bias, return_entropy=True, impl="triton")
            (logp.sum() + ent.sum()).backward()
            fused_linear_logprobs(h, w, tok, bias=bias, impl="triton").sum().backward()
            seq = torch.arange(n) % 2
            adv = torch.randn(2, generator=g)
            for kw in ({}, {"old_logprobs": torch.zeros(n), "ref_logprobs": torch.zeros(n), "beta": 0.1, "delta": 2.0}):
                for level in ("token", "sequence"):
                    loss, _ = fused_linear_grpo_loss(
                        h, w, tok, adv, seq, bias=bias, impl="triton", importance_sampling_level=level, **kw
                    )
                    loss.backward()
            with torch.no_grad():
                fused_linear_grpo_loss(h, w, tok, adv, seq.to(torch.int32), bias=bias, impl="triton")
    for dtype, B, ids, stride in ((torch.float32, 37, (16, 15), 1), (torch.bfloat16, 1, (5,), 1),
                                  (torch.float16, 64, (3, 4, 5), 2), (torch.float32, 100, (7, 9), 3)):  # fmt: skip
        hidden = torch.randn(B, 50 * stride, generator=g).to(dtype)[:, ::stride].requires_grad_()
        weight = torch.randn(300, 50, generator=g).to(dtype).requires_grad_()
        for bias in (None, torch.zeros(300, dtype=dtype, requires_grad=True)):
            restricted_vocab_score(hidden, weight, ids, [1.0] * len(ids), bias=bias, impl="triton").sum().backward()
            loss, _ = restricted_vocab_score_loss(
                hidden, weight, torch.rand(B, generator=g), token_ids=ids, token_weights=[1.0] * len(ids),
                bias=bias, impl="triton",
            )  # fmt: skip
            loss.backward()
            restricted_vocab_score(
                hidden.detach(), weight, ids, [1.0] * len(ids), bias=bias, impl="triton"
            ).sum().backward()
    for dtype, m in ((torch.float32, 5), (torch.bfloat16, 64), (torch.float16, 1)):
        x, w = torch.randn(m, 24, generator=g).to(dtype), torch.randn(40, 24, generator=g).to(dtype)
        for bias in (None, torch.zeros(40, dtype=dtype)):
            batch_invariant_linear(x, w, bias, impl="triton")


def test_real_launches_stay_inside_the_table(monkeypatch):
    import importlib

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches in Triton's interpreter (CPU test sessions)")
    log: list = []
    for k in lt.KERNELS.values():
        module = importlib.import_module(f"prorank_fast.kernels.{k.module}")
        monkeypatch.setattr(module, k.fn, _Recorder(k.name, getattr(module, k.fn), log))
    _public_calls()
    seen = {name for name, _, _ in log}
    assert seen == set(lt.KERNELS), f"kernels the calls did not reach: {set(lt.KERNELS) - seen}"
    domains = {name: _domains(name) for name in lt.KERNELS}
    outside = []
    for name, values, options in log:
        k = lt.KERNELS[name]
        assert options == k.options(), f"{name} launched with {options}, the table says {k.options()}"
        args = {p: _as_table_tensor(v) if isinstance(v, torch.Tensor) else v for p, v in values.items()}
        for p, spec in lt.launch_signature(name, args).items():
            if spec not in domains[name][p]:
                outside.append(f"{name}.{p}: {spec} (table: {sorted(map(str, domains[name][p]))})")
        flags = {f: values[f] for f in k.flags}
        assert flags in k.flag_combinations(), f"{name}: flags {flags} not in the table"
    assert not outside, "launches outside the launch table:\n" + "\n".join(sorted(set(outside)))


# ---------------------------------------------------------------------------------------
# The compile check itself
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    return aot.compile_jobs(aot.jobs(reduced=True), workers=max(2, min(os.cpu_count() or 2, 8)))


def _matches(r, kernel: str, target: str | None, label: str, version: str) -> bool:
    import triton

    return (
        r.kernel == kernel
        and target in (None, r.target)
        and label in r.config
        and triton.__version__.startswith(version)
    )


def _known(r, kind: str) -> str | None:
    for (kernel, target, label, what, version), why in KNOWN_PROBLEMS.items():
        if what == kind and _matches(r, kernel, target, label, version):
            return why
    return None


def test_every_configuration_compiles(compiled):
    errors = [r.error for r in compiled if r.error and not _known(r, "error")]
    assert not errors, f"{len(errors)} configurations do not compile:\n" + "\n\n".join(e[-1500:] for e in errors)


def test_no_spills_in_the_default_configurations(compiled):
    spills = [
        f"{r.kernel} [{r.config}] for {r.target}: LOCAL {r.local} B, STACK {r.stack} B, {r.regs} registers"
        for r in compiled
        if not r.error and r.group == "core" and r.spills and not _known(r, "spill")
    ]
    assert not spills, "register spills in default configurations (fix in kernels/launch_table.py):\n" + "\n".join(
        spills
    )


def test_known_problems_are_still_there(compiled):
    """Strict: a fixed problem must leave KNOWN_PROBLEMS."""
    import triton

    for (kernel, target, label, kind, version), why in KNOWN_PROBLEMS.items():
        if not triton.__version__.startswith(version):
            continue
        hits = [
            r
            for r in compiled
            if _matches(r, kernel, target, label, version) and (bool(r.error) if kind == "error" else r.spills)
        ]
        assert hits, (
            f"fixed? {kernel} {target} [{label}] {kind} no longer happens: delete it from KNOWN_PROBLEMS ({why})"
        )


def test_occupancy_is_computed_from_the_cuda_rules(compiled):
    # 64 registers x 512 threads: 2048 registers per warp, 8 warps per scheduler -> 32 warps, 2 blocks
    assert aot.occupancy("sm_90", 64, 0, 512) == (2, "registers")
    assert aot.occupancy("sm_90", 255, 0, 128) == (2, "registers")  # 8192 per warp: 2 warps/scheduler
    assert aot.occupancy("sm_90", 32, 0, 128) == (16, "threads")
    assert aot.occupancy("sm_80", 16, 100 * 1024, 64)[1] == "shared"
    assert all(r.blocks_per_sm >= 1 for r in compiled if not r.error)


def test_a_configuration_that_cannot_build_names_kernel_flags_and_target():
    cfg = {**lt.configurations("row_stats")[0].as_dict, "dtype": "nope"}  # no such element type
    (result,) = aot.compile_jobs([(lt.Config("row_stats", tuple(cfg.items()), "core"), "sm_90")], workers=1)
    assert result.error.startswith("row_stats [dtype=nope V=151936 HAS_BIAS=0] for sm_90: "), result.error


def test_bench_compile_without_triton_says_how_to_install():
    import subprocess
    import sys

    env = {**os.environ, "PRORANK_DISABLE_TRITON": "1"}
    cmd = [sys.executable, "-m", "prorank_fast.cli", "bench", "compile"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=KERNELS_DIR.parent)
    assert proc.returncode == 2 and "pip install triton" in proc.stderr, proc.stderr[-2000:]
