//! The storage error of flashd, shared by [`crate::store`] and [`crate::blockio`] (so that
//! neither imports the other for it).

use std::io;
use std::path::{Path, PathBuf};

/// Errors of the storage layer. Each names the path it concerns.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state dir {path}: {reason}")]
    StateDirUnusable { path: PathBuf, reason: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("record {path} is {len} bytes, more than the bound of {max}")]
    RecordTooLarge { path: PathBuf, len: u64, max: u64 },
    #[error("record {path} is not valid: {reason}")]
    RecordInvalid { path: PathBuf, reason: String },
    #[error("install target {path} holds {capacity} bytes, the image needs {needed}")]
    TargetTooSmall {
        path: PathBuf,
        capacity: u64,
        needed: u64,
    },
    #[error("read-back of {path} does not match what was written (expected sha256 {expected}, read {actual})")]
    ReadBackMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}
