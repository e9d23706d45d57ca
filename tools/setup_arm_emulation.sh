#!/usr/bin/env bash
# Set up what running an aarch64 TVM library on this x86 machine needs, without touching dpkg's architectures:
#   - Debian's aarch64 cross compiler and qemu user-mode emulation (apt, needs root),
#   - an arm64 sysroot with Debian's python3.11 (packages downloaded for arm64 and unpacked, not installed),
#   - arm64 wheels of the pinned TVM runtime and numpy unpacked into sysroot/site.
# Usage: tools/setup_arm_emulation.sh SYSROOT_DIR   (idempotent; prints the sysroot path)
set -euo pipefail
SYSROOT=${1:?usage: setup_arm_emulation.sh SYSROOT_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$HERE/.venv/bin/python}

if ! command -v aarch64-linux-gnu-gcc >/dev/null || ! command -v qemu-aarch64-static >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static >/dev/null
fi

if [ ! -x "$SYSROOT/usr/bin/python3.11" ] || [ ! -f "$SYSROOT/.complete" ]; then
  rm -rf "$SYSROOT" "$SYSROOT.tmp"
  mkdir -p "$SYSROOT.tmp/debs" "$SYSROOT.tmp/lists/partial"
  APT=(-o APT::Architecture=arm64 -o APT::Architectures=arm64 -o "Dir::State::Lists=$SYSROOT.tmp/lists"
       -o Dir::State::Status=/dev/null -o Debug::NoLocking=1)
  apt-get "${APT[@]}" update -qq
  # python3.11 and the shared libraries it and the TVM runtime (C++) load.
  (cd "$SYSROOT.tmp/debs" && apt-get "${APT[@]}" download -qq \
     libc6 libgcc-s1 libstdc++6 libpython3.11-minimal libpython3.11-stdlib python3.11-minimal \
     libexpat1 zlib1g libffi8 libssl3 libbz2-1.0 liblzma5 libncursesw6 libtinfo6 libreadline8 \
     libsqlite3-0 libuuid1 libcrypt1 libnsl2 libtirpc3 libdb5.3 libzstd1 libgomp1)
  for deb in "$SYSROOT.tmp/debs"/*.deb; do dpkg-deb -x "$deb" "$SYSROOT.tmp/root"; done
  mv "$SYSROOT.tmp/root" "$SYSROOT"
  rm -rf "$SYSROOT.tmp"
  # The runtime's Python packages, as arm64 wheels (same pins as requirements-lock.txt).
  mkdir -p "$SYSROOT/wheels" "$SYSROOT/site"
  pins=$(grep -iE '^(apache-tvm|apache-tvm-ffi|numpy|ml[-_]dtypes|typing[-_]extensions|psutil|cloudpickle)==' \
         "$HERE/requirements-lock.txt")
  # shellcheck disable=SC2086
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 \
      --platform any --python-version 3.11 --implementation cp --abi cp311 --abi abi3 --abi none \
      -d "$SYSROOT/wheels" $pins
  for whl in "$SYSROOT/wheels"/*.whl; do "$PY" -m zipfile -e "$whl" "$SYSROOT/site"; done
  rm -rf "$SYSROOT/wheels"
  touch "$SYSROOT/.complete"
fi
echo "$SYSROOT"
