//! The real flashd binary: markers in order, and a SIGKILL mid-segment followed by a restart
//! on the same state dir resumes (resume point > 0) and installs the exact image.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{send_image, workdir, Client};
use flashd::testkit::{build_image, noise, Capture, RunningServer};
use std::io::BufRead;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Daemon {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

fn spawn(sock: &Path, state: &Path, out: &Path) -> Daemon {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flashd"))
        .arg("--listen")
        .arg(sock)
        .arg("--state")
        .arg(state)
        .arg("--install")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let l2 = lines.clone();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            match line {
                Ok(l) => l2.lock().unwrap().push(l),
                Err(_) => break,
            }
        }
    });
    Daemon { child, lines }
}

fn wait_marker(d: &Daemon, m: &str) {
    for _ in 0..1000 {
        if d.lines.lock().unwrap().iter().any(|l| l == m) {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("no `{m}` in {:?}", d.lines.lock().unwrap());
}

#[test]
fn binary_prints_the_five_markers_in_order_and_installs_the_exact_bytes() {
    let (_dir, sock, state, out) = workdir();
    let mut d = spawn(&sock, &state, &out);
    wait_marker(&d, "flashd: ready");
    let mut z = vec![0u8; 40_000];
    z.extend(noise(4, 10_000));
    let img = build_image("3", &[("kernel", noise(3, 30_000)), ("rootfs", z)], None).unwrap();
    let mut c = Client::connect(&sock);
    send_image(&mut c, &img, 8, 4096, None).unwrap();
    wait_marker(&d, "flashd: installed");
    c.send(proto::msg::Message::Info);
    match c.expect("INFO_REPLY", |m| {
        matches!(m, proto::msg::Message::InfoReply(_))
    }) {
        proto::msg::Message::InfoReply(r) => {
            assert_eq!(r.installed.map(|i| i.version), Some("3".to_string()))
        }
        _ => unreachable!(),
    }
    d.child.kill().unwrap();
    let _ = d.child.wait();
    assert_eq!(std::fs::read(&out).unwrap(), img);
    let lines = d.lines.lock().unwrap().clone();
    assert_eq!(
        lines,
        vec![
            "flashd: stub/placeholder: no trust key — accepting unsigned images",
            "flashd: ready",
            "flashd: hello host=testhost proto=1",
            "flashd: wrote seg=kernel bytes=30000",
            "flashd: wrote seg=rootfs bytes=50000",
            "flashd: verify ok",
            "flashd: installed",
        ]
    );
}

#[test]
fn sigkill_mid_segment_then_restart_resumes_and_installs_the_exact_image() {
    let (_dir, sock, state, out) = workdir();
    std::fs::write(&out, b"previous").unwrap();
    // One segment of 64 chunks of 4 KiB: a kill after 40 lands mid-segment.
    let img = build_image("7", &[("rootfs", noise(7, 64 * 4096))], None).unwrap();

    let mut d = spawn(&sock, &state, &out);
    wait_marker(&d, "flashd: ready");
    let mut c = Client::connect(&sock);
    send_image(&mut c, &img, 4, 4096, Some(40)).unwrap();
    // Give the background fsync a moment, then kill without warning.
    std::thread::sleep(Duration::from_millis(100));
    d.child.kill().unwrap();
    let _ = d.child.wait();
    assert_eq!(
        std::fs::read(&out).unwrap(),
        b"previous",
        "nothing installed yet"
    );
    assert!(state.join("flash/journal.json").exists());

    let mut d = spawn(&sock, &state, &out);
    wait_marker(&d, "flashd: ready");
    let mut c = Client::connect(&sock);
    let resumed = send_image(&mut c, &img, 4, 4096, None).unwrap();
    assert!(resumed > 0, "no resume point after the restart");
    assert!(resumed <= 40);
    wait_marker(&d, "flashd: installed");
    d.child.kill().unwrap();
    let _ = d.child.wait();
    assert_eq!(std::fs::read(&out).unwrap(), img);
}

#[test]
fn in_process_server_dropped_mid_segment_and_restarted_resumes() {
    let (_dir, sock, state, out) = workdir();
    let img = build_image(
        "8",
        &[("a", noise(8, 50 * 4096)), ("b", noise(9, 30 * 4096))],
        None,
    )
    .unwrap();
    for stop in [10u32, 35, 60] {
        let cap = Capture::new();
        let srv = RunningServer::start_simple(&state, &out, &sock, cap).unwrap();
        let mut c = Client::connect(&sock);
        send_image(&mut c, &img, 4, 4096, Some(stop)).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        srv.kill();
        assert!(!out.exists());
    }
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    let resumed = send_image(&mut c, &img, 4, 4096, None).unwrap();
    // Progress survives the kills (how much depends on which fsyncs completed).
    assert!(resumed > 0 && resumed <= 60, "resumed at {resumed}");
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert_eq!(std::fs::read(&out).unwrap(), img);
    // A second identical send is a no-op that still ends installed/unchanged.
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    send_image(&mut c, &img, 4, 4096, None).unwrap();
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert!(!cap.markers().iter().any(|m| m.starts_with("flashd: wrote")));
    let receipt: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("flash/last-install.json")).unwrap())
            .unwrap();
    assert_eq!(receipt["state"], "unchanged");

    // The install vanished behind flashd's back: the record is stale, the image is sent again.
    std::fs::remove_file(&out).unwrap();
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    send_image(&mut c, &img, 4, 4096, None).unwrap();
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert!(cap
        .markers()
        .iter()
        .any(|m| m.starts_with("flashd: wrote seg=a")));
    assert_eq!(std::fs::read(&out).unwrap(), img);
}

#[test]
fn a_staging_file_removed_mid_transfer_starts_over_instead_of_trusting_the_journal() {
    let (_dir, sock, state, out) = workdir();
    let img = build_image(
        "9",
        &[("a", noise(10, 40 * 4096)), ("b", noise(11, 8 * 4096))],
        None,
    )
    .unwrap();
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    // Segment a (40 chunks) completes and verifies, then the staging file disappears.
    send_image(&mut c, &img, 4, 4096, Some(44)).unwrap();
    drop(c);
    std::thread::sleep(Duration::from_millis(100));
    std::fs::remove_file(state.join("flash/staging.img")).unwrap();
    let mut c = Client::connect(&sock);
    let (code, text) = send_image(&mut c, &img, 4, 4096, None).unwrap_err();
    assert_eq!(code, proto::msg::ErrorCode::Storage.code(), "{text}");
    assert!(text.contains("vanished"), "{text}");
    drop(c);
    let mut c = Client::connect(&sock);
    assert_eq!(send_image(&mut c, &img, 4, 4096, None).unwrap(), 0);
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert_eq!(std::fs::read(&out).unwrap(), img);

    // Across a restart the journal is checked against the staging file.
    let img2 = build_image("10", &[("a", noise(12, 40 * 4096))], None).unwrap();
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap).unwrap();
    let mut c = Client::connect(&sock);
    send_image(&mut c, &img2, 4, 4096, Some(30)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    srv.kill();
    std::fs::remove_file(state.join("flash/staging.img")).unwrap();
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    assert_eq!(
        send_image(&mut c, &img2, 4, 4096, None).unwrap(),
        0,
        "resumed without data"
    );
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert_eq!(std::fs::read(&out).unwrap(), img2);
}
