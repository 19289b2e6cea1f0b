#!/usr/bin/env bash
# Run the GPU suite on a lent H100/H200 (no network there; liger-kernel is not installed).
#
#   bash benchmarks/run_gpu_suite.sh [gpu_suite flags...]
#
# If .whl/ holds a liger-kernel wheel (carried with the checkout, see benchmarks/README.md), it is
# installed into /tmp/prorank-site without dependencies (torch and triton come from the machine)
# and put on PYTHONPATH; without it the suite still runs and marks the Liger rows as skipped.
# prorank_fast needs no install: benchmarks/_common.py loads kernels/ as prorank_fast.kernels.
# The log goes to $OUT/gpu_suite.log when $OUT is set (the device tool brings $OUT back), and the
# report lands in benchmarks/results/ and in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
SITE="${PRORANK_SITE:-/tmp/prorank-site}"

shopt -s nullglob
wheels=(.whl/liger_kernel-*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "run_gpu_suite: liger-kernel from ${wheels[*]}"
    else
        echo "run_gpu_suite: could not install ${wheels[*]}; Liger rows will be skipped" >&2
    fi
else
    echo "run_gpu_suite: no .whl/liger_kernel-*.whl; Liger rows will be skipped"
fi

export PYTHONUNBUFFERED=1
LOG="${OUT:+$OUT/gpu_suite.log}"
if [ -n "$LOG" ]; then
    "$PY" -m benchmarks.gpu_suite "$@" 2>&1 | tee "$LOG"
else
    "$PY" -m benchmarks.gpu_suite "$@"
fi
