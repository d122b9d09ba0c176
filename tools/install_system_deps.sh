#!/usr/bin/env bash
# System packages edgeq's tests and targets need (Debian/Ubuntu, run as root or with sudo):
#   gcc-arm-none-eabi, libnewlib-arm-none-eabi, qemu-system-arm  -- the MCU target and its emulator
#   gcc-aarch64-linux-gnu                                         -- cross-compiling the CPU target for Arm
#   dataset-fashion-mnist                                         -- retraining the bundled CNN
#   mate-backgrounds, opencv-doc                                  -- real photos for image-model fidelity
set -euo pipefail
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
