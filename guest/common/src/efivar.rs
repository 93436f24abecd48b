//! EFI variables through efivarfs (`/sys/firmware/efi/efivars`, module `efivarfs.ko`): the
//! Boot Loader Interface between systemd-boot and userspace (`nx_contract::loader`).
//!
//! An efivarfs file is the variable's 4-byte attributes (u32 LE) followed by its data, and it
//! must be written with a single `write(2)`. The kernel marks most variables immutable
//! (`FS_IMMUTABLE_FL`): replacing or removing one first clears that flag. Reads are bounded;
//! names are checked (no path separators) before they become part of a path.

use crate::{Error, Result};
use nx_contract::loader;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Where efivarfs is mounted.
pub const EFIVARFS: &str = "/sys/firmware/efi/efivars";

/// Mount efivarfs on [`EFIVARFS`] when the machine booted through UEFI (`/sys/firmware/efi`
/// exists). `Ok(false)`: not a UEFI boot (direct kernel boot), nothing to mount.
pub fn mount() -> crate::Result<bool> {
    if !Path::new("/sys/firmware/efi").is_dir() {
        return Ok(false);
    }
    rustix::mount::mount(
        "efivarfs",
        EFIVARFS,
        "efivarfs",
        rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC,
        None,
    )
    .map_err(|e| crate::Error::Sys {
        what: format!("mount efivarfs on {EFIVARFS}"),
        source: e.into(),
    })?;
    Ok(true)
}
/// Largest variable we read (ours are a few dozen bytes; `LoaderEntries` lists every entry).
pub const MAX_VAR: usize = 16 * 1024;

/// The Boot Loader Interface variables in one efivarfs directory.
#[derive(Debug, Clone)]
pub struct LoaderVars {
    dir: PathBuf,
}

impl LoaderVars {
    /// Variables under `dir` (efivarfs, or a plain directory in tests).
    pub fn new(dir: impl Into<PathBuf>) -> LoaderVars {
        LoaderVars { dir: dir.into() }
    }

    /// The system's efivarfs.
    pub fn system() -> LoaderVars {
        LoaderVars::new(EFIVARFS)
    }

    /// Whether the directory exists (no efivarfs: not booted by UEFI, or not mounted).
    pub fn available(&self) -> bool {
        self.dir.is_dir()
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        if name.is_empty()
            || name.len() > 64
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(Error::Invalid {
                what: "EFI variable name",
                value: name.chars().take(64).collect(),
            });
        }
        Ok(self.dir.join(loader::efivarfs_name(name)))
    }

    /// Attributes and data of variable `name`; `Ok(None)` when it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<(u32, Vec<u8>)>> {
        let path = self.path(name)?;
        let f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", path, e)),
        };
        let mut buf = Vec::new();
        f.take(MAX_VAR as u64 + 5)
            .read_to_end(&mut buf)
            .map_err(|e| Error::io("read", &path, e))?;
        if buf.len() > MAX_VAR + 4 {
            return Err(Error::TooLarge { path, max: MAX_VAR });
        }
        let Some((attrs, data)) = buf.split_first_chunk::<4>() else {
            return Err(Error::Invalid {
                what: "EFI variable (shorter than its attributes)",
                value: path.display().to_string(),
            });
        };
        Ok(Some((u32::from_le_bytes(*attrs), data.to_vec())))
    }

    /// A string variable (NUL-terminated UTF-16LE); `Ok(None)` when it does not exist.
    pub fn read_string(&self, name: &str) -> Result<Option<String>> {
        match self.read(name)? {
            None => Ok(None),
            Some((_, data)) => loader::decode_utf16_var(&data)
                .map(Some)
                .ok_or(Error::Invalid {
                    what: "EFI string variable (not UTF-16LE)",
                    value: name.to_string(),
                }),
        }
    }

    /// Create or replace variable `name` (non-volatile, boot service and runtime access).
    pub fn write(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        clear_immutable(&path)?;
        let mut payload = Vec::with_capacity(4 + data.len());
        payload.extend_from_slice(&loader::EFI_VARIABLE_NV_BS_RT.to_le_bytes());
        payload.extend_from_slice(data);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        // One write(2): efivarfs takes the whole variable at once.
        let n = f
            .write(&payload)
            .map_err(|e| Error::io("write", &path, e))?;
        if n != payload.len() {
            return Err(Error::Sys {
                what: format!(
                    "short write of {} ({n} of {} bytes)",
                    path.display(),
                    payload.len()
                ),
                source: std::io::Error::from(std::io::ErrorKind::WriteZero),
            });
        }
        Ok(())
    }

    /// Create or replace a string variable (NUL-terminated UTF-16LE).
    pub fn write_string(&self, name: &str, value: &str) -> Result<()> {
        self.write(name, &loader::encode_utf16_var(value))
    }

    /// Remove variable `name`; missing is fine.
    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path(name)?;
        if !path.exists() {
            return Ok(());
        }
        clear_immutable(&path)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", path, e)),
        }
    }
}

/// Clear `FS_IMMUTABLE_FL` of an existing efivarfs file (a plain file system without the flag
/// or without the ioctl is fine).
fn clear_immutable(path: &Path) -> Result<()> {
    use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let Ok(flags) = ioctl_getflags(&f) else {
        return Ok(());
    };
    if flags.contains(IFlags::IMMUTABLE) {
        ioctl_setflags(&f, flags - IFlags::IMMUTABLE).map_err(|e| Error::Sys {
            what: format!("clear the immutable flag of {}", path.display()),
            source: e.into(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_remove_in_a_plain_directory() {
        let d = tempfile::tempdir().unwrap();
        let v = LoaderVars::new(d.path());
        assert!(v.available());
        assert_eq!(v.read(loader::LOADER_ENTRY_ONESHOT).unwrap(), None);
        v.write_string(loader::LOADER_ENTRY_ONESHOT, "recovery.conf")
            .unwrap();
        let raw = std::fs::read(
            d.path()
                .join(loader::efivarfs_name(loader::LOADER_ENTRY_ONESHOT)),
        )
        .unwrap();
        // The platform notes' bytes: attributes 07 00 00 00, then UTF-16LE with a NUL.
        assert_eq!(&raw[..6], &[7, 0, 0, 0, b'r', 0]);
        assert_eq!(&raw[raw.len() - 2..], &[0, 0]);
        assert_eq!(
            v.read_string(loader::LOADER_ENTRY_ONESHOT)
                .unwrap()
                .as_deref(),
            Some("recovery.conf")
        );
        v.write_string(loader::LOADER_ENTRY_ONESHOT, "nexus-a.conf")
            .unwrap();
        assert_eq!(
            v.read_string(loader::LOADER_ENTRY_ONESHOT)
                .unwrap()
                .as_deref(),
            Some("nexus-a.conf")
        );
        v.remove(loader::LOADER_ENTRY_ONESHOT).unwrap();
        v.remove(loader::LOADER_ENTRY_ONESHOT).unwrap();
        assert_eq!(v.read(loader::LOADER_ENTRY_ONESHOT).unwrap(), None);
    }

    #[test]
    fn names_and_sizes_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let v = LoaderVars::new(d.path());
        assert!(v.write("../x", b"").is_err());
        assert!(v.read("a/b").is_err());
        let big = d.path().join(loader::efivarfs_name("LoaderEntries"));
        std::fs::write(&big, vec![0u8; MAX_VAR + 100]).unwrap();
        assert!(matches!(
            v.read("LoaderEntries"),
            Err(Error::TooLarge { .. })
        ));
        std::fs::write(&big, [7u8, 0]).unwrap();
        assert!(matches!(
            v.read("LoaderEntries"),
            Err(Error::Invalid { .. })
        ));
    }
}
