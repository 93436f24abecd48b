//! Markers of selftest-client: one `SELFTEST: <check> <outcome>` line per check, after its
//! real check, and the `selftest-client:` lines around them.

use super::Marker;
use std::fmt::Display;

/// `SELFTEST: <check> ok`.
pub fn ok(check: &str) -> Marker {
    Marker::new(format!("SELFTEST: {check} ok"))
}

/// `SELFTEST: <check> skipped (<why>)`.
pub fn skipped(check: &str, why: impl Display) -> Marker {
    Marker::new(format!("SELFTEST: {check} skipped ({why})"))
}

/// `SELFTEST: <check> stub/placeholder` (followed by [`detail`]).
pub fn stub(check: &str) -> Marker {
    Marker::new(format!("SELFTEST: {check} stub/placeholder"))
}

/// `selftest-client: <check>: <why>`: the detail line of a stub.
pub fn detail(check: &str, why: impl Display) -> Marker {
    Marker::new(format!("selftest-client: {check}: {why}"))
}

/// `SELFTEST: <check> FAILED: <why>`.
pub fn failed(check: &str, why: impl Display) -> Marker {
    Marker::new(format!("SELFTEST: {check} FAILED: {why}"))
}

/// The infix every failed check prints (a forbidden marker of the selftest profiles).
pub const FAILED_INFIX: &str = " FAILED: ";

/// `selftest-client: done (ok=<n>, stub=<n>, skipped=<n>, failed=<n>)`.
pub fn done(ok: u32, stub: u32, skipped: u32, failed: u32) -> Marker {
    Marker::new(format!(
        "selftest-client: done (ok={ok}, stub={stub}, skipped={skipped}, failed={failed})"
    ))
}

/// `selftest-client: start (mode=<recovery|normal>)`.
pub fn start(mode: &str) -> Marker {
    Marker::new(format!("selftest-client: start (mode={mode})"))
}

/// Not asked for on the kernel command line.
pub fn not_enabled() -> Marker {
    Marker::new(
        "selftest-client: nexus.selftest=1 is not on the kernel command line; nothing to do",
    )
}

/// The slot was confirmed after every check passed.
pub fn confirmed() -> Marker {
    Marker::new("selftest-client: healthy: confirm() sent to bootctld")
}

/// `selftest-client: error: <e>`.
pub fn error(e: impl Display) -> Marker {
    Marker::new(format!("selftest-client: error: {e}"))
}

/// A check failed: no confirm.
pub fn not_confirming() -> Marker {
    Marker::new("selftest-client: not confirming the slot: a check failed")
}

/// `selftest-client: bootctl active=<s> a=<h> b=<h> storage=<persistent|ram-only stub/placeholder>`.
pub fn bootctl_view(
    active: impl Display,
    a: impl Display,
    b: impl Display,
    persistent: bool,
) -> Marker {
    Marker::new(format!(
        "selftest-client: bootctl active={active} a={a} b={b} storage={}",
        if persistent {
            "persistent"
        } else {
            "ram-only stub/placeholder"
        }
    ))
}

/// The check names, in marker order.
pub const CHECKS: [&str; 6] = [
    "recovery boot",
    "recovery diag",
    "reset dry-run",
    "flash receive",
    "flash reboot flag",
    "bootctl api",
];

/// Sample of every constructor (for the contract's tests).
pub fn samples() -> Vec<Marker> {
    let mut out = Vec::new();
    for c in CHECKS {
        out.extend([
            ok(c),
            skipped(c, "normal boot"),
            stub(c),
            detail(c, "why"),
            failed(c, "why"),
        ]);
    }
    out.extend([
        done(6, 0, 0, 0),
        done(4, 1, 1, 0),
        start("recovery"),
        start("normal"),
        not_enabled(),
        confirmed(),
        error("e"),
        not_confirming(),
        bootctl_view("a", "good", "empty", true),
    ]);
    out
}
