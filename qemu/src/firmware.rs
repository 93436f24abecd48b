//! The boot firmware's decision: read the one-shot next-boot record `/boot/next_mode` from
//! `state.img` with `debugfs` (read-only; QEMU is stopped while we read) and pick the ramdisk.
//! The record is only read here; the init that boots for it consumes it.

use crate::BootTarget;
use std::path::Path;
use std::process::Command;

/// Largest record we accept.
const MAX_RECORD: usize = 64;

/// Parse the record's content: `normal` / `recovery` (surrounding whitespace ignored).
pub fn parse_record(text: &[u8]) -> Result<Option<BootTarget>, String> {
    if text.len() > MAX_RECORD {
        return Err(format!("record is {} bytes (max {MAX_RECORD})", text.len()));
    }
    let s = String::from_utf8_lossy(text);
    match s.trim() {
        "" => Ok(None),
        "normal" => Ok(Some(BootTarget::Normal)),
        "recovery" => Ok(Some(BootTarget::Recovery)),
        other => Err(format!("unknown mode {other:?}")),
    }
}

/// Read `/boot/next_mode` from `state_img`. `Ok(None)`: no record.
pub fn read_next_mode(debugfs: &Path, state_img: &Path) -> Result<Option<BootTarget>, String> {
    let out = Command::new(debugfs)
        .arg("-R")
        .arg("cat /boot/next_mode")
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

/// The firmware's choice for the next boot and a human reason.
pub fn decide(debugfs: &Path, state_img: Option<&Path>) -> (BootTarget, String) {
    let Some(img) = state_img else {
        return (BootTarget::Normal, "no state disk: default normal".into());
    };
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
    fn records() {
        assert_eq!(parse_record(b"recovery\n"), Ok(Some(BootTarget::Recovery)));
        assert_eq!(parse_record(b"normal"), Ok(Some(BootTarget::Normal)));
        assert_eq!(parse_record(b""), Ok(None));
        assert!(parse_record(b"reboot-to-bootloader").is_err());
        assert!(parse_record(&[b'x'; 100]).is_err());
    }
}
