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

#[test]
fn parts_of_one_write_arriving_slowly_are_progress_but_a_repeated_part_is_not() {
    // A WRITE sent in parts over a slow line (a UART) takes longer than the stall timeout
    // before a whole chunk is written: new parts must count as progress.
    let stall = Duration::from_secs(2);
    let (dir, srv, sock) = server(|c| c.stall_timeout = stall);
    let img = build_image("1.0.2", &[("rootfs", noise(9, 64 * 1024))], None).unwrap();
    let (parsed, head) = common::head_of(&img);
    let m = parsed.manifest;
    let mut c = Client::connect(&sock);
    c.send(hello(&head, 4, 64 * 1024));
    let reply = match c.expect("HELLO_REPLY", |m| matches!(m, Message::HelloReply(_))) {
        Message::HelloReply(r) => r,
        _ => unreachable!(),
    };
    let plan = proto::session::Plan::new(&m, reply.chunk_size).unwrap();
    assert_eq!(plan.total(), 1, "one WRITE");
    let ch = plan.chunk(1).unwrap();
    let data = &img[ch.offset as usize..(ch.offset + u64::from(ch.len)) as usize];
    let write = Message::Write(proto::msg::Write {
        seq: 1,
        segment: m.segments[ch.segment].name.clone(),
        offset: ch.rel_offset,
        len: ch.len,
        body: proto::msg::WriteBody::Raw(bytes::Bytes::copy_from_slice(data)),
    })
    .to_frame()
    .unwrap();
    let payload = write.payload().clone();
    let total = payload.len() as u32;
    let part = |at: u32, len: u32| {
        Message::WritePart(proto::msg::WritePart {
            seq: 1,
            kind: proto::msg::WriteKind::Raw,
            total,
            at,
            data: payload.slice(at as usize..(at + len).min(total) as usize),
        })
    };
    // 8 KiB every 400 ms: the WRITE completes after ~3.2 s, well past the 2 s stall timeout.
    let step = 8 * 1024;
    let mut at = 0;
    while at < total {
        c.send(part(at, step));
        at = (at + step).min(total);
        if at < total {
            match c.expect("PART_ACK", |m| matches!(m, Message::PartAck(_))) {
                Message::PartAck(a) => assert_eq!(a.have, at),
                _ => unreachable!(),
            }
            std::thread::sleep(Duration::from_millis(400));
        }
    }
    match c.expect("ACK", |m| matches!(m, Message::Ack(_))) {
        Message::Ack(a) => assert_eq!(a.ack, 1),
        _ => unreachable!(),
    }
    c.send(Message::Done(proto::msg::Done {
        image_sha256: m.image_sha256,
    }));
    c.expect(
        "DONE_REPLY installed",
        |m| matches!(m, Message::DoneReply(d) if d.status != proto::msg::DoneStatus::Pending),
    );
    assert_eq!(
        std::fs::read(dir.path().join("out.img")).unwrap(),
        img[..m.total_size as usize],
        "installed"
    );

    // A client that repeats one part it already had acknowledged makes no progress: dropped.
    let img2 = build_image("1.0.3", &[("rootfs", noise(10, 64 * 1024))], None).unwrap();
    let (_, head2) = common::head_of(&img2);
    let mut c2 = Client::connect(&sock);
    c2.send(hello(&head2, 4, 64 * 1024));
    c2.expect("HELLO_REPLY", |m| matches!(m, Message::HelloReply(_)));
    let first = part(0, step); // the same part again and again, never more
    let repeater = std::thread::spawn(move || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(8) {
            c2.send(first.clone());
            if c2.recv(Duration::from_millis(300)).is_none()
                && t.elapsed() > stall
                && !info_reply(&mut c2, Duration::from_millis(500))
            {
                return true; // no answer any more: dropped
            }
        }
        false
    });
    // Dropped: unanswered, or sending hit the closed socket (the test client panics on a
    // broken pipe).
    let dropped = repeater.join().unwrap_or(true);
    assert!(dropped, "a repeated part kept the session alive");
    srv.kill();
}
