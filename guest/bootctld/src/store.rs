//! Persistence of the slot table: `STATE/bootctl/state.nxs`, replaced atomically
//! (temp + fsync + rename + fsync dir), or RAM-only (stub) without a state dir.

use crate::json::Persistence;
use crate::machine::BootState;
use crate::snapshot::{self, MAX_SNAPSHOT_BYTES};
use nx_contract::markers::bootctld as bm;
use nx_contract::Marker;
use rebootd::fsutil;
use std::path::{Path, PathBuf};

/// Sub-directory of the state dir.
pub const SUBDIR: &str = "bootctl";
/// Snapshot file name.
pub const SNAPSHOT_FILE: &str = "state.nxs";
/// Where an undecodable snapshot is moved (kept for diagnosis).
pub const CORRUPT_FILE: &str = "state.nxs.corrupt";

/// Errors persisting the state.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Writing the snapshot failed; the change was not applied.
    #[error("could not write {path}: {source}; the change was not applied")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where the state is kept.
#[derive(Debug, Clone)]
pub enum Store {
    /// `STATE/bootctl`.
    Dir(PathBuf),
    /// RAM only; the reason.
    Ram(String),
}

/// The result of opening the store: the store, the state to start from, and
/// the startup log lines (printed on the console before `bootctld: ready`).
#[derive(Debug)]
pub struct Opened {
    /// The store.
    pub store: Store,
    /// The state to start from.
    pub state: BootState,
    /// Log lines for the console.
    pub notes: Vec<Marker>,
}

impl Store {
    /// Open `state/bootctl` (see [`fsutil::state_subdir`] for when it is RAM-only)
    /// and load the snapshot. A snapshot that does not decode is moved to
    /// `state.nxs.corrupt` and the factory default is used; a snapshot that
    /// cannot be read at all makes the store RAM-only (never overwrite what we
    /// could not read).
    pub fn open(state: Option<&Path>, require_mountpoint: bool) -> Opened {
        let dir = match state {
            None => Err(fsutil::NotPersistent("no --state dir given".into())),
            Some(s) => fsutil::state_subdir(s, SUBDIR, require_mountpoint),
        };
        let dir = match dir {
            Ok(d) => d,
            Err(reason) => {
                let reason = reason.to_string();
                return Opened {
                    notes: vec![bm::stub_ram(&reason)],
                    store: Store::Ram(reason),
                    state: BootState::factory_default(),
                };
            }
        };
        let path = dir.join(SNAPSHOT_FILE);
        match fsutil::read_bounded(&path, MAX_SNAPSHOT_BYTES) {
            Ok(None) => Opened {
                notes: vec![bm::no_snapshot(path.display())],
                store: Store::Dir(dir),
                state: BootState::factory_default(),
            },
            Ok(Some(bytes)) => match snapshot::decode(&bytes) {
                Ok(state) => {
                    let mut notes = vec![bm::state_loaded(path.display())];
                    if snapshot::encode(&state) != bytes {
                        notes.push(bm::not_canonical());
                    }
                    Opened {
                        store: Store::Dir(dir),
                        state,
                        notes,
                    }
                }
                Err(e) => {
                    let kept = std::fs::rename(&path, dir.join(CORRUPT_FILE))
                        .and_then(|()| fsutil::sync_dir(&dir));
                    let note = match kept {
                        Ok(()) => bm::corrupt_kept(path.display(), &e, CORRUPT_FILE),
                        Err(re) => bm::corrupt_not_moved(path.display(), &e, re),
                    };
                    Opened {
                        store: Store::Dir(dir),
                        state: BootState::factory_default(),
                        notes: vec![note],
                    }
                }
            },
            Err(e) => {
                let reason = format!("could not read {} ({e})", path.display());
                Opened {
                    notes: vec![bm::stub_unreadable(&reason)],
                    store: Store::Ram(reason),
                    state: BootState::factory_default(),
                }
            }
        }
    }

    /// Persist `state` (no-op in RAM-only mode).
    pub fn save(&self, state: &BootState) -> Result<(), StoreError> {
        match self {
            Store::Dir(dir) => fsutil::write_atomic(dir, SNAPSHOT_FILE, &snapshot::encode(state))
                .map_err(|source| StoreError::Write {
                    path: dir.join(SNAPSHOT_FILE),
                    source,
                }),
            Store::Ram(_) => Ok(()),
        }
    }

    /// True when the state survives a reboot.
    pub fn is_persistent(&self) -> bool {
        matches!(self, Store::Dir(_))
    }

    /// For the JSON view.
    pub fn persistence(&self) -> Persistence {
        match self {
            Store::Dir(d) => Persistence::File(d.join(SNAPSHOT_FILE)),
            Store::Ram(why) => Persistence::Ram(why.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_planted_at_the_snapshot_temp_path_leaves_its_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let opened = Store::open(Some(d.path()), false);
        assert!(opened.store.is_persistent());
        let dir = d.path().join(SUBDIR);
        std::os::unix::fs::symlink(&victim, dir.join(format!(".{SNAPSHOT_FILE}.tmp"))).unwrap();
        opened.store.save(&opened.state).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let written = std::fs::read(dir.join(SNAPSHOT_FILE)).unwrap();
        assert_eq!(written, snapshot::encode(&opened.state));
        assert!(!dir.join(format!(".{SNAPSHOT_FILE}.tmp")).exists());
    }
}
