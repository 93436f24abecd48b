//! The bootloader's side of the boot contract (systemd-boot, the Boot Loader Specification and
//! the Boot Loader Interface): entry file names with boot counters, the entries of the device,
//! and the EFI variables the bootloader and userspace exchange. Sans-IO: names and bytes only.
//!
//! Boot counting (BLS "Boot counting"): an entry file `ID+LEFT[-DONE].conf` is tried while
//! `LEFT > 0`; on each try the bootloader renames it to `ID+(LEFT-1)-(DONE+1).conf`. Userspace
//! blesses a good boot by renaming it to `ID.conf`; an entry with `LEFT == 0` is sorted last,
//! so the bootloader falls back to the other slot by itself.

/// The vendor GUID of systemd's Boot Loader Interface variables.
pub const LOADER_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";
/// Attributes of a variable userspace writes: non-volatile, boot service, runtime access.
pub const EFI_VARIABLE_NV_BS_RT: u32 = 0x07;

/// Variables the bootloader sets for userspace (read-only for us).
pub const LOADER_ENTRY_SELECTED: &str = "LoaderEntrySelected";
/// The ESP path of the entry file that was booted with a counter (absent when it had none).
pub const LOADER_BOOT_COUNT_PATH: &str = "LoaderBootCountPath";
/// Every entry id the bootloader knew.
pub const LOADER_ENTRIES: &str = "LoaderEntries";
/// Variables userspace sets for the bootloader.
pub const LOADER_ENTRY_ONESHOT: &str = "LoaderEntryOneShot";
/// The default entry (overrides `loader.conf`'s `default`).
pub const LOADER_ENTRY_DEFAULT: &str = "LoaderEntryDefault";

/// The file name of variable `name` in efivarfs (`NAME-GUID`).
pub fn efivarfs_name(name: &str) -> String {
    format!("{name}-{LOADER_GUID}")
}

/// Where the normal init and recovery-init mount the ESP (vfat) in the guest.
pub const ESP_MOUNT: &str = "/boot/efi";
/// The GPT partition name of the ESP on the slot disk.
pub const ESP_PARTITION: &str = "esp";
/// The boot entries directory on the ESP.
pub const ENTRIES_DIR: &str = "loader/entries";
/// `loader.conf` on the ESP.
pub const LOADER_CONF: &str = "loader/loader.conf";
/// systemd-boot on the ESP (the removable-media path: no NVRAM boot entry needed).
pub const BOOTLOADER_EFI: &str = "EFI/BOOT/BOOTX64.EFI";
/// The pattern of `loader.conf`'s `default`: the first slot entry in the bootloader's order.
/// Entries are sorted by id, newest generation first, and entries with no tries left last,
/// so the newest installed slot is tried first and a slot out of tries falls behind the other
/// one — the fallback needs no userspace.
pub const DEFAULT_PATTERN: &str = "nexus-*";
/// The kernel file of a slot's (or recovery's) directory on the ESP.
pub const KERNEL_FILE: &str = "vmlinuz";
/// The initramfs file of a slot's (or recovery's) directory on the ESP.
pub const INITRD_FILE: &str = "initrd.cpio";
/// The kernel command line every entry starts with (serial console; a panic resets at once,
/// so the bootloader counts the failed try).
pub const BASE_OPTIONS: &str = "console=ttyS0 panic=-1 rdinit=/init quiet";
/// What the recovery entry adds to [`BASE_OPTIONS`].
pub const RECOVERY_OPTIONS: &str = "recovery=1 nexus.target=recovery";
/// What a slot entry adds to [`BASE_OPTIONS`] (then `nexus.slot=<s>`).
pub const NORMAL_OPTIONS: &str = "nexus.target=normal";
/// The QEMU firmware config file (`-fw_cfg name=…`) whose words the guest adds to its
/// command line: how a test harness passes options (`nexus.selftest=1`) when the boot entry
/// owns the kernel command line.
pub const FW_CFG_CMDLINE: &str = "opt/com.nexus/cmdline";

/// The kernel command-line key naming the slot an entry boots.
pub const SLOT_OPTION: &str = "nexus.slot";

/// The kernel command-line key recovery-init turns into flashd's `--verify-threads N` (the
/// threads that verify the 1 MiB pieces of a segment; 0 = one per vCPU, flashd's default).
/// The guest benchmark boots with `nexus.verify_threads=1` for its one-thread row (b1).
pub const VERIFY_THREADS_OPTION: &str = "nexus.verify_threads";
/// Most piece-verification threads flashd runs (each holds a 1 MiB read buffer, so its
/// memory stays bounded): flashd clamps `--verify-threads` to it, and recovery-init accepts
/// [`VERIFY_THREADS_OPTION`] values up to it (anything else is ignored).
pub const MAX_VERIFY_THREADS: u32 = 4;

/// The directory of slot `slot`'s kernel and initramfs on the ESP (`nexus/a`).
pub fn slot_dir(slot: char) -> String {
    format!("nexus/{slot}")
}

/// In a slot's normal initramfs: the version of the image it belongs to (init prints it).
pub const INITRD_VERSION_FILE: &str = "etc/nexus/version";

/// The directory of the recovery kernel and ramdisk on the ESP.
pub const RECOVERY_DIR: &str = "nexus/recovery";

/// Entry id of slot `slot` installed as generation `generation`: `nexus-7-b`. The
/// bootloader sorts ids newest version first, so a higher generation is tried first.
pub fn slot_entry_id(generation: u32, slot: char) -> String {
    format!("nexus-{generation}-{slot}")
}

/// The generation and slot of a slot entry id (`nexus-7-b` → `(7, 'b')`).
pub fn parse_slot_entry_id(id: &str) -> Option<(u32, char)> {
    let rest = id.strip_prefix("nexus-")?;
    let (generation, slot) = rest.rsplit_once('-')?;
    if generation.is_empty()
        || generation.len() > 9
        || !generation.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let slot = match slot {
        "a" => 'a',
        "b" => 'b',
        _ => return None,
    };
    Some((generation.parse().ok()?, slot))
}

/// Entry id of the recovery entry.
pub const RECOVERY_ENTRY_ID: &str = "recovery";

/// A boot loader specification type #1 entry.
pub fn entry_text(title: &str, version: Option<&str>, dir: &str, options: &str) -> String {
    let version = version
        .map(|v| format!("version {v}\n"))
        .unwrap_or_default();
    format!(
        "title {title}\n{version}linux /{dir}/{KERNEL_FILE}\ninitrd /{dir}/{INITRD_FILE}\noptions {options}\n"
    )
}

/// The entry of slot `slot` holding `version`.
pub fn slot_entry_text(slot: char, version: &str) -> String {
    entry_text(
        &format!("nexus {version} (slot {slot})"),
        Some(version),
        &slot_dir(slot),
        &format!("{BASE_OPTIONS} {NORMAL_OPTIONS} {SLOT_OPTION}={slot}"),
    )
}

/// The recovery entry.
pub fn recovery_entry_text() -> String {
    entry_text(
        "nexus recovery",
        None,
        RECOVERY_DIR,
        &format!("{BASE_OPTIONS} {RECOVERY_OPTIONS}"),
    )
}

/// `loader.conf`: no menu (hold a key at start to get it), the default pattern, no editor.
pub fn loader_conf() -> String {
    format!("timeout 0\ndefault {DEFAULT_PATTERN}\neditor no\nconsole-mode keep\n")
}

/// An entry file name, parsed: `ID[+LEFT[-DONE]].conf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryName {
    /// The entry id (what `LoaderEntrySelected` and the one-shot variable name).
    pub id: String,
    /// Tries left and done; `None`: no counter (a blessed or counter-less entry).
    pub counter: Option<Counter>,
}

/// A boot counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter {
    pub left: u32,
    pub done: u32,
}

/// Longest entry id we accept (ids come from file names on the ESP).
pub const MAX_ENTRY_ID: usize = 64;

impl EntryName {
    /// Parse a file name (`nexus-b+2-1.conf`); `None` for anything that is not a `.conf`
    /// entry with a plain id (`[A-Za-z0-9._-]`, at most [`MAX_ENTRY_ID`]).
    pub fn parse(file: &str) -> Option<EntryName> {
        let stem = file.strip_suffix(".conf")?;
        let (id, counter) = match stem.rsplit_once('+') {
            None => (stem, None),
            Some((id, c)) => {
                let (left, done) = match c.split_once('-') {
                    Some((l, d)) => (l, Some(d)),
                    None => (c, None),
                };
                let num = |s: &str| -> Option<u32> {
                    if s.is_empty() || s.len() > 6 || !s.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    s.parse().ok()
                };
                let left = num(left)?;
                let done = match done {
                    Some(d) => num(d)?,
                    None => 0,
                };
                (id, Some(Counter { left, done }))
            }
        };
        let valid = !id.is_empty()
            && id.len() <= MAX_ENTRY_ID
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        valid.then(|| EntryName {
            id: id.to_string(),
            counter,
        })
    }

    /// The file name (`ID.conf`, `ID+LEFT.conf` when nothing was tried yet, else
    /// `ID+LEFT-DONE.conf`).
    pub fn file_name(&self) -> String {
        match self.counter {
            None => format!("{}.conf", self.id),
            Some(Counter { left, done: 0 }) => format!("{}+{left}.conf", self.id),
            Some(Counter { left, done }) => format!("{}+{left}-{done}.conf", self.id),
        }
    }

    /// A fresh entry with `tries` tries (`ID+TRIES.conf`).
    pub fn with_tries(id: &str, tries: u32) -> EntryName {
        EntryName {
            id: id.to_string(),
            counter: Some(Counter {
                left: tries,
                done: 0,
            }),
        }
    }

    /// The blessed entry (`ID.conf`): a boot that was confirmed good.
    pub fn blessed(&self) -> EntryName {
        EntryName {
            id: self.id.clone(),
            counter: None,
        }
    }

    /// No tries left: the bootloader sorts it last and never picks it while another entry
    /// can boot.
    pub fn is_bad(&self) -> bool {
        matches!(self.counter, Some(Counter { left: 0, .. }))
    }

    /// The id systemd-boot uses in `LoaderEntrySelected`, `LoaderEntries`, the one-shot and
    /// the default variable: the file name without its counter (`nexus-a.conf` for
    /// `nexus-a+2-1.conf`).
    pub fn loader_id(&self) -> String {
        format!("{}.conf", self.id)
    }

    /// The bootloader's rename on a try (what systemd-boot does before booting it).
    pub fn tried(&self) -> EntryName {
        EntryName {
            id: self.id.clone(),
            counter: self.counter.map(|c| Counter {
                left: c.left.saturating_sub(1),
                done: c.done.saturating_add(1),
            }),
        }
    }
}

/// The payload of a Boot Loader Interface string variable: NUL-terminated UTF-16LE.
pub fn encode_utf16_var(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain(std::iter::once(0))
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// UTF-16LE code units of `b` (`None` for an odd length).
fn utf16_units(b: &[u8]) -> Option<Vec<u16>> {
    if b.len() % 2 != 0 {
        return None;
    }
    Some(
        b.chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect(),
    )
}

/// Decode a string variable's payload (trailing NULs dropped); `None` when not UTF-16LE.
pub fn decode_utf16_var(b: &[u8]) -> Option<String> {
    let units = utf16_units(b)?;
    let end = units.iter().position(|&u| u == 0).unwrap_or(units.len());
    String::from_utf16(&units[..end]).ok()
}

/// Decode `LoaderEntries`: NUL-separated UTF-16LE ids.
pub fn decode_utf16_list(b: &[u8]) -> Option<Vec<String>> {
    utf16_units(b)?
        .split(|&u| u == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf16(s).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_systemd_boot() {
        // What the platform notes saw: +3 → +2-1 → +1-2.
        let e = EntryName::with_tries("nexus-a", 3);
        assert_eq!(e.file_name(), "nexus-a+3.conf");
        assert_eq!(e.tried().file_name(), "nexus-a+2-1.conf");
        assert_eq!(e.tried().tried().file_name(), "nexus-a+1-2.conf");
        let bad = e.tried().tried().tried();
        assert_eq!(bad.file_name(), "nexus-a+0-3.conf");
        assert!(bad.is_bad());
        assert_eq!(bad.blessed().file_name(), "nexus-a.conf");
        for f in [
            "nexus-a+3.conf",
            "nexus-a+2-1.conf",
            "nexus-b.conf",
            "recovery.conf",
        ] {
            assert_eq!(EntryName::parse(f).unwrap().file_name(), f);
        }
        assert_eq!(EntryName::parse("nexus-b+0-3.conf").unwrap().id, "nexus-b");
        assert_eq!(
            EntryName::parse("nexus-b+1-2.conf").unwrap().loader_id(),
            "nexus-b.conf"
        );
    }

    #[test]
    fn slot_entries() {
        assert_eq!(slot_entry_id(7, 'b'), "nexus-7-b");
        assert_eq!(parse_slot_entry_id("nexus-7-b"), Some((7, 'b')));
        assert_eq!(parse_slot_entry_id("nexus-12-a"), Some((12, 'a')));
        for bad in [
            "nexus-b",
            "nexus--a",
            "nexus-1-c",
            "recovery",
            "nexus-x-a",
            "nexus-1234567890-a",
        ] {
            assert_eq!(parse_slot_entry_id(bad), None, "{bad}");
        }
        let e = EntryName::parse("nexus-3-a+2-1.conf").unwrap();
        assert_eq!(parse_slot_entry_id(&e.id), Some((3, 'a')));
        let t = slot_entry_text('b', "2");
        assert_eq!(
            t,
            "title nexus 2 (slot b)\nversion 2\nlinux /nexus/b/vmlinuz\ninitrd /nexus/b/initrd.cpio\n\
             options console=ttyS0 panic=-1 rdinit=/init quiet nexus.target=normal nexus.slot=b\n"
        );
        assert!(recovery_entry_text().contains("recovery=1 nexus.target=recovery\n"));
        assert!(loader_conf().contains("default nexus-*\n"));
    }

    #[test]
    fn hostile_names_are_refused() {
        for f in [
            "nexus-a",
            ".conf",
            "+3.conf",
            "a/b.conf",
            "nexus-a+x.conf",
            "nexus-a+3-.conf",
            "nexus-a+99999999.conf",
            "ä.conf",
        ] {
            assert_eq!(EntryName::parse(f), None, "{f}");
        }
        assert_eq!(EntryName::parse(&format!("{}.conf", "a".repeat(65))), None);
    }

    #[test]
    fn utf16_variables() {
        // The one-shot of the platform notes: "recovery.conf" as UTF-16LE with a NUL.
        let b = encode_utf16_var("recovery.conf");
        assert_eq!(&b[..4], &[b'r', 0, b'e', 0]);
        assert_eq!(&b[b.len() - 2..], &[0, 0]);
        assert_eq!(decode_utf16_var(&b).as_deref(), Some("recovery.conf"));
        assert_eq!(decode_utf16_var(&[1]), None);
        let list = [
            encode_utf16_var("nexus-a.conf"),
            encode_utf16_var("recovery.conf"),
        ]
        .concat();
        assert_eq!(
            decode_utf16_list(&list).unwrap(),
            vec!["nexus-a.conf", "recovery.conf"]
        );
        assert_eq!(
            efivarfs_name(LOADER_ENTRY_ONESHOT),
            "LoaderEntryOneShot-4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
        );
    }
}
