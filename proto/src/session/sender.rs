//! The host side: plans the chunks, keeps a sliding window of WRITE frames,
//! retransmits on NAK or timeout, and reports progress as data.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::frame::Frame;
use crate::image::ImageHead;
use crate::manifest::{is_all_zero, Manifest};
use crate::msg::NakReason;
use crate::msg::{
    self, chunk_hash, Abort, ChunkHash, Done, DoneStatus, ErrorCode, Hello, Message, Write,
    WriteBody, WriteKind, WritePart, COMPRESS_DERIVE, COMPRESS_PATCH, COMPRESS_ZSTD, MAX_CHUNK,
    MAX_WINDOW, PROTO_VERSION,
};

/// Fewest frames in flight the sender shrinks to on errors (never above the window).
const MIN_CWND: u32 = 2;
/// Smallest WRITE_PART the sender cuts (payload bytes).
pub const MIN_PART: u32 = 256;
/// Progress events (ACK or PART_ACK advancing) without an error before the sender
/// grows its part size (then its window) again.
const GROW_AFTER: u32 = 16;

/// The sender's view of the line: how big a frame may be and how many may be in flight.
/// Starts at "whole chunks, full window" (a clean link behaves exactly as without
/// adaptation); halves on a NAK (go-back-N), quarters on a timeout; once selective repeat
/// finds lost parts, the part size follows the measured loss rate ([`Sender::fit_part`]);
/// otherwise doubles back after [`GROW_AFTER`] clean progress events.
#[derive(Debug, Clone, Copy)]
struct Line {
    /// Largest WRITE payload sent in one frame; `None` = whole WRITEs.
    part: Option<u32>,
    /// Frames in flight (1..=negotiated window).
    cwnd: u32,
    /// Progress events since the last error.
    clean: u32,
    /// An error may shrink again (progress happened since the last shrink).
    armed: bool,
    /// Bytes of WRITE payload in flight at most; `None` = only `cwnd` limits. Shrinks on
    /// a go-back-N rewind (NAK, timeout: what is in flight behind a loss is resent), not
    /// on a loss selective repeat repairs; it grows back on clean runs.
    cap: Option<u32>,
    /// Most bytes in flight since the last error: what the next error shrinks from.
    peak: u32,
    /// Payload bytes sent per lost part (a moving mean), once selective repeat found a
    /// loss: the part size follows from it ([`Sender::fit_part`]).
    loss_gap: Option<u64>,
    /// Payload bytes sent since the last part found lost.
    since_loss: u64,
}

/// What one more frame costs besides its payload, in bytes (frame and part headers, the
/// PART_ACK coming back, the per-frame work on both sides): the part size that wastes
/// least on a line that loses one part per `g` bytes sent is about `√(FRAME_COST·g)`.
const FRAME_COST: u64 = 128;

/// The fewest frames (of the current part size) the byte cap keeps in flight: enough
/// that the frame after a lost one shows the gap quickly.
const CAP_FRAMES: u32 = 8;
/// Most WRITE_PARTs in flight (bounds the sender's bookkeeping per frame).
const MAX_PARTS_IN_FLIGHT: u32 = 64;

use super::plan::Plan;
use super::{deadline, CompressMode, ProgressEvent, SegmentProgress, SessionError, SkipKind};

/// Host-side settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// Host name sent in HELLO (`[A-Za-z0-9._-]{1,64}`).
    pub host: String,
    /// Random per connection (echoed by the target to match replies).
    pub nonce: u64,
    /// WRITE frames in flight (1..=256). Default 16.
    pub window: u16,
    /// Largest chunk size wanted (power of two, 4 KiB..=1 MiB). Default 256 KiB.
    pub chunk_size: u32,
    /// `--compress`. Default auto.
    pub compress: CompressMode,
    /// `false` = `--no-skip`.
    pub skip: bool,
    /// `--allow-downgrade`: ask the target to install below its anti-rollback floor (honoured
    /// only for images signed with one of its development keys).
    pub allow_downgrade: bool,
    /// `chunk_size` is the user's explicit choice: the target must not replace it with its
    /// skip index's chunk size ([`msg::HELLO_EXACT_CHUNK`]).
    pub exact_chunk: bool,
    /// Retransmission timeout: no ACK progress for this long → resend from the last
    /// acknowledged seq (and resend HELLO/DONE while waiting for their replies).
    /// Default 2 s. With `adaptive_rto` this is the first timeout and the ceiling of the
    /// measured one (`--rto` given explicitly makes it fixed).
    pub rto: Duration,
    /// Measure the round trip (first transmissions only) and time out after
    /// `srtt + 4 × rttvar` (at least [`MIN_RTO`], at most `rto`, doubling on each timeout
    /// without progress) instead of always `rto`: a noisy line then costs a round trip per
    /// lost frame, not seconds. Default on.
    pub adaptive_rto: bool,
    /// Largest WRITE payload per frame from the start, and the most it grows back to
    /// (`None`: whole WRITEs until the line shows errors). A slow line (a UART) wants
    /// small frames from the first byte: a lost byte then costs one small frame, and
    /// the first acknowledgement comes after a fraction of a second, not a whole chunk.
    pub max_frame: Option<u32>,
    /// Consecutive timeouts without progress before giving up. Default 10.
    pub max_retries: u32,
    /// Chunks read ahead beyond the window (memory: (window + read_ahead) × chunk).
    /// Default 4.
    pub read_ahead: u16,
    /// Manifest ids of the images the shell can read as a patch base (`--base`, or images
    /// found beside the one being sent): if the target offers one of them, chunks are
    /// sent as `PATCH` writes against it.
    pub bases: Vec<[u8; 32]>,
}

impl SenderConfig {
    /// Defaults with the given host name.
    pub fn new(host: impl Into<String>) -> SenderConfig {
        SenderConfig {
            host: host.into(),
            nonce: 0,
            window: 16,
            chunk_size: 256 * 1024,
            compress: CompressMode::Auto,
            skip: true,
            allow_downgrade: false,
            exact_chunk: false,
            rto: Duration::from_secs(2),
            adaptive_rto: true,
            max_frame: None,
            max_retries: 10,
            read_ahead: 4,
            bases: Vec::new(),
        }
    }
}

/// Events the shell feeds into a [`Sender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderEvent {
    /// A frame decoded from the link.
    Frame(Frame),
    /// Answer to [`SenderAction::ReadChunk`]: exactly `len` bytes of the image at
    /// `offset`. `hash` is [`msg::chunk_hash`] of the data if the action asked for it
    /// (`None` makes the sender hash it itself).
    ChunkRead {
        seq: u32,
        data: Bytes,
        hash: Option<ChunkHash>,
    },
    /// Reading failed (the session fails; the transfer stays resumable).
    ReadFailed { seq: u32, detail: String },
    /// Answer to [`SenderAction::Compress`]: a [`WriteBody::Zstd`] or [`WriteBody::Patch`]
    /// body for the chunk, or `None` (compression failed or did not help).
    Compressed { seq: u32, body: Option<WriteBody> },
    /// Time passed (call when [`Sender::next_deadline`] is reached; extra ticks are
    /// harmless).
    Tick,
    /// The deadline came while the shell was still writing frames to the link (a slow
    /// line: a UART takes seconds for one big frame). Waiting for an answer to what has
    /// not left yet is not a timeout: the WRITE timer restarts instead.
    Draining,
}

/// What the shell must do for a [`Sender`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderAction {
    /// Write this frame to the link.
    Send(Frame),
    /// Read `len` bytes of the image file at absolute `offset`; if `hash`, also
    /// compute [`msg::chunk_hash`] of them; answer with [`SenderEvent::ChunkRead`].
    /// Several reads may be outstanding; answers may come in any order.
    ReadChunk {
        seq: u32,
        offset: u64,
        len: u32,
        hash: bool,
    },
    /// Compress `data` (the chunk at absolute image `offset`) with zstd (one frame);
    /// answer with [`SenderEvent::Compressed`]. The shell may answer a
    /// [`WriteBody::Patch`] instead of a plain zstd frame: against the base image
    /// `base` (when set: the shell holds it) or against the image's own bytes before
    /// `offset` (when `staging`).
    Compress {
        seq: u32,
        offset: u64,
        data: Bytes,
        base: Option<[u8; 32]>,
        staging: bool,
    },
    /// Progress for the user.
    Progress(ProgressEvent),
    /// Terminal: installed (or unchanged).
    Finished(Outcome),
    /// Terminal: the session failed. The target keeps what it has: running the same
    /// transfer again resumes.
    Failed(SessionError),
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Encoded bytes of every frame sent (retransmissions included).
    pub wire_bytes: u64,
    /// Data bytes of the plan (zero runs excluded).
    pub data_bytes: u64,
    /// Data bytes the target already held when the session started.
    pub resumed_bytes: u64,
    /// Bytes of zero runs not sent (manifest zero runs + all-zero chunks).
    pub zero_bytes: u64,
    /// Bytes the target copied from its installed image (or the whole image, if
    /// unchanged).
    pub identical_bytes: u64,
    /// Bytes saved by compression.
    pub compressed_saved: u64,
    /// Bytes saved by `PATCH` writes against the target's base image.
    #[serde(default)]
    pub patched_saved: u64,
    /// Bytes the target computed itself (`DERIVE`: the dm-verity hash tree).
    #[serde(default)]
    pub derived_bytes: u64,
    /// WRITE frames sent again after a NAK or timeout.
    pub retransmitted_frames: u64,
}

/// How a successful session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// `Installed` or `Unchanged`.
    pub status: DoneStatus,
    pub image_sha256: [u8; 32],
    pub stats: Stats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Hello,
    Transfer,
    Done,
    Over,
}

#[derive(Debug, Clone)]
enum Slot {
    Reading,
    Compressing(Bytes),
    Ready(Frame),
}

/// The sender state machine. One per connection: after a cut link, build a new one
/// (the target's HELLO_REPLY says where to continue).
#[derive(Debug)]
pub struct Sender {
    cfg: SenderConfig,
    head: Bytes,
    manifest: Manifest,
    image_id: [u8; 32],
    phase: Phase,
    now: Duration,
    deadline: Option<Duration>,
    retries: u32,
    /// When the last HELLO went out, and how long after its HELLO the first `NAK 0` (a
    /// corrupt frame before any session) came back: a `NAK 0` that comes at least half that
    /// long after the last HELLO reports that one and resends it at once; an earlier one
    /// still reports the previous transmission (a frame can be reported more than once).
    hello_nak: (Duration, Option<Duration>),
    // negotiated
    device: String,
    window: u32,
    zstd: bool,
    /// `PATCH` writes were negotiated.
    patch: bool,
    /// `DERIVE` writes were negotiated.
    derive: bool,
    /// The target's base image, when the shell holds it too.
    base: Option<[u8; 32]>,
    skip_map: HashMap<(u32, ChunkHash), u64>,
    plan: Option<Plan>,
    // window
    acked: u32,
    next_send: u32,
    next_read: u32,
    highest_sent: u32,
    /// slots[i] holds seq acked + 1 + i.
    slots: VecDeque<Slot>,
    /// Bytes of the WRITE payload of `acked + 1` the target holds (PART_ACK).
    part_have: u32,
    /// Runs of that payload past `part_have` the target holds too (PART_ACK `sack`):
    /// sorted, disjoint, never sent again.
    sacked: Vec<(u32, u32)>,
    /// Ranges of that payload found lost (selective repeat): sent before new data.
    resend: VecDeque<(u32, u32)>,
    /// Every data frame in flight (sent, not yet known held or lost), in send order.
    flight: VecDeque<Flight>,
    /// Data frames sent so far (numbers [`Flight::tx`]).
    tx: u64,
    /// Where in the WRITE payload of `next_send` the next part starts.
    next_at: u32,
    /// Highest (seq, end of part) ever sent, to count retransmissions.
    highest_part: (u32, u32),
    line: Line,
    rtt: Rtt,
    stats: Stats,
    actions: VecDeque<SenderAction>,
}

/// One data frame in flight: bytes `[at, end)` of the WRITE payload of `seq` (a whole
/// WRITE is `[0, len)`), the `tx`-th data frame sent. The line keeps frames in order, so
/// once the target reports holding a frame, every frame sent before it is held or lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flight {
    seq: u32,
    at: u32,
    end: u32,
    tx: u64,
}

/// The lower bound of the measured retransmission timeout: below this, a receiver busy for
/// a moment (a journal sync, a scheduler hiccup under TCG) would look like a lost frame.
pub const MIN_RTO: Duration = Duration::from_millis(100);

/// Round-trip estimator (RFC 6298: `srtt`, `rttvar`) fed with the time from a frame's
/// first transmission (a whole WRITE, a WRITE_PART, HELLO) to the ACK or PART_ACK that
/// covers it. What was sent again gives no sample (Karn's rule): its answer cannot be
/// matched to one transmission.
#[derive(Debug, Clone, Default)]
struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
    /// First transmission time of each frame in flight, by (seq, end of its part in the
    /// WRITE payload), ascending; a rewind drops everything at or past its point. At most
    /// the frames in flight.
    sent: VecDeque<((u32, u32), Duration)>,
    /// Timeouts since the last valid sample: each doubles the timeout, and it stays
    /// doubled until a first transmission is acknowledged (a spurious timeout while a
    /// slow line drains its queue must not repeat at the old pace).
    backoff: u32,
    /// When the only HELLO went out (`None` once it was resent): its reply is the first
    /// sample, so the first lost WRITE already costs a measured timeout.
    hello: Option<Duration>,
}

impl Rtt {
    fn sample(&mut self, r: Duration) {
        self.backoff = 0;
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
    }

    /// The target holds everything up to `point` (seq, bytes of its WRITE payload) at
    /// `now`: one sample from the newest frame it covers; covered entries are dropped.
    fn covered(&mut self, point: (u32, u32), now: Duration) {
        let mut newest = None;
        while let Some(&(key, t)) = self.sent.front() {
            if key > point {
                break;
            }
            newest = Some(t);
            self.sent.pop_front();
        }
        if let Some(t) = newest {
            self.sample(now.saturating_sub(t));
        }
    }

    /// The frame ending at `key` goes out for the first time.
    fn sending(&mut self, key: (u32, u32), now: Duration) {
        if self.sent.back().is_none_or(|&(k, _)| k < key) {
            self.sent.push_back((key, now));
        }
    }

    /// The sender rewinds to `point`: whatever is sent from there again gives no sample.
    fn rewound(&mut self, point: (u32, u32)) {
        while self.sent.back().is_some_and(|&(k, _)| k > point) {
            self.sent.pop_back();
        }
    }

    /// The retransmission timeout now.
    fn rto(&self, cfg: &SenderConfig) -> Duration {
        let Some(srtt) = self.srtt.filter(|_| cfg.adaptive_rto) else {
            return cfg.rto;
        };
        let base = (srtt + self.rttvar * 4).max(MIN_RTO).min(cfg.rto);
        base.saturating_mul(1u32 << self.backoff.min(8))
            .min(cfg.rto)
    }
}

impl Sender {
    /// A sender for the image whose head is `head`: the image file's bytes
    /// `[0, data_offset)` (read the 4 KiB header, [`crate::image::Header::parse`] it,
    /// then read `data_offset` bytes). Fails if the head does not parse or the
    /// config is out of range.
    pub fn new(cfg: SenderConfig, head: Bytes) -> Result<Sender, SessionError> {
        let parsed = ImageHead::parse(&head)?;
        if cfg.window == 0 || cfg.window > MAX_WINDOW {
            return Err(SessionError::Capability(format!(
                "window must be 1..={MAX_WINDOW}, got {}",
                cfg.window
            )));
        }
        if !msg::valid_chunk_size(cfg.chunk_size) {
            return Err(SessionError::Capability(format!(
                "chunk size must be a power of two in 4096..={MAX_CHUNK}, got {}",
                cfg.chunk_size
            )));
        }
        msg::validate_peer_name(&cfg.host).map_err(SessionError::Capability)?;
        let manifest = parsed.manifest;
        let first_part = cfg.max_frame.map(|m| m.max(MIN_PART));
        Ok(Sender {
            image_id: manifest.id(),
            manifest,
            head,
            cfg,
            phase: Phase::Created,
            now: Duration::ZERO,
            deadline: None,
            retries: 0,
            hello_nak: (Duration::ZERO, None),
            device: String::new(),
            window: 1,
            zstd: false,
            patch: false,
            derive: false,
            base: None,
            skip_map: HashMap::new(),
            plan: None,
            acked: 0,
            next_send: 1,
            next_read: 1,
            highest_sent: 0,
            slots: VecDeque::new(),
            part_have: 0,
            sacked: Vec::new(),
            resend: VecDeque::new(),
            flight: VecDeque::new(),
            tx: 0,
            next_at: 0,
            highest_part: (0, 0),
            line: Line {
                part: first_part,
                cwnd: 1,
                clean: 0,
                armed: true,
                cap: None,
                peak: 0,
                loss_gap: None,
                since_loss: 0,
            },
            rtt: Rtt::default(),
            stats: Stats::default(),
            actions: VecDeque::new(),
        })
    }

    /// The manifest being sent.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }
    /// The plan, once negotiated.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }
    /// Highest cumulatively acknowledged seq.
    pub fn acked(&self) -> u32 {
        self.acked
    }
    /// `true` once `Finished` or `Failed` was emitted.
    pub fn is_over(&self) -> bool {
        self.phase == Phase::Over
    }
    /// When the shell must call `handle(now, Tick)` next, if at all.
    pub fn next_deadline(&self) -> Option<Duration> {
        if self.phase == Phase::Over {
            None
        } else {
            self.deadline
        }
    }
    /// Chunks buffered (reading, compressing, ready or in flight): memory is
    /// bounded by this × chunk size.
    pub fn buffered_chunks(&self) -> usize {
        self.slots.len()
    }

    /// Next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<SenderAction> {
        self.actions.pop_front()
    }

    /// Sends HELLO.
    pub fn start(&mut self, now: Duration) {
        self.now = now;
        if self.phase != Phase::Created {
            return;
        }
        self.phase = Phase::Hello;
        self.send_hello();
    }

    /// Abandons the session (Ctrl-C): sends ABORT and fails with
    /// [`SessionError::Aborted`]. The target keeps its progress.
    pub fn abort(&mut self, reason: &str) {
        if self.phase == Phase::Over {
            return;
        }
        if self.phase != Phase::Created {
            if let Ok(f) = Message::Abort(Abort::new(ErrorCode::Aborted, reason)).to_frame() {
                self.send(f);
            }
        }
        self.fail(SessionError::Aborted(reason.to_string()));
    }

    /// Feeds one event.
    pub fn handle(&mut self, now: Duration, ev: SenderEvent) {
        self.now = self.now.max(now);
        if self.phase == Phase::Over {
            return;
        }
        match ev {
            // A late answer to the connection's identification probe (`crate::ident`): on a
            // slow link (a UART, a pseudo-terminal QEMU polls once a second) it can arrive
            // after the probe's wait, in the middle of the session.
            SenderEvent::Frame(f) if f.msg_type() == crate::ident::REPLY => {}
            SenderEvent::Frame(f) => match Message::from_frame(&f) {
                Ok(m) => self.on_message(m),
                Err(e) => self.fail(SessionError::Protocol(format!(
                    "undecodable message from the target: {e}"
                ))),
            },
            SenderEvent::ChunkRead { seq, data, hash } => self.on_chunk(seq, data, hash),
            SenderEvent::ReadFailed { seq, detail } => {
                self.fail(SessionError::Read { seq, detail });
            }
            SenderEvent::Compressed { seq, body } => self.on_compressed(seq, body),
            SenderEvent::Tick => self.on_tick(),
            SenderEvent::Draining => {
                if self.deadline.is_some() {
                    let rto = if self.phase == Phase::Transfer {
                        self.data_rto()
                    } else {
                        self.cfg.rto
                    };
                    self.deadline = Some(deadline(self.now, rto));
                }
            }
        }
    }

    // ------------------------------------------------------------ internals

    /// The retransmission timeout for WRITEs in flight now (see [`SenderConfig::adaptive_rto`]).
    fn data_rto(&self) -> Duration {
        self.rtt.rto(&self.cfg)
    }

    /// The measured smoothed round trip, once there is a sample.
    pub fn srtt(&self) -> Option<Duration> {
        self.rtt.srtt
    }

    fn send(&mut self, f: Frame) {
        self.stats.wire_bytes += f.encoded_len() as u64;
        self.actions.push_back(SenderAction::Send(f));
    }

    fn progress(&mut self, p: ProgressEvent) {
        self.actions.push_back(SenderAction::Progress(p));
    }

    fn fail(&mut self, e: SessionError) {
        if self.phase == Phase::Over {
            return;
        }
        let code = e.code();
        self.progress(ProgressEvent::Error {
            code: code.code(),
            name: code.name().to_string(),
            text: e.to_string(),
        });
        self.actions.push_back(SenderAction::Failed(e));
        self.phase = Phase::Over;
        self.slots.clear();
        self.deadline = None;
    }

    fn send_hello(&mut self) {
        let compression = match self.cfg.compress {
            CompressMode::None => 0,
            CompressMode::Auto | CompressMode::Zstd => {
                COMPRESS_ZSTD | COMPRESS_PATCH | COMPRESS_DERIVE
            }
        };
        let hello = Message::Hello(Hello {
            proto: PROTO_VERSION,
            nonce: self.cfg.nonce,
            window: self.cfg.window,
            chunk_size: self.cfg.chunk_size,
            compression,
            skip: self.cfg.skip,
            allow_downgrade: self.cfg.allow_downgrade,
            exact_chunk: self.cfg.exact_chunk,
            host: self.cfg.host.clone(),
            head: self.head.clone(),
        });
        match hello.to_frame() {
            Ok(f) => {
                self.send(f);
                self.hello_nak.0 = self.now;
                self.rtt.hello = match self.rtt.hello {
                    None if self.retries == 0 => Some(self.now),
                    _ => None,
                };
                self.deadline = Some(deadline(self.now, self.cfg.rto));
            }
            Err(e) => self.fail(SessionError::Protocol(format!("cannot encode HELLO: {e}"))),
        }
    }

    fn send_done(&mut self) {
        let done = Message::Done(Done {
            image_sha256: self.manifest.image_sha256,
        });
        match done.to_frame() {
            Ok(f) => {
                self.send(f);
                self.deadline = Some(deadline(self.now, self.cfg.rto));
            }
            Err(e) => self.fail(SessionError::Protocol(format!("cannot encode DONE: {e}"))),
        }
    }

    fn on_message(&mut self, m: Message) {
        match m {
            Message::HelloReply(r) => {
                if self.phase == Phase::Hello && r.nonce == self.cfg.nonce {
                    self.on_hello_reply(r);
                }
                // else: a duplicate or stale reply: ignore.
            }
            Message::Ack(a) => {
                if self.phase == Phase::Transfer {
                    self.on_ack(a.ack);
                }
            }
            Message::Nak(n) => {
                if self.phase == Phase::Transfer {
                    self.on_nak(n.seq, n.reason);
                } else if self.phase == Phase::Hello && n.seq == 0 {
                    // The HELLO arrived corrupt: resend it now instead of after the first
                    // timeout (no round trip is measured yet, so that one is long). It counts
                    // against the retry budget like a timeout.
                    let (sent, rtt) = self.hello_nak;
                    let since = self.now.saturating_sub(sent);
                    if rtt.is_some_and(|r| since < r / 2) {
                        return;
                    }
                    self.hello_nak.1 = Some(rtt.unwrap_or(since));
                    self.retries += 1;
                    if self.retries > self.cfg.max_retries {
                        self.fail(SessionError::Timeout {
                            what: "waiting for HELLO_REPLY",
                            retries: self.cfg.max_retries,
                        });
                        return;
                    }
                    self.send_hello();
                }
            }
            Message::PartAck(a) => {
                if self.phase == Phase::Transfer {
                    self.on_part_ack(a);
                }
            }
            Message::Verified(v) => {
                self.progress(ProgressEvent::SegmentVerified { segment: v.segment })
            }
            Message::DoneReply(d) => {
                if self.phase != Phase::Done {
                    return;
                }
                if d.image_sha256 != self.manifest.image_sha256 {
                    self.fail(SessionError::Protocol(
                        "DONE_REPLY names another image hash".to_string(),
                    ));
                    return;
                }
                match d.status {
                    DoneStatus::Pending => {
                        // Keep-alive: the target is verifying or installing.
                        self.retries = 0;
                        self.deadline = Some(deadline(self.now, self.cfg.rto));
                    }
                    DoneStatus::Installed | DoneStatus::Unchanged => {
                        let unchanged = d.status == DoneStatus::Unchanged;
                        let stats = self.stats;
                        self.progress(ProgressEvent::Done {
                            unchanged,
                            image_sha256: d.image_sha256,
                            stats,
                        });
                        self.actions.push_back(SenderAction::Finished(Outcome {
                            status: d.status,
                            image_sha256: d.image_sha256,
                            stats,
                        }));
                        self.phase = Phase::Over;
                        self.deadline = None;
                    }
                }
            }
            Message::Error(e) => self.fail(SessionError::Remote {
                code: e.code,
                text: e.text,
            }),
            Message::Hello(_)
            | Message::Info
            | Message::InfoReply(_)
            | Message::Write(_)
            | Message::WritePart(_)
            | Message::Done(_)
            | Message::Abort(_) => {
                // Not something a target sends during a flash; an INFO_REPLY may be a
                // late answer to an earlier query. Ignore.
            }
        }
    }

    fn on_hello_reply(&mut self, r: msg::HelloReply) {
        if let Some(t) = self.rtt.hello.take() {
            self.rtt.sample(self.now.saturating_sub(t));
        }
        if r.proto != PROTO_VERSION {
            self.fail(SessionError::Capability(format!(
                "target speaks protocol {}, this host speaks {PROTO_VERSION}",
                r.proto
            )));
            return;
        }
        if r.window > self.cfg.window || r.chunk_size > self.cfg.chunk_size {
            self.fail(SessionError::Protocol(format!(
                "target accepted window {} / chunk {} above what was offered ({} / {})",
                r.window, r.chunk_size, self.cfg.window, self.cfg.chunk_size
            )));
            return;
        }
        let offered = match self.cfg.compress {
            CompressMode::None => 0,
            _ => COMPRESS_ZSTD | COMPRESS_PATCH | COMPRESS_DERIVE,
        };
        if r.compression & !offered != 0 {
            self.fail(SessionError::Protocol(
                "target accepted a compression that was not offered".to_string(),
            ));
            return;
        }
        self.zstd = r.compression & COMPRESS_ZSTD != 0;
        self.patch = self.zstd && r.compression & COMPRESS_PATCH != 0;
        self.derive = r.compression & COMPRESS_DERIVE != 0;
        self.base = r
            .base
            .filter(|b| self.patch && self.cfg.bases.contains(&b.image_id))
            .map(|b| b.image_id);
        if self.cfg.compress == CompressMode::Zstd && !self.zstd {
            self.fail(SessionError::Capability(
                "--compress zstd was requested but the target does not support zstd; use --compress auto or none".to_string(),
            ));
            return;
        }
        let plan = match Plan::new(&self.manifest, r.chunk_size) {
            Ok(p) => p,
            Err(e) => {
                self.fail(SessionError::Capability(e.to_string()));
                return;
            }
        };
        if r.resume_seq > plan.total() {
            self.fail(SessionError::Protocol(format!(
                "target resumes at chunk {} but the plan has {}",
                r.resume_seq,
                plan.total()
            )));
            return;
        }
        self.device = r.device.clone();
        self.window = u32::from(r.window);
        self.line.cwnd = self.window.max(1);
        self.retries = 0;
        self.deadline = None;
        let segments: Vec<SegmentProgress> = self
            .manifest
            .segments
            .iter()
            .map(|s| SegmentProgress {
                name: s.name.clone(),
                size: s.size,
                data_bytes: s.data_bytes(),
            })
            .collect();
        let content: u64 = self.manifest.segments.iter().map(|s| s.size).sum();
        self.stats.data_bytes = plan.data_bytes();
        self.stats.zero_bytes = content.saturating_sub(plan.data_bytes());
        self.progress(ProgressEvent::Start {
            image_id: hex::encode(self.image_id),
            version: self.manifest.version.clone(),
            device: r.device.clone(),
            image_size: self.manifest.total_size,
            data_bytes: plan.data_bytes(),
            chunks: plan.total(),
            chunk_size: plan.chunk_size(),
            window: r.window,
            compression: if self.zstd { "zstd" } else { "none" }.to_string(),
            skip: self.cfg.skip,
            segments,
        });
        if let Some(b) = r.base.filter(|_| self.patch) {
            self.progress(ProgressEvent::Base {
                image_id: hex::encode(b.image_id),
                held: self.base.is_some(),
            });
        }
        if r.unprovisioned {
            self.progress(ProgressEvent::Unprovisioned {
                device: r.device.clone(),
            });
        }
        if self.stats.zero_bytes > 0 {
            self.progress(ProgressEvent::Skipped {
                kind: SkipKind::Zero,
                bytes: self.stats.zero_bytes,
            });
        }
        if r.already_installed {
            self.stats.identical_bytes = plan.data_bytes();
            self.progress(ProgressEvent::Skipped {
                kind: SkipKind::Identical,
                bytes: plan.data_bytes(),
            });
            self.plan = Some(plan);
            self.phase = Phase::Done;
            self.send_done();
            return;
        }
        if r.resume_seq > 0 {
            let at_offset = plan
                .chunk(r.resume_seq + 1)
                .map_or(self.manifest.total_size, |c| c.offset);
            let done_bytes = plan.bytes_done(r.resume_seq);
            self.stats.resumed_bytes = done_bytes;
            self.progress(ProgressEvent::Resumed {
                seq: r.resume_seq + 1,
                at_offset,
                done_bytes,
            });
        }
        for (i, s) in self.manifest.segments.iter().enumerate().take(64) {
            if r.verified & (1 << i) != 0 {
                self.actions
                    .push_back(SenderAction::Progress(ProgressEvent::SegmentVerified {
                        segment: s.name.clone(),
                    }));
            }
        }
        if self.cfg.skip {
            for e in &r.index {
                self.skip_map.entry((e.len, e.hash)).or_insert(e.offset);
            }
        }
        self.acked = r.resume_seq;
        self.next_send = r.resume_seq + 1;
        self.next_read = r.resume_seq + 1;
        self.highest_sent = r.resume_seq;
        self.plan = Some(plan);
        self.phase = Phase::Transfer;
        self.pump();
    }

    fn total(&self) -> u32 {
        self.plan.as_ref().map_or(0, Plan::total)
    }

    fn slot_mut(&mut self, seq: u32) -> Option<&mut Slot> {
        let i = seq.checked_sub(self.acked + 1)? as usize;
        self.slots.get_mut(i)
    }

    /// Issues reads and sends as far as the window allows; sends DONE at the end.
    fn pump(&mut self) {
        if self.phase != Phase::Transfer {
            return;
        }
        let total = self.total();
        let limit = self.window + u32::from(self.cfg.read_ahead);
        while self.next_read <= total && self.next_read - self.acked - 1 < limit {
            let seq = self.next_read;
            let Some(c) = self.plan.as_ref().and_then(|p| p.chunk(seq)) else {
                self.fail(SessionError::Protocol(format!(
                    "no chunk {seq} in the plan"
                )));
                return;
            };
            self.slots.push_back(Slot::Reading);
            self.actions.push_back(SenderAction::ReadChunk {
                seq,
                offset: c.offset,
                len: c.len,
                hash: !self.skip_map.is_empty(),
            });
            self.next_read += 1;
        }
        loop {
            if self.frames_in_flight() >= self.frame_limit() {
                break;
            }
            if let Some(cap) = self.line.cap {
                let b = self.bytes_in_flight();
                if b > 0 && b >= cap {
                    break;
                }
            }
            if !self.resend.is_empty() {
                // Selective repeat: what the target is known to miss of `acked + 1`.
                if !self.send_resend() {
                    return;
                }
                continue;
            }
            if self.next_send > total || self.next_send - self.acked > self.window {
                break;
            }
            let seq = self.next_send;
            let frame = match self.slot_mut(seq) {
                Some(Slot::Ready(f)) => f.clone(),
                _ => break,
            };
            if seq > self.acked + 1 && self.line.part.is_some() {
                // The target reassembles one WRITE at a time: frames of the next one
                // would be dropped if `acked + 1` turns out to miss a part.
                break;
            }
            let plen = frame.payload().len() as u32;
            let mut at = self.next_at;
            let mut limit = plen;
            if seq == self.acked + 1 {
                // Skip what the target holds already.
                at = at.max(self.part_have);
                while let Some(&(_, e)) = self.sacked.iter().find(|&&(s, e)| s <= at && at < e) {
                    at = e;
                }
                if let Some(&(s, _)) = self.sacked.iter().find(|&&(s, _)| s > at) {
                    limit = s;
                }
                if at >= plen {
                    self.next_send += 1;
                    self.next_at = 0;
                    continue;
                }
            }
            let whole = at == 0 && limit == plen && self.line.part.is_none_or(|p| plen <= p);
            let end = if whole {
                plen
            } else {
                let n = self.line.part.unwrap_or(plen).min(limit - at);
                at + n
            };
            if (seq, end) <= self.highest_part {
                self.stats.retransmitted_frames += 1;
            } else {
                self.rtt.sending((seq, end), self.now);
            }
            if whole {
                self.send_data(seq, 0, plen, frame);
            } else if !self.send_part(seq, &frame, at, end) {
                return;
            }
            self.highest_part = self.highest_part.max((seq, end));
            let inflight = self.bytes_in_flight();
            self.line.peak = self.line.peak.max(inflight);
            self.highest_sent = self.highest_sent.max(seq);
            if end >= plen {
                self.next_send += 1;
                self.next_at = 0;
            } else {
                self.next_at = end;
            }
            if self.deadline.is_none() {
                self.deadline = Some(deadline(self.now, self.data_rto()));
            }
        }
        if self.acked == total {
            self.phase = Phase::Done;
            self.send_done();
        }
    }

    /// Sends a data frame (a whole WRITE or a part of one) and records it in flight.
    fn send_data(&mut self, seq: u32, at: u32, end: u32, f: Frame) {
        self.tx += 1;
        self.line.since_loss = self
            .line
            .since_loss
            .saturating_add(u64::from(end.saturating_sub(at)));
        if self.deadline.is_none() {
            self.deadline = Some(deadline(self.now, self.data_rto()));
        }
        self.flight.push_back(Flight {
            seq,
            at,
            end,
            tx: self.tx,
        });
        self.send(f);
    }

    /// Sends bytes `[at, end)` of the WRITE payload of `seq` (`frame`) as one WRITE_PART;
    /// `false` if the session failed.
    fn send_part(&mut self, seq: u32, frame: &Frame, at: u32, end: u32) -> bool {
        // The part carries the WRITE's own kind: a PATCH or DERIVE labelled otherwise
        // would be reassembled into a WRITE the receiver must reject.
        let Some(kind) = WriteKind::from_flags(frame.flags()) else {
            self.fail(SessionError::Protocol(format!(
                "WRITE seq {seq} has no body kind {}",
                frame.flags()
            )));
            return false;
        };
        let plen = frame.payload().len();
        if at >= end || end as usize > plen {
            self.fail(SessionError::Protocol(format!(
                "WRITE_PART [{at}, {end}) is outside WRITE seq {seq} ({plen} bytes)"
            )));
            return false;
        }
        let part = Message::WritePart(WritePart {
            seq,
            kind,
            total: plen as u32,
            at,
            data: frame.payload().slice(at as usize..end as usize),
        });
        match part.to_frame() {
            Ok(f) => {
                self.send_data(seq, at, end, f);
                true
            }
            Err(e) => {
                self.fail(SessionError::Protocol(format!(
                    "cannot encode WRITE_PART seq {seq}: {e}"
                )));
                false
            }
        }
    }

    /// Sends (one part of) the first range of `resend`; `false` if the session failed.
    fn send_resend(&mut self) -> bool {
        let seq = self.acked + 1;
        let Some(Slot::Ready(frame)) = self.slots.front().cloned() else {
            self.resend.clear();
            return true;
        };
        let Some((at, to)) = self.resend.pop_front() else {
            return true;
        };
        let plen = frame.payload().len() as u32;
        let at = at.max(self.part_have);
        let to = to.min(plen);
        if at >= to {
            return true;
        }
        let end = to.min(at.saturating_add(self.line.part.unwrap_or(plen)));
        if end < to {
            self.resend.push_front((end, to));
        }
        self.stats.retransmitted_frames += 1;
        self.send_part(seq, &frame, at, end)
    }

    /// Whether bytes `[at, end)` of the WRITE of `acked + 1` are known held.
    fn held(&self, at: u32, end: u32) -> bool {
        let from = at.max(self.part_have);
        if end <= from {
            return true;
        }
        // The run starting at or before `from` (runs are sorted and disjoint).
        let i = self.sacked.partition_point(|&(s, _)| s <= from);
        i > 0 && self.sacked.get(i - 1).is_some_and(|&(_, e)| end <= e)
    }

    /// Adds the parts of `[at, end)` of the WRITE of `acked + 1` not known held to `resend`.
    fn mark_lost(&mut self, at: u32, end: u32) {
        let mut at = at.max(self.part_have);
        let runs = self.sacked.clone();
        for (s, e) in runs {
            if at >= end {
                break;
            }
            if e <= at {
                continue;
            }
            if s > at {
                self.push_resend(at, s.min(end));
            }
            at = at.max(e);
        }
        if at < end {
            self.push_resend(at, end);
        }
    }

    fn push_resend(&mut self, at: u32, end: u32) {
        if self.resend.iter().any(|&(s, e)| s <= at && end <= e) {
            return;
        }
        let i = self.resend.partition_point(|&(s, _)| s < at);
        self.resend.insert(i, (at, end));
    }

    /// Payload bytes in flight (what the byte cap limits).
    fn bytes_in_flight(&self) -> u32 {
        self.flight
            .iter()
            .fold(0u32, |n, f| n.saturating_add(f.end.saturating_sub(f.at)))
    }

    /// Frames in flight.
    fn frames_in_flight(&self) -> u32 {
        self.flight.len() as u32
    }

    /// Most frames in flight: `cwnd` frames of a whole chunk; as many bytes' worth of
    /// parts when WRITEs are split (the byte cap limits what a loss may cost).
    fn frame_limit(&self) -> u32 {
        let chunk = self.plan.as_ref().map_or(MAX_CHUNK, Plan::chunk_size);
        match self.line.part {
            Some(p) if p > 0 => self
                .line
                .cwnd
                .saturating_mul((chunk / p).max(1))
                .min(MAX_PARTS_IN_FLIGHT),
            _ => self.line.cwnd,
        }
    }

    /// Rewinds the send point to (`seq`, `at`) if it is beyond it.
    fn rewind_to(&mut self, seq: u32, at: u32, reason: &str) -> bool {
        if (self.next_send, self.next_at) <= (seq, at) {
            return false;
        }
        self.next_send = seq;
        self.next_at = at;
        // What was sent from there is sent again: the old copies no longer count.
        self.flight.retain(|f| (f.seq, f.at) < (seq, at));
        self.rtt.rewound((seq, at));
        self.progress(ProgressEvent::Retransmit {
            from_seq: seq,
            reason: reason.to_string(),
        });
        true
    }

    /// A NAK or gap made the sender resend without progress since the last attempt:
    /// counts against the same budget as timeouts (`max_retries` attempts without
    /// progress), so a line that corrupts everything still ends with the resumable
    /// hint. `false` if the session failed.
    fn rewind_attempt(&mut self) -> bool {
        self.retries += 1;
        if self.retries > self.cfg.max_retries {
            self.fail(SessionError::Timeout {
                what: "resending corrupted frames without progress",
                retries: self.cfg.max_retries,
            });
            return false;
        }
        true
    }

    /// The line lost or corrupted something: smaller parts, fewer in flight.
    fn line_error(&mut self, timeout: bool) {
        let chunk = self.plan.as_ref().map_or(MAX_CHUNK, Plan::chunk_size);
        let floor = MIN_CWND.min(self.window.max(1));
        let full = chunk.saturating_mul(self.window.max(1));
        let l = &mut self.line;
        l.clean = 0;
        // Halve after progress; quarter when nothing got through since the last error.
        let fast = timeout || !l.armed;
        l.armed = false;
        let cur = l.part.unwrap_or(chunk);
        let next = if fast { cur / 4 } else { cur / 2 };
        let part = next.max(MIN_PART);
        l.part = Some(part);
        // Fewer bytes in flight (what a loss wastes), but never fewer than a few frames:
        // the frame after a lost one is what shows the receiver the gap.
        // From what was really in flight: a quarter (an eighth when nothing got through
        // since the last error).
        let peak = if l.peak > 0 {
            l.peak
        } else {
            l.cap.unwrap_or(full)
        };
        l.peak = 0;
        let shrunk = if fast { peak / 8 } else { peak / 4 };
        l.cap = Some(shrunk.max(part.saturating_mul(CAP_FRAMES)));
        if timeout {
            // Nothing came back at all: maybe congestion, fewer frames too.
            l.cwnd = (l.cwnd / 2).max(floor);
        }
    }

    /// Selective repeat found lost parts (one loss event: a corrupted length can take
    /// several frames at once): each costs that part only (what followed it is held), so
    /// neither the window nor the byte cap shrink; the part size follows the measured
    /// loss rate.
    fn line_loss(&mut self) {
        let l = &mut self.line;
        l.clean = 0;
        let gap = l.since_loss;
        l.since_loss = 0;
        l.loss_gap = Some(l.loss_gap.map_or(gap, |g| (g + gap) / 2));
        self.fit_part();
    }

    /// Sets the part size from the measured loss rate (see [`FRAME_COST`]); a line clean
    /// for long goes back to whole WRITEs.
    fn fit_part(&mut self) {
        let chunk = self.plan.as_ref().map_or(MAX_CHUNK, Plan::chunk_size);
        let most = self.cfg.max_frame.unwrap_or(chunk).min(chunk);
        let l = &mut self.line;
        let (Some(g), Some(_)) = (l.loss_gap, l.part) else {
            return;
        };
        let gap = g.max(l.since_loss);
        if self.cfg.max_frame.is_none() && l.since_loss >= u64::from(chunk) * u64::from(GROW_AFTER)
        {
            l.part = None;
            l.loss_gap = None;
            return;
        }
        let p = (FRAME_COST.saturating_mul(gap)).isqrt();
        l.part = Some(
            u32::try_from(p)
                .unwrap_or(u32::MAX)
                .clamp(MIN_PART, most.max(MIN_PART)),
        );
    }

    /// Progress without error: grow back (part size first, then the window).
    fn line_progress(&mut self) {
        let chunk = self.plan.as_ref().map_or(MAX_CHUNK, Plan::chunk_size);
        let max_frame = self.cfg.max_frame;
        let window = self.window.max(1);
        let l = &mut self.line;
        l.armed = true;
        l.clean += 1;
        if l.clean < GROW_AFTER {
            return;
        }
        l.clean = 0;
        let most = max_frame.unwrap_or(chunk).min(chunk);
        let fitted = l.loss_gap.is_some();
        match l.part {
            _ if fitted => {}
            Some(p) if p < most => l.part = Some((p * 2).min(most)),
            Some(_) if max_frame.is_none() => l.part = None,
            _ => {}
        }
        if fitted {
            self.fit_part();
        }
        let l = &mut self.line;
        l.cap = l
            .cap
            .map(|c| c.saturating_mul(2))
            .filter(|&c| c < chunk.saturating_mul(window));
        l.cwnd = (l.cwnd * 2).min(window);
    }

    fn on_part_ack(&mut self, a: msg::PartAck) {
        if a.seq == 0 || a.seq > self.highest_sent {
            self.fail(SessionError::Protocol(format!(
                "PART_ACK of seq {}, but only {} was sent",
                a.seq, self.highest_sent
            )));
            return;
        }
        if !self.advance(a.seq - 1) {
            return;
        }
        if a.seq != self.acked + 1 {
            self.pump();
            return; // stale
        }
        let plen = match self.slots.front() {
            Some(Slot::Ready(f)) => f.payload().len() as u32,
            _ => 0,
        };
        if a.have >= plen {
            self.pump();
            return; // not a part of what this sender sent: ignore
        }
        let mut progress = false;
        if a.have > self.part_have {
            self.part_have = a.have;
            self.rtt.covered((a.seq, a.have), self.now);
            if (self.next_send, self.next_at) < (a.seq, a.have) {
                self.next_send = a.seq;
                self.next_at = a.have;
            }
            progress = true;
        }
        if let Some((s, e)) = a.sack.filter(|&(_, e)| e <= plen) {
            progress |= self.add_sacked(s, e);
        }
        let have = self.part_have;
        self.sacked.retain(|&(_, e)| e > have);
        self.resend.retain(|&(_, e)| e > have);
        if progress {
            self.retries = 0;
            self.deadline = Some(deadline(self.now, self.data_rto()));
            self.line_progress();
        }
        if a.gap && a.sack.is_none() {
            // A target without selective repeat dropped a part past `have`: go back
            // to (seq, have) and resend everything from there.
            if self.rewind_to(a.seq, a.have, "gap") {
                self.line_error(false);
                if !self.rewind_attempt() {
                    return;
                }
            }
            self.deadline = Some(deadline(self.now, self.data_rto()));
        } else {
            self.detect_losses();
        }
        self.pump();
    }

    /// Merges a run the target reports held; `true` if it holds more than known.
    fn add_sacked(&mut self, s: u32, e: u32) -> bool {
        let s = s.max(self.part_have);
        if e <= s || self.held(s, e) {
            return false;
        }
        let first = self.sacked.partition_point(|&(_, re)| re < s);
        let last = self.sacked.partition_point(|&(rs, _)| rs <= e);
        let mut run = (s, e);
        for &(rs, re) in self.sacked.get(first..last).unwrap_or(&[]) {
            run = (run.0.min(rs), run.1.max(re));
        }
        self.sacked.splice(first..last, [run]);
        // Nothing known held needs resending.
        let resend: Vec<(u32, u32)> = self.resend.drain(..).collect();
        for (rs, re) in resend {
            self.mark_lost(rs, re);
        }
        true
    }

    /// Selective repeat: the target holds frames of `acked + 1`; the line keeps order,
    /// so every frame sent before the newest of them is either held or lost. Lost parts
    /// of `acked + 1` go to `resend`; frames of later seqs sent meanwhile were dropped
    /// (the target keeps one WRITE's parts only): the send point goes back to the first.
    fn detect_losses(&mut self) {
        let k = self.acked + 1;
        let mut newest = None;
        let mut i = 0;
        while let Some(f) = self.flight.get(i).copied() {
            if f.seq < k || (f.seq == k && self.held(f.at, f.end)) {
                newest = newest.max(Some(f.tx));
                self.flight.remove(i);
            } else {
                i += 1;
            }
        }
        let Some(newest) = newest else { return };
        self.lose_before(newest);
    }

    /// Every frame in flight sent before the `tx`-th is lost: resend it.
    fn lose_before(&mut self, tx: u64) {
        let k = self.acked + 1;
        let mut lost_here = 0u64;
        let mut beyond: Option<(u32, u32)> = None;
        let lost: Vec<Flight> = self.flight.iter().copied().filter(|f| f.tx < tx).collect();
        if lost.is_empty() {
            return;
        }
        self.flight.retain(|f| f.tx >= tx);
        for f in lost {
            if f.seq == k {
                self.mark_lost(f.at, f.end);
                lost_here += 1;
            } else if f.seq > k {
                let key = (f.seq, f.at);
                beyond = Some(beyond.map_or(key, |b| b.min(key)));
            }
        }
        if let Some((seq, at)) = beyond {
            // Later frames were dropped, so are the ones sent after them.
            self.flight.retain(|f| f.seq <= k);
            if (self.next_send, self.next_at) > (seq, at) {
                self.next_send = seq;
                self.next_at = at;
                self.rtt.rewound((seq, at));
            }
        }
        if lost_here > 0 {
            self.line_loss();
        }
    }

    fn on_chunk(&mut self, seq: u32, data: Bytes, hash: Option<ChunkHash>) {
        if !matches!(self.slot_mut(seq), Some(Slot::Reading)) {
            return; // stale (already acknowledged) or not asked for
        }
        let Some(c) = self.plan.as_ref().and_then(|p| p.chunk(seq)) else {
            return;
        };
        if data.len() != c.len as usize {
            self.fail(SessionError::Read {
                seq,
                detail: format!(
                    "expected {} bytes at offset {}, got {} (image truncated or changed?)",
                    c.len,
                    c.offset,
                    data.len()
                ),
            });
            return;
        }
        let derived = self.derive
            && self.manifest.segments.get(c.segment).is_some_and(|s| {
                s.size <= msg::MAX_DERIVED && self.manifest.verity.iter().any(|v| v.hash == s.name)
            });
        let body = if derived {
            self.stats.derived_bytes += u64::from(c.len);
            self.progress(ProgressEvent::Skipped {
                kind: SkipKind::Derived,
                bytes: u64::from(c.len),
            });
            WriteBody::Derive
        } else if is_all_zero(&data) {
            self.stats.zero_bytes += u64::from(c.len);
            self.progress(ProgressEvent::Skipped {
                kind: SkipKind::Zero,
                bytes: u64::from(c.len),
            });
            WriteBody::Zero
        } else if let Some(src) = self.lookup(c.len, hash, &data) {
            self.stats.identical_bytes += u64::from(c.len);
            self.progress(ProgressEvent::Skipped {
                kind: SkipKind::Identical,
                bytes: u64::from(c.len),
            });
            src
        } else if self.zstd {
            if let Some(slot) = self.slot_mut(seq) {
                *slot = Slot::Compressing(data.clone());
            }
            self.actions.push_back(SenderAction::Compress {
                seq,
                offset: c.offset,
                data,
                base: self.base,
                staging: self.patch,
            });
            return;
        } else {
            WriteBody::Raw(data)
        };
        self.make_ready(seq, body);
    }

    fn lookup(&self, len: u32, hash: Option<ChunkHash>, data: &[u8]) -> Option<WriteBody> {
        if self.skip_map.is_empty() {
            return None;
        }
        let h = hash.unwrap_or_else(|| chunk_hash(data));
        self.skip_map.get(&(len, h)).map(|src| WriteBody::Copy {
            src_offset: *src,
            hash: h,
        })
    }

    fn on_compressed(&mut self, seq: u32, body: Option<WriteBody>) {
        let raw = match self.slot_mut(seq) {
            Some(Slot::Compressing(raw)) => raw.clone(),
            _ => return,
        };
        let worth = |n: usize| match self.cfg.compress {
            CompressMode::Zstd => n > 0 && n < raw.len(),
            _ => n > 0 && n <= raw.len() - raw.len() / 16,
        };
        // Only what was negotiated: a shell answer outside it is sent raw.
        let body = body.filter(|b| match b {
            WriteBody::Zstd(c) => self.zstd && worth(c.len()),
            WriteBody::Patch { source, frame, .. } => {
                self.patch
                    && worth(frame.len())
                    && (*source != msg::PatchSource::Base || self.base.is_some())
                    && matches!(source, msg::PatchSource::Base | msg::PatchSource::Staging)
            }
            _ => false,
        });
        let body = match body {
            Some(b) => {
                let wire = match &b {
                    WriteBody::Patch { frame, .. } => frame.len(),
                    other => other.wire_len(),
                };
                let saved = raw.len().saturating_sub(wire) as u64;
                let kind = match &b {
                    WriteBody::Patch {
                        source: msg::PatchSource::Base,
                        ..
                    } => {
                        self.stats.patched_saved += saved;
                        SkipKind::Patched
                    }
                    _ => {
                        self.stats.compressed_saved += saved;
                        SkipKind::Compressed
                    }
                };
                self.progress(ProgressEvent::Skipped { kind, bytes: saved });
                b
            }
            None => WriteBody::Raw(raw),
        };
        self.make_ready(seq, body);
    }

    fn make_ready(&mut self, seq: u32, body: WriteBody) {
        let Some(c) = self.plan.as_ref().and_then(|p| p.chunk(seq)) else {
            return;
        };
        let Some(seg) = self.manifest.segments.get(c.segment) else {
            return;
        };
        let w = Message::Write(Write {
            seq,
            segment: seg.name.clone(),
            offset: c.rel_offset,
            len: c.len,
            body,
        });
        match w.to_frame() {
            Ok(f) => {
                if let Some(slot) = self.slot_mut(seq) {
                    *slot = Slot::Ready(f);
                }
                self.pump();
            }
            Err(e) => self.fail(SessionError::Protocol(format!(
                "cannot encode WRITE seq {seq}: {e}"
            ))),
        }
    }

    /// Cumulative acknowledgement of every seq ≤ `ack`.
    fn advance(&mut self, ack: u32) -> bool {
        if ack <= self.acked {
            return true; // duplicate or stale: harmless
        }
        if ack > self.highest_sent {
            self.fail(SessionError::Protocol(format!(
                "target acknowledged seq {ack}, but only {} was sent",
                self.highest_sent
            )));
            return false;
        }
        let n = (ack - self.acked) as usize;
        self.slots.drain(..n.min(self.slots.len()));
        self.rtt.covered((ack, u32::MAX), self.now);
        self.acked = ack;
        self.part_have = 0;
        self.sacked.clear();
        self.resend.clear();
        self.flight.retain(|f| f.seq > ack);
        if self.next_send <= ack {
            self.next_send = ack + 1;
            self.next_at = 0;
        }
        self.retries = 0;
        self.line_progress();
        self.deadline = if self.highest_sent > self.acked {
            Some(deadline(self.now, self.data_rto()))
        } else {
            None
        };
        if let Some(p) = &self.plan {
            if let Some(c) = p.chunk(ack) {
                let seg = self.manifest.segments.get(c.segment);
                let (first, _) = p.segment_chunks(c.segment).unwrap_or((0, 0));
                let seg_base = p.bytes_done(first);
                let done_bytes = p.bytes_done(ack);
                let ev = ProgressEvent::Progress {
                    segment: seg.map(|s| s.name.clone()).unwrap_or_default(),
                    segment_done: done_bytes - seg_base,
                    segment_total: seg.map(|s| s.data_bytes()).unwrap_or(0),
                    done_bytes,
                    total_bytes: p.data_bytes(),
                    wire_bytes: self.stats.wire_bytes,
                };
                self.progress(ev);
            }
        }
        true
    }

    fn on_ack(&mut self, ack: u32) {
        if self.advance(ack) {
            self.pump();
        }
    }

    fn on_nak(&mut self, seq: u32, reason: NakReason) {
        if seq == 0 {
            self.fail(SessionError::Protocol("NAK of seq 0".to_string()));
            return;
        }
        if !self.advance(seq - 1) {
            return;
        }
        if seq <= self.acked || seq > self.highest_sent {
            // Stale, or nothing to resend (the receiver is just ahead of us).
            self.pump();
            return;
        }
        if seq == self.acked + 1 && self.line.part.is_some() {
            self.sack_nak(reason);
            self.pump();
            return;
        }
        let at = if seq == self.acked + 1 {
            self.part_have
        } else {
            0
        };
        if self.rewind_to(seq, at, "nak") {
            self.line_error(false);
            if !self.rewind_attempt() {
                return;
            }
        }
        self.deadline = Some(deadline(self.now, self.data_rto()));
        self.pump();
    }

    /// A NAK for `acked + 1` while its WRITE goes out in parts (selective repeat).
    /// `gap`: a frame of a later seq arrived while the target still missed something of
    /// `acked + 1` (its last parts were lost, nothing showed it): those later frames were
    /// dropped, so the parts of `acked + 1` sent before the first of them are lost.
    /// `corrupt`: some frame was lost; the PART_ACK of the next one shows which, unless
    /// nothing new can be sent now: then all that is in flight is resent.
    fn sack_nak(&mut self, reason: NakReason) {
        let k = self.acked + 1;
        let first_beyond = self.flight.iter().find(|f| f.seq > k).map(|f| f.tx);
        let lost_from = match (reason, first_beyond) {
            (NakReason::Gap, Some(tx)) => tx,
            _ => {
                // A tail loss probe: nothing new would show which frame was lost, so
                // the newest part in flight goes again; the PART_ACK it gets shows it.
                if !self.new_data_blocked() {
                    return;
                }
                let Some(i) = self.flight.iter().rposition(|f| f.seq == k) else {
                    return;
                };
                if !self.rewind_attempt() {
                    return;
                }
                if let Some(f) = self.flight.remove(i) {
                    self.mark_lost(f.at, f.end);
                }
                self.deadline = Some(deadline(self.now, self.data_rto()));
                return;
            }
        };
        if !self.rewind_attempt() {
            return;
        }
        self.lose_before(lost_from);
        if let Some((seq, at)) = self
            .flight
            .iter()
            .filter(|f| f.seq > k)
            .map(|f| (f.seq, f.at))
            .min()
        {
            self.flight.retain(|f| f.seq <= k);
            if (self.next_send, self.next_at) > (seq, at) {
                self.next_send = seq;
                self.next_at = at;
                self.rtt.rewound((seq, at));
            }
        }
        self.progress(ProgressEvent::Retransmit {
            from_seq: k,
            reason: "nak".to_string(),
        });
        self.deadline = Some(deadline(self.now, self.data_rto()));
    }

    /// No new data frame can go out now (the end, the window, a known hole in
    /// `acked + 1`, or the next WRITE not ready): nothing sent later would show a loss.
    fn new_data_blocked(&self) -> bool {
        let seq = self.next_send;
        seq > self.total()
            || seq - self.acked > self.window
            || (seq > self.acked + 1 && self.line.part.is_some())
            || !matches!(
                seq.checked_sub(self.acked + 1)
                    .and_then(|i| self.slots.get(i as usize)),
                Some(Slot::Ready(_))
            )
    }

    fn on_tick(&mut self) {
        let Some(d) = self.deadline else { return };
        if self.now < d {
            return;
        }
        self.retries += 1;
        if self.retries > self.cfg.max_retries {
            let what = match self.phase {
                Phase::Hello => "waiting for HELLO_REPLY",
                Phase::Done => "waiting for DONE_REPLY",
                _ => "waiting for ACK",
            };
            self.fail(SessionError::Timeout {
                what,
                retries: self.cfg.max_retries,
            });
            return;
        }
        match self.phase {
            Phase::Hello => self.send_hello(),
            Phase::Done => self.send_done(),
            Phase::Transfer => {
                self.deadline = None;
                if self.highest_sent > self.acked {
                    self.rtt.backoff += 1;
                    let from = self.acked + 1;
                    let at = self.part_have;
                    self.rtt.rewound((from, at));
                    // Everything in flight counts as lost; what the target holds past a
                    // hole (`sacked`) is still skipped.
                    self.flight.clear();
                    self.resend.clear();
                    self.line_error(true);
                    if !self.rewind_to(from, at, "timeout") {
                        self.progress(ProgressEvent::Retransmit {
                            from_seq: from,
                            reason: "timeout".to_string(),
                        });
                    }
                    self.deadline = Some(deadline(self.now, self.data_rto()));
                }
                self.pump();
            }
            Phase::Created | Phase::Over => self.deadline = None,
        }
    }
}
