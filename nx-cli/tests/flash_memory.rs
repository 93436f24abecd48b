//! nx's memory bound under a slow receiver, counted: nx's real sender loop and flashd's real
//! server over a unix socket whose host→target side accepts at most 2 KiB per write and
//! returns `Pending` every other poll (a link far slower than reading the image). Whatever
//! the link's speed, the session loop holds at most window + read-ahead chunks and at most
//! `WRITER_QUEUE + 2` frames wait for the writer. Nothing here is timed and no RSS is read:
//! the report's counters are checked against the structural bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod flash_support;

use flash_support::{sha256_hex, test_image};
use flashd::testkit::{Capture, RunningServer};
use nx_cli::flash::render::{OutputMode, Renderer};
use nx_engine::image_file::ImageFile;
use nx_engine::send::{send_image, Connecting, Connector, SendOptions, WRITER_QUEUE};
use nx_engine::transport::Link;
use proto::session::{CompressMode, SenderConfig};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// Most bytes one write to the slow link takes.
const SLOW_WRITE: usize = 2048;
/// Room per frame for the frame header/trailer and the WRITE header.
const FRAME_SLACK: u64 = 4096;

/// A unix stream whose write side is slow: every other `poll_write` is `Pending` (woken at
/// once), the others take at most [`SLOW_WRITE`] bytes.
struct SlowLink {
    inner: UnixStream,
    stall: bool,
}

impl AsyncRead for SlowLink {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for SlowLink {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.stall {
            self.stall = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.stall = true;
        let n = buf.len().min(SLOW_WRITE);
        Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct SlowConnector(PathBuf);

impl Connector for SlowConnector {
    fn connect(&mut self) -> Connecting<'_> {
        Box::pin(async move {
            let inner = UnixStream::connect(&self.0).await?;
            Ok(Box::new(SlowLink {
                inner,
                stall: false,
            }) as Box<dyn Link>)
        })
    }
    fn describe(&self) -> String {
        format!("slow:{}", self.0.display())
    }
}

async fn slow_send_stays_bounded(chunk: u32, window: u16, compress: CompressMode) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let img = test_image(7, 8);
    let img_path = dir.path().join("os.img");
    std::fs::write(&img_path, &img).unwrap();
    let out = dir.path().join("out.img");
    let sock = dir.path().join("flashd.sock");
    let cap = Capture::new();
    let _srv = RunningServer::start_simple(&state, &out, &sock, cap.clone()).unwrap();

    let mut o = SendOptions::new("slow-host");
    o.chunk_size = chunk;
    o.window = window;
    o.compress = compress;
    let image = Arc::new(ImageFile::open(&img_path).unwrap());
    let mut r = Renderer::new(OutputMode::Quiet);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mut conn = SlowConnector(sock.clone());
    // A safety net against a hang, not a measurement.
    let rep = tokio::time::timeout(
        Duration::from_secs(120),
        send_image(image, &mut conn, &o, &mut r, rx),
    )
    .await
    .expect("the transfer did not finish in time")
    .expect("the transfer failed");
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(5)));
    let got = std::fs::read(&out).unwrap();
    assert_eq!(sha256_hex(&got), sha256_hex(&img), "installed bytes differ");

    let read_ahead = usize::from(SenderConfig::new("x").read_ahead);
    let p = rep.peaks;
    assert!(p.chunks >= 1, "no chunk was counted: {p:?}");
    assert!(
        p.chunks <= usize::from(window) + read_ahead,
        "the session loop held {} chunks, more than window {window} + read-ahead {read_ahead}",
        p.chunks
    );
    let frame_max = u64::from(chunk) + FRAME_SLACK;
    let writer_max = (WRITER_QUEUE as u64 + 2) * frame_max;
    assert!(
        p.writer_bytes >= u64::from(chunk),
        "no frame was queued: {p:?}"
    );
    assert!(
        p.writer_bytes <= writer_max,
        "{} bytes waited for the writer, more than {} frames of ≤ {frame_max} bytes",
        p.writer_bytes,
        WRITER_QUEUE + 2
    );
    // The window is wider than the writer queue: without the bounded queue, a whole window
    // of frames would wait for the slow link.
    assert!(u64::from(window) * u64::from(chunk) > writer_max);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_link_raw_frames_wait_in_a_bounded_queue() {
    slow_send_stays_bounded(16 * 1024, 48, CompressMode::None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_link_compressed_chunks_stay_within_window_and_read_ahead() {
    slow_send_stays_bounded(8 * 1024, 32, CompressMode::Zstd).await;
}
