//! Durability and read-back (issue #14 item 5): an "unchanged" install re-reads the target
//! and checks it against the manifest, zero ranges included, before it counts as installed.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{head_of, send_image, workdir, Client};
use flashd::testkit::{build_image, noise, Capture, RunningServer};
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// One segment: 8 KiB of data, 16 KiB of zeros, 4 KiB of data.
fn sparse_image() -> Vec<u8> {
    let mut seg = noise(5, 8192);
    seg.extend_from_slice(&[0u8; 16384]);
    seg.extend_from_slice(&noise(6, 4096));
    build_image("1.0.0", &[("rootfs", seg)], None).unwrap()
}

fn receipt_state(state: &std::path::Path) -> String {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("flash/last-install.json")).unwrap())
            .unwrap();
    v["state"].as_str().unwrap_or_default().to_string()
}

#[test]
fn an_unchanged_install_with_stale_bytes_in_a_zero_range_is_caught() {
    let (_dir, sock, state, out) = workdir();
    let img = sparse_image();
    let (head, _) = head_of(&img);
    let zero_at = head.manifest.segments[0].offset + 8192 + 100;

    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    send_image(&mut Client::connect(&sock), &img, 4, 4096, None).unwrap();
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert_eq!(std::fs::read(&out).unwrap(), img);

    // Untouched, the identical image is "unchanged".
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    send_image(&mut Client::connect(&sock), &img, 4, 4096, None).unwrap();
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert_eq!(receipt_state(&state), "unchanged");

    // Stale bytes where the manifest says zero: same length, so a length check passes.
    let f = std::fs::OpenOptions::new().write(true).open(&out).unwrap();
    f.write_all_at(b"stale", zero_at).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let cap = Capture::new();
    let srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    let _ = send_image(&mut c, &img, 4, 4096, None);
    // The failed check leaves the server answering.
    c.send(proto::msg::Message::Info);
    c.expect("INFO_REPLY", |m| {
        matches!(m, proto::msg::Message::InfoReply(_))
    });
    std::thread::sleep(Duration::from_millis(200));
    srv.kill();
    assert!(
        !cap.markers().iter().any(|m| m == "flashd: installed"),
        "{:?}",
        cap.markers()
    );
    assert_eq!(receipt_state(&state), "failed");
    let logs = cap.logs().join("\n") + &cap.markers().join("\n");
    assert!(logs.contains("should be zero"), "{logs}");
}
