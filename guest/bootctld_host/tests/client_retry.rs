//! The guest-local client retries its *connect* while bootctld is still starting (the normal
//! init asks for `bootAttempt` right after starting it; a bound-but-not-listening socket gives
//! `ECONNREFUSED`), and gives up with a clear error after the grace period.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld::service::RebootVia;
use bootctld_host::{bootctld_config, Daemon, TestServer};
use std::time::{Duration, Instant};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn a_call_made_before_bootctld_listens_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("bootctld.sock");
    // A socket file that exists but nobody listens on (ECONNREFUSED), like the moment between
    // bind() and listen(), or a daemon that died and is being restarted.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let state_dir = dir.path().to_path_buf();
    let sock2 = sock.clone();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(600));
        std::fs::remove_file(&sock2).unwrap();
        TestServer::start(
            Daemon::Bootctld(bootctld_config(
                Some(&state_dir),
                "boot-1",
                RebootVia::Stub("test".into()),
            )),
            &sock2,
        )
        .unwrap()
    });
    let t0 = Instant::now();
    let d = rt()
        .block_on(bootctld::client::boot_attempt(&sock))
        .unwrap();
    assert!(d.bootable);
    assert!(t0.elapsed() >= Duration::from_millis(500));
    let server = starter.join().unwrap();
    // Exactly one bootAttempt reached the daemon.
    let attempts = server
        .markers()
        .iter()
        .filter(|m| m.starts_with("bootctl: bootAttempt"))
        .count();
    assert_eq!(attempts, 1);
}

#[test]
fn no_daemon_is_an_error_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nobody.sock");
    let t0 = Instant::now();
    let e = rt().block_on(bootctld::client::confirm(&sock)).unwrap_err();
    let waited = t0.elapsed();
    assert!(e.to_string().contains("could not connect"), "{e}");
    assert!(waited >= bootctld::client::CONNECT_GRACE, "{waited:?}");
    assert!(waited < bootctld::client::CONNECT_GRACE + Duration::from_secs(2));
}
