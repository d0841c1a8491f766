#!/usr/bin/env bash
# Prepare .device-data/ for the lent GPU machine (this workplace's `device` tool), run on a
# machine with network:  bash bench/device_pack.sh   (about 3 minutes on 2 cores)
#
# The machine receives the repository and what is carried, 64 MiB in all, and has no SimpleITK
# and no network. SimpleITK's wheel is 52.8 MB, so it travels as its unpacked files in xz (28.2
# MB), with train50 (1.4 MB) and a subset of COVID-19-CT-Seg: every K-th slice of each volume
# (folds unchanged, since they go by volume), K from 4 up until everything fits under 64 MiB
# less MARGIN_MIB (1; room for edits made before the call). In December 2026 the repository
# (21.4 MB) left room for K = 5 (250 of 1,233 slices, 13.5 MiB); K = 4 (16.8 MiB) no longer fits. The
# subset is .device-data/zenodo_subset.npz, its K in zenodo_subset.txt. Then carry .device-data
# and run bench/device_run.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared/data}
D=.device-data
grep -qx '/.device-data/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.device-data/' >>.git/info/exclude; }
mkdir -p "$D"
rm -rf "$D/train50" "$D"/zenodo_every*.npz; cp -r "$SHARED/medseg/train50" "$D/train50"; chmod -R u+w "$D/train50"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$TMP" SimpleITK==2.5.7
mkdir "$TMP/x"; (cd "$TMP/x" && unzip -q "$TMP"/simpleitk-*.whl)
tar cf - -C "$TMP/x" . | xz -9e -T2 >"$D/sitk.tar.xz.part" && mv "$D/sitk.tar.xz.part" "$D/sitk.tar.xz"
rm -f "$D/zenodo_subset.npz"
bytes() { du -cb "$@" | tail -1 | cut -f1; }
REPO=$(git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -1 | cut -f1)
LIMIT=$((64 * 1024 * 1024 - ${MARGIN_MIB:-1} * 1024 * 1024))
ROOM=$((LIMIT - REPO - $(bytes "$D")))
echo "repository $REPO bytes, train50 and SimpleITK $(bytes "$D") bytes: $ROOM bytes left for COVID-19-CT-Seg"
"$PY" bench/pack_zenodo.py "$SHARED/zenodo20/zenodo20_dev.npz" "$D/zenodo_subset.npz" --every 4 --max-bytes "$ROOM" \
    | tee "$D/zenodo_subset.txt"
TOTAL=$((REPO + $(bytes "$D")))
echo "what travels: $TOTAL bytes of $((64 * 1024 * 1024)) (64 MiB)"
[ "$TOTAL" -le "$LIMIT" ] || { echo "error: over the limit less the margin" >&2; exit 1; }
