//! `nx boot …` and `nx_engine::rpc_client::reboot` against real daemons: bootctld
//! / rebootd served in-process on a unix socket in a temp dir (`--listen`),
//! driven through the `nx` binary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld_host::bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use std::path::Path;
use std::process::{Command, Output};

fn nx(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_nx"))
        .args(args)
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

fn ok(args: &[&str]) -> String {
    let out = nx(args);
    assert!(out.status.success(), "nx {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

/// `nx args…` fails with `code` (the exit-code table: 5 unreachable, 6 refused).
fn fails_with(code: i32, args: &[&str]) -> String {
    let out = nx(args);
    assert_eq!(out.status.code(), Some(code), "nx {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

/// bootctld refused: exit 6.
fn fails(args: &[&str]) -> String {
    let out = nx(args);
    assert_eq!(out.status.code(), Some(6), "nx {args:?} should be refused");
    String::from_utf8(out.stderr).unwrap()
}

fn start(state: &Path, sock: &Path, boot_id: &str) -> TestServer {
    TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(state),
            boot_id,
            RebootVia::Stub("host test".into()),
        )),
        sock,
    )
    .unwrap()
}

#[test]
fn nx_boot_drives_bootctld() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctl.sock");
    let port = format!("unix:{}", sock.display());
    let p = port.as_str();
    let server = start(dir.path(), &sock, "boot-1");

    let table = ok(&["boot", "status", "--port", p]);
    assert!(table.starts_with("slot  active  health"), "{table}");
    assert!(table.contains("a     *       good"), "{table}");
    assert!(table.contains("b             empty"), "{table}");
    assert!(table.contains("storage: persistent"), "{table}");

    // b was never imaged: bootctld refuses, nx says why.
    let err = fails(&["boot", "set-active", "b", "--trial", "--port", p]);
    assert!(err.contains("bootctld: slot b is empty"), "{err}");

    // Pretend flashd installed version 2 into b (flashd reports it over RPC).
    bootctld_host::call(
        &sock,
        |c: proto::rpc::bootctl_capnp::boot_ctl::Client| async move {
            let mut req = c.slot_imaged_request();
            req.get().set_slot(proto::rpc::bootctl_capnp::Slot::B);
            req.get().set_version("2");
            req.send().promise.await?;
            Ok(())
        },
    )
    .unwrap();

    let out = ok(&[
        "boot",
        "set-active",
        "b",
        "--trial",
        "--tries",
        "2",
        "--port",
        p,
    ]);
    assert_eq!(
        out,
        "slot b is active for the next boot, on trial (2 tries)\n"
    );
    let err = fails(&["boot", "confirm", "--port", p]);
    assert!(err.contains("nothing to confirm"), "{err}");

    // The normal init's bootAttempt, then the health check's confirm.
    bootctld_host::call(
        &sock,
        |c: proto::rpc::bootctl_capnp::boot_ctl::Client| async move {
            c.boot_attempt_request().send().promise.await?;
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(
        ok(&["boot", "confirm", "--port", p]),
        "confirmed: the booted slot is good\n"
    );
    assert_eq!(
        ok(&["boot", "mark-bad", "a", "--port", p]),
        "slot a is marked bad (until it is re-imaged)\n"
    );

    let json = ok(&["boot", "status", "--json", "--port", p]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["active"], "b");
    assert_eq!(v["slots"]["b"]["health"], "good");
    assert_eq!(v["slots"]["b"]["trial"], false);
    assert_eq!(v["slots"]["a"]["health"], "bad");

    let markers: Vec<String> = server
        .markers()
        .into_iter()
        .filter(|m| m.starts_with("bootctl: "))
        .collect();
    assert_eq!(
        markers,
        vec![
            "bootctl: slotImaged slot=b version=2",
            "bootctl: setActive slot=b trial=true tries=2",
            "bootctl: bootAttempt slot=b trial=true tries=1",
            "bootctl: confirm",
            "bootctl: markBad slot=a",
        ]
    );
    server.stop();

    // The slot table survives a restart of bootctld (bare-path port spec).
    let again = start(dir.path(), &sock, "boot-2");
    let table = ok(&["boot", "status", "--port", sock.to_str().unwrap()]);
    assert!(table.contains("b     *       good"), "{table}");
    again.stop();
}

#[test]
fn nx_boot_without_a_guest_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = format!("unix:{}", dir.path().join("bootctl.sock").display());
    let err = fails_with(5, &["boot", "status", "--port", &port]);
    assert!(err.contains("no such file: is QEMU running?"), "{err}");
    assert!(err.contains("just recovery"), "{err}");
}

#[test]
fn nx_boot_argument_errors() {
    let out = nx(&["boot", "set-active", "c"]);
    assert_eq!(out.status.code(), Some(2));
    let out = nx(&["boot", "set-active", "a", "--tries", "3"]);
    assert_eq!(out.status.code(), Some(2), "--tries needs --trial");
}

#[test]
fn rpc_client_reboot_talks_to_rebootd() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("reboot.sock");
    let _server = TestServer::start(
        Daemon::Rebootd(bootctld_host::rebootd::Config {
            state: Some(dir.path().to_path_buf()),
            require_mountpoint: false,
            endpoints: Vec::new(),
            reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
        }),
        &sock,
    )
    .unwrap();
    let port = format!("unix:{}", sock.display());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let real = rt
        .block_on(nx_engine::rpc_client::reboot(&port, "recovery"))
        .unwrap();
    assert!(
        !real,
        "host test: rebootd is not managed by our PID 1 (stub)"
    );
    assert_eq!(
        std::fs::read(dir.path().join("boot/next_mode")).unwrap(),
        b"recovery\n"
    );
}

#[test]
fn nx_boot_over_a_port_without_connection_boundaries() {
    // Like a QEMU chardev socket in front of a virtio-serial port: every
    // connection lands in the same byte stream and bootctld never sees an EOF.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctl.sock");
    let server = TestServer::start(
        Daemon::BootctldBehindVport(bootctld_config(
            Some(dir.path()),
            "boot-1",
            RebootVia::Stub("host test".into()),
        )),
        &sock,
    )
    .unwrap();
    let p = sock.to_str().unwrap();
    for _ in 0..3 {
        let table = ok(&["boot", "status", "--port", p]);
        assert!(table.contains("a     *       good"), "{table}");
    }
    // Noise and a frame cut in the middle by a vanished client.
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        let mut frame = Vec::new();
        proto::rpc::link::encode(0xdead_beef, 0, &[0u8; 200], &mut frame).unwrap();
        s.write_all(b"line noise").unwrap();
        s.write_all(&frame[..frame.len() / 2]).unwrap();
    }
    ok(&["boot", "mark-bad", "b", "--port", p]);
    let json = ok(&["boot", "status", "--json", "--port", p]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["slots"]["b"]["health"], "bad");
    let err = fails(&["boot", "set-active", "b", "--port", p]);
    assert!(err.contains("marked bad"), "{err}");
    ok(&["boot", "status", "--port", p]);
    assert!(server
        .markers()
        .contains(&"bootctl: markBad slot=b".to_string()));
}
