#!/usr/bin/env bash
# Build and install the optional C++ extension indis_native (kernels/csrc/, CMakeLists.txt) into .venv.
# Optional: without a C++ compiler or cmake (>= 3.18) it says why and exits 0, and indis runs without it
# (indis.kernels.native.available() is False). A build that starts and fails exits non-zero.
# Rebuilds only when kernels/csrc/, CMakeLists.txt or this script changed (stamp in .venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
skip() { echo "build_native: skipped: $1; indis works without the C++ extension"; exit 0; }

[ -x "$PY" ] || skip "no .venv (run .ci/env.sh first)"
command -v cmake >/dev/null 2>&1 || skip "no cmake on PATH"
cmake_version="$(cmake --version | head -n1 | awk '{print $3}')"
[ "$(printf '%s\n' 3.18 "$cmake_version" | sort -V | head -n1)" = 3.18 ] \
  || skip "cmake $cmake_version is older than 3.18"
cxx="${CXX:-}"
if [ -z "$cxx" ]; then
  for c in c++ g++ clang++; do
    if command -v "$c" >/dev/null 2>&1; then cxx="$c"; break; fi
  done
fi
[ -n "$cxx" ] && command -v "$cxx" >/dev/null 2>&1 || skip "no C++ compiler (c++, g++, clang++ or \$CXX)"

stamp=.venv/.indis-native-built
sources=(kernels/csrc/pyproject.toml kernels/csrc/*.cpp CMakeLists.txt .ci/build_native.sh)
want="$(cat "${sources[@]}" | sha256sum | cut -d' ' -f1)"
check='from indis.kernels.native import available; raise SystemExit(not available())'
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "$check" 2>/dev/null; then
  echo "build_native: indis_native is up to date"
  exit 0
fi
echo "build_native: building indis_native with $cxx, cmake $cmake_version"
"$PY" -m pip install --quiet "scikit-build-core>=0.10" "pybind11>=2.13"
CXX="$cxx" "$PY" -m pip install --quiet --no-build-isolation ./kernels/csrc
"$PY" -c "from indis.kernels.native import REASON, available; assert available(), REASON"
echo "$want" > "$stamp"
threading="$("$PY" -c 'import indis_native; print(indis_native.THREADING)')"
echo "build_native: installed indis_native (threads: $threading)"
