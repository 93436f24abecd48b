#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `nx image build`'s dm-verity tree (segment `rootfs-verity`) and root hash, cross-checked
//! against `veritysetup format --no-superblock` (Debian package `cryptsetup-bin`) on the same
//! rootfs bytes: the guest hands exactly these to the kernel's dm-verity target, and
//! veritysetup is the reference implementation of that layout.
//!
//! Fails (does not skip) when `veritysetup` is missing: `cargo xtask` installs it.

use proto::image::{Header, ImageHead};
use std::fs;
use std::path::Path;
use std::process::Command;

fn nx(args: &[&str]) {
    let o = Command::new(env!("CARGO_BIN_EXE_nx"))
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "nx {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `veritysetup format --no-superblock …` of `data` into `hash`; returns the root hash (hex).
fn veritysetup(data: &Path, hash: &Path, salt_hex: &str) -> String {
    let out = Command::new("veritysetup")
        .args([
            "format",
            "--no-superblock",
            &format!("--salt={salt_hex}"),
            "--hash=sha256",
            "--format=1",
            "--data-block-size=4096",
            "--hash-block-size=4096",
        ])
        .arg(data)
        .arg(hash)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run veritysetup ({e}): install it with `apt-get install -y cryptsetup-bin` \
                 (every `cargo xtask` recipe does this when run as root)"
            )
        });
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "veritysetup format failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix("Root hash:"))
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|| panic!("no `Root hash:` in veritysetup's output:\n{text}"))
}

/// Build an image from `rootfs_args`, then compare its `rootfs-verity` segment and the
/// manifest's root hash with veritysetup's on the rootfs segment's bytes (zero-padded to
/// 4 KiB, as the guest's loop device shows them).
fn cross_check(dir: &Path, rootfs_args: &[&str]) -> u64 {
    let img = dir.join("img");
    let mut args = vec![
        "image",
        "build",
        "--version",
        "1",
        "--out",
        img.to_str().unwrap(),
    ];
    args.extend_from_slice(rootfs_args);
    nx(&args);
    let bytes = fs::read(&img).unwrap();
    let h = Header::parse(&bytes).unwrap();
    let head = ImageHead::parse(&bytes[..h.data_offset as usize]).unwrap();
    let m = &head.manifest;
    let v = m.verity_of("rootfs").expect("no verity entry for rootfs");
    assert_eq!(v.hash, "rootfs-verity");
    let data = m.segment("rootfs").unwrap();
    let tree = m.segment("rootfs-verity").unwrap();
    // The tree segment comes right after the rootfs.
    let names: Vec<&str> = m.segments.iter().map(|s| s.name.as_str()).collect();
    let i = names.iter().position(|n| *n == "rootfs").unwrap();
    assert_eq!(names[i + 1], "rootfs-verity");

    let start = data.offset as usize;
    let padded = data.size.next_multiple_of(4096) as usize;
    let data_file = dir.join("data");
    fs::write(&data_file, &bytes[start..start + padded]).unwrap();
    let hash_file = dir.join("hash");
    let _ = fs::remove_file(&hash_file);
    let root = veritysetup(&data_file, &hash_file, &hex::encode(&v.salt));
    assert_eq!(root, hex::encode(v.root_hash), "root hash differs");
    let reference = fs::read(&hash_file).unwrap();
    let ours = &bytes[tree.offset as usize..(tree.offset + tree.size) as usize];
    assert!(
        reference.len() >= ours.len(),
        "veritysetup wrote {} bytes, our tree is {}",
        reference.len(),
        ours.len()
    );
    assert!(
        reference[..ours.len()] == *ours,
        "the hash trees differ (first difference at byte {:?})",
        reference.iter().zip(ours).position(|(a, b)| a != b)
    );
    assert!(
        reference[ours.len()..].iter().all(|&b| b == 0),
        "veritysetup's hash area has more non-zero blocks than ours"
    );
    data.size
}

#[test]
fn rootfs_verity_matches_veritysetup() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();

    // A raw rootfs whose size is not a multiple of 4 KiB (the last block is zero-padded) and
    // large enough for a two-level tree (> 128 data blocks).
    let raw: Vec<u8> = (0..(700 * 1024 + 123u32))
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let raw_path = dir.join("rootfs.bin");
    fs::write(&raw_path, &raw).unwrap();
    let seg = format!("rootfs={}", raw_path.display());
    assert_eq!(cross_check(dir, &["--segment", &seg]), raw.len() as u64);

    // A squashfs rootfs built from a directory, as `cargo xtask guest` builds the slots.
    let tree = dir.join("tree");
    fs::create_dir_all(tree.join("etc")).unwrap();
    fs::write(tree.join("etc/os-release"), "VERSION=1\n").unwrap();
    let big: Vec<u8> = (0..600_000u32)
        .map(|i| (i.wrapping_mul(40503) >> 7) as u8)
        .collect();
    fs::write(tree.join("etc/blob"), big).unwrap();
    cross_check(dir, &["--rootfs", tree.to_str().unwrap()]);
}
