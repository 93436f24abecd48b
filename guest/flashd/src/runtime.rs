//! The runtime of an active server: one [`proto::session::Receiver`], the transfer's
//! `Phase`, the background workers and their results. The receiver's actions are executed
//! one function each in `actions`; what follows an install (records, activation, skip index)
//! is in `installed`; where the image goes is [`crate::install`].

mod actions;
mod installed;

use crate::config::Config;
use crate::console::{self, Output};
use crate::install::Destination;
use crate::link::Conn;
use crate::records::{self, Counters};
use crate::store::{InstallTarget, Staging, StateDir};
use crate::workers::{Durable, DurableJob, HashJob, Hasher, WorkResult};
use crate::FlashdError;
use nx_contract::markers::flashd as m;
use proto::frame::Frame;
use proto::image::ImageHead;
use proto::manifest::Manifest;
use proto::msg::{self, ErrorCode, ErrorMsg, Message, MsgType};
use proto::session::{Journal, Receiver, ReceiverConfig, ReceiverEvent};
use proto::trust::{TrustPolicy, TrustedKey};
use std::fs::File;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Where the transfer stands, as flashd sees it (the receiver keeps the protocol's own
/// phase). Replaces the implicit phase of a dozen `Option`s and flags.
enum Phase {
    /// Nothing is open: nothing received in this process yet, the transfer was forgotten, or
    /// a failed install closed it.
    Idle,
    /// A staging file (or, direct, the slot device) is open for one image.
    Receiving(Box<Receiving>),
    /// An install runs. A changed image's staging was closed and handed to the install
    /// (`manifest` is that image's); an unchanged install leaves the phase it started in
    /// (`before`: e.g. a staged transfer of another image) as it was, to return to.
    Installing {
        unchanged: bool,
        manifest: Option<Manifest>,
        before: Box<Phase>,
    },
    /// The staging file became the install (until the next `OpenStaging`): a late journal
    /// would describe nothing.
    Consumed,
}

impl Phase {
    fn open(&self) -> Option<&Receiving> {
        match self {
            Phase::Receiving(r) => Some(r),
            Phase::Installing { before, .. } => before.open(),
            Phase::Idle | Phase::Consumed => None,
        }
    }

    fn open_mut(&mut self) -> Option<&mut Receiving> {
        match self {
            Phase::Receiving(r) => Some(r),
            Phase::Installing { before, .. } => before.open_mut(),
            Phase::Idle | Phase::Consumed => None,
        }
    }

    /// Take the open staging out (the phase becomes `Idle`, or an install's `before` does).
    fn take_open(&mut self) -> Option<Box<Receiving>> {
        match self {
            Phase::Receiving(_) => match std::mem::replace(self, Phase::Idle) {
                Phase::Receiving(r) => Some(r),
                _ => None,
            },
            Phase::Installing { before, .. } => before.take_open(),
            Phase::Idle | Phase::Consumed => None,
        }
    }

    /// A new transfer starts: the staging is no longer the install's.
    fn clear_consumed(&mut self) {
        match self {
            Phase::Consumed => *self = Phase::Idle,
            Phase::Installing { before, .. } => before.clear_consumed(),
            Phase::Idle | Phase::Receiving(_) => {}
        }
    }

    /// The staging file became the install (also while an unchanged install runs after it).
    fn consumed(&self) -> bool {
        match self {
            Phase::Consumed => true,
            Phase::Installing { before, .. } => before.consumed(),
            Phase::Idle | Phase::Receiving(_) => false,
        }
    }
}

/// An open staging file and what is known about the image streaming into it.
struct Receiving {
    image_id: [u8; 32],
    staging: Staging,
    file: Arc<File>,
    /// The image (parsed from the head written to staging); `None` until `WriteHead`.
    manifest: Option<Manifest>,
    /// The segment the hasher is streaming.
    stream: Option<StreamTrack>,
    /// Opened to resume an interrupted transfer: bytes of an earlier process (or a power
    /// cut) may sit where nothing was written since, so a direct install re-reads all of it.
    resumed: bool,
}

/// The segment the hasher is streaming, and where the next write must land to continue it.
#[derive(Debug, Clone, Copy)]
struct StreamTrack {
    segment: usize,
    next: u64,
}

/// What the last accepted HELLO told us.
struct HelloSeen {
    host: String,
    /// Manifest of the HELLO's image (the image of an unchanged install).
    manifest: Option<Manifest>,
    /// CPU snapshot at the HELLO (the install logs where the time went since).
    cpu_mark: crate::cpustat::Snapshot,
}

/// The state of an active server (see the module docs).
pub(crate) struct Runtime {
    cfg: Config,
    out: Arc<dyn Output>,
    dest: Destination,
    state: StateDir,
    rx: Receiver,
    /// The receiver's configuration (to start over with a fresh receiver).
    rcfg: ReceiverConfig,
    phase: Phase,
    results: mpsc::Receiver<WorkResult>,
    results_tx: mpsc::Sender<WorkResult>,
    hasher: Hasher,
    durable: Durable,
    /// Results still expected from background threads.
    outstanding: usize,
    /// Bumped for every chunk of image data written and every background result: the server
    /// drops a session whose count stops moving (see [`crate::config::Config::stall_timeout`]).
    progress: u64,
    /// The furthest (seq, bytes held) a PART_ACK reported: parts of a WRITE still being
    /// reassembled are progress too (a 1 MiB WRITE in 4 KiB parts takes half a minute on a
    /// UART), but only parts beyond what was held before (a host that repeats the same part
    /// makes none).
    part_mark: (u32, u32),
    /// Receipt counters of the image in staging.
    counters: Option<Counters>,
    /// Chunk size of the last journal (the skip index is built with it).
    plan_chunk: Option<u32>,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    /// The reference of a small `PATCH` (at most `PATCH_READ_MAX`), read instead of mapped,
    /// kept for the next one.
    patch_ref: Vec<u8>,
    hello: HelloSeen,
    /// What the install target is called in receipts (resolved at each install).
    install_target: String,
    /// Where the base image of `PATCH` writes is read (the active slot, or the installed
    /// file); refreshed at every HELLO, `None` when there is none.
    base_path: Option<PathBuf>,
    /// The dm-verity tree computed for `DERIVE` writes: (image id, segment, bytes).
    derived_tree: Option<([u8; 32], String, Arc<Vec<u8>>)>,
    /// The base offered at the last HELLO (its manifest id).
    last_base: Option<[u8; 32]>,
    /// A base whose bytes did not verify as patch source: never offered again by this
    /// process (the host then sends real data).
    bad_base: Option<[u8; 32]>,
}

/// The trust policy of `cfg.state_dir` (`/state/trust`), plus the `--require-signed` key.
/// An unreadable store refuses every image (fail closed).
fn load_trust(cfg: &Config, out: &dyn Output) -> TrustPolicy {
    let mut trust = match nx_guest::trust::load(&cfg.state_dir) {
        Ok(t) => t,
        Err(e) => {
            out.show(&m::error(0, format!("trust store unusable: {e}")));
            TrustPolicy::unusable(e.to_string())
        }
    };
    if let Some(key) = cfg.require_signed {
        trust.keys.push(TrustedKey {
            name: "require-signed".into(),
            key,
            development: false,
        });
    }
    trust
}

/// Say what the device trusts: the explicit stub marker when nothing is provisioned.
fn announce_trust(trust: &TrustPolicy, out: &dyn Output) {
    if !trust.is_provisioned() {
        out.show(&m::unprovisioned());
        return;
    }
    if trust.broken.is_some() {
        return;
    }
    let names: Vec<String> = trust
        .keys
        .iter()
        .map(|k| {
            if k.development {
                format!("{} (development)", k.name)
            } else {
                k.name.clone()
            }
        })
        .collect();
    out.log(&format!(
        "trust: {} key{} ({}), anti-rollback floor {}",
        trust.keys.len(),
        if trust.keys.len() == 1 { "" } else { "s" },
        names.join(", "),
        trust.floor
    ));
}

/// An action's failure, reported to the receiver.
type ActionError = (ErrorCode, String);

impl Runtime {
    /// Load the journal and install record from `state` and start the workers.
    pub(crate) fn start(
        cfg: Config,
        out: Arc<dyn Output>,
        state: StateDir,
    ) -> Result<Runtime, FlashdError> {
        let (mut journal, jwarn) = records::load_journal(&state);
        if let Some(w) = jwarn {
            out.log(&w.to_string());
        }
        // A journal is only as good as the staging file it describes.
        if let Some(j) = &journal {
            if let Err(why) = staging_matches(&state.staging_location(), j) {
                out.log(&format!(
                    "discarding journal ({why}); the next transfer starts over"
                ));
                journal = None;
                let _ = records::clear_journal(&state);
            }
        }
        let (installed, iwarn) = records::load_installed(&state);
        if let Some(w) = iwarn {
            out.log(&w.to_string());
        }
        let counters = records::load_counters(&state);
        let mut rcfg = ReceiverConfig::new(cfg.device.clone());
        rcfg.max_window = cfg.max_window;
        rcfg.max_chunk = cfg.max_chunk;
        // flashd computes the dm-verity tree itself (`DERIVE` writes).
        rcfg.derive = true;
        rcfg.trust = load_trust(&cfg, out.as_ref());
        announce_trust(&rcfg.trust, out.as_ref());
        let rx = Receiver::new(rcfg.clone(), journal, installed);
        let (results_tx, results) = mpsc::channel();
        let hasher =
            Hasher::spawn(results_tx.clone(), cfg.verify_threads).map_err(FlashdError::Thread)?;
        let durable =
            Durable::spawn(state.clone(), results_tx.clone()).map_err(FlashdError::Thread)?;
        let dest = Destination::new(cfg.install.clone());
        let install_target = dest.describe_spec();
        Ok(Runtime {
            cfg,
            out,
            dest,
            state,
            rx,
            rcfg,
            phase: Phase::Idle,
            results,
            results_tx,
            hasher,
            durable,
            outstanding: 0,
            progress: 0,
            part_mark: (0, 0),
            counters,
            plan_chunk: None,
            zstd: None,
            patch_ref: Vec::new(),
            hello: HelloSeen {
                host: String::new(),
                manifest: None,
                cpu_mark: crate::cpustat::Snapshot::default(),
            },
            install_target,
            base_path: None,
            derived_tree: None,
            last_base: None,
            bad_base: None,
        })
    }

    /// Re-read the trust store (before each connection: keys may have been provisioned and
    /// the floor raised since the last one).
    pub(crate) fn reload_trust(&mut self) {
        let trust = load_trust(&self.cfg, self.out.as_ref());
        if &trust != self.rx.trust() {
            announce_trust(&trust, self.out.as_ref());
            self.rcfg.trust = trust.clone();
            self.rx.set_trust(trust);
        }
    }

    /// Background work is outstanding (or jobs wait in a worker's backlog).
    pub(crate) fn busy(&self) -> bool {
        self.outstanding > 0 || self.hasher.backlog() > 0 || self.durable.backlog() > 0
    }

    /// A worker's backlog holds a queue's worth of jobs: the server stops reading frames
    /// until it moved on (backpressure without blocking the loop).
    pub(crate) fn backlogged(&self) -> bool {
        self.hasher.backlogged() || self.durable.backlogged()
    }

    /// A count that moves whenever the session makes progress (image data written, a
    /// verification, sync or install finished); INFO, HELLO or repeated frames do not move it.
    pub(crate) fn progress(&self) -> u64 {
        self.progress
    }

    /// Handle every result that arrived, answering on `conn`.
    pub(crate) fn pump_results(&mut self, conn: &mut Conn) {
        self.hasher.flush();
        self.durable.flush();
        while let Ok(r) = self.results.try_recv() {
            self.outstanding = self.outstanding.saturating_sub(1);
            self.progress = self.progress.wrapping_add(1);
            self.on_result(r, Some(conn));
        }
    }

    /// Wait until no background work is outstanding (install, syncs, verifications).
    pub(crate) fn drain(&mut self) {
        while self.outstanding > 0 {
            self.hasher.flush();
            self.durable.flush();
            let wait = if self.hasher.backlog() + self.durable.backlog() > 0 {
                Duration::from_millis(2)
            } else {
                Duration::from_secs(1)
            };
            match self.results.recv_timeout(wait) {
                Ok(r) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    self.on_result(r, None);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
    }

    /// The link went down (closed, broken or idle).
    pub(crate) fn link_down(&mut self, conn: &mut Conn) {
        self.rx.handle(ReceiverEvent::LinkDown);
        self.run_actions(Some(conn));
    }

    /// The link decoder skipped `bytes` of garbage.
    pub(crate) fn corrupt(&mut self, bytes: usize, reason: &str, conn: &mut Conn) {
        self.out
            .log(&format!("link: skipped {bytes} bytes ({reason})"));
        self.rx.handle(ReceiverEvent::Corrupt { bytes });
        self.run_actions(Some(conn));
    }

    fn on_result(&mut self, r: WorkResult, conn: Option<&mut Conn>) {
        match r {
            WorkResult::Verified {
                ticket,
                ok,
                streamed,
                bad_piece,
            } => {
                self.out.log(&format!(
                    "verification #{ticket}: {} ({}{})",
                    if ok { "ok" } else { "MISMATCH" },
                    if streamed { "streamed" } else { "read back" },
                    match bad_piece {
                        Some(at) => format!(", first bad 1 MiB piece at segment offset {at}"),
                        None => String::new(),
                    }
                ));
                self.rx.handle(match bad_piece {
                    Some(rel_offset) if !ok => {
                        ReceiverEvent::SegmentRejected { ticket, rel_offset }
                    }
                    _ => ReceiverEvent::SegmentVerified { ticket, ok },
                });
            }
            WorkResult::Synced { upto_seq } => {
                self.rx.handle(ReceiverEvent::StagingSynced { upto_seq });
            }
            WorkResult::Installed { ok, detail } => {
                self.out.log(&format!("install: {detail}"));
                // Read by `cargo xtask bench guest` (docs/benchmarks.md): the peak so far.
                if let Some(kib) = crate::install::peak_rss_kib() {
                    self.out
                        .log(&format!("{}{kib}", nx_contract::markers::flashd::RSS_TEXT));
                }
                let now = crate::cpustat::Snapshot::take();
                self.out.log(&format!(
                    "{}{}",
                    nx_contract::markers::flashd::CPU_TEXT,
                    now.since(&self.hello.cpu_mark)
                ));
                self.rx.handle(ReceiverEvent::Installed {
                    ok,
                    detail: detail.clone(),
                });
                self.after_install(ok);
            }
            WorkResult::Index(None) => self.out.log("skip index not built (target unreadable)"),
            WorkResult::Index(Some(ix)) => {
                if let Some(mut inst) = self.rx.installed().cloned() {
                    if inst.image_id == ix.image_id {
                        self.out
                            .log(&format!("skip index ready ({} chunks)", ix.entries.len()));
                        inst.index = Some(*ix);
                        self.set_installed_record(inst);
                    }
                }
            }
            WorkResult::Failed { what, text } => {
                self.out.log(&format!("{what} failed: {text}"));
                self.rx.handle(ReceiverEvent::ActionFailed {
                    code: ErrorCode::Storage,
                    text,
                });
            }
        }
        self.run_actions(conn);
    }

    /// A frame from the host.
    pub(crate) fn on_frame(&mut self, f: Frame, conn: &mut Conn) {
        let t = MsgType::from_u8(f.msg_type());
        if let Some(c) = &mut self.counters {
            c.wire_bytes += f.encoded_len() as u64;
        }
        if t == Some(MsgType::Hello) {
            if let Ok(Message::Hello(h)) = Message::from_frame(&f) {
                if let Err((code, text)) = self.precheck_hello(&h) {
                    if msg::validate_peer_name(&h.host).is_ok() {
                        self.out.show(&m::hello(&h.host, h.proto));
                    }
                    let e = ErrorMsg::new(code, &text);
                    self.out.show(&m::error(code.code(), &e.text));
                    if let Ok(frame) = Message::Error(e).to_frame() {
                        let _ = conn.send(&frame);
                    }
                    return;
                }
                self.hello = HelloSeen {
                    host: h.host.clone(),
                    manifest: ImageHead::parse(&h.head).ok().map(|p| p.manifest),
                    cpu_mark: crate::cpustat::Snapshot::take(),
                };
                self.forget_vanished_install();
                self.forget_overwritten_install();
                self.refresh_base();
            }
        }
        if t == Some(MsgType::Info) && !matches!(self.phase, Phase::Receiving(_)) {
            self.refresh_base();
        }
        self.rx.handle(ReceiverEvent::Frame(f));
        self.run_actions(Some(conn));
    }

    /// Checks the receiver cannot make: is there a target to install into, and is it big
    /// enough?
    fn precheck_hello(&self, h: &msg::Hello) -> Result<(), ActionError> {
        let target = self
            .dest
            .resolve()
            .map_err(|e| (ErrorCode::InstallFailed, e))?;
        let Ok(head) = ImageHead::parse(&h.head) else {
            // The receiver rejects an unparsable head with its own error.
            return Ok(());
        };
        let size = head.manifest.total_size;
        match &target {
            InstallTarget::Block(dev) => {
                if let Some(cap) = crate::install::block_capacity(dev) {
                    if size > cap {
                        return Err((
                            ErrorCode::TooLarge,
                            format!(
                                "image is {size} bytes, but install target {} holds only {cap} \
                                 bytes (choose a smaller image or a larger partition)",
                                dev.display()
                            ),
                        ));
                    }
                }
            }
            InstallTarget::File(path) => {
                // The image is staged in the state dir, then renamed (or copied) over the
                // target: both filesystems must have room. A staging file already there (a
                // transfer to resume) gives its blocks back when it is replaced.
                let staging = self.state.staging_path();
                let reusable = crate::install::allocated_bytes(&staging);
                let state_free = crate::install::free_space(self.state.root())
                    .map(|f| (f.saturating_add(reusable), self.state.root().to_path_buf()));
                let dir = path
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."));
                let target_free = crate::install::free_space(dir).map(|f| {
                    (
                        f.saturating_add(crate::install::allocated_bytes(path))
                            .saturating_add(reusable),
                        dir.to_path_buf(),
                    )
                });
                for (cap, where_) in [state_free, target_free].into_iter().flatten() {
                    if size > cap {
                        return Err((
                            ErrorCode::TooLarge,
                            format!(
                                "image is {size} bytes, but the filesystem of {} has only {cap} \
                                 bytes free for it (free space or choose a smaller image)",
                                where_.display()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Execute every queued receiver action, in order. A failed action discards the actions
    /// queued behind it (they assumed it worked) and is reported to the receiver.
    fn run_actions(&mut self, mut conn: Option<&mut Conn>) {
        while let Some(a) = self.rx.poll_action() {
            if let Err((code, text)) = self.execute(a, conn.as_deref_mut()) {
                while self.rx.poll_action().is_some() {}
                self.out.log(&format!("action failed: {text}"));
                self.rx.handle(ReceiverEvent::ActionFailed { code, text });
            }
        }
    }

    /// Print a receiver report (marker or log line).
    fn report(&self, r: &proto::session::ReceiverReport) {
        console::report(&*self.out, r);
    }

    /// The block device a new transfer streams into (`--direct` and a block-device target),
    /// or `None` for the staging file.
    fn direct_device(&self) -> Option<PathBuf> {
        if !self.cfg.direct {
            return None;
        }
        match self.dest.resolve() {
            Ok(InstallTarget::Block(dev)) => Some(dev),
            _ => None,
        }
    }

    /// The open staging, whether receiving or kept open under an unchanged install.
    fn open(&self) -> Option<&Receiving> {
        self.phase.open()
    }

    fn open_mut(&mut self) -> Option<&mut Receiving> {
        self.phase.open_mut()
    }

    /// Drop every trace of the transfer in staging: a new receiver (same install record), no
    /// journal.
    fn forget_transfer(&mut self) {
        let installed = self.rx.installed().cloned();
        self.rx = Receiver::new(self.rcfg.clone(), None, installed);
        self.durable.send(DurableJob::ClearJournal);
        self.counters = None;
        self.phase = Phase::Idle;
    }

    /// Close the staging file (the hasher lets go of it too); returns what was open.
    fn close_staging(&mut self) -> Option<Box<Receiving>> {
        let was = self.phase.take_open();
        self.hasher.send(HashJob::SetFile {
            file: None,
            readback: false,
        });
        was
    }

    /// Wait until every queued durability job ran.
    fn durable_barrier(&mut self) {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        self.durable.send_wait(DurableJob::Run(Box::new(move |_| {
            let _ = tx.send(());
            Ok(())
        })));
        let _ = rx.recv();
    }
}

/// Check that the staging file holds the image the journal describes (size and head).
fn staging_matches(path: &std::path::Path, j: &Journal) -> Result<(), String> {
    let s = Staging::open_existing(path, j.total_size)
        .map_err(|e| e.to_string())?
        .ok_or("staging file missing or of another size")?;
    let mut header = vec![0u8; proto::image::HEADER_LEN];
    s.read_at(0, &mut header).map_err(|e| e.to_string())?;
    let h = proto::image::Header::parse(&header).map_err(|e| format!("staging head: {e}"))?;
    let head_len = usize::try_from(h.data_offset)
        .ok()
        .filter(|n| *n <= proto::image::MAX_HEAD_LEN)
        .ok_or("staging head too long")?;
    let mut head = vec![0u8; head_len];
    s.read_at(0, &mut head).map_err(|e| e.to_string())?;
    let parsed = ImageHead::parse(&head).map_err(|e| format!("staging head: {e}"))?;
    if parsed.manifest.id() != j.image_id {
        return Err("staging holds another image".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiving(dir: &std::path::Path) -> Box<Receiving> {
        let staging = Staging::create(&dir.join("staging.img"), 8192).unwrap();
        let file = Arc::new(staging.file_handle().unwrap());
        Box::new(Receiving {
            image_id: [3; 32],
            staging,
            file,
            manifest: None,
            stream: None,
            resumed: false,
        })
    }

    #[test]
    fn an_unchanged_install_keeps_the_phase_it_started_in() {
        let d = tempfile::tempdir().unwrap();
        let mut p = Phase::Installing {
            unchanged: true,
            manifest: None,
            before: Box::new(Phase::Receiving(receiving(d.path()))),
        };
        assert_eq!(p.open().map(|r| r.image_id), Some([3; 32]));
        assert!(p.open_mut().is_some());
        assert!(!p.consumed());
        // Closing takes the staged transfer out of the install's `before`.
        assert!(p.take_open().is_some());
        assert!(p.open().is_none());
        assert!(matches!(p, Phase::Installing { .. }));
    }

    #[test]
    fn consumed_until_a_new_transfer_starts() {
        let mut p = Phase::Installing {
            unchanged: true,
            manifest: None,
            before: Box::new(Phase::Consumed),
        };
        assert!(p.consumed());
        p.clear_consumed();
        assert!(!p.consumed());
        assert!(matches!(p, Phase::Installing { .. }));
        let mut p = Phase::Consumed;
        assert!(p.take_open().is_none());
        p.clear_consumed();
        assert!(matches!(p, Phase::Idle));
    }

    #[test]
    fn closing_a_receiving_phase_leaves_idle() {
        let d = tempfile::tempdir().unwrap();
        let mut p = Phase::Receiving(receiving(d.path()));
        assert!(p.take_open().is_some());
        assert!(matches!(p, Phase::Idle));
        assert!(p.open().is_none());
    }
}
