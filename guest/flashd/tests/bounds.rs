//! Resource bounds from the target (issue #14 item 4): an image larger than the target can
//! hold is refused at HELLO, at once, naming the size and the capacity, and a client that
//! makes no progress is dropped so that another one gets in.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{hello, send_image, workdir, Client};
use flashd::config::{Config, InstallSpec};
use flashd::testkit::{build_image, noise, Capture, RunningServer};
use proto::image::{layout, ImageHead};
use proto::manifest::{DataRange, SegmentDigest};
use proto::msg::{ErrorCode, Message};
use std::time::{Duration, Instant};

const TIB: u64 = 1 << 40;

/// The head of an image with one all-zero segment of `size` bytes (never materialised), and
/// the image's total size.
fn zero_head(size: u64) -> (Vec<u8>, u64) {
    let digest = SegmentDigest {
        size,
        sha256: [0; 32],
        data_sha256: [0; 32],
        chunk_sha256: Vec::new(),
        data_ranges: Vec::<DataRange>::new(),
    };
    let m = layout("1.0.0", &[("rootfs".to_string(), digest)]).unwrap();
    (ImageHead::build(&m, None).unwrap().to_bytes(), m.total_size)
}

fn server(
    tweak: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, RunningServer, std::path::PathBuf) {
    let (dir, sock, state, out) = workdir();
    let mut cfg = Config::new(&state, InstallSpec::Path(out));
    tweak(&mut cfg);
    let srv = RunningServer::start(cfg, &sock, Capture::new()).unwrap();
    (dir, srv, sock)
}

fn info_reply(c: &mut Client, within: Duration) -> bool {
    c.send(Message::Info);
    let t = Instant::now();
    while t.elapsed() < within {
        if let Some(Message::InfoReply(_)) = c.recv(within.saturating_sub(t.elapsed())) {
            return true;
        }
    }
    false
}

#[test]
fn a_1_tib_hello_is_answered_with_a_clear_error_at_once_and_a_second_client_is_served() {
    let (_dir, srv, sock) = server(|_| {});
    let mut c = Client::connect(&sock);
    let t = Instant::now();
    // Just under the format's own 1 TiB bound.
    let (head, total) = zero_head(TIB - (16 << 20));
    c.send(hello(&head, 4, 4096));
    let e = match c.expect("ERROR", |m| matches!(m, Message::Error(_))) {
        Message::Error(e) => e,
        _ => unreachable!(),
    };
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(e.code, ErrorCode::TooLarge, "{}", e.text);
    assert!(e.text.contains(&total.to_string()), "{}", e.text);
    assert!(e.text.contains("free"), "{}", e.text);
    drop(c);
    let mut c2 = Client::connect(&sock);
    assert!(
        info_reply(&mut c2, Duration::from_secs(2)),
        "second client not served"
    );
    // And a real image still goes through.
    let img = build_image("1.0.1", &[("rootfs", noise(3, 20000))], None).unwrap();
    send_image(&mut c2, &img, 4, 4096, None).unwrap();
    srv.kill();
}

#[test]
fn a_client_that_only_sends_info_is_dropped_after_the_stall_timeout_and_a_second_client_is_served()
{
    let stall = Duration::from_secs(2);
    let (_dir, srv, sock) = server(|c| c.stall_timeout = stall);
    let mut c1 = Client::connect(&sock);
    assert!(info_reply(&mut c1, Duration::from_secs(2)));
    let start = Instant::now();
    // The first client keeps asking INFO (well inside the idle timeout) for much longer than
    // the stall timeout.
    let pinger = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if !info_reply(&mut c1, Duration::from_millis(700)) {
                return Some(t.elapsed());
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        None
    });
    let mut c2 = Client::connect(&sock);
    assert!(
        info_reply(&mut c2, stall + Duration::from_secs(2)),
        "second client not served within the stall timeout + 2 s"
    );
    assert!(
        start.elapsed() < stall + Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Dropped: INFO went unanswered, or sending it hit the closed socket (the test client
    // panics on a broken pipe).
    let dropped = pinger.join().map(|d| d.is_some()).unwrap_or(true);
    assert!(dropped, "the first client was never dropped");
    srv.kill();
}
