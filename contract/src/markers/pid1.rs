//! Markers of the PID 1 mechanics shared by init and recovery-init (`nx_guest::pid1`,
//! `nx_guest::supervisor`, `nx_guest::sys`). `program` is the PID 1's console prefix
//! (`"init"` or `"recovery"`).

use super::Marker;
use std::fmt::Display;

/// `<program>: error: signal set-up failed (<e>); shutdown requests may be lost`.
pub fn signal_setup_failed(program: &str, e: impl Display) -> Marker {
    Marker::new(format!(
        "{program}: error: signal set-up failed ({e}); shutdown requests may be lost"
    ))
}

/// `<program>: error: early mounts failed (<e>)`.
pub fn early_mounts_failed(program: &str, e: impl Display) -> Marker {
    Marker::new(format!("{program}: error: early mounts failed ({e})"))
}

/// `<program>: error: cannot read /proc/cmdline (<e>); using defaults`.
pub fn cmdline_unreadable(program: &str, e: impl Display) -> Marker {
    Marker::new(format!(
        "{program}: error: cannot read /proc/cmdline ({e}); using defaults"
    ))
}

/// `<program>: error: module loading failed (<e>); virtio devices may be missing`.
pub fn modules_failed(program: &str, e: impl Display) -> Marker {
    Marker::new(format!(
        "{program}: error: module loading failed ({e}); virtio devices may be missing"
    ))
}

/// `<program>: error: /state: <e>`.
pub fn state_error(program: &str, e: impl Display) -> Marker {
    Marker::new(format!("{program}: error: /state: {e}"))
}

/// `<program>: error: ESP: <e>` (the ESP could not be mounted on /boot/efi).
pub fn esp_error(program: &str, e: impl Display) -> Marker {
    Marker::new(format!("{program}: error: ESP: {e}"))
}

/// `<program>: error: EFI variables: <e>` (efivarfs could not be mounted).
pub fn efivars_error(program: &str, e: impl Display) -> Marker {
    Marker::new(format!("{program}: error: EFI variables: {e}"))
}

/// `<program>: <n> modules loaded`.
pub fn modules_loaded(program: &str, n: usize) -> Marker {
    Marker::new(format!("{program}: {n} modules loaded"))
}

/// `<program>: /state mounted (<dev> on /state)`.
pub fn state_mounted(program: &str, dev: impl Display) -> Marker {
    Marker::new(format!("{program}: /state mounted ({dev} on /state)"))
}

/// `<program>: uptime <s> s at ready` (two decimals).
pub fn uptime_at_ready(program: &str, seconds: f64) -> Marker {
    Marker::new(format!("{}{seconds:.2} s at ready", uptime_prefix(program)))
}

/// The fixed part of [`uptime_at_ready`]: `<program>: uptime `.
pub fn uptime_prefix(program: &str) -> Marker {
    Marker::new(format!("{program}: uptime "))
}

/// `<program>: <action> (stopping services, sync, unmount /state)`.
pub fn shutting_down(program: &str, action: &str) -> Marker {
    Marker::new(format!(
        "{program}: {action} (stopping services, sync, unmount /state)"
    ))
}

/// `<program>: error: <err>; halting here`.
pub fn halting(program: &str, err: impl Display) -> Marker {
    Marker::new(format!("{program}: error: {err}; halting here"))
}

/// `<program>: cannot start <svc> (<e>); retry in <ms> ms`.
pub fn service_start_failed(program: &str, svc: &str, e: impl Display, retry_ms: u128) -> Marker {
    Marker::new(format!(
        "{program}: cannot start {svc} ({e}); retry in {retry_ms} ms"
    ))
}

/// `<program>: <svc> exited (<what>); restart in <ms> ms`.
pub fn service_restarting(program: &str, svc: &str, what: &str, restart_ms: u128) -> Marker {
    Marker::new(format!(
        "{program}: {svc} exited ({what}); restart in {restart_ms} ms"
    ))
}

/// `<program>: <svc> exited (<what>)`.
pub fn service_exited(program: &str, svc: &str, what: &str) -> Marker {
    Marker::new(format!("{program}: {svc} exited ({what})"))
}

/// `<program>: signal wait failed (<e>)`.
pub fn signal_wait_failed(program: &str, e: impl Display) -> Marker {
    Marker::new(format!("{program}: signal wait failed ({e})"))
}

/// `shutdown: still running after <ms> ms, killing: <names>`.
pub fn shutdown_killing<S: AsRef<str>>(grace_ms: u128, survivors: &[S]) -> Marker {
    Marker::new(format!(
        "shutdown: still running after {grace_ms} ms, killing: {}",
        super::list(survivors)
    ))
}

/// Sample of every constructor (for the contract's tests).
pub fn samples() -> Vec<Marker> {
    let mut out = Vec::new();
    for p in ["init", "recovery"] {
        out.extend([
            signal_setup_failed(p, "e"),
            early_mounts_failed(p, "e"),
            cmdline_unreadable(p, "e"),
            modules_failed(p, "e"),
            state_error(p, "e"),
            esp_error(p, "e"),
            efivars_error(p, "e"),
            modules_loaded(p, 3),
            state_mounted(p, "/dev/vdb"),
            uptime_at_ready(p, 1.0),
            uptime_prefix(p),
            shutting_down(p, "reboot"),
            shutting_down(p, "poweroff"),
            halting(p, "e"),
            service_start_failed(p, "flashd", "e", 100),
            service_restarting(p, "flashd", "exit 1", 100),
            service_exited(p, "flashd", "exit 1"),
            signal_wait_failed(p, "e"),
        ]);
    }
    out.push(shutdown_killing(3000, &["flashd"]));
    out
}
