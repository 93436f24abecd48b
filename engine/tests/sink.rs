//! The engine reports to whatever sink it is given: a closure recording events sees the
//! connection attempts, the reconnect and the end of a transfer, in order; a fan-out gives
//! every target its own sink and its outcome.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nx_engine::fanout::{send_all, Target};
use nx_engine::image_file::ImageFile;
use nx_engine::send::{send_image, SendError, SendOptions};
use nx_engine::transport::PortSpec;
use nx_engine::EngineEvent;
use proto::image::{layout, ImageHead};
use proto::manifest::SegmentHasher;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A small valid image file at `path`.
fn write_image(path: &Path) {
    let data = vec![7u8; 10_000];
    let mut h = SegmentHasher::new();
    h.update(&data);
    let m = layout("1.0", &[("kernel".to_string(), h.finish())]).unwrap();
    let mut out = ImageHead::build(&m, None).unwrap().to_bytes();
    let seg = &m.segments[0];
    out.resize(seg.offset as usize, 0);
    out.extend_from_slice(&data);
    out.resize(seg.padded_end() as usize, 0);
    std::fs::write(path, out).unwrap();
}

/// The events that are not session events (those depend on what the target says).
fn link_events(evs: &[EngineEvent]) -> Vec<EngineEvent> {
    evs.iter()
        .filter(|e| !matches!(e, EngineEvent::Session(_)))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_closure_sink_sees_connects_reconnects_and_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("os.img");
    write_image(&img_path);
    // A "target" that accepts and hangs up at once: every session ends, nothing progresses.
    let sock = dir.path().join("flash.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            drop(s);
        }
    });
    let img = Arc::new(ImageFile::open(&img_path).unwrap());
    let mut opts = SendOptions::new("test-host");
    opts.attempts = 2;
    opts.backoff = Duration::from_millis(1);
    let mut port: PortSpec = format!("unix:{}", sock.display()).parse().unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let mut sink = move |ev: &EngineEvent| seen.lock().unwrap().push(ev.clone());
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let err = send_image(img, &mut port, &opts, &mut sink, rx)
        .await
        .unwrap_err();
    server.abort();
    assert!(matches!(err, SendError::LinkLost(_)), "{err}");
    let port = port.to_string();
    let evs = link_events(&events.lock().unwrap());
    assert_eq!(evs.len(), 4, "{evs:?}");
    assert_eq!(
        evs[0],
        EngineEvent::Connecting {
            port: port.clone(),
            attempt: 1
        }
    );
    assert!(
        matches!(
            &evs[1],
            EngineEvent::Reconnect {
                attempt: 1,
                max: 2,
                ..
            }
        ),
        "{evs:?}"
    );
    assert_eq!(evs[2], EngineEvent::Connecting { port, attempt: 2 });
    assert_eq!(evs[3], EngineEvent::Finished);
}

#[tokio::test]
async fn a_fan_out_reports_each_target_to_its_own_sink() {
    let dir = tempfile::tempdir().unwrap();
    let img_path = dir.path().join("os.img");
    write_image(&img_path);
    let img = Arc::new(ImageFile::open(&img_path).unwrap());
    let ports: Vec<PortSpec> = ["a", "b"]
        .iter()
        .map(|n| {
            format!("unix:{}", dir.path().join(n).display())
                .parse()
                .unwrap()
        })
        .collect();
    let targets = ports
        .iter()
        .map(|p| Target {
            port: p.clone(),
            sink: Vec::<EngineEvent>::new(),
        })
        .collect();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let out = send_all(
        img,
        targets,
        &SendOptions::new("test-host"),
        rx,
        |_sink, port, res| {
            (
                port.to_string(),
                res.map(|_| ()).map_err(|f| f.error.to_string()),
            )
        },
    )
    .await;
    assert_eq!(out.len(), 2);
    for (r, p) in out.into_iter().zip(&ports) {
        let (sink, (port, res)) = r.unwrap();
        assert_eq!(port, p.to_string());
        let err = res.unwrap_err();
        assert!(
            err.contains(&port) && err.contains("just recovery"),
            "{err}"
        );
        // Unreachable at the first attempt: one connecting event, nothing else.
        assert_eq!(sink, vec![EngineEvent::Connecting { port, attempt: 1 }]);
    }
}
