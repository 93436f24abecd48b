//! The selftest checks against rebootd and bootctld served in-process on unix sockets (like
//! /run/rebootd.sock and /run/bootctld.sock), a temp-dir /state, a fake /proc and sysfs.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld_host::bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use selftest_client::*;
use std::path::Path;
use std::time::Duration;

struct Env {
    _dir: tempfile::TempDir,
    _rebootd: Option<TestServer>,
    _bootctld: Option<TestServer>,
    ctx: Ctx,
}

fn env(mode: Mode, daemons: bool, flashd: bool) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let state = d.join("state");
    for t in [
        "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
    ] {
        std::fs::create_dir_all(state.join(t)).unwrap();
    }
    std::fs::write(state.join("apps/a"), b"user data").unwrap();
    std::fs::write(state.join("trust/root.pub"), [5u8; 32]).unwrap();
    std::fs::write(d.join("pid1-cmdline"), b"/init\0").unwrap();
    std::fs::write(d.join("recovery-sh"), b"").unwrap();
    // sysfs + /dev + /proc for flashd
    let ports = d.join("ports");
    std::fs::create_dir_all(ports.join("vport0p1")).unwrap();
    std::fs::write(ports.join("vport0p1/name"), "com.nexus.flash\n").unwrap();
    let dev = d.join("dev");
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(dev.join("vport0p1"), b"").unwrap();
    let proc_root = d.join("proc");
    std::fs::create_dir_all(proc_root.join("1/fd")).unwrap();
    std::fs::write(proc_root.join("1/comm"), "init\n").unwrap();
    if flashd {
        std::fs::create_dir_all(proc_root.join("42/fd")).unwrap();
        std::fs::write(proc_root.join("42/comm"), "flashd\n").unwrap();
        std::os::unix::fs::symlink(dev.join("vport0p1"), proc_root.join("42/fd/5")).unwrap();
    }
    let reboot_sock = d.join("rebootd.sock");
    let bootctl_sock = d.join("bootctld.sock");
    let (r, b) = if daemons {
        (
            Some(
                TestServer::start(
                    Daemon::Rebootd(bootctld_host::rebootd::Config {
                        state: Some(state.clone()),
                        require_mountpoint: false,
                        endpoints: Vec::new(),
                        reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
                    }),
                    &reboot_sock,
                )
                .unwrap(),
            ),
            Some(
                TestServer::start(
                    Daemon::Bootctld(bootctld_config(
                        Some(&state),
                        "boot-1",
                        RebootVia::Stub("test".into()),
                    )),
                    &bootctl_sock,
                )
                .unwrap(),
            ),
        )
    } else {
        (None, None)
    };
    let mut ctx = Ctx::guest(mode);
    ctx.state_root = state;
    ctx.require_mountpoint = false;
    ctx.rebootd = reboot_sock;
    ctx.bootctld = bootctl_sock;
    ctx.pid1_cmdline = d.join("pid1-cmdline");
    ctx.recovery_marker = d.join("recovery-sh");
    ctx.proc_root = proc_root;
    ctx.ports_root = ports;
    ctx.dev_root = dev;
    ctx.kmsg_sources = vec![d.join("no-kmsg")];
    ctx.wait = Duration::from_millis(600);
    ctx.timeout = Duration::from_secs(5);
    Env {
        _dir: dir,
        _rebootd: r,
        _bootctld: b,
        ctx,
    }
}

fn lines(ctx: &Ctx) -> (Summary, Vec<String>) {
    let mut v = Vec::new();
    let s = run_all(ctx, &mut |l| v.push(l.to_string()));
    (s, v)
}

fn selftest_markers(v: &[String]) -> Vec<&str> {
    v.iter()
        .filter(|l| l.starts_with("SELFTEST: "))
        .map(String::as_str)
        .collect()
}

#[test]
fn recovery_all_ok_in_order() {
    let e = env(Mode::Recovery, true, true);
    std::fs::write(e.ctx.state_root.join("boot/next_mode"), b"normal\n").unwrap();
    let (s, v) = lines(&e.ctx);
    assert_eq!(
        selftest_markers(&v),
        [
            "SELFTEST: recovery boot ok",
            "SELFTEST: recovery diag ok",
            "SELFTEST: reset dry-run ok",
            "SELFTEST: flash receive ok",
            "SELFTEST: flash reboot flag ok",
            "SELFTEST: bootctl api ok",
        ],
        "{v:#?}"
    );
    assert_eq!(s.failed, 0);
    // The diag marker comes before the selftest's own marker.
    let diag = v
        .iter()
        .position(|l| l.starts_with("recovery: diag written (bytes="))
        .unwrap();
    let ok = v
        .iter()
        .position(|l| l == "SELFTEST: recovery diag ok")
        .unwrap();
    assert!(diag < ok);
    // The reboot flag was restored exactly.
    assert_eq!(
        std::fs::read(e.ctx.state_root.join("boot/next_mode")).unwrap(),
        b"normal\n"
    );
    // User data untouched by the dry run.
    assert_eq!(
        std::fs::read(e.ctx.state_root.join("apps/a")).unwrap(),
        b"user data"
    );
}

#[test]
fn normal_boot_skips_recovery_and_stubs_flash() {
    let e = env(Mode::Normal, true, false);
    let (s, v) = lines(&e.ctx);
    assert_eq!(
        selftest_markers(&v),
        [
            "SELFTEST: recovery boot skipped (normal boot)",
            "SELFTEST: recovery diag ok",
            "SELFTEST: reset dry-run ok",
            "SELFTEST: flash receive stub/placeholder",
            "SELFTEST: flash reboot flag ok",
            "SELFTEST: bootctl api ok",
        ],
        "{v:#?}"
    );
    assert_eq!((s.ok, s.stub, s.skipped, s.failed), (4, 1, 1, 0));
    assert!(
        !e.ctx.state_root.join("boot/next_mode").exists(),
        "no record before, none after"
    );
}

#[test]
fn nothing_is_claimed_without_the_daemons() {
    let e = env(Mode::Recovery, false, false);
    let (s, v) = lines(&e.ctx);
    let m = selftest_markers(&v);
    assert!(
        m[0].starts_with("SELFTEST: recovery boot FAILED: rebootd:"),
        "{m:?}"
    );
    // diag works without daemons (bootctl view "not available" inside the bundle).
    assert_eq!(m[1], "SELFTEST: recovery diag ok");
    assert!(m[2].starts_with("SELFTEST: reset dry-run FAILED"), "{m:?}");
    assert_eq!(
        m[3],
        "SELFTEST: flash receive FAILED: flashd is not running"
    );
    assert!(
        m[4].starts_with("SELFTEST: flash reboot flag FAILED"),
        "{m:?}"
    );
    assert!(m[5].starts_with("SELFTEST: bootctl api FAILED"), "{m:?}");
    assert_eq!(s.failed, 5);
    assert!(!m.iter().any(|l| l.ends_with(" ok") && !l.contains("diag")));
}

#[test]
fn wrong_pid1_or_ramdisk_fails_the_recovery_check() {
    let e = env(Mode::Recovery, true, true);
    std::fs::write(&e.ctx.pid1_cmdline, b"/sbin/init\0").unwrap();
    let o = check_recovery_boot(&e.ctx, &mut |_| {});
    assert!(
        matches!(&o, Outcome::Failed(w) if w.contains("not the ramdisk's /init")),
        "{o:?}"
    );
    std::fs::write(&e.ctx.pid1_cmdline, b"/init\0").unwrap();
    std::fs::remove_file(&e.ctx.recovery_marker).unwrap();
    let o = check_recovery_boot(&e.ctx, &mut |_| {});
    assert!(
        matches!(&o, Outcome::Failed(w) if w.contains("not the recovery ramdisk")),
        "{o:?}"
    );
}

#[test]
fn flash_receive_without_state_is_the_explicit_stub() {
    let mut e = env(Mode::Recovery, false, true);
    e.ctx.state_root = e.ctx.state_root.join("missing");
    let o = check_flash_receive(&e.ctx, &mut |_| {});
    assert!(
        matches!(&o, Outcome::Stub(w) if w.contains("no usable /state")),
        "{o:?}"
    );
    assert_eq!(
        marker_lines("flash receive", &o)[0],
        "SELFTEST: flash receive stub/placeholder"
    );
}

#[test]
fn fingerprint_sees_changes() {
    let e = env(Mode::Normal, false, false);
    let root = &e.ctx.state_root;
    let a = fingerprint(root).unwrap();
    assert_eq!(a, fingerprint(root).unwrap());
    std::fs::write(root.join("trust/root.pub"), [6u8; 32]).unwrap();
    assert_ne!(a, fingerprint(root).unwrap(), "same size, new content");
    let b = fingerprint(root).unwrap();
    std::fs::write(root.join("settings/new"), b"").unwrap();
    assert_ne!(b, fingerprint(root).unwrap());
    assert!(!Path::new(&root.join("flash")).join("x").exists());
}
