//! The boot firmware's decision: a pending factory wipe (`/boot/factory_wipe` exists) boots
//! recovery whatever else is recorded; otherwise the one-shot next-boot record
//! `/boot/next_mode` picks the ramdisk. Both are read from `state.img` with `debugfs`
//! (read-only; QEMU is stopped while we read). The records are only read here; the init that
//! boots for them consumes them (recovery-init removes the wipe request once the wipe is done).

use crate::BootTarget;
use nx_contract::state;
use std::path::Path;
use std::process::Command;

/// Largest record we accept.
const MAX_RECORD: usize = state::MAX_NEXT_MODE;

/// Parse the record's content: `normal` / `recovery` (surrounding whitespace ignored).
pub fn parse_record(text: &[u8]) -> Result<Option<BootTarget>, String> {
    if text.len() > MAX_RECORD {
        return Err(format!("record is {} bytes (max {MAX_RECORD})", text.len()));
    }
    let s = String::from_utf8_lossy(text);
    match s.trim() {
        "" => Ok(None),
        other => BootTarget::parse(other)
            .map(Some)
            .ok_or_else(|| format!("unknown mode {other:?}")),
    }
}

/// Read `/boot/next_mode` from `state_img`. `Ok(None)`: no record.
pub fn read_next_mode(debugfs: &Path, state_img: &Path) -> Result<Option<BootTarget>, String> {
    let out = Command::new(debugfs)
        .arg("-R")
        .arg(format!("cat /{}", state::NEXT_MODE))
        .arg(state_img)
        .output()
        .map_err(|e| {
            format!(
                "could not run {}: {e} (apt-get install -y e2fsprogs)",
                debugfs.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "debugfs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // A missing file is reported on stderr with empty stdout.
    parse_record(&out.stdout)
}

/// The factory-wipe request rebootd writes (`factoryWipe()`), as a path in state.img
/// (`/` + `nx_contract::state::FACTORY_WIPE`; a test checks they agree).
pub const FACTORY_WIPE: &str = "/boot/factory_wipe";

/// Whether `debugfs -R "ls -p /boot"` output lists an entry called `name`. Each line is
/// `/inode/mode/uid/gid/name/size/`; names with a `/` cannot occur.
pub fn listing_has(listing: &str, name: &str) -> bool {
    listing.lines().any(|l| {
        let fields: Vec<&str> = l.trim().split('/').collect();
        // ["", inode, mode, uid, gid, name, size, ""]
        fields.len() >= 7 && fields.get(5) == Some(&name)
    })
}

/// Whether `/boot/factory_wipe` exists in `state_img` (a wipe request is pending).
pub fn wipe_pending(debugfs: &Path, state_img: &Path) -> Result<bool, String> {
    let out = Command::new(debugfs)
        .arg("-R")
        .arg(format!("ls -p /{}", boot_dir()))
        .arg(state_img)
        .output()
        .map_err(|e| {
            format!(
                "could not run {}: {e} (apt-get install -y e2fsprogs)",
                debugfs.display()
            )
        })?;
    if !out.status.success() {
        return Err(format!(
            "debugfs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(listing_has(
        &String::from_utf8_lossy(&out.stdout),
        wipe_file_name(),
    ))
}

/// The directory of the boot records in state.img (`boot`).
fn boot_dir() -> &'static str {
    state::FACTORY_WIPE
        .rsplit_once('/')
        .map_or("", |(dir, _)| dir)
}

/// The file name of the factory-wipe request in [`boot_dir`] (`factory_wipe`).
fn wipe_file_name() -> &'static str {
    state::FACTORY_WIPE
        .rsplit_once('/')
        .map_or(state::FACTORY_WIPE, |(_, name)| name)
}

/// The firmware's choice for the next boot and a human reason: a pending factory wipe →
/// recovery (it performs the wipe; a half-wiped `/state` never boots normal), else the
/// next-boot record, else normal.
pub fn decide(debugfs: &Path, state_img: Option<&Path>) -> (BootTarget, String) {
    let Some(img) = state_img else {
        return (BootTarget::Normal, "no state disk: default normal".into());
    };
    let wipe_note = match wipe_pending(debugfs, img) {
        Ok(true) => {
            return (
                BootTarget::Recovery,
                format!("factory wipe pending ({FACTORY_WIPE} exists): recovery"),
            )
        }
        Ok(false) => String::new(),
        Err(e) => format!(" (factory-wipe request unreadable: {e})"),
    };
    let (t, why) = decide_record(debugfs, img);
    (t, format!("{why}{wipe_note}"))
}

fn decide_record(debugfs: &Path, img: &Path) -> (BootTarget, String) {
    match read_next_mode(debugfs, img) {
        Ok(Some(t)) => (t, format!("next-boot record says {t}")),
        Ok(None) => (
            BootTarget::Normal,
            "no next-boot record: default normal".into(),
        ),
        Err(e) => (
            BootTarget::Normal,
            format!("next-boot record unreadable ({e}): default normal"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wipe_request_path_is_the_contract_one() {
        assert_eq!(FACTORY_WIPE, format!("/{}", state::FACTORY_WIPE));
        assert_eq!(boot_dir(), "boot");
        assert_eq!(wipe_file_name(), "factory_wipe");
    }

    #[test]
    fn records() {
        assert_eq!(parse_record(b"recovery\n"), Ok(Some(BootTarget::Recovery)));
        assert_eq!(parse_record(b"normal"), Ok(Some(BootTarget::Normal)));
        assert_eq!(parse_record(b""), Ok(None));
        assert!(parse_record(b"reboot-to-bootloader").is_err());
        assert!(parse_record(&[b'x'; 100]).is_err());
    }

    #[test]
    fn boot_listing() {
        let ls = "/12/040755/0/0/.//\n/2/040755/0/0/..//\n/13/100644/0/0/factory_wipe/5/\n";
        assert!(listing_has(ls, "factory_wipe"));
        assert!(!listing_has(ls, "next_mode"));
        assert!(!listing_has(
            "/14/100644/0/0/factory_wipe.journal/40/\n",
            "factory_wipe"
        ));
        assert!(!listing_has("factory_wipe\n", "factory_wipe"));
    }

    /// The real decision on real ext4 images (needs mkfs.ext4/debugfs: `cargo xtask` installs them).
    #[test]
    fn wipe_request_wins_over_the_next_boot_record() {
        let debugfs = crate::find_tool("debugfs");
        let mkfs = crate::find_tool("mkfs.ext4");
        assert!(
            debugfs.is_file() && mkfs.is_file(),
            "this test needs debugfs and mkfs.ext4: `apt-get install -y e2fsprogs` \
             (every `cargo xtask` recipe installs it)"
        );
        let d = tempfile::tempdir().unwrap();
        let img_with = |name: &str, files: &[(&str, &str)]| {
            let tree = d.path().join(format!("{name}.tree"));
            std::fs::create_dir_all(tree.join("boot")).unwrap();
            for (f, c) in files {
                std::fs::write(tree.join("boot").join(f), c).unwrap();
            }
            let img = d.path().join(format!("{name}.img"));
            std::fs::File::create(&img)
                .unwrap()
                .set_len(8 << 20)
                .unwrap();
            let st = Command::new(&mkfs)
                .args(["-q", "-F", "-d"])
                .arg(&tree)
                .arg(&img)
                .status()
                .unwrap();
            assert!(st.success());
            img
        };
        let none = img_with("none", &[]);
        assert_eq!(decide(&debugfs, Some(&none)).0, BootTarget::Normal);
        let rec = img_with("rec", &[("next_mode", "recovery\n")]);
        assert_eq!(decide(&debugfs, Some(&rec)).0, BootTarget::Recovery);
        let wipe = img_with(
            "wipe",
            &[("next_mode", "normal\n"), ("factory_wipe", "wipe\n")],
        );
        let (t, why) = decide(&debugfs, Some(&wipe));
        assert_eq!(t, BootTarget::Recovery);
        assert!(why.starts_with("factory wipe pending"), "{why}");
        let journal_only = img_with("journal", &[("factory_wipe.journal", "{}")]);
        assert_eq!(decide(&debugfs, Some(&journal_only)).0, BootTarget::Normal);
    }
}
