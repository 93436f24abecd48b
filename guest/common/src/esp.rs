//! The EFI system partition as the guest sees it (mounted at
//! [`nx_contract::loader::ESP_MOUNT`]): the slots' kernels and initramfs images and the boot
//! entries systemd-boot boots from (layout and names: [`nx_contract::loader`]).
//!
//! Two writers, one job each:
//! * flashd installs a slot's `kernel` and `initrd` segments into `nexus/<slot>/`
//!   ([`Esp::install_file`]: written to a temp file, checked against the manifest's SHA-256,
//!   fsynced, renamed, directory fsynced) — only after the slot's entry was withdrawn;
//! * bootctld, the authority on slot state, projects that state onto the entries: a new
//!   entry with boot counting for a slot on trial ([`Esp::install_entry`], written **last**,
//!   atomically), blessing on confirm, `+0` for a bad slot, a higher generation for a slot made
//!   active, nothing for a slot being installed ([`Esp::withdraw`]).
//!
//! FAT has no atomic rename-over-existing in the journaled sense; every step here is ordered
//! so a power cut leaves either the old entry or the new one usable, never an entry pointing
//! at half-written files: entries are never rewritten in place, a slot's files are replaced
//! only while it has no entry, and each step is fsynced before the next.

use crate::fsx;
use nx_contract::loader::{self, EntryName};
use sha2::{Digest, Sha256};
use std::io;
use std::path::{Path, PathBuf};

/// Most entry files we look at (the device has three; more is someone else's mess).
pub const MAX_ENTRIES: usize = 64;
/// Largest kernel or initramfs we install (the ESP holds two slots and recovery).
pub const MAX_BOOT_FILE: u64 = 96 << 20;

/// Errors of ESP operations. Messages say what failed.
#[derive(Debug, thiserror::Error)]
pub enum EspError {
    /// A filesystem operation failed.
    #[error("ESP {path}: {op}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes did not match the signed manifest: nothing was installed.
    #[error("ESP {path}: content does not match the manifest (sha256 {got}, expected {want}); nothing installed")]
    Mismatch {
        path: PathBuf,
        got: String,
        want: String,
    },
    /// A boot file larger than the ESP can hold.
    #[error("ESP {path}: {len} bytes is more than the {max} bytes a boot file may have")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
    /// The slot has no entry to act on.
    #[error("ESP: slot {slot} has no boot entry")]
    NoEntry { slot: char },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> EspError {
    let path = path.to_path_buf();
    move |source| EspError::Io { op, path, source }
}

/// A slot entry found on the ESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEntry {
    /// The slot it boots.
    pub slot: char,
    /// Its generation (higher: tried first).
    pub generation: u32,
    /// Its file name, parsed (id and boot counter).
    pub name: EntryName,
}

/// The ESP mounted at `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Esp {
    root: PathBuf,
}

impl Esp {
    /// The ESP at `root` (e.g. `/boot/efi`).
    pub fn new(root: impl Into<PathBuf>) -> Esp {
        Esp { root: root.into() }
    }

    /// The ESP at `root` when it looks like ours (it has `loader/entries`).
    pub fn open(root: impl Into<PathBuf>) -> Option<Esp> {
        let esp = Esp::new(root);
        esp.entries_dir().is_dir().then_some(esp)
    }

    /// Its mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn entries_dir(&self) -> PathBuf {
        self.root.join(loader::ENTRIES_DIR)
    }

    /// Every slot entry, highest generation first (the bootloader's order among entries with
    /// tries left). Files that are not slot entries are ignored.
    pub fn slot_entries(&self) -> Result<Vec<SlotEntry>, EspError> {
        let dir = self.entries_dir();
        let mut out = Vec::new();
        for (n, e) in std::fs::read_dir(&dir)
            .map_err(io_err("list", &dir))?
            .enumerate()
        {
            if n >= MAX_ENTRIES {
                break;
            }
            let e = e.map_err(io_err("list", &dir))?;
            let Some(name) = e.file_name().to_str().and_then(EntryName::parse) else {
                continue;
            };
            if let Some((generation, slot)) = loader::parse_slot_entry_id(&name.id) {
                out.push(SlotEntry {
                    slot,
                    generation,
                    name,
                });
            }
        }
        out.sort_by(|a, b| b.generation.cmp(&a.generation).then(a.slot.cmp(&b.slot)));
        Ok(out)
    }

    /// The entry of `slot` (the newest one when there are several).
    pub fn entry_of(&self, slot: char) -> Result<Option<SlotEntry>, EspError> {
        Ok(self.slot_entries()?.into_iter().find(|e| e.slot == slot))
    }

    fn next_generation(&self) -> Result<u32, EspError> {
        Ok(self
            .slot_entries()?
            .first()
            .map_or(1, |e| e.generation.saturating_add(1)))
    }

    /// Remove every entry of `slot` (durably): the slot's files are about to be replaced.
    pub fn withdraw(&self, slot: char) -> Result<usize, EspError> {
        let dir = self.entries_dir();
        let mut n = 0;
        for e in self.slot_entries()?.into_iter().filter(|e| e.slot == slot) {
            fsx::remove_durable(&dir, &e.name.file_name()).map_err(io_err("remove", &dir))?;
            n += 1;
        }
        Ok(n)
    }

    /// Write the entry of `slot` holding `version` as the newest generation, with `tries`
    /// boot-counting tries (`None`: a blessed entry), atomically and durably, then remove the
    /// slot's older entries. Refused when the slot's kernel or initramfs is missing.
    pub fn install_entry(
        &self,
        slot: char,
        version: &str,
        tries: Option<u32>,
    ) -> Result<EntryName, EspError> {
        for f in [loader::KERNEL_FILE, loader::INITRD_FILE] {
            let p = self.root.join(loader::slot_dir(slot)).join(f);
            if !p.is_file() {
                return Err(EspError::Io {
                    op: "find the slot's boot file",
                    path: p,
                    source: io::ErrorKind::NotFound.into(),
                });
            }
        }
        let old = self
            .slot_entries()?
            .into_iter()
            .filter(|e| e.slot == slot)
            .collect::<Vec<_>>();
        let id = loader::slot_entry_id(self.next_generation()?, slot);
        let name = match tries {
            Some(t) => EntryName::with_tries(&id, t),
            None => EntryName { id, counter: None },
        };
        let dir = self.entries_dir();
        fsx::write_atomic(
            &dir,
            &name.file_name(),
            loader::slot_entry_text(slot, version).as_bytes(),
        )
        .map_err(io_err("write entry", &dir))?;
        for e in old {
            fsx::remove_durable(&dir, &e.name.file_name()).map_err(io_err("remove", &dir))?;
        }
        Ok(name)
    }

    fn rename(&self, from: &EntryName, to: &EntryName) -> Result<(), EspError> {
        if from == to {
            return Ok(());
        }
        let dir = self.entries_dir();
        std::fs::rename(dir.join(from.file_name()), dir.join(to.file_name()))
            .map_err(io_err("rename entry", &dir))?;
        fsx::sync_dir(&dir).map_err(io_err("sync", &dir))
    }

    /// Bless `slot`'s entry (drop its boot counter): the boot was confirmed good.
    pub fn bless(&self, slot: char) -> Result<EntryName, EspError> {
        let e = self.entry_of(slot)?.ok_or(EspError::NoEntry { slot })?;
        let to = e.name.blessed();
        self.rename(&e.name, &to)?;
        Ok(to)
    }

    /// Mark `slot`'s entry bad (`+0`): the bootloader sorts it last. `Ok(None)`: no entry.
    pub fn mark_bad(&self, slot: char) -> Result<Option<EntryName>, EspError> {
        let Some(e) = self.entry_of(slot)? else {
            return Ok(None);
        };
        let done = e.name.counter.map_or(0, |c| c.done);
        let to = EntryName {
            id: e.name.id.clone(),
            counter: Some(loader::Counter { left: 0, done }),
        };
        self.rename(&e.name, &to)?;
        Ok(Some(to))
    }

    /// Make `slot`'s entry the newest generation (it is booted first), keeping its counter.
    pub fn promote(&self, slot: char) -> Result<EntryName, EspError> {
        let e = self.entry_of(slot)?.ok_or(EspError::NoEntry { slot })?;
        if self.next_generation()? == e.generation.saturating_add(1) {
            return Ok(e.name);
        }
        let to = EntryName {
            id: loader::slot_entry_id(self.next_generation()?, slot),
            counter: e.name.counter,
        };
        self.rename(&e.name, &to)?;
        Ok(to)
    }

    /// Install `bytes` as `rel` (e.g. `nexus/b/vmlinuz`) if their SHA-256 is `sha256`
    /// (lower-case hex, from the signed manifest): temp file, check, fsync, rename, directory
    /// fsync. A mismatch installs nothing.
    pub fn install_file(&self, rel: &str, bytes: &[u8], sha256: &str) -> Result<(), EspError> {
        let path = self.root.join(rel);
        let len = bytes.len() as u64;
        if len > MAX_BOOT_FILE {
            return Err(EspError::TooLarge {
                path,
                len,
                max: MAX_BOOT_FILE,
            });
        }
        let got = hex::encode(Sha256::digest(bytes));
        if !got.eq_ignore_ascii_case(sha256) {
            return Err(EspError::Mismatch {
                path,
                got,
                want: sha256.to_string(),
            });
        }
        let (dir, name) = fsx::split_path(&path).map_err(io_err("name", &path))?;
        std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        fsx::write_atomic(dir, name, bytes).map_err(io_err("write", &path))
    }
}

/// Find the ESP (GPT partition [`loader::ESP_PARTITION`]) and mount it (vfat) on
/// [`loader::ESP_MOUNT`]. `Ok(None)`: no such partition (no slot disk attached).
pub fn find_and_mount() -> crate::Result<Option<PathBuf>> {
    let Some(dev) = crate::blockdev::find_partition(
        Path::new(crate::blockdev::SYS_CLASS_BLOCK),
        Path::new("/dev"),
        loader::ESP_PARTITION,
    )?
    else {
        return Ok(None);
    };
    crate::sys::mkdir_p(Path::new(loader::ESP_MOUNT))?;
    // DIRSYNC: on vfat a rename creates the new directory entry with size 0 and no first
    // cluster; the real values reach the disk only when the inode is written back (seconds
    // later), and an fsync of the directory writes the empty entry. With DIRSYNC the rename
    // writes the inode synchronously, so an entry or boot file renamed into place survives a
    // power cut (found by `cargo xtask crash --path install`: a confirmed update lost).
    rustix::mount::mount(
        dev.as_path(),
        loader::ESP_MOUNT,
        "vfat",
        rustix::mount::MountFlags::DIRSYNC
            | rustix::mount::MountFlags::NOATIME
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NOEXEC,
        Some(c"umask=0077"),
    )
    .map_err(|e| crate::Error::Sys {
        what: format!("mount {} on {} (vfat)", dev.display(), loader::ESP_MOUNT),
        source: e.into(),
    })?;
    Ok(Some(dev))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esp() -> (tempfile::TempDir, Esp) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(loader::ENTRIES_DIR)).unwrap();
        let esp = Esp::open(d.path()).unwrap();
        (d, esp)
    }

    fn files(esp: &Esp) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(esp.entries_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn boot_files(esp: &Esp, slot: char) {
        for (f, b) in [(loader::KERNEL_FILE, b"k"), (loader::INITRD_FILE, b"i")] {
            let rel = format!("{}/{f}", loader::slot_dir(slot));
            esp.install_file(&rel, b, &hex::encode(Sha256::digest(b)))
                .unwrap();
        }
    }

    #[test]
    fn an_update_projects_onto_entries() {
        let (_d, esp) = esp();
        // Factory: slot a blessed.
        assert!(esp.install_entry('a', "1", None).is_err(), "no kernel yet");
        boot_files(&esp, 'a');
        esp.install_entry('a', "1", None).unwrap();
        assert_eq!(files(&esp), ["nexus-1-a.conf"]);
        // Install into b: withdraw (none), files, entry with tries last.
        assert_eq!(esp.withdraw('b').unwrap(), 0);
        boot_files(&esp, 'b');
        let e = esp.install_entry('b', "2", Some(3)).unwrap();
        assert_eq!(e.file_name(), "nexus-2-b+3.conf");
        assert_eq!(files(&esp), ["nexus-1-a.conf", "nexus-2-b+3.conf"]);
        let text = std::fs::read_to_string(esp.entries_dir().join("nexus-2-b+3.conf")).unwrap();
        assert!(text.contains("nexus.slot=b\n"), "{text}");
        // The bootloader spends a try; confirm blesses.
        std::fs::rename(
            esp.entries_dir().join("nexus-2-b+3.conf"),
            esp.entries_dir().join("nexus-2-b+2-1.conf"),
        )
        .unwrap();
        assert_eq!(esp.bless('b').unwrap().file_name(), "nexus-2-b.conf");
        assert_eq!(files(&esp), ["nexus-1-a.conf", "nexus-2-b.conf"]);
        // Next install goes to a: its entry is withdrawn first.
        assert_eq!(esp.withdraw('a').unwrap(), 1);
        assert_eq!(files(&esp), ["nexus-2-b.conf"]);
        boot_files(&esp, 'a');
        esp.install_entry('a', "3", Some(3)).unwrap();
        assert_eq!(files(&esp), ["nexus-2-b.conf", "nexus-3-a+3.conf"]);
        // a fails: bad, sorted last by the bootloader; b made active again stays b.
        assert_eq!(
            esp.mark_bad('a').unwrap().unwrap().file_name(),
            "nexus-3-a+0.conf"
        );
        assert_eq!(esp.promote('b').unwrap().file_name(), "nexus-4-b.conf");
        assert_eq!(files(&esp), ["nexus-3-a+0.conf", "nexus-4-b.conf"]);
        // Promoting the newest is a no-op.
        assert_eq!(esp.promote('b').unwrap().file_name(), "nexus-4-b.conf");
        // Reinstalling a slot replaces its older entry.
        esp.install_entry('b', "4", Some(2)).unwrap();
        assert_eq!(files(&esp), ["nexus-3-a+0.conf", "nexus-5-b+2.conf"]);
    }

    #[test]
    fn files_that_do_not_match_are_not_installed() {
        let (_d, esp) = esp();
        let e = esp
            .install_file(
                "nexus/a/vmlinuz",
                b"evil",
                &hex::encode(Sha256::digest(b"good")),
            )
            .unwrap_err();
        assert!(matches!(e, EspError::Mismatch { .. }), "{e}");
        assert!(!esp.root().join("nexus/a/vmlinuz").exists());
    }

    #[test]
    fn foreign_files_are_ignored() {
        let (_d, esp) = esp();
        for f in ["recovery.conf", "README", "nexus-b.conf", "nexus-1-c.conf"] {
            std::fs::write(esp.entries_dir().join(f), "x").unwrap();
        }
        assert!(esp.slot_entries().unwrap().is_empty());
        assert!(matches!(
            esp.bless('a'),
            Err(EspError::NoEntry { slot: 'a' })
        ));
        assert_eq!(esp.mark_bad('a').unwrap(), None);
    }
}
