"""The fused GRPO row kernel rewrites its row of logits in place with dL/dlogits right after
sweeping it. The warps of one program do not wait for each other between the sweep's last
barrier and the first gradient store, so nothing may read the row in that window: the
interpreter cannot show such a race, the compiled code can. Compiled ahead of time for a
Hopper GPU (no GPU needed): between the sweep's last barrier and the gradient-write loop
there must be no load of a logit (a bf16 load; the per-row scalars are 32/64-bit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_FLAGS = {"HAS_BIAS": False, "HAS_OLD": True, "USE_KL": True, "HAS_DELTA": False, "WRITE_GRAD": True, "BLOCK": 4096}
_POINTERS = {"logits_ptr": "*bf16", "bias_ptr": "*bf16", "tok_ptr": "*i64", "seq_ptr": "*i64"}


# Compiled in a child process: the test session runs Triton in its interpreter (conftest.py),
# whose kernels cannot be compiled.
_COMPILE = """
import inspect, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prorank_fast.kernels import grpo

flags, pointers = json.loads(sys.argv[1]), json.loads(sys.argv[2])
kernel = grpo._grpo_token_rows_kernel
signature, constexprs = {}, {}
for i, name in enumerate(inspect.signature(kernel.fn).parameters):
    if name in flags:
        signature[name], constexprs[(i,)] = "constexpr", flags[name]
    elif name.endswith("_ptr"):
        signature[name] = pointers.get(name, "*fp32")
    else:
        signature[name] = {"stride_row": "i64", "V": "i32"}.get(name, "fp32")
source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
print(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 16}).asm["ptx"])
"""


def _ptx(flags: dict) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE, json.dumps(flags), json.dumps(_POINTERS)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _loads_in_the_unguarded_window(ptx: str) -> list[str]:
    """bf16 loads after the last barrier that precedes the first bf16 store, and before the
    label that opens the loop holding that store (the gradient write)."""
    lines = ptx.splitlines()
    first_store = next(i for i, line in enumerate(lines) if "st.global.b16" in line)
    last_barrier = max(i for i, line in enumerate(lines[:first_store]) if "bar.sync" in line)
    loop_label = max(i for i, line in enumerate(lines[:first_store]) if line.startswith("$L__BB"))
    return [line.strip() for line in lines[last_barrier:loop_label] if "ld.global.b16" in line]


@pytest.mark.parametrize("has_bias", [False, True])
def test_grpo_row_kernel_reads_nothing_of_its_row_after_the_sweep(has_bias):
    ptx = _ptx({**_FLAGS, "HAS_BIAS": has_bias})
    assert "st.global.b16" in ptx and "bar.sync" in ptx  # the write and the sweep's reductions are there
    assert _loads_in_the_unguarded_window(ptx) == []
