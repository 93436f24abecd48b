//! The one-shot next-boot record and the factory-wipe request.
//!
//! Files (under `STATE/boot/`, written atomically, read with a 64-byte bound):
//!
//! | file           | content                      | written by | consumed by |
//! |----------------|------------------------------|------------|-------------|
//! | `next_mode`    | `normal\n` or `recovery\n`   | rebootd    | the runner reads it (debugfs) after the guest resets; recovery-init removes it |
//! | `factory_wipe` | `wipe\n`                     | rebootd    | recovery-init removes it only after the wipe is complete |
//!
//! Anything else in `next_mode` is invalid and means "no record" to readers.

use crate::fsutil::{self, NotPersistent};
use std::path::{Path, PathBuf};

/// File name of the next-boot record inside `STATE/boot/`.
pub const NEXT_MODE_FILE: &str = "next_mode";
/// File name of the factory-wipe request inside `STATE/boot/`.
pub const FACTORY_WIPE_FILE: &str = "factory_wipe";
/// Sub-directory of the state dir holding both records.
pub const BOOT_SUBDIR: &str = "boot";
/// Upper bound for reading either record.
pub const MAX_RECORD_BYTES: usize = 64;
/// Content of the factory-wipe request.
pub const FACTORY_WIPE_CONTENT: &[u8] = b"wipe\n";

/// Errors of the record store.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The target is not `normal` or `recovery`.
    #[error("invalid next-boot target {0:?}: use \"normal\" or \"recovery\"")]
    BadTarget(String),
    /// The record file holds something else than a valid record.
    #[error(
        "{path}: invalid next-boot record {content:?} (expected \"normal\\n\" or \"recovery\\n\")"
    )]
    BadRecord { path: PathBuf, content: String },
    /// Reading or writing a record failed.
    #[error(transparent)]
    Io(#[from] nx_contract::PathIoError),
    /// No state dir: the record cannot be persisted (RAM-only stub).
    #[error("cannot persist the next-boot record: {0} (stub/placeholder: RAM-only rebootd; mount /state)")]
    NotPersistent(NotPersistent),
}

/// Which initramfs the boot firmware starts next: the contract's next-boot grammar.
pub use nx_contract::NextBoot as Target;

/// Parse a target name strictly (`normal` | `recovery`).
pub fn parse_target(s: &str) -> Result<Target, RecordError> {
    Target::parse(s).ok_or_else(|| RecordError::BadTarget(s.chars().take(32).collect()))
}

/// Parse the content of a record file (exactly `normal\n` / `recovery\n`;
/// a missing final newline is tolerated, nothing else).
pub fn target_from_record(bytes: &[u8]) -> Option<Target> {
    let s = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    std::str::from_utf8(s).ok().and_then(Target::parse)
}

/// What the records say now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pending {
    /// The next-boot record, if any.
    pub target: Option<Target>,
    /// Whether a factory wipe is requested.
    pub factory_wipe: bool,
}

/// Read the next-boot record from a `STATE/boot` directory (bounded).
/// `Ok(None)` when there is none.
pub fn read_next_mode(boot_dir: &Path) -> Result<Option<Target>, RecordError> {
    let path = boot_dir.join(NEXT_MODE_FILE);
    let Some(bytes) = fsutil::read_bounded(&path, MAX_RECORD_BYTES).map_err(|source| {
        RecordError::Io(nx_contract::PathIoError {
            what: "could not read",
            path: path.clone(),
            source,
        })
    })?
    else {
        return Ok(None);
    };
    target_from_record(&bytes)
        .map(Some)
        .ok_or_else(|| RecordError::BadRecord {
            path,
            content: String::from_utf8_lossy(&bytes).into_owned(),
        })
}

/// Whether `STATE/boot/factory_wipe` holds a valid request.
pub fn read_factory_wipe(boot_dir: &Path) -> Result<bool, RecordError> {
    let path = boot_dir.join(FACTORY_WIPE_FILE);
    let bytes = fsutil::read_bounded(&path, MAX_RECORD_BYTES).map_err(|source| {
        RecordError::Io(nx_contract::PathIoError {
            what: "could not read",
            path,
            source,
        })
    })?;
    Ok(bytes.as_deref() == Some(FACTORY_WIPE_CONTENT))
}

/// Where the records live: a persistent `STATE/boot` dir, or RAM (stub).
#[derive(Debug)]
pub enum Store {
    /// Persist into this `STATE/boot` directory.
    Dir(PathBuf),
    /// RAM-only: nothing is persisted; `reason` says why.
    Ram {
        /// Why there is no persistence.
        reason: NotPersistent,
        /// What was requested (kept for `pending`, lost at reboot).
        pending: Pending,
    },
}

impl Store {
    /// Persist under `state/boot`, or RAM-only when `state` is `None`, missing, or
    /// (with `require_mountpoint`) not a mounted filesystem.
    pub fn open(state: Option<&Path>, require_mountpoint: bool) -> Self {
        match state {
            None => Store::Ram {
                reason: NotPersistent("no --state dir given".into()),
                pending: Pending::default(),
            },
            Some(s) => match fsutil::state_subdir(s, BOOT_SUBDIR, require_mountpoint) {
                Ok(dir) => Store::Dir(dir),
                Err(reason) => Store::Ram {
                    reason,
                    pending: Pending::default(),
                },
            },
        }
    }

    /// True when records survive a reboot.
    pub fn is_persistent(&self) -> bool {
        matches!(self, Store::Dir(_))
    }

    /// Why this store is RAM-only (`None` when persistent).
    pub fn not_persistent_reason(&self) -> Option<&NotPersistent> {
        match self {
            Store::Dir(_) => None,
            Store::Ram { reason, .. } => Some(reason),
        }
    }

    /// Persist the next-boot record. In RAM-only mode it is kept in RAM and
    /// `Ok(false)` says it was not persisted.
    pub fn set_next(&mut self, target: Target) -> Result<bool, RecordError> {
        match self {
            Store::Dir(dir) => {
                fsutil::write_atomic(dir, NEXT_MODE_FILE, target.record_bytes()).map_err(
                    |source| {
                        RecordError::Io(nx_contract::PathIoError {
                            what: "could not write",
                            path: dir.join(NEXT_MODE_FILE),
                            source,
                        })
                    },
                )?;
                Ok(true)
            }
            Store::Ram { pending, .. } => {
                pending.target = Some(target);
                Ok(false)
            }
        }
    }

    /// Remove the next-boot record (durably); `Ok(false)`: RAM only.
    pub fn clear_next(&mut self) -> Result<bool, RecordError> {
        match self {
            Store::Dir(dir) => {
                fsutil::remove_durable(dir, NEXT_MODE_FILE).map_err(|source| {
                    RecordError::Io(nx_contract::PathIoError {
                        what: "could not remove",
                        path: dir.join(NEXT_MODE_FILE),
                        source,
                    })
                })?;
                Ok(true)
            }
            Store::Ram { pending, .. } => {
                pending.target = None;
                Ok(false)
            }
        }
    }

    /// The state dir the records live in (the parent of `STATE/boot`); `None` in RAM-only mode.
    pub fn state_root(&self) -> Option<&Path> {
        match self {
            Store::Dir(dir) => dir.parent(),
            Store::Ram { .. } => None,
        }
    }

    /// Persist the factory-wipe request (`Ok(false)`: RAM only).
    pub fn set_factory_wipe(&mut self) -> Result<bool, RecordError> {
        match self {
            Store::Dir(dir) => {
                fsutil::write_atomic(dir, FACTORY_WIPE_FILE, FACTORY_WIPE_CONTENT).map_err(
                    |source| {
                        RecordError::Io(nx_contract::PathIoError {
                            what: "could not write",
                            path: dir.join(FACTORY_WIPE_FILE),
                            source,
                        })
                    },
                )?;
                Ok(true)
            }
            Store::Ram { pending, .. } => {
                pending.factory_wipe = true;
                Ok(false)
            }
        }
    }

    /// Fail unless the records can be persisted (before a reboot that relies on them).
    pub fn require_persistent(&self) -> Result<(), RecordError> {
        match self {
            Store::Dir(_) => Ok(()),
            Store::Ram { reason, .. } => Err(RecordError::NotPersistent(reason.clone())),
        }
    }

    /// The records as they are now.
    pub fn pending(&self) -> Result<Pending, RecordError> {
        match self {
            Store::Dir(dir) => Ok(Pending {
                target: read_next_mode(dir)?,
                factory_wipe: read_factory_wipe(dir)?,
            }),
            Store::Ram { pending, .. } => Ok(*pending),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_strictly() {
        assert_eq!(parse_target("normal").unwrap(), Target::Normal);
        assert_eq!(parse_target("recovery").unwrap(), Target::Recovery);
        assert!(parse_target("Recovery").is_err());
        assert!(parse_target("normal\n").is_err());
        assert!(parse_target("").is_err());
        assert_eq!(target_from_record(b"recovery\n"), Some(Target::Recovery));
        assert_eq!(target_from_record(b"normal"), Some(Target::Normal));
        assert_eq!(target_from_record(b"normal\n\n"), None);
        assert_eq!(target_from_record(b"../etc"), None);
    }

    #[test]
    fn dir_store_persists_exact_bytes() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(Some(d.path()), false);
        assert!(s.is_persistent());
        assert_eq!(s.pending().unwrap(), Pending::default());
        assert!(s.set_next(Target::Recovery).unwrap());
        assert_eq!(
            std::fs::read(d.path().join("boot/next_mode")).unwrap(),
            b"recovery\n"
        );
        assert!(s.set_factory_wipe().unwrap());
        assert_eq!(
            std::fs::read(d.path().join("boot/factory_wipe")).unwrap(),
            b"wipe\n"
        );
        let p = s.pending().unwrap();
        assert_eq!(p.target, Some(Target::Recovery));
        assert!(p.factory_wipe);
        assert_eq!(s.state_root(), Some(d.path()));
        assert!(s.clear_next().unwrap());
        assert!(!d.path().join("boot/next_mode").exists());
        assert_eq!(s.pending().unwrap().target, None);
        assert!(s.clear_next().unwrap());
        assert!(s.set_next(Target::Recovery).unwrap());
        // The request format is the one nx-reset's wipe consumes.
        assert_eq!(FACTORY_WIPE_CONTENT, nx_reset::REQUEST_CONTENT);
        assert_eq!(
            format!("{BOOT_SUBDIR}/{FACTORY_WIPE_FILE}"),
            nx_reset::REQUEST
        );
        std::fs::write(d.path().join("boot/next_mode"), b"garbage").unwrap();
        assert!(s.pending().is_err());
        std::fs::write(d.path().join("boot/next_mode"), vec![b'x'; 1 << 20]).unwrap();
        assert!(s.pending().is_err());
    }

    #[test]
    fn ram_store_never_claims_persistence() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(Some(&d.path().join("missing")), false);
        assert!(!s.is_persistent());
        assert!(s.require_persistent().is_err());
        assert!(!s.set_next(Target::Normal).unwrap());
        assert_eq!(s.pending().unwrap().target, Some(Target::Normal));
        assert!(!d.path().join("missing").exists());
    }
}
