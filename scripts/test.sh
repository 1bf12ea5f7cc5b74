#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite: engine tests, then napari GUI tests under Xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -n "${DISPLAY:-}" ] && [ "${NAPARI_DCA_FORCE_XVFB:-0}" != 1 ]; then
  $PY -m pytest -q "$@"
else
  xvfb-run -a -s "-screen 0 1600x1000x24" $PY -m pytest -q "$@"
fi
