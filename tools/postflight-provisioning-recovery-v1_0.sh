#!/usr/bin/env bash
# Postflight of nexus provisioning & recovery v1.0: the full marker contract in QEMU.
#
# Builds the guest once (`cargo xtask guest`), then through scripts/qemu-test.sh:
#   * every marker profile of qemu/markers.toml (recovery and normal boots, without disks,
#     the recovery shell, power-off, and both selftest profiles with nexus.selftest=1);
#   * the e2e scenarios: the flash flows (flash, cut + resume, power cut + resume), the A/B
#     update flows (update, rollback, update-powercut), the factory reset (reset,
#     reset-powercut), the recovery console (recovery-console) and two guests flashed at once
#     (fanout).
# Each run's console is kept under build/postflight/. Afterwards the consoles are checked
# again for the issue-6 contract: every SELFTEST marker (recovery and normal), the wipe
# markers, and no `SELFTEST: … FAILED`.
#
# Exits 0 only when every run passed and every marker was seen; non-zero on any miss.
#
#   tools/postflight-provisioning-recovery-v1_0.sh
#   PROFILES="recovery-selftest normal-selftest" SCENARIOS="reset" tools/postflight-…sh
#   NO_BUILD=1 tools/postflight-provisioning-recovery-v1_0.sh   # use the build/ as it is
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out="$root/build/postflight"
mkdir -p "$out"
rm -f "$out"/*.log

all_profiles=$(sed -n 's/^\[profile\.\([A-Za-z0-9_-]*\)\]$/\1/p' qemu/markers.toml)
PROFILES=${PROFILES-$all_profiles}
SCENARIOS=${SCENARIOS-"flash flash-cut-resume flash-powercut-resume update rollback update-powercut reset reset-powercut reset-normal-guard recovery-console fanout"}

failed=()
results=()
t_all=$SECONDS

if [[ "${NO_BUILD:-}" != 1 ]]; then
    echo "== postflight: guest build"
    if ! cargo xtask guest >"$out/guest-build.log" 2>&1; then
        tail -40 "$out/guest-build.log"
        echo "postflight: FAILED: the guest build failed (see $out/guest-build.log)" >&2
        exit 1
    fi
fi

run() { # name, console log to keep, command...
    local name=$1 console=$2
    shift 2
    local t0=$SECONDS
    echo "== postflight: $name"
    if "$@" >"$out/$name.run.log" 2>&1; then
        results+=("ok    $(printf '%4d' $((SECONDS - t0))) s  $name")
    else
        results+=("FAIL  $(printf '%4d' $((SECONDS - t0))) s  $name")
        failed+=("$name")
        tail -50 "$out/$name.run.log"
    fi
    cp "$console" "$out/$name.console.log" 2>/dev/null || true
}

for p in $PROFILES; do
    run "profile-$p" "build/qemu/console.log" \
        env PROFILE="$p" RUN_UNTIL_MARKER=1 RUN_TIMEOUT=120s scripts/qemu-test.sh --no-build
done
for s in $SCENARIOS; do
    run "e2e-$s" "build/e2e/$s/qemu/console.log" \
        env SCENARIO="$s" scripts/qemu-test.sh --no-build
done

# The issue-6 contract, read again from the kept consoles.
need() { # console name, marker...
    local log="$out/$1.console.log"
    shift
    local m
    for m in "$@"; do
        if [[ ! -f "$log" ]] || ! grep -qF -- "$m" "$log"; then
            echo "[error] Missing marker: $m (in ${log#"$root"/})" >&2
            failed+=("marker '$m' in ${log##*/}")
        fi
    done
}
is_on() { [[ " $1 " == *" $2 "* ]]; }

if is_on "$PROFILES" recovery-selftest; then
    need profile-recovery-selftest \
        "SELFTEST: recovery boot ok" "recovery: diag written (bytes=" "SELFTEST: recovery diag ok" \
        "SELFTEST: reset dry-run ok" "SELFTEST: flash receive ok" \
        "SELFTEST: flash reboot flag ok" "SELFTEST: bootctl api ok"
fi
if is_on "$PROFILES" normal-selftest; then
    need profile-normal-selftest \
        "SELFTEST: recovery diag ok" "SELFTEST: reset dry-run ok" \
        "SELFTEST: flash receive stub/placeholder" "SELFTEST: flash reboot flag ok" \
        "SELFTEST: bootctl api ok" "init: confirmed slot="
fi
for s in reset reset-powercut; do
    if is_on "$SCENARIOS" "$s"; then
        need "e2e-$s" "nx: reset factory wipe start" "nx: reset factory wipe done" "init: ready"
    fi
done
if is_on "$SCENARIOS" recovery-console; then
    need e2e-recovery-console "recovery-sh: error: unknown command 'sh'" \
        "recovery-sh: error: line longer than 256 bytes" "recovery: diag written (bytes="
fi
if grep -lE "SELFTEST: .* FAILED" "$out"/*.console.log 2>/dev/null; then
    echo "[error] a SELFTEST check FAILED (files above)" >&2
    failed+=("SELFTEST FAILED")
fi
if grep -l "recovery: diag written (bytes=0)" "$out"/*.console.log 2>/dev/null; then
    echo "[error] an empty diag bundle was written with /state attached (files above)" >&2
    failed+=("diag bytes=0")
fi

echo
echo "== postflight summary ($((SECONDS - t_all)) s; consoles in ${out#"$root"/})"
printf '  %s\n' "${results[@]}"
if ((${#failed[@]})); then
    echo "postflight: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "postflight: all ${#results[@]} runs passed, every marker seen"
