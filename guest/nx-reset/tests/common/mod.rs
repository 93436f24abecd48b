//! Shared by the nx-reset tests: a seeded /state tree and a fingerprint of a tree.
#![allow(dead_code)]

use sha2::{Digest, Sha256};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn file(root: &Path, rel: &str, len: u64) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    // Distinct content per file so the trust fingerprint sees every byte.
    let mut content: Vec<u8> = rel.bytes().cycle().take(len as usize).collect();
    content.truncate(len as usize);
    std::fs::write(p, content).unwrap();
}

/// The seeded state tree of the golden test.
pub fn seed(root: &Path) {
    for d in [
        "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    file(root, "apps/com.example.notes/data.db", 1000);
    std::fs::create_dir_all(root.join("apps/com.example.notes/cache")).unwrap();
    file(root, "apps/com.example.game/save-1", 17);
    std::os::unix::fs::symlink("../trust", root.join("apps/link-to-trust")).unwrap();
    file(root, "content/photos/img-0001.jpg", 4096);
    file(root, "content/music/song.ogg", 12345);
    std::fs::write(
        root.join("content")
            .join(std::ffi::OsStr::from_bytes(b"odd\nname")),
        b"hello",
    )
    .unwrap();
    file(root, "settings/system.json", 42);
    file(root, "settings/locale", 6);
    file(root, "trust/root.pub", 32);
    file(root, "trust/certs/ca-1.pem", 1200);
    file(root, "trust/certs/ca-2.pem", 900);
    file(root, "bootctl/state.nxs", 48);
    file(root, "flash/installed.json", 300);
    file(root, "flash/last-install.json", 500);
    file(root, "recovery/diag-1.tar.zst", 777);
    std::fs::create_dir_all(root.join("lost+found")).unwrap();
}

/// Every path below `dir` with its kind, size, symlink target and content hash (sorted).
pub fn fingerprint(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(base).unwrap().display().to_string();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            out.push(format!(
                "{rel} -> {}",
                std::fs::read_link(&p).unwrap().display()
            ));
        } else if m.is_dir() {
            out.push(format!("{rel}/"));
            walk(base, &p, out);
        } else {
            let h = hex::encode(Sha256::digest(std::fs::read(&p).unwrap()));
            out.push(format!("{rel} {} {h}", m.len()));
        }
    }
}
