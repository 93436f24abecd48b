//! Sender ↔ receiver over a simulated lossy link: dropped frames, flipped bits, cuts at
//! random points, receiver crashes (losing unsynced writes) — every run must end with
//! the installed bytes identical to the image. Pure proto, no tokio, deterministic seeds.

use std::collections::VecDeque;
use std::time::Duration;

use crate::support::*;
use bytes::BytesMut;
use proto::frame::{Frame, FrameDecoder};
use proto::msg::{DoneStatus, ErrorCode};
use proto::session::*;

#[derive(Clone, Copy, Debug, Default)]
struct Faults {
    /// Drop every n-th frame in each direction.
    drop_every: Option<u64>,
    /// Per-mille of frames that get one random bit flipped.
    flip: u64,
    /// Per-mille per step: cut the link (the host process is killed, `nx` runs again).
    cut: u64,
    /// Per-mille per step: crash the target (flashd + OS: unsynced writes are lost).
    crash: u64,
    /// Cut the link once this many host→target bytes were delivered in the attempt.
    cut_after_bytes: Option<u64>,
    /// Per million bytes (both ways): flip one random bit of the byte.
    flip_ppm: u64,
    /// Per million bytes (both ways): a burst of 1..=64 bytes starting here is lost
    /// (a UART FIFO overrun).
    burst_ppm: u64,
    /// The link delivers nothing at all.
    dead: bool,
}

struct Sim {
    rng: Rng,
    img: TestImage,
    target: Target,
    faults: Faults,
    now: Duration,
    h2t: VecDeque<u8>,
    t2h: VecDeque<u8>,
    sent: [u64; 2],
    attempts: u32,
    cuts: u32,
    crashes: u32,
    resumed_at: Vec<u64>,
    stats: Vec<Stats>,
    cfg: SenderConfig,
    max_buffered: usize,
    /// (received before a crash, resume_seq after it)
    crash_resume: Vec<(u32, u32)>,
    /// Chunks the target had received when it crashed (until the next resume).
    pending_crash: Option<u32>,
}

enum End {
    Ok(Outcome),
    Failed(SessionError),
    Cut,
}

impl Sim {
    fn new(seed: u64, img: TestImage, faults: Faults) -> Sim {
        let rcfg = ReceiverConfig {
            max_window: 8,
            ..ReceiverConfig::new("sim-target")
        };
        Sim {
            rng: Rng(seed),
            img,
            target: {
                let mut t = Target::new(rcfg);
                t.index_chunk = Some(16 * 1024);
                t
            },
            faults,
            now: Duration::ZERO,
            h2t: VecDeque::new(),
            t2h: VecDeque::new(),
            sent: [0, 0],
            attempts: 0,
            cuts: 0,
            crashes: 0,
            resumed_at: Vec::new(),
            stats: Vec::new(),
            cfg: SenderConfig {
                window: 8,
                chunk_size: 16 * 1024,
                compress: CompressMode::Auto,
                rto: Duration::from_millis(200),
                max_retries: 8,
                ..SenderConfig::new("sim-host")
            },
            max_buffered: 0,
            crash_resume: Vec::new(),
            pending_crash: None,
        }
    }

    fn link_send(&mut self, dir: usize, f: &Frame, faulty: bool) {
        self.sent[dir] += 1;
        let mut b = f.to_bytes().to_vec();
        if faulty && self.faults.dead {
            return;
        }
        if faulty && (self.faults.flip_ppm > 0 || self.faults.burst_ppm > 0) {
            let mut out = Vec::with_capacity(b.len());
            let mut i = 0;
            while i < b.len() {
                if self.rng.below(1_000_000) < self.faults.burst_ppm {
                    i += self.rng.below(64) as usize + 1;
                    continue;
                }
                let mut byte = b[i];
                if self.rng.below(1_000_000) < self.faults.flip_ppm {
                    byte ^= 1 << self.rng.below(8);
                }
                out.push(byte);
                i += 1;
            }
            b = out;
        }
        if faulty {
            if let Some(n) = self.faults.drop_every {
                if self.sent[dir].is_multiple_of(n) {
                    return;
                }
            }
            if self.rng.chance(self.faults.flip) {
                let i = self.rng.below(b.len() as u64) as usize;
                b[i] ^= 1 << self.rng.below(8);
            }
        }
        if dir == 0 {
            self.h2t.extend(b);
        } else {
            self.t2h.extend(b);
        }
    }

    /// One `nx flash send` run.
    fn attempt(&mut self, faulty: bool) -> End {
        self.attempts += 1;
        let mut cfg = self.cfg.clone();
        cfg.nonce = u64::from(self.attempts);
        let mut tx = Sender::new(cfg, self.img.head.clone()).unwrap();
        tx.start(self.now);
        let mut tdec = FrameDecoder::new();
        let mut hdec = FrameDecoder::eager();
        let (mut tbuf, mut hbuf) = (BytesMut::new(), BytesMut::new());
        let image = self.img.bytes.clone();
        let mut delivered = 0u64;
        loop {
            // host shell
            let mut out = Vec::new();
            let mut log = Vec::new();
            host_run(&mut tx, self.now, &image, &mut out, &mut log);
            self.max_buffered = self.max_buffered.max(tx.buffered_chunks());
            for f in &out {
                self.link_send(0, f, faulty);
            }
            for a in log {
                match a {
                    SenderAction::Progress(ProgressEvent::Resumed { at_offset, seq, .. }) => {
                        self.resumed_at.push(at_offset);
                        if let Some(before) = self.pending_crash.take() {
                            self.crash_resume.push((before, seq - 1));
                        }
                    }
                    SenderAction::Finished(o) => {
                        self.stats.push(o.stats);
                        self.reset_link();
                        self.target.handle(ReceiverEvent::LinkDown);
                        return End::Ok(o);
                    }
                    SenderAction::Failed(e) => {
                        self.stats.push(tx.stats());
                        self.reset_link();
                        self.target.handle(ReceiverEvent::LinkDown);
                        return End::Failed(e);
                    }
                    _ => {}
                }
            }
            // target shell output
            for f in std::mem::take(&mut self.target.out) {
                self.link_send(1, &f, faulty);
            }
            // deliver a random amount each way (frames split anywhere)
            let moved_h = self.deliver(0, &mut tbuf);
            delivered += moved_h as u64;
            let (frames, skipped) = decode_into(&mut tdec, &mut tbuf);
            if skipped > 0 {
                self.target
                    .handle(ReceiverEvent::Corrupt { bytes: skipped });
            }
            for f in frames {
                self.target.handle(ReceiverEvent::Frame(f));
            }
            let moved_t = self.deliver(1, &mut hbuf);
            let (frames, _) = decode_into(&mut hdec, &mut hbuf);
            for f in frames {
                tx.handle(self.now, SenderEvent::Frame(f));
            }
            if self.target.lazy_sync && self.rng.chance(300) {
                self.target.flush_syncs();
            }
            // faults
            let cut_now = self.faults.cut_after_bytes.is_some_and(|n| delivered >= n);
            if faulty && (cut_now || self.rng.chance(self.faults.cut)) {
                self.cuts += 1;
                self.reset_link();
                self.target.handle(ReceiverEvent::LinkDown);
                return End::Cut;
            }
            if faulty && self.rng.chance(self.faults.crash) {
                self.crashes += 1;
                self.reset_link();
                let before = self.target.rx.received();
                self.target.crash_and_restart();
                self.pending_crash = Some(before);
                return End::Cut;
            }
            // time
            let idle = moved_h == 0 && moved_t == 0 && self.h2t.is_empty() && self.t2h.is_empty();
            if idle && !tbuf.is_empty() {
                // flashd's idle rule: a partial frame with no more bytes coming had a
                // corrupted length.
                if tdec.abandon_partial(&mut tbuf).is_some() {
                    self.target.handle(ReceiverEvent::Corrupt { bytes: 1 });
                }
                let (frames, skipped) = decode_into(&mut tdec, &mut tbuf);
                if skipped > 0 {
                    self.target
                        .handle(ReceiverEvent::Corrupt { bytes: skipped });
                }
                for f in frames {
                    self.target.handle(ReceiverEvent::Frame(f));
                }
                continue;
            }
            if idle {
                self.target.flush_syncs();
                match tx.next_deadline() {
                    Some(d) => self.now = self.now.max(d),
                    None => self.now += Duration::from_millis(1),
                }
                tx.handle(self.now, SenderEvent::Tick);
            } else {
                self.now += Duration::from_millis(1);
                if tx.next_deadline().is_some_and(|d| d <= self.now) {
                    tx.handle(self.now, SenderEvent::Tick);
                }
            }
            assert!(
                self.now < Duration::from_secs(100_000),
                "simulation does not converge"
            );
        }
    }

    fn deliver(&mut self, dir: usize, buf: &mut BytesMut) -> usize {
        let q = if dir == 0 {
            &mut self.h2t
        } else {
            &mut self.t2h
        };
        let n = (self.rng.below(96 * 1024) as usize + 1).min(q.len());
        buf.extend(q.drain(..n));
        n
    }

    fn reset_link(&mut self) {
        self.h2t.clear();
        self.t2h.clear();
        self.target.out.clear();
    }

    /// Runs attempts until one finishes; faults stop after `max_faulty` attempts.
    fn run(&mut self, max_faulty: u32) -> Outcome {
        loop {
            let faulty = self.attempts < max_faulty;
            match self.attempt(faulty) {
                End::Ok(o) => return o,
                End::Failed(e) => {
                    assert!(
                        matches!(e, SessionError::Timeout { .. }),
                        "only timeouts are expected from a lossy link, got {e}"
                    );
                }
                End::Cut => {}
            }
            assert!(self.attempts < max_faulty + 5, "no progress without faults");
        }
    }
}

fn big_image(seed: u64) -> TestImage {
    let mut rng = Rng(seed);
    let kernel = content(&mut rng, 300 * 1024 + 123, false);
    let rootfs = content(&mut rng, 1024 * 1024, true);
    let empty = vec![0u8; 20 * 1024];
    let tail = content(&mut rng, 5000, false);
    build_image(
        "1",
        &[
            ("kernel", kernel),
            ("rootfs", rootfs),
            ("zeros", empty),
            ("tail", tail),
        ],
    )
}

fn assert_installed(sim: &Sim) {
    let got = sim.target.installed.as_ref().expect("installed");
    assert_eq!(got.len(), sim.img.bytes.len());
    assert!(
        got == &sim.img.bytes,
        "installed bytes differ from the image"
    );
    assert_eq!(sha(got), sha(&sim.img.bytes));
}

#[test]
fn clean_link_installs_and_prints_the_markers_in_order() {
    let img = big_image(1);
    let mut sim = Sim::new(1, img, Faults::default());
    let o = sim.run(0);
    assert_eq!(o.status, DoneStatus::Installed);
    assert_installed(&sim);
    assert_eq!(sim.attempts, 1);
    let m = &sim.target.markers;
    assert_eq!(m[0], "flashd: hello host=sim-host proto=1");
    let segs = &sim.img.manifest.segments;
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(
            m[1 + i],
            format!("flashd: wrote seg={} bytes={}", s.name, s.size)
        );
    }
    assert_eq!(
        &m[1 + segs.len()..],
        ["flashd: verify ok", "flashd: installed"]
    );
    assert_eq!(o.stats.retransmitted_frames, 0);
    assert!(o.stats.zero_bytes >= 20 * 1024);
    // memory bound: window + read-ahead chunks
    assert!(sim.max_buffered <= 8 + 4, "{}", sim.max_buffered);
    assert!(
        sim.target.journal_json.is_none(),
        "journal cleared after install"
    );
}

#[test]
fn dropping_every_fifth_frame_still_installs_identical_bytes() {
    for seed in 0..4 {
        let mut sim = Sim::new(
            seed,
            big_image(seed),
            Faults {
                drop_every: Some(5),
                ..Faults::default()
            },
        );
        let o = sim.run(1000);
        assert_installed(&sim);
        assert!(o.stats.retransmitted_frames > 0);
    }
}

#[test]
fn flipped_bits_are_caught_and_retransmitted() {
    for seed in 10..14 {
        let mut sim = Sim::new(
            seed,
            big_image(seed),
            Faults {
                flip: 100,
                ..Faults::default()
            },
        );
        sim.run(1000);
        assert_installed(&sim);
    }
}

#[test]
fn cuts_at_random_points_resume_and_finish() {
    let mut total_cuts = 0;
    for seed in 20..24 {
        let mut sim = Sim::new(
            seed,
            big_image(seed),
            Faults {
                cut: 100,
                ..Faults::default()
            },
        );
        sim.run(200);
        assert_installed(&sim);
        total_cuts += sim.cuts;
        assert!(sim.resumed_at.iter().all(|a| *a > 0));
    }
    assert!(
        total_cuts >= 10,
        "the test must actually cut ({total_cuts})"
    );
}

#[test]
fn hundred_random_cut_points_each_run_completes() {
    let mut rng = Rng(4242);
    let mut resumed = 0;
    for i in 0..100 {
        let mut r = Rng(1000 + i);
        let img = build_image(
            "1",
            &[
                ("kernel", content(&mut r, 100 * 1024, false)),
                ("rootfs", content(&mut r, 200 * 1024, true)),
            ],
        );
        let wire_estimate = img.bytes.len() as u64;
        let mut sim = Sim::new(
            i,
            img,
            Faults {
                cut_after_bytes: Some(rng.below(wire_estimate)),
                ..Faults::default()
            },
        );
        sim.run(1);
        assert_installed(&sim);
        if sim.cuts == 1 && !sim.resumed_at.is_empty() {
            resumed += 1;
            assert!(sim.resumed_at[0] > 0);
        }
    }
    assert!(
        resumed >= 30,
        "most cuts should leave something to resume ({resumed})"
    );
}

#[test]
fn receiver_crashes_resume_from_the_journal_resending_at_most_one_window() {
    let (mut crashes, mut resumes) = (0, 0);
    for seed in 30..34 {
        let mut sim = Sim::new(
            seed,
            big_image(seed),
            Faults {
                crash: 80,
                ..Faults::default()
            },
        );
        sim.run(100);
        assert_installed(&sim);
        for (before, resumed) in &sim.crash_resume {
            // checkpoint every window (8 chunks) with immediate syncs: at most one window lost
            assert!(
                before - resumed <= 8,
                "lost {} chunks on a crash",
                before - resumed
            );
        }
        crashes += sim.crashes;
        resumes += sim.crash_resume.len();
    }
    assert!(
        crashes >= 4 && resumes >= 2,
        "crashes {crashes}, resumes after a crash {resumes}"
    );
}

#[test]
fn everything_at_once_with_background_syncs() {
    let (mut cuts, mut crashes) = (0, 0);
    for seed in 100..108 {
        let mut sim = Sim::new(
            seed,
            big_image(seed),
            Faults {
                drop_every: Some(5),
                flip: 30,
                cut: 30,
                crash: 30,
                ..Faults::default()
            },
        );
        sim.target.lazy_sync = true;
        sim.run(60);
        assert_installed(&sim);
        eprintln!(
            "seed {seed}: attempts {} cuts {} crashes {} retransmitted {:?}",
            sim.attempts,
            sim.cuts,
            sim.crashes,
            sim.stats
                .iter()
                .map(|s| s.retransmitted_frames)
                .sum::<u64>()
        );
        cuts += sim.cuts;
        crashes += sim.crashes;
    }
    assert!(cuts >= 4 && crashes >= 4, "cuts {cuts} crashes {crashes}");
}

#[test]
fn identical_reflash_is_unchanged_and_cheap() {
    let img = big_image(5);
    let mut sim = Sim::new(5, img, Faults::default());
    let full = sim.run(0);
    let full_wire = full.stats.wire_bytes;
    let before = sim.target.markers.len();
    let again = sim.run(0);
    assert_eq!(again.status, DoneStatus::Unchanged);
    assert_installed(&sim);
    assert!(
        again.stats.wire_bytes * 10 <= full_wire,
        "re-flash {} vs full {}",
        again.stats.wire_bytes,
        full_wire
    );
    assert_eq!(
        &sim.target.markers[before..],
        [
            "flashd: hello host=sim-host proto=1",
            "flashd: verify ok",
            "flashd: installed"
        ]
    );
    // --no-skip: a full transfer again
    sim.cfg.skip = false;
    let forced = sim.run(0);
    assert_eq!(forced.status, DoneStatus::Installed);
    assert!(forced.stats.wire_bytes * 2 > full_wire);
    assert_installed(&sim);
}

#[test]
fn update_sends_only_what_changed() {
    let old = big_image(6);
    let mut sim = Sim::new(6, old.clone(), Faults::default());
    sim.cfg.compress = CompressMode::None;
    let full = sim.run(0);
    // new version: the kernel changes, the rootfs is the same
    let mut rng = Rng(66);
    let segs: Vec<(&str, Vec<u8>)> = old
        .manifest
        .segments
        .iter()
        .map(|s| {
            let mut d = old.bytes[s.offset as usize..(s.offset + s.size) as usize].to_vec();
            if s.name == "kernel" {
                d = content(&mut rng, d.len() + 8192, false); // grows: later segments move
            }
            (s.name.as_str(), d)
        })
        .collect();
    let new = build_image("2", &segs);
    sim.img = new;
    let up = sim.run(0);
    assert_installed(&sim);
    assert!(up.stats.identical_bytes > 500 * 1024, "{:?}", up.stats);
    assert!(sim.target.copies > 0);
    assert!(
        up.stats.wire_bytes < full.stats.wire_bytes / 2,
        "{:?} vs {:?}",
        up.stats,
        full.stats
    );
}

#[test]
fn compression_path_installs_identical_bytes() {
    let mut rng = Rng(8);
    let mut k = vec![0u8; 200 * 1024];
    for (i, b) in k.iter_mut().enumerate() {
        *b = ((i / 700) % 251) as u8 | 1; // long runs: compressible
    }
    let img = build_image(
        "1",
        &[
            ("kernel", k),
            ("rootfs", content(&mut rng, 100 * 1024, false)),
        ],
    );
    let mut sim = Sim::new(
        8,
        img,
        Faults {
            drop_every: Some(5),
            ..Faults::default()
        },
    );
    let o = sim.run(1000);
    assert_installed(&sim);
    assert!(o.stats.compressed_saved > 100 * 1024, "{:?}", o.stats);
}

#[test]
fn corrupted_image_file_fails_verification_and_installs_nothing() {
    let good = big_image(9);
    // install a previous image first: it must stay untouched
    let prev = big_image(99);
    let mut sim = Sim::new(9, prev.clone(), Faults::default());
    sim.run(0);
    let before = sim.target.installed.clone().unwrap();
    // a byte flipped inside the rootfs after the image was built
    let mut bad = good.clone();
    let seg = &bad.manifest.segments[1];
    let r = seg.data_ranges[0];
    bad.bytes[(seg.offset + r.offset + 10) as usize] ^= 0x01;
    sim.img = bad;
    sim.cfg.skip = false;
    let end = sim.attempt(false);
    let End::Failed(SessionError::Remote { code, text }) = end else {
        panic!("expected a remote error")
    };
    assert_eq!(code, ErrorCode::VerifyFailed);
    assert_eq!(text, "verify failed seg=rootfs");
    assert!(sim
        .target
        .markers
        .iter()
        .any(|m| m == "flashd: verify failed seg=rootfs"));
    assert!(sim
        .target
        .markers
        .iter()
        .any(|m| m == "flashd: error 6 verify failed seg=rootfs"));
    assert_eq!(
        sim.target.installed.as_ref(),
        Some(&before),
        "previous install untouched"
    );
    assert_eq!(sim.target.installs, 1);
    // the good image afterwards installs fine (resuming what verified)
    sim.img = good;
    sim.run(0);
    assert_installed(&sim);
}

/// An image of a few MiB of incompressible data (the noisy-line tests).
fn noisy_image(seed: u64) -> TestImage {
    let mut rng = Rng(seed);
    build_image(
        "1",
        &[
            ("kernel", content(&mut rng, 700 * 1024 + 77, false)),
            ("rootfs", content(&mut rng, 1536 * 1024, false)),
        ],
    )
}

/// `nx flash send` with its defaults (only the nonce and host name differ).
fn default_sender(sim: &mut Sim) {
    sim.cfg = SenderConfig::new("sim-host");
}

fn noisy_run(seed: u64, faults: Faults) -> (Sim, Outcome) {
    let mut sim = Sim::new(seed, noisy_image(seed), faults);
    default_sender(&mut sim);
    let o = sim.run(1000);
    assert_installed(&sim);
    assert_eq!(
        sim.attempts, 1,
        "the sender gave up while bytes were still getting through"
    );
    (sim, o)
}

#[test]
fn defaults_complete_at_one_flip_per_100k_bytes() {
    for seed in 0..2 {
        let (_, o) = noisy_run(
            seed,
            Faults {
                flip_ppm: 10,
                ..Faults::default()
            },
        );
        assert!(o.stats.retransmitted_frames > 0, "{:?}", o.stats);
    }
}

#[test]
fn defaults_complete_at_one_flip_per_10k_bytes() {
    for seed in 0..2 {
        let (_, o) = noisy_run(
            seed,
            Faults {
                flip_ppm: 100,
                ..Faults::default()
            },
        );
        // adaptation keeps the overhead bounded (after the first go-back-N rewind,
        // selective repeat: a loss costs the lost part): under 3.5× the data on the wire
        assert!(
            2 * o.stats.wire_bytes < 7 * o.stats.data_bytes,
            "{:?}",
            o.stats
        );
    }
}

#[test]
fn defaults_complete_with_burst_byte_drops() {
    // ≈ 0.3% of the bytes lost in bursts of up to 64, plus flips.
    let (_, o) = noisy_run(
        5,
        Faults {
            burst_ppm: 100,
            flip_ppm: 10,
            ..Faults::default()
        },
    );
    assert!(o.stats.retransmitted_frames > 0, "{:?}", o.stats);
}

#[test]
fn a_dead_link_fails_with_the_resumable_hint_after_the_retry_budget() {
    let mut sim = Sim::new(
        3,
        noisy_image(3),
        Faults {
            dead: true,
            ..Faults::default()
        },
    );
    default_sender(&mut sim);
    match sim.attempt(true) {
        End::Failed(e) => {
            assert!(
                matches!(e, SessionError::Timeout { retries: 10, .. }),
                "{e}"
            );
            assert!(e.to_string().contains("resumable"), "{e}");
        }
        End::Ok(_) => panic!("installed over a dead link"),
        End::Cut => panic!("cut"),
    }
}

#[test]
fn a_link_that_dies_mid_transfer_fails_resumably_and_the_rerun_completes() {
    let mut sim = Sim::new(
        4,
        noisy_image(4),
        Faults {
            flip_ppm: 100,
            cut_after_bytes: Some(4 * 1024 * 1024),
            ..Faults::default()
        },
    );
    default_sender(&mut sim);
    // a noisy attempt that makes progress, then is cut
    assert!(matches!(sim.attempt(true), End::Cut));
    // the line goes dead: the retry budget ends it with the resumable hint
    sim.faults.cut_after_bytes = None;
    sim.faults.dead = true;
    match sim.attempt(true) {
        End::Failed(e) => assert!(e.to_string().contains("resumable"), "{e}"),
        _ => panic!("a dead line must fail"),
    }
    // the line is back (noisy): the rerun resumes and completes
    sim.faults.dead = false;
    let o = sim.run(1000);
    assert_installed(&sim);
    assert!(o.stats.resumed_bytes > 0, "{:?}", o.stats);
}
