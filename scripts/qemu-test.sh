#!/usr/bin/env bash
# Boot a marker profile in QEMU and check it (a thin wrapper over `cargo xtask qemu-test`), or
# run an e2e scenario (`SCENARIO=<name>`: a thin wrapper over `cargo xtask e2e --only <name>`).
#
#   RECOVERY=1 RUN_UNTIL_MARKER=1 RUN_TIMEOUT=120s scripts/qemu-test.sh
#   PROFILE=normal RUN_UNTIL_MARKER=1 scripts/qemu-test.sh
#   PROFILE=recovery-selftest RUN_UNTIL_MARKER=1 scripts/qemu-test.sh --no-build
#   SCENARIO=reset scripts/qemu-test.sh --no-build
#
# PROFILE (default: recovery with RECOVERY=1, else normal), RUN_TIMEOUT (default 120s),
# RUN_UNTIL_MARKER=1 (stop once the contract is met), NX_QEMU_ECHO=1 (show the console).
# SCENARIO: one of `cargo xtask e2e`'s scenarios (flash, flash-cut-resume,
# flash-powercut-resume, update, rollback, update-powercut, reset, reset-powercut,
# recovery-console); its console is build/e2e/<name>/qemu/console.log.
# Extra arguments go to the xtask command (e.g. --no-build).
# Profiles and markers: qemu/markers.toml. Console: build/qemu/console.log.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${SCENARIO:-}" ]]; then
    if [[ -n "${PROFILE:-}" ]]; then
        echo "qemu-test.sh: set PROFILE or SCENARIO, not both" >&2
        exit 2
    fi
    extra=()
    if [[ "${NX_QEMU_ECHO:-}" == 1 ]]; then
        extra+=(--echo)
    fi
    exec cargo xtask e2e --only "$SCENARIO" "${extra[@]}" "$@"
fi
exec cargo xtask qemu-test "$@"
