//! Bundles on disk: `STATE/recovery/diag-<n>.tar.zst`, `n` = 1 + the highest number there
//! (1 for the first). Written with `nx_guest::fsx::write_atomic` (`.diag-<n>.tar.zst.tmp`
//! opened O_NOFOLLOW|O_EXCL, fsync, rename, fsync of
//! the directory); only the newest [`KEEP`] bundles are kept. Only names of exactly that
//! form are ever read or removed.

use crate::bundle::MAX_BUNDLE_BYTES;
use crate::DiagError;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Sub-directory of the state dir that holds the bundles.
pub const SUBDIR: &str = "recovery";
/// How many bundles are kept (older ones are removed after a new one is written).
pub const KEEP: u32 = 8;
/// Largest bundle number (9 digits).
const MAX_N: u32 = 999_999_999;

/// A written bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Its number.
    pub n: u32,
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// `diag-<n>.tar.zst`.
pub fn file_name(n: u32) -> String {
    format!("diag-{n}.tar.zst")
}

/// The number of a bundle file name (`diag-<1..=9 digits>.tar.zst`, no leading zero).
pub fn parse_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("diag-")?.strip_suffix(".tar.zst")?;
    if digits.is_empty()
        || digits.len() > 9
        || digits.starts_with('0')
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    digits.parse().ok()
}

/// Whether `state_root` can take a bundle: an existing directory, a mount point when
/// `require_mountpoint` (in the guest an unmounted `/state` is RAM), with a writable
/// `recovery/` (created when missing). `Err` says why not.
pub fn usable(state_root: &Path, require_mountpoint: bool) -> Result<PathBuf, String> {
    let meta = fs::metadata(state_root).map_err(|e| {
        format!(
            "no usable /state: {} is missing ({e})",
            state_root.display()
        )
    })?;
    if !meta.is_dir() {
        return Err(format!(
            "no usable /state: {} is not a directory",
            state_root.display()
        ));
    }
    if require_mountpoint {
        let parent = fs::metadata(state_root.join("..")).map_err(|e| {
            format!(
                "no usable /state: cannot stat the parent of {} ({e})",
                state_root.display()
            )
        })?;
        if parent.dev() == meta.dev() && parent.ino() != meta.ino() {
            return Err(format!(
                "no usable /state: {} is not a mounted file system (no state disk)",
                state_root.display()
            ));
        }
    }
    let dir = state_root.join(SUBDIR);
    if !dir.is_dir() {
        fs::create_dir(&dir)
            .map_err(|e| format!("no usable /state: cannot create {} ({e})", dir.display()))?;
    }
    rustix::fs::access(&dir, rustix::fs::Access::WRITE_OK)
        .map_err(|e| format!("no usable /state: {} is not writable ({e})", dir.display()))?;
    Ok(dir)
}

/// The bundle numbers present under `state_root`, ascending.
pub fn numbers(state_root: &Path) -> Result<Vec<u32>, DiagError> {
    let dir = state_root.join(SUBDIR);
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(DiagError::io("list", &dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(DiagError::io("list", &dir))?;
        if let Some(n) = e.file_name().to_str().and_then(parse_name) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Write `bytes` as the next bundle and prune old ones.
pub fn write(state_root: &Path, bytes: &[u8]) -> Result<Written, DiagError> {
    if bytes.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(DiagError::Bundle(format!(
            "{} bytes, more than the {MAX_BUNDLE_BYTES}-byte bound (a bug: every member is capped)",
            bytes.len()
        )));
    }
    let dir = state_root.join(SUBDIR);
    let existing = numbers(state_root)?;
    let n = existing
        .last()
        .map_or(1, |n| n.saturating_add(1))
        .min(MAX_N);
    let name = file_name(n);
    let path = dir.join(&name);
    nx_guest::fsx::write_atomic(&dir, &name, bytes).map_err(DiagError::io("write", &path))?;
    for old in existing.iter().filter(|&&k| k.saturating_add(KEEP) <= n) {
        // Best effort: a bundle that cannot be pruned is only disk space.
        let _ = fs::remove_file(dir.join(file_name(*old)));
    }
    Ok(Written {
        n,
        path,
        bytes: bytes.len() as u64,
    })
}

/// The newest bundle: its file name and bytes (bounded by [`MAX_BUNDLE_BYTES`]).
/// `Ok(None)` when there is none.
pub fn read_latest(state_root: &Path) -> Result<Option<(String, Vec<u8>)>, DiagError> {
    let Some(n) = numbers(state_root)?.last().copied() else {
        return Ok(None);
    };
    let name = file_name(n);
    let path = state_root.join(SUBDIR).join(&name);
    let f = File::open(&path).map_err(DiagError::io("open", &path))?;
    let mut data = Vec::new();
    f.take(MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut data)
        .map_err(DiagError::io("read", &path))?;
    if data.len() as u64 > MAX_BUNDLE_BYTES {
        return Err(DiagError::TooLarge {
            path,
            len: data.len() as u64,
            max: MAX_BUNDLE_BYTES,
        });
    }
    Ok(Some((name, data)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parse_name("diag-1.tar.zst"), Some(1));
        assert_eq!(parse_name("diag-123456789.tar.zst"), Some(123_456_789));
        for bad in [
            "diag-0.tar.zst",
            "diag-01.tar.zst",
            "diag-.tar.zst",
            "diag-1234567890.tar.zst",
            "diag-1.tar",
            "../diag-1.tar.zst",
            ".diag-1.tar.zst.tmp",
            "diag-1a.tar.zst",
        ] {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_symlink_planted_at_the_bundle_temp_path_leaves_its_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        usable(d.path(), false).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let tmp = d.path().join(SUBDIR).join(".diag-1.tar.zst.tmp");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        assert_eq!(write(d.path(), b"bundle").unwrap().n, 1);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(read_latest(d.path()).unwrap().unwrap().1, b"bundle");
        assert!(!tmp.is_symlink());
    }

    #[test]
    fn numbering_and_retention() {
        let d = tempfile::tempdir().unwrap();
        usable(d.path(), false).unwrap();
        assert!(read_latest(d.path()).unwrap().is_none());
        std::fs::write(d.path().join("recovery/diag-0007.tar.zst"), b"ignored").unwrap();
        std::fs::write(d.path().join("recovery/other"), b"kept").unwrap();
        for i in 1..=10u32 {
            let w = write(d.path(), format!("bundle {i}").as_bytes()).unwrap();
            assert_eq!(w.n, i);
        }
        assert_eq!(numbers(d.path()).unwrap(), (3..=10).collect::<Vec<_>>());
        let (name, data) = read_latest(d.path()).unwrap().unwrap();
        assert_eq!(name, "diag-10.tar.zst");
        assert_eq!(data, b"bundle 10");
        assert!(d.path().join("recovery/other").exists());
        assert!(d.path().join("recovery/diag-0007.tar.zst").exists());
    }

    #[test]
    fn unusable_state() {
        let d = tempfile::tempdir().unwrap();
        assert!(usable(&d.path().join("missing"), false)
            .unwrap_err()
            .contains("no usable /state"));
        if !nx_reset_is_mountpoint(d.path()) {
            assert!(usable(d.path(), true)
                .unwrap_err()
                .contains("not a mounted"));
        }
    }

    fn nx_reset_is_mountpoint(p: &Path) -> bool {
        let a = fs::metadata(p).unwrap();
        let b = fs::metadata(p.join("..")).unwrap();
        a.dev() != b.dev()
    }
}
