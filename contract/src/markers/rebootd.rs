//! Markers of rebootd.

use super::Marker;
use std::fmt::Display;

/// `rebootd: ready`.
pub fn ready() -> Marker {
    Marker::new("rebootd: ready")
}

/// A fatal error of the daemon.
pub fn error(e: impl Display) -> Marker {
    Marker::new(format!("rebootd: error: {e}"))
}

/// Where the next-boot record lives.
pub fn record_in(dir: impl Display) -> Marker {
    Marker::new(format!("rebootd: next-boot record in {dir}"))
}

/// No usable state dir: RAM-only records, `mode`/`factoryWipe` refused.
pub fn stub_ram(reason: impl Display) -> Marker {
    Marker::new(format!(
        "rebootd: stub/placeholder — {reason}; the next-boot record is RAM-only, \
         so `mode`/`factoryWipe` are refused (nothing would survive the reboot)"
    ))
}

/// How rebootd reboots.
pub fn reboot_method(how: impl Display) -> Marker {
    Marker::new(format!("rebootd: reboot method: {how}"))
}

/// The device name it reports.
pub fn device_name(name: impl Display) -> Marker {
    Marker::new(format!("rebootd: device name {name}"))
}

/// The record was cleared (`persistent`: on /state; else RAM only).
pub fn record_cleared(persistent: bool) -> Marker {
    if persistent {
        Marker::new("rebootd: next-boot record cleared")
    } else {
        Marker::new("rebootd: next-boot record cleared (stub/placeholder: RAM only)")
    }
}

/// `rebootd: next-boot=<target>`.
pub fn next_boot(target: impl Display) -> Marker {
    Marker::new(format!("rebootd: next-boot={target}"))
}

/// The next boot is set in RAM only.
pub fn next_boot_ram(target: impl Display, reason: impl Display) -> Marker {
    Marker::new(format!(
        "rebootd: next-boot={target} (stub/placeholder: RAM only, not persisted — {reason})"
    ))
}

/// `rebootd: factory-wipe requested`.
pub fn factory_wipe_requested() -> Marker {
    Marker::new("rebootd: factory-wipe requested")
}

/// `rebootd: rebooting (SIGTERM to PID 1)`.
pub fn rebooting() -> Marker {
    Marker::new("rebootd: rebooting (SIGTERM to PID 1)")
}

/// SIGTERM to PID 1 failed.
pub fn signal_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "rebootd: error: SIGTERM to PID 1 failed: {e}; the guest does not reboot"
    ))
}

/// The reboot is a stub (`why`).
pub fn reboot_stub(why: impl Display) -> Marker {
    Marker::new(format!("rebootd: reboot (stub) — {why}; not rebooting"))
}

/// The bootloader's one-shot entry now matches the next-boot record (`Some(entry)`: set,
/// `None`: cleared — the default entry boots).
pub fn oneshot(entry: Option<&str>) -> Marker {
    match entry {
        Some(e) => Marker::new(format!("rebootd: one-shot boot entry {e}")),
        None => Marker::new("rebootd: one-shot boot entry cleared"),
    }
}

/// The one-shot entry could not be written: the bootloader will not follow the record.
pub fn oneshot_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "rebootd: error: one-shot boot entry not written: {e}"
    ))
}

/// No EFI variables: the next-boot record is not handed to a bootloader.
pub fn no_efivars(why: impl Display) -> Marker {
    Marker::new(format!(
        "rebootd: stub/placeholder: no EFI variables ({why}); the bootloader does not see the next-boot record"
    ))
}

/// Every constructor with representative arguments (the marker catalogue).
pub fn samples() -> Vec<Marker> {
    vec![
        ready(),
        error("e"),
        record_in("/state/boot"),
        stub_ram("r"),
        reboot_method("m"),
        device_name("nexus"),
        record_cleared(true),
        record_cleared(false),
        next_boot("normal"),
        next_boot("recovery"),
        oneshot(Some("recovery.conf")),
        oneshot(None),
        oneshot_failed("e"),
        no_efivars("started without --efivars"),
        next_boot_ram("normal", "r"),
        factory_wipe_requested(),
        rebooting(),
        signal_failed("e"),
        reboot_stub("w"),
    ]
}
