#!/usr/bin/env bash
# The prepared GPU accuracy run (issue 5):  bash bench/gpu_crossval.sh OUTDIR
#
# 1. 5-fold cross-validation (docs/crossval.md) of DRSegUNet (transposed-conv and up-sampling
#    decoders) and the MONAI U-Net at a GPU budget: STEPS steps of BATCH crops of CROP px each,
#    bf16, WORKERS crop processes; OUTDIR/crossval/summary.md is the table.
# 2. The final model: the bundled model's recipe (scripts/train_bundled.sh, issue 21) on all the
#    data, with FINAL_BATCH (16) crops a step instead of the CPU's 8 and FINAL_STEPS1 /
#    FINAL_STEPS2 / FINAL_STEPS3 (5000 / 2800 / 1000) steps, exported as OUTDIR/final/drsegunet_level1.pt (fp16);
#    OUTDIR/settings.json records the run. CV=0 skips the cross-validation and gives the
#    final model the whole limit.
# Everything stops at LIMIT_S seconds (default 560, under a 10-minute device call); the
# cross-validation resumes where it stopped when run again with the same OUTDIR.
#
# Env: PYTHON (a Python whose torch sees CUDA; default .venv/bin/python, then python3),
#      MEDSEG (default ../shared/data/medseg/train50), ZENODO (default
#      ../shared/data/zenodo20/zenodo20_dev.npz), STEPS (800), BATCH (16), CROP (256),
#      WORKERS (8), MODELS (drsegunet,monai-unet,drsegunet-upsample), LIMIT_S (560),
#      DEVICE (cuda; "cpu" with tiny STEPS is a smoke test of this script), CV (1),
#      FINAL_BATCH, FINAL_STEPS1, FINAL_STEPS2, FINAL_STEPS3 (and EPOCH_STEPS, passed on to
#      train_bundled.sh: with CV=0 and tiny steps on the CPU, Testing/test_scripts.py's smoke test).
# Measured on an NVIDIA H200 (docs/crossval.md, "First GPU run"): 21 s per DRSegUNet fold at 800
# steps, 55 s at 2,000. On the lent machine, see bench/device_pack.sh and bench/device_run.sh.
set -u -o pipefail

OUT=${1:?usage: bash bench/gpu_crossval.sh OUTDIR}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
LIMIT=${LIMIT_S:-560}
DEVICE=${DEVICE:-cuda}
MEDSEG=${MEDSEG:-../shared/data/medseg/train50}
ZENODO=${ZENODO:-../shared/data/zenodo20/zenodo20_dev.npz}
STEPS=${STEPS:-800}
BATCH=${BATCH:-16}
CROP=${CROP:-256}
WORKERS=${WORKERS:-8}
MODELS=${MODELS:-drsegunet,monai-unet,drsegunet-upsample}
CV=${CV:-1}
FINAL_BATCH=${FINAL_BATCH:-16}
FINAL_STEPS1=${FINAL_STEPS1:-5000}
FINAL_STEPS2=${FINAL_STEPS2:-2800}
FINAL_STEPS3=${FINAL_STEPS3:-1000}
LOG="$OUT/run.log"
START=$(date +%s)
say() { echo "[gpu_crossval] $*" | tee -a "$LOG" >&2; }
left() { echo $((LIMIT - ($(date +%s) - START))); }

. bench/lib.sh
find_python || { say "no Python with a torch that sees CUDA (set PYTHON)"; exit 2; }
install_wheels
has SimpleITK || { say "SimpleITK is missing and no wheel was found; prepare one as bench/README.md says (.whl/)"; exit 2; }
if ! has monai && [[ ",$MODELS," == *",monai-unet,"* ]]; then
    say "MONAI is missing and no wheel was found: the monai-unet folds will fail (add its wheel to .whl/)"
fi
for f in "$MEDSEG" "$ZENODO"; do [ -e "$f" ] || { say "missing data: $f (set MEDSEG / ZENODO)"; exit 2; }; done
say "python $(command -v "$PY"); device $DEVICE; steps $STEPS x batch $BATCH x crop $CROP; models $MODELS; limit ${LIMIT}s"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1

if [ $((STEPS % 100)) -eq 0 ] && [ "$STEPS" -gt 100 ]; then
    EPOCHS=$((STEPS / 100)); SPE=100
else
    EPOCHS=1; SPE=$STEPS  # exactly STEPS steps either way
fi
COMMON=(--epochs "$EPOCHS" --steps-per-epoch "$SPE" --batch-size "$BATCH" --crop "$CROP" --loss ce+dice
        --lr 1e-3 --lr-schedule cosine --workers "$WORKERS" --device "$DEVICE")
export PYTHONUNBUFFERED=1

rc=0
if [ "$CV" != 0 ]; then
    # Leave time for the final model: the cross-validation gets 70 % of what is left.
    CV_LIMIT=$(( $(left) * 70 / 100 ))
    say "cross-validation, at most ${CV_LIMIT}s"
    timeout -k 10 "$CV_LIMIT" "$PY" -m DRSegUNetLib crossval "$MEDSEG" "$ZENODO" --out "$OUT/crossval" \
        --models "$MODELS" "${COMMON[@]}" >>"$LOG" 2>&1
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        say "cross-validation stopped at its limit; finished folds are in $OUT/crossval (rerun to resume)"
    fi
    [ -f "$OUT/crossval/summary.md" ] && cp "$OUT/crossval/summary.md" "$OUT/crossval_summary.md"
fi

FINAL_LIMIT=$(( $(left) - 20 ))
if [ "$FINAL_LIMIT" -lt 30 ]; then
    say "no time left for the final model"
    exit "$rc"
fi
say "final model on all the data (the bundled model's recipe), at most ${FINAL_LIMIT}s"
PYTHON="$PY" MEDSEG="$MEDSEG" ZENODO="$ZENODO" SPLIT="" DEVICE="$DEVICE" WORKERS="$WORKERS" \
    BATCH="$FINAL_BATCH" STEPS1="$FINAL_STEPS1" STEPS2="$FINAL_STEPS2" STEPS3="$FINAL_STEPS3" LIMIT_S="$FINAL_LIMIT" \
    bash scripts/train_bundled.sh "$OUT/final" >>"$LOG" 2>&1
rc2=$?
[ "$rc2" -ne 0 ] && say "final training ended with rc $rc2; the stages that finished are kept in $OUT/final (rerun to continue)"
echo "{\"cv\": \"$CV\", \"steps\": $STEPS, \"batch\": $BATCH, \"crop\": $CROP, \"workers\": $WORKERS, \"models\": \"$MODELS\", \"device\": \"$DEVICE\", \"final_batch\": $FINAL_BATCH, \"final_steps\": [$FINAL_STEPS1, $FINAL_STEPS2, $FINAL_STEPS3], \"seconds\": $(( $(date +%s) - START ))}" >"$OUT/settings.json"
say "done in $(( $(date +%s) - START ))s (crossval rc $rc, final rc $rc2)"
[ "$rc" -eq 0 ] && exit "$rc2"
exit "$rc"
