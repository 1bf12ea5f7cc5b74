#!/usr/bin/env bash
# Set up (scripts/setup.sh) and open napari with the napari-dca widgets docked, a sample H&E image
# and the default "nuclei" checkpoint selected. Without a display it runs under Xvfb (useful only
# for checks: `bash scripts/launch.sh --screenshot out.png` saves a screenshot and quits).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
if [ -n "${DISPLAY:-}" ]; then
  exec $PY -m napari_dca.launch "$@"
else
  echo "launch: no display found; running napari under Xvfb"
  exec xvfb-run -a -s "-screen 0 1600x1000x24" $PY -m napari_dca.launch "$@"
fi
