//! `nx reset factory` against rebootd served in-process on a temp-dir /state (like the
//! guest's, through the `nx` binary): the dry-run prints the exact plan and changes nothing,
//! a real reset asks twice and only then records the wipe request with rebootd; the wipe that
//! recovery-init then performs leaves trust byte-identical.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld_host::rebootd::nx_reset;
use bootctld_host::{Daemon, TestServer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn nx(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_nx"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let _ = input.write_all(stdin.as_bytes());
    drop(input);
    let out = child.wait_with_output().unwrap();
    println!(
        "$ nx {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn seed(root: &Path) {
    for d in [
        "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::create_dir_all(root.join("apps/com.example.notes")).unwrap();
    std::fs::write(
        root.join("apps/com.example.notes/notes.db"),
        vec![1u8; 4096],
    )
    .unwrap();
    std::fs::create_dir_all(root.join("content/photos")).unwrap();
    std::fs::write(root.join("content/photos/a.jpg"), vec![2u8; 1234]).unwrap();
    std::fs::write(root.join("settings/locale"), b"en_US\n").unwrap();
    std::fs::create_dir_all(root.join("trust/certs")).unwrap();
    std::fs::write(root.join("trust/root.pub"), [7u8; 32]).unwrap();
    std::fs::write(root.join("trust/certs/ca.pem"), b"-----BEGIN-----\n").unwrap();
    std::os::unix::fs::symlink("../trust/root.pub", root.join("settings/key-link")).unwrap();
    std::fs::write(root.join("bootctl/state.nxs"), [0u8; 48]).unwrap();
}

/// (path, size, bytes) of every file below `dir`, and symlink targets.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let content = if m.file_type().is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if m.is_dir() {
                stack.push(p.clone());
                b"<dir>".to_vec()
            } else {
                std::fs::read(&p).unwrap()
            };
            v.push((p, content));
        }
    }
    v.sort();
    v
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
fn dry_run_prints_the_exact_plan_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    seed(&state);
    let sock = dir.path().join("reboot.sock");
    let _server = rebootd(&state, &sock);
    let port = format!("unix:{}", sock.display());
    let before = snapshot(&state);

    let out = nx(&["reset", "factory", "--dry-run", "--port", &port], "");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let device = nx_reset::device_name();
    let expected = format!(
        "device: {device}\n{}dry run: nothing was changed\n",
        nx_reset::plan(&state).unwrap().render_text()
    );
    assert_eq!(
        text, expected,
        "nx renders the guest's plan exactly like the guest"
    );
    for line in [
        "  /state/apps/  1 file, 1 dir, 4096 bytes",
        "            -  /state/apps/com.example.notes/",
        "         4096  /state/apps/com.example.notes/notes.db",
        "         1234  /state/content/photos/a.jpg",
        "           17  /state/settings/key-link -> ../trust/root.pub (the link only)",
        "            6  /state/settings/locale",
        "  /state/trust/  2 files, 1 dir, 48 bytes",
        "           16  /state/trust/certs/ca.pem",
        "           32  /state/trust/root.pub",
        "  /state/bootctl/  1 file, 0 dirs, 48 bytes",
        "total: wipe 6 paths (5353 bytes)",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }

    let out = nx(
        &["reset", "factory", "--dry-run", "--json", "--port", &port],
        "",
    );
    assert!(out.status.success());
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(json, nx_reset::plan(&state).unwrap().to_json());
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let wiped: Vec<_> = v["wiped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["path"].as_str().unwrap())
        .collect();
    assert_eq!(wiped, ["/state/apps", "/state/content", "/state/settings"]);
    assert_eq!(v["preserved"][0]["path"], "/state/trust");

    assert_eq!(snapshot(&state), before, "a dry run changes nothing");
    assert!(!state.join("boot/factory_wipe").exists());
}

#[test]
fn reset_asks_twice_and_wrong_answers_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    seed(&state);
    let sock = dir.path().join("reboot.sock");
    let _server = rebootd(&state, &sock);
    let port = format!("unix:{}", sock.display());
    let device = nx_reset::device_name();
    let before = snapshot(&state);

    for (answers, why) in [
        ("no\n".to_string(), "not \"yes\""),
        (format!("yes\n{device}-typo\n"), "is not the device name"),
        ("yes\n".to_string(), "no answer"),
        (String::new(), "no answer"),
    ] {
        let out = nx(&["reset", "factory", "--port", &port], &answers);
        assert_eq!(out.status.code(), Some(1), "{answers:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(err.contains("factory reset cancelled"), "{err}");
        assert!(err.contains(why), "{why}: {err}");
        assert!(err.contains("nothing was changed"), "{err}");
        assert_eq!(snapshot(&state), before);
    }

    let out = nx(
        &["reset", "factory", "--port", &port],
        &format!("yes\n{device}\n"),
    );
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("Type yes to continue: "), "{err}");
    assert!(
        err.contains(&format!("Type the device name ({device}) to confirm: ")),
        "{err}"
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("rebootd recorded the wipe request"), "{text}");
    assert!(text.contains("stub"), "host test: no real reboot: {text}");
    assert_eq!(
        std::fs::read(state.join("boot/factory_wipe")).unwrap(),
        b"wipe\n"
    );
    assert_eq!(
        std::fs::read(state.join("boot/next_mode")).unwrap(),
        b"recovery\n"
    );
    // Nothing is wiped before recovery-init runs the wipe.
    assert!(state.join("apps/com.example.notes/notes.db").exists());
}

#[test]
fn reset_yes_then_the_wipe_in_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    seed(&state);
    let trust_before = snapshot(&state.join("trust"));
    let sock = dir.path().join("reboot.sock");
    let _server = rebootd(&state, &sock);
    let port = format!("unix:{}", sock.display());

    let out = nx(
        &["reset", "factory", "--yes", "--json", "--port", &port],
        "",
    );
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["requested"], true);
    assert_eq!(v["rebooting"], false);
    assert_eq!(v["wiped_bytes"], 4096 + 1234 + 17 + 6);

    // recovery-init at the next boot:
    let mut lines = Vec::new();
    nx_reset::wipe(&state, &mut |l| lines.push(l.to_string())).unwrap();
    assert_eq!(lines.first().unwrap(), "nx: reset factory wipe start");
    assert_eq!(lines.last().unwrap(), "nx: reset factory wipe done");
    for t in ["apps", "content", "settings"] {
        assert_eq!(std::fs::read_dir(state.join(t)).unwrap().count(), 0, "{t}");
    }
    assert_eq!(snapshot(&state.join("trust")), trust_before);
    assert!(!state.join("boot/factory_wipe").exists());

    let out = nx(&["reset", "factory", "--dry-run", "--port", &port], "");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("total: wipe 0 paths (0 bytes)"), "{text}");
}

#[test]
fn no_guest_says_so() {
    let out = nx(
        &[
            "reset",
            "factory",
            "--dry-run",
            "--port",
            "unix:/nonexistent/reboot.sock",
        ],
        "",
    );
    // Unreachable: exit 5 (the exit-code table).
    assert_eq!(out.status.code(), Some(5));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no such file: is QEMU running?"), "{err}");
    let out = nx(&["reset", "factory", "--dry-run", "--yes"], "");
    assert_eq!(out.status.code(), Some(2), "--yes conflicts with --dry-run");
}

#[test]
fn ram_only_rebootd_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("reboot.sock");
    let _server = TestServer::start(
        Daemon::Rebootd(bootctld_host::rebootd::Config {
            state: None,
            require_mountpoint: false,
            endpoints: Vec::new(),
            reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
        }),
        &sock,
    )
    .unwrap();
    let port = format!("unix:{}", sock.display());
    let out = nx(&["reset", "factory", "--dry-run", "--port", &port], "");
    // rebootd refused: exit 6 (the exit-code table).
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("stub/placeholder"), "{err}");
}
