//! Hostile and broken input: every case is refused with an error naming the cause, nothing is
//! installed and the previous install is untouched.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use bytes::{BufMut, BytesMut};
use common::{head_of, hello, send_image, workdir, Client};
use flashd::config::{Config, InstallSpec};
use flashd::testkit::{build_image, noise, Capture, RunningServer};
use proto::frame::Frame;
use proto::msg::{ErrorCode, Message};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const OLD: &[u8] = b"the previous install\n";

struct Env {
    _dir: tempfile::TempDir,
    out: PathBuf,
    cap: Arc<Capture>,
    srv: Option<RunningServer>,
    sock: PathBuf,
}

impl Env {
    fn new() -> Env {
        Env::with(|_| {})
    }

    fn with(tweak: impl FnOnce(&mut Config)) -> Env {
        let (dir, sock, state, out) = workdir();
        std::fs::write(&out, OLD).unwrap();
        let cap = Capture::new();
        let mut cfg = Config::new(&state, InstallSpec::Path(out.clone()));
        tweak(&mut cfg);
        let srv = RunningServer::start(cfg, &sock, cap.clone()).unwrap();
        Env {
            _dir: dir,
            out,
            cap,
            srv: Some(srv),
            sock,
        }
    }

    fn client(&self) -> Client {
        Client::connect(&self.sock)
    }

    /// The install target still holds the previous install, and no marker claims otherwise.
    fn assert_untouched(&mut self) {
        // Let the server finish whatever it queued.
        std::thread::sleep(Duration::from_millis(50));
        if let Some(s) = self.srv.take() {
            s.kill();
        }
        assert_eq!(
            std::fs::read(&self.out).unwrap(),
            OLD,
            "install target changed"
        );
        let markers = self.cap.markers();
        assert!(
            !markers.iter().any(|m| m == "flashd: installed"),
            "{markers:?}"
        );
    }

    fn assert_error_marker(&self, code: ErrorCode, needle: &str) {
        let prefix = format!("flashd: error {} ", code.code());
        let markers = self.cap.markers();
        assert!(
            markers
                .iter()
                .any(|m| m.starts_with(&prefix) && m.contains(needle)),
            "no `{prefix}…{needle}…` marker in {markers:?}"
        );
    }
}

fn image() -> Vec<u8> {
    build_image(
        "1",
        &[("kernel", noise(1, 20_000)), ("rootfs", noise(2, 50_000))],
        None,
    )
    .unwrap()
}

/// Receive the ERROR the target sends; returns (code, text).
fn expect_error(c: &mut Client) -> (u16, String) {
    match c.expect("ERROR", |m| matches!(m, Message::Error(_))) {
        Message::Error(e) => (e.code.code(), e.text),
        _ => unreachable!(),
    }
}

fn write_frame(seq: u32, segment: &str, offset: u64, data: &[u8]) -> Frame {
    // Built by hand: the message encoder refuses bad names, and so must the target.
    let mut p = BytesMut::new();
    p.put_u8(segment.len() as u8);
    p.put_slice(segment.as_bytes());
    p.put_u64_le(offset);
    p.put_u32_le(data.len() as u32);
    p.put_slice(data);
    Frame::new(0x10, 0, seq, p.freeze()).unwrap()
}

fn start_session(c: &mut Client, img: &[u8]) {
    let (_, head) = head_of(img);
    c.send(hello(&head, 4, 4096));
    c.expect("HELLO_REPLY", |m| matches!(m, Message::HelloReply(_)));
}

#[test]
fn garbage_and_wrong_magic_are_skipped_and_logged() {
    let mut env = Env::new();
    let mut c = env.client();
    c.send_raw(&noise(9, 5000));
    // A frame with a wrong magic is garbage too.
    let mut bad = Message::Info.to_frame().unwrap().to_bytes().to_vec();
    bad[3] = b'X';
    c.send_raw(&bad);
    // The link still works afterwards.
    c.send(Message::Info);
    c.expect("INFO_REPLY", |m| matches!(m, Message::InfoReply(_)));
    let logs = env.cap.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("garbage before the next frame magic")),
        "{logs:?}"
    );
    env.assert_untouched();
}

#[test]
fn image_with_wrong_magic_is_refused() {
    let mut env = Env::new();
    let mut c = env.client();
    let img = image();
    let (_, mut head) = head_of(&img);
    head[0] = b'X';
    c.send(hello(&head, 4, 4096));
    let (code, text) = expect_error(&mut c);
    assert_eq!(code, ErrorCode::BadImage.code());
    assert!(text.contains("not a nexus image"), "{text}");
    env.assert_error_marker(ErrorCode::BadImage, "not a nexus image");
    env.assert_untouched();
}

#[test]
fn hostile_length_never_allocates_and_is_reported() {
    let mut env = Env::new();
    let mut c = env.client();
    let mut f = Message::Info.to_frame().unwrap().to_bytes().to_vec();
    f[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    c.send_raw(&f);
    // A hostile length inside a message: HELLO claiming a 4 GiB head.
    let mut p = BytesMut::new();
    p.put_u8(1);
    p.put_u64_le(1);
    p.put_u16_le(4);
    p.put_u32_le(4096);
    p.put_u8(0);
    p.put_u8(0);
    p.put_u8(4);
    p.put_slice(b"host");
    p.put_u32_le(u32::MAX);
    c.send_frame(&Frame::new(0x01, 0, 0, p.freeze()).unwrap());
    let (code, text) = expect_error(&mut c);
    assert_eq!(code, ErrorCode::Protocol.code());
    assert!(text.contains("head_len"), "{text}");
    let logs = env.cap.logs();
    assert!(
        logs.iter().any(|l| l.contains("exceeds the maximum")),
        "{logs:?}"
    );
    env.assert_untouched();
}

#[test]
fn unknown_segment_is_refused() {
    let mut env = Env::new();
    let mut c = env.client();
    let img = image();
    start_session(&mut c, &img);
    c.send_frame(&write_frame(1, "nosuch", 0, &[1u8; 4096]));
    let (code, text) = expect_error(&mut c);
    assert_eq!(code, ErrorCode::BadWrite.code());
    assert!(text.contains("unknown segment"), "{text}");
    env.assert_error_marker(ErrorCode::BadWrite, "unknown segment");
    env.assert_untouched();
}

#[test]
fn names_with_slash_or_dotdot_are_refused() {
    for name in ["../etc", "a/b", "..", "/"] {
        let mut env = Env::new();
        let mut c = env.client();
        let img = image();
        start_session(&mut c, &img);
        c.send_frame(&write_frame(1, name, 0, &[1u8; 4096]));
        let (code, text) = expect_error(&mut c);
        assert_eq!(code, ErrorCode::BadWrite.code(), "{name}: {text}");
        assert!(text.contains("segment"), "{name}: {text}");
        env.assert_untouched();
        // Nothing was created outside the state dir.
        assert!(!env.out.with_file_name("etc").exists());
    }
}

#[test]
fn write_past_the_segment_end_is_refused() {
    let mut env = Env::new();
    let mut c = env.client();
    let img = image();
    start_session(&mut c, &img);
    c.send_frame(&write_frame(1, "kernel", 20_000 - 10, &[1u8; 4096]));
    let (code, text) = expect_error(&mut c);
    assert_eq!(code, ErrorCode::BadWrite.code());
    assert!(text.contains("past the end of segment kernel"), "{text}");
    env.assert_untouched();
}

#[test]
fn data_that_does_not_match_the_manifest_fails_verification_naming_the_segment() {
    let mut env = Env::new();
    let mut c = env.client();
    let mut img = image();
    let (parsed, _) = head_of(&img);
    let rootfs = parsed.manifest.segment("rootfs").unwrap().clone();
    img[(rootfs.offset + 100) as usize] ^= 0x40;
    let err = send_image(&mut c, &img, 4, 4096, None).unwrap_err();
    assert_eq!(err.0, ErrorCode::VerifyFailed.code(), "{err:?}");
    assert!(err.1.contains("seg=rootfs"), "{err:?}");
    assert!(env
        .cap
        .markers()
        .contains(&"flashd: verify failed seg=rootfs".to_string()));
    env.assert_untouched();
}

#[test]
fn truncated_head_and_early_done_are_refused() {
    let mut env = Env::new();
    let mut c = env.client();
    let img = image();
    let (_, head) = head_of(&img);
    c.send(hello(&head[..head.len() - 100], 4, 4096));
    let (code, text) = expect_error(&mut c);
    assert_eq!(code, ErrorCode::BadImage.code(), "{text}");
    // A truncated transfer: DONE before the last chunk.
    start_session(&mut c, &img);
    let (parsed, _) = head_of(&img);
    c.send(Message::Done(proto::msg::Done {
        image_sha256: parsed.manifest.image_sha256,
    }));
    let (code, text) = expect_error(&mut c);
    assert_eq!(code, ErrorCode::Incomplete.code(), "{text}");
    assert!(text.contains("DONE before complete"), "{text}");
    env.assert_untouched();
}

fn key_file(dir: &std::path::Path, seed: [u8; 32]) -> PathBuf {
    let p = dir.join("key.pub");
    std::fs::write(
        &p,
        proto::image::encode_public_key(&proto::image::public_key_of(&seed)),
    )
    .unwrap();
    p
}

#[test]
fn unsigned_or_foreign_signed_images_are_refused_when_a_key_is_required() {
    let keydir = tempfile::tempdir().unwrap();
    let ours = [7u8; 32];
    let pubkey = flashd::config::load_public_key(&key_file(keydir.path(), ours)).unwrap();
    let mut env = Env::with(|c| c.require_signed = Some(pubkey));
    let segs = [("kernel", noise(1, 9000))];

    let unsigned = build_image("1", &segs, None).unwrap();
    let mut c = env.client();
    let err = send_image(&mut c, &unsigned, 4, 4096, None).unwrap_err();
    assert_eq!(err.0, ErrorCode::Signature.code(), "{err:?}");
    assert!(err.1.contains("not signed"), "{err:?}");

    let foreign = build_image("1", &segs, Some([9u8; 32])).unwrap();
    let err = send_image(&mut c, &foreign, 4, 4096, None).unwrap_err();
    assert_eq!(err.0, ErrorCode::Signature.code(), "{err:?}");
    assert!(err.1.contains("does not verify"), "{err:?}");
    env.assert_error_marker(ErrorCode::Signature, "signature");
    env.assert_untouched();

    // The right key works.
    let mut env = Env::with(|c| c.require_signed = Some(pubkey));
    let signed = build_image("1", &segs, Some(ours)).unwrap();
    let mut c = env.client();
    send_image(&mut c, &signed, 4, 4096, None).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    if let Some(s) = env.srv.take() {
        s.kill();
    }
    assert_eq!(std::fs::read(&env.out).unwrap(), signed);
}

#[test]
fn without_a_state_dir_it_is_an_explicit_stub_and_installs_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.img");
    std::fs::write(&out, OLD).unwrap();
    let sock = dir.path().join("s.sock");
    let cap = Capture::new();
    let cfg = Config::new(
        dir.path().join("no-such-state"),
        InstallSpec::Path(out.clone()),
    );
    let srv = RunningServer::start(cfg, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    let img = image();
    let err = send_image(&mut c, &img, 4, 4096, None).unwrap_err();
    assert_eq!(err.0, ErrorCode::NoState.code());
    assert!(err.1.contains("stub/placeholder"), "{}", err.1);
    srv.kill();
    let markers = cap.markers();
    assert!(
        markers[0].starts_with("flashd: stub/placeholder no usable state dir ("),
        "{markers:?}"
    );
    assert!(markers[0].ends_with("): refusing to flash"), "{markers:?}");
    assert!(!markers
        .iter()
        .any(|m| m == "flashd: installed" || m == "flashd: ready"));
    assert_eq!(std::fs::read(&out).unwrap(), OLD);
}

#[test]
fn a_state_dir_that_is_not_a_mount_is_refused_when_a_mount_is_required() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let mut cfg = Config::new(&state, InstallSpec::Path(dir.path().join("o")));
    cfg.require_mountpoint = true;
    let s = flashd::server::Server::new(cfg, Capture::new()).unwrap();
    assert!(s
        .stub_reason()
        .unwrap()
        .contains("not a mounted filesystem"));
}

#[test]
fn a_missing_install_partition_is_refused_at_hello() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let sys = dir.path().join("sys");
    std::fs::create_dir(&sys).unwrap();
    let sock = dir.path().join("s.sock");
    let cap = Capture::new();
    let cfg = Config::new(
        &state,
        InstallSpec::Partition {
            name: "system_b".into(),
            sys_dir: sys,
            dev_dir: dir.path().to_path_buf(),
        },
    );
    let srv = RunningServer::start(cfg, &sock, cap.clone()).unwrap();
    let mut c = Client::connect(&sock);
    let err = send_image(&mut c, &image(), 4, 4096, None).unwrap_err();
    assert_eq!(err.0, ErrorCode::InstallFailed.code());
    assert!(err.1.contains("system_b not found"), "{}", err.1);
    srv.kill();
}
