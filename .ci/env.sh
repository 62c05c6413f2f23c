#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install indis with its test, plot and export extras.
# Sourced by .ci/demo and .ci/test. On a machine without an NVIDIA GPU it pins the CPU build of torch
# (torch==2.13.0 resolves to a local CPU wheel on the project's machines) so nothing downloads several GB,
# and triton 3.6.0 (also on local disk; the kernels run in its interpreter there); with a GPU, a normal torch
# (which brings its own triton) is used. Set INDIS_TORCH to override these requirements.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ -z "${INDIS_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then INDIS_TORCH="torch"; else INDIS_TORCH="torch==2.13.0 triton==3.6.0"; fi
fi
stamp=".venv/.indis-installed"
want="$(cat pyproject.toml .ci/env.sh | sha256sum | cut -d' ' -f1) $INDIS_TORCH"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # shellcheck disable=SC2086  # INDIS_TORCH may name several requirements
  .venv/bin/python -m pip install --quiet $INDIS_TORCH
  .venv/bin/python -m pip install --quiet -e ".[test,plot,export]"
  echo "$want" > "$stamp"
fi
# Fashion-MNIST's IDX files (the Debian package dataset-fashion-mnist, ~30 MB) for the fashion testbed:
# installed where apt-get is available and we are root; its tests and commands say what is missing otherwise.
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    log="$(mktemp)"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist \
      || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }; } \
      >"$log" 2>&1 || { echo "env: installing dataset-fashion-mnist failed (Fashion-MNIST tests will skip):" >&2;
                        tail -n 5 "$log" >&2; }
    rm -f "$log"
  else
    echo "env: apt-get unavailable or not root: dataset-fashion-mnist not installed (Fashion-MNIST tests skip;" \
      "pass --data DIR with the four IDX files)" >&2
  fi
fi
# The optional C++ extension (CPU fused step): built where a compiler and cmake exist, skipped otherwise.
bash .ci/build_native.sh
