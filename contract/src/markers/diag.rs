//! Markers of nx-diag (its contract marker is `recovery: diag written (bytes=<n>)`,
//! [`super::recovery::diag_written`]).

use super::Marker;
use std::fmt::Display;

/// `nx-diag: not available — <why>`.
pub fn not_available(why: impl Display) -> Marker {
    Marker::new(format!("nx-diag: not available — {why}"))
}

/// `nx-diag: wrote <path> (<n> members)`.
pub fn wrote(path: impl Display, members: usize) -> Marker {
    Marker::new(format!("nx-diag: wrote {path} ({members} members)"))
}

/// `nx-diag: error: <e>`.
pub fn error(e: impl Display) -> Marker {
    Marker::new(format!("nx-diag: error: {e}"))
}

/// Sample of every constructor (for the contract's tests).
pub fn samples() -> Vec<Marker> {
    vec![
        not_available("why"),
        wrote("/state/recovery/diag-0001.tar.zst", 5),
        error("e"),
    ]
}
