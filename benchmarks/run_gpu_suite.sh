#!/usr/bin/env bash
# Run the GPU suite on a lent H100/H200 (no network there; liger-kernel is not installed), once.
#
#   bash benchmarks/run_gpu_suite.sh              # the whole suite: done within 350 s of this script's start
#   bash benchmarks/run_gpu_suite.sh --quick      # checks, fused GRPO (ours), stage-2 step: within 170 s
#   bash benchmarks/run_gpu_suite.sh [gpu_suite flags...]
#
# Every wheel in .whl/ (a gitignored folder carried with the checkout; benchmarks/README.md says how
# to fill it: liger-kernel's) is installed into /tmp/prorank-site without dependencies (torch and
# triton come from the machine) and put on PYTHONPATH; without one the Liger rows read
# "skipped: not carried" and everything else runs. prorank_fast needs no install:
# benchmarks/_common.py loads kernels/ as prorank_fast.kernels.
#
# Time: the install steps and the suite share one deadline (PRORANK_SUITE_DEADLINE_S, default 350 s,
# 170 s with --quick): the suite runs under `timeout` with what is left of it. Inside, no row starts
# after --budget-s and a part that overruns is killed (gpu_suite.py), so the outer timeout is only a
# backstop; either way the report already holds every finished row (rewritten after each one).
# The log goes to $OUT/gpu_suite.log when $OUT is set (the device tool brings $OUT back), and the
# report lands in benchmarks/results/ and in $OUT.
set -uo pipefail
START=$SECONDS
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
SITE="${PRORANK_SITE:-/tmp/prorank-site}"
DEADLINE=350
for arg in "$@"; do
    if [ "$arg" = "--quick" ]; then DEADLINE=170; fi
done
DEADLINE="${PRORANK_SUITE_DEADLINE_S:-$DEADLINE}"
if command -v timeout >/dev/null 2>&1; then HAVE_TIMEOUT=1; else HAVE_TIMEOUT=0; fi

shopt -s nullglob
wheels=(.whl/*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -gt 0 ]; then
    install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}")
    if [ "$HAVE_TIMEOUT" = 1 ]; then install=(timeout 60 "${install[@]}"); fi
    if "${install[@]}"; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "run_gpu_suite: installed ${wheels[*]} into $SITE ($((SECONDS - START)) s)"
    else
        echo "run_gpu_suite: could not install ${wheels[*]}; rows that need them will be skipped" >&2
    fi
else
    echo "run_gpu_suite: no wheel in .whl/: the Liger rows will read \"skipped: not carried\" (benchmarks/README.md)"
fi

export PYTHONUNBUFFERED=1
LEFT=$((DEADLINE - (SECONDS - START)))
if [ "$LEFT" -lt 30 ]; then LEFT=30; fi
cmd=("$PY" -m benchmarks.gpu_suite "$@")
if [ "$HAVE_TIMEOUT" = 1 ]; then
    # SIGTERM to the suite's processes at the deadline (the parent then writes the report), SIGKILL 5 s later
    cmd=(timeout --kill-after=5 "$LEFT" "${cmd[@]}")
fi
LOG="${OUT:+$OUT/gpu_suite.log}"
if [ -n "$LOG" ]; then
    "${cmd[@]}" 2>&1 | tee "$LOG"
    rc=${PIPESTATUS[0]}
else
    "${cmd[@]}"
    rc=$?
fi
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "run_gpu_suite: stopped at its ${DEADLINE} s deadline; the report holds every row finished before" >&2
fi
echo "run_gpu_suite: exit $rc after $((SECONDS - START)) s"
exit "$rc"
