#!/usr/bin/env bash
# Developer loop: incremental build of tailrank._core into build/dev and a copy into python/tailrank,
# so `PYTHONPATH=python python ...` uses it. Serialized with flock (several shells may call it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
mkdir -p build/dev
exec 9>build/dev/.lock
flock 9
if [ ! -f build/dev/build.ninja ]; then
  cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v $PY)" \
    -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" >/dev/null
fi
ninja -C build/dev >/dev/null
# Replace by rename: overwriting a loaded .so in place crashes processes that use it.
for so in build/dev/_core*.so; do
  cp "$so" "python/tailrank/.$(basename "$so").tmp" && mv -f "python/tailrank/.$(basename "$so").tmp" "python/tailrank/$(basename "$so")"
done
