#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End-to-end tests of `nx image …`, running the built `nx` binary.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

fn nx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nx"))
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let o = nx(args);
    assert!(
        o.status.success(),
        "nx {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sha_file(p: &Path) -> String {
    hex::encode(Sha256::digest(fs::read(p).unwrap()))
}

/// A small rootfs: nested dirs, a setuid file, a symlink, an empty dir, an empty file.
fn make_rootfs(dir: &Path, mtime: SystemTime) {
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::create_dir_all(dir.join("usr/bin")).unwrap();
    fs::create_dir_all(dir.join("empty")).unwrap();
    fs::write(dir.join("etc/motd"), b"welcome to nexus\n").unwrap();
    fs::write(dir.join("etc/empty.conf"), b"").unwrap();
    let big: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(dir.join("usr/bin/tool"), &big).unwrap();
    fs::set_permissions(dir.join("usr/bin/tool"), fs::Permissions::from_mode(0o4755)).unwrap();
    std::os::unix::fs::symlink("../../etc/motd", dir.join("usr/bin/motd-link")).unwrap();
    for p in [
        "etc/motd",
        "etc/empty.conf",
        "usr/bin/tool",
        "etc",
        "usr/bin",
        "usr",
        "empty",
    ] {
        let f = fs::File::open(dir.join(p)).unwrap();
        f.set_modified(mtime).unwrap();
    }
}

/// A mostly-zero raw segment with a little data (a "kernel").
fn make_kernel(path: &Path) {
    let mut f = fs::File::create(path).unwrap();
    f.set_len(3 << 20).unwrap();
    f.seek(SeekFrom::Start(1_000_000)).unwrap();
    f.write_all(b"KERNEL").unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(b"MZ").unwrap();
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    rootfs: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let rootfs = dir.join("rootfs");
    make_rootfs(
        &rootfs,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000),
    );
    let kernel = dir.join("vmlinuz");
    make_kernel(&kernel);
    let initrd = dir.join("initrd");
    fs::write(&initrd, vec![0x1fu8; 10_000]).unwrap();
    Fixture {
        _tmp: tmp,
        dir,
        rootfs,
        kernel,
        initrd,
    }
}

fn build(fx: &Fixture, out: &Path, extra: &[&str]) -> String {
    let kseg = format!("kernel={}", s(&fx.kernel));
    let iseg = format!("initrd={}", s(&fx.initrd));
    let mut args = vec![
        "image",
        "build",
        "--rootfs",
        s(&fx.rootfs),
        "--version",
        "1",
        "--out",
        s(out),
        "--segment",
        &kseg,
        "--segment",
        &iseg,
    ];
    args.extend_from_slice(extra);
    ok(&args)
}

fn inspect_json(img: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(&["image", "inspect", s(img), "--json"])).unwrap()
}

#[test]
fn build_twice_gives_identical_bytes_even_with_other_mtimes_and_paths() {
    let fx = fixture();
    let a = fx.dir.join("a.img");
    let b = fx.dir.join("b.img");
    build(&fx, &a, &[]);
    build(&fx, &b, &[]);
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());

    // Same content in another directory, with other mtimes.
    let other = fx.dir.join("elsewhere/rootfs2");
    make_rootfs(&other, SystemTime::now());
    let kseg = format!("kernel={}", s(&fx.kernel));
    let iseg = format!("initrd={}", s(&fx.initrd));
    let c = fx.dir.join("c.img");
    ok(&[
        "image",
        "build",
        "--rootfs",
        s(&other),
        "--version",
        "1",
        "--out",
        s(&c),
        "--segment",
        &kseg,
        "--segment",
        &iseg,
    ]);
    assert_eq!(sha_file(&a), sha_file(&c));

    // The summary prints the file hash that sha256sum would print.
    let summary = build(&fx, &fx.dir.join("d.img"), &[]);
    assert!(summary.contains(&sha_file(&a)), "{summary}");
}

#[test]
fn source_date_epoch_is_used_and_deterministic() {
    let fx = fixture();
    let run = |out: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_nx"))
            .args([
                "image",
                "build",
                "--rootfs",
                s(&fx.rootfs),
                "--version",
                "1",
                "--out",
                s(out),
            ])
            .env("SOURCE_DATE_EPOCH", "1700000000")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let a = fx.dir.join("e1.img");
    let b = fx.dir.join("e2.img");
    run(&a);
    run(&b);
    assert_eq!(sha_file(&a), sha_file(&b));
    let plain = fx.dir.join("plain.img");
    ok(&[
        "image",
        "build",
        "--rootfs",
        s(&fx.rootfs),
        "--version",
        "1",
        "--out",
        s(&plain),
    ]);
    assert_ne!(sha_file(&a), sha_file(&plain));
}

#[test]
fn verify_ok_and_segment_order() {
    let fx = fixture();
    let img = fx.dir.join("a.img");
    build(&fx, &img, &[]);
    let out = ok(&["image", "verify", s(&img)]);
    assert!(out.contains("verify ok"), "{out}");
    assert!(out.contains("unsigned"), "{out}");
    let j = inspect_json(&img);
    let names: Vec<&str> = j["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    // The dm-verity tree of the rootfs comes right after it (format 3).
    assert_eq!(names, ["rootfs", "rootfs-verity", "kernel", "initrd"]);
    assert_eq!(
        j["total_size"].as_u64().unwrap(),
        fs::metadata(&img).unwrap().len()
    );
    assert_eq!(j["signed"], false);
    assert_eq!(j["version"], "1");
}

#[test]
fn a_flipped_byte_in_each_segment_is_caught_and_named() {
    let fx = fixture();
    let img = fx.dir.join("a.img");
    build(&fx, &img, &[]);
    let j = inspect_json(&img);
    for seg in j["segments"].as_array().unwrap() {
        let name = seg["name"].as_str().unwrap();
        let offset = seg["offset"].as_u64().unwrap();
        let size = seg["size"].as_u64().unwrap();
        // a byte in the data, one in the middle (a zero run for the kernel), the last byte
        for rel in [1, size / 2, size - 1] {
            let bad = fx.dir.join(format!("bad-{name}-{rel}.img"));
            let mut bytes = fs::read(&img).unwrap();
            bytes[(offset + rel) as usize] ^= 0x40;
            fs::write(&bad, &bytes).unwrap();
            let o = nx(&["image", "verify", s(&bad)]);
            let err = stderr(&o);
            assert_eq!(o.status.code(), Some(3), "{name}@{rel}: {err}");
            assert!(
                err.contains(&format!(
                    "nx: verify failed: segment \"{name}\": sha256 mismatch"
                )),
                "{name}@{rel}: {err}"
            );
        }
    }
}

#[test]
fn padding_and_head_corruption_are_caught() {
    let fx = fixture();
    let img = fx.dir.join("a.img");
    build(&fx, &img, &[]);
    let j = inspect_json(&img);
    let initrd = &j["segments"][3];
    assert_eq!(initrd["name"], "initrd");
    let end = initrd["offset"].as_u64().unwrap() + initrd["size"].as_u64().unwrap();

    let mut bytes = fs::read(&img).unwrap();
    bytes[end as usize + 3] = 1;
    let bad = fx.dir.join("pad.img");
    fs::write(&bad, &bytes).unwrap();
    let o = nx(&["image", "verify", s(&bad)]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("segment \"initrd\": padding byte"),
        "{}",
        stderr(&o)
    );

    let mut bytes = fs::read(&img).unwrap();
    bytes[4096 + 30] ^= 0x01; // inside the manifest
    fs::write(&bad, &bytes).unwrap();
    let o = nx(&["image", "verify", s(&bad)]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let o = nx(&["image", "inspect", s(&bad)]);
    assert_eq!(o.status.code(), Some(3));

    fs::write(&bad, b"definitely not an image").unwrap();
    let o = nx(&["image", "verify", s(&bad)]);
    assert_eq!(o.status.code(), Some(3));
    assert!(
        stderr(&o).contains("shorter than the 4096-byte header"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn truncated_and_extended_files_are_errors() {
    let fx = fixture();
    let img = fx.dir.join("a.img");
    build(&fx, &img, &[]);
    let bytes = fs::read(&img).unwrap();
    let bad = fx.dir.join("t.img");

    fs::write(&bad, &bytes[..bytes.len() - 4096]).unwrap();
    let o = nx(&["image", "verify", s(&bad)]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("truncated") && err.contains("\"initrd\""),
        "{err}"
    );

    fs::write(&bad, &bytes[..6000]).unwrap();
    let o = nx(&["image", "verify", s(&bad)]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("truncated"));

    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0u8; 4096]);
    fs::write(&bad, &longer).unwrap();
    let o = nx(&["image", "verify", s(&bad)]);
    assert_eq!(o.status.code(), Some(3));
    assert!(stderr(&o).contains("trailing bytes"));

    let o = nx(&["image", "verify", s(&fx.dir.join("missing.img"))]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn inspect_json_lists_segments_with_hashes() {
    let fx = fixture();
    let img = fx.dir.join("a.img");
    build(&fx, &img, &[]);
    let j = inspect_json(&img);
    let bytes = fs::read(&img).unwrap();
    for seg in j["segments"].as_array().unwrap() {
        let off = seg["offset"].as_u64().unwrap() as usize;
        let size = seg["size"].as_u64().unwrap() as usize;
        assert_eq!(off % 4096, 0);
        let sha = hex::encode(Sha256::digest(&bytes[off..off + size]));
        assert_eq!(seg["sha256"].as_str().unwrap(), sha);
        assert!(seg["data_bytes"].as_u64().unwrap() <= size as u64);
    }
    // the sparse kernel (after rootfs and rootfs-verity): 2 non-zero 4 KiB blocks out of 3 MiB
    assert_eq!(j["segments"][2]["name"], "kernel");
    assert_eq!(j["segments"][2]["data_bytes"], 8192);
    assert_eq!(j["segments"][2]["data_ranges"], 2);
    let text = ok(&["image", "inspect", s(&img)]);
    assert!(
        text.contains("signed       no") && text.contains("kernel"),
        "{text}"
    );
}

#[test]
fn signed_image_verifies_with_its_key_and_fails_with_another() {
    let fx = fixture();
    let k1 = fx.dir.join("k1");
    let k2 = fx.dir.join("keys2");
    ok(&["image", "keygen", "--out", s(&k1)]);
    ok(&["image", "keygen", "--out", s(&k2)]);
    let k1pub = fx.dir.join("k1.pub");
    let k2pub = fx.dir.join("keys2.pub");

    let signed = fx.dir.join("s.img");
    build(&fx, &signed, &["--sign", s(&k1)]);
    let unsigned = fx.dir.join("u.img");
    build(&fx, &unsigned, &[]);

    let out = ok(&["image", "verify", s(&signed), "--pub", s(&k1pub)]);
    assert!(out.contains("signature ok"), "{out}");
    let out = ok(&["image", "verify", s(&signed)]);
    assert!(
        out.contains("signed, signature not checked (pass --pub)"),
        "{out}"
    );
    assert_eq!(inspect_json(&signed)["signed"], true);

    let o = nx(&["image", "verify", s(&signed), "--pub", s(&k2pub)]);
    assert_eq!(o.status.code(), Some(4));
    assert!(
        stderr(&o).contains("signature does not verify"),
        "{}",
        stderr(&o)
    );

    let o = nx(&["image", "verify", s(&unsigned), "--pub", s(&k1pub)]);
    assert_eq!(o.status.code(), Some(4));
    assert!(stderr(&o).contains("not signed"), "{}", stderr(&o));

    // Signing does not move the segments: same manifest, same data.
    assert_eq!(
        inspect_json(&signed)["manifest_id"],
        inspect_json(&unsigned)["manifest_id"]
    );

    // A tampered signature byte is caught.
    let mut bytes = fs::read(&signed).unwrap();
    let manifest_len = u32::from_le_bytes(bytes[24..28].try_into().unwrap()) as usize;
    bytes[4096 + manifest_len + 5] ^= 1;
    let bad = fx.dir.join("badsig.img");
    fs::write(&bad, &bytes).unwrap();
    let o = nx(&["image", "verify", s(&bad), "--pub", s(&k1pub)]);
    assert_eq!(o.status.code(), Some(4));
}

#[test]
fn keygen_files_modes_and_no_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("release");
    let pubkey = tmp.path().join("release.pub");
    ok(&["image", "keygen", "--out", s(&key)]);
    let secret = fs::read_to_string(&key).unwrap();
    let public = fs::read_to_string(&pubkey).unwrap();
    assert!(
        secret.starts_with("nexus-ed25519-secret-v1 ") && secret.len() == 24 + 64 + 1,
        "{secret:?}"
    );
    assert!(
        public.starts_with("nexus-ed25519-public-v1 ") && public.len() == 24 + 64 + 1,
        "{public:?}"
    );
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        fs::metadata(&pubkey).unwrap().permissions().mode() & 0o777,
        0o644
    );

    let o = nx(&["image", "keygen", "--out", s(&key)]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("already exists; pass --force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(fs::read_to_string(&key).unwrap(), secret);

    ok(&["image", "keygen", "--out", s(&key), "--force"]);
    assert_ne!(fs::read_to_string(&key).unwrap(), secret);
    assert_eq!(
        fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // a public key is not accepted for signing
    let fx = fixture();
    let out = fx.dir.join("x.img");
    let o = nx(&[
        "image",
        "build",
        "--rootfs",
        s(&fx.rootfs),
        "--version",
        "1",
        "--out",
        s(&out),
        "--sign",
        s(&pubkey),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("this is a public key"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn rootfs_is_a_valid_deterministic_squashfs() {
    let fx = fixture();
    let img = fx.dir.join("a.img");
    build(&fx, &img, &[]);
    let j = inspect_json(&img);
    let off = j["segments"][0]["offset"].as_u64().unwrap();
    let size = j["segments"][0]["size"].as_u64().unwrap();
    assert_eq!(size % 4096, 0, "squashfs is padded to 4 KiB");
    let mut f = fs::File::open(&img).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut sq = vec![0u8; size as usize];
    f.read_exact(&mut sq).unwrap();
    assert_eq!(&sq[..4], b"hsqs");

    let reader = backhand::FilesystemReader::from_reader(std::io::Cursor::new(sq)).unwrap();
    assert_eq!(reader.mod_time, 0);
    let mut seen = Vec::new();
    for node in reader.files() {
        assert_eq!(
            (node.header.uid, node.header.gid),
            (0, 0),
            "{:?}",
            node.fullpath
        );
        assert_eq!(node.header.mtime, 0, "{:?}", node.fullpath);
        seen.push(node.fullpath.to_str().unwrap().to_string());
        match &node.inner {
            backhand::InnerNode::File(file) => {
                let mut data = Vec::new();
                reader.file(file).reader().read_to_end(&mut data).unwrap();
                let rel = node.fullpath.strip_prefix("/").unwrap();
                assert_eq!(data, fs::read(fx.rootfs.join(rel)).unwrap(), "{rel:?}");
                if rel == Path::new("usr/bin/tool") {
                    assert_eq!(node.header.permissions, 0o4755);
                }
            }
            backhand::InnerNode::Symlink(l) => {
                assert_eq!(node.fullpath, Path::new("/usr/bin/motd-link"));
                assert_eq!(l.link, Path::new("../../etc/motd"));
            }
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [
            "/",
            "/empty",
            "/etc",
            "/etc/empty.conf",
            "/etc/motd",
            "/usr",
            "/usr/bin",
            "/usr/bin/motd-link",
            "/usr/bin/tool"
        ]
    );
}

#[test]
fn bad_inputs_are_rejected_with_clear_errors() {
    let fx = fixture();
    let out = fx.dir.join("x.img");

    // a socket in the rootfs
    let sock_root = fx.dir.join("sockroot");
    fs::create_dir_all(&sock_root).unwrap();
    let _l = std::os::unix::net::UnixListener::bind(sock_root.join("ctl.sock")).unwrap();
    let o = nx(&[
        "image",
        "build",
        "--rootfs",
        s(&sock_root),
        "--version",
        "1",
        "--out",
        s(&out),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is a socket"), "{}", stderr(&o));
    assert!(!out.exists());

    // bad segment names are usage errors
    let long = format!("{}=x", "k".repeat(33));
    for spec in ["Kernel=x", "a/b=x", "..=x", long.as_str(), "noequals"] {
        let o = nx(&[
            "image",
            "build",
            "--version",
            "1",
            "--out",
            s(&out),
            "--segment",
            spec,
        ]);
        assert_eq!(o.status.code(), Some(2), "{spec}");
    }
    // empty segment file
    let empty = fx.dir.join("empty.bin");
    fs::write(&empty, b"").unwrap();
    let spec = format!("blob={}", s(&empty));
    let o = nx(&[
        "image",
        "build",
        "--version",
        "1",
        "--out",
        s(&out),
        "--segment",
        &spec,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("empty segments are not allowed"),
        "{}",
        stderr(&o)
    );
    // duplicate names, rootfs clash, bad version
    let spec = format!("blob={}", s(&fx.initrd));
    let o = nx(&[
        "image",
        "build",
        "--version",
        "1",
        "--out",
        s(&out),
        "--segment",
        &spec,
        "--segment",
        &spec,
    ]);
    assert!(stderr(&o).contains("given twice"), "{}", stderr(&o));
    let rspec = format!("rootfs={}", s(&fx.initrd));
    let o = nx(&[
        "image",
        "build",
        "--rootfs",
        s(&fx.rootfs),
        "--version",
        "1",
        "--out",
        s(&out),
        "--segment",
        &rspec,
    ]);
    assert!(
        stderr(&o).contains("conflicts with --rootfs"),
        "{}",
        stderr(&o)
    );
    let o = nx(&[
        "image",
        "build",
        "--version",
        "1 beta",
        "--out",
        s(&out),
        "--segment",
        &spec,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("bad image version"), "{}", stderr(&o));
    // --out inside --rootfs
    let inside = fx.rootfs.join("x.img");
    let o = nx(&[
        "image",
        "build",
        "--rootfs",
        s(&fx.rootfs),
        "--version",
        "1",
        "--out",
        s(&inside),
    ]);
    assert!(
        stderr(&o).contains("must not be inside --rootfs"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // no temporary files are left behind
    let leftovers: Vec<_> = fs::read_dir(&fx.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn raw_only_image_without_rootfs() {
    let fx = fixture();
    let img = fx.dir.join("raw.img");
    let spec = format!("initrd={}", s(&fx.initrd));
    ok(&[
        "image",
        "build",
        "--version",
        "0.1",
        "--out",
        s(&img),
        "--segment",
        &spec,
    ]);
    ok(&["image", "verify", s(&img)]);
    let bytes = fs::read(&img).unwrap();
    assert_eq!(&bytes[8192..8192 + 10_000], &vec![0x1fu8; 10_000][..]);
    assert_eq!(bytes.len(), 8192 + 12288);
}

#[test]
fn help_has_examples() {
    for sub in ["build", "verify", "inspect", "keygen"] {
        let out = ok(&["image", sub, "--help"]);
        assert!(out.contains("Examples:"), "{sub}: {out}");
    }
}
