//! The `/state` disk: layout, mounting, and the one-shot next-boot record.
//!
//! Layout (ARCHITECTURE.md): `apps content settings trust boot flash recovery bootctl`.
//! rebootd alone writes `/state/boot/next_mode`; the boot firmware (the QEMU runner) reads it
//! and the init that was booted for that mode consumes it.

use crate::{blockdev, bounded, Error, Result};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nx_contract::state::MAX_NEXT_MODE;
pub use nx_contract::state::NEXT_MODE;
pub use nx_contract::state::{STATE_DIRS, STATE_LABEL, STATE_MOUNT};
pub use nx_contract::NextBoot;

/// Read the next-boot record under `state_root`. `Ok(None)`: no record. A record that is
/// present but not `normal`/`recovery` (or too large) is an [`Error::Invalid`]/[`Error::TooLarge`].
pub fn read_next_mode(state_root: &Path) -> Result<Option<NextBoot>> {
    let path = state_root.join(NEXT_MODE);
    match bounded::read_string_opt(&path, MAX_NEXT_MODE)? {
        None => Ok(None),
        Some(text) => NextBoot::parse_record(&text)
            .map(Some)
            .ok_or(Error::Invalid {
                what: "next-boot record /state/boot/next_mode",
                value: text.chars().take(MAX_NEXT_MODE).collect(),
            }),
    }
}

/// Remove the one-shot record (and make the removal durable). Missing is fine.
pub fn consume_next_mode(state_root: &Path) -> Result<()> {
    let path = state_root.join(NEXT_MODE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("remove", path, e)),
    }
    let dir = state_root.join("boot");
    let d = std::fs::File::open(&dir).map_err(|e| Error::io("open", &dir, e))?;
    d.sync_all().map_err(|e| Error::io("fsync", &dir, e))
}

/// Create any missing top-level directory of the layout (an older disk, or one made by hand).
pub fn ensure_layout(state_root: &Path) -> Result<()> {
    for d in STATE_DIRS {
        let p = state_root.join(d);
        if !p.is_dir() {
            std::fs::create_dir_all(&p).map_err(|e| Error::io("create", &p, e))?;
        }
    }
    Ok(())
}

/// Find the ext4 disk labelled `state` (waiting, bounded, for the virtio disks to appear) and
/// mount it read-write at `/state`. `Ok(None)`: no such disk (a run without state.img).
pub fn find_and_mount() -> Result<Option<PathBuf>> {
    blockdev::wait_for_virtio_disks(Duration::from_secs(3))?;
    let Some(dev) = blockdev::find_by_ext4_label(
        Path::new(blockdev::SYS_CLASS_BLOCK),
        Path::new("/dev"),
        STATE_LABEL,
    )?
    else {
        return Ok(None);
    };
    crate::sys::mkdir_p(Path::new(STATE_MOUNT))?;
    rustix::mount::mount(
        dev.as_path(),
        STATE_MOUNT,
        "ext4",
        rustix::mount::MountFlags::NOATIME
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOSUID,
        None,
    )
    .map_err(|e| Error::Sys {
        what: format!("mount {} on {STATE_MOUNT} (ext4)", dev.display()),
        source: e.into(),
    })?;
    ensure_layout(Path::new(STATE_MOUNT))?;
    Ok(Some(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_mode_record() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_next_mode(dir.path()).unwrap(), None);
        ensure_layout(dir.path()).unwrap();
        for d in STATE_DIRS {
            assert!(dir.path().join(d).is_dir());
        }
        std::fs::write(dir.path().join(NEXT_MODE), "recovery\n").unwrap();
        assert_eq!(
            read_next_mode(dir.path()).unwrap(),
            Some(NextBoot::Recovery)
        );
        consume_next_mode(dir.path()).unwrap();
        assert_eq!(read_next_mode(dir.path()).unwrap(), None);
        consume_next_mode(dir.path()).unwrap();

        std::fs::write(dir.path().join(NEXT_MODE), "rm -rf /").unwrap();
        assert!(matches!(
            read_next_mode(dir.path()),
            Err(Error::Invalid { .. })
        ));
        std::fs::write(dir.path().join(NEXT_MODE), "x".repeat(1000)).unwrap();
        assert!(matches!(
            read_next_mode(dir.path()),
            Err(Error::TooLarge { .. })
        ));
    }
}
