#!/usr/bin/env bash
# Self-training seeds and two variants in one call of the lent GPU machine (issue 4, point 5;
# JOURNAL.md of this folder, "Fourteenth run").
#   here:  python bench/pack_zenodo.py ../shared/data/zenodo20/zenodo20_dev.npz .device-data/zenodo_every2.npz --every 2
#   there (carry .device-data/zenodo_every2.npz):  LIMIT_S=475 bash experiments/weak_supervision/gpu_selftrain.sh
# WORK (default /tmp/stwork) must be a fresh folder: finished stages found there count as done.
# Training stops RESERVE_S (default 45) before LIMIT_S, so that scoring and packing fit.
# Every run has the sixth run's settings (128-px crops, batch 8, CE + Dice, level 1 3,000
# steps at 9.8e-4, level 2 500 steps at 9.8e-5 with two layers frozen) on every 2nd slice of
# each COVID-19-CT-Seg volume (619 slices: the whole set and SimpleITK do not fit in the
# 64 MiB that travel, so simpleitk_stub.py, put in place as the package SimpleITK in a temporary
# folder on PYTHONPATH, stands in for SimpleITK when it is missing):
#  s<k>  `selftrain --seed k` for each k in SEEDS; level 0 is made once (s<first>) and copied;
#  ba    "born again": s<first>'s level 1, then level 2 unfrozen at level 1's rate for BA_EPOCHS
#        (default: as long as level 1; 0: no such run);
#  ens   weak_band.py: level 2 from s<first>'s level 1, taught the argmax of the mean
#        probabilities of every seed's level 1.
# Each level's labels are scored against the expert masks (`evaluate`, by group) on the
# machine; labels, scores, logs and state files come back in results.tgz (split at 15 MiB).
set -u
T0=$(date +%s)
LIMIT=${LIMIT_S:-475}
RESERVE=${RESERVE_S:-45}
OUTD=${OUT:-/tmp/devout}
W=${WORK:-/tmp/stwork}
D=${DATA:-.device-data/zenodo_every2.npz}
SEEDS=${SEEDS:-"0 1 2 3"}
L1_EPOCHS=${L1_EPOCHS:-60}; L2_EPOCHS=${L2_EPOCHS:-10}; BA_EPOCHS=${BA_EPOCHS:-$L1_EPOCHS}; STEPS=${STEPS:-50}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
HERE=experiments/weak_supervision
cd "$(dirname "$0")/../.." || exit 2
mkdir -p "$OUTD" "$W"
if ! "$PY" -c "import SimpleITK" 2>/dev/null; then
    STUB=$(mktemp -d /tmp/sitk-stub.XXXXXX) && mkdir "$STUB/SimpleITK" && cp "$HERE/simpleitk_stub.py" "$STUB/SimpleITK/__init__.py"
    export PYTHONPATH="$STUB"
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
P="$PY -m DRSegUNetLib"
COMMON="--base-filters 16 --crop 128 --batch-size 8 --steps-per-epoch $STEPS --loss ce+dice --level1-lr 9.8e-4
        --level1-epochs $L1_EPOCHS --level2-epochs $L2_EPOCHS --level2-lr 9.8e-5 --device $DEVICE --threads 2"
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( LIMIT - RESERVE - $(el) )); }   # seconds left for training
run_left() { local t; t=$(left); [ "$t" -gt 0 ] || { log "no time left for: $*"; return 124; }; timeout "$t" "$@"; }
# The same for a job put in the background with &: its subshell becomes `timeout`, so that the
# trap's kill reaches it (timeout passes the signal on to the job).
bg_left() { local t; t=$(left); [ "$t" -gt 0 ] || { log "no time left for: $*"; exit 124; }; exec timeout "$t" "$@"; }
log() { echo "[gpu_selftrain $(el)s] $*" | tee -a "$W/steps.txt"; }
pack() {
    (cd "$W" && tar czf "$OUTD/results.tgz" --exclude='*.pt' . )
    if [ "$(stat -c %s "$OUTD/results.tgz")" -gt 15728640 ]; then
        split -b 15M -d "$OUTD/results.tgz" "$OUTD/results.tgz." && rm "$OUTD/results.tgz"
    fi
    echo "[gpu_selftrain] packed at $(el)s"
}
trap 'kill $(jobs -p) 2>/dev/null; pack' EXIT
has_stage() {  # stage $2 finished in run folder $1
    "$PY" -c 'import json, sys; sys.exit(sys.argv[2] not in json.load(open(sys.argv[1]))["stages"])' \
        "$1/state.json" "$2" 2>/dev/null; }
wait_stage() { while ! has_stage "$1" "$2"; do
    [ "$(left)" -le 0 ] && return 1; kill -0 "$3" 2>/dev/null || return 1; sleep 2; done; }

"$PY" -c "import sys, torch, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '', 'numpy', numpy.__version__)" | tee "$W/env.txt"
set -- $SEEDS
[ $# -ge 1 ] || { log "SEEDS is empty"; exit 2; }
FIRST=$1
declare -A PID
log "s$FIRST: level 0, then levels 1-2"
bg_left $P selftrain "$D" --out "$W/s$FIRST" $COMMON --seed "$FIRST" >"$W/s$FIRST.log" 2>&1 &
PID[$FIRST]=$!
wait_stage "$W/s$FIRST" level0 "${PID[$FIRST]}" || { log "level 0 did not finish"; exit 1; }
for s in "${@:2}"; do
    mkdir -p "$W/s$s" && cp -r "$W/s$FIRST/level0" "$W/s$FIRST/state.json" "$W/s$s/"
    log "s$s: levels 1-2 (level 0 copied)"
    bg_left $P selftrain "$D" --out "$W/s$s" $COMMON --seed "$s" >"$W/s$s.log" 2>&1 &
    PID[$s]=$!
done
BA=
if [ "$BA_EPOCHS" -gt 0 ] && wait_stage "$W/s$FIRST" level1 "${PID[$FIRST]}"; then
    mkdir -p "$W/ba" && cp -r "$W/s$FIRST/level0" "$W/s$FIRST/level1" "$W/s$FIRST/state.json" "$W/ba/"
    log "ba: level 2 unfrozen at 9.8e-4 for $BA_EPOCHS epochs (level 1 copied from s$FIRST)"
    bg_left $P selftrain "$D" --out "$W/ba" $COMMON --seed "$FIRST" --frozen-layers 0 \
        --level2-lr 9.8e-4 --level2-epochs "$BA_EPOCHS" >"$W/ba.log" 2>&1 &
    BA=$!
fi
ENS=()
for s in "$@"; do wait_stage "$W/s$s" level1 "${PID[$s]}" && ENS+=("$W/s$s/level1/best.pt"); done
if [ "${#ENS[@]}" -ge 2 ]; then
    log "ens: level 2 on the mean of ${#ENS[@]} level-1 models"
    run_left env OMP_NUM_THREADS=4 "$PY" "$HERE/weak_band.py" "$D" "${ENS[@]:0:1}" --ensemble "${ENS[@]:1}" \
        --out "$W/ens" --unsure-below 0 --epochs "$L2_EPOCHS" --steps-per-epoch "$STEPS" --device "$DEVICE" \
        >"$W/ens.log" 2>&1
    log "ens: rc $?"
fi
for s in "$@"; do wait "${PID[$s]}"; log "s$s: rc $?"; done
[ -n "$BA" ] && { wait "$BA"; log "ba: rc $?"; }

score() {  # labels file, json name; within the reserve
    local t=$(( LIMIT - 10 - $(el) )); [ "$t" -gt 60 ] && t=60
    [ -f "$1" ] && [ "$t" -gt 0 ] && timeout "$t" $P evaluate "$D" --predictions "$1" --by-group --json "$W/eval/$2.json" >/dev/null 2>>"$W/eval/errors.txt"
}
mkdir -p "$W/eval"
score "$W/s$FIRST/level0/labels.npz" level0
for s in "$@"; do for k in 1 2; do score "$W/s$s/level$k/labels.npz" "s${s}_level$k"; done; done
score "$W/ba/level2/labels.npz" ba_level2
score "$W/ens/level1_labels.npz" ens_level1
score "$W/ens/labels.npz" ens_level2
"$PY" - "$W/eval" <<'PYEOF' | tee "$W/eval/summary.txt"
import json, sys
from pathlib import Path
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    m = json.loads(f.read_text())["metrics"]
    i, l = m["infection"]["mean"], m["lung"]["mean"]
    print(f"{f.stem:14s} infection {i['dice']:.3f} (precision {i['precision']:.3f}, recall {i['recall']:.3f})"
          f"  lung {l['dice']:.3f}")
PYEOF
log "done"
