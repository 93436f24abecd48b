# nexus provisioning & recovery — every recipe only wraps `cargo xtask` (see xtask/) or a
# script that does (tools/).
# `just` is not in Debian bookworm: `cargo install just`, or call `cargo xtask …` directly.

# List the recipes.
default:
    @just --list

# Build kernel, static guest binaries, ramdisks, state/slot disks, demo image into build/.
guest *ARGS:
    cargo xtask guest {{ARGS}}

# Boot recovery (RECOVERY=1), flash build/nexus-os.img over virtio-serial, leave the guest up.
recovery *ARGS:
    cargo xtask recovery {{ARGS}}

# The whole story from a fresh machine: packages, guest build, boot recovery, flash.
demo *ARGS:
    cargo xtask demo {{ARGS}}

# Boot a marker profile of qemu/markers.toml and check it (PROFILE=, RECOVERY=1, RUN_TIMEOUT=, RUN_UNTIL_MARKER=1).
qemu-test *ARGS:
    cargo xtask qemu-test {{ARGS}}

# e2e scenarios in QEMU: flash, cut + resume, power cut + resume, A/B update, rollback, update power cut, factory reset (+ power cut), recovery console (`--only NAME`).
e2e *ARGS:
    cargo xtask e2e {{ARGS}}

# Everything CI runs.
ci:
    cargo xtask ci

# Postflight: the full marker contract in QEMU (every profile and e2e scenario; exit 0 = all seen).
postflight:
    tools/postflight-provisioning-recovery-v1_0.sh

# Benchmarks.
bench *ARGS:
    cargo xtask bench {{ARGS}}

# Regenerate checked-in Cap'n Proto code (`--check` fails when stale).
codegen *ARGS:
    cargo xtask codegen {{ARGS}}

# A coverage-guided fuzz campaign on stable (`just fuzz receiver --time 600`); CI replays fuzz/corpus.
fuzz *ARGS:
    cargo xtask fuzz {{ARGS}}

# Power cuts at the block layer: record paths over NBD, check crash states offline, boot a sample (`--path all --states 200 --boot 10`).
crash *ARGS:
    cargo xtask crash {{ARGS}}
