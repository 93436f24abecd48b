//! Proof under faults: nx's real sender loop and flashd's real server over unix sockets, with a
//! proxy in between that drops every 5th frame, flips random bits, cuts the connection at 100
//! random points; and flashd killed and restarted mid-segment. Every run completes and the
//! installed bytes equal the image's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod flash_support;
#[path = "flash_support/proxy.rs"]
mod proxy;

use flash_support::{sha256_hex, test_image};
use flashd::testkit::{Capture, RunningServer};
use nx_cli::flash::render::{OutputMode, Renderer};
use nx_engine::image_file::ImageFile;
use nx_engine::send::{send_image, SendOptions, SendReport};
use nx_engine::transport::PortSpec;
use proto::session::CompressMode;
use proxy::{start_proxy, Faults};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

struct Rig {
    dir: tempfile::TempDir,
    state: PathBuf,
    out: PathBuf,
    img_path: PathBuf,
    img: Vec<u8>,
}

impl Rig {
    fn new(seed: u64, scale: usize) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let img = test_image(seed, scale);
        let img_path = dir.path().join("os.img");
        std::fs::write(&img_path, &img).unwrap();
        Rig {
            out: dir.path().join("out.img"),
            dir,
            state,
            img_path,
            img,
        }
    }
    fn sock(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn flashd(&self, cap: Arc<Capture>) -> RunningServer {
        RunningServer::start_simple(&self.state, &self.out, &self.sock("flashd.sock"), cap).unwrap()
    }
    fn assert_installed(&self) {
        let got = std::fs::read(&self.out).unwrap();
        assert_eq!(got.len(), self.img.len());
        assert_eq!(
            sha256_hex(&got),
            sha256_hex(&self.img),
            "installed bytes differ"
        );
    }
}

fn opts(chunk: u32, window: u16) -> SendOptions {
    let mut o = SendOptions::new("faulty-host");
    o.chunk_size = chunk;
    o.window = window;
    o.rto = Duration::from_millis(60);
    o.max_timeouts = 8;
    o.attempts = 1000;
    o.backoff = Duration::from_millis(1);
    o
}

async fn send(path: &Path, port: &Path, o: &SendOptions) -> SendReport {
    let img = Arc::new(ImageFile::open(path).unwrap());
    let mut r = Renderer::new(OutputMode::Quiet);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mut spec = PortSpec::Unix(port.to_path_buf());
    tokio::time::timeout(
        Duration::from_secs(120),
        send_image(img, &mut spec, o, &mut r, rx),
    )
    .await
    .expect("the transfer did not finish in time")
    .expect("the transfer failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_every_fifth_frame_both_ways() {
    let rig = Rig::new(11, 1);
    let cap = Capture::new();
    let _srv = rig.flashd(cap.clone());
    let p = start_proxy(
        &rig.sock("proxy.sock"),
        &rig.sock("flashd.sock"),
        Faults {
            drop_every: Some(5),
            ..Faults::default()
        },
    )
    .await;
    let rep = send(&rig.img_path, &p.path, &opts(8192, 8)).await;
    assert!(p.stats.dropped.load(Ordering::Relaxed) > 20);
    assert_eq!(rep.receipt.state, "installed");
    assert!(rep.outcome.stats.retransmitted_frames > 0);
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(5)));
    rig.assert_installed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bit_flips_both_ways() {
    let rig = Rig::new(12, 1);
    let cap = Capture::new();
    let _srv = rig.flashd(cap.clone());
    let p = start_proxy(
        &rig.sock("proxy.sock"),
        &rig.sock("flashd.sock"),
        Faults {
            flip_one_in: Some(8),
            seed: 12,
            ..Faults::default()
        },
    )
    .await;
    let rep = send(&rig.img_path, &p.path, &opts(8192, 8)).await;
    assert!(p.stats.flipped.load(Ordering::Relaxed) > 5);
    assert_eq!(rep.receipt.state, "installed");
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(5)));
    rig.assert_installed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_the_connection_at_100_random_points() {
    let rig = Rig::new(13, 1);
    let cap = Capture::new();
    let _srv = rig.flashd(cap.clone());
    let p = start_proxy(
        &rig.sock("proxy.sock"),
        &rig.sock("flashd.sock"),
        Faults {
            cuts: 100,
            cut_max: 24 * 1024,
            seed: 13,
            ..Faults::default()
        },
    )
    .await;
    let rep = send(&rig.img_path, &p.path, &opts(4096, 4)).await;
    assert_eq!(p.stats.cuts.load(Ordering::Relaxed), 100);
    assert!(rep.receipt.tries > 100, "tries {}", rep.receipt.tries);
    assert_eq!(rep.receipt.state, "installed");
    assert!(
        rep.receipt.resume_count > 50,
        "resumes {}",
        rep.receipt.resume_count
    );
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(5)));
    rig.assert_installed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flashd_killed_and_restarted_mid_segment() {
    let rig = Rig::new(14, 2);
    let first = Capture::new();
    let srv = rig.flashd(first.clone());
    // Stall the first server right when the kernel segment is complete: then kill it.
    let (stalled_tx, stalled_rx) = std::sync::mpsc::channel::<()>();
    let stalled_tx = std::sync::Mutex::new(stalled_tx);
    first.set_hook(move |m| {
        if m.starts_with("flashd: wrote seg=kernel") {
            let _ = stalled_tx.lock().unwrap().send(());
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    let img_path = rig.img_path.clone();
    let sock = rig.sock("flashd.sock");
    let sender = tokio::spawn(async move { send(&img_path, &sock, &opts(4096, 4)).await });
    tokio::task::spawn_blocking(move || stalled_rx.recv_timeout(Duration::from_secs(30)).unwrap())
        .await
        .unwrap();
    // Kill (drop) it mid-transfer and start a new one on the same state dir, twice.
    tokio::task::spawn_blocking(move || srv.kill())
        .await
        .unwrap();
    let second = Capture::new();
    let srv2 = rig.flashd(second.clone());
    let (tx2, rx2) = std::sync::mpsc::channel::<()>();
    let tx2 = std::sync::Mutex::new(tx2);
    second.set_hook(move |m| {
        if m.starts_with("flashd: hello") {
            // Stall before the HELLO_REPLY goes out: killed right after a reconnect.
            let _ = tx2.lock().unwrap().send(());
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    tokio::task::spawn_blocking(move || rx2.recv_timeout(Duration::from_secs(30)).unwrap())
        .await
        .unwrap();
    tokio::task::spawn_blocking(move || srv2.kill())
        .await
        .unwrap();
    assert!(!second.markers().iter().any(|m| m == "flashd: installed"));
    let third = Capture::new();
    let _srv3 = rig.flashd(third.clone());
    let rep = sender.await.unwrap();
    assert!(
        rep.resumed_at.is_some_and(|a| a > 0),
        "{:?}",
        rep.resumed_at
    );
    assert!(rep.receipt.tries >= 3);
    assert!(third.wait_for("flashd: installed", Duration::from_secs(10)));
    rig.assert_installed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_faults_at_once_with_compression() {
    let rig = Rig::new(15, 1);
    let cap = Capture::new();
    let _srv = rig.flashd(cap.clone());
    let p = start_proxy(
        &rig.sock("proxy.sock"),
        &rig.sock("flashd.sock"),
        Faults {
            drop_every: Some(5),
            flip_one_in: Some(10),
            cuts: 20,
            cut_max: 64 * 1024,
            seed: 15,
        },
    )
    .await;
    let mut o = opts(16384, 8);
    o.compress = CompressMode::Zstd;
    let rep = send(&rig.img_path, &p.path, &o).await;
    assert!(rep.receipt.tries > 20);
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(5)));
    rig.assert_installed();
}
