//! nx-diag on a temp dir: same inputs → same bytes, bounded size, the member list, the
//! markers, and the "not available" path.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nx_diag::bundle::{self, MAX_BUNDLE_BYTES};
use nx_diag::collect::{gather, MEMBERS};
use nx_diag::{run, Config, Outcome};
use nx_rpc::bootctl::View;
use std::path::Path;

fn seed(root: &Path) {
    for d in [
        "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("apps/a.bin"), vec![7u8; 300]).unwrap();
    std::fs::write(root.join("trust/root.pub"), [1u8; 32]).unwrap();
    std::fs::write(root.join("boot/next_mode"), b"recovery\n").unwrap();
    std::fs::write(root.join("bootctl/state.nxs"), [0u8; 48]).unwrap();
    std::fs::write(
        root.join("flash/journal.json"),
        r#"{"version":1,"image_id":"ab","image_sha256":"cd","total_size":8192,"chunk_size":4096,"plan_chunks":2,"durable_seq":1,"durable_offset":4096,"verified":[true,false]}"#,
    )
    .unwrap();
    std::fs::write(
        root.join("flash/last-install.json"),
        r#"{"state":"installed","image_version":"1.0.0\u001b[31m","target":"partition system_b"}"#,
    )
    .unwrap();
}

fn config(dir: &Path) -> Config {
    let kmsg = dir.join("kmsg");
    std::fs::write(
        &kmsg,
        "6,1,1000000,-;Linux version 6.1\n6,2,2000000,-;virtio_blk: vda\n",
    )
    .unwrap();
    let console = dir.join("console.log");
    std::fs::write(&console, "recovery: init start\nrecovery: services ready\n").unwrap();
    Config {
        state_root: dir.join("state"),
        require_mountpoint: false,
        kmsg_sources: vec![kmsg],
        console_log: Some(console),
    }
}

fn view() -> View {
    View::Json {
        text: "{\n  \"format\": 1\n}\n".into(),
        source: "exportJson() on /run/bootctld.sock".into(),
    }
}

#[test]
fn same_inputs_same_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    seed(&a.path().join("state"));
    seed(&b.path().join("state"));
    let ca = config(a.path());
    let cb = config(b.path());
    let ba = bundle::encode(&gather(&ca, &view())).unwrap();
    let bb = bundle::encode(&gather(&cb, &view())).unwrap();
    // Paths of the temp dirs appear in MANIFEST sources; use identical relative layouts and
    // compare after normalising those.
    let ma = bundle::decode(&ba).unwrap();
    let mb = bundle::decode(&bb).unwrap();
    let norm = |ms: Vec<bundle::Member>, root: &Path| -> Vec<(String, Vec<u8>)> {
        ms.into_iter()
            .map(|m| {
                let t =
                    String::from_utf8_lossy(&m.data).replace(&root.display().to_string(), "ROOT");
                (m.name, t.into_bytes())
            })
            .collect()
    };
    assert_eq!(norm(ma, a.path()), norm(mb, b.path()));
    // Byte-identical for the very same inputs.
    let again = bundle::encode(&gather(&ca, &view())).unwrap();
    assert_eq!(ba, again);
}

#[test]
fn members_and_content() {
    let d = tempfile::tempdir().unwrap();
    seed(&d.path().join("state"));
    let cfg = config(d.path());
    let members = gather(&cfg, &view());
    let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, MEMBERS);
    let get = |n: &str| {
        String::from_utf8_lossy(&members.iter().find(|m| m.name == n).unwrap().data).into_owned()
    };
    assert_eq!(
        get("kernel.log"),
        "[    1.000000] Linux version 6.1\n[    2.000000] virtio_blk: vda\n"
    );
    assert!(get("console.log").contains("recovery: services ready"));
    assert!(
        get("next-boot.txt").contains("next_mode: \"recovery\\x0a\""),
        "{}",
        get("next-boot.txt")
    );
    assert!(get("next-boot.txt").contains("factory wipe: none"));
    let tree = get("state-tree.txt");
    assert!(
        tree.contains("f          300 /state/apps/a.bin\n"),
        "{tree}"
    );
    assert!(tree.contains("d            0 /state/trust\n"), "{tree}");
    let flash = get("flash.txt");
    assert!(flash.contains("verified segments: 1 of 2"), "{flash}");
    assert!(flash.contains("durable_seq: 1"), "{flash}");
    assert!(flash.contains("\"1.0.0\\x1b[31m\""), "escaped: {flash}");
    assert!(flash.contains("staging.img: absent"));
    assert_eq!(
        members
            .iter()
            .find(|m| m.name == "bootctl-state.nxs")
            .unwrap()
            .data
            .len(),
        48
    );
    let manifest = get("MANIFEST.txt");
    assert!(manifest.starts_with("nx-diag bundle format 1\n"));
    for n in MEMBERS.iter().filter(|n| **n != "MANIFEST.txt") {
        assert!(manifest.contains(n), "{n} not in {manifest}");
    }
    assert!(!manifest.contains("TRUNCATED"));
}

#[test]
fn bounded_even_with_huge_incompressible_inputs() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("state");
    seed(&root);
    // Incompressible noise (xorshift) in every source.
    let mut x: u64 = 0x9e3779b97f4a7c15;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    };
    let kmsg = d.path().join("kmsg");
    std::fs::write(&kmsg, noise(3 << 20)).unwrap();
    let console = d.path().join("console.log");
    std::fs::write(&console, noise(2 << 20)).unwrap();
    for i in 0..5000 {
        std::fs::write(
            root.join(format!("content/file-with-a-long-name-{i:05}")),
            b"",
        )
        .unwrap();
    }
    std::fs::write(root.join("bootctl/state.nxs"), noise(1 << 20)).unwrap();
    let cfg = Config {
        state_root: root.clone(),
        require_mountpoint: false,
        kmsg_sources: vec![kmsg],
        console_log: Some(console),
    };
    let huge = View::Json {
        text: "x".repeat(1 << 20),
        source: "test".into(),
    };
    let mut lines = Vec::new();
    let out = run(&cfg, &huge, &mut |l| lines.push(l.to_string())).unwrap();
    let Outcome::Written(w) = out else {
        panic!("{out:?}")
    };
    assert!(w.bytes <= MAX_BUNDLE_BYTES, "{} bytes", w.bytes);
    let bytes = std::fs::read(&w.path).unwrap();
    let members = bundle::decode(&bytes).unwrap();
    let get = |n: &str| members.iter().find(|m| m.name == n).unwrap();
    assert!(get("kernel.log")
        .data
        .starts_with(b"[nx-diag: TRUNCATED: the first"));
    assert!(get("console.log")
        .data
        .starts_with(b"[nx-diag: TRUNCATED: the first"));
    assert!(String::from_utf8_lossy(&get("state-tree.txt").data).contains("[nx-diag: TRUNCATED:"));
    assert!(String::from_utf8_lossy(&get("bootctl.json").data).contains("not_available"));
    let manifest = String::from_utf8_lossy(&get("MANIFEST.txt").data).into_owned();
    assert!(manifest.matches("TRUNCATED").count() >= 3, "{manifest}");
    assert_eq!(
        lines.last().unwrap(),
        &format!("recovery: diag written (bytes={})", w.bytes)
    );
}

#[test]
fn writes_numbered_bundles_and_reads_back_the_newest() {
    let d = tempfile::tempdir().unwrap();
    seed(&d.path().join("state"));
    let cfg = config(d.path());
    let mut lines = Vec::new();
    let Outcome::Written(w1) = run(&cfg, &view(), &mut |l| lines.push(l.to_string())).unwrap()
    else {
        panic!()
    };
    let Outcome::Written(w2) = run(&cfg, &view(), &mut |l| lines.push(l.to_string())).unwrap()
    else {
        panic!()
    };
    assert_eq!((w1.n, w2.n), (1, 2));
    assert!(w2.path.ends_with("recovery/diag-2.tar.zst"));
    let (name, bytes) = nx_diag::store::read_latest(&cfg.state_root)
        .unwrap()
        .unwrap();
    assert_eq!(name, "diag-2.tar.zst");
    assert_eq!(bytes.len() as u64, w2.bytes);
    // The second listing shows the first bundle.
    let members = bundle::decode(&bytes).unwrap();
    let tree = members.iter().find(|m| m.name == "state-tree.txt").unwrap();
    assert!(String::from_utf8_lossy(&tree.data).contains("/state/recovery/diag-1.tar.zst"));
    assert!(lines
        .iter()
        .any(|l| l == &format!("recovery: diag written (bytes={})", w1.bytes)));
}

#[test]
fn no_state_prints_not_available_and_zero_bytes() {
    let d = tempfile::tempdir().unwrap();
    let mut cfg = config(d.path());
    cfg.state_root = d.path().join("no-state");
    let mut lines = Vec::new();
    let out = run(&cfg, &view(), &mut |l| lines.push(l.to_string())).unwrap();
    assert!(matches!(out, Outcome::NotAvailable(_)));
    assert!(
        lines[0].starts_with("nx-diag: not available — no usable /state"),
        "{lines:?}"
    );
    assert_eq!(lines[1], "recovery: diag written (bytes=0)");
    assert!(!cfg.state_root.exists());
}

#[test]
fn binary_writes_a_bundle() {
    let d = tempfile::tempdir().unwrap();
    seed(&d.path().join("state"));
    let cfg = config(d.path());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nx-diag"))
        .arg("--state")
        .arg(&cfg.state_root)
        .arg("--allow-unmounted-state")
        .args(["--bootctld", "none", "--kmsg"])
        .arg(&cfg.kmsg_sources[0])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let (_, bytes) = nx_diag::store::read_latest(&cfg.state_root)
        .unwrap()
        .unwrap();
    assert!(
        stdout.contains(&format!("recovery: diag written (bytes={})", bytes.len())),
        "{stdout}"
    );
    let members = bundle::decode(&bytes).unwrap();
    let console = members.iter().find(|m| m.name == "console.log").unwrap();
    assert!(
        String::from_utf8_lossy(&console.data).starts_with("not available: no console log file")
    );
    // Without --allow-unmounted-state a temp dir is not a usable /state.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nx-diag"))
        .arg("--state")
        .arg(&cfg.state_root)
        .args(["--bootctld", "none"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("not available") && stdout.contains("recovery: diag written (bytes=0)"),
        "{stdout}"
    );
}
