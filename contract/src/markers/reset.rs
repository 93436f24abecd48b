//! Markers of the factory reset (`nx_reset::wipe`, printed by recovery-init and `nx reset`).

use super::Marker;
use std::fmt::Display;

/// `nx: reset factory wipe start` (once per attempt).
pub fn wipe_start() -> Marker {
    Marker::new("nx: reset factory wipe start")
}

/// `nx: reset factory wipe done`: complete, synced, the request cleared.
pub fn wipe_done() -> Marker {
    Marker::new("nx: reset factory wipe done")
}

/// An invalid request was removed (`content` is shown with `{:?}`).
pub fn invalid_request_removed(request: impl Display, content: &str) -> Marker {
    Marker::new(format!(
        "nx: reset factory wipe request {request} is invalid ({content:?}, expected \"wipe\\n\"); removed it, nothing was wiped"
    ))
}

/// `nx: reset factory wipe resumed (attempt=<n>): an earlier wipe was cut short`.
pub fn wipe_resumed(attempt: impl Display) -> Marker {
    Marker::new(format!(
        "nx: reset factory wipe resumed (attempt={attempt}): an earlier wipe was cut short"
    ))
}

/// `nx: reset factory wipe removed <n> paths (<b> bytes) from <trees>`.
pub fn wipe_removed(removed: impl Display, bytes: impl Display, trees: &[&str]) -> Marker {
    Marker::new(format!(
        "{WIPE_REMOVED_PREFIX} {removed} paths ({bytes} bytes) from {}",
        super::list(trees)
    ))
}

/// Fixed prefix of [`wipe_removed`].
pub const WIPE_REMOVED_PREFIX: &str = "nx: reset factory wipe removed";

/// `nx: reset factory wipe failed: <e>; …`.
pub fn wipe_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "nx: reset factory wipe failed: {e}; the request stays and the wipe runs again at the next boot"
    ))
}

/// Sample of every constructor (for the contract's tests).
pub fn samples() -> Vec<Marker> {
    vec![
        wipe_start(),
        wipe_done(),
        invalid_request_removed("/state/boot/factory_wipe", "junk"),
        wipe_resumed(2),
        wipe_removed(8, 5459, &["apps", "content", "settings"]),
        wipe_failed("e"),
    ]
}
