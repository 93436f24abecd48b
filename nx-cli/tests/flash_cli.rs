//! Acceptance-shaped tests with the real `nx` binary against flashd serving a real unix
//! socket (the flashd library server, in-process, with its markers captured).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod flash_support;

use flash_support::{sha256_hex, test_image};
use flashd::testkit::{Capture, RunningServer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const NX: &str = env!("CARGO_BIN_EXE_nx");

struct Rig {
    dir: tempfile::TempDir,
    state: PathBuf,
    out: PathBuf,
    img_path: PathBuf,
    img: Vec<u8>,
    sock: PathBuf,
}

impl Rig {
    fn new(seed: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let img = test_image(seed, 2);
        let img_path = dir.path().join("os.img");
        std::fs::write(&img_path, &img).unwrap();
        Rig {
            out: dir.path().join("out.img"),
            sock: dir.path().join("flash.sock"),
            dir,
            state,
            img_path,
            img,
        }
    }

    fn flashd(&self, cap: Arc<Capture>) -> RunningServer {
        RunningServer::start_simple(&self.state, &self.out, &self.sock, cap).unwrap()
    }

    fn port(&self) -> String {
        format!("unix:{}", self.sock.display())
    }

    fn nx_send(&self, img: &Path, extra: &[&str]) -> Output {
        Command::new(NX)
            .args(["flash", "send"])
            .arg(img)
            .args(["--port", &self.port()])
            .args(extra)
            .output()
            .unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A hook that stalls the server on the first marker starting with `prefix` until released.
fn stall_on(cap: &Capture, prefix: &'static str) -> (mpsc::Receiver<()>, mpsc::Sender<()>) {
    let (hit_tx, hit_rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let hit_tx = Mutex::new(Some(hit_tx));
    let go_rx = Mutex::new(go_rx);
    cap.set_hook(move |m| {
        if m.starts_with(prefix) {
            if let Some(tx) = hit_tx.lock().unwrap().take() {
                let _ = tx.send(());
                let _ = go_rx.lock().unwrap().recv_timeout(Duration::from_secs(20));
            }
        }
    });
    (hit_rx, go_tx)
}

#[test]
fn send_installs_the_exact_bytes_with_all_markers_in_order() {
    let rig = Rig::new(21);
    let cap = Capture::new();
    let srv = rig.flashd(cap.clone());
    let receipt_path = rig.dir.path().join("receipt.json");
    let out = rig.nx_send(
        &rig.img_path,
        &["--receipt", receipt_path.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert_eq!(
        sha256_hex(&std::fs::read(&rig.out).unwrap()),
        sha256_hex(&rig.img)
    );

    // ...and nx warns about it.
    assert!(
        text(&out.stderr).contains("has no trust key provisioned (stub/placeholder)"),
        "{}",
        text(&out.stderr)
    );
    let m = cap.markers();
    // A temporary state dir trusts no key: flashd says so first.
    assert_eq!(
        m[0],
        "flashd: stub/placeholder: no trust key — accepting unsigned images"
    );
    let m = &m[1..];
    assert_eq!(m[0], "flashd: ready");
    assert!(
        m[1].starts_with("flashd: hello host=") && m[1].ends_with(" proto=1"),
        "{m:?}"
    );
    assert_eq!(
        &m[2..],
        &[
            "flashd: wrote seg=kernel bytes=400000",
            "flashd: wrote seg=rootfs bytes=1100000",
            "flashd: wrote seg=extra bytes=10000",
            "flashd: verify ok",
            "flashd: installed",
        ]
    );
    // The last stdout line is the install receipt; --receipt wrote the same record.
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().unwrap();
    let receipt: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(receipt["state"], "installed");
    assert_eq!(receipt["image_version"], "2.0");
    assert_eq!(receipt["segments"][1]["zero_bytes"], 598_016); // whole 4 KiB blocks
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&receipt_path).unwrap()).unwrap();
    assert_eq!(file, receipt);
    // flashd keeps the same record.
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(rig.state.join("flash/last-install.json")).unwrap())
            .unwrap();
    assert_eq!(kept["writer"], "flashd");
    assert_eq!(kept["image_id"], receipt["image_id"]);
    assert_eq!(kept["segments"], receipt["segments"]);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("nx: skipped 584.0 KiB of zeros"),
        "{stderr}"
    );
    assert!(stderr.contains("MB/s effective"), "{stderr}");
}

#[test]
fn nx_killed_mid_transfer_then_rerun_resumes_and_finishes() {
    let rig = Rig::new(22);
    let cap = Capture::new();
    let srv = rig.flashd(cap.clone());
    let (hit, go) = stall_on(&cap, "flashd: wrote seg=kernel");
    let mut child = Command::new(NX)
        .args(["flash", "send"])
        .arg(&rig.img_path)
        .args(["--port", &rig.port(), "--chunk", "16K", "--window", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    hit.recv_timeout(Duration::from_secs(30)).unwrap();
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    go.send(()).unwrap();
    cap.clear_hook();
    assert!(!rig.out.exists(), "installed before the transfer finished");

    let out = rig.nx_send(&rig.img_path, &["--chunk", "16K", "--window", "4"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let at: u64 = stderr
        .lines()
        .find_map(|l| l.strip_prefix("nx: resumed at "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no resume point in {stderr}"))
        .parse()
        .unwrap();
    assert!(at > 0);
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    srv.kill();
    assert_eq!(std::fs::read(&rig.out).unwrap(), rig.img);
}

#[test]
fn a_flipped_byte_is_refused_naming_the_segment_and_nothing_is_installed() {
    let rig = Rig::new(23);
    let cap = Capture::new();
    let srv = rig.flashd(cap.clone());
    let (head, _) = proto::image::Header::parse(&rig.img[..4096])
        .map(|h| (h, ()))
        .unwrap();
    let parsed = proto::image::ImageHead::parse(&rig.img[..head.data_offset as usize]).unwrap();
    let rootfs = parsed.manifest.segment("rootfs").unwrap().clone();
    // One byte in a data range, one in a zero run: both are caught.
    for (i, rel) in [50_000u64, 600_000].into_iter().enumerate() {
        let mut bad = rig.img.clone();
        bad[(rootfs.offset + rel) as usize] ^= 0x01;
        let p = rig.dir.path().join(format!("bad{i}.img"));
        std::fs::write(&p, &bad).unwrap();
        let out = rig.nx_send(&p, &[]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(3), "{stderr}");
        assert!(stderr.contains("segment \"rootfs\""), "{stderr}");
        assert!(!rig.out.exists(), "{stderr}");
    }
    srv.kill();
    assert!(!cap.markers().iter().any(|m| m == "flashd: installed"));
}

#[test]
fn json_mode_prints_ndjson_events_ending_with_the_receipt() {
    let rig = Rig::new(24);
    let cap = Capture::new();
    let srv = rig.flashd(cap.clone());
    let out = rig.nx_send(&rig.img_path, &["--json", "--chunk", "16K"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    srv.kill();
    let stdout = text(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    for k in [
        "connecting",
        "start",
        "progress",
        "segment_verified",
        "done",
        "receipt",
    ] {
        assert!(kinds.contains(&k), "no {k} in {kinds:?}");
    }
    assert_eq!(*kinds.last().unwrap(), "receipt");
    assert_eq!(events.last().unwrap()["state"], "installed");
}

#[test]
fn ctrl_c_leaves_the_transfer_resumable_and_says_how_to_continue() {
    let rig = Rig::new(25);
    let cap = Capture::new();
    let srv = rig.flashd(cap.clone());
    let (hit, go) = stall_on(&cap, "flashd: wrote seg=kernel");
    let child = Command::new(NX)
        .args(["flash", "send"])
        .arg(&rig.img_path)
        .args(["--port", &rig.port(), "--chunk", "16K"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    hit.recv_timeout(Duration::from_secs(30)).unwrap();
    let st = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let out = child.wait_with_output().unwrap();
    go.send(()).unwrap();
    cap.clear_hook();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("continue with the same command"),
        "{stderr}"
    );
    assert!(stderr.contains("nx flash send"), "{stderr}");
    let again = rig.nx_send(&rig.img_path, &["--chunk", "16K"]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(text(&again.stderr).contains("nx: resumed at "));
    srv.kill();
    assert_eq!(std::fs::read(&rig.out).unwrap(), rig.img);
}

#[test]
fn identical_reflash_is_a_no_op_and_info_and_verify_agree() {
    let rig = Rig::new(26);
    let cap = Capture::new();
    let srv = rig.flashd(cap.clone());
    assert!(rig.nx_send(&rig.img_path, &["--quiet"]).status.success());
    assert!(cap.wait_for("flashd: installed", Duration::from_secs(10)));
    let out = rig.nx_send(&rig.img_path, &["--quiet"]);
    assert!(out.status.success());
    let receipt: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(receipt["state"], "unchanged");
    assert!(receipt["wire_bytes"].as_u64().unwrap() < 20_000);

    let info = Command::new(NX)
        .args(["flash", "info", "--json", "--port", &rig.port()])
        .output()
        .unwrap();
    assert!(info.status.success());
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["installed"]["version"], "2.0");

    let verify = Command::new(NX)
        .args(["flash", "verify"])
        .arg(&rig.img_path)
        .args(["--port", &rig.port()])
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", text(&verify.stderr));
    assert!(text(&verify.stdout).contains("stub/placeholder"));

    // Another image is reported as a mismatch (exit 6).
    let other = rig.dir.path().join("other.img");
    std::fs::write(&other, test_image(99, 1)).unwrap();
    let verify = Command::new(NX)
        .args(["flash", "verify"])
        .arg(&other)
        .args(["--port", &rig.port()])
        .output()
        .unwrap();
    // Another image installed: "target refused" (6) in the exit-code table.
    assert_eq!(verify.status.code(), Some(6));
    srv.kill();
}

#[test]
fn no_target_exits_5_with_a_hint() {
    let rig = Rig::new(27);
    let out = Command::new(NX)
        .args(["flash", "send"])
        .arg(&rig.img_path)
        .args(["--port", "unix:/nonexistent/flash.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("just recovery"), "{stderr}");
}

#[test]
fn a_truncated_or_foreign_file_is_refused_before_connecting() {
    let rig = Rig::new(28);
    let p = rig.dir.path().join("trunc.img");
    std::fs::write(&p, &rig.img[..rig.img.len() - 5000]).unwrap();
    let out = rig.nx_send(&p, &[]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stderr).contains("truncated"),
        "{}",
        text(&out.stderr)
    );
    std::fs::write(&p, b"not an image at all").unwrap();
    let out = rig.nx_send(&p, &[]);
    assert_eq!(out.status.code(), Some(3));
}
