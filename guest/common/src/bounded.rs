//! Bounded reads: every file the guest reads from sysfs, procfs or `/state` goes through here.

use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

/// Read at most `max` bytes of `path`; a longer file is an error (never silently truncated).
pub fn read(path: &Path, max: usize) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut buf = Vec::new();
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    file.take(limit)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read", path, e))?;
    if buf.len() > max {
        return Err(Error::TooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    Ok(buf)
}

/// The first `max` bytes of a small proc/sys file (the rest is ignored); `None` when it
/// cannot be opened or read.
pub fn read_prefix(path: &Path, max: u64) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(max)
        .read_to_end(&mut buf)
        .ok()?;
    Some(buf)
}

/// Like [`read`], as UTF-8 text (invalid UTF-8 is an error).
pub fn read_string(path: &Path, max: usize) -> Result<String> {
    let bytes = read(path, max)?;
    String::from_utf8(bytes).map_err(|e| Error::Invalid {
        what: "utf-8 text",
        value: format!("{}: {e}", path.display()),
    })
}

/// Like [`read_string`] but `Ok(None)` when the file does not exist.
pub fn read_string_opt(path: &Path, max: usize) -> Result<Option<String>> {
    match read_string(path, max) {
        Ok(s) => Ok(Some(s)),
        Err(Error::Io(nx_contract::PathIoError { source, .. }))
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A plain name that is safe to join onto a directory: ASCII alphanumerics, `_`, `-`, `.`,
/// 1..=64 bytes, not `.` or `..`.
pub fn is_safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_respects_bound() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"12345").unwrap();
        assert_eq!(read(&p, 5).unwrap(), b"12345");
        assert!(matches!(read(&p, 4), Err(Error::TooLarge { .. })));
        assert_eq!(
            read_string_opt(&dir.path().join("missing"), 4).unwrap(),
            None
        );
    }

    #[test]
    fn safe_names() {
        assert!(is_safe_name("vport0p1"));
        assert!(is_safe_name("virtio_blk.ko"));
        assert!(!is_safe_name(".."));
        assert!(!is_safe_name("a/b"));
        assert!(!is_safe_name(""));
        assert!(!is_safe_name(&"x".repeat(65)));
    }
}
