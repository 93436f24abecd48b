//! `nx recovery diag` against rebootd served in-process on a temp-dir /state: fetch the
//! newest bundle, `--new`, `--out`, the check of what the guest sends.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld_host::rebootd::nx_diag;
use bootctld_host::{Daemon, TestServer};
use std::path::Path;
use std::process::{Command, Output};

fn nx(args: &[&str], cwd: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_nx"))
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap();
    println!(
        "$ nx {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn rebootd(state: &Path, sock: &Path) -> TestServer {
    TestServer::start(
        Daemon::Rebootd(bootctld_host::rebootd::Config {
            state: Some(state.to_path_buf()),
            require_mountpoint: false,
            endpoints: Vec::new(),
            reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
        }),
        sock,
    )
    .unwrap()
}

#[test]
fn fetch_new_and_newest_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    for d in ["apps", "trust", "boot", "flash", "recovery", "bootctl"] {
        std::fs::create_dir_all(state.join(d)).unwrap();
    }
    std::fs::write(state.join("apps/x"), b"data").unwrap();
    let sock = dir.path().join("reboot.sock");
    let _server = rebootd(&state, &sock);
    let port = format!("unix:{}", sock.display());
    let work = dir.path().join("host");
    std::fs::create_dir_all(&work).unwrap();

    // Nothing yet.
    let out = nx(&["recovery", "diag", "--port", &port], &work);
    // rebootd refused: exit 6 (the exit-code table).
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no diag bundle"), "{err}");
    assert!(err.contains("--new"), "{err}");

    // A new one, saved under the guest's name.
    let out = nx(&["recovery", "diag", "--new", "--port", &port], &work);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("wrote diag-1.tar.zst ("), "{text}");
    assert!(text.contains("8 members: MANIFEST.txt"), "{text}");
    let saved = std::fs::read(work.join("diag-1.tar.zst")).unwrap();
    assert_eq!(
        saved,
        std::fs::read(state.join("recovery/diag-1.tar.zst")).unwrap()
    );
    let members = nx_diag::bundle::decode(&saved).unwrap();
    let tree = members.iter().find(|m| m.name == "state-tree.txt").unwrap();
    assert!(String::from_utf8_lossy(&tree.data).contains("/state/apps/x"));

    // The newest, to --out, as JSON.
    nx(&["recovery", "diag", "--new", "--port", &port], &work);
    let out_file = dir.path().join("out.tar.zst");
    let out = nx(
        &[
            "recovery",
            "diag",
            "--json",
            "--out",
            out_file.to_str().unwrap(),
            "--port",
            &port,
        ],
        &work,
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["bundle"], "diag-2.tar.zst");
    let names: Vec<_> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, nx_diag::collect::MEMBERS);
    assert_eq!(
        std::fs::read(&out_file).unwrap(),
        std::fs::read(state.join("recovery/diag-2.tar.zst")).unwrap()
    );
}

#[test]
fn a_corrupt_bundle_in_the_guest_is_not_saved() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(state.join("recovery")).unwrap();
    std::fs::write(state.join("recovery/diag-5.tar.zst"), b"not a bundle").unwrap();
    let sock = dir.path().join("reboot.sock");
    let _server = rebootd(&state, &sock);
    let port = format!("unix:{}", sock.display());
    let out = nx(&["recovery", "diag", "--port", &port], dir.path());
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("not valid; not saved"), "{err}");
    assert!(!dir.path().join("diag-5.tar.zst").exists());
}
