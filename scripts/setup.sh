#!/usr/bin/env bash
# Installs everything napari-dca needs on a fresh Debian/Ubuntu machine (idempotent, quiet when done).
#   system: Xvfb + Mesa OpenGL + the X/Qt libraries napari's Qt needs (only where there is no display
#           or for the GUI tests; skipped with NAPARI_DCA_SKIP_APT=1)
#   python: torch (CPU build from the local wheel cache where there is one), then this package with
#           its napari and test extras, editable.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""; [ "$(id -u)" != 0 ] && command -v sudo >/dev/null && SUDO=sudo

if [ "${NAPARI_DCA_SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  pkgs="xvfb xauth libgl1-mesa-dri libegl1 libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1
        libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0
        libdbus-1-3 libfontconfig1"
  missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done)
  if [ -n "$missing" ]; then
    echo "setup: apt-get install $(echo $missing | tr '\n' ' ')"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi

if ! $PY -c "import torch" 2>/dev/null; then
  echo "setup: pip install torch==2.13.0 (CPU build where a local wheel exists)"
  $PY -m pip install -q torch==2.13.0
fi
# Installed, with its dependencies, from THIS checkout? (checked from / so the working directory
# cannot stand in for an install)
here=$(pwd -P)
installed=$(cd / && $PY -c "import napari, pytestqt, safetensors, onnxruntime, src_models, napari_dca, os
print(os.path.dirname(os.path.dirname(os.path.realpath(napari_dca.__file__))))" 2>/dev/null || true)
if [ "$installed" != "$here" ] || [ "${NAPARI_DCA_REINSTALL:-0}" = 1 ]; then
  echo "setup: pip install -e .[test]"
  $PY -m pip install -q -e ".[test]"
fi
