//! The one exit-code table (`nx_cli::exit`), run for real: every failure class for every verb
//! group (flash, boot, reset, recovery, image) against host daemons (flashd, rebootd and
//! bootctld served in-process on unix sockets), and the identification probe: a verb at the
//! wrong daemon's port fails within 1 s, naming both daemons.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// Only `test_image` is needed here.
#[allow(dead_code)]
mod flash_support;

use bootctld_host::bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use flashd::testkit::{Capture, RunningServer};
use nx_cli::exit::Exit;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NX: &str = env!("CARGO_BIN_EXE_nx");

struct Rig {
    dir: tempfile::TempDir,
    flash: PathBuf,
    reboot: PathBuf,
    bootctl: PathBuf,
    img: PathBuf,
    _servers: (RunningServer, TestServer, TestServer),
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let flash = dir.path().join("flash.sock");
        let reboot = dir.path().join("reboot.sock");
        let bootctl = dir.path().join("bootctl.sock");
        let img = dir.path().join("os.img");
        std::fs::write(&img, flash_support::test_image(5, 1)).unwrap();
        let f = RunningServer::start_simple(
            &state,
            &dir.path().join("out.img"),
            &flash,
            Capture::new(),
        )
        .unwrap();
        let r = TestServer::start(
            Daemon::Rebootd(bootctld_host::rebootd::Config {
                state: Some(state.clone()),
                require_mountpoint: false,
                endpoints: Vec::new(),
                reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
            }),
            &reboot,
        )
        .unwrap();
        let b = TestServer::start(
            Daemon::Bootctld(bootctld_config(
                Some(&state),
                "boot-1",
                RebootVia::Stub("exit-code test".into()),
            )),
            &bootctl,
        )
        .unwrap();
        Rig {
            dir,
            flash,
            reboot,
            bootctl,
            img,
            _servers: (f, r, b),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn unix(p: &Path) -> String {
    format!("unix:{}", p.display())
}

/// Run `nx args…`; the output and how long it took.
fn nx(args: &[&str]) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new(NX)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let took = t.elapsed();
    println!(
        "$ nx {} -> {:?} in {took:?}\n{}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, took)
}

fn expect(args: &[&str], class: Exit) -> String {
    let (out, _) = nx(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(i32::from(class.code())),
        "nx {args:?} should exit {class:?}: {stderr}"
    );
    stderr
}

/// One command per verb group, with `--port PORT` to be appended.
fn verbs(img: &str) -> Vec<(&'static str, Vec<String>)> {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("flash", v(&["flash", "send", img, "--retries", "1"])),
        ("flash", v(&["flash", "info"])),
        ("flash", v(&["flash", "reboot", "normal"])),
        ("boot", v(&["boot", "status"])),
        ("reset", v(&["reset", "factory", "--dry-run"])),
        ("recovery", v(&["recovery", "diag"])),
    ]
}

#[test]
fn every_verb_group_maps_unreachable_to_5_with_distinct_reasons() {
    let rig = Rig::new();
    let plain = rig.path("plain-file");
    std::fs::write(&plain, b"not a socket").unwrap();
    let dead = rig.path("dead.sock");
    drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
    let img = rig.img.display().to_string();
    for (group, cmd) in verbs(&img) {
        for (port, reason) in [
            (rig.path("none.sock"), "no such file"),
            (plain.clone(), "not a socket (a regular file)"),
            (dead.clone(), "nobody listening"),
        ] {
            let p = unix(&port);
            let mut args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            args.extend(["--port", &p]);
            let err = expect(&args, Exit::Unreachable);
            assert!(err.contains(reason), "{group}: {args:?}: {err}");
        }
    }
}

#[test]
fn the_wrong_daemon_is_named_within_a_second() {
    let rig = Rig::new();
    let img = rig.img.display().to_string();
    let (flash, reboot, bootctl) = (unix(&rig.flash), unix(&rig.reboot), unix(&rig.bootctl));
    let cases: Vec<(Vec<&str>, &str, &str, &Path)> = vec![
        (
            vec!["flash", "send", &img, "--port", &reboot],
            "rebootd",
            "flashd",
            &rig.flash,
        ),
        (
            vec!["flash", "info", "--port", &bootctl],
            "bootctld",
            "flashd",
            &rig.flash,
        ),
        (
            vec!["flash", "verify", &img, "--port", &reboot],
            "rebootd",
            "flashd",
            &rig.flash,
        ),
        (
            vec!["flash", "reboot", "normal", "--port", &flash],
            "flashd",
            "rebootd",
            &rig.reboot,
        ),
        (
            vec!["boot", "status", "--port", &reboot],
            "rebootd",
            "bootctld",
            &rig.bootctl,
        ),
        (
            vec!["boot", "confirm", "--port", &flash],
            "flashd",
            "bootctld",
            &rig.bootctl,
        ),
        (
            vec!["reset", "factory", "--dry-run", "--port", &bootctl],
            "bootctld",
            "rebootd",
            &rig.reboot,
        ),
        (
            vec!["recovery", "diag", "--port", &flash],
            "flashd",
            "rebootd",
            &rig.reboot,
        ),
    ];
    for (args, found, wanted, right) in cases {
        let (out, took) = nx(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        let msg = format!(
            "this port is {found}, not {wanted}: use {}",
            right.display()
        );
        assert!(err.contains(&msg), "{args:?}: want `{msg}` in {err}");
        assert_eq!(out.status.code(), Some(5), "{args:?}: {err}");
        assert!(took < Duration::from_secs(1), "{args:?} took {took:?}");
    }
    // ...and the right ports still work, identified.
    let (out, _) = nx(&["boot", "status", "--port", &bootctl]);
    assert!(out.status.success());
    let (out, _) = nx(&["flash", "info", "--port", &flash]);
    assert!(out.status.success());
}

#[test]
fn usage_errors_exit_2_in_every_group() {
    for args in [
        &["flash", "send", "x.img", "--chunk", "3K"][..],
        &["flash", "info", "--port", "ftp:x"],
        &["flash", "reboot", "sideways"],
        &["boot", "status", "--port", "ftp:x"],
        &["boot", "set-active", "c"],
        &["reset", "factory", "--yes", "--dry-run"],
        &["recovery", "diag", "--port", "ftp:x"],
        &["image", "inspect"],
    ] {
        expect(args, Exit::Usage);
    }
}

#[test]
fn refusals_verification_and_trust_failures_have_their_own_codes() {
    let rig = Rig::new();
    let (flash, bootctl) = (unix(&rig.flash), unix(&rig.bootctl));
    // Target refused (6): bootctld will not activate an empty slot.
    let err = expect(
        &["boot", "set-active", "b", "--trial", "--port", &bootctl],
        Exit::Refused,
    );
    assert!(err.contains("slot b is empty"), "{err}");
    // ... and flashd holds no image: verify finds another install.
    let img = rig.img.display().to_string();
    expect(&["flash", "verify", &img, "--port", &flash], Exit::Refused);

    // Verification failed (3): a truncated image, in the image and the flash groups.
    let full = std::fs::read(&rig.img).unwrap();
    let cut = rig.path("cut.img");
    std::fs::write(&cut, &full[..full.len() - 4096]).unwrap();
    let cut_s = cut.display().to_string();
    let err = expect(&["image", "inspect", &cut_s], Exit::Invalid);
    assert!(err.contains("truncated"), "{err}");
    expect(&["image", "verify", &cut_s], Exit::Invalid);
    expect(&["flash", "send", &cut_s, "--port", &flash], Exit::Invalid);

    // Signature/trust (4): a signature is required and the image has none.
    let key = rig.path("k");
    let key_s = key.display().to_string();
    expect(&["image", "keygen", "--out", &key_s], Exit::Ok);
    let pubkey = format!("{key_s}.pub");
    expect(&["image", "verify", &img, "--pub", &pubkey], Exit::Trust);

    // Local error (1): an output path that cannot be written, checked before any work.
    let err = expect(
        &[
            "flash",
            "send",
            &img,
            "--port",
            &flash,
            "--receipt",
            "/nonexistent/r.json",
        ],
        Exit::Error,
    );
    assert!(err.contains("/nonexistent"), "{err}");
    assert!(
        !rig.path("out.img").exists(),
        "nothing may be flashed first"
    );
    // ... nor a bundle made on the target for nothing.
    let reboot = unix(&rig.reboot);
    let err = expect(
        &[
            "recovery",
            "diag",
            "--new",
            "--out",
            "/nonexistent/d.tar.zst",
            "--port",
            &reboot,
        ],
        Exit::Error,
    );
    assert!(
        err.contains("directory /nonexistent does not exist"),
        "{err}"
    );
    let bundles = std::fs::read_dir(rig.path("state/recovery"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(bundles, 0, "a bundle was made before --out was checked");
    // ... nor a key made and lost; and no temp-file name in the message.
    let err = expect(&["image", "keygen", "--out", "/nonexistent/k"], Exit::Error);
    assert!(err.contains("/nonexistent/k"), "{err}");
    assert!(!err.contains(".nx-") && !err.contains(".tmp"), "{err}");
}

#[test]
fn help_prints_the_table_for_nx_and_each_group() {
    for args in [
        &["--help"][..],
        &["flash", "--help"],
        &["boot", "--help"],
        &["reset", "--help"],
        &["recovery", "--help"],
        &["image", "--help"],
    ] {
        let (out, _) = nx(args);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains(nx_cli::exit::TABLE), "{args:?}:\n{help}");
    }
}

#[test]
fn a_port_without_connection_boundaries_answers_every_probe() {
    // bootctld behind a simulated virtio-serial port: one byte stream for every host
    // connection, so each probe arrives after the bytes of the earlier conversations.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctl.sock");
    let _srv = TestServer::start(
        Daemon::BootctldBehindVport(bootctld_config(
            Some(dir.path()),
            "boot-1",
            RebootVia::Stub("exit-code test".into()),
        )),
        &sock,
    )
    .unwrap();
    let port = unix(&sock);
    for _ in 0..3 {
        expect(&["boot", "status", "--port", &port], Exit::Ok);
        let (out, took) = nx(&["flash", "info", "--port", &port]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("this port is bootctld, not flashd"), "{err}");
        assert_eq!(out.status.code(), Some(5));
        assert!(took < Duration::from_secs(1), "{took:?}");
    }
}
