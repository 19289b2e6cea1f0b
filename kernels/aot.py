"""Ahead-of-time compilation of the launch table for GPUs that are not here.

``compile_jobs`` compiles configurations of ``launch_table.KERNELS`` with ``triton.compile`` for
``GPUTarget("cuda", cc, 32)`` (sm_80, sm_90, sm_100: no GPU needed) in worker subprocesses (a pool
of ``workers`` Pythons with TRITON_INTERPRET unset, so that a test session running the interpreter
can call it too), and reads each cubin's resource usage with the cuobjdump that ships in the triton
wheel: registers per thread, static shared memory, LOCAL and STACK (a ptxas spill shows up as
LOCAL, or with triton 3.9's ptxas as STACK). ``occupancy`` turns registers, shared memory and
threads into resident blocks per SM with the CUDA occupancy calculator's rules. Used by
tests/test_compile.py and ``prorank-fast bench compile`` (benchmarks/compile_check.py).

Works with triton 3.6 to 3.9 (the ASTSource / GPUTarget / asm["cubin"] API is the same there).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import launch_table as lt

TARGETS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits of compute capability 8.0 / 9.0 / 10.0 (CUDA C++ Programming Guide, "Technical
    Specifications per Compute Capability"; the allocation rules of cuda_occupancy.h)."""

    max_threads: int
    max_blocks: int
    shared_bytes: int  # the largest shared-memory carveout
    registers: int = 65536
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # the register file is split between 4 schedulers
    shared_unit: int = 128
    reserved_shared: int = 1024  # the driver's per-block reservation (compute capability >= 8)


SM_LIMITS = {
    "sm_80": SMLimits(max_threads=2048, max_blocks=32, shared_bytes=164 * 1024),  # A100
    "sm_90": SMLimits(max_threads=2048, max_blocks=32, shared_bytes=228 * 1024),  # H100 / H200
    "sm_100": SMLimits(max_threads=2048, max_blocks=32, shared_bytes=228 * 1024),  # B200
}


def occupancy(target: str, regs: int, shared: int, threads: int) -> tuple[int, str]:
    """(resident blocks per SM, what limits them) for a kernel of ``regs`` registers per thread,
    ``shared`` bytes of shared memory per block and ``threads`` per block, as
    cudaOccupancyMaxActiveBlocksPerMultiprocessor computes it (warp-granular register allocation)."""
    lim = SM_LIMITS[target]
    warps = -(-threads // 32)
    by = {"threads": lim.max_threads // (warps * 32), "blocks": lim.max_blocks}
    if regs:
        per_warp = -(-regs * 32 // lim.reg_unit) * lim.reg_unit
        warps_per_sm = (lim.registers // lim.sub_partitions // per_warp) * lim.sub_partitions
        # a block's warps are spread over the schedulers: it must fit at all (the hardware check)
        fits = per_warp * (-(-warps // lim.sub_partitions) * lim.sub_partitions) <= lim.registers
        by["registers"] = warps_per_sm // warps if fits else 0
    need = -(-(shared + lim.reserved_shared) // lim.shared_unit) * lim.shared_unit
    by["shared"] = lim.shared_bytes // need
    limiter = min(by, key=lambda k: (by[k], k != "threads"))
    return by[limiter], limiter


@dataclass
class Result:
    kernel: str
    config: str
    group: str
    target: str
    num_warps: int
    regs: int = 0
    shared: int = 0  # static (cubin) + dynamic (Triton's metadata) bytes per block
    local: int = 0
    stack: int = 0
    seconds: float = 0.0
    blocks_per_sm: int = 0
    limiter: str = ""
    error: str = ""

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    @property
    def spills(self) -> bool:
        return bool(self.local or self.stack)

    @property
    def occupancy(self) -> float:
        return self.blocks_per_sm * self.threads / SM_LIMITS[self.target].max_threads

    def as_dict(self) -> dict:
        return {**asdict(self), "threads": self.threads, "occupancy": round(self.occupancy, 4)}


AXIS_TARGET = "sm_90"  # the reduced profile's one target for the one-axis variants (the GPU machines')


def jobs(
    kernels: list[str] | None = None, targets: list[str] | None = None, *, reduced: bool = False
) -> list[tuple[lt.Config, str]]:
    """(configuration, target) pairs to compile, the slowest kernels first (better packing).

    Full (``bench compile``): every configuration of ``launch_table.configurations`` for every
    target. Reduced (the test, to stay within its time): the core configurations for every target;
    the axis and generic ones for AXIS_TARGET only, except where the lowering depends on the target:
    a kernel with tl.dot (``target_specific``: mma / wgmma / tcgen05 by target and operand dtype)
    gets its generic and dtype variants compiled for every target. Elsewhere the targets differ in
    the LLVM / ptxas back end only, and for these groups the check is "it compiles" (a spill fails
    only in the core configurations)."""
    targets = targets or list(TARGETS)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown targets {unknown}; known: {', '.join(TARGETS)}")
    unknown = [k for k in kernels or () if k not in lt.KERNELS]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; known: {', '.join(lt.KERNELS)}")
    out = []
    for cfg in lt.all_configurations(kernels):
        k = lt.KERNELS[cfg.kernel]
        dtype_changed = cfg.as_dict.get("dtype", "") != k.axes.get("dtype", ("",))[0]
        every = not reduced or cfg.group == "core" or (k.target_specific and (cfg.group == "generic" or dtype_changed))
        chosen = targets if every else [t for t in targets if t == AXIS_TARGET] or targets[:1]
        out.extend((cfg, t) for t in chosen)
    order = {"invariant_matmul": 0, "grpo_token_rows": 1, "score_bwd_rows": 2, "score_fwd": 3}
    return sorted(out, key=lambda j: order.get(j[0].kernel, 9))


def compile_jobs(todo: list[tuple[lt.Config, str]], workers: int = 2, progress=None) -> list[Result]:
    """Compile every job in a pool of ``workers`` subprocesses; results in the order of ``todo``.
    A configuration that fails to build comes back with ``error`` set, naming the kernel, its
    configuration (flags first) and the target; so does one that kills its compiler process (the
    process is replaced)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 = its default
    cmd = [sys.executable, "-c", _BOOT, str(Path(__file__).resolve().parent)]
    results: list[Result | None] = [None] * len(todo)
    lock = threading.Lock()
    queue = list(enumerate(todo))[::-1]

    def start(log) -> subprocess.Popen:
        # stderr to a file: a pipe nobody reads could fill up and stall the worker
        return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)

    def drive() -> None:
        with tempfile.TemporaryFile("w+") as log:
            proc = start(log)
            while True:
                with lock:
                    if not queue:
                        break
                    index, (cfg, target) = queue.pop()
                job = {"kernel": cfg.kernel, "values": list(cfg.values), "target": target}
                try:
                    proc.stdin.write(json.dumps(job) + "\n")
                    proc.stdin.flush()
                    line = proc.stdout.readline()
                except BrokenPipeError:
                    line = ""
                if line:
                    raw = json.loads(line)
                else:  # the compiler process died on this job: report it, start another
                    proc.wait()
                    log.seek(0)
                    raw = {"error": f"the compiler process died (exit {proc.returncode}): {log.read()[-2000:]}"}
                    raw["num_warps"] = lt.KERNELS[cfg.kernel].num_warps
                    log.seek(0)
                    log.truncate()
                    proc = start(log)
                res = Result(kernel=cfg.kernel, config=cfg.label(), group=cfg.group, target=target, **raw)
                if not res.error:
                    res.blocks_per_sm, res.limiter = occupancy(target, res.regs, res.shared, res.threads)
                else:
                    res.error = f"{cfg.kernel} [{cfg.label()}] for {target}: {res.error}"
                results[index] = res
                if progress is not None:
                    progress(res)
            proc.stdin.close()
            proc.wait(timeout=60)

    threads = [threading.Thread(target=drive, daemon=True) for _ in range(max(1, min(workers, len(todo))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # pragma: no cover - a driver thread raised
        raise RuntimeError(f"{len(missing)} compile jobs got no result")
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# The worker: one Python process compiling jobs read from stdin, one JSON line each back.
# ---------------------------------------------------------------------------------------

# Loads this kernels folder under its installed name (also on a bare checkout, as benchmarks/_common.py
# does), so the worker compiles exactly the files the caller uses.
_BOOT = """
import importlib.util, sys, types
kdir = sys.argv[1]
if "prorank_fast" not in sys.modules:
    try:
        import prorank_fast
    except ModuleNotFoundError:
        stub = types.ModuleType("prorank_fast"); stub.__path__ = []; sys.modules["prorank_fast"] = stub
spec = importlib.util.spec_from_file_location("prorank_fast.kernels", kdir + "/__init__.py",
                                              submodule_search_locations=[kdir])
module = importlib.util.module_from_spec(spec); sys.modules["prorank_fast.kernels"] = module
spec.loader.exec_module(module)
from prorank_fast.kernels import aot
aot._worker()
"""

_TORCH_DTYPES = {
    "bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64",
    "i64": "int64", "i32": "int32", "i16": "int16", "i8": "int8", "u8": "uint8",
}  # fmt: skip


class _FakeTensor:
    """What Triton's launcher reads of a tensor argument: its dtype and data_ptr()."""

    def __init__(self, dtype, ptr: int):
        self.dtype, self._ptr = dtype, ptr

    def data_ptr(self) -> int:
        return self._ptr


def _triton_spec(backend_cls):
    """launch_table.specialize, checked against Triton's own launch-time specialisation."""
    import torch

    try:
        from triton._C.libtriton import native_specialize_impl
    except ImportError:  # pragma: no cover - older triton: the table's mirror alone
        return lt.specialize

    def spec(value):
        if isinstance(value, lt.Tensor):
            arg = _FakeTensor(getattr(torch, _TORCH_DTYPES[value.dtype]), 256 if value.aligned else 258)
        else:
            arg = value
        kind, special = native_specialize_impl(backend_cls, arg, False, True, True)[:2]
        if (kind, special) != lt.specialize(value):
            raise RuntimeError(
                f"launch_table.specialize({value!r}) = {lt.specialize(value)}, triton says {(kind, special)}"
            )
        return kind, special

    return spec


_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """REG / STACK / SHARED / LOCAL of the cubin's kernel, from ``cuobjdump -res-usage``."""
    import triton

    try:
        tool = triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # pragma: no cover
        tool = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    match = _RES.search(out)
    if match is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage:\n{out}")
    return {"regs": int(match[2]), "stack": int(match[3]), "shared": int(match[4]), "local": int(match[5])}


def _compile_one(job: dict, cache: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, cfg, cc = job["kernel"], dict(map(tuple, job["values"])), TARGETS[job["target"]]
    k = lt.KERNELS[name]
    fn = getattr(importlib.import_module(f"prorank_fast.kernels.{k.module}"), k.fn)
    target = GPUTarget("cuda", cc, 32)
    if cc not in cache:
        backend = triton.compiler.compiler.make_backend(target)
        cache[cc] = (backend, _triton_spec(type(backend)))
    backend, spec = cache[cc]
    signature, constexprs, attrs = lt.compile_args(name, cfg, list(fn.arg_names), spec=spec)
    attrs = {key: backend.parse_attr(value) for key, value in attrs.items()}
    start = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=target,
        options=k.options(),
    )
    seconds = time.perf_counter() - start
    usage = resource_usage(compiled.asm["cubin"])
    usage["shared"] += int(getattr(compiled.metadata, "shared", 0) or 0)
    return {**usage, "seconds": round(seconds, 3), "num_warps": k.num_warps}


def _worker() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else prints goes to stderr, not into the protocol
    cache: dict = {}
    for line in sys.stdin:
        job = json.loads(line)
        try:
            out = _compile_one(job, cache)
        except Exception as exc:  # a configuration that cannot be built: report it, keep going
            message = f"{type(exc).__name__}: {exc}".strip()
            out = {"error": message[-3000:], "num_warps": lt.KERNELS[job["kernel"]].num_warps}
        proto.write(json.dumps(out) + "\n")
        proto.flush()
