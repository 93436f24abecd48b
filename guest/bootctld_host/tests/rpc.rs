//! Real Cap'n Proto RPC over unix sockets: bootctld and rebootd served
//! in-process exactly like the binaries, driven through the generated clients.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld::machine::{BootState, Health, Slot};
use bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, call, Daemon, TestServer};
use nx_contract::NextBoot;
use proto::rpc::bootctl_capnp::{self as bc, boot_ctl};
use proto::rpc::reboot_capnp::{self, reboot};
use std::path::Path;

fn wslot(s: Slot) -> bc::Slot {
    bootctld::snapshot::slot_to_schema(s)
}

fn state(sock: &Path) -> (BootState, bool) {
    call(sock, |c: boot_ctl::Client| async move {
        let resp = c.state_request().send().promise.await?;
        let r = resp.get()?;
        let st = bootctld::snapshot::read(r.get_state()?)
            .map_err(|e| capnp::Error::failed(e.to_string()))?;
        Ok((st, r.get_persistent()))
    })
    .unwrap()
}

fn set_active(sock: &Path, s: Slot, trial: bool, tries: u8) -> anyhow::Result<()> {
    call(sock, move |c: boot_ctl::Client| async move {
        let mut req = c.set_active_request();
        req.get().set_slot(wslot(s));
        req.get().set_trial(trial);
        req.get().set_tries_left(tries);
        req.send().promise.await?;
        Ok(())
    })
}

fn slot_imaged(sock: &Path, s: Slot, v: &'static str) -> anyhow::Result<()> {
    call(sock, move |c: boot_ctl::Client| async move {
        let mut req = c.slot_imaged_request();
        req.get().set_slot(wslot(s));
        req.get().set_version(v);
        req.send().promise.await?;
        Ok(())
    })
}

fn confirm(sock: &Path) -> anyhow::Result<()> {
    call(sock, |c: boot_ctl::Client| async move {
        c.confirm_request().send().promise.await?;
        Ok(())
    })
}

fn mark_bad(sock: &Path, s: Slot) -> anyhow::Result<()> {
    call(sock, move |c: boot_ctl::Client| async move {
        let mut req = c.mark_bad_request();
        req.get().set_slot(wslot(s));
        req.send().promise.await?;
        Ok(())
    })
}

/// (bootable, slot, trial, tries_left, rolled_back)
fn boot_attempt(sock: &Path) -> (bool, Slot, bool, u8, bool) {
    call(sock, |c: boot_ctl::Client| async move {
        let resp = c.boot_attempt_request().send().promise.await?;
        let d = resp.get()?.get_decision()?;
        Ok((
            d.get_bootable(),
            bootctld::snapshot::slot_from_schema(d.get_slot()?),
            d.get_trial(),
            d.get_tries_left(),
            d.get_rolled_back(),
        ))
    })
    .unwrap()
}

fn bootctl_reboot(sock: &Path) -> anyhow::Result<bool> {
    call(sock, |c: boot_ctl::Client| async move {
        let resp = c.reboot_request().send().promise.await?;
        Ok(resp.get()?.get_rebooting())
    })
}

fn export_json(sock: &Path) -> String {
    call(sock, |c: boot_ctl::Client| async move {
        let resp = c.export_json_request().send().promise.await?;
        Ok(resp.get()?.get_json()?.to_string()?)
    })
    .unwrap()
}

fn bootctl_markers(server: &TestServer) -> Vec<String> {
    server
        .markers()
        .into_iter()
        .filter(|m| m.starts_with("bootctl: "))
        .collect()
}

fn stub() -> RebootVia {
    RebootVia::Stub("host test".into())
}

#[test]
fn update_flow_over_rpc_with_markers() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctl.sock");
    let server = TestServer::start(
        Daemon::Bootctld(bootctld_config(Some(dir.path()), "boot-1", stub())),
        &sock,
    )
    .unwrap();
    assert!(server.markers().contains(&"bootctld: ready".to_string()));

    let (s, persistent) = state(&sock);
    assert!(persistent);
    assert_eq!(s, BootState::factory_default());

    // Refused: b was never imaged. The reason travels to the caller.
    let e = set_active(&sock, Slot::B, true, 3).unwrap_err();
    assert!(format!("{e:#}").contains("slot b is empty"), "{e:#}");

    // Recovery: flashd installed version 2 into b, activates it on trial.
    slot_imaged(&sock, Slot::B, "2").unwrap();
    set_active(&sock, Slot::B, true, 3).unwrap();
    let e = confirm(&sock).unwrap_err();
    assert!(format!("{e:#}").contains("nothing to confirm"), "{e:#}");

    // Normal boot: the init asks which slot to boot; the health check confirms.
    assert_eq!(boot_attempt(&sock), (true, Slot::B, true, 2, false));
    confirm(&sock).unwrap();
    let (s, _) = state(&sock);
    assert_eq!(s.active, Slot::B);
    assert_eq!(s.b.health, Health::Good);
    assert!(!s.b.trial);

    mark_bad(&sock, Slot::A).unwrap();
    assert!(!bootctl_reboot(&sock).unwrap(), "host test: stub reboot");

    let j: serde_json::Value = serde_json::from_str(&export_json(&sock)).unwrap();
    assert_eq!(j["active"], "b");
    assert_eq!(j["slots"]["b"]["health"], "good");
    assert_eq!(j["slots"]["a"]["health"], "bad");
    assert_eq!(j["storage"], "persistent");

    assert_eq!(
        bootctl_markers(&server),
        vec![
            "bootctl: slotImaged slot=b version=2",
            "bootctl: setActive slot=b trial=true tries=3",
            "bootctl: bootAttempt slot=b trial=true tries=2",
            "bootctl: confirm",
            "bootctl: markBad slot=a",
            "bootctl: reboot (stub) — host test",
        ]
    );
    server.stop();
}

#[test]
fn trial_runs_out_and_rolls_back_over_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctl.sock");
    let server = TestServer::start(
        Daemon::Bootctld(bootctld_config(Some(dir.path()), "boot-1", stub())),
        &sock,
    )
    .unwrap();
    slot_imaged(&sock, Slot::B, "broken").unwrap();
    set_active(&sock, Slot::B, true, 2).unwrap();
    assert_eq!(boot_attempt(&sock), (true, Slot::B, true, 1, false));
    assert_eq!(boot_attempt(&sock), (true, Slot::B, true, 0, false));
    assert_eq!(boot_attempt(&sock), (true, Slot::A, false, 0, true));
    let (s, _) = state(&sock);
    assert_eq!(s.b.health, Health::Bad);
    assert_eq!(s.active, Slot::A);
    let m = bootctl_markers(&server);
    assert!(m.contains(&"bootctl: markBad slot=b".to_string()), "{m:?}");
    assert!(
        m.contains(&"bootctl: rollback to slot=a".to_string()),
        "{m:?}"
    );
}

#[test]
fn state_survives_a_restart_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctl.sock");
    let snap = dir.path().join("bootctl/state.nxs");
    let first = TestServer::start(
        Daemon::Bootctld(bootctld_config(Some(dir.path()), "boot-1", stub())),
        &sock,
    )
    .unwrap();
    slot_imaged(&sock, Slot::B, "2").unwrap();
    set_active(&sock, Slot::B, true, 3).unwrap();
    boot_attempt(&sock);
    let (before, _) = state(&sock);
    first.stop();
    let bytes = std::fs::read(&snap).unwrap();
    assert_eq!(bytes, bootctld::snapshot::encode(&before));

    // Same boot (bootctld restarted): the state is back and confirm still works.
    let second = TestServer::start(
        Daemon::Bootctld(bootctld_config(Some(dir.path()), "boot-1", stub())),
        &sock,
    )
    .unwrap();
    assert_eq!(state(&sock).0, before);
    assert!(second.markers()[0].starts_with("bootctld: state loaded from"));
    second.stop();
    assert_eq!(
        std::fs::read(&snap).unwrap(),
        bytes,
        "no change, no rewrite"
    );

    // Next boot (new boot id, e.g. recovery): nothing to confirm.
    let third = TestServer::start(
        Daemon::Bootctld(bootctld_config(Some(dir.path()), "boot-2", stub())),
        &sock,
    )
    .unwrap();
    let e = confirm(&sock).unwrap_err();
    assert!(format!("{e:#}").contains("nothing to confirm"), "{e:#}");
    third.stop();
}

#[test]
fn ram_only_without_state_dir() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctl.sock");
    let missing = dir.path().join("no-state");
    let server = TestServer::start(
        Daemon::Bootctld(bootctld_config(Some(&missing), "boot-1", stub())),
        &sock,
    )
    .unwrap();
    let m = server.markers();
    assert!(
        m[0].starts_with("bootctld: stub/placeholder") && m[0].contains("RAM-only"),
        "{m:?}"
    );
    assert!(!state(&sock).1, "never claims persistence");
    slot_imaged(&sock, Slot::B, "2").unwrap();
    assert!(export_json(&sock).contains("ram-only stub/placeholder"));
    assert!(!missing.exists());
}

fn rebootd_config(state: Option<&Path>) -> rebootd::Config {
    rebootd::Config {
        state: state.map(Path::to_path_buf),
        require_mountpoint: false,
        endpoints: Vec::new(),
        reboot_method: rebootd::pid1::MethodArg::Stub,
    }
}

fn pending(sock: &Path) -> (Option<NextBoot>, bool, bool) {
    call(sock, |c: reboot::Client| async move {
        let p = nx_rpc::reboot::pending(c).await?;
        Ok((p.target, p.factory_wipe, p.persistent))
    })
    .unwrap()
}

fn mode(sock: &Path, target: NextBoot) -> anyhow::Result<bool> {
    mode_raw(sock, reboot_capnp::BootTarget::from(target) as u16)
}

/// Set the enum field `target` of a request to any value, also one not in the schema.
fn set_raw_target<'a, B>(params: B, value: u16)
where
    B: Into<capnp::dynamic_value::Builder<'a>>,
{
    let mut s: capnp::dynamic_struct::Builder = params.into().downcast();
    let field = s.get_schema().get_field_by_name("target").unwrap();
    let capnp::introspect::TypeVariant::Enum(raw) = field.get_type().which() else {
        panic!("target is an enum");
    };
    let v = capnp::dynamic_value::Enum::new(value, raw.into());
    s.set(field, capnp::dynamic_value::Reader::Enum(v)).unwrap();
}

/// `mode(target)` with the raw enumerant `value`.
fn mode_raw(sock: &Path, value: u16) -> anyhow::Result<bool> {
    call(sock, move |c: reboot::Client| async move {
        let mut req = c.mode_request();
        set_raw_target(req.get(), value);
        let resp = req.send().promise.await?;
        Ok(resp.get()?.get_rebooting())
    })
}

/// `setNext(target)` with the raw enumerant `value`.
fn set_next_raw(sock: &Path, value: u16) -> anyhow::Result<()> {
    call(sock, move |c: reboot::Client| async move {
        let mut req = c.set_next_request();
        set_raw_target(req.get(), value);
        req.send().promise.await?;
        Ok(())
    })
}

#[test]
fn rebootd_persists_the_next_boot_record() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("reboot.sock");
    let _server =
        TestServer::start(Daemon::Rebootd(rebootd_config(Some(dir.path()))), &sock).unwrap();
    assert_eq!(pending(&sock), (None, false, true));

    call(&sock, |c: reboot::Client| async move {
        nx_rpc::reboot::set_next(c, NextBoot::Recovery).await
    })
    .unwrap();
    let record = dir.path().join("boot/next_mode");
    assert_eq!(std::fs::read(&record).unwrap(), b"recovery\n");

    assert!(
        !mode(&sock, NextBoot::Normal).unwrap(),
        "stub method: no real reboot"
    );
    assert_eq!(std::fs::read(&record).unwrap(), b"normal\n");
    assert_eq!(pending(&sock), (Some(NextBoot::Normal), false, true));

    // An enumerant the schema does not have is an error answer, and changes nothing.
    for bad in [2, 7, u16::MAX] {
        let e = mode_raw(&sock, bad).unwrap_err();
        assert!(
            format!("{e:#}").contains(&format!("invalid next-boot target (enumerant {bad})")),
            "{e:#}"
        );
        let e = set_next_raw(&sock, bad).unwrap_err();
        assert!(
            format!("{e:#}").contains("invalid next-boot target"),
            "{e:#}"
        );
    }
    assert_eq!(std::fs::read(&record).unwrap(), b"normal\n");
    // rebootd is still serving.
    assert_eq!(pending(&sock), (Some(NextBoot::Normal), false, true));

    let rebooting = call(&sock, |c: reboot::Client| async move {
        let resp = c.factory_wipe_request().send().promise.await?;
        Ok(resp.get()?.get_rebooting())
    })
    .unwrap();
    assert!(!rebooting);
    assert_eq!(std::fs::read(&record).unwrap(), b"recovery\n");
    assert_eq!(
        std::fs::read(dir.path().join("boot/factory_wipe")).unwrap(),
        b"wipe\n"
    );
    assert_eq!(pending(&sock), (Some(NextBoot::Recovery), true, true));
}

#[test]
fn rebootd_without_state_refuses_to_reboot() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("reboot.sock");
    let _server = TestServer::start(
        Daemon::Rebootd(rebootd_config(Some(&dir.path().join("missing")))),
        &sock,
    )
    .unwrap();
    let e = mode(&sock, NextBoot::Recovery).unwrap_err();
    assert!(format!("{e:#}").contains("stub/placeholder"), "{e:#}");
    assert!(!pending(&sock).2);
}

#[test]
fn bootctl_reboot_goes_through_rebootd() {
    let dir = tempfile::tempdir().unwrap();
    let rsock = dir.path().join("reboot.sock");
    let bsock = dir.path().join("bootctl.sock");
    let _rebootd =
        TestServer::start(Daemon::Rebootd(rebootd_config(Some(dir.path()))), &rsock).unwrap();
    let bootctl = TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(dir.path()),
            "boot-1",
            RebootVia::Rebootd(rsock.clone()),
        )),
        &bsock,
    )
    .unwrap();
    assert!(!bootctl_reboot(&bsock).unwrap());
    assert_eq!(
        std::fs::read(dir.path().join("boot/next_mode")).unwrap(),
        b"normal\n"
    );
    assert_eq!(
        bootctl_markers(&bootctl),
        vec!["bootctl: reboot (stub) — rebootd cannot reboot here"]
    );
}

#[test]
fn bootctl_reboot_without_rebootd_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bsock = dir.path().join("bootctl.sock");
    let _bootctl = TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(dir.path()),
            "boot-1",
            RebootVia::Rebootd(dir.path().join("nobody.sock")),
        )),
        &bsock,
    )
    .unwrap();
    let e = bootctl_reboot(&bsock).unwrap_err();
    assert!(format!("{e:#}").contains("is rebootd running?"), "{e:#}");
}

#[test]
fn guest_local_clients_drive_the_update_flow() {
    use bootctld::client;
    let dir = tempfile::tempdir().unwrap();
    let bsock = dir.path().join("bootctld.sock");
    let rsock = dir.path().join("rebootd.sock");
    let _rebootd =
        TestServer::start(Daemon::Rebootd(rebootd_config(Some(dir.path()))), &rsock).unwrap();
    let _bootctld = TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(dir.path()),
            "boot-1",
            RebootVia::Rebootd(rsock.clone()),
        )),
        &bsock,
    )
    .unwrap();
    let b = bsock.as_path();
    bootctld_host::block_on(async {
        // Recovery: flashd installs into the inactive slot and activates it.
        client::slot_imaged(b, Slot::B, "2").await.unwrap();
        client::set_active(b, Slot::B, true, 3).await.unwrap();
        let t = std::time::Duration::from_secs(5);
        nx_rpc::reboot::request_set_next(&rsock, nx_contract::NextBoot::Normal, t)
            .await
            .unwrap();
        // Normal boot: the init asks which slot, the health check confirms.
        let d = client::boot_attempt(b).await.unwrap();
        assert!(d.bootable && d.trial);
        assert_eq!(
            (d.slot, d.tries_left, d.version.as_str()),
            (Slot::B, 2, "2")
        );
        client::confirm(b).await.unwrap();
        let (s, persistent) = client::state(b).await.unwrap();
        assert!(persistent);
        assert_eq!(s.b.health, Health::Good);
        assert!(client::export_json(b)
            .await
            .unwrap()
            .contains("\"active\": \"b\""));
        assert!(!client::reboot(b).await.unwrap(), "stub rebootd");
        assert!(!nx_rpc::reboot::request_factory_wipe(&rsock, t)
            .await
            .unwrap());
    })
    .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("boot/factory_wipe")).unwrap(),
        b"wipe\n"
    );
}
