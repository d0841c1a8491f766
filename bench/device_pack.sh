#!/usr/bin/env bash
# Prepare .device-data/ for the lent GPU machine (this workplace's `device` tool), run on a
# machine with network:  bash bench/device_pack.sh   (about 3 minutes on 2 cores)
#
# The machine receives the repository and at most 64 MiB in all, and has no SimpleITK and no
# network. SimpleITK's wheel is 52.8 MB, so it travels as its unpacked files in xz (28.2 MB),
# and COVID-19-CT-Seg as every 4th slice of each volume (312 of 1,233 slices, 16.8 MiB; folds
# unchanged, since they go by volume). With train50 (1.6 MB) and the repository (14.7 MB) that
# is 61.9 MB. Then carry .device-data and run bench/device_run.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
SHARED=${SHARED:-../shared/data}
D=.device-data
grep -qx '/.device-data/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.device-data/' >>.git/info/exclude; }
mkdir -p "$D"
rm -rf "$D/train50"; cp -r "$SHARED/medseg/train50" "$D/train50"; chmod -R u+w "$D/train50"
"$PY" bench/pack_zenodo.py "$SHARED/zenodo20/zenodo20_dev.npz" "$D/zenodo_every4.npz" --every 4
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$TMP" SimpleITK==2.5.7
mkdir "$TMP/x"; (cd "$TMP/x" && unzip -q "$TMP"/simpleitk-*.whl)
tar cf - -C "$TMP/x" . | xz -9e -T2 >"$D/sitk.tar.xz.part" && mv "$D/sitk.tar.xz.part" "$D/sitk.tar.xz"
du -cb "$D" | tail -1
git ls-files -co --exclude-standard -z | xargs -0 du -cb | tail -1
