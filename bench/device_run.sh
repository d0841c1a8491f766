#!/usr/bin/env bash
# The prepared call on the lent GPU machine (after bench/device_pack.sh; carry .device-data):
#   TOTAL_S=550 CV_LIMIT=390 bash bench/device_run.sh 2>&1 | tee $OUT/run_out.txt
#   (issue 21's all-data model in the bundled model's recipe, alone:
#    CV=0 TOTAL_S=560 CV_LIMIT=540 bash bench/device_run.sh; every K-th COVID-19-CT-Seg slice
#    travels, K in .device-data/zenodo_subset.txt)
#  1. bench/gpu_crossval.sh (cross-validation folds, then the all-data model) on train50 and
#     every K-th COVID-19-CT-Seg slice (device_pack.sh); MODELS, STEPS, ... pass through to it;
#  2. bench/gpu.sh (issue 6's benchmark) with the time left of TOTAL_S, if 70 s or more;
#  3. everything but checkpoints and arrays packed into $OUT/results.tgz (the tool returns
#     files at most two folders down), the exported all-data model beside it.
set -u
T0=$(date +%s)
TOTAL=${TOTAL_S:-550}
OUTD=${OUT:-/tmp/devout}
W=${WORK:-/tmp/devwork}
mkdir -p "$OUTD"; rm -rf "$W"; mkdir -p "$W"
cd "$(dirname "$0")/.." || exit 2
el() { echo $(( $(date +%s) - T0 )); }
pack() {
    tar czf "$OUTD/results.tgz" -C "$W" --exclude='*.pt' --exclude='*.npz' . 2>/dev/null
    [ -f "$W/gc/final/drsegunet_level1.pt" ] && cp "$W/gc/final/drsegunet_level1.pt" "$OUTD/"
    echo "[device_run] packed at $(el)s"
}
trap pack EXIT
if [ "${SKIP_SITK:-0}" != 1 ]; then
    mkdir -p /tmp/site && tar xJf .device-data/sitk.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
fi
export PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
"$PYTHON" -c "import sys, torch, SimpleITK, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'SimpleITK', SimpleITK.__version__, 'numpy', numpy.__version__)" 2>&1 | tee "$W/env.txt"
cat .device-data/zenodo_subset.txt 2>/dev/null | tee -a "$W/env.txt"  # which COVID-19-CT-Seg slices travelled

MEDSEG=.device-data/train50 ZENODO=.device-data/zenodo_subset.npz MODELS=${MODELS:-drsegunet} \
    LIMIT_S=${CV_LIMIT:-390} bash bench/gpu_crossval.sh "$W/gc"
echo "[device_run] gpu_crossval rc $? at $(el)s"
[ -f "$W/gc/crossval/summary.md" ] && cat "$W/gc/crossval/summary.md"

LEFT=$(( TOTAL - $(el) - 15 ))
if [ "$LEFT" -ge 70 ]; then
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words
    BENCH_LIMIT_S=$LEFT bash bench/gpu.sh "$W/bench" --no-monai --sizes 300 --finetune 10 ${BENCH_ARGS:-}
    echo "[device_run] gpu.sh rc $? at $(el)s"
    [ -f "$W/bench/bench.md" ] && cat "$W/bench/bench.md"
else
    echo "[device_run] no time left for gpu.sh ($LEFT s)"
fi
