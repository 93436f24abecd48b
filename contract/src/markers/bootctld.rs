//! Markers of bootctld (`bootctld: …` about the daemon, `bootctl: …` about slot-state calls).

use super::Marker;
use std::fmt::Display;

/// `bootctld: ready`: serving.
pub fn ready() -> Marker {
    Marker::new("bootctld: ready")
}

/// A fatal error of the daemon.
pub fn error(e: impl Display) -> Marker {
    Marker::new(format!("bootctld: error: {e}"))
}

/// No usable state dir: RAM-only slot state.
pub fn stub_ram(reason: impl Display) -> Marker {
    Marker::new(format!(
        "bootctld: stub/placeholder — {reason}; slot state is RAM-only \
         (factory default) and does not survive a reboot"
    ))
}

/// The state dir could not be read: RAM-only slot state, nothing written.
pub fn stub_unreadable(reason: impl Display) -> Marker {
    Marker::new(format!(
        "bootctld: stub/placeholder — {reason}; slot state is RAM-only \
         (factory default) and nothing is written"
    ))
}

/// Fixed prefix of the stub lines.
pub const STUB_PREFIX: &str = "bootctld: stub/placeholder";

/// No snapshot yet: the factory default.
pub fn no_snapshot(path: impl Display) -> Marker {
    Marker::new(format!(
        "bootctld: no snapshot at {path}; starting from the factory default (slot a active, good)"
    ))
}

/// The snapshot was loaded.
pub fn state_loaded(path: impl Display) -> Marker {
    Marker::new(format!("bootctld: state loaded from {path}"))
}

/// The snapshot decodes but is not canonical.
pub fn not_canonical() -> Marker {
    Marker::new("bootctld: snapshot is valid but not canonical; it is rewritten on the next change")
}

/// A corrupt snapshot, kept aside as `kept_as`.
pub fn corrupt_kept(path: impl Display, e: impl Display, kept_as: impl Display) -> Marker {
    Marker::new(format!(
        "bootctld: snapshot {path} is corrupt ({e}); kept it as {kept_as}, \
         starting from the factory default (slot a active)"
    ))
}

/// A corrupt snapshot that could not be moved aside.
pub fn corrupt_not_moved(path: impl Display, e: impl Display, re: impl Display) -> Marker {
    Marker::new(format!(
        "bootctld: snapshot {path} is corrupt ({e}) and could not be moved aside ({re}); \
         starting from the factory default (slot a active)"
    ))
}

/// `reboot()` cannot really reboot here.
pub fn reboot_is_stub(why: impl Display) -> Marker {
    Marker::new(format!("bootctld: reboot() is a stub here ({why})"))
}

/// `bootctl: setActive slot=<s> trial=<t> tries=<n>`.
pub fn set_active(slot: impl Display, trial: bool, tries: impl Display) -> Marker {
    Marker::new(format!(
        "bootctl: setActive slot={slot} trial={trial} tries={tries}"
    ))
}

/// `bootctl: confirm`.
pub fn confirm() -> Marker {
    Marker::new("bootctl: confirm")
}

/// `bootctl: markBad slot=<s>`.
pub fn mark_bad(slot: impl Display) -> Marker {
    Marker::new(format!("bootctl: markBad slot={slot}"))
}

/// `bootctl: active slot=<s>` (after a markBad switched the active slot).
pub fn active(slot: impl Display) -> Marker {
    Marker::new(format!("bootctl: active slot={slot}"))
}

/// `bootctl: slotImaged slot=<s> version=<v>`.
pub fn slot_imaged(slot: impl Display, version: impl Display) -> Marker {
    Marker::new(format!("bootctl: slotImaged slot={slot} version={version}"))
}

/// A trial slot used up its tries.
pub fn out_of_tries(slot: impl Display) -> Marker {
    Marker::new(format!("bootctl: slot {slot} ran out of trial tries"))
}

/// `bootctl: rollback to slot=<s>`.
pub fn rollback(slot: impl Display) -> Marker {
    Marker::new(format!("bootctl: rollback to slot={slot}"))
}

/// `bootctl: bootAttempt slot=<s> trial=<t> tries=<n>`.
pub fn boot_attempt(slot: impl Display, trial: bool, tries: impl Display) -> Marker {
    Marker::new(format!(
        "bootctl: bootAttempt slot={slot} trial={trial} tries={tries}"
    ))
}

/// Fixed prefix of [`boot_attempt`].
pub const BOOT_ATTEMPT_PREFIX: &str = "bootctl: bootAttempt slot=";

/// No slot can boot.
pub fn no_bootable_slot() -> Marker {
    Marker::new("bootctl: bootAttempt no bootable slot (boot recovery)")
}

/// `bootctl: reboot`: rebootd reboots into normal.
pub fn reboot() -> Marker {
    Marker::new("bootctl: reboot")
}

/// The reboot is a stub (`why`).
pub fn reboot_stub(why: impl Display) -> Marker {
    Marker::new(format!("bootctl: reboot (stub) — {why}"))
}

/// What the bootloader booted, as bootctld reads it at `bootAttempt`.
pub fn loader_booted(entry: impl Display, slot: impl Display, tries_left: Option<u32>) -> Marker {
    match tries_left {
        Some(n) => Marker::new(format!(
            "bootctl: bootloader booted {entry} (slot {slot}, {n} tries left)"
        )),
        None => Marker::new(format!("bootctl: bootloader booted {entry} (slot {slot})")),
    }
}

/// `bootctl: prepareInstall slot=<s>`: the slot is emptied (and its boot entry withdrawn)
/// before flashd overwrites it.
pub fn prepare_install(slot: impl Display) -> Marker {
    Marker::new(format!("bootctl: prepareInstall slot={slot}"))
}

/// `bootctl: entry <file>`: the boot entry the slot state was projected onto.
pub fn entry(file: impl Display) -> Marker {
    Marker::new(format!("bootctl: entry {file}"))
}

/// A projection onto the boot entries failed (the next boot's reconciliation repairs it).
pub fn entry_failed(e: impl Display) -> Marker {
    Marker::new(format!("bootctld: boot entry not updated: {e}"))
}

/// No ESP: the slot state is not projected onto boot entries.
pub fn no_esp(why: impl Display) -> Marker {
    Marker::new(format!(
        "bootctld: stub/placeholder: no ESP ({why}); boot entries are not written"
    ))
}

/// Every constructor with representative arguments (the marker catalogue).
pub fn samples() -> Vec<Marker> {
    vec![
        ready(),
        error("e"),
        stub_ram("r"),
        stub_unreadable("r"),
        no_snapshot("/state/bootctl/state.nxs"),
        state_loaded("/state/bootctl/state.nxs"),
        not_canonical(),
        corrupt_kept("p", "e", "state.nxs.corrupt"),
        corrupt_not_moved("p", "e", "r"),
        reboot_is_stub("w"),
        set_active('b', true, 3),
        confirm(),
        mark_bad('b'),
        active('a'),
        slot_imaged('b', "2"),
        slot_imaged('b', "3-broken"),
        slot_imaged('b', "3-badkernel"),
        out_of_tries('b'),
        rollback('a'),
        boot_attempt('a', false, 0),
        boot_attempt('b', true, 2),
        boot_attempt('b', true, 1),
        boot_attempt('b', true, 0),
        boot_attempt('b', false, 0),
        no_bootable_slot(),
        reboot(),
        reboot_stub("rebootd cannot reboot here"),
        prepare_install('b'),
        loader_booted("nexus-2-b+3.conf", 'b', Some(2)),
        loader_booted("nexus-1-a.conf", 'a', None),
        entry("nexus-2-b+3.conf"),
        entry("nexus-2-b.conf"),
        entry("nexus-3-a+0.conf"),
        entry_failed("e"),
        no_esp("/boot/efi is not mounted"),
    ]
}
