//! How `nx flash send` talks: explicit `--chunk` wins over the target's skip index (and the
//! default gives way with a note), NDJSON progress is throttled, `TERM=dumb` gets plain lines,
//! `-q`/`-v` are global, `--rto` (old name `--timeout`), consistent `--help`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// Only `test_image` is needed here.
#[allow(dead_code)]
mod flash_support;

use flashd::testkit::{Capture, RunningServer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const NX: &str = env!("CARGO_BIN_EXE_nx");

struct Rig {
    dir: tempfile::TempDir,
    sock: PathBuf,
    _srv: RunningServer,
}

impl Rig {
    fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let sock = dir.path().join("flash.sock");
        let srv =
            RunningServer::start_simple(&state, &dir.path().join("out.img"), &sock, Capture::new())
                .unwrap();
        Rig {
            dir,
            sock,
            _srv: srv,
        }
    }

    fn image(&self, seed: u64, scale: usize) -> PathBuf {
        let p = self.dir.path().join(format!("os-{seed}.img"));
        std::fs::write(&p, flash_support::test_image(seed, scale)).unwrap();
        p
    }

    fn send(&self, img: &Path, extra: &[&str]) -> Output {
        let out = Command::new(NX)
            .args(["flash", "send"])
            .arg(img)
            .args(["--port", &format!("unix:{}", self.sock.display())])
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        println!(
            "$ nx flash send {} {extra:?} -> {:?}\n{}",
            img.display(),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success());
        out
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The `start` event's chunk size of a `--json` run.
fn start_chunk(out: &Output) -> u64 {
    text(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "start")
        .and_then(|v| v["chunk_size"].as_u64())
        .unwrap()
}

#[test]
fn an_explicit_chunk_wins_and_the_default_gives_way_with_a_note() {
    let rig = Rig::new();
    // Install with 4 KiB chunks: the target's skip index then uses 4 KiB.
    rig.send(&rig.image(1, 2), &["--chunk", "4K"]);
    std::thread::sleep(Duration::from_millis(500)); // the index is hashed in the background
                                                    // The default gives way to the index, and says so.
    let out = rig.send(&rig.image(2, 2), &[]);
    let err = text(&out.stderr);
    assert!(
        err.contains("nx: note: chunk 4 KiB, not the default 1024 KiB: the target chose it"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    // An explicit --chunk wins (and needs no note).
    let out = rig.send(&rig.image(3, 2), &["--chunk", "64K", "--json"]);
    assert_eq!(start_chunk(&out), 64 * 1024);
    std::thread::sleep(Duration::from_millis(500));
    let out = rig.send(&rig.image(4, 2), &["--chunk", "64K"]);
    assert!(!text(&out.stderr).contains("nx: note: chunk"));
}

#[test]
fn a_window_above_the_targets_maximum_gets_a_note() {
    let rig = Rig::new();
    // The host flashd's maximum window is 64.
    let out = rig.send(&rig.image(21, 1), &["--window", "256"]);
    let err = text(&out.stderr);
    assert!(
        err.contains("nx: note: window 64, not --window 256: the target's maximum"),
        "{err}"
    );
    let out = rig.send(&rig.image(22, 1), &["--window", "8"]);
    assert!(!text(&out.stderr).contains("nx: note: window"));
}

#[test]
fn json_progress_is_throttled_to_five_per_second() {
    let rig = Rig::new();
    let t = Instant::now();
    let out = rig.send(&rig.image(7, 8), &["--chunk", "4K", "--json"]);
    let secs = t.elapsed().as_secs_f64();
    let events: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let progress = events.iter().filter(|e| e["event"] == "progress").count();
    println!("{progress} progress events in {secs:.2} s");
    assert!(progress >= 1, "no progress at all");
    // 5 per second, plus the final figures flushed before `done`.
    assert!(
        progress as f64 <= 5.0 * secs + 2.0,
        "{progress} progress events in {secs:.2} s"
    );
    assert!(events.iter().any(|e| e["event"] == "start"));
    assert!(events.iter().any(|e| e["event"] == "done"));
}

/// Run `nx …` on a pseudo-terminal (util-linux `script`) with `TERM=term`.
fn on_tty(term: &str, args: &str) -> String {
    let out = Command::new("script")
        .args(["-qec", &format!("{NX} {args}"), "/dev/null"])
        .env("TERM", term)
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` is needed to test terminal output");
    text(&out.stdout)
}

#[test]
fn a_dumb_terminal_gets_plain_progress_lines() {
    let rig = Rig::new();
    let img = rig.image(9, 4);
    let port = format!("unix:{}", rig.sock.display());
    let dumb = on_tty(
        "dumb",
        &format!("flash send {} --port {port} --no-skip", img.display()),
    );
    assert!(dumb.contains("nx: progress"), "{dumb}");
    assert!(
        !dumb.contains('\u{1b}'),
        "escape sequences on a dumb terminal: {dumb}"
    );
    // A real terminal gets bars instead of progress lines.
    let smart = on_tty(
        "xterm",
        &format!("flash send {} --port {port} --no-skip", img.display()),
    );
    assert!(!smart.contains("nx: progress"), "{smart}");
    assert!(smart.contains("installed"), "{smart}");
}

#[test]
fn quiet_and_verbose_are_global_flags() {
    let rig = Rig::new();
    let img = rig.image(11, 1);
    let out = Command::new(NX)
        .args(["-q", "flash", "send"])
        .arg(&img)
        .args(["--port", &format!("unix:{}", rig.sock.display())])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stderr).matches("nx: ").count(),
        text(&out.stderr).matches("nx: warning").count(),
        "{}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("\"state\""),
        "the receipt is still printed"
    );
    let out = rig.send(&rig.image(12, 1), &["-v"]);
    assert!(
        text(&out.stderr).contains("nx: connecting to unix:"),
        "{}",
        text(&out.stderr)
    );
    // Every group takes them.
    for g in ["boot", "reset", "recovery", "image", "flash"] {
        let out = Command::new(NX).args([g, "-q", "--help"]).output().unwrap();
        assert!(out.status.success(), "{g}");
        assert!(text(&out.stdout).contains("-v, --verbose"), "{g}");
    }
}

#[test]
fn help_is_consistent() {
    let help = |args: &[&str]| {
        let out = Command::new(NX).args(args).arg("--help").output().unwrap();
        text(&out.stdout)
    };
    let send = help(&["flash", "send"]);
    assert!(send.contains("--rto <SECS>"), "{send}");
    assert!(
        !send.contains("--timeout <"),
        "the old name is hidden: {send}"
    );
    for args in [
        &["flash", "send"][..],
        &["flash", "info"],
        &["flash", "verify"],
        &["flash", "reboot"],
        &["boot", "status"],
        &["reset", "factory"],
        &["recovery", "diag"],
    ] {
        let h = help(args);
        assert!(h.contains("--port <PORT>"), "{args:?}: {h}");
        assert!(
            !h.contains("<SPEC>") && !h.contains("<TIMEOUT>"),
            "{args:?}: {h}"
        );
        // Every --port has a description.
        let after = h.split("--port <PORT>").nth(1).unwrap();
        let line = after.lines().next().unwrap_or_default();
        assert!(line.contains("unix:PATH"), "{args:?}: {h}");
    }
    // The old name of --rto still works.
    let rig = Rig::new();
    rig.send(&rig.image(13, 1), &["--timeout", "1.5"]);
}
