#!/usr/bin/env bash
# The main job on the embedded default: start the stack, upload a qcow2 OS image and a raw
# DATABLOCK (both generated here), list them. The stack keeps running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
hcx=.venv/bin/hcx-image
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

$hcx up

# A qcow2 OS disk with some data written into it, and a raw data disk.
qemu-img create -q -f qcow2 "$work/demo-os.qcow2" 2G
qemu-io -c "write -P 0x42 0 8M" "$work/demo-os.qcow2" >/dev/null
head -c 32M /dev/urandom > "$work/demo-data.raw"

suffix=$(date +%Y%m%d-%H%M%S)
$hcx create --name "demo-os-$suffix" --type OS --path "$work/demo-os.qcow2" --driver qcow2 --wait
$hcx create --name "demo-data-$suffix" --type DATABLOCK --path "$work/demo-data.raw" --driver raw --wait
$hcx list
echo
echo "The embedded stack keeps running (data under \${HCX_HOME:-~/.hcx-images}); '.venv/bin/hcx-image down' stops it."
