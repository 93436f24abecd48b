//! The recovery menu over the real backend: rebootd and bootctld served in-process on unix
//! sockets (like the guest's /run/*.sock), nx-diag on a temp-dir /state, a fake /proc and
//! sysfs for flashd. Driven by a byte stream like the console.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld_host::bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use nx_recovery::guest::{GuestBackend, GuestConfig};
use nx_recovery::Menu;
use std::path::Path;

fn seed(root: &Path) {
    for d in [
        "apps", "content", "settings", "trust", "boot", "flash", "recovery", "bootctl",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("apps/notes.db"), vec![1u8; 500]).unwrap();
    std::fs::write(root.join("trust/root.pub"), [9u8; 32]).unwrap();
}

fn fake_proc(dir: &Path, with_flashd: bool) -> GuestConfig {
    let proc_root = dir.join("proc");
    let ports = dir.join("ports");
    let dev = dir.join("dev");
    std::fs::create_dir_all(ports.join("vport0p1")).unwrap();
    std::fs::write(ports.join("vport0p1/name"), "com.nexus.flash\n").unwrap();
    std::fs::create_dir_all(ports.join("vport0p2")).unwrap();
    std::fs::write(ports.join("vport0p2/name"), "com.nexus.reboot\n").unwrap();
    std::fs::create_dir_all(&dev).unwrap();
    std::fs::write(dev.join("vport0p1"), b"").unwrap();
    std::fs::create_dir_all(proc_root.join("1/fd")).unwrap();
    std::fs::write(proc_root.join("1/comm"), "init\n").unwrap();
    if with_flashd {
        std::fs::create_dir_all(proc_root.join("77/fd")).unwrap();
        std::fs::write(proc_root.join("77/comm"), "flashd\n").unwrap();
        std::os::unix::fs::symlink("/dev/null", proc_root.join("77/fd/0")).unwrap();
        std::os::unix::fs::symlink(dev.join("vport0p1"), proc_root.join("77/fd/3")).unwrap();
    }
    let mut cfg = GuestConfig::guest();
    cfg.proc_root = proc_root;
    cfg.ports_root = ports;
    cfg.dev_root = dev;
    cfg
}

#[test]
fn menu_against_real_daemons() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    seed(&state);
    let reboot_sock = dir.path().join("rebootd.sock");
    let bootctl_sock = dir.path().join("bootctld.sock");
    let _rebootd = TestServer::start(
        Daemon::Rebootd(bootctld_host::rebootd::Config {
            state: Some(state.clone()),
            require_mountpoint: false,
            endpoints: Vec::new(),
            reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
        }),
        &reboot_sock,
    )
    .unwrap();
    let _bootctld = TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(&state),
            "boot-1",
            RebootVia::Stub("test".into()),
        )),
        &bootctl_sock,
    )
    .unwrap();
    let mut cfg = fake_proc(dir.path(), true);
    cfg.state_root = state.clone();
    cfg.require_mountpoint = false;
    cfg.rebootd = reboot_sock;
    cfg.bootctld = bootctl_sock;
    cfg.kmsg_sources = vec![dir.path().join("no-kmsg")];
    let mut backend = GuestBackend { cfg };
    let device = nx_reset::device_name();

    let mut menu = Menu::new();
    let mut out = Vec::new();
    menu.start(&mut out);
    let mut run = |input: &str| -> String {
        let mut out = Vec::new();
        assert_eq!(menu.feed(&mut backend, input.as_bytes(), &mut out), None);
        String::from_utf8(out).unwrap()
    };

    let flash = run("1\r");
    assert!(
        flash.contains("flashd: running (pid 77), serving"),
        "{flash}"
    );
    assert!(flash.contains("journal.json: absent"), "{flash}");

    let slots = run("3\r");
    assert!(slots.contains("a     *       good"), "{slots}");
    assert!(slots.contains("storage: persistent"), "{slots}");

    let diag = run("2\r");
    assert!(diag.contains("recovery: diag written (bytes="), "{diag}");
    let (_, bundle) = nx_diag::store::read_latest(&state).unwrap().unwrap();
    let members = nx_diag::bundle::decode(&bundle).unwrap();
    let bootctl = members.iter().find(|m| m.name == "bootctl.json").unwrap();
    assert!(
        String::from_utf8_lossy(&bootctl.data).contains("\"active\": \"a\""),
        "bootctld's view is in the bundle"
    );

    // Factory reset: wrong name cancels, nothing recorded.
    let r = run(&format!("4\ryes\r{device}x\r"));
    assert!(r.contains("/state/apps/  1 file, 0 dirs, 500 bytes"), "{r}");
    assert!(r.contains("cancelled"), "{r}");
    assert!(!state.join("boot/factory_wipe").exists());
    // Right answers: rebootd records the request.
    let r = run(&format!("4\ryes\r{device}\r"));
    assert!(
        r.contains("the wipe request is recorded, but rebootd cannot reboot here (stub)"),
        "{r}"
    );
    assert_eq!(
        std::fs::read(state.join("boot/factory_wipe")).unwrap(),
        b"wipe\n"
    );
    assert!(
        state.join("apps/notes.db").exists(),
        "the wipe itself runs in recovery-init"
    );

    let r = run("5\rn\r");
    assert!(r.contains("next boot: normal (recorded)"), "{r}");
    assert_eq!(
        std::fs::read(state.join("boot/next_mode")).unwrap(),
        b"normal\n"
    );
}

#[test]
fn flash_status_without_flashd_and_daemons_down() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    seed(&state);
    let mut cfg = fake_proc(dir.path(), false);
    cfg.state_root = state.clone();
    cfg.require_mountpoint = false;
    cfg.rebootd = dir.path().join("none.sock");
    cfg.bootctld = dir.path().join("none2.sock");
    cfg.timeout = std::time::Duration::from_secs(2);
    let mut backend = GuestBackend { cfg };
    let mut menu = Menu::new();
    let mut out = Vec::new();
    menu.feed(&mut backend, b"1\r3\r4\ryes\r", &mut out);
    let out = String::from_utf8(out).unwrap();
    assert!(out.contains("flashd: NOT running"), "{out}");
    assert!(out.contains("slot status failed: bootctld on"), "{out}");
    assert!(
        out.contains("factory reset unavailable: rebootd on"),
        "{out}"
    );
    assert!(!state.join("boot/factory_wipe").exists());
}
