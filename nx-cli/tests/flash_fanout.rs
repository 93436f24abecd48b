//! Fan-out: `nx flash send IMG --port A --port B …` (the real `nx` binary) against several
//! in-process flashd servers, each on its own unix socket with its own state dir and install.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod flash_support;

use flash_support::{sha256_hex, test_image};
use flashd::config::{Config, InstallSpec};
use flashd::testkit::{Capture, RunningServer};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

const NX: &str = env!("CARGO_BIN_EXE_nx");

/// One target: a flashd on `sock` installing into `out`.
struct Target {
    sock: PathBuf,
    out: PathBuf,
    state: PathBuf,
    cap: Arc<Capture>,
    srv: Option<RunningServer>,
}

impl Target {
    fn port(&self) -> String {
        format!("unix:{}", self.sock.display())
    }
}

struct Fleet {
    dir: tempfile::TempDir,
    img_path: PathBuf,
    img: Vec<u8>,
}

impl Fleet {
    fn new(seed: u64) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let img = test_image(seed, 1);
        let img_path = dir.path().join("os.img");
        std::fs::write(&img_path, &img).unwrap();
        Fleet { dir, img_path, img }
    }

    /// A working flashd named `name`.
    fn target(&self, name: &str) -> Target {
        let state = self.dir.path().join(format!("{name}-state"));
        std::fs::create_dir(&state).unwrap();
        self.start(name, state)
    }

    /// A flashd without a usable state dir: it refuses every image (ERROR, exit 6).
    fn refusing(&self, name: &str) -> Target {
        self.start(name, self.dir.path().join(format!("{name}-no-such-state")))
    }

    /// A port where nothing listens.
    fn dead(&self, name: &str) -> Target {
        Target {
            sock: self.dir.path().join(format!("{name}.sock")),
            out: self.dir.path().join(format!("{name}-out.img")),
            state: self.dir.path().join(format!("{name}-state")),
            cap: Capture::new(),
            srv: None,
        }
    }

    fn start(&self, name: &str, state: PathBuf) -> Target {
        let sock = self.dir.path().join(format!("{name}.sock"));
        let out = self.dir.path().join(format!("{name}-out.img"));
        let cap = Capture::new();
        let cfg = Config::new(&state, InstallSpec::Path(out.clone()));
        let srv = RunningServer::start(cfg, &sock, cap.clone()).unwrap();
        Target {
            sock,
            out,
            state,
            cap,
            srv: Some(srv),
        }
    }

    fn nx_send(&self, img: &Path, targets: &[&Target], extra: &[&str]) -> Output {
        let mut cmd = Command::new(NX);
        cmd.args(["flash", "send"]).arg(img);
        for t in targets {
            cmd.args(["--port", &t.port()]);
        }
        cmd.args(extra).output().unwrap()
    }

    /// The manifest's `image_sha256` (what receipts name), hex.
    fn image_sha256(&self) -> String {
        let h = proto::image::Header::parse(&self.img[..4096]).unwrap();
        let head = proto::image::ImageHead::parse(&self.img[..h.data_offset as usize]).unwrap();
        hex::encode(head.manifest.image_sha256)
    }

    fn assert_installed(&self, t: &Target) {
        let got = std::fs::read(&t.out).unwrap();
        assert_eq!(sha256_hex(&got), sha256_hex(&self.img), "{}", t.port());
        assert_eq!(got, self.img, "{}", t.port());
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn stop(t: Target) {
    if let Some(s) = t.srv {
        s.kill();
    }
}

#[test]
fn two_targets_are_flashed_concurrently_each_with_its_receipt() {
    let fleet = Fleet::new(41);
    let a = fleet.target("a");
    let b = fleet.target("b");
    // Proof of concurrency (no timing): flashd A stalls after its first segment until flashd B
    // has installed. Flashed one after the other, A would never be released by B.
    let (installed_tx, installed_rx) = mpsc::channel::<()>();
    let installed_tx = Mutex::new(Some(installed_tx));
    b.cap.set_hook(move |m| {
        if m == "flashd: installed" {
            if let Some(tx) = installed_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    });
    let released_by_b = Arc::new(AtomicBool::new(false));
    let (released, installed_rx) = (released_by_b.clone(), Mutex::new(installed_rx));
    a.cap.set_hook(move |m| {
        if m.starts_with("flashd: wrote seg=kernel") {
            let got = installed_rx
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(60));
            released.store(got.is_ok(), Ordering::SeqCst);
        }
    });

    let receipt_path = fleet.dir.path().join("receipts.json");
    let out = fleet.nx_send(
        &fleet.img_path,
        &[&a, &b],
        &["--receipt", receipt_path.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        released_by_b.load(Ordering::SeqCst),
        "A was not flashed while B was"
    );
    fleet.assert_installed(&a);
    fleet.assert_installed(&b);
    // Stopped (threads joined) before their state dirs are read.
    let (a_state, b_state) = (a.state.clone(), b.state.clone());
    let (a_port, b_port) = (a.port(), b.port());
    for t in [a, b] {
        assert!(t.cap.wait_for("flashd: installed", Duration::from_secs(10)));
        stop(t);
    }

    // --receipt FILE: a JSON array, one receipt per target in --port order.
    let file: Value = serde_json::from_slice(&std::fs::read(&receipt_path).unwrap()).unwrap();
    let receipts = file.as_array().unwrap();
    assert_eq!(receipts.len(), 2);
    for (r, (port, state)) in receipts
        .iter()
        .zip([(&a_port, &a_state), (&b_port, &b_state)])
    {
        assert_eq!(r["target"], port.as_str());
        assert_eq!(r["state"], "installed");
        assert_eq!(r["writer"], "nx");
        assert_eq!(r["image_version"], "2.0");
        assert_eq!(r["image_sha256"], fleet.image_sha256());
        // flashd keeps the same record.
        let kept: Value =
            serde_json::from_slice(&std::fs::read(state.join("flash/last-install.json")).unwrap())
                .unwrap();
        assert_eq!(kept["image_id"], r["image_id"]);
        assert_eq!(kept["segments"], r["segments"]);
    }
    // stdout ends with the same receipts, one line each, in --port order.
    let stdout = text(&out.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.as_slice(), receipts.as_slice());

    // Piped: every progress line says which target it is about.
    for l in stderr.lines().filter(|l| l.contains("nx: progress")) {
        assert!(
            l.starts_with(&format!("[{a_port}] ")) || l.starts_with(&format!("[{b_port}] ")),
            "{l}"
        );
    }
    for port in [&a_port, &b_port] {
        for want in [
            format!("[{port}] nx: flashing version 2.0"),
            format!("[{port}] nx: segment kernel verified"),
            format!("nx: target {port}: installed (version 2.0, "),
        ] {
            assert!(stderr.contains(&want), "no {want} in {stderr}");
        }
    }
    assert!(
        stderr.contains("nx: summary: 2 of 2 targets installed, 0 failed (exit 0)"),
        "{stderr}"
    );
}

#[test]
fn a_dead_target_fails_alone_and_the_summary_names_it() {
    let fleet = Fleet::new(42);
    let good = fleet.target("good");
    let dead = fleet.dead("dead");
    let receipt_path = fleet.dir.path().join("r.json");
    let out = fleet.nx_send(
        &fleet.img_path,
        &[&dead, &good],
        &["--receipt", receipt_path.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(good
        .cap
        .wait_for("flashd: installed", Duration::from_secs(10)));
    fleet.assert_installed(&good);
    assert!(!dead.out.exists());

    assert!(
        stderr.contains(&format!("[{}] nx: error: cannot connect to", dead.port())),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "nx: target {}: failed: cannot connect to",
            dead.port()
        )),
        "{stderr}"
    );
    let dead_line = stderr
        .lines()
        .find(|l| l.starts_with(&format!("nx: target {}: failed", dead.port())))
        .unwrap();
    assert!(dead_line.ends_with("(exit 5)"), "{dead_line}");
    assert!(
        stderr.contains(&format!("nx: target {}: installed (", good.port())),
        "{stderr}"
    );
    assert!(
        stderr.contains("nx: summary: 1 of 2 targets installed, 1 failed (exit 5)"),
        "{stderr}"
    );
    // The retry hint lists only the failed target.
    let hint = stderr
        .lines()
        .find(|l| l.starts_with("nx: the failed transfers are resumable: nx flash send "))
        .unwrap_or_else(|| panic!("no retry hint in {stderr}"));
    assert!(hint.ends_with(&format!("--port {}", dead.port())), "{hint}");
    assert!(!hint.contains(&good.port()), "{hint}");

    let file: Value = serde_json::from_slice(&std::fs::read(&receipt_path).unwrap()).unwrap();
    let states: Vec<&str> = file
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["failed", "installed"]);
    assert_eq!(file[0]["target"], dead.port());
    assert_eq!(file[1]["image_sha256"], fleet.image_sha256());
    stop(good);
}

#[test]
fn a_refusing_target_outranks_a_dead_one_and_quiet_shows_only_failures() {
    let fleet = Fleet::new(43);
    let good = fleet.target("good");
    let dead = fleet.dead("dead");
    let refusing = fleet.refusing("refusing");
    let out = fleet.nx_send(&fleet.img_path, &[&good, &dead, &refusing], &["--quiet"]);
    let stderr = text(&out.stderr);
    // 6 (refused: a re-run does not help) is more specific than 5 (a re-run resumes).
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    fleet.assert_installed(&good);
    assert!(!refusing.out.exists());
    assert!(
        stderr.contains(&format!(
            "nx: target {}: failed: the target refused: error ",
            refusing.port()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("stub/placeholder"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "nx: target {}: failed: cannot connect",
            dead.port()
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("nx: summary: 1 of 3 targets installed, 2 failed (exit 6)"),
        "{stderr}"
    );
    // --quiet: no progress, no line for the installed target.
    assert!(!stderr.contains("nx: progress"), "{stderr}");
    assert!(
        !stderr.contains(&format!("nx: target {}:", good.port())),
        "{stderr}"
    );
    // Still one receipt per target on stdout.
    let receipts: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let states: Vec<&str> = receipts
        .iter()
        .map(|r| r["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["installed", "failed", "failed"]);
    stop(good);
    stop(refusing);
}

#[test]
fn ndjson_every_event_carries_its_target() {
    let fleet = Fleet::new(44);
    let a = fleet.target("a");
    let b = fleet.target("b");
    let dead = fleet.dead("dead");
    let out = fleet.nx_send(
        &fleet.img_path,
        &[&a, &b, &dead],
        &["--json", "--chunk", "16K"],
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    fleet.assert_installed(&a);
    fleet.assert_installed(&b);
    let ids = [a.port(), b.port(), dead.port()];
    let events: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(!events.is_empty());
    for e in &events {
        let target = e["target"]
            .as_str()
            .unwrap_or_else(|| panic!("no target: {e}"));
        let index = e["target_index"].as_u64().unwrap() as usize;
        assert_eq!(ids[index], target, "{e}");
        assert!(e["event"].is_string(), "{e}");
    }
    let kinds = |id: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["target"] == id)
            .map(|e| e["event"].as_str().unwrap().to_string())
            .collect()
    };
    for id in &ids[..2] {
        let k = kinds(id);
        for want in [
            "connecting",
            "start",
            "progress",
            "segment_verified",
            "done",
            "receipt",
            "summary",
        ] {
            assert!(k.iter().any(|x| x == want), "{id}: no {want} in {k:?}");
        }
        assert_eq!(k.iter().filter(|x| *x == "receipt").count(), 1, "{k:?}");
        assert_eq!(k.last().unwrap(), "summary");
    }
    assert_eq!(
        kinds(&ids[2]),
        ["connecting", "error", "receipt", "summary"]
    );
    // The stream ends with one summary per target, in --port order.
    let tail = &events[events.len() - 3..];
    for (i, s) in tail.iter().enumerate() {
        assert_eq!(s["event"], "summary");
        assert_eq!(s["target_index"], i);
    }
    assert_eq!(tail[0]["state"], "installed");
    assert_eq!(tail[0]["exit_code"], 0);
    assert_eq!(tail[2]["state"], "failed");
    assert_eq!(tail[2]["exit_code"], 5);
    assert!(tail[2]["error"]
        .as_str()
        .unwrap()
        .contains("cannot connect"));
    let receipt_a = events
        .iter()
        .find(|e| e["event"] == "receipt" && e["target"] == ids[0].as_str())
        .unwrap();
    assert_eq!(receipt_a["image_sha256"], fleet.image_sha256());
    assert_eq!(receipt_a["state"], "installed");
    stop(a);
    stop(b);
}

#[test]
fn a_corrupted_image_is_refused_for_every_target_and_nothing_is_installed() {
    let fleet = Fleet::new(45);
    let a = fleet.target("a");
    let b = fleet.target("b");
    let h = proto::image::Header::parse(&fleet.img[..4096]).unwrap();
    let head = proto::image::ImageHead::parse(&fleet.img[..h.data_offset as usize]).unwrap();
    let rootfs = head.manifest.segment("rootfs").unwrap().clone();
    let mut bad = fleet.img.clone();
    bad[(rootfs.offset + 1000) as usize] ^= 0x40;
    let bad_path = fleet.dir.path().join("bad.img");
    std::fs::write(&bad_path, &bad).unwrap();
    let out = fleet.nx_send(&bad_path, &[&a, &b], &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    for t in [&a, &b] {
        assert!(!t.out.exists(), "{stderr}");
        assert!(
            stderr.contains(&format!("nx: target {}: failed: image ", t.port())),
            "{stderr}"
        );
    }
    assert!(stderr.contains("segment \"rootfs\""), "{stderr}");

    // A truncated file is refused before any connection, once for all targets.
    let trunc = fleet.dir.path().join("trunc.img");
    std::fs::write(&trunc, &fleet.img[..fleet.img.len() - 100]).unwrap();
    let hellos = |t: &Target| {
        t.cap
            .markers()
            .iter()
            .filter(|m| m.starts_with("flashd: hello"))
            .count()
    };
    let before = (hellos(&a), hellos(&b));
    let out = fleet.nx_send(&trunc, &[&a, &b], &["--json"]);
    assert_eq!(out.status.code(), Some(3));
    let events: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let errors: Vec<&Value> = events.iter().filter(|e| e["event"] == "error").collect();
    assert_eq!(errors.len(), 2, "{events:?}");
    assert!(errors
        .iter()
        .all(|e| e["message"].as_str().unwrap().contains("truncated")));
    assert_eq!(
        (hellos(&a), hellos(&b)),
        before,
        "connected with a truncated image"
    );
    stop(a);
    stop(b);
}

#[test]
fn the_same_port_twice_is_a_usage_error() {
    let fleet = Fleet::new(46);
    let a = fleet.dead("a");
    let bare = a.sock.display().to_string(); // a bare path is the same unix socket
    let out = Command::new(NX)
        .args(["flash", "send"])
        .arg(&fleet.img_path)
        .args(["--port", &a.port(), "--port", &bare])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is given twice"),
        "{}",
        text(&out.stderr)
    );
}
