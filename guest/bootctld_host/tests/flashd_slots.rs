//! flashd's slot-aware install (`flashd::slots` and the sticky slot target of the server) against a
//! real bootctld and rebootd served in-process on unix sockets: install target, slotImaged +
//! setActive(trial) + the reboot request, the last-good-slot refusal, missing partitions and
//! an unreachable bootctld.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld::machine::{Health, Slot};
use bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use flashd::slots;
use slots::{SlotEnv, SlotError};
use std::path::{Path, PathBuf};

/// A fake `/sys/class/block` with the GPT slot partitions of our slot disk.
fn fake_sysfs(root: &Path) -> PathBuf {
    let sys = root.join("sys-class-block");
    for (d, text) in [
        ("vdb", "DEVNAME=vdb\nDEVTYPE=disk\n"),
        (
            "vdb1",
            "DEVNAME=vdb1\nDEVTYPE=partition\nPARTNAME=system_a\n",
        ),
        (
            "vdb2",
            "DEVNAME=vdb2\nDEVTYPE=partition\nPARTNAME=system_b\n",
        ),
    ] {
        std::fs::create_dir_all(sys.join(d)).unwrap();
        std::fs::write(sys.join(d).join("uevent"), text).unwrap();
    }
    sys
}

struct Guest {
    dir: tempfile::TempDir,
    bootctl: TestServer,
    _reboot: TestServer,
    env: SlotEnv,
}

fn guest() -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let bsock = dir.path().join("bootctld.sock");
    let rsock = dir.path().join("rebootd.sock");
    let reboot = TestServer::start(
        Daemon::Rebootd(rebootd::Config {
            state: Some(dir.path().to_path_buf()),
            require_mountpoint: false,
            endpoints: Vec::new(),
            reboot_method: rebootd::pid1::MethodArg::Stub,
        }),
        &rsock,
    )
    .unwrap();
    let bootctl = TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(dir.path()),
            "boot-1",
            RebootVia::Rebootd(rsock.clone()),
        )),
        &bsock,
    )
    .unwrap();
    let env = SlotEnv {
        bootctld: bsock,
        rebootd: rsock,
        sys_dir: fake_sysfs(dir.path()),
        dev_dir: PathBuf::from("/dev"),
        tries: slots::TRIAL_TRIES,
        esp: dir.path().join("no-esp"),
    };
    Guest {
        dir,
        bootctl,
        _reboot: reboot,
        env,
    }
}

fn state(g: &Guest) -> bootctld::machine::BootState {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bootctld::client::state(&g.env.bootctld))
        .unwrap()
        .0
}

#[test]
fn update_of_a_fresh_device_goes_to_slot_b_then_reboots_into_its_trial() {
    let g = guest();
    let (slot, dev) = slots::resolve_inactive_slot_in(&g.env).unwrap();
    assert_eq!((slot, dev.as_path()), (Slot::B, Path::new("/dev/vdb2")));
    assert_eq!(
        slots::target_marker(slot, &dev),
        "flashd: install slot=b (system_b on /dev/vdb2)"
    );

    let a = slots::after_install(&g.env.bootctld, &g.env.rebootd, slot, "2").unwrap();
    assert_eq!(
        a,
        slots::Activated {
            slot: Slot::B,
            tries: 3,
            rebooting: false // rebootd runs with the stub reboot method here
        }
    );
    assert!(slots::activated_marker(&a).contains("reboot (stub)"));

    let st = state(&g);
    assert_eq!(st.active, Slot::B);
    assert_eq!(st.b.health, Health::Unknown);
    assert!(st.b.trial);
    assert_eq!(st.b.tries_left, 3);
    assert_eq!(st.b.version, "2");
    assert_eq!(st.a.health, Health::Good);
    // rebootd persisted the one-shot record for the firmware.
    assert_eq!(
        std::fs::read(g.dir.path().join("boot/next_mode")).unwrap(),
        b"normal\n"
    );
    let markers = g.bootctl.markers();
    let imaged = markers
        .iter()
        .position(|m| m == "bootctl: slotImaged slot=b version=2")
        .expect("slotImaged marker");
    let active = markers
        .iter()
        .position(|m| m == "bootctl: setActive slot=b trial=true tries=3")
        .expect("setActive marker");
    assert!(imaged < active, "{markers:?}");
}

#[test]
fn a_second_update_during_the_trial_never_overwrites_the_last_good_slot() {
    let g = guest();
    slots::after_install_in(&g.env, Slot::B, "2").unwrap();
    let e = slots::resolve_inactive_slot_in(&g.env).unwrap_err();
    assert!(
        matches!(
            e,
            SlotError::Update(bootctld::update::UpdateError::WouldOverwriteLastGood {
                target: Slot::A,
                active: Slot::B,
                ..
            })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("nx boot mark-bad b"), "{e}");
}

#[test]
fn missing_partition_and_unreachable_bootctld_are_clear_errors() {
    let g = guest();
    let mut env = g.env.clone();
    env.sys_dir = g.dir.path().join("no-sysfs");
    let e = slots::resolve_inactive_slot_in(&env).unwrap_err();
    assert!(
        matches!(e, SlotError::NoPartition { slot: Slot::B, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("system_b"), "{e}");

    // The guest-default lookup (the host has no GPT partition named system_b).
    match slots::resolve_inactive_slot(&g.env.bootctld) {
        Err(SlotError::NoPartition { slot: Slot::B, .. }) => {}
        Ok((Slot::B, dev)) => eprintln!("this host has a system_b partition: {}", dev.display()),
        other => panic!("unexpected: {other:?}"),
    }

    let mut env = g.env.clone();
    env.bootctld = g.dir.path().join("nobody.sock");
    let e = slots::resolve_inactive_slot_in(&env).unwrap_err();
    assert!(e.to_string().contains("is bootctld running"), "{e}");
    let e = slots::after_install_in(&env, Slot::B, "2").unwrap_err();
    assert!(e.to_string().contains("slotImaged failed"), "{e}");
    assert!(
        e.to_string()
            .contains("previously active slot stays active"),
        "{e}"
    );
    // Nothing changed.
    assert_eq!(state(&g).active, Slot::A);
}

#[test]
fn a_refused_activation_leaves_the_old_slot_active() {
    let g = guest();
    // An invalid version is refused by bootctld's slotImaged: b is not activated.
    let e = slots::after_install_in(&g.env, Slot::B, "bad\u{7f}version").unwrap_err();
    assert!(e.to_string().contains("slotImaged failed"), "{e}");
    let st = state(&g);
    assert_eq!(st.active, Slot::A);
    assert_eq!(st.b.health, Health::Empty);
}

#[test]
fn flashd_keeps_its_slot_target_for_the_whole_transfer_and_rechooses_after_activation() {
    use flashd::config::InstallSpec;
    use flashd::install::Destination;
    use flashd::store::InstallTarget;
    let g = guest();
    // The slot choice is runtime state of the server's destination, not configuration.
    let dest = Destination::new(InstallSpec::slot(g.env.clone()));
    let first = dest.resolve().unwrap();
    assert_eq!(first, InstallTarget::Block(PathBuf::from("/dev/vdb2")));
    // bootctld changes its mind behind flashd's back (another update activated b):
    // the transfer in progress still writes the slot it started with.
    slots::after_install_in(&g.env, Slot::B, "2").unwrap();
    assert_eq!(dest.resolve().unwrap(), first);
    // Once flashd itself clears the choice (after its own activation), it asks again and
    // bootctld refuses: slot a is the last good one while b is on trial.
    dest.forget_slot();
    let err = dest.resolve().unwrap_err();
    assert!(!err.is_empty());
}
