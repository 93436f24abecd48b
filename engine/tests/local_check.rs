//! `nx flash send` never reports success for a local file whose bytes do not match its own
//! manifest, even when the target already holds the image the manifest names and asks for no
//! byte of it (issue #14 item 5): the local check runs from the session's start and the DONE
//! waits for it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use futures::StreamExt;
use nx_engine::image_file::ImageFile;
use nx_engine::send::{send_image, SendError, SendOptions};
use nx_engine::transport::PortSpec;
use proto::frame::codec::{FrameCodec, Incoming};
use proto::image::{layout, ImageHead};
use proto::manifest::{Manifest, SegmentHasher};
use proto::session::{InstalledImage, Receiver, ReceiverAction, ReceiverConfig, ReceiverEvent};
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

/// A valid image file at `path` (one 10 000-byte segment); its manifest.
fn write_image(path: &Path) -> Manifest {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
    let mut h = SegmentHasher::new();
    h.update(&data);
    let m = layout("1.0", &[("rootfs".to_string(), h.finish())]).unwrap();
    let mut out = ImageHead::build(&m, None).unwrap().to_bytes();
    let seg = &m.segments[0];
    out.resize(seg.offset as usize, 0);
    out.extend_from_slice(&data);
    out.resize(seg.padded_end() as usize, 0);
    std::fs::write(path, out).unwrap();
    m
}

/// A target (the sans-IO receiver over a unix socket) that has `m` installed already: it
/// answers HELLO with "already installed" and DONE with "unchanged". Returns how many DONEs
/// it answered.
async fn already_installed_target(
    listener: tokio::net::UnixListener,
    m: Manifest,
) -> std::io::Result<usize> {
    let installed = InstalledImage {
        image_id: m.id(),
        image_sha256: m.image_sha256,
        total_size: m.total_size,
        version: m.version.clone(),
        index: None,
    };
    let mut rx = Receiver::new(ReceiverConfig::new("fake"), None, Some(installed));
    let (s, _) = listener.accept().await?;
    let (rd, mut wr) = tokio::io::split(s);
    let mut frames = FramedRead::new(rd, FrameCodec::new());
    let mut installs = 0usize;
    while let Some(Ok(Incoming::Frame(f))) = frames.next().await {
        rx.handle(ReceiverEvent::Frame(f));
        while let Some(a) = rx.poll_action() {
            match a {
                ReceiverAction::Send(f) => wr.write_all(&f.to_bytes()).await?,
                ReceiverAction::Install { unchanged, .. } => {
                    assert!(unchanged, "the fake target only knows the installed image");
                    installs += 1;
                    rx.handle(ReceiverEvent::Installed {
                        ok: true,
                        detail: "unchanged".into(),
                    });
                }
                _ => {}
            }
        }
    }
    Ok(installs)
}

async fn send_to_installed_target(corrupt: bool) -> (Result<String, SendError>, usize) {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("os.img");
    let m = write_image(&img_path);
    if corrupt {
        // One data byte flipped; the head (manifest) is intact.
        let mut b = std::fs::read(&img_path).unwrap();
        let at = m.segments[0].offset as usize + 5000;
        b[at] ^= 0xff;
        std::fs::write(&img_path, b).unwrap();
    }
    let sock = dir.path().join("flash.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let target = tokio::spawn(already_installed_target(listener, m));
    let img = Arc::new(ImageFile::open(&img_path).unwrap());
    let mut opts = SendOptions::new("test-host");
    opts.attempts = 1;
    let mut port: PortSpec = format!("unix:{}", sock.display()).parse().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let res = send_image(img, &mut port, &opts, &mut |_: &_| {}, rx)
        .await
        .map(|r| format!("{:?}", r.outcome.status));
    let installs = tokio::time::timeout(std::time::Duration::from_secs(5), target)
        .await
        .expect("the fake target did not finish")
        .unwrap()
        .unwrap();
    (res, installs)
}

#[tokio::test]
async fn an_intact_file_the_target_already_holds_is_reported_unchanged() {
    let (res, installs) = send_to_installed_target(false).await;
    assert_eq!(res.unwrap(), "Unchanged");
    assert_eq!(installs, 1);
}

#[tokio::test]
async fn a_corrupted_file_is_refused_even_when_the_target_already_holds_its_manifest() {
    let (res, installs) = send_to_installed_target(true).await;
    let err = res.unwrap_err();
    assert!(matches!(err, SendError::ImageInvalid(_)), "{err}");
    let text = err.to_string();
    assert!(text.contains("os.img") && text.contains("rootfs"), "{text}");
    // The DONE was never sent: the target confirmed nothing.
    assert_eq!(installs, 0);
}
