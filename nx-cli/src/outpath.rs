//! Output paths (`--receipt`, `nx recovery diag --out`, `nx image keygen --out`) are checked
//! before any work: a flash, a bundle fetched from the guest or a key made and then not
//! saved would be work thrown away.

use crate::exit::{Exit, Failure};
use std::path::Path;

/// Check that `path` can be written (its directory exists and takes a new file, and `path`
/// is not a directory). `what` names it in the message (`the receipt`, `--out`).
pub fn check(path: &Path, what: &str) -> Result<(), Failure> {
    let fail = |why: String| {
        Failure::new(
            Exit::Error,
            format!(
                "cannot write {what} to {}: {why}; nothing was done",
                path.display()
            ),
        )
    };
    if path.is_dir() {
        return Err(fail("it is a directory".into()));
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail(format!(
                "directory {} does not exist (create it first)",
                dir.display()
            )))
        }
        Err(e) => return Err(fail(os_reason(&e))),
        Ok(m) if !m.is_dir() => return Err(fail(format!("{} is not a directory", dir.display()))),
        Ok(_) => {}
    }
    // The only reliable test of "may I create a file here": create one (and remove it).
    tempfile::Builder::new()
        .prefix(".nx-check")
        .tempfile_in(dir)
        .map(drop)
        .map_err(|e| fail(os_reason(&e)))
}

/// The OS's reason for an I/O error without any path in it (temp-file names are ours, not
/// the user's business).
pub fn os_reason(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code).to_string(),
        None => e.kind().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_dir_directory_target_and_good_path() {
        let d = tempfile::tempdir().unwrap();
        let e = check(&d.path().join("no/such/r.json"), "the receipt").unwrap_err();
        assert!(e.message.contains("does not exist"), "{}", e.message);
        assert_eq!(e.exit, Exit::Error);
        let e = check(d.path(), "--out").unwrap_err();
        assert!(e.message.contains("is a directory"), "{}", e.message);
        check(&d.path().join("r.json"), "the receipt").unwrap();
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
