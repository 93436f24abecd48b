//! Architecture invariant: state files are written only through `nx_guest::fsx::AtomicWrite`
//! (temp file opened `O_NOFOLLOW | O_EXCL` relative to a directory fd opened
//! `O_NOFOLLOW | O_DIRECTORY`, `renameat`, directory fsync). No guest program and no `nx`
//! code names a `.tmp` file of its own outside that helper (unit tests excepted: they plant
//! symlinks at those paths).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

/// Files allowed to spell a temp name, and why.
const ALLOWED: &[(&str, &str)] = &[
    ("guest/common/src/fsx.rs", "the helper itself"),
    (
        "nx-cli/src/image/build.rs",
        "host build output through tempfile::Builder (random O_EXCL name, persisted by rename)",
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_temp_file_is_named_outside_the_atomic_writer() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for e in std::fs::read_dir(root.join("guest")).unwrap().flatten() {
        rust_files(&e.path().join("src"), &mut files);
    }
    rust_files(&root.join("nx-cli/src"), &mut files);
    assert!(files.len() > 20, "found only {} files", files.len());
    let mut bad = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if ALLOWED.iter().any(|(a, _)| *a == rel) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.trim_start();
            // Unit tests follow `#[cfg(test)]`; they may plant symlinks at temp paths.
            if code.starts_with("#[cfg(test)]") {
                break;
            }
            if code.starts_with("//") {
                continue;
            }
            if code.contains(".tmp\"") || code.contains("\".tmp") || code.contains(".tmp}") {
                bad.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "temp files named outside nx_guest::fsx (use AtomicWrite::write / write_with):\n{}",
        bad.join("\n")
    );
}
