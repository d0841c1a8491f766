# Shared by bench/gpu.sh and bench/gpu_crossval.sh (sourced from the repo root).
# The caller defines DEVICE (cuda or cpu), LOG (a log file) and say().

# Sets PY to the first of $PYTHON, .venv/bin/python, python3, python whose torch sees CUDA
# (any torch when DEVICE=cpu); returns 1 when there is none.
find_python() {
    PY=""
    for cand in "${PYTHON:-}" .venv/bin/python python3 python; do
        [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c "import sys, torch; sys.exit(0 if '$DEVICE' == 'cpu' or torch.cuda.is_available() else 1)" 2>/dev/null; then
            PY=$cand
            return 0
        fi
    done
    return 1
}

has() { "$PY" -c "import $1" 2>/dev/null; }

# SimpleITK and MONAI from wheel files ($WHEELS, .whl, bench/wheels) into a temporary folder
# on PYTHONPATH, where $PY lacks them: the GPU machine has no network.
install_wheels() {
    has SimpleITK && has monai && return 0
    for dir in "${WHEELS:-}" .whl bench/wheels; do
        [ -n "$dir" ] && [ -d "$dir" ] || continue
        wheels=$(ls "$dir"/[Ss]imple[Ii][Tt][Kk]-*.whl "$dir"/monai-*.whl 2>/dev/null)
        [ -n "$wheels" ] || continue
        SITE=$(mktemp -d /tmp/drsegunet-bench-site.XXXXXX)
        # shellcheck disable=SC2086  # one word per wheel file
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $wheels >>"$LOG" 2>&1; then
            export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
            say "installed from $dir: $(echo $wheels | xargs -n1 basename | tr '\n' ' ')"
        else
            say "could not install the wheels in $dir (see $LOG)"
        fi
        return 0
    done
}
