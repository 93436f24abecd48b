//! The I/O shell around [`proto::session::Sender`]: connect, run the session over the link,
//! read and compress chunks in the background, check the image locally while sending, and
//! reconnect (the target's HELLO_REPLY says where to continue) when the link drops.
//!
//! Memory is bounded by the sender's window: at most `(window + read_ahead)` chunks are
//! buffered, plus the frames queued to the writer; the image is never read whole.

use crate::event::{EngineEvent, ProgressSink};
use crate::image_file::{CheckError, CheckState, ImageFile, LocalCheck, SharedCheck};
use crate::receipt::{Receipt, ReceiptBuilder};
use crate::transport::{self, Link, PortSpec, TransportError};
use bytes::{Buf, Bytes};
use futures::StreamExt;
use proto::frame::codec::{FrameCodec, Incoming};
use proto::frame::Frame;
use proto::msg::{ChunkHash, DoneStatus, ErrorCode, MsgType, WriteBody};
use proto::receipt::InstallState;
use proto::session::{
    CompressMode, Outcome, ProgressEvent, Sender, SenderAction, SenderConfig, SenderEvent,
    SessionError, SkipKind,
};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_util::codec::FramedRead;

/// zstd level used for chunks (fast; the link, not the ratio, is what we optimise).
pub const ZSTD_LEVEL: i32 = 1;
/// After a chunk that did not compress, this many chunks of the same segment are sent raw
/// before compression is tried again (`--compress auto`).
const COMPRESS_BACKOFF: u32 = 32;
/// Base PATCH attempts in a row that found next to nothing in the base (an image that
/// shares nothing with the one being sent) before the base is only probed...
const BASE_MISSES: u32 = 8;
/// ...on every this many chunks, until a probe finds the base again.
const BASE_PROBE: u32 = 8;
/// Frames queued to the writer task (a bounded channel: when the link is slower than the
/// session, the session loop waits here instead of queueing more).
pub const WRITER_QUEUE: usize = 8;
/// Most frames read ahead from the target while the writer queue is full (then reading
/// waits too).
const MAX_INBOX: usize = 4096;

/// Settings of a transfer (`nx flash send`).
#[derive(Debug, Clone)]
pub struct SendOptions {
    pub host: String,
    pub window: u16,
    pub chunk_size: u32,
    pub compress: CompressMode,
    pub skip: bool,
    /// `--allow-downgrade`: ask the target to install below its anti-rollback floor.
    pub allow_downgrade: bool,
    /// `chunk_size` was given explicitly (`--chunk`): the target must not replace it.
    pub exact_chunk: bool,
    /// Retransmission timeout of the session (the ceiling when `adaptive_rto`).
    pub rto: Duration,
    /// Measure the round trip and time out after a few of them (see
    /// [`proto::session::SenderConfig::adaptive_rto`]); `false` = always `rto`.
    pub adaptive_rto: bool,
    /// Timeouts in a row before a session gives up.
    pub max_timeouts: u32,
    /// Largest frame payload (see [`proto::session::SenderConfig::max_frame`]); `None`
    /// picks by port: [`nx_contract::defaults::SERIAL_FRAME`] on `serial:` ports, whole
    /// chunks elsewhere.
    pub max_frame: Option<u32>,
    /// Connections tried in a row without progress before giving up.
    pub attempts: u32,
    /// Wait before reconnecting: this × the number of failures in a row (max 20×).
    pub backoff: Duration,
    /// Images the host can patch from (see [`crate::delta`]).
    pub bases: crate::delta::Bases,
}

impl SendOptions {
    pub fn new(host: impl Into<String>) -> SendOptions {
        SendOptions {
            host: host.into(),
            window: nx_contract::defaults::WINDOW,
            chunk_size: nx_contract::defaults::CHUNK,
            compress: CompressMode::Auto,
            skip: true,
            allow_downgrade: false,
            exact_chunk: false,
            rto: Duration::from_secs(2),
            adaptive_rto: true,
            max_timeouts: 10,
            max_frame: None,
            attempts: 10,
            backoff: Duration::from_millis(100),
            bases: crate::delta::Bases::none(),
        }
    }
}

/// Why a transfer failed; each maps to a documented exit code of `nx flash send`.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The image file is invalid (bad head, truncated, a segment does not hash).
    #[error("{0}")]
    ImageInvalid(String),
    /// The target refused the image or failed to verify/install it.
    #[error("the target refused: error {code}: {text}")]
    Refused { code: ErrorCode, text: String },
    /// The target could not be reached at all.
    #[error("{0}")]
    Unreachable(String),
    /// The link could not be re-established or kept timing out.
    #[error("{0}")]
    LinkLost(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
    /// Anything else on this side (I/O, threads).
    #[error(transparent)]
    Local(#[from] LocalError),
}

/// A failure on the host's side of a transfer.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The local check of the image could not run.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// The session failed on this side (reading the image, a bad configuration).
    #[error(transparent)]
    Session(SessionError),
}

/// Accumulated skip figures of a transfer (every session of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skips {
    /// Bytes of zeros the target did not need (sparse).
    pub zero: u64,
    /// Bytes the target already held.
    pub identical: u64,
    /// Bytes saved by compression.
    pub compressed: u64,
    /// Bytes saved by patching against the target's base image.
    pub patched: u64,
    /// Bytes the target computed itself (the dm-verity hash tree).
    pub derived: u64,
}

/// A successful transfer.
#[derive(Debug, Clone)]
pub struct SendReport {
    pub outcome: Outcome,
    pub receipt: Receipt,
    pub elapsed: Duration,
    /// The first "resumed at" offset reported by the target, if any.
    pub resumed_at: Option<u64>,
    pub skips: Skips,
    pub device: String,
    /// What the session loop held at most, counted (any session of this run).
    pub peaks: BufferPeaks,
}

/// The most the session loop held at once: the memory bound of `nx flash send`, counted
/// (tests check it against window, read-ahead and [`WRITER_QUEUE`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BufferPeaks {
    /// Chunks being read or compressed on blocking threads, plus chunks held back for the
    /// local check: at most the sender's window + read-ahead.
    pub chunks: usize,
    /// Encoded bytes of frames handed to the writer task and not written yet: at most
    /// `WRITER_QUEUE + 2` frames (the channel, the one being written, the one being queued).
    pub writer_bytes: u64,
}

/// A pending connection attempt.
pub type Connecting<'a> =
    Pin<Box<dyn Future<Output = Result<Box<dyn Link>, TransportError>> + Send + 'a>>;

/// Opens links to the target (a `--port` spec, or anything tests plug in).
pub trait Connector: Send {
    fn connect(&mut self) -> Connecting<'_>;
    fn describe(&self) -> String;
}

impl Connector for PortSpec {
    fn connect(&mut self) -> Connecting<'_> {
        Box::pin(transport::connect_to(self, transport::Daemon::Flashd))
    }
    fn describe(&self) -> String {
        self.to_string()
    }
}

/// `1 attempt`, `3 attempts`.
fn attempts(n: u32) -> String {
    if n == 1 {
        "1 attempt".to_string()
    } else {
        format!("{n} attempts")
    }
}

/// The Ctrl-C flag: a watch that turns `true` once.
pub fn interrupt_flag() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = tx.send(true);
        }
    });
    rx
}

/// Resolves when the interrupt flag turns true (never, if its sender is gone).
async fn interrupted(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// A failed transfer: why, and the receipt of what was done (`state: failed`).
#[derive(Debug)]
pub struct SendFailure {
    pub error: SendError,
    pub receipt: Box<Receipt>,
    pub elapsed: Duration,
}

/// Send `img` to the target behind `connector`, reconnecting and resuming until it is
/// installed, the target refuses, the image is found invalid, `attempts` connections in a
/// row make no progress, or `interrupt` turns true.
pub async fn send_image(
    img: Arc<ImageFile>,
    connector: &mut dyn Connector,
    opts: &SendOptions,
    r: &mut dyn ProgressSink,
    interrupt: watch::Receiver<bool>,
) -> Result<SendReport, SendError> {
    send_image_with(img, &SharedCheck::new(), connector, opts, r, interrupt)
        .await
        .map_err(|f| f.error)
}

/// [`send_image`] with a local check shared with other transfers of the same image (the file
/// is hashed once for all targets); a failure keeps the receipt of what was done.
pub async fn send_image_with(
    img: Arc<ImageFile>,
    check: &SharedCheck,
    connector: &mut dyn Connector,
    opts: &SendOptions,
    r: &mut dyn ProgressSink,
    interrupt: watch::Receiver<bool>,
) -> Result<SendReport, SendFailure> {
    let started = Instant::now();
    let port = connector.describe();
    let mut ctx = Ctx {
        img: img.clone(),
        shared_check: check.clone(),
        check: None,
        receipt: ReceiptBuilder::new(img.manifest(), &opts.host, &port),
        resumed_at: None,
        device: String::new(),
        done_sent: false,
        peaks: BufferPeaks::default(),
        skips: Skips::default(),
        serial: matches!(port.parse::<PortSpec>(), Ok(PortSpec::Serial { .. })),
    };
    match send_loop(&mut ctx, connector, opts, r, interrupt, started).await {
        Ok(rep) => Ok(rep),
        Err(error) => Err(SendFailure {
            error,
            receipt: Box::new(ctx.receipt.finish(InstallState::Failed)),
            elapsed: started.elapsed(),
        }),
    }
}

async fn send_loop(
    ctx: &mut Ctx,
    connector: &mut dyn Connector,
    opts: &SendOptions,
    r: &mut dyn ProgressSink,
    mut interrupt: watch::Receiver<bool>,
    started: Instant,
) -> Result<SendReport, SendError> {
    let img = ctx.img.clone();
    let port = connector.describe();
    let mut failures = 0u32;
    let mut attempt = 0u32;
    let mut verify_retried = false;
    loop {
        attempt += 1;
        r.event(&EngineEvent::Connecting {
            port: port.clone(),
            attempt,
        });
        let link = tokio::select! {
            biased;
            _ = interrupted(&mut interrupt) => return Err(SendError::Interrupted),
            l = connector.connect() => l,
        };
        let link = match link {
            Ok(l) => l,
            Err(e) => {
                failures += 1;
                let e = crate::error_chain(&e);
                if attempt == 1 {
                    return Err(SendError::Unreachable(e));
                }
                if failures >= opts.attempts {
                    return Err(SendError::LinkLost(format!(
                        "{e} (gave up after {})",
                        attempts(failures)
                    )));
                }
                backoff(r, &e, failures, opts, &mut interrupt).await?;
                continue;
            }
        };
        ctx.receipt.try_started();
        let mut cfg = SenderConfig::new(opts.host.clone());
        cfg.nonce = random_nonce();
        cfg.window = opts.window;
        cfg.chunk_size = opts.chunk_size;
        cfg.compress = opts.compress;
        cfg.skip = opts.skip;
        cfg.allow_downgrade = opts.allow_downgrade;
        cfg.exact_chunk = opts.exact_chunk;
        cfg.rto = opts.rto;
        cfg.adaptive_rto = opts.adaptive_rto;
        cfg.max_retries = opts.max_timeouts;
        cfg.max_frame = opts
            .max_frame
            .or_else(|| ctx.serial.then_some(nx_contract::defaults::SERIAL_FRAME));
        cfg.bases = opts.bases.ids();
        let sender = Sender::new(cfg, img.head()).map_err(|e| match e {
            SessionError::BadImage(e) => {
                SendError::ImageInvalid(format!("image {} is invalid: {e}", img.path().display()))
            }
            other => SendError::Local(LocalError::Session(other)),
        })?;
        let done_before = ctx.done_sent;
        match run_session(link, sender, ctx, opts, r, &mut interrupt).await {
            Ok(outcome) => {
                // "Unchanged" after our own DONE of an earlier session (its reply was lost):
                // this run installed it.
                let state = match outcome.status {
                    DoneStatus::Unchanged if !done_before => InstallState::Unchanged,
                    _ => InstallState::Installed,
                };
                r.event(&EngineEvent::Finished);
                return Ok(SendReport {
                    outcome,
                    receipt: ctx.receipt.finish(state),
                    elapsed: started.elapsed(),
                    resumed_at: ctx.resumed_at,
                    skips: ctx.skips,
                    device: ctx.device.clone(),
                    peaks: ctx.peaks,
                });
            }
            Err(End::Fatal(SendError::Refused {
                code: ErrorCode::VerifyFailed,
                text,
            })) if !verify_retried && ctx.skips.patched + ctx.skips.identical > 0 => {
                // Bytes the target was to take from what it holds did not verify: it dropped
                // that base (and skip index), so one more session sends real data.
                verify_retried = true;
                failures += 1;
                let why = format!(
                    "the target reported: {text} (bytes taken from its own image did not verify; sending real data)"
                );
                backoff(r, &why, failures, opts, &mut interrupt).await?;
            }
            Err(End::Fatal(e)) => {
                r.event(&EngineEvent::Finished);
                return Err(e);
            }
            Err(End::Retry { why, progressed }) => {
                if progressed {
                    failures = 0;
                }
                failures += 1;
                if failures >= opts.attempts {
                    r.event(&EngineEvent::Finished);
                    return Err(SendError::LinkLost(format!(
                        "{why} (gave up after {} without progress)",
                        attempts(failures)
                    )));
                }
                backoff(r, &why, failures, opts, &mut interrupt).await?;
            }
        }
    }
}

async fn backoff(
    r: &mut dyn ProgressSink,
    why: &str,
    failures: u32,
    opts: &SendOptions,
    interrupt: &mut watch::Receiver<bool>,
) -> Result<(), SendError> {
    let max = opts.attempts;
    let delay = opts.backoff * failures.min(20);
    r.event(&EngineEvent::Reconnect {
        error: why.to_string(),
        attempt: failures,
        max,
        delay,
    });
    tokio::select! {
        biased;
        _ = interrupted(interrupt) => Err(SendError::Interrupted),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}

fn random_nonce() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        return t ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

/// State that lives across connections.
struct Ctx {
    img: Arc<ImageFile>,
    /// Where the local check is started (or found, when another target started it).
    shared_check: SharedCheck,
    check: Option<LocalCheck>,
    receipt: ReceiptBuilder,
    resumed_at: Option<u64>,
    device: String,
    /// A DONE went out in some session of this run.
    done_sent: bool,
    peaks: BufferPeaks,
    skips: Skips,
    /// The port is a `serial:` line (small frames from the start).
    serial: bool,
}

enum End {
    Fatal(SendError),
    Retry { why: String, progressed: bool },
}

/// Results of background jobs.
enum JobResult {
    Read {
        seq: u32,
        data: Bytes,
        hash: Option<ChunkHash>,
    },
    ReadFailed {
        seq: u32,
        detail: String,
    },
    Compressed {
        seq: u32,
        body: Option<WriteBody>,
    },
}

/// Adaptive compression (`auto`): compress only while it pays, and only while the link is
/// the bottleneck (frames are waiting for the writer). Patching against a base is tried for
/// every chunk, unless [`BASE_MISSES`] attempts in a row found nothing there: then only
/// every [`BASE_PROBE`]th chunk probes it (each attempt indexes up to 9 MiB of base, which
/// against an unrelated image made a dense send four times slower).
#[derive(Default)]
struct CompressGate {
    mode: CompressMode,
    segment: Option<usize>,
    skip_until: u32,
    /// Chunks tried against the base whose result is still due.
    based: std::collections::HashSet<u32>,
    /// Base attempts in a row that found nothing.
    base_misses: u32,
}

impl CompressGate {
    fn should_try(&mut self, seq: u32, segment: usize, writer_backlog: u64, chunk: u64) -> bool {
        if self.mode == CompressMode::Zstd {
            return true;
        }
        if self.segment != Some(segment) {
            self.segment = Some(segment);
            self.skip_until = 0;
        }
        if seq < self.skip_until {
            return false;
        }
        // The link keeps up with raw data: compressing would only add latency.
        writer_backlog >= 2 * chunk
    }

    fn result(&mut self, seq: u32, raw: usize, compressed: Option<usize>) {
        let worth = compressed.is_some_and(|c| c <= raw - raw / 16);
        if !worth && self.mode != CompressMode::Zstd {
            self.skip_until = seq + COMPRESS_BACKOFF;
        }
    }

    /// Try the base for chunk `seq`?
    fn base_ok(&mut self, seq: u32) -> bool {
        let ok = self.base_misses < BASE_MISSES || seq.is_multiple_of(BASE_PROBE);
        if ok {
            self.based.insert(seq);
        }
        ok
    }

    /// What a chunk tried against the base came to: a patch from the base that at least
    /// halved it is a hit.
    fn base_result(&mut self, seq: u32, raw: usize, body: Option<&WriteBody>) {
        if !self.based.remove(&seq) {
            return;
        }
        let hit = matches!(body, Some(b @ WriteBody::Patch { source: proto::msg::PatchSource::Base, .. })
            if b.wire_len() <= raw / 2);
        self.base_misses = if hit {
            0
        } else {
            self.base_misses.saturating_add(1)
        };
    }
}

async fn run_session(
    link: Box<dyn Link>,
    mut sender: Sender,
    ctx: &mut Ctx,
    opts: &SendOptions,
    r: &mut dyn ProgressSink,
    interrupt: &mut watch::Receiver<bool>,
) -> Result<Outcome, End> {
    let t0 = Instant::now();
    let (rd, mut wr) = tokio::io::split(link);
    // The target only sends small control frames here: a corrupted length must not
    // stall the stream (FrameDecoder::eager).
    let mut frames = FramedRead::new(rd, FrameCodec::eager());
    let backlog = Arc::new(AtomicU64::new(0));
    let (wtx, mut wrx) = mpsc::channel::<Frame>(WRITER_QUEUE);
    let wbacklog = backlog.clone();
    // Bytes the link took so far (its measured rate picks the compression effort).
    let written = Arc::new(AtomicU64::new(0));
    // `written` when the last deadline passed (see the Tick/Draining choice below).
    let mut written_at_deadline = 0u64;
    // When the transfer began (the first chunk read) and what the link had taken by then:
    // the compression effort follows the link's rate from there, not from the connect (a
    // HELLO resent on a noisy line would make a fast link look slow).
    let mut xfer_t0: Option<(Instant, u64)> = None;
    let wwritten = written.clone();
    let mut writer = tokio::spawn(async move {
        while let Some(f) = wrx.recv().await {
            let n = f.encoded_len() as u64;
            // Header, payload and trailer in one vectored write: the payload is not copied.
            let mut b = Bytes::copy_from_slice(&f.header())
                .chain(f.payload().clone())
                .chain(Bytes::copy_from_slice(&f.trailer()));
            let r = wr.write_all_buf(&mut b).await;
            wbacklog.fetch_sub(n, Ordering::Relaxed);
            wwritten.fetch_add(n, Ordering::Relaxed);
            r?;
        }
        wr.flush().await?;
        wr.shutdown().await
    });
    // Unbounded, but never holds more than the jobs in flight: one per chunk the sender asked
    // for (at most window + read-ahead of them; counted in `jobs`).
    let (jtx, mut jrx) = mpsc::unbounded_channel::<JobResult>();
    let mut jobs = 0usize;
    let slots = Arc::new(CompressSlots::new());
    let mut gate = CompressGate {
        mode: opts.compress,
        ..CompressGate::default()
    };
    // The local check starts with the session, not with the first chunk read: a target that
    // already holds the image asks for no chunk, and its "unchanged" must not be taken as
    // success for a file whose bytes do not match its own manifest (the DONE is held until
    // the check passed; a failed check ends the transfer as an invalid image).
    if ctx.check.is_none() {
        match ctx.shared_check.get_or_start(&ctx.img) {
            Ok(c) => ctx.check = Some(c),
            Err(e) => return Err(End::Fatal(SendError::Local(e.into()))),
        }
    }
    let acked_at_start = sender.acked();
    let mut max_acked = 0u32;
    let mut held_reads: VecDeque<(u32, usize, Bytes, Option<ChunkHash>)> = VecDeque::new();
    let mut held_done: Option<Frame> = None;
    let mut check_rx: Option<watch::Receiver<CheckState>> =
        ctx.check.as_ref().map(LocalCheck::subscribe);
    let mut result: Option<Result<Outcome, End>> = None;
    let now = |t0: Instant| t0.elapsed();
    sender.start(now(t0));
    let mut writer_done = false;
    // Frames read while waiting for room in the writer queue (see below); `None` = the
    // stream ended.
    let mut inbox = VecDeque::new();

    loop {
        // 1. Execute every pending action, in order.
        while let Some(a) = sender.poll_action() {
            match a {
                SenderAction::Send(f) => {
                    ctx.receipt.frame_sent(ctx.img.manifest(), &f);
                    let check_pending = ctx.check.as_ref().is_some_and(|c| !c.state().done);
                    if f.msg_type() == MsgType::Done as u8 && check_pending {
                        // Nothing is installed from a file we have not fully checked.
                        held_done = Some(f);
                        continue;
                    }
                    if f.msg_type() == MsgType::Done as u8 {
                        ctx.done_sent = true;
                    }
                    // While the writer queue is full, keep reading what the target sends
                    // (its acknowledgements): a target blocked writing to us stops reading
                    // too, and the two would wait for each other.
                    let n = f.encoded_len() as u64;
                    let queued = backlog.fetch_add(n, Ordering::Relaxed) + n;
                    ctx.peaks.writer_bytes = ctx.peaks.writer_bytes.max(queued);
                    let queued_ok = loop {
                        let reading = inbox.len() < MAX_INBOX
                            && !inbox.back().is_some_and(|i: &Option<Result<Incoming, _>>| {
                                !matches!(i, Some(Ok(_)))
                            });
                        tokio::select! {
                            biased;
                            p = wtx.reserve() => break p.map(|permit| permit.send(f.clone())).is_ok(),
                            item = frames.next(), if reading => inbox.push_back(item),
                        }
                    };
                    if !queued_ok {
                        result = Some(Err(End::Retry {
                            why: "the link closed while sending".into(),
                            progressed: max_acked > acked_at_start,
                        }));
                        break;
                    }
                }
                SenderAction::ReadChunk {
                    seq,
                    offset,
                    len,
                    hash,
                } => {
                    xfer_t0
                        .get_or_insert_with(|| (Instant::now(), written.load(Ordering::Relaxed)));
                    if ctx.check.is_none() {
                        match ctx.shared_check.get_or_start(&ctx.img) {
                            Ok(c) => {
                                check_rx = Some(c.subscribe());
                                ctx.check = Some(c);
                            }
                            Err(e) => {
                                result = Some(Err(End::Fatal(SendError::Local(e.into()))));
                                break;
                            }
                        }
                    }
                    let img = ctx.img.clone();
                    let tx = jtx.clone();
                    jobs += 1;
                    note_chunks(ctx, jobs, held_reads.len());
                    tokio::task::spawn_blocking(move || {
                        let res = match img.read_at(offset, len) {
                            Ok(data) => {
                                let h = hash.then(|| proto::msg::chunk_hash(&data));
                                JobResult::Read { seq, data, hash: h }
                            }
                            Err(e) => JobResult::ReadFailed {
                                seq,
                                detail: format!("reading {}: {e}", img.path().display()),
                            },
                        };
                        let _ = tx.send(res);
                    });
                }
                SenderAction::Compress {
                    seq,
                    offset,
                    data,
                    base,
                    staging,
                } => {
                    let segment = sender
                        .plan()
                        .and_then(|p| p.chunk(seq))
                        .map_or(0, |c| c.segment);
                    let chunk =
                        u64::from(sender.plan().map_or(opts.chunk_size, |p| p.chunk_size()));
                    let base = base
                        .and_then(|id| opts.bases.get(&id))
                        .filter(|_| gate.base_ok(seq));
                    let (since, w0) = xfer_t0.unwrap_or((t0, 0));
                    let level = crate::delta::level_for(
                        opts.compress,
                        written.load(Ordering::Relaxed).saturating_sub(w0),
                        since.elapsed(),
                    );
                    // Against a base the target holds, a chunk is (nearly) free: always try.
                    if base.is_some()
                        || gate.should_try(seq, segment, backlog.load(Ordering::Relaxed), chunk)
                    {
                        let tx = jtx.clone();
                        let img = ctx.img.clone();
                        let slots = slots.clone();
                        jobs += 1;
                        note_chunks(ctx, jobs, held_reads.len());
                        tokio::task::spawn_blocking(move || {
                            let body = slots.run(|| {
                                crate::delta::compress_chunk(
                                    &img,
                                    base.as_deref(),
                                    staging,
                                    offset,
                                    &data,
                                    level,
                                    |d| slots.compress(d),
                                )
                            });
                            let _ = tx.send(JobResult::Compressed { seq, body });
                        });
                    } else {
                        sender.handle(now(t0), SenderEvent::Compressed { seq, body: None });
                    }
                }
                SenderAction::Progress(p) => {
                    on_progress(&p, &sender, ctx);
                    if let ProgressEvent::Progress { .. } = &p {
                        max_acked = max_acked.max(sender.acked());
                    }
                    r.event(&EngineEvent::Session(p));
                }
                SenderAction::Finished(o) => {
                    result = Some(Ok(o));
                }
                SenderAction::Failed(e) => {
                    result = Some(Err(classify(e, max_acked > acked_at_start)));
                }
            }
        }
        if let Some(res) = result.take() {
            // Let the writer push out what is queued (an ABORT, the last ACK-free frames).
            drop(wtx);
            if !writer_done {
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut writer).await;
            }
            writer.abort();
            return res;
        }

        // 2. The local check: release held chunks, refuse a bad image.
        if let Some(c) = &ctx.check {
            let st = c.state();
            if let Some(err) = st.error.clone() {
                sender.abort("the image file is invalid");
                while let Some(a) = sender.poll_action() {
                    if let SenderAction::Send(f) = a {
                        let _ = queue_frame(&wtx, &backlog, &f, &mut ctx.peaks).await;
                    }
                }
                result = Some(Err(End::Fatal(SendError::ImageInvalid(format!(
                    "image {} is invalid: {err}",
                    ctx.img.path().display()
                )))));
                continue;
            }
            let mut released = false;
            while held_reads
                .front()
                .is_some_and(|(_, seg, _, _)| st.done || st.verified_segments > *seg)
            {
                if let Some((seq, _, data, hash)) = held_reads.pop_front() {
                    sender.handle(now(t0), SenderEvent::ChunkRead { seq, data, hash });
                    released = true;
                }
            }
            if st.done {
                if let Some(f) = held_done.take() {
                    ctx.done_sent = true;
                    if queue_frame(&wtx, &backlog, &f, &mut ctx.peaks)
                        .await
                        .is_err()
                    {
                        result = Some(Err(End::Retry {
                            why: "the link closed while sending".into(),
                            progressed: max_acked > acked_at_start,
                        }));
                        continue;
                    }
                }
            }
            if released {
                continue;
            }
        }

        // What arrived while the writer queue was full, in order.
        if !inbox.is_empty() {
            while let Some(item) = inbox.pop_front() {
                match item {
                    Some(Ok(Incoming::Frame(frame))) => {
                        sender.handle(now(t0), SenderEvent::Frame(frame))
                    }
                    Some(Ok(Incoming::Skipped { .. })) => {}
                    Some(Err(e)) => {
                        result = Some(Err(End::Retry {
                            why: format!("link: {e}"),
                            progressed: max_acked > acked_at_start,
                        }));
                        inbox.clear();
                    }
                    None => {
                        result = Some(Err(End::Retry {
                            why: "the target closed the connection".into(),
                            progressed: max_acked > acked_at_start,
                        }));
                        inbox.clear();
                    }
                }
            }
            continue;
        }

        // 3. Wait for something to happen.
        let deadline = sender.next_deadline().map(|d| t0 + d);
        let watch_check = check_rx
            .as_ref()
            .is_some_and(|rx| !rx.borrow().done && rx.borrow().error.is_none());
        tokio::select! {
            biased;
            _ = interrupted(interrupt) => {
                sender.abort("interrupted on the host (Ctrl-C)");
                while let Some(a) = sender.poll_action() {
                    if let SenderAction::Send(f) = a {
                        let _ = queue_frame(&wtx, &backlog, &f, &mut ctx.peaks).await;
                    }
                }
                result = Some(Err(End::Fatal(SendError::Interrupted)));
            }
            w = &mut writer, if !writer_done => {
                writer_done = true;
                let why = match w {
                    Ok(Ok(())) => "the writer stopped".to_string(),
                    Ok(Err(e)) => format!("writing to the link failed: {e}"),
                    Err(e) => format!("writer task failed: {e}"),
                };
                result = Some(Err(End::Retry { why, progressed: max_acked > acked_at_start }));
            }
            f = frames.next() => match f {
                Some(Ok(Incoming::Frame(frame))) => sender.handle(now(t0), SenderEvent::Frame(frame)),
                Some(Ok(Incoming::Skipped { .. })) => {}
                Some(Err(e)) => {
                    result = Some(Err(End::Retry { why: format!("link: {e}"), progressed: max_acked > acked_at_start }));
                }
                None => {
                    result = Some(Err(End::Retry {
                        why: "the target closed the connection".into(),
                        progressed: max_acked > acked_at_start,
                    }));
                }
            },
            Some(job) = jrx.recv() => {
                jobs = jobs.saturating_sub(1);
                match job {
                    JobResult::Read { seq, data, hash } => {
                        match hold_segment(&sender, ctx, seq) {
                            Some(seg) => {
                                held_reads.push_back((seq, seg, data, hash));
                                note_chunks(ctx, jobs, held_reads.len());
                            }
                            None => sender.handle(now(t0), SenderEvent::ChunkRead { seq, data, hash }),
                        }
                    }
                    JobResult::ReadFailed { seq, detail } => {
                        sender.handle(now(t0), SenderEvent::ReadFailed { seq, detail });
                    }
                    JobResult::Compressed { seq, body } => {
                        let raw = sender
                            .plan()
                            .and_then(|p| p.chunk(seq))
                            .map_or(0, |c| c.len as usize);
                        gate.result(seq, raw, body.as_ref().map(WriteBody::wire_len));
                        gate.base_result(seq, raw, body.as_ref());
                        sender.handle(now(t0), SenderEvent::Compressed { seq, body });
                    }
                }
            }
            _ = async {
                if let Some(rx) = check_rx.as_mut() {
                    let _ = rx.changed().await;
                }
            }, if watch_check => {}
            _ = sleep_until(deadline), if deadline.is_some() => {
                // Frames still queued for the writer have not left: on a slow line the
                // wait for their answer starts when they are out.
                // Only while bytes keep leaving: a writer stuck on a peer that stopped
                // reading is a timeout like any other.
                let out = written.load(Ordering::Relaxed);
                let ev = if backlog.load(Ordering::Relaxed) > 0 && out != written_at_deadline {
                    SenderEvent::Draining
                } else {
                    SenderEvent::Tick
                };
                written_at_deadline = out;
                sender.handle(now(t0), ev);
            }
        }
    }
}

/// See [`CompressSlots`]: with two, `nx flash send` of a dense 256 MiB image peaked at 38 MiB,
/// with one at 27 MiB.
const COMPRESS_SLOTS: usize = 1;

/// Chunks are compressed one at a time. The effort follows the link ([`crate::delta::level_for`]),
/// so one core keeps ahead of it at every level (level 19 below 1 MB/s, 9 below 10 MB/s, 3
/// and only while frames queue above); more in parallel would not finish sooner, but each
/// holds a zstd context and its patch reference (up to
/// [`crate::delta::SELF_WINDOW_BEST`] bytes read from the image). The plain zstd contexts are
/// pooled here too, so there are never more than `max` of them (one per blocking thread, as
/// before, kept one per thread that ever compressed: with a window of chunks read on blocking
/// threads, that made `nx flash send` of a dense image peak at 75 MiB instead of 25).
struct CompressSlots {
    busy: std::sync::Mutex<usize>,
    freed: std::sync::Condvar,
    max: usize,
    contexts: std::sync::Mutex<Vec<zstd::bulk::Compressor<'static>>>,
}

impl CompressSlots {
    fn new() -> CompressSlots {
        CompressSlots {
            busy: std::sync::Mutex::new(0),
            freed: std::sync::Condvar::new(),
            max: COMPRESS_SLOTS,
            contexts: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// One zstd frame of `data` at [`ZSTD_LEVEL`] with a pooled context (inside
    /// [`CompressSlots::run`], so at most `max` contexts ever exist); `None` if zstd fails.
    fn compress(&self, data: &[u8]) -> Option<Vec<u8>> {
        let pooled = self
            .contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut ctx = match pooled {
            Some(c) => c,
            None => zstd::bulk::Compressor::new(ZSTD_LEVEL).ok()?,
        };
        let out = ctx.compress(data).ok();
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(ctx);
        out
    }

    /// Run `f` once a slot is free (called on a blocking thread: waiting here is fine).
    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            while *busy >= self.max {
                busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
            }
            *busy += 1;
        }
        let out = f();
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        *busy = busy.saturating_sub(1);
        self.freed.notify_one();
        out
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending::<()>().await,
    }
}

/// If `seq` is the last chunk of a segment the local check has not passed yet, the segment
/// index (hold the chunk back: the target must never complete a segment we did not check).
fn hold_segment(sender: &Sender, ctx: &Ctx, seq: u32) -> Option<usize> {
    let plan = sender.plan()?;
    let c = plan.chunk(seq)?;
    let (first, count) = plan.segment_chunks(c.segment)?;
    if seq != first + count {
        return None;
    }
    let st = ctx.check.as_ref()?.state();
    if st.done || st.verified_segments > c.segment {
        None
    } else {
        Some(c.segment)
    }
}

async fn queue_frame(
    wtx: &mpsc::Sender<Frame>,
    backlog: &AtomicU64,
    f: &Frame,
    peaks: &mut BufferPeaks,
) -> Result<(), ()> {
    let n = f.encoded_len() as u64;
    let queued = backlog.fetch_add(n, Ordering::Relaxed) + n;
    peaks.writer_bytes = peaks.writer_bytes.max(queued);
    // Cloning a frame shares its payload.
    wtx.send(f.clone()).await.map_err(|_| ())
}

fn note_chunks(ctx: &mut Ctx, jobs: usize, held: usize) {
    ctx.peaks.chunks = ctx.peaks.chunks.max(jobs + held);
}

fn on_progress(p: &ProgressEvent, sender: &Sender, ctx: &mut Ctx) {
    match p {
        ProgressEvent::Start { device, .. } => {
            ctx.device = device.clone();
            if let Some(plan) = sender.plan() {
                ctx.receipt.negotiated(device, plan);
            }
        }
        ProgressEvent::Resumed { seq, at_offset, .. } => {
            if ctx.resumed_at.is_none() {
                ctx.resumed_at = Some(*at_offset);
            }
            if let Some(plan) = sender.plan() {
                ctx.receipt.resumed(plan, seq.saturating_sub(1));
            }
        }
        ProgressEvent::Done {
            unchanged: true, ..
        } => {
            ctx.receipt.unchanged(sender.manifest());
        }
        ProgressEvent::Skipped { kind, bytes } => match kind {
            SkipKind::Zero => ctx.skips.zero += bytes,
            SkipKind::Identical => ctx.skips.identical += bytes,
            SkipKind::Compressed => ctx.skips.compressed += bytes,
            SkipKind::Patched => ctx.skips.patched += bytes,
            SkipKind::Derived => ctx.skips.derived += bytes,
        },
        _ => {}
    }
}

fn classify(e: SessionError, progressed: bool) -> End {
    match e {
        SessionError::BadImage(e) => End::Fatal(SendError::ImageInvalid(e.to_string())),
        SessionError::Remote { code, text } => match code {
            // NoSession: the target dropped or forgot our session (a stall, a restart) where
            // the link could not say so; Busy: another link is flashing, it may be done by
            // the next attempt. Both resume with a new HELLO.
            ErrorCode::Storage
            | ErrorCode::Timeout
            | ErrorCode::Aborted
            | ErrorCode::NoSession
            | ErrorCode::Busy => End::Retry {
                why: format!("the target reported error {code}: {text}"),
                progressed,
            },
            _ => End::Fatal(SendError::Refused { code, text }),
        },
        SessionError::Timeout { .. } => End::Retry {
            why: e.to_string(),
            progressed,
        },
        SessionError::Aborted(_) => End::Fatal(SendError::Interrupted),
        SessionError::Protocol(_) | SessionError::Capability(_) => End::Fatal(SendError::Refused {
            code: e.code(),
            text: e.to_string(),
        }),
        SessionError::Read { .. } => End::Fatal(SendError::Local(LocalError::Session(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::{classify, CompressGate, CompressSlots, End, BASE_MISSES, BASE_PROBE};
    use proto::msg::{ErrorCode, PatchSource, WriteBody};
    use proto::session::SessionError;

    #[test]
    fn a_base_that_holds_nothing_is_probed_only_now_and_then_until_it_holds_something() {
        let mut g = CompressGate::default();
        let raw = 1 << 20;
        let patch = |wire: usize| WriteBody::Patch {
            source: PatchSource::Base,
            ref_offset: 0,
            ref_len: 1 << 20,
            frame: bytes::Bytes::from(vec![0u8; wire]),
        };
        // Hits and a miss now and then: every chunk is tried against the base.
        for seq in 1..=20u32 {
            assert!(g.base_ok(seq));
            let body = if seq % 5 == 2 { patch(raw) } else { patch(100) };
            g.base_result(seq, raw, Some(&body));
        }
        // BASE_MISSES misses in a row (patches that saved nothing, or plain zstd)...
        let mut seq = 21;
        for k in 0..BASE_MISSES {
            assert!(g.base_ok(seq));
            let body = if k % 2 == 0 {
                patch(raw - 10)
            } else {
                WriteBody::Zstd(bytes::Bytes::from(vec![0u8; raw]))
            };
            g.base_result(seq, raw, Some(&body));
            seq += 1;
        }
        // ...then only every BASE_PROBE-th chunk tries it.
        let tried: Vec<u32> = (seq..seq + 3 * BASE_PROBE)
            .filter(|s| {
                let ok = g.base_ok(*s);
                if ok {
                    g.base_result(*s, raw, None);
                }
                ok
            })
            .collect();
        assert_eq!(tried.len(), 3, "{tried:?}");
        assert!(tried.iter().all(|s| s % BASE_PROBE == 0));
        // A probe that finds the base again: every chunk once more.
        let probe = tried[2] + BASE_PROBE;
        assert!(g.base_ok(probe));
        g.base_result(probe, raw, Some(&patch(100)));
        assert!(g.base_ok(probe + 1));
        // A result for a chunk that was not tried against the base changes nothing.
        g.base_result(probe + 2, raw, None);
        assert!(g.base_ok(probe + 3));
    }

    #[test]
    fn a_dropped_session_or_a_busy_target_is_retried_a_refusal_is_not() {
        let remote = |code| SessionError::Remote {
            code,
            text: "x".into(),
        };
        for code in [ErrorCode::NoSession, ErrorCode::Busy, ErrorCode::Storage] {
            assert!(
                matches!(classify(remote(code), false), End::Retry { .. }),
                "{code}"
            );
        }
        for code in [
            ErrorCode::Protocol,
            ErrorCode::Signature,
            ErrorCode::Rollback,
        ] {
            assert!(
                matches!(classify(remote(code), true), End::Fatal(_)),
                "{code}"
            );
        }
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn compress_slots_bound_the_chunks_compressed_at_once_and_pool_contexts() {
        let slots = Arc::new(CompressSlots::new());
        let now = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 7) as u8).collect();
        let threads: Vec<_> = (0..4 * slots.max + 3)
            .map(|_| {
                let (slots, now, peak, data) =
                    (slots.clone(), now.clone(), peak.clone(), data.clone());
                std::thread::spawn(move || {
                    slots.run(|| {
                        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(n, Ordering::SeqCst);
                        let z = slots.compress(&data).unwrap();
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        now.fetch_sub(1, Ordering::SeqCst);
                        z.len()
                    })
                })
            })
            .collect();
        for t in threads {
            assert!(
                t.join().unwrap() < data.len() / 10,
                "compressible data compressed"
            );
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(
            peak >= 1 && peak <= slots.max,
            "peak {peak} of {}",
            slots.max
        );
        let contexts = slots.contexts.lock().unwrap().len();
        assert!(
            contexts >= 1 && contexts <= slots.max,
            "{contexts} contexts"
        );
    }
}
