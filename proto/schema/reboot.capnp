# rebootd: the single authority for the next-boot mode (docs/updates/bootctl.md).
#
# Served by `rebootd` on the virtio-serial port `com.nexus.reboot` (host socket
# build/qemu/reboot.sock) and on the guest-local unix socket /run/rebootd.sock.
#
# The persisted record is the file STATE/boot/next_mode with the content
# "normal\n" or "recovery\n" (one-shot: recovery-init consumes it). The factory
# wipe request is the file STATE/boot/factory_wipe with the content "wipe\n";
# recovery-init removes it only after the wipe is complete.
# Changing this file: run `cargo xtask codegen` and commit proto/src/rpc/.

@0x8c71b734ae1c796b;

# The next-boot mode (nx_contract::NextBoot); recorded as "normal\n" / "recovery\n".
# An enumerant this build does not know is refused with an error.
enum BootTarget {
  normal @0;
  recovery @1;
}

interface Reboot {
  # Persist the next-boot record `target` and reboot
  # the guest (SIGTERM to PID 1). The reply is sent before the reboot starts.
  # `rebooting` is false only where no real reboot is possible (rebootd not
  # managed by our PID 1, e.g. host-run tests: the `(stub)` case).
  # Fails without rebooting when the record cannot be persisted.
  mode @0 (target :BootTarget) -> (rebooting :Bool);

  # The persisted record as it is now: `hasTarget` is false when there is none
  # (then `target` means nothing). `persistent` is false when rebootd runs
  # without /state (RAM-only stub).
  pending @1 () -> (target :BootTarget, factoryWipe :Bool, persistent :Bool, hasTarget :Bool);

  # Persist the next-boot record without rebooting (the flow sets the mode and
  # reboots later; the selftest checks the flag).
  setNext @2 (target :BootTarget) -> ();

  # Record a factory-wipe request (STATE/boot/factory_wipe), set the next boot
  # to recovery and reboot. recovery-init performs the wipe (nx-reset) before it
  # starts any service, and removes the request only when the wipe is complete.
  factoryWipe @3 () -> (rebooting :Bool);

  # The factory-reset plan of STATE (nx-reset plan JSON, format 1, at most
  # 384 KiB): every path under apps/content/settings a wipe would remove and
  # everything preserved, with sizes. Read only. `device` is the name the
  # operator types to confirm a reset. Fails without a persistent /state.
  resetPlan @4 () -> (json :Text, device :Text);

  # The newest diagnostics bundle STATE/recovery/diag-<n>.tar.zst (nx-diag),
  # at most 448 KiB. With `create`, a new bundle is written first (prints
  # `recovery: diag written (bytes=<n>)`). Fails when there is none.
  fetchDiag @5 (create :Bool) -> (name :Text, data :Data);

  # Remove the next-boot record: the next boot is the firmware's default
  # (normal). The selftest uses it to restore "no record".
  clearNext @6 () -> ();
}
