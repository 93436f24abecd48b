//! Markers of the recovery ramdisk: recovery-init (PID 1), recovery-sh, nx-recovery's menu and
//! nx-diag (which prints under the `recovery:` prefix).

use super::Marker;
use std::fmt::Display;

/// `recovery: boot target selected`.
pub fn target_selected() -> Marker {
    Marker::new("recovery: boot target selected")
}

/// `recovery: start`: PID 1's first line, before any mount (the kernel's part of the boot
/// ends here).
pub fn start() -> Marker {
    Marker::new("recovery: start")
}

/// `recovery: init start`.
pub fn init_start() -> Marker {
    Marker::new("recovery: init start")
}

/// `recovery: services ready`.
pub fn services_ready() -> Marker {
    Marker::new("recovery: services ready")
}

/// `recovery: ready (serial=@<port device>)`.
pub fn ready(port_dev: impl Display) -> Marker {
    Marker::new(format!("recovery: ready (serial=@{port_dev})"))
}

/// Fixed prefix of [`ready`] (any port device).
pub const READY_PREFIX: &str = "recovery: ready (serial=@";

/// `recovery: shell ready` (recovery-sh).
pub fn shell_ready() -> Marker {
    Marker::new("recovery: shell ready")
}

/// `recovery: menu ready` (nx-recovery).
pub fn menu_ready() -> Marker {
    Marker::new("recovery: menu ready")
}

/// `recovery: diag written (bytes=<n>)` (nx-diag).
pub fn diag_written(bytes: u64) -> Marker {
    Marker::new(format!("recovery: diag written (bytes={bytes})"))
}

/// Fixed prefix of [`diag_written`].
pub const DIAG_WRITTEN_PREFIX: &str = "recovery: diag written (bytes=";

/// `recovery: next-boot record ignored and removed (<e>)`.
pub fn next_boot_ignored(e: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: next-boot record ignored and removed ({e})"
    ))
}

/// `recovery: error: cannot remove the next-boot record (<e>)`.
pub fn next_boot_remove_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: error: cannot remove the next-boot record ({e})"
    ))
}

/// No `/state` disk.
pub fn state_stub() -> Marker {
    Marker::new(
        "recovery: /state stub/placeholder: no ext4 disk labelled \"state\"; flash staging, the next-boot record and diag are unavailable",
    )
}

/// Fixed prefix of [`state_stub`].
pub const STATE_STUB_PREFIX: &str = "recovery: /state stub/placeholder";

/// `recovery: target=<t> reason=<r>`.
pub fn target(target: impl Display, reason: impl Display) -> Marker {
    Marker::new(format!("recovery: target={target} reason={reason}"))
}

/// `normal` was asked of the recovery ramdisk.
pub fn normal_requested_staying() -> Marker {
    Marker::new(
        "recovery: normal was requested but this is the recovery ramdisk (the boot firmware picks the ramdisk); staying in recovery",
    )
}

/// `recovery: error: cannot consume the next-boot record (<e>)`.
pub fn next_boot_consume_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: error: cannot consume the next-boot record ({e})"
    ))
}

/// `recovery: started <a, b>`.
pub fn started<S: AsRef<str>>(names: &[S]) -> Marker {
    Marker::new(format!("recovery: started {}", super::list(names)))
}

/// The flash port is missing.
pub fn flash_port_missing(e: impl Display, port_name: &str) -> Marker {
    Marker::new(format!(
        "recovery: error: flash port missing ({e}); is QEMU started with the {port_name} virtserialport?"
    ))
}

/// `recovery: factory wipe complete (attempt <n>); asking rebootd for a normal boot`.
pub fn wipe_complete(attempt: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: factory wipe complete (attempt {attempt}); asking rebootd for a normal boot"
    ))
}

/// The normal reboot after a wipe is under way.
pub fn rebooting_after_wipe() -> Marker {
    Marker::new("recovery: rebooting into normal after the factory wipe (no shell this boot)")
}

/// rebootd is a stub: no reboot after the wipe.
pub fn reboot_after_wipe_stub() -> Marker {
    Marker::new(
        "recovery: error: rebootd recorded next boot = normal but cannot reboot here (stub); staying in recovery, type 'reboot'",
    )
}

/// The normal reboot after a wipe could not be asked for.
pub fn reboot_after_wipe_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: error: cannot ask for the normal boot after the factory wipe ({e}); staying in recovery, type 'reboot normal'"
    ))
}

/// A pending wipe failed this boot.
pub fn wipe_pending_failed() -> Marker {
    Marker::new(
        "recovery: factory wipe pending and failed: this boot stays in recovery (see the error above; 'diag' collects the logs)",
    )
}

/// The wipe itself failed.
pub fn wipe_failed(why: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: error: factory wipe failed ({why}); staying in recovery — the request stays, so the wipe runs again at the next boot and the device never boots normal half-wiped"
    ))
}

/// Sample of every constructor (for the contract's tests).
/// The one-shot entry that brings a cut wipe back to recovery could not be set.
pub fn wipe_oneshot_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: error: one-shot boot entry not set for the wipe (a power cut during it boots normal, which refuses and reboots here): {e}"
    ))
}

/// `recovery: flashd --verify-threads <n> (kernel command line nexus.verify_threads=<n>)`.
pub fn verify_threads(n: u32) -> Marker {
    Marker::new(format!(
        "recovery: flashd --verify-threads {n} (kernel command line {}={n})",
        crate::loader::VERIFY_THREADS_OPTION
    ))
}

/// An unusable `nexus.verify_threads=` value: flashd keeps its default.
pub fn verify_threads_ignored(value: &str, why: impl Display) -> Marker {
    Marker::new(format!(
        "recovery: kernel command line {}={value:?} ignored ({why}); flashd verifies with its default",
        crate::loader::VERIFY_THREADS_OPTION
    ))
}

pub fn samples() -> Vec<Marker> {
    vec![
        verify_threads(1),
        verify_threads_ignored("x", "e"),
        wipe_oneshot_failed("e"),
        start(),
        target_selected(),
        init_start(),
        services_ready(),
        ready("/dev/vport0p1"),
        ready(crate::ports::UART.device),
        shell_ready(),
        menu_ready(),
        diag_written(10),
        next_boot_ignored("e"),
        next_boot_remove_failed("e"),
        state_stub(),
        target("recovery", "cmdline"),
        normal_requested_staying(),
        next_boot_consume_failed("e"),
        started(&["flashd", "rebootd"]),
        flash_port_missing("e", "com.nexus.flash"),
        wipe_complete(1),
        wipe_complete(2),
        rebooting_after_wipe(),
        reboot_after_wipe_stub(),
        reboot_after_wipe_failed("e"),
        wipe_pending_failed(),
        wipe_failed("e"),
    ]
}
