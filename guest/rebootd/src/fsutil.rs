//! Small-file persistence shared by `rebootd` and `bootctld`: atomic replace
//! (temp file + fsync + rename + fsync of the directory), bounded reads, and the
//! decision whether a state directory is really persistent.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Replace `dir/name` with `bytes` atomically: a reader (or a power cut) sees
/// either the old or the new content, never a mix. The shared hardened writer
/// ([`nx_guest::fsx::write_atomic`]): a symlink planted at the temp path is
/// removed, never followed.
pub use nx_guest::fsx::write_atomic;

/// Remove `dir/name` (if present) and make the removal durable.
pub use nx_guest::fsx::remove_durable;

/// fsync a directory so a rename/unlink in it survives a power cut.
pub use nx_guest::fsx::sync_dir;

/// Read a whole file of at most `max` bytes. `Ok(None)` when it does not exist;
/// an `InvalidData` error (and no allocation beyond the bound) when it is larger.
/// A symlink as the last path component is refused (`O_NOFOLLOW`): the records under
/// `/state` are never read through a planted link (the procfs/sysfs files read with it
/// are regular files).
pub use nx_guest::fsx::read_bounded_nofollow as read_bounded;

/// Why a daemon runs RAM-only instead of persisting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotPersistent(pub String);

impl std::fmt::Display for NotPersistent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Resolve `state/sub` as the directory a daemon persists into.
///
/// * `state` missing or not a directory → `Err` (RAM-only mode);
/// * `require_mountpoint` and `state` is not a mount point → `Err`: in the guest
///   an unmounted `/state` is just a directory of the initramfs (RAM), and
///   writing there would claim a persistence that does not exist;
/// * `state/sub` is created when missing.
pub fn state_subdir(
    state: &Path,
    sub: &str,
    require_mountpoint: bool,
) -> Result<PathBuf, NotPersistent> {
    let meta = fs::metadata(state)
        .map_err(|e| NotPersistent(format!("state dir {} is missing ({e})", state.display())))?;
    if !meta.is_dir() {
        return Err(NotPersistent(format!(
            "state dir {} is not a directory",
            state.display()
        )));
    }
    if require_mountpoint && !is_mountpoint(state) {
        return Err(NotPersistent(format!(
            "state dir {} is not a mounted filesystem (no /state disk)",
            state.display()
        )));
    }
    let dir = state.join(sub);
    if !dir.is_dir() {
        fs::create_dir(&dir)
            .and_then(|()| sync_dir(state))
            .map_err(|e| NotPersistent(format!("cannot create {} ({e})", dir.display())))?;
    }
    Ok(dir)
}

/// True when `dir` is the root of a mounted filesystem (its device differs
/// from its parent's, or it is `/`).
pub fn is_mountpoint(dir: &Path) -> bool {
    let (Ok(me), Ok(parent)) = (fs::metadata(dir), fs::metadata(dir.join(".."))) else {
        return false;
    };
    me.dev() != parent.dev() || me.ino() == parent.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    // write_atomic / read_bounded / remove_durable themselves are tested in nx_guest::fsx;
    // here: the call site (the next-boot record) against a planted symlink.
    #[test]
    fn next_mode_record_ignores_a_symlink_planted_at_its_temp_path() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let boot = state_subdir(d.path(), "boot", false).unwrap();
        std::os::unix::fs::symlink(&victim, boot.join(".next_mode.tmp")).unwrap();
        let mut rec = crate::record::Store::open(Some(d.path()), false);
        rec.set_next(crate::record::Target::Recovery).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            std::fs::read(boot.join("next_mode")).unwrap(),
            b"recovery\n"
        );
    }

    #[test]
    fn factory_wipe_request_ignores_a_symlink_planted_at_its_temp_path() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("root.pub");
        std::fs::write(&victim, b"precious").unwrap();
        let boot = state_subdir(d.path(), "boot", false).unwrap();
        let tmp = boot.join(format!(".{}.tmp", crate::record::FACTORY_WIPE_FILE));
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let mut rec = crate::record::Store::open(Some(d.path()), false);
        assert!(rec.set_factory_wipe().unwrap());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(crate::record::read_factory_wipe(&boot).unwrap());
        assert!(!tmp.exists() && !tmp.is_symlink());
    }

    #[test]
    fn state_subdir_modes() {
        let d = tempfile::tempdir().unwrap();
        let sub = state_subdir(d.path(), "boot", false).unwrap();
        assert!(sub.is_dir());
        assert!(state_subdir(&d.path().join("missing"), "boot", false).is_err());
        // A tempdir is (almost always) not a mount point.
        if !is_mountpoint(d.path()) {
            assert!(state_subdir(d.path(), "boot", true).is_err());
        }
        assert!(is_mountpoint(Path::new("/")));
    }
}
