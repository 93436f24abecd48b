//! The server: one [`proto::session::Receiver`] per process, fed by connections one at a time,
//! with every action of the receiver executed here (writes, fsyncs, journal, verification,
//! install) — in order, with the slow parts on background threads (see [`crate::workers`]).
//!
//! Without a usable state directory the server runs as an explicit stub: it answers every
//! request with `ERROR no_state` and never installs anything.

use crate::config::{Config, InstallSpec};
use crate::link::{Acceptor, Conn, LinkError, LinkEvent, Recv};
use crate::records::{self, Counters};
use crate::store::{self, InstallTarget, Staging, StateDir};
use crate::workers::{Durable, DurableJob, HashJob, Hasher, WorkResult};
use crate::FlashdError;
use bytes::Bytes;
use proto::frame::Frame;
use proto::image::ImageHead;
use proto::manifest::Manifest;
use proto::msg::{self, ErrorCode, ErrorMsg, Message, MsgType, WriteBody};
use proto::session::{Plan, Receiver, ReceiverAction, ReceiverConfig, ReceiverEvent, SkipIndex};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where markers and log lines go. The markers are the console contract.
pub trait Output: Send + Sync {
    /// One exact marker line (`flashd: …`).
    fn marker(&self, line: &str);
    /// An informational line (not part of the contract).
    fn log(&self, line: &str);
}

/// Markers on stdout (one `write(2)` per line, flushed), logs on stderr.
pub struct StdOutput;

impl Output for StdOutput {
    fn marker(&self, line: &str) {
        nx_guest::marker::emit(line);
    }
    fn log(&self, line: &str) {
        // Logs share the console with the markers: keep them visibly apart.
        let rest = line.strip_prefix("flashd: ").unwrap_or(line);
        eprintln!("flashd (log): {rest}");
    }
}

/// How long the loop waits between checks while background work is outstanding.
const BUSY_POLL: Duration = Duration::from_millis(2);

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnEnd {
    /// The host closed the link (or the link broke).
    Closed(Option<String>),
    /// Nothing arrived for the idle timeout.
    Idle,
}

/// The server state (see the module docs).
pub struct Server {
    cfg: Config,
    out: Arc<dyn Output>,
    mode: Mode,
}

enum Mode {
    /// No usable state dir: refuse to flash.
    Stub {
        reason: String,
    },
    Active(Box<Active>),
}

struct Active {
    state: StateDir,
    rx: Receiver,
    results: mpsc::Receiver<WorkResult>,
    results_tx: mpsc::Sender<WorkResult>,
    hasher: Hasher,
    durable: Durable,
    staging: Option<Staging>,
    staging_file: Option<Arc<File>>,
    /// The image in staging (parsed from the head written to it).
    manifest: Option<Manifest>,
    plan_chunk: Option<u32>,
    counters: Option<Counters>,
    stream: Option<StreamTrack>,
    /// Results still expected from background threads.
    outstanding: usize,
    zstd: Option<zstd::bulk::Decompressor<'static>>,
    last_host: String,
    /// Manifest of the last HELLO (the image of an unchanged-install session).
    hello_manifest: Option<Manifest>,
    /// `unchanged` flag of the install in progress.
    installing_unchanged: Option<bool>,
    /// The staging file became the install (until the next `OpenStaging`).
    staging_consumed: bool,
    /// Image id of the open staging file.
    staging_image: Option<[u8; 32]>,
    /// The receiver's configuration (to start over with a fresh receiver).
    rcfg: ReceiverConfig,
    install_target: String,
    /// CPU snapshot at the last HELLO (the install logs where the time went since).
    cpu_mark: crate::cpustat::Snapshot,
}

/// The segment the hasher is streaming, and where the next write must land to continue it.
#[derive(Debug, Clone, Copy)]
struct StreamTrack {
    segment: usize,
    next: u64,
}

impl Server {
    /// Open the state dir and load the journal and install record. An unusable state dir
    /// gives a stub server (see [`Server::stub_reason`]).
    pub fn new(cfg: Config, out: Arc<dyn Output>) -> Result<Server, FlashdError> {
        let state = match StateDir::open(&cfg.state_dir, cfg.require_mountpoint) {
            Ok(s) => s,
            Err(e) => {
                let reason = match e {
                    store::StoreError::StateDirUnusable { path, reason } => {
                        format!("{}: {reason}", path.display())
                    }
                    other => other.to_string(),
                };
                return Ok(Server {
                    cfg,
                    out,
                    mode: Mode::Stub { reason },
                });
            }
        };
        let (mut journal, jwarn) = records::load_journal(&state);
        if let Some(w) = jwarn {
            out.log(&format!("flashd: {w}"));
        }
        // A journal is only as good as the staging file it describes.
        if let Some(j) = &journal {
            if let Err(why) = staging_matches(&state.staging_location(), j) {
                out.log(&format!(
                    "flashd: discarding journal ({why}); the next transfer starts over"
                ));
                journal = None;
                let _ = records::clear_journal(&state);
            }
        }
        let (installed, iwarn) = records::load_installed(&state);
        if let Some(w) = iwarn {
            out.log(&format!("flashd: {w}"));
        }
        let counters = records::load_counters(&state);
        let mut rcfg = ReceiverConfig::new(cfg.device.clone());
        rcfg.max_window = cfg.max_window;
        rcfg.max_chunk = cfg.max_chunk;
        rcfg.require_signed = cfg.require_signed;
        let rx = Receiver::new(rcfg.clone(), journal, installed);
        let (results_tx, results) = mpsc::channel();
        let hasher = Hasher::spawn(results_tx.clone()).map_err(FlashdError::Thread)?;
        let durable =
            Durable::spawn(state.clone(), results_tx.clone()).map_err(FlashdError::Thread)?;
        let install_target = cfg.install.describe();
        Ok(Server {
            cfg,
            out,
            mode: Mode::Active(Box::new(Active {
                state,
                rx,
                results,
                results_tx,
                hasher,
                durable,
                staging: None,
                staging_file: None,
                manifest: None,
                plan_chunk: None,
                counters,
                stream: None,
                outstanding: 0,
                zstd: None,
                last_host: String::new(),
                hello_manifest: None,
                installing_unchanged: None,
                staging_consumed: false,
                staging_image: None,
                rcfg,
                install_target,
                cpu_mark: crate::cpustat::Snapshot::default(),
            })),
        })
    }

    /// `Some(reason)` when the server refuses to flash (no usable state dir).
    pub fn stub_reason(&self) -> Option<&str> {
        match &self.mode {
            Mode::Stub { reason } => Some(reason),
            Mode::Active(_) => None,
        }
    }

    /// Print the startup marker: `flashd: ready`, or the explicit stub marker.
    pub fn announce(&self) {
        match &self.mode {
            Mode::Stub { reason } => self.out.marker(&format!(
                "flashd: stub/placeholder no usable state dir ({reason}): refusing to flash"
            )),
            Mode::Active(_) => self.out.marker("flashd: ready"),
        }
    }

    /// Serve connections from `acceptor` (forever, or one with `once`).
    pub fn serve(&mut self, acceptor: &mut dyn Acceptor, once: bool) -> Result<(), LinkError> {
        loop {
            let Some(conn) = acceptor.accept()? else {
                return Ok(());
            };
            let end = self.serve_conn(conn);
            if let ConnEnd::Closed(why) = &end {
                self.out.log(&format!(
                    "flashd: connection closed{}",
                    why.as_ref().map(|w| format!(" ({w})")).unwrap_or_default()
                ));
            }
            if once {
                self.drain();
                return Ok(());
            }
        }
    }

    /// Wait until no background work is outstanding (install, syncs, verifications).
    pub fn drain(&mut self) {
        if let Mode::Active(a) = &mut self.mode {
            while a.outstanding > 0 {
                match a.results.recv_timeout(Duration::from_secs(1)) {
                    Ok(r) => {
                        a.outstanding = a.outstanding.saturating_sub(1);
                        a.on_result(r, None, &self.cfg, &*self.out);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
    }

    /// Serve one connection until it closes or idles out.
    pub fn serve_conn(&mut self, mut conn: Conn) -> ConnEnd {
        let idle = self.cfg.idle_timeout;
        let mut last = Instant::now();
        let mut stub_answered = false;
        loop {
            let busy = match &mut self.mode {
                Mode::Active(a) => {
                    a.pump_results(&mut conn, &self.cfg, &*self.out);
                    a.outstanding > 0
                }
                Mode::Stub { .. } => false,
            };
            let wait = if busy {
                BUSY_POLL
            } else {
                idle.min(Duration::from_millis(500))
            };
            match conn.recv(wait) {
                Recv::Timeout => {
                    if !busy && last.elapsed() >= idle {
                        if let Mode::Active(a) = &mut self.mode {
                            a.rx.handle(ReceiverEvent::LinkDown);
                            a.run_actions(&mut conn, &self.cfg, &*self.out);
                        }
                        return ConnEnd::Idle;
                    }
                }
                Recv::Event(ev) => {
                    last = Instant::now();
                    match ev {
                        LinkEvent::Closed(why) => {
                            if let Mode::Active(a) = &mut self.mode {
                                a.rx.handle(ReceiverEvent::LinkDown);
                                a.run_actions(&mut conn, &self.cfg, &*self.out);
                            }
                            return ConnEnd::Closed(why);
                        }
                        LinkEvent::Skipped { bytes, reason } => {
                            if let Mode::Active(a) = &mut self.mode {
                                self.out.log(&format!(
                                    "flashd: link: skipped {bytes} bytes ({reason})"
                                ));
                                a.rx.handle(ReceiverEvent::Corrupt { bytes });
                                a.run_actions(&mut conn, &self.cfg, &*self.out);
                            }
                        }
                        LinkEvent::Frame(f) => match &mut self.mode {
                            Mode::Stub { reason } => {
                                let reason = reason.clone();
                                self.stub_frame(&mut conn, &f, &reason, &mut stub_answered);
                            }
                            Mode::Active(a) => {
                                a.on_frame(f, &mut conn, &self.cfg, &*self.out);
                            }
                        },
                    }
                }
            }
        }
    }

    fn stub_frame(&self, conn: &mut Conn, f: &Frame, reason: &str, answered: &mut bool) {
        let is_request = matches!(
            MsgType::from_u8(f.msg_type()),
            Some(MsgType::Hello | MsgType::Info | MsgType::Done)
        );
        if let Ok(Message::Hello(h)) = Message::from_frame(f) {
            if msg::validate_peer_name(&h.host).is_ok() {
                self.out
                    .marker(&format!("flashd: hello host={} proto={}", h.host, h.proto));
            }
        }
        // Answer each request; answer a flood of WRITEs once.
        if is_request || !*answered {
            *answered = true;
            let text = format!(
                "stub/placeholder: this target has no usable state dir ({reason}); refusing to flash \
                 (attach the /state disk and restart)"
            );
            let e = ErrorMsg::new(ErrorCode::NoState, &text);
            self.out.marker(&format!(
                "flashd: error {} {}",
                ErrorCode::NoState.code(),
                e.text
            ));
            if let Ok(frame) = Message::Error(e).to_frame() {
                let _ = conn.send(&frame);
            }
        }
    }
}

/// Check that the staging file holds the image the journal describes (size and head).
fn staging_matches(path: &Path, j: &proto::session::Journal) -> Result<(), String> {
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

/// The first offset (relative to the segment) of a non-zero byte of `data` — written at
/// `rel` in the segment — that lies outside `ranges` (sorted, relative), if any.
fn nonzero_outside(ranges: &[proto::manifest::DataRange], rel: u64, data: &[u8]) -> Option<u64> {
    let end = rel + data.len() as u64;
    let mut pos = rel;
    let mut i = ranges.partition_point(|r| r.end() <= rel);
    while pos < end {
        // The gap before the next range (or up to the end).
        let next = ranges.get(i).map_or(end, |r| r.offset.clamp(pos, end));
        if next > pos {
            let gap = data.get((pos - rel) as usize..(next - rel) as usize)?;
            if let Some(k) = gap.iter().position(|b| *b != 0) {
                return Some(pos + k as u64);
            }
        }
        // Skip the range itself.
        pos = ranges.get(i).map_or(end, |r| r.end().max(next));
        i += 1;
    }
    None
}

/// Resolve the install target now (a partition is looked up by name each time).
pub fn resolve_target(spec: &InstallSpec) -> Result<InstallTarget, String> {
    match spec {
        InstallSpec::Path(p) => {
            let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
            if let Some(d) = parent {
                if !d.is_dir() {
                    return Err(format!(
                        "install target {}: directory {} does not exist",
                        p.display(),
                        d.display()
                    ));
                }
            }
            Ok(InstallTarget::from_path(p))
        }
        InstallSpec::Partition {
            name,
            sys_dir,
            dev_dir,
        } => match nx_guest::blockdev::find_partition(sys_dir, dev_dir, name) {
            Ok(Some(dev)) => Ok(InstallTarget::Block(dev)),
            Ok(None) => Err(format!(
                "install partition {name} not found (is the slot disk attached?)"
            )),
            Err(e) => Err(format!("install partition {name}: {e}")),
        },
        InstallSpec::Slot { env, chosen } => {
            let mut chosen = chosen
                .lock()
                .map_err(|_| "slot choice lock poisoned".to_string())?;
            if let Some((_, dev)) = chosen.as_ref() {
                return Ok(InstallTarget::Block(dev.clone()));
            }
            let (slot, dev) =
                crate::slots::resolve_inactive_slot_in(env).map_err(|e| e.to_string())?;
            *chosen = Some((slot, dev.clone()));
            Ok(InstallTarget::Block(dev))
        }
    }
}

/// Peak resident set size of this process (`VmHWM` of `/proc/self/status`), KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = store::read_bounded(Path::new("/proc/self/status"), 64 * 1024).ok()??;
    String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn block_capacity(path: &Path) -> Option<u64> {
    let mut f = File::open(path).ok()?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).ok()
}

impl Active {
    fn pump_results(&mut self, conn: &mut Conn, cfg: &Config, out: &dyn Output) {
        while let Ok(r) = self.results.try_recv() {
            self.outstanding = self.outstanding.saturating_sub(1);
            self.on_result(r, Some(conn), cfg, out);
        }
    }

    fn on_result(
        &mut self,
        r: WorkResult,
        conn: Option<&mut Conn>,
        cfg: &Config,
        out: &dyn Output,
    ) {
        match r {
            WorkResult::Verified {
                ticket,
                ok,
                streamed,
            } => {
                out.log(&format!(
                    "flashd: verification #{ticket}: {} ({})",
                    if ok { "ok" } else { "MISMATCH" },
                    if streamed { "streamed" } else { "read back" }
                ));
                self.rx
                    .handle(ReceiverEvent::SegmentVerified { ticket, ok });
            }
            WorkResult::Synced { upto_seq } => {
                self.rx.handle(ReceiverEvent::StagingSynced { upto_seq });
            }
            WorkResult::Installed { ok, detail } => {
                out.log(&format!("flashd: install: {detail}"));
                // Read by `cargo xtask bench guest` (docs/benchmarks.md): the peak so far.
                if let Some(kib) = peak_rss_kib() {
                    out.log(&format!("flashd: rss peak_kib={kib}"));
                }
                let now = crate::cpustat::Snapshot::take();
                out.log(&format!(
                    "flashd: since HELLO: {}",
                    now.since(&self.cpu_mark)
                ));
                self.rx.handle(ReceiverEvent::Installed {
                    ok,
                    detail: detail.clone(),
                });
                self.after_install(ok, cfg, out);
            }
            WorkResult::Index(None) => out.log("flashd: skip index not built (target unreadable)"),
            WorkResult::Index(Some(ix)) => {
                if let Some(mut inst) = self.rx.installed().cloned() {
                    if inst.image_id == ix.image_id {
                        out.log(&format!(
                            "flashd: skip index ready ({} chunks)",
                            ix.entries.len()
                        ));
                        inst.index = Some(*ix);
                        self.rx.set_installed(Some(inst.clone()));
                        let target = self.install_target.clone();
                        self.durable.send(DurableJob::Run(Box::new(move |st| {
                            records::save_installed(st, &inst, &target).map_err(|e| e.to_string())
                        })));
                    }
                }
            }
            WorkResult::Failed { what, text } => {
                out.log(&format!("flashd: {what} failed: {text}"));
                self.rx.handle(ReceiverEvent::ActionFailed {
                    code: ErrorCode::Storage,
                    text,
                });
            }
        }
        match conn {
            Some(c) => self.run_actions(c, cfg, out),
            None => self.run_actions_offline(cfg, out),
        }
    }

    fn on_frame(&mut self, f: Frame, conn: &mut Conn, cfg: &Config, out: &dyn Output) {
        let t = MsgType::from_u8(f.msg_type());
        if let Some(c) = &mut self.counters {
            c.wire_bytes += f.encoded_len() as u64;
        }
        if t == Some(MsgType::Hello) {
            if let Ok(Message::Hello(h)) = Message::from_frame(&f) {
                if let Err((code, text)) = self.precheck_hello(&h, cfg) {
                    if msg::validate_peer_name(&h.host).is_ok() {
                        out.marker(&format!("flashd: hello host={} proto={}", h.host, h.proto));
                    }
                    let e = ErrorMsg::new(code, &text);
                    out.marker(&format!("flashd: error {} {}", code.code(), e.text));
                    if let Ok(frame) = Message::Error(e).to_frame() {
                        let _ = conn.send(&frame);
                    }
                    return;
                }
                self.cpu_mark = crate::cpustat::Snapshot::take();
                self.last_host = h.host.clone();
                self.hello_manifest = ImageHead::parse(&h.head).ok().map(|p| p.manifest);
                self.forget_vanished_install(cfg, out);
                self.forget_overwritten_install(cfg, out);
            }
        }
        self.rx.handle(ReceiverEvent::Frame(f));
        self.run_actions(conn, cfg, out);
    }

    /// A direct transfer of another image overwrites the installed one in place (the record
    /// always describes the target device — see [`Self::forget_vanished_install`]): from its
    /// first write on, neither "unchanged" nor COPY from that image would be true. Forget the
    /// record before the receiver answers the HELLO.
    fn forget_overwritten_install(&mut self, cfg: &Config, out: &dyn Output) {
        let (Some(inst), Some(m)) = (self.rx.installed().cloned(), self.hello_manifest.as_ref())
        else {
            return;
        };
        if inst.image_id == m.id() || self.direct_device(cfg).is_none() {
            return;
        }
        out.log("flashd: streaming another image into the installed target: forgetting its install record (no COPY from it)");
        self.rx.set_installed(None);
        self.durable.send(DurableJob::Run(Box::new(|st| {
            store::remove_if_exists(&st.installed_path()).map_err(|e| e.to_string())
        })));
    }

    /// If the install record describes a file target that is gone or has another size, the
    /// record is stale: forget it, so the host sends the image instead of being told it is
    /// already installed.
    fn forget_vanished_install(&mut self, cfg: &Config, out: &dyn Output) {
        let Some(inst) = self.rx.installed().cloned() else {
            return;
        };
        if let InstallSpec::Slot { .. } = &cfg.install {
            // The record describes one slot; COPY and "unchanged" are only true for that slot.
            let current = resolve_target(&cfg.install).map(|t| describe_target(&cfg.install, &t));
            let recorded = records::installed_target(&self.state);
            if current.as_ref().ok() != recorded.as_ref() {
                out.log(&format!(
                    "flashd: install record is for {} but the target is {}: forgetting it",
                    recorded.as_deref().unwrap_or("?"),
                    current.as_deref().unwrap_or("?")
                ));
                self.rx.set_installed(None);
                self.durable.send(DurableJob::Run(Box::new(|st| {
                    store::remove_if_exists(&st.installed_path()).map_err(|e| e.to_string())
                })));
            }
            return;
        }
        let Ok(InstallTarget::File(path)) = resolve_target(&cfg.install) else {
            return;
        };
        let len = std::fs::metadata(&path).map(|m| m.len()).ok();
        if len == Some(inst.total_size) {
            return;
        }
        out.log(&format!(
            "flashd: install record is stale ({} is {}): forgetting it",
            path.display(),
            len.map_or("missing".to_string(), |l| format!("{l} bytes"))
        ));
        self.rx.set_installed(None);
        self.durable.send(DurableJob::Run(Box::new(|st| {
            store::remove_if_exists(&st.installed_path()).map_err(|e| e.to_string())
        })));
    }

    /// Checks the receiver cannot make: is there a target to install into, and is it big
    /// enough?
    fn precheck_hello(&self, h: &msg::Hello, cfg: &Config) -> Result<(), (ErrorCode, String)> {
        let target = resolve_target(&cfg.install).map_err(|e| (ErrorCode::InstallFailed, e))?;
        if let InstallTarget::Block(dev) = &target {
            if let (Some(cap), Ok(head)) = (block_capacity(dev), ImageHead::parse(&h.head)) {
                if head.manifest.total_size > cap {
                    return Err((
                        ErrorCode::TooLarge,
                        format!(
                            "image is {} bytes, install target {} holds {cap}",
                            head.manifest.total_size,
                            dev.display()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Execute every queued receiver action, in order. A failed action discards the actions
    /// queued behind it (they assumed it worked) and is reported to the receiver.
    fn run_actions(&mut self, conn: &mut Conn, cfg: &Config, out: &dyn Output) {
        self.run_actions_inner(Some(conn), cfg, out);
    }

    fn run_actions_offline(&mut self, cfg: &Config, out: &dyn Output) {
        self.run_actions_inner(None, cfg, out);
    }

    fn run_actions_inner(&mut self, mut conn: Option<&mut Conn>, cfg: &Config, out: &dyn Output) {
        while let Some(a) = self.rx.poll_action() {
            if let Err((code, text)) = self.execute(a, conn.as_deref_mut(), cfg, out) {
                while self.rx.poll_action().is_some() {}
                out.log(&format!("flashd: action failed: {text}"));
                self.rx.handle(ReceiverEvent::ActionFailed { code, text });
            }
        }
    }

    fn execute(
        &mut self,
        a: ReceiverAction,
        conn: Option<&mut Conn>,
        cfg: &Config,
        out: &dyn Output,
    ) -> Result<(), (ErrorCode, String)> {
        let storage = |e: store::StoreError| (ErrorCode::Storage, e.to_string());
        match a {
            ReceiverAction::Send(f) => {
                if f.msg_type() == MsgType::HelloReply as u8 {
                    self.note_hello_reply(&f);
                }
                if let Some(c) = conn {
                    // A lost link is reported by the reader; the receiver keeps its state.
                    let _ = c.send(&f);
                }
            }
            ReceiverAction::Marker(line) => out.marker(&line),
            ReceiverAction::Log(line) => out.log(&line),
            ReceiverAction::OpenStaging {
                image_id,
                total_size,
                fresh,
            } => {
                self.staging_consumed = false;
                if !fresh
                    && self.staging_image == Some(image_id)
                    && self.staging.as_ref().is_some_and(|s| s.is_at_path())
                {
                    // The same transfer continues on a new connection: keep the open file
                    // and the segment hash in progress.
                    return Ok(());
                }
                self.close_staging();
                self.stream = None;
                let direct = self.direct_device(cfg);
                let path = direct.clone().unwrap_or_else(|| self.state.staging_path());
                let s = if fresh {
                    // Nothing may claim the old content once it is gone.
                    self.durable_barrier();
                    self.counters = None;
                    // Say where the transfer lives before anything is written there.
                    self.state
                        .set_staging_location(direct.as_deref())
                        .map_err(storage)?;
                    if direct.is_some() {
                        // The file of an earlier transfer is of no use any more.
                        let _ = store::remove_if_exists(&self.state.staging_path());
                    }
                    let t = Instant::now();
                    let s = Staging::create(&path, total_size).map_err(storage)?;
                    if s.is_device() {
                        out.log(&format!(
                            "flashd: streaming straight into {} ({} bytes zeroed in {} ms)",
                            path.display(),
                            total_size,
                            t.elapsed().as_millis()
                        ));
                    }
                    s
                } else if self.state.staging_location() != path {
                    // The transfer lives elsewhere (flashd restarted with another --direct
                    // or another target): start over.
                    self.forget_transfer();
                    return Err((
                        ErrorCode::Storage,
                        format!(
                            "the interrupted transfer is not in {}; it starts over: run the same command again",
                            path.display()
                        ),
                    ));
                } else {
                    match Staging::open_existing(&path, total_size).map_err(storage)? {
                        Some(s) => s,
                        None => {
                            // Someone removed it under us: forget the transfer entirely (its
                            // verified flags describe bytes that are gone) and start over.
                            self.forget_transfer();
                            return Err((
                                ErrorCode::Storage,
                                format!(
                                    "staging file {} vanished; the transfer starts over: run the same command again",
                                    path.display()
                                ),
                            ));
                        }
                    }
                };
                let fh = Arc::new(s.file_handle().map_err(storage)?);
                // Direct: the hasher reads back from the disk right behind the writes.
                let readback = s.is_device();
                let hash_file = if readback {
                    crate::blockio::open_direct_read(&path)
                        .map(Arc::new)
                        .unwrap_or_else(|| fh.clone())
                } else {
                    fh.clone()
                };
                self.hasher.send(HashJob::SetFile {
                    file: Some(hash_file),
                    readback,
                });
                self.staging_file = Some(fh);
                self.staging = Some(s);
                self.staging_image = Some(image_id);
            }
            ReceiverAction::WriteHead(head) => {
                let s = self.staging_ref()?;
                s.write_at(0, &head).map_err(storage)?;
                let parsed = ImageHead::parse(&head)
                    .map_err(|e| (ErrorCode::BadImage, format!("image head: {e}")))?;
                let m = parsed.manifest;
                let keep = self.counters.as_ref().is_some_and(|c| c.matches(&m));
                if !keep {
                    self.counters = Some(Counters::new(&m));
                }
                if let Some(c) = &mut self.counters {
                    c.tries += 1;
                    c.host = self.last_host.clone();
                }
                self.manifest = Some(m);
            }
            ReceiverAction::Write {
                seq: _,
                offset,
                len,
                body,
            } => self.write_chunk(offset, len, body, cfg)?,
            ReceiverAction::SyncStaging { upto_seq } => {
                // No open file: it was handed to the install queued before this job.
                let file = self.staging_file.clone();
                self.outstanding += 1;
                self.durable.send(DurableJob::Sync { file, upto_seq });
            }
            ReceiverAction::PersistJournal(j) => {
                self.plan_chunk = Some(j.chunk_size);
                if self.staging_consumed {
                    // A late sync answer after the install: there is no staging file any
                    // more, and a journal would describe nothing.
                    return Ok(());
                }
                let counters = self.counters.clone().map(Box::new);
                self.durable
                    .send(DurableJob::Journal(Box::new(j), counters));
            }
            ReceiverAction::ClearJournal => self.durable.send(DurableJob::ClearJournal),
            ReceiverAction::VerifySegment {
                ticket,
                segment,
                name: _,
                offset,
                size,
                sha256,
            } => {
                let streamed = match self.stream {
                    Some(t) if t.segment == segment && t.next <= offset + size => {
                        self.stream = None;
                        true
                    }
                    _ => {
                        // A segment without data is all zeros: hash that without reading.
                        let no_data = self
                            .manifest
                            .as_ref()
                            .and_then(|m| m.segments.get(segment))
                            .is_some_and(|s| s.data_ranges.is_empty());
                        if no_data {
                            let data = self.data_ranges(segment);
                            self.hasher.send(HashJob::Begin {
                                segment,
                                offset,
                                data,
                            });
                        }
                        no_data
                    }
                };
                // Read-back mode: only the data ranges are hashed, against `data_sha256`
                // (every other byte was zeroed by flashd and checked zero when written).
                let data = self.data_ranges(segment);
                let sha256 = match (&data, &self.manifest) {
                    (Some(_), Some(m)) => m.segments.get(segment).map_or(sha256, |s| s.data_sha256),
                    _ => sha256,
                };
                self.outstanding += 1;
                self.hasher.send(HashJob::Verify {
                    ticket,
                    segment,
                    offset,
                    size,
                    sha256,
                    streamed,
                    data,
                });
            }
            ReceiverAction::Install {
                image_id,
                image_sha256: _,
                total_size,
                unchanged,
            } => {
                if !unchanged {
                    // Nothing may write to the staging file once it becomes the install.
                    self.close_staging();
                }
                let (target, target_error) = match resolve_target(&cfg.install) {
                    Ok(t) => {
                        self.install_target = describe_target(&cfg.install, &t);
                        if let InstallSpec::Slot { chosen, .. } = &cfg.install {
                            if let Some((slot, dev)) = chosen.lock().ok().and_then(|c| c.clone()) {
                                out.marker(&crate::slots::target_marker(slot, &dev));
                            }
                        }
                        (Some(t), None)
                    }
                    Err(e) => (None, Some(e)),
                };
                self.installing_unchanged = Some(unchanged);
                self.outstanding += 1;
                self.durable.send(DurableJob::Install {
                    staging: self.state.staging_location(),
                    image_id,
                    total_size,
                    target,
                    target_error,
                    unchanged,
                });
            }
        }
        Ok(())
    }

    /// The block device a new transfer streams into (`--direct` and a block-device target),
    /// or `None` for the staging file.
    fn direct_device(&self, cfg: &Config) -> Option<PathBuf> {
        if !cfg.direct {
            return None;
        }
        match resolve_target(&cfg.install) {
            Ok(InstallTarget::Block(dev)) => Some(dev),
            _ => None,
        }
    }

    /// In read-back mode (direct transfer into a device), the data ranges of `segment`: the
    /// hasher then hashes only those, against the manifest's `data_sha256`.
    fn data_ranges(&self, segment: usize) -> Option<Arc<[proto::manifest::DataRange]>> {
        if !self.staging.as_ref().is_some_and(|s| s.is_device()) {
            return None;
        }
        let seg = self.manifest.as_ref()?.segments.get(segment)?;
        Some(Arc::from(seg.data_ranges.as_slice()))
    }

    fn staging_ref(&self) -> Result<&Staging, (ErrorCode, String)> {
        self.staging
            .as_ref()
            .ok_or((ErrorCode::Storage, "no staging file is open".to_string()))
    }

    /// Drop every trace of the transfer in staging: a new receiver (same install record), no
    /// journal.
    fn forget_transfer(&mut self) {
        let installed = self.rx.installed().cloned();
        self.rx = Receiver::new(self.rcfg.clone(), None, installed);
        self.durable.send(DurableJob::ClearJournal);
        self.counters = None;
        self.manifest = None;
        self.stream = None;
    }

    fn close_staging(&mut self) {
        self.staging_image = None;
        self.staging = None;
        self.staging_file = None;
        self.hasher.send(HashJob::SetFile {
            file: None,
            readback: false,
        });
    }

    /// Wait until every queued durability job ran.
    fn durable_barrier(&mut self) {
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        self.durable.send(DurableJob::Run(Box::new(move |_| {
            let _ = tx.send(());
            Ok(())
        })));
        let _ = rx.recv();
    }

    fn note_hello_reply(&mut self, f: &Frame) {
        if let Ok(Message::HelloReply(r)) = Message::from_frame(f) {
            if r.resumed {
                if let Some(c) = &mut self.counters {
                    c.resume_count += 1;
                }
            }
        }
    }

    /// Decode one planned chunk, write it to staging and feed the hasher.
    fn write_chunk(
        &mut self,
        offset: u64,
        len: u32,
        body: WriteBody,
        cfg: &Config,
    ) -> Result<(), (ErrorCode, String)> {
        let storage = |e: store::StoreError| (ErrorCode::Storage, e.to_string());
        let (seg_index, seg_offset, first_data) = {
            let m = self.manifest.as_ref().ok_or((
                ErrorCode::Storage,
                "WRITE before the image head".to_string(),
            ))?;
            let i = m
                .segments
                .iter()
                .position(|s| s.offset <= offset && offset < s.end())
                .ok_or((
                    ErrorCode::BadWrite,
                    format!("offset {offset} is in no segment"),
                ))?;
            let s = &m.segments[i];
            (i, s.offset, s.data_ranges.first().map(|r| r.offset))
        };
        let (data, kind): (Option<Bytes>, Kind) = match body {
            WriteBody::Raw(d) => (Some(d), Kind::Raw),
            WriteBody::Zstd(z) => {
                let wire = z.len() as u64;
                let d = self.decompress(&z, len)?;
                (Some(d), Kind::Zstd { wire })
            }
            WriteBody::Zero => (None, Kind::Zero),
            WriteBody::Copy { src_offset, hash } => {
                let d = self.copy_from_installed(src_offset, len, hash, cfg)?;
                (Some(d), Kind::Copy)
            }
        };
        let s = self.staging_ref()?;
        if let (Some(d), true) = (&data, s.is_device()) {
            // Read-back mode verifies only the data ranges: every byte written outside them
            // must be zero, as the manifest says.
            let seg = self
                .manifest
                .as_ref()
                .and_then(|m| m.segments.get(seg_index));
            if let Some(seg) = seg {
                if let Some(at) = nonzero_outside(&seg.data_ranges, offset - seg_offset, d) {
                    return Err((
                        ErrorCode::BadWrite,
                        format!(
                            "WRITE at {offset} has data at {} where segment {:?} is all zeros",
                            seg_offset + at,
                            seg.name
                        ),
                    ));
                }
            }
        }
        match &data {
            Some(d) => s.write_at(offset, d).map_err(storage)?,
            None => s.write_zeros(offset, u64::from(len)).map_err(storage)?,
        }
        // Receipt counters.
        if let Some(c) = self
            .counters
            .as_mut()
            .and_then(|c| c.segment_mut(seg_index))
        {
            let n = u64::from(len);
            match kind {
                Kind::Raw => c.sent_bytes += n,
                Kind::Zstd { wire } => {
                    c.sent_bytes += n;
                    c.compressed_bytes += n.saturating_sub(wire);
                }
                Kind::Zero => c.zero_bytes += n,
                Kind::Copy => c.skipped_bytes += n,
            }
        }
        // Streamed hashing: continue the segment's hash if this write follows the last one.
        let end = offset + u64::from(len);
        let cont = matches!(self.stream, Some(t) if t.segment == seg_index && offset >= t.next);
        let starts = first_data == Some(offset - seg_offset);
        let from = if cont {
            self.stream.map(|t| t.next)
        } else if starts {
            let data = self.data_ranges(seg_index);
            self.hasher.send(HashJob::Begin {
                segment: seg_index,
                offset: seg_offset,
                data,
            });
            Some(seg_offset)
        } else {
            None
        };
        match from {
            Some(from) => {
                if offset > from {
                    self.hasher.send(HashJob::Zeros(offset - from));
                }
                let readback = self.staging.as_ref().is_some_and(|s| s.is_device());
                match data {
                    // Direct: the bytes are on the device now; the hasher reads them back.
                    Some(d) if readback => self.hasher.send(HashJob::Written(d.len() as u64)),
                    Some(d) => self.hasher.send(HashJob::Data(d)),
                    None => self.hasher.send(HashJob::Zeros(u64::from(len))),
                }
                self.stream = Some(StreamTrack {
                    segment: seg_index,
                    next: end,
                });
            }
            None => {
                if self.stream.is_some_and(|t| t.segment == seg_index) {
                    self.stream = None;
                }
            }
        }
        Ok(())
    }

    fn decompress(&mut self, z: &[u8], len: u32) -> Result<Bytes, (ErrorCode, String)> {
        if self.zstd.is_none() {
            self.zstd = Some(zstd::bulk::Decompressor::new().map_err(|e| {
                (
                    ErrorCode::Storage,
                    format!("cannot create a zstd decoder: {e}"),
                )
            })?);
        }
        let dec = self
            .zstd
            .as_mut()
            .ok_or((ErrorCode::Storage, "no zstd decoder".to_string()))?;
        // The output buffer is exactly `len` bytes: a frame that decodes to more is refused.
        let mut out: Vec<u8> = Vec::with_capacity(len as usize);
        let n = dec.decompress_to_buffer(z, &mut out).map_err(|e| {
            (
                ErrorCode::BadWrite,
                format!("zstd data does not decode to {len} bytes: {e}"),
            )
        })?;
        if n != len as usize || out.len() != len as usize {
            return Err((
                ErrorCode::BadWrite,
                format!("zstd data decodes to {n} bytes, the WRITE says {len}"),
            ));
        }
        Ok(Bytes::from(out))
    }

    fn copy_from_installed(
        &mut self,
        src_offset: u64,
        len: u32,
        hash: msg::ChunkHash,
        cfg: &Config,
    ) -> Result<Bytes, (ErrorCode, String)> {
        let target = resolve_target(&cfg.install).map_err(|e| (ErrorCode::Storage, e))?;
        let path = target.path().to_path_buf();
        let mut buf = vec![0u8; len as usize];
        File::open(&path)
            .and_then(|f| f.read_exact_at(&mut buf, src_offset))
            .map_err(|e| {
                (
                    ErrorCode::Storage,
                    format!("COPY from the installed image {}: {e}", path.display()),
                )
            })?;
        if msg::chunk_hash(&buf) != hash {
            // The installed image is not what its index says: stop offering it.
            if let Some(mut inst) = self.rx.installed().cloned() {
                inst.index = None;
                self.rx.set_installed(Some(inst.clone()));
                let target = self.install_target.clone();
                self.durable.send(DurableJob::Run(Box::new(move |st| {
                    records::save_installed(st, &inst, &target).map_err(|e| e.to_string())
                })));
            }
            return Err((
                ErrorCode::Storage,
                format!(
                    "COPY source at {src_offset}+{len} in {} does not hold the expected bytes; \
                     skip index dropped, run the same command again",
                    path.display()
                ),
            ));
        }
        Ok(Bytes::from(buf))
    }

    /// Records after an install attempt: install record, receipt, then the skip index.
    fn after_install(&mut self, ok: bool, cfg: &Config, out: &dyn Output) {
        let unchanged = self.installing_unchanged.take().unwrap_or(false);
        let m = if unchanged {
            self.hello_manifest.clone()
        } else {
            self.manifest.clone()
        };
        let Some(m) = m else { return };
        if ok {
            activate_slot(&cfg.install, m.version.clone(), |l| {
                nx_guest::marker::emit(l)
            });
        }
        let state_word = match (ok, unchanged) {
            (false, _) => "failed",
            (true, true) => "unchanged",
            (true, false) => "installed",
        };
        let counters = match &self.counters {
            Some(c) if !unchanged && c.matches(&m) => c.clone(),
            _ => {
                let mut c = Counters::new(&m);
                for (s, seg) in c.segments.iter_mut().zip(&m.segments) {
                    s.skipped_bytes = seg.data_bytes();
                }
                c.host = self.last_host.clone();
                c.tries = 1;
                c
            }
        };
        let receipt = counters.receipt(&m, &cfg.device, &self.install_target, state_word);
        let target = self.install_target.clone();
        let installed = if ok {
            self.rx.installed().cloned()
        } else {
            None
        };
        let need_index = installed.as_ref().is_some_and(|i| i.index.is_none());
        self.durable.send(DurableJob::Run(Box::new(move |st| {
            if let Some(i) = &installed {
                records::save_installed(st, i, &target).map_err(|e| e.to_string())?;
            }
            records::save_receipt(st, &receipt).map_err(|e| e.to_string())
        })));
        if ok && !unchanged {
            self.counters = None;
            self.manifest = None;
            self.staging_consumed = true;
        }
        // A direct transfer of another image overwrites this one in place, so nothing is ever
        // copied from it (see `forget_overwritten_install`): its index would be hashed for
        // nothing, on the vCPU the next transfer needs.
        if need_index && self.direct_device(cfg).is_none() {
            self.build_index_in_background(&m, cfg, out);
        }
    }

    fn build_index_in_background(&mut self, m: &Manifest, cfg: &Config, out: &dyn Output) {
        let chunk = self.plan_chunk.unwrap_or(256 * 1024);
        let Ok(plan) = Plan::new(m, chunk) else {
            return;
        };
        let Ok(target) = resolve_target(&cfg.install) else {
            return;
        };
        let path = target.path().to_path_buf();
        let m = m.clone();
        let tx = self.results_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("flashd-index".into())
            .spawn(move || {
                // Low priority: the index only speeds up the next transfer.
                let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
                let ix = build_index(&m, &plan, &path).map(Box::new);
                let _ = tx.send(WorkResult::Index(ix));
            });
        match spawned {
            Ok(_) => self.outstanding += 1,
            Err(e) => out.log(&format!("flashd: cannot build the skip index: {e}")),
        }
    }
}

fn build_index(m: &Manifest, plan: &Plan, path: &PathBuf) -> Option<SkipIndex> {
    let f = File::open(path).ok()?;
    SkipIndex::build(m, plan, |off, len| {
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, off).map(|()| b)
    })
    .ok()
}

fn describe_target(spec: &InstallSpec, t: &InstallTarget) -> String {
    match spec {
        InstallSpec::Path(p) => p.display().to_string(),
        InstallSpec::Partition { name, .. } => {
            format!("partition {name} ({})", t.path().display())
        }
        InstallSpec::Slot { chosen, .. } => {
            match chosen.lock().ok().and_then(|c| c.as_ref().map(|(s, _)| *s)) {
                Some(slot) => format!("slot {slot} ({})", t.path().display()),
                None => t.path().display().to_string(),
            }
        }
    }
}

/// Slot mode, after a verified install: `slotImaged` + `setActive(trial)` + rebootd
/// `mode normal`, on a thread of its own so the DONE reply reaches the host before rebootd
/// reboots the guest. The slot choice is cleared once a slot was activated.
fn activate_slot(spec: &InstallSpec, version: String, out_marker: impl Fn(&str) + Send + 'static) {
    let InstallSpec::Slot { env, chosen } = spec else {
        return;
    };
    let Some((slot, _)) = chosen.lock().ok().and_then(|c| c.clone()) else {
        out_marker("flashd: error 0 slot install: no slot was chosen; nothing activated");
        return;
    };
    let env = env.clone();
    let chosen = std::sync::Arc::clone(chosen);
    let spawned = std::thread::Builder::new()
        .name("flashd-activate".into())
        .spawn(move || match crate::slots::after_install_in(&env, slot, &version) {
            Ok(a) => {
                if let Ok(mut c) = chosen.lock() {
                    *c = None;
                }
                out_marker(&crate::slots::activated_marker(&a));
            }
            Err(e) => out_marker(&format!(
                "flashd: error 0 slot {slot} installed but not activated: {e} (the previous slot stays active)"
            )),
        });
    if let Err(e) = spawned {
        eprintln!("flashd (log): cannot start the slot activation thread: {e}");
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Raw,
    Zstd { wire: u64 },
    Zero,
    Copy,
}

#[cfg(test)]
mod tests {
    use super::nonzero_outside;
    use proto::manifest::DataRange;

    #[test]
    fn nonzero_bytes_outside_the_data_ranges_are_found() {
        let r = |offset, len| DataRange { offset, len };
        let ranges = [r(4096, 4096), r(16384, 100)];
        let mut d = vec![0u8; 20000];
        // Data inside the ranges is fine.
        d[4096] = 1;
        d[8191] = 1;
        d[16384 + 99] = 1;
        assert_eq!(nonzero_outside(&ranges, 0, &d), None);
        // Just before, just after, and past the last range.
        for at in [4095usize, 8192, 16484, 19999, 0] {
            let mut e = d.clone();
            e[at] = 7;
            assert_eq!(nonzero_outside(&ranges, 0, &e), Some(at as u64), "at {at}");
        }
        // A write that starts inside a range and at an offset.
        let part = &d[6000..9000];
        assert_eq!(nonzero_outside(&ranges, 6000, part), None);
        let mut e = part.to_vec();
        e[2500] = 1; // absolute 8500: outside
        assert_eq!(nonzero_outside(&ranges, 6000, &e), Some(8500));
        // No ranges: everything must be zero.
        assert_eq!(nonzero_outside(&[], 0, &[0, 0, 1]), Some(2));
        assert_eq!(nonzero_outside(&[], 10, &[]), None);
    }
}
