#!/usr/bin/env bash
# The one prepared GPU benchmark run:  bash bench/gpu.sh OUTDIR [more bench.py arguments]
#
# Writes OUTDIR/bench.md, OUTDIR/bench.json, OUTDIR/bench.log and OUTDIR/nvidia-smi.txt and
# ends within BENCH_LIMIT_S seconds (default 560, under a 10-minute device call).
# Installs nothing from the internet (the GPU machine has no network). It needs a Python
# whose torch sees CUDA: $PYTHON, else the repo's .venv, else python3. SimpleITK (needed)
# and MONAI (for the baseline) come from that Python or from wheel files in $WHEELS
# (default: .whl, then bench/wheels), installed into a temporary folder; see bench/README.md.
# BENCH_DEVICE=cpu runs the same script on a CPU (a smoke test of the script itself).
set -u -o pipefail

OUT=${1:?usage: bash bench/gpu.sh OUTDIR [bench.py arguments]}
shift
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LIMIT=${BENCH_LIMIT_S:-560}
BUDGET=$((LIMIT - 60))  # bench.py stops starting configurations after this; the rest is slack
DEVICE=${BENCH_DEVICE:-cuda}
LOG="$OUT/bench.log"
: >"$LOG"
say() { echo "[gpu.sh] $*" | tee -a "$LOG" >&2; }

. bench/lib.sh
if ! find_python; then
    say "no Python with a torch that sees CUDA (tried \$PYTHON, .venv/bin/python, python3, python)"
    exit 2
fi
say "python: $(command -v "$PY") ($("$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'))"
install_wheels
if ! has SimpleITK; then
    say "SimpleITK is missing and no wheel was found; prepare one as bench/README.md says (.whl/)"
    exit 2
fi
EXTRA=()
if ! has monai; then
    say "MONAI is missing: running without the MONAI baseline (add its wheel to .whl/ for the ratio)"
    EXTRA+=(--no-monai)
fi

command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

export PYTHONUNBUFFERED=1
timeout -k 10 "$LIMIT" "$PY" bench/bench.py --out "$OUT" --device "$DEVICE" --budget "$BUDGET" \
    --child-timeout 240 "${EXTRA[@]}" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 124 ] && say "stopped at the ${LIMIT} s limit; bench.json holds what finished"
exit "$rc"
