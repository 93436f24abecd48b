# bootctld: the single authority for A/B slot state (docs/updates/bootctl.md).
#
# Served by `bootctld` on the virtio-serial port `com.nexus.bootctl` (host
# socket build/qemu/bootctl.sock) and on the guest-local unix socket
# /run/bootctld.sock. `BootState` is also the persisted snapshot
# STATE/bootctl/state.nxs: one canonical single-segment message in the standard
# stream framing (`capnp decode bootctl.capnp BootState < state.nxs` reads it).
# Changing this file: run `cargo xtask codegen` and commit proto/src/rpc/.

@0xa6ac1dca35e46261;

enum Slot {
  a @0;
  b @1;
}

enum Health {
  empty @0;    # never imaged (or unknown content): never booted, never a rollback target
  unknown @1;  # imaged, not yet confirmed healthy
  good @2;     # confirmed healthy by a boot of it
  bad @3;      # sticky: only `slotImaged` (a re-image by flashd) clears it
}

struct SlotInfo {
  health @0 :Health;
  trial @1 :Bool;       # booting it is a trial that spends one try per boot
  triesLeft @2 :UInt8;  # trial boots left; 0 when not in trial
  version @3 :Text;     # informational, set by `slotImaged` ("" when unknown)
}

struct LastBoot {
  # What `bootAttempt` chose in the boot identified by `bootId`
  # (/proc/sys/kernel/random/boot_id). `confirm` only acts on it in that boot.
  valid @0 :Bool;
  slot @1 :Slot;
  trial @2 :Bool;
  bootId @3 :Text;
}

struct BootState {
  format @0 :UInt16;    # snapshot format, currently 1
  active @1 :Slot;      # the slot the next normal boot uses
  slotA @2 :SlotInfo;
  slotB @3 :SlotInfo;
  lastBoot @4 :LastBoot;
}

struct BootDecision {
  bootable @0 :Bool;    # false: no slot can boot; the caller reboots to recovery
  slot @1 :Slot;
  trial @2 :Bool;
  triesLeft @3 :UInt8;  # after this boot's try was spent
  rolledBack @4 :Bool;  # the active slot ran out of tries (or was bad) and the other took over
  version @5 :Text;
}

interface BootCtl {
  # The slot table. `persistent` is false in RAM-only mode (no /state: stub).
  state @0 () -> (state :BootState, persistent :Bool);

  # Make `slot` the one the next normal boot uses. trial=true needs
  # 1 <= triesLeft <= 15; trial=false needs triesLeft = 0. Refused for a bad or
  # empty slot (re-image it: `slotImaged`).
  setActive @1 (slot :Slot, trial :Bool, triesLeft :UInt8) -> ();

  # Mark the slot booted in this boot good and end its trial. Refused when
  # `bootAttempt` was not called in this boot (e.g. in recovery).
  confirm @2 () -> ();

  # Mark `slot` bad (sticky until re-imaged). If it was active, the other slot
  # becomes active when it is bootable.
  markBad @3 (slot :Slot) -> ();

  # Reboot into the normal boot (asks rebootd: next-boot=normal).
  # `rebooting` is false where no real reboot is possible (the stub case).
  reboot @4 () -> (rebooting :Bool);

  # Called by the normal init once per boot, before it mounts a slot: picks the
  # slot, spends one try of a trial slot, rolls back when the tries are spent.
  # The new state is persisted before the reply.
  bootAttempt @5 () -> (decision :BootDecision);

  # flashd reports a completed install into `slot`: health becomes `unknown`
  # (clears a sticky `bad`), trial ends, `version` is recorded. Refused for
  # the active slot unless it is bad.
  slotImaged @6 (slot :Slot, version :Text) -> ();

  # The JSON debug/export view (same text as `bootctld --export-json`).
  exportJson @7 () -> (json :Text);
  # flashd is about to overwrite `slot`: it becomes `empty` and its boot entry is withdrawn
  # (refused for the active slot unless it is bad or empty).
  prepareInstall @8 (slot :Slot) -> ();
}
