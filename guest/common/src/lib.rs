//! Shared guest library: ports by name, console markers, `/state` layout, block devices by
//! label / GPT partition name, kernel command line, module loading, the PID 1 supervisor
//! used by both `recovery-init` and the normal `init`, and the slot rootfs (image head in a
//! slot partition → `rootfs` segment on read-only loop devices → dm-verity with the manifest's
//! root hash, or the whole segment hashed when the manifest has no tree → squashfs mount).
//!
//! Architecture invariant: nothing read from the host (port names, sysfs contents, file
//! contents on `/state`, the kernel command line) is trusted: every read is bounded and every
//! name is validated before it becomes part of a path.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod alloc;
pub mod blockdev;
pub mod bounded;
pub mod cmdline;
pub mod dm;
pub mod efivar;
pub mod esp;
pub mod fsx;
pub mod loopdev;
pub mod marker;
pub mod modules;
pub mod pid1;
pub mod port;
pub mod slotfs;
pub mod state;
pub mod supervisor;
pub mod sys;
pub mod trust;
pub mod uart;
pub mod unixsock;

use std::path::PathBuf;

/// Errors of the shared guest library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O operation on a path failed.
    #[error(transparent)]
    Io(#[from] nx_contract::PathIoError),
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A file was larger than the bound we accept.
    #[error("{path}: larger than the {max}-byte bound; refusing to read it")]
    TooLarge { path: PathBuf, max: usize },
    /// Content failed validation (a name, a record, a list entry).
    #[error("{what}: invalid value {value:?}")]
    Invalid { what: &'static str, value: String },
    /// Something we waited for did not show up in time.
    #[error("{what}: not found after {waited_ms} ms")]
    Timeout { what: String, waited_ms: u128 },
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io(nx_contract::PathIoError {
            what,
            path: path.into(),
            source,
        })
    }
}

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
