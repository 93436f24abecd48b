//! `nx status` and `nx devices` against real daemons on the host: flashd, bootctld and rebootd
//! served in-process on the three standard sockets of a run directory `ROOT/build/qemu` in a
//! temporary project root, driven through the `nx` binary run from a sub-directory of that
//! root (so the default target is found by walking up, not relative to the current directory).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld_host::bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use flashd::testkit::{Capture, RunningServer};
use std::path::Path;
use std::process::{Command, Output};

fn nx(cwd: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nx"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("NX_PORT")
        .env_remove("NX_DEVICE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    println!(
        "$ nx {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

struct Guest {
    _flashd: Option<RunningServer>,
    _bootctld: TestServer,
    _rebootd: TestServer,
}

/// The three daemons on `run/{flash,bootctl,reboot}.sock`, their state under `run/state*`.
fn guest(run: &Path, with_flashd: bool) -> Guest {
    std::fs::create_dir_all(run).unwrap();
    let fstate = run.join("state-flashd");
    let bstate = run.join("state-boot");
    let rstate = run.join("state-reboot");
    for d in [&fstate, &bstate, &rstate] {
        std::fs::create_dir_all(d).unwrap();
    }
    let flashd = with_flashd.then(|| {
        RunningServer::start_simple(
            &fstate,
            &run.join("out.img"),
            &run.join("flash.sock"),
            Capture::new(),
        )
        .unwrap()
    });
    let bootctld = TestServer::start(
        Daemon::Bootctld(bootctld_config(
            Some(&bstate),
            "boot-1",
            RebootVia::Stub("host test".into()),
        )),
        &run.join("bootctl.sock"),
    )
    .unwrap();
    let rebootd = TestServer::start(
        Daemon::Rebootd(bootctld_host::rebootd::Config {
            state: Some(rstate),
            require_mountpoint: false,
            endpoints: Vec::new(),
            reboot_method: bootctld_host::rebootd::pid1::MethodArg::Stub,
        }),
        &run.join("reboot.sock"),
    )
    .unwrap();
    Guest {
        _flashd: flashd,
        _bootctld: bootctld,
        _rebootd: rebootd,
    }
}

fn project() -> (tempfile::TempDir, std::path::PathBuf) {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    let sub = t.path().join("docs/deep");
    std::fs::create_dir_all(&sub).unwrap();
    (t, sub)
}

#[test]
fn status_of_a_recovery_guest_found_from_a_subdirectory() {
    let (t, sub) = project();
    let run = t.path().join("build/qemu");
    let _g = guest(&run, true);

    let out = nx(&sub, &[], &["status"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("device:     nexus"), "{text}");
    assert!(text.contains("mode:       recovery"), "{text}");
    assert!(text.contains("booted:     recovery ramdisk"), "{text}");
    assert!(text.contains("next boot:  default"), "{text}");
    assert!(text.contains("  a* health=good"), "{text}");
    assert!(text.contains("  b  health=empty"), "{text}");
    assert!(
        text.contains("installed:  nothing (flashd has no install receipt)"),
        "{text}"
    );

    let out = nx(&sub, &[], &["status", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["device"], "nexus");
    assert_eq!(v["mode"], "recovery");
    assert_eq!(v["bootctld"]["answer"]["active"], "a");
    assert_eq!(v["bootctld"]["answer"]["a"]["health"], "good");
    assert_eq!(v["bootctld"]["answer"]["b"]["tries_left"], 0);
    assert_eq!(v["rebootd"]["answer"]["mode"], "default");
    assert_eq!(v["flashd"]["answer"]["proto"], 1);
    let port = v["flashd"]["port"].as_str().unwrap();
    assert_eq!(
        port,
        format!("unix:{}", run.join("flash.sock").display()),
        "the default port is resolved against the project root"
    );

    // A next-boot record shows up.
    bootctld_host::call(
        &run.join("reboot.sock"),
        |c: proto::rpc::reboot_capnp::reboot::Client| async move {
            let mut req = c.set_next_request();
            req.get()
                .set_target(proto::rpc::reboot_capnp::BootTarget::Recovery);
            req.send().promise.await?;
            Ok(())
        },
    )
    .unwrap();
    let out = nx(&sub, &[], &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["rebootd"]["answer"]["mode"], "recovery", "{v}");
}

#[test]
fn status_without_flashd_is_normal_mode_and_nothing_is_exit_5() {
    let (t, sub) = project();
    let run = t.path().join("build/qemu");
    {
        let _g = guest(&run, false);
        // The boot chain's call on a normal boot: lastBoot becomes slot a.
        bootctld_host::call(
            &run.join("bootctl.sock"),
            |c: proto::rpc::bootctl_capnp::boot_ctl::Client| async move {
                c.boot_attempt_request().send().promise.await?;
                Ok(())
            },
        )
        .unwrap();
        let out = nx(&sub, &[], &["status"]);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("mode:       normal"), "{text}");
        assert!(text.contains("booted:     slot a"), "{text}");
        assert!(
            text.contains("installed:  not known (flashd runs only in recovery)"),
            "{text}"
        );
    }
    // Every daemon gone: exit 5 (target unreachable) with a hint, and `--json` still prints.
    let out = nx(&sub, &[], &["status", "--json"]);
    assert_eq!(out.status.code(), Some(5));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "unreachable");
    assert!(v["flashd"]["error"].is_string());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("cargo xtask recovery --no-flash"), "{err}");
}

#[test]
fn devices_lists_every_answering_run_dir_and_env_picks_the_target() {
    let (t, sub) = project();
    let g1 = t.path().join("build/qemu");
    let g2 = t.path().join("build/e2e/fanout/g2/qemu");
    let _a = guest(&g1, true);
    let _b = guest(&g2, false);
    // A stale socket directory: listed only with --all.
    let stale = t.path().join("build/e2e/old/qemu");
    std::fs::create_dir_all(&stale).unwrap();
    drop(std::os::unix::net::UnixListener::bind(stale.join("flash.sock")).unwrap());

    let out = nx(&sub, &[], &["devices"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("* build/qemu") && text.contains("nexus      recovery a"),
        "{text}"
    );
    assert!(text.contains("build/e2e/fanout/g2/qemu"), "{text}");
    assert!(text.contains("flashd,rebootd,bootctld"), "{text}");
    assert!(!text.contains("build/e2e/old"), "{text}");

    let out = nx(&sub, &[], &["devices", "--json", "--all"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 3, "{v}");
    let by_dir = |d: &Path| {
        list.iter()
            .find(|e| e["dir"] == d.display().to_string())
            .unwrap()
            .clone()
    };
    let e1 = by_dir(&g1);
    assert_eq!(e1["default"], true);
    assert_eq!(
        e1["answering"],
        serde_json::json!(["flashd", "rebootd", "bootctld"])
    );
    assert_eq!(e1["status"]["device"], "nexus");
    let e2 = by_dir(&g2);
    assert_eq!(e2["default"], false);
    assert_eq!(e2["status"]["mode"], "normal");
    assert_eq!(by_dir(&stale)["answering"], serde_json::json!([]));

    // NX_DEVICE (relative: against the root) picks the second guest for every verb…
    let env = [("NX_DEVICE", "build/e2e/fanout/g2/qemu")];
    let out = nx(&sub, &env, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "normal", "{v}");
    let out = nx(&sub, &env, &["devices", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["default"] == true)
        .unwrap();
    assert_eq!(d["dir"], g2.display().to_string());
    // …and so does nx.toml, below the environment.
    std::fs::write(
        t.path().join("nx.toml"),
        "device = \"build/e2e/fanout/g2/qemu\"\n",
    )
    .unwrap();
    let out = nx(&sub, &[], &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "normal", "{v}");
    let out = nx(&sub, &[("NX_DEVICE", "build/qemu")], &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["mode"], "recovery", "env beats nx.toml: {v}");
    // An explicit --port beats both.
    let flash = format!("unix:{}", g1.join("flash.sock").display());
    let out = nx(&sub, &[], &["flash", "info", "--port", &flash]);
    assert!(out.status.success());
}
