#!/usr/bin/env bash
# Boot a marker profile in QEMU and check it (a thin wrapper over `cargo xtask qemu-test`).
#
#   RECOVERY=1 RUN_UNTIL_MARKER=1 RUN_TIMEOUT=120s scripts/qemu-test.sh
#   PROFILE=normal RUN_UNTIL_MARKER=1 scripts/qemu-test.sh
#
# PROFILE (default: recovery with RECOVERY=1, else normal), RUN_TIMEOUT (default 120s),
# RUN_UNTIL_MARKER=1 (stop once the contract is met), NX_QEMU_ECHO=1 (show the console).
# Profiles and markers: qemu/markers.toml. Console: build/qemu/console.log.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo xtask qemu-test "$@"
