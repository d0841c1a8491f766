#!/usr/bin/env bash
# Train the bundled model's recipe (issue 21; DRSegUNetLib/models/MODEL_CARD.md), in three stages:
#
#   bash scripts/train_bundled.sh OUTDIR
#
# 1. OUTDIR/stage1: from scratch, STEPS1 (5,000) steps of BATCH (8) crops of 256 px, lr 1e-3
#    with cosine decay, MedSeg crops drawn twice as often as COVID-19-CT-Seg ones,
#    cross-entropy + region Dice, a quarter of the non-lesion crops on dense lung pixels,
#    coarse zoom and strong blur, a weight average (decay 0.998), COVID-19-CT-Seg at its
#    1.5 mm pixel, bf16 autocast.
# 2. OUTDIR/stage2: from stage 1's last epoch, STEPS2 (2,800) steps at lr 3e-4, both data
#    sets drawn equally often.
# 3. OUTDIR/stage3: from stage 2's last epoch, STEPS3 (1,000) steps at lr 1e-4, adding the
#    slices without lung of data/outside_lungs/train.npz (abdomen and pelvis, every pixel
#    background), drawn a tenth as often as each of the other two data sets.
# 4. OUTDIR/drsegunet_level1.pt: stage 3's last epoch, exported in float16.
#
# A stage that finished (OUTDIR/stageN/DONE) is skipped and a stage stopped inside continues
# from its last whole epoch (train --resume, with WORKERS 0; at most EPOCH_STEPS steps are lost), so a
# run stopped anywhere goes on when called again, as if it had not stopped. On this project's 2-core
# CPU stage 1 took 1 h 51 min to 2 h 36 min, stage 2 51 to 85 min and stage 3 29 to 36 min (the slower
# with SPLIT's validation every 5 epochs, on a slower day of the machine).
#
# Env: SPLIT ("" = every slice trains, as the bundled model; a split file, e.g.
#      DRSegUNetLib/splits/default.json, gives the development twin, validated every
#      VAL_EVERY (5) epochs and scored with experiments/issue21/compare.py),
#      MEDSEG (../shared/data/medseg/train50), ZENODO (../shared/data/zenodo20/zenodo20_dev.npz),
#      OUTSIDE (data/outside_lungs/train.npz), STEPS1, STEPS2, STEPS3 (multiples of EPOCH_STEPS),
#      EPOCH_STEPS (100: steps per epoch, the unit a stopped stage loses at most; a smaller one
#      makes a smoke test, Testing/test_scripts.py), BATCH, DEVICE (cpu; cuda on a GPU machine),
#      THREADS (2), WORKERS (0), PYTHON (.venv/bin/python, then python3),
#      LIMIT_S (no limit; the seconds the whole script may take, e.g. inside a device call).
set -u -o pipefail

OUT=${1:?usage: bash scripts/train_bundled.sh OUTDIR}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SPLIT=${SPLIT-}
MEDSEG=${MEDSEG:-../shared/data/medseg/train50}
ZENODO=${ZENODO:-../shared/data/zenodo20/zenodo20_dev.npz}
STEPS1=${STEPS1:-5000}
STEPS2=${STEPS2:-2800}
STEPS3=${STEPS3:-1000}
EPOCH_STEPS=${EPOCH_STEPS:-100}
OUTSIDE=${OUTSIDE:-data/outside_lungs/train.npz}
BATCH=${BATCH:-8}
DEVICE=${DEVICE:-cpu}
THREADS=${THREADS:-2}
WORKERS=${WORKERS:-0}
VAL_EVERY=${VAL_EVERY:-5}
LIMIT=${LIMIT_S:-0}
START=$(date +%s)
say() { echo "[train_bundled] $*" | tee -a "$OUT/run.log" >&2; }
for f in "$MEDSEG" "$ZENODO" "$OUTSIDE"; do [ -e "$f" ] || { say "missing data: $f (set MEDSEG / ZENODO / OUTSIDE)"; exit 2; }; done
[[ "$EPOCH_STEPS" =~ ^[1-9][0-9]*$ ]] || { say "EPOCH_STEPS must be a positive whole number, not $EPOCH_STEPS"; exit 2; }
for n in "$STEPS1" "$STEPS2" "$STEPS3"; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] && [ $((n % EPOCH_STEPS)) -eq 0 ] \
        || { say "STEPS1, STEPS2 and STEPS3 must be positive multiples of EPOCH_STEPS ($EPOCH_STEPS), not $n"; exit 2; }
done

# The recipe; the stages differ only in extra data (EXTRA) and what follows it.
RECIPE=(--batch-size "$BATCH" --crop 256 --lr-schedule cosine --loss ce+regiondice
        --hard-negatives 0.25 --blur 0.5,2.0 --scale 0.6,1.25 --ema 0.998 --slice-pixel-mm zenodo=1.5
        --bf16 on --split "$SPLIT" --device "$DEVICE" --threads "$THREADS" --workers "$WORKERS")
[ -n "$SPLIT" ] && RECIPE+=(--val-every "$VAL_EVERY")
RESUME=(--resume)  # a stage stopped inside continues; train can resume only crops drawn in its own process
[ "$WORKERS" -gt 0 ] && RESUME=()

stage() {  # name, steps, then train's own options
    local name=$1 steps=$2; shift 2
    if [ -f "$OUT/$name/DONE" ]; then say "$name finished before; skipped"; return 0; fi
    local run=()
    if [ "$LIMIT" -gt 0 ]; then
        local left=$((LIMIT - ($(date +%s) - START) - 30))
        [ "$left" -ge 30 ] || { say "no time left for $name"; return 124; }
        run=(timeout -k 10 "$left")
    fi
    say "$name: $steps steps on $DEVICE"
    "${run[@]}" "$PY" -m DRSegUNetLib train "$MEDSEG" "$ZENODO" "${EXTRA[@]}" --out "$OUT/$name" \
        --epochs $((steps / EPOCH_STEPS)) --steps-per-epoch "$EPOCH_STEPS" "${RESUME[@]}" "${RECIPE[@]}" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] && touch "$OUT/$name/DONE"
    say "$name ended with rc $rc after $(( $(date +%s) - START )) s"
    return "$rc"
}

EXTRA=()
stage stage1 "$STEPS1" --lr 1e-3 --source-weights medseg=2,zenodo=1 --seed 0 || exit $?
stage stage2 "$STEPS2" --lr 3e-4 --source-weights medseg=1,zenodo=1 --seed 2 --init "$OUT/stage1/last.pt" || exit $?
EXTRA=("$OUTSIDE")
stage stage3 "$STEPS3" --lr 1e-4 --source-weights medseg=1,zenodo=1,outside=0.1 --seed 3 --init "$OUT/stage2/last.pt" || exit $?
"$PY" -m DRSegUNetLib export "$OUT/stage3/last.pt" "$OUT/drsegunet_level1.pt" >>"$OUT/run.log" 2>&1 || exit $?
say "exported $OUT/drsegunet_level1.pt in $(( $(date +%s) - START )) s"
