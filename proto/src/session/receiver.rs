//! The target side: validates every WRITE, tells the shell where to write, when to
//! sync, persist the journal, verify a segment and install.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::frame::Frame;
use crate::image::ImageHead;
use crate::manifest::Manifest;
use crate::msg::{
    self, Ack, BaseImage, DoneReply, DoneStatus, ErrorCode, ErrorMsg, Hello, HelloReply, InfoReply,
    InstalledInfo, Message, MsgType, Nak, NakReason, PartAck, PatchSource, TransferInfo, Verified,
    Write, WriteBody, WriteKind, WritePart, COMPRESS_DERIVE, COMPRESS_PATCH, COMPRESS_ZSTD,
    MAX_CHUNK, MAX_WINDOW, PROTO_VERSION,
};
use crate::trust::TrustPolicy;

use super::hexser;
use super::plan::{Plan, SkipIndex};
use super::{Journal, JOURNAL_VERSION};

/// Target-side settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiverConfig {
    /// Device name (`[A-Za-z0-9._-]{1,64}`), sent in replies.
    pub device: String,
    /// Free text (≤ 128 bytes), e.g. "flashd 0.1.0".
    pub info: String,
    /// Largest window accepted. Default 64.
    pub max_window: u16,
    /// Largest chunk size accepted (power of two). Default 1 MiB.
    pub max_chunk: u32,
    /// The shell can decompress zstd.
    pub zstd: bool,
    /// The shell can compute derived segments (`DERIVE` writes: the dm-verity hash tree of
    /// a `verity` entry from its data segment). Default off.
    pub derive: bool,
    /// The keys and anti-rollback floor (see [`crate::trust`]); the shell refreshes it with
    /// [`Receiver::set_trust`] whenever its trust store may have changed.
    pub trust: TrustPolicy,
    /// Largest image (bytes) the staging area and install target can take.
    pub max_image_size: u64,
    /// Persist the journal at least every this many chunks (`None` = once per
    /// accepted window). Resume re-sends at most this many chunks plus the ones
    /// written while the last sync was in flight.
    pub checkpoint_chunks: Option<u32>,
    /// `Some(reason)`: refuse every flash with `ERROR 11 no_state` (e.g. no usable
    /// state directory); `INFO?` is still answered.
    pub refuse: Option<String>,
}

impl ReceiverConfig {
    pub fn new(device: impl Into<String>) -> ReceiverConfig {
        ReceiverConfig {
            device: device.into(),
            info: format!("flashd {}", env!("CARGO_PKG_VERSION")),
            max_window: 64,
            max_chunk: MAX_CHUNK,
            zstd: true,
            derive: false,
            trust: TrustPolicy::default(),
            max_image_size: 1 << 40,
            checkpoint_chunks: None,
            refuse: None,
        }
    }
}

/// What is installed on the target (the shell keeps it, e.g. in
/// `last-install.json`, and passes it to [`Receiver::new`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstalledImage {
    #[serde(with = "hexser::arr32")]
    pub image_id: [u8; 32],
    #[serde(with = "hexser::arr32")]
    pub image_sha256: [u8; 32],
    pub total_size: u64,
    pub version: String,
    /// Chunk hashes for skipping; `None` disables chunk-level skipping (the
    /// whole-image short-circuit still works).
    pub index: Option<SkipIndex>,
}

/// Events the shell feeds into a [`Receiver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// A frame decoded from the link.
    Frame(Frame),
    /// The frame decoder discarded `bytes` (bad CRC, garbage): the receiver may NAK.
    Corrupt { bytes: usize },
    /// The link closed (host gone). The receiver keeps its progress for the next HELLO.
    LinkDown,
    /// Answer to [`ReceiverAction::SyncStaging`]: everything written up to and
    /// including chunk `upto_seq` (and the head) is on stable storage.
    StagingSynced { upto_seq: u32 },
    /// Answer to [`ReceiverAction::VerifySegment`].
    SegmentVerified { ticket: u64, ok: bool },
    /// Answer to [`ReceiverAction::VerifySegment`] when the shell checked the segment piece
    /// by piece (`chunk_sha256`) and the piece at `rel_offset` (relative to the segment) was
    /// the first that did not match: as `SegmentVerified { ok: false }`, but the transfer
    /// resumes from that piece instead of the segment's start (a bad 1 MiB piece costs
    /// 1 MiB, not the whole segment).
    SegmentRejected { ticket: u64, rel_offset: u64 },
    /// Answer to [`ReceiverAction::Install`]. `detail` says what failed.
    Installed { ok: bool, detail: String },
    /// An action failed in the shell (write, copy, decompress, sync, journal).
    /// `code` is usually `Storage` (or `BadWrite` for undecodable zstd data).
    /// Report it right after the failed action: the receiver discards the actions
    /// it queued that were not executed yet (e.g. the ACK covering a failed write).
    ActionFailed { code: ErrorCode, text: String },
    /// Answer to `OpenStaging { fresh: false }` when the staging file is missing,
    /// has the wrong size or cannot be trusted: the receiver discards the queued
    /// actions, forgets the journal and restarts the session from scratch.
    StagingLost,
}

/// What a [`Receiver`] reports to its shell, as data (the target-side counterpart of the
/// sender's [`super::ProgressEvent`]). flashd turns the first six into its console markers
/// (`nx_contract::markers::flashd`) and the rest into log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverReport {
    /// A host said HELLO (`host` is a validated peer name).
    Hello { host: String, proto: u8 },
    /// The session failed: the ERROR sent to the host (`text` as sent, sanitized).
    Error { code: ErrorCode, text: String },
    /// The image was refused by the trust policy (nothing was written); also reported as
    /// [`ReceiverReport::Error`].
    Refused { reason: String },
    /// The image passed the trust policy: signed by `key` (`None`: the target is
    /// unprovisioned and accepts anything), `downgrade`: below the floor with a development key.
    Trusted {
        key: Option<String>,
        security_version: u64,
        downgrade: bool,
    },
    /// Every chunk of segment `segment` (`bytes` long) is written.
    SegmentWritten { segment: String, bytes: u64 },
    /// Every segment verified; the install starts.
    VerifyOk,
    /// Segment `segment` did not match its SHA-256.
    VerifyFailed { segment: String },
    /// The install completed.
    Installed,
    /// The staging file was lost: the transfer restarts from scratch.
    StagingLost,
    /// The host sent ABORT.
    HostAborted { code: ErrorCode, reason: String },
    /// A copied or patched chunk did not verify: the skip index of the installed image and
    /// the base image were dropped (the next session sends real data).
    SkipIndexDropped,
    /// Internal: a message could not be encoded (it was not sent).
    EncodeFailed {
        message: &'static str,
        error: String,
    },
}

/// What the shell must do for a [`Receiver`], in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverAction {
    /// Write this frame to the link.
    Send(Frame),
    /// Something happened that the shell reports (flashd prints a console marker or a log
    /// line for it); the receiver formats no text itself.
    Report(ReceiverReport),
    /// Open the staging file for this image, `total_size` bytes long. `fresh`:
    /// truncate it to 0 first (it held another image) so that every byte not
    /// written later is zero. Not fresh: keep its content (resume), set the length.
    OpenStaging {
        image_id: [u8; 32],
        total_size: u64,
        fresh: bool,
    },
    /// Write the image head at offset 0 of the staging file.
    WriteHead(Bytes),
    /// Write chunk `seq` at absolute `offset` of the staging file: `len` bytes from
    /// `body` (raw data; zeros; zstd data to decompress, refusing more than `len`
    /// bytes out; or a copy of `len` bytes from the installed image at
    /// `src_offset`, which should hash to `hash`). Report failure with `ActionFailed`.
    Write {
        seq: u32,
        offset: u64,
        len: u32,
        body: WriteBody,
    },
    /// fsync the staging file, then answer `StagingSynced { upto_seq }`.
    SyncStaging { upto_seq: u32 },
    /// Persist this journal atomically (write temp, fsync, rename).
    PersistJournal(Journal),
    /// Delete the journal (before a fresh staging starts, and after install).
    ClearJournal,
    /// Hash staging bytes `[offset, offset+size)` with SHA-256, compare with
    /// `sha256`, answer `SegmentVerified { ticket, ok }`. May run in the background,
    /// after the writes queued before it.
    VerifySegment {
        ticket: u64,
        segment: usize,
        name: String,
        offset: u64,
        size: u64,
        sha256: [u8; 32],
    },
    /// Install the staging file (fsync + rename to a file; write + fsync + read-back
    /// hash to a block device), then answer `Installed`. `unchanged`: the identical
    /// image is already installed; the shell may just confirm it.
    Install {
        image_id: [u8; 32],
        image_sha256: [u8; 32],
        total_size: u64,
        unchanged: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No session: waiting for HELLO.
    Idle,
    /// Receiving WRITEs.
    Transfer,
    /// The identical image is installed: waiting for DONE.
    Unchanged,
    /// DONE received: waiting for the last verifications.
    Finishing,
    /// Install action emitted.
    Installing { unchanged: bool },
    /// Installed; a repeated DONE gets the same reply.
    Installed { unchanged: bool },
    /// ERROR sent; only a new HELLO (or INFO?) gets an answer.
    Failed,
}

/// The transfer of one image into staging: survives link cuts (not restarts —
/// that is the journal's job).
#[derive(Debug)]
struct Xfer {
    image_id: [u8; 32],
    head: Bytes,
    manifest: Manifest,
    plan: Plan,
    /// Chunks accepted in order (R).
    received: u32,
    /// Chunks durable (D ≤ R).
    durable: u32,
    sync_in_flight: Option<u32>,
    verified: Vec<bool>,
    /// Ticket of the outstanding verification per segment.
    verifying: Vec<Option<u64>>,
    /// `wrote seg=` marker emitted.
    announced: Vec<bool>,
    used_copy: Vec<bool>,
    /// The staging file holds this transfer (false for an unchanged-image session
    /// and after the staging file was installed).
    staged: bool,
}

impl Xfer {
    fn journal(&self) -> Journal {
        let verified = (0..self.verified.len())
            .map(|i| self.verified[i] && self.plan.segment_complete(i, self.durable))
            .collect();
        let durable_offset = self
            .plan
            .chunk(self.durable)
            .map_or(self.manifest.data_offset(), |c| c.offset + u64::from(c.len));
        Journal {
            version: JOURNAL_VERSION,
            image_id: self.image_id,
            image_sha256: self.manifest.image_sha256,
            total_size: self.manifest.total_size,
            chunk_size: self.plan.chunk_size(),
            plan_chunks: self.plan.total(),
            durable_seq: self.durable,
            durable_offset,
            verified,
        }
    }

    /// Forgets every chunk after `pos`: segments not complete at `pos` lose their
    /// verified flag (their bytes will be written again and must be verified again).
    fn rewind(&mut self, pos: u32) {
        self.received = self.received.min(pos);
        self.durable = self.durable.min(pos);
        for i in 0..self.verified.len() {
            if !self.plan.segment_complete(i, self.received) {
                self.verified[i] = false;
                self.verifying[i] = None;
                self.announced[i] = false;
                self.used_copy[i] = false;
            }
        }
    }

    fn verified_mask(&self) -> u64 {
        let mut m = 0u64;
        for (i, v) in self.verified.iter().enumerate().take(64) {
            if *v {
                m |= 1 << i;
            }
        }
        m
    }
}

/// Per-connection state.
#[derive(Debug, Default)]
struct Link {
    nonce: u64,
    host: String,
    window: u16,
    compression: u8,
    skip: bool,
    /// The HELLO asked for `--allow-downgrade`.
    allow_downgrade: bool,
    /// NAK gate: (expected seq the NAK was sent for, highest frame seen since, as
    /// `seq << 32 | part offset`).
    nak: Option<(u32, u64)>,
    /// The WRITE of chunk `received + 1` being reassembled from WRITE_PARTs.
    part: Option<PartBuf>,
}

/// A WRITE payload being reassembled (bounded by the planned chunk's len plus
/// [`msg::WRITE_HEADER_MAX`]).
#[derive(Debug)]
struct PartBuf {
    seq: u32,
    kind: WriteKind,
    total: u32,
    /// `total` bytes; `[0, have)` and the `held` runs are filled.
    buf: BytesMut,
    /// The contiguous prefix held.
    have: u32,
    /// Runs held past a hole (parts that arrived after a lost one): sorted, disjoint,
    /// not touching, all past `have`, at most [`MAX_HELD_RUNS`].
    held: Vec<(u32, u32)>,
}

/// Most separate runs a reassembly keeps past its holes; a part that would open another
/// is dropped (the host resends it once it learns it is missing).
const MAX_HELD_RUNS: usize = 64;

/// Fewest corrupt bytes before any session that the target answers with `NAK 0` (a HELLO
/// carries at least its fixed fields and an image head, far more than this).
const HELLO_NAK_MIN: usize = 64;

/// Where a part went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    /// Nothing new (already held, or dropped: too many runs).
    Nothing,
    /// It extended the held prefix.
    Prefix,
    /// It was kept past a hole, in the held run `(start, end)`.
    Past((u32, u32)),
}

impl PartBuf {
    fn new(seq: u32, kind: WriteKind, total: u32) -> PartBuf {
        let mut buf = BytesMut::with_capacity(total as usize);
        buf.resize(total as usize, 0);
        PartBuf {
            seq,
            kind,
            total,
            buf,
            have: 0,
            held: Vec::new(),
        }
    }

    /// Stores `data` at `at` (`at + data.len() ≤ total`, checked by the decoder).
    fn put(&mut self, at: u32, data: &[u8]) -> Stored {
        let end = at.saturating_add(data.len() as u32).min(self.total);
        let from = at.max(self.have);
        if end <= from || self.held.iter().any(|&(s, e)| s <= from && end <= e) {
            return Stored::Nothing;
        }
        // The runs it touches (overlapping or adjacent) merge with it.
        let first = self.held.partition_point(|&(_, e)| e < from);
        let last = self.held.partition_point(|&(s, _)| s <= end);
        let opens = first == last;
        if from > self.have && opens && self.held.len() >= MAX_HELD_RUNS {
            return Stored::Nothing;
        }
        let (Some(dst), Some(src)) = (
            self.buf.get_mut(from as usize..end as usize),
            data.get((from - at) as usize..),
        ) else {
            return Stored::Nothing;
        };
        dst.copy_from_slice(src);
        let mut run = (from, end);
        for &(s, e) in self.held.get(first..last).unwrap_or(&[]) {
            run = (run.0.min(s), run.1.max(e));
        }
        self.held.splice(first..last, [run]);
        if run.0 <= self.have {
            // It reaches the prefix: the prefix jumps over the run.
            self.have = run.1;
            self.held.retain(|&(s, _)| s > self.have);
            Stored::Prefix
        } else {
            Stored::Past(run)
        }
    }

    /// The first held run past the hole, if any.
    fn first_run(&self) -> Option<(u32, u32)> {
        self.held.first().copied()
    }
}

/// The receiver state machine. Create one per process (not per connection) with
/// the journal and install record from storage.
#[derive(Debug)]
pub struct Receiver {
    cfg: ReceiverConfig,
    phase: Phase,
    link: Link,
    xfer: Option<Xfer>,
    journal: Option<Journal>,
    installed: Option<InstalledImage>,
    /// The image `PATCH` writes may reference (the shell sets it, see [`Receiver::set_base`]).
    base: Option<BaseImage>,
    deferred_hello: Option<Hello>,
    /// The HELLO of the current session (to restart it if staging is lost).
    last_hello: Option<Hello>,
    next_ticket: u64,
    actions: VecDeque<ReceiverAction>,
}

enum Fatal {
    Err(ErrorCode, String),
}

impl Receiver {
    /// `journal`: the last persisted journal (if any); `installed`: what is installed.
    pub fn new(
        cfg: ReceiverConfig,
        journal: Option<Journal>,
        installed: Option<InstalledImage>,
    ) -> Receiver {
        let mut cfg = cfg;
        if msg::validate_peer_name(&cfg.device).is_err() {
            let d: String = cfg
                .device
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                        c
                    } else {
                        '-'
                    }
                })
                .take(msg::MAX_NAME_LEN)
                .collect();
            cfg.device = if d.is_empty() {
                "target".to_string()
            } else {
                d
            };
        }
        cfg.max_window = cfg.max_window.clamp(1, MAX_WINDOW);
        if !msg::valid_chunk_size(cfg.max_chunk) {
            cfg.max_chunk = MAX_CHUNK;
        }
        Receiver {
            cfg,
            phase: Phase::Idle,
            link: Link::default(),
            xfer: None,
            journal: journal.filter(|j| j.version == JOURNAL_VERSION),
            installed,
            base: None,
            deferred_hello: None,
            last_hello: None,
            next_ticket: 1,
            actions: VecDeque::new(),
        }
    }

    /// Next action to execute, in order.
    pub fn poll_action(&mut self) -> Option<ReceiverAction> {
        self.actions.pop_front()
    }

    /// The journal as it would be persisted now (None without a transfer).
    pub fn journal(&self) -> Option<Journal> {
        self.xfer
            .as_ref()
            .filter(|x| x.staged)
            .map(Xfer::journal)
            .or_else(|| self.journal.clone())
    }

    /// What is installed.
    pub fn installed(&self) -> Option<&InstalledImage> {
        self.installed.as_ref()
    }

    /// Replace the trust policy (the shell reloads its trust store before each session).
    pub fn set_trust(&mut self, trust: TrustPolicy) {
        self.cfg.trust = trust;
    }

    /// The trust policy in force.
    pub fn trust(&self) -> &TrustPolicy {
        &self.cfg.trust
    }

    /// The base image the shell can read while a new image is received (the active slot,
    /// or the installed file), offered to hosts that can send `PATCH` writes; `None`: none.
    /// Dropped by the receiver when a segment patched from it fails verification.
    pub fn set_base(&mut self, base: Option<BaseImage>) {
        self.base = base;
    }

    /// The current base image (see [`Receiver::set_base`]).
    pub fn base(&self) -> Option<&BaseImage> {
        self.base.as_ref()
    }

    /// Replaces the install record (e.g. once the shell has built a skip index for
    /// the image it just installed).
    pub fn set_installed(&mut self, installed: Option<InstalledImage>) {
        self.installed = installed;
    }

    /// Chunks accepted so far in the current transfer.
    pub fn received(&self) -> u32 {
        self.xfer.as_ref().map_or(0, |x| x.received)
    }

    /// `true` while no session is active (ready for a HELLO).
    pub fn is_idle(&self) -> bool {
        self.phase == Phase::Idle
    }

    /// Feeds one event.
    pub fn handle(&mut self, ev: ReceiverEvent) {
        match ev {
            ReceiverEvent::Frame(f) => self.on_frame(f),
            ReceiverEvent::Corrupt { bytes } => {
                // While a WRITE is reassembled from parts the host learns a lost part
                // from the PART_ACK of the next one (selective repeat); the NAK matters
                // when nothing follows (the last part in flight was lost).
                if self.phase == Phase::Transfer {
                    self.maybe_nak(None, NakReason::Corrupt);
                } else if self.phase == Phase::Idle && bytes >= HELLO_NAK_MIN {
                    // No session yet: what was lost is most likely a HELLO. Seq 0 (never a
                    // chunk) says so; the host resends it at once instead of after its first
                    // timeout. Short garbage (a cut frame's tail at connect) is not reported.
                    self.send(Message::Nak(Nak {
                        seq: 0,
                        reason: NakReason::Corrupt,
                    }));
                }
            }
            ReceiverEvent::LinkDown => self.on_link_down(),
            ReceiverEvent::StagingSynced { upto_seq } => self.on_synced(upto_seq),
            ReceiverEvent::SegmentVerified { ticket, ok } => self.on_verified(ticket, ok, None),
            ReceiverEvent::SegmentRejected { ticket, rel_offset } => {
                self.on_verified(ticket, false, Some(rel_offset))
            }
            ReceiverEvent::Installed { ok, detail } => self.on_installed(ok, &detail),
            ReceiverEvent::StagingLost => {
                self.actions.clear();
                self.xfer = None;
                self.journal = None;
                self.push(ReceiverAction::Report(ReceiverReport::StagingLost));
                match self.last_hello.take() {
                    Some(h) if self.phase == Phase::Transfer => {
                        if let Err(Fatal::Err(code, text)) = self.start_session(h, false) {
                            self.fail(code, &text);
                        }
                    }
                    _ => {
                        self.push(ReceiverAction::ClearJournal);
                        self.phase = Phase::Idle;
                    }
                }
            }
            ReceiverEvent::ActionFailed { code, text } => {
                // Queued actions after the failed one must not run (e.g. its ACK).
                self.actions.clear();
                // Whatever failed, the journal was not advanced past it.
                if let Some(x) = &mut self.xfer {
                    x.sync_in_flight = None;
                    let d = x.durable;
                    x.rewind(d);
                    for v in x.verifying.iter_mut() {
                        *v = None;
                    }
                }
                if matches!(self.phase, Phase::Installing { .. }) {
                    self.phase = Phase::Failed;
                }
                self.fail(code, &text);
            }
        }
    }

    // ------------------------------------------------------------ helpers

    fn push(&mut self, a: ReceiverAction) {
        self.actions.push_back(a);
    }

    fn send(&mut self, m: Message) {
        match m.to_frame() {
            Ok(f) => self.push(ReceiverAction::Send(f)),
            Err(e) => self.push(ReceiverAction::Report(ReceiverReport::EncodeFailed {
                message: m.msg_type().name(),
                error: e.to_string(),
            })),
        }
    }

    /// Sends ERROR, reports it ([`ReceiverReport::Error`]), ends the session.
    fn fail(&mut self, code: ErrorCode, text: &str) {
        let e = ErrorMsg::new(code, text);
        self.push(ReceiverAction::Report(ReceiverReport::Error {
            code,
            text: e.text.clone(),
        }));
        self.send(Message::Error(e));
        if !matches!(self.phase, Phase::Installing { .. }) {
            self.phase = Phase::Failed;
        }
        self.link.nak = None;
    }

    fn on_frame(&mut self, f: Frame) {
        let m = match Message::from_frame(&f) {
            Ok(m) => m,
            Err(e) => {
                let code = if f.msg_type() == MsgType::Write as u8 {
                    ErrorCode::BadWrite
                } else {
                    ErrorCode::Protocol
                };
                self.fail(code, &format!("rejected message: {e}"));
                return;
            }
        };
        match m {
            Message::Hello(h) => {
                if matches!(self.phase, Phase::Installing { .. }) {
                    self.deferred_hello = Some(h);
                } else {
                    self.on_hello(h);
                }
            }
            Message::Info => self.on_info(),
            Message::Write(w) => self.on_write(w),
            Message::WritePart(p) => self.on_write_part(p),
            Message::Done(d) => self.on_done(d.image_sha256),
            Message::Abort(a) => {
                self.push(ReceiverAction::Report(ReceiverReport::HostAborted {
                    code: a.code,
                    reason: a.reason,
                }));
                if !matches!(self.phase, Phase::Installing { .. }) {
                    self.phase = Phase::Idle;
                }
                self.checkpoint(true);
            }
            other => {
                if self.phase != Phase::Failed {
                    self.fail(
                        ErrorCode::Protocol,
                        &format!("unexpected {} from the host", other.msg_type().name()),
                    );
                }
            }
        }
    }

    fn on_link_down(&mut self) {
        self.link = Link::default();
        if !matches!(self.phase, Phase::Installing { .. }) {
            self.phase = Phase::Idle;
        }
        self.checkpoint(true);
    }

    fn on_info(&mut self) {
        let installed = self.installed.as_ref().map(|i| InstalledInfo {
            image_id: i.image_id,
            image_sha256: i.image_sha256,
            total_size: i.total_size,
            version: msg::sanitize_text(&i.version, msg::MAX_VERSION_LEN),
        });
        let transfer = self.journal().and_then(|j| {
            msg::valid_chunk_size(j.chunk_size).then(|| TransferInfo {
                image_id: j.image_id,
                chunk_size: j.chunk_size,
                next_seq: j.durable_seq,
                plan_chunks: j.plan_chunks,
                verified: j.resume_point().verified,
            })
        });
        let r = InfoReply {
            proto: PROTO_VERSION,
            device: self.cfg.device.clone(),
            info: msg::sanitize_text(&self.cfg.info, msg::MAX_INFO_LEN),
            max_window: self.cfg.max_window,
            max_chunk: self.cfg.max_chunk,
            compression: if self.cfg.zstd {
                COMPRESS_ZSTD | COMPRESS_PATCH
            } else {
                0
            } | if self.cfg.derive { COMPRESS_DERIVE } else { 0 },
            installed,
            transfer,
            base: self.base,
        };
        self.send(Message::InfoReply(r));
    }

    // ------------------------------------------------------------ HELLO

    fn on_hello(&mut self, h: Hello) {
        // A repeated HELLO on the same connection (its reply was lost): answer again.
        if matches!(self.phase, Phase::Transfer | Phase::Unchanged)
            && h.nonce == self.link.nonce
            && self.link.host == h.host
            && self.xfer.as_ref().is_some_and(|x| x.head == h.head)
        {
            self.reply_hello(self.phase == Phase::Unchanged);
            return;
        }
        if let Err(Fatal::Err(code, text)) = self.start_session(h, true) {
            self.fail(code, &text);
        }
    }

    fn start_session(&mut self, h: Hello, announce: bool) -> Result<(), Fatal> {
        self.link = Link::default();
        self.phase = Phase::Idle;
        self.last_hello = Some(h.clone());
        if h.proto != PROTO_VERSION {
            return Err(Fatal::Err(
                ErrorCode::Version,
                format!(
                    "protocol {} is not supported; this target speaks proto={PROTO_VERSION}",
                    h.proto
                ),
            ));
        }
        if announce {
            self.push(ReceiverAction::Report(ReceiverReport::Hello {
                host: h.host.clone(),
                proto: h.proto,
            }));
        }
        if let Some(reason) = &self.cfg.refuse {
            return Err(Fatal::Err(ErrorCode::NoState, reason.clone()));
        }
        let head = ImageHead::parse(&h.head)
            .map_err(|e| Fatal::Err(ErrorCode::BadImage, format!("image head rejected: {e}")))?;
        match self.cfg.trust.check(&head, h.allow_downgrade) {
            Ok(a) => self.push(ReceiverAction::Report(ReceiverReport::Trusted {
                key: a.key,
                security_version: head.manifest.security_version,
                downgrade: a.downgrade,
            })),
            Err(r) => {
                let reason = r.to_string();
                self.push(ReceiverAction::Report(ReceiverReport::Refused {
                    reason: reason.clone(),
                }));
                let code = if r.is_rollback() {
                    ErrorCode::Rollback
                } else {
                    ErrorCode::Signature
                };
                return Err(Fatal::Err(code, format!("refused image: {reason}")));
            }
        }
        let manifest = head.manifest;
        if manifest.total_size > self.cfg.max_image_size {
            return Err(Fatal::Err(
                ErrorCode::TooLarge,
                format!(
                    "image is {} bytes, this target accepts at most {}",
                    manifest.total_size, self.cfg.max_image_size
                ),
            ));
        }
        let image_id = manifest.id();
        let host_chunk = h.chunk_size.min(self.cfg.max_chunk);
        self.link = Link {
            nonce: h.nonce,
            host: h.host.clone(),
            window: h.window.min(self.cfg.max_window),
            compression: if self.cfg.zstd && h.compression & COMPRESS_ZSTD != 0 {
                h.compression & (COMPRESS_ZSTD | COMPRESS_PATCH)
            } else {
                0
            } | if self.cfg.derive {
                h.compression & COMPRESS_DERIVE
            } else {
                0
            },
            skip: h.skip,
            allow_downgrade: h.allow_downgrade,
            nak: None,
            part: None,
        };

        // Identical image already installed: short-circuit.
        if h.skip {
            if let Some(i) = &self.installed {
                if i.image_id == image_id && i.image_sha256 == manifest.image_sha256 {
                    let plan = Plan::new(&manifest, host_chunk)
                        .map_err(|e| Fatal::Err(ErrorCode::Capability, e.to_string()))?;
                    // Keep any partial staging transfer of another image untouched.
                    self.stash_xfer();
                    let mut x = new_xfer(image_id, h.head.clone(), manifest, plan);
                    x.staged = false;
                    self.xfer = Some(x);
                    self.phase = Phase::Unchanged;
                    self.reply_hello(true);
                    return Ok(());
                }
            }
        }

        // Resume: the same image in memory (link cut), or in the journal (restart).
        let mut resumed = false;
        match self.xfer.take() {
            Some(x) if x.staged && x.image_id == image_id && x.plan.chunk_size() <= host_chunk => {
                self.xfer = Some(x);
                resumed = true;
            }
            other => {
                if let Some(x) = other.filter(|x| x.staged) {
                    self.journal = Some(x.journal());
                }
                if let Some(j) = self.journal.take() {
                    match resume_from_journal(&j, image_id, &manifest, host_chunk, &h.head) {
                        Some(x) => {
                            self.xfer = Some(x);
                            resumed = true;
                        }
                        None => self.journal = Some(j),
                    }
                }
            }
        }

        if resumed {
            self.push(ReceiverAction::OpenStaging {
                image_id,
                total_size: manifest.total_size,
                fresh: false,
            });
            self.push(ReceiverAction::WriteHead(h.head.clone()));
            if let Some(x) = &mut self.xfer {
                x.head = h.head.clone();
            }
        } else {
            // Fresh staging. Prefer the skip index's chunk size so COPY hits line up — unless
            // the host's chunk size is the user's explicit choice.
            let mut chunk = host_chunk;
            if h.skip && !h.exact_chunk {
                if let Some(ix) = self.installed.as_ref().and_then(|i| i.index.as_ref()) {
                    if msg::valid_chunk_size(ix.chunk_size) && ix.chunk_size <= host_chunk {
                        chunk = ix.chunk_size;
                    }
                }
            }
            let plan = Plan::new(&manifest, chunk)
                .map_err(|e| Fatal::Err(ErrorCode::Capability, e.to_string()))?;
            self.journal = None;
            self.push(ReceiverAction::ClearJournal);
            self.push(ReceiverAction::OpenStaging {
                image_id,
                total_size: manifest.total_size,
                fresh: true,
            });
            self.push(ReceiverAction::WriteHead(h.head.clone()));
            let x = new_xfer(image_id, h.head.clone(), manifest, plan);
            self.push(ReceiverAction::PersistJournal(x.journal()));
            self.xfer = Some(x);
        }
        self.phase = Phase::Transfer;
        self.reply_hello(false);
        // Segments already complete (empty ones, or resumed but not yet verified).
        self.complete_segments();
        Ok(())
    }

    fn stash_xfer(&mut self) {
        if let Some(x) = self.xfer.take().filter(|x| x.staged) {
            self.journal = Some(x.journal());
        }
    }

    fn reply_hello(&mut self, already_installed: bool) {
        let Some(x) = &self.xfer else { return };
        let index = if self.link.skip && !already_installed {
            self.installed
                .as_ref()
                .and_then(|i| i.index.as_ref())
                .map(SkipIndex::wire_entries)
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let r = HelloReply {
            proto: PROTO_VERSION,
            nonce: self.link.nonce,
            device: self.cfg.device.clone(),
            info: msg::sanitize_text(&self.cfg.info, msg::MAX_INFO_LEN),
            window: self.link.window,
            chunk_size: x.plan.chunk_size(),
            compression: self.link.compression,
            already_installed,
            resumed: !already_installed && (x.received > 0 || x.verified.iter().any(|v| *v)),
            unprovisioned: !self.cfg.trust.is_provisioned(),
            resume_seq: if already_installed { 0 } else { x.received },
            verified: if already_installed {
                0
            } else {
                x.verified_mask()
            },
            index,
            base: if self.link.skip
                && !already_installed
                && self.link.compression & COMPRESS_PATCH != 0
            {
                self.base
            } else {
                None
            },
        };
        self.send(Message::HelloReply(r));
    }

    // ------------------------------------------------------------ WRITE

    /// Whether data for `seq` (a WRITE or WRITE_PART, named `what`) is taken in this phase;
    /// otherwise it was answered here (a late retransmission is acknowledged, data before
    /// HELLO or beyond DONE is a protocol error, after an ERROR it is noise).
    fn data_phase(&mut self, seq: u32, what: &str) -> bool {
        match self.phase {
            Phase::Transfer => true,
            Phase::Failed => false, // ERROR already sent; the rest of the window is noise
            Phase::Idle => {
                // Either a broken host or, on a link without connections, one whose session
                // this target dropped (stall timeout) or forgot (restart): it may resume.
                self.fail(
                    ErrorCode::NoSession,
                    &format!("{what} before HELLO: no session here (dropped or restarted); send HELLO to resume"),
                );
                false
            }
            Phase::Unchanged
            | Phase::Finishing
            | Phase::Installing { .. }
            | Phase::Installed { .. } => {
                // A late retransmission: acknowledge what we have.
                let r = self.received();
                if seq <= r {
                    self.send(Message::Ack(Ack { ack: r }));
                } else {
                    self.fail(ErrorCode::Protocol, &format!("{what} after DONE"));
                }
                false
            }
        }
    }

    fn on_write(&mut self, w: Write) {
        if !self.data_phase(w.seq, "WRITE") {
            return;
        }
        if let Err(text) = self.check_write(&w) {
            self.fail(ErrorCode::BadWrite, &text);
            return;
        }
        let Some(x) = &mut self.xfer else { return };
        let r = x.received;
        if w.seq <= r {
            self.send(Message::Ack(Ack { ack: r }));
            return;
        }
        if w.seq > r + 1 {
            self.maybe_nak(Some(u64::from(w.seq) << 32), NakReason::Gap);
            return;
        }
        // w.seq == r + 1: check it is exactly the planned chunk.
        let Some(c) = x.plan.chunk(w.seq) else {
            self.fail(
                ErrorCode::BadWrite,
                &format!("seq {} is not in the plan", w.seq),
            );
            return;
        };
        let seg_name = x.manifest.segments.get(c.segment).map(|s| s.name.as_str());
        if seg_name != Some(w.segment.as_str()) || c.rel_offset != w.offset || c.len != w.len {
            let text = format!(
                "WRITE seq {} is segment {} offset {} len {}, the plan says segment {} offset {} len {}",
                w.seq,
                w.segment,
                w.offset,
                w.len,
                seg_name.unwrap_or("?"),
                c.rel_offset,
                c.len
            );
            self.fail(ErrorCode::BadWrite, &text);
            return;
        }
        if matches!(
            w.body,
            WriteBody::Copy { .. }
                | WriteBody::Patch {
                    source: PatchSource::Base,
                    ..
                }
        ) {
            x.used_copy[c.segment] = true;
        }
        x.received = w.seq;
        self.link.nak = None;
        self.link.part = None;
        self.push(ReceiverAction::Write {
            seq: w.seq,
            offset: c.offset,
            len: c.len,
            body: w.body,
        });
        self.send(Message::Ack(Ack { ack: w.seq }));
        self.complete_segments();
        self.checkpoint(false);
    }

    /// A part of the WRITE of chunk `received + 1`: reassembled (bounded by the planned
    /// chunk; parts past a hole are kept, see [`PartBuf`]), then handled exactly like a
    /// WRITE that arrived whole. Every part is answered with a PART_ACK naming a held run
    /// past the hole, so the host resends only what was lost (selective repeat).
    fn on_write_part(&mut self, p: WritePart) {
        if !self.data_phase(p.seq, "WRITE_PART") {
            return;
        }
        let Some(x) = &self.xfer else { return };
        let r = x.received;
        if p.seq > x.plan.total() {
            let text = format!(
                "seq {} is beyond the plan ({} chunks)",
                p.seq,
                x.plan.total()
            );
            self.fail(ErrorCode::BadWrite, &text);
            return;
        }
        if p.seq <= r {
            self.send(Message::Ack(Ack { ack: r }));
            return;
        }
        if p.seq > r + 1 {
            self.maybe_nak(
                Some(u64::from(p.seq) << 32 | u64::from(p.at)),
                NakReason::Gap,
            );
            return;
        }
        let Some(c) = x.plan.chunk(p.seq) else { return };
        let bound = c.len.saturating_add(msg::WRITE_HEADER_MAX);
        if p.total > bound {
            let text = format!(
                "WRITE_PART seq {} announces {} bytes, more than chunk {} can take ({bound})",
                p.seq, p.total, p.seq
            );
            self.fail(ErrorCode::BadWrite, &text);
            return;
        }
        let same = matches!(&self.link.part,
            Some(b) if b.seq == p.seq && b.kind == p.kind && b.total == p.total);
        if !same {
            // A new reassembly starts empty (a different kind/total: the host re-encoded
            // the chunk; start over).
            self.link.part = None;
        }
        let buf = self
            .link
            .part
            .get_or_insert_with(|| PartBuf::new(p.seq, p.kind, p.total));
        let stored = buf.put(p.at, &p.data);
        let (have, first) = (buf.have, buf.first_run());
        match stored {
            Stored::Nothing => {
                // The run holding it, if any (the host learns what its lost PART_ACKs
                // said), else the first.
                let end = p.at.saturating_add(p.data.len() as u32);
                let first = buf
                    .held
                    .iter()
                    .copied()
                    .find(|&(s, e)| s <= p.at && end <= e)
                    .or(first);
                // Already held (the host resent what its lost PART_ACKs did not confirm),
                // or no room for another run: say what is held so it can skip ahead.
                self.send(Message::PartAck(PartAck {
                    seq: p.seq,
                    have,
                    gap: p.at > have,
                    sack: first,
                }));
                return;
            }
            Stored::Past(run) => {
                // Kept past a hole: something before it was lost. The host learns the
                // hole from the run (selective repeat) and resends only that.
                self.send(Message::PartAck(PartAck {
                    seq: p.seq,
                    have,
                    gap: true,
                    sack: Some(run),
                }));
                return;
            }
            Stored::Prefix => {}
        }
        self.link.nak = None;
        if have < p.total {
            self.send(Message::PartAck(PartAck {
                seq: p.seq,
                have,
                gap: false,
                sack: first,
            }));
            return;
        }
        let Some(done) = self.link.part.take() else {
            return;
        };
        let frame = match Frame::new(
            MsgType::Write as u8,
            done.kind as u16,
            done.seq,
            done.buf.freeze(),
        ) {
            Ok(f) => f,
            Err(e) => {
                self.fail(ErrorCode::BadWrite, &format!("reassembled WRITE: {e}"));
                return;
            }
        };
        match Message::from_frame(&frame) {
            Ok(Message::Write(w)) => self.on_write(w),
            Ok(_) => {}
            Err(e) => self.fail(
                ErrorCode::BadWrite,
                &format!("rejected reassembled WRITE: {e}"),
            ),
        }
    }

    /// Validation that does not depend on the seq: name, bounds, body kind.
    fn check_write(&self, w: &Write) -> Result<(), String> {
        let Some(x) = &self.xfer else {
            return Err("no transfer".to_string());
        };
        let Some(seg) = x.manifest.segment(&w.segment) else {
            return Err(format!("unknown segment {:?}", w.segment));
        };
        let end = w.offset.checked_add(u64::from(w.len));
        if !matches!(end, Some(e) if e <= seg.size) {
            return Err(format!(
                "write past the end of segment {}: offset {} + len {} > size {}",
                seg.name, w.offset, w.len, seg.size
            ));
        }
        if w.seq > x.plan.total() {
            return Err(format!(
                "seq {} is beyond the plan ({} chunks)",
                w.seq,
                x.plan.total()
            ));
        }
        match &w.body {
            WriteBody::Zstd(_) if self.link.compression & COMPRESS_ZSTD == 0 => {
                Err("zstd data but zstd was not negotiated".to_string())
            }
            WriteBody::Copy { src_offset, .. } => {
                if !self.link.skip {
                    return Err("COPY write but skipping is off (--no-skip)".to_string());
                }
                let Some(i) = &self.installed else {
                    return Err("COPY write but nothing is installed".to_string());
                };
                let in_bounds = src_offset
                    .checked_add(u64::from(w.len))
                    .is_some_and(|e| e <= i.total_size);
                if !in_bounds {
                    return Err(format!(
                        "COPY source {}+{} is outside the installed image ({} bytes)",
                        src_offset, w.len, i.total_size
                    ));
                }
                Ok(())
            }
            WriteBody::Derive => {
                if self.link.compression & COMPRESS_DERIVE == 0 {
                    return Err("DERIVE write but deriving was not negotiated".to_string());
                }
                let m = &x.manifest;
                let Some(v) = m.verity.iter().find(|v| v.hash == w.segment) else {
                    return Err(format!(
                        "DERIVE write to segment {:?}, which is no dm-verity hash segment",
                        w.segment
                    ));
                };
                let data_index = m.segments.iter().position(|s| s.name == v.data);
                let hash_index = m.segments.iter().position(|s| s.name == v.hash);
                if !matches!((data_index, hash_index), (Some(d), Some(h)) if d < h) {
                    return Err(format!(
                        "DERIVE of {:?}: its data segment {:?} does not come before it",
                        v.hash, v.data
                    ));
                }
                if seg.size > msg::MAX_DERIVED {
                    return Err(format!(
                        "DERIVE of {:?}: {} bytes is more than {} a target derives",
                        v.hash,
                        seg.size,
                        msg::MAX_DERIVED
                    ));
                }
                Ok(())
            }
            WriteBody::Patch { .. } if self.link.compression & COMPRESS_PATCH == 0 => {
                Err("PATCH write but patching was not negotiated".to_string())
            }
            WriteBody::Patch {
                source,
                ref_offset,
                ref_len,
                ..
            } => {
                let end = ref_offset.checked_add(u64::from(*ref_len));
                match source {
                    PatchSource::Base => {
                        if !self.link.skip {
                            return Err(
                                "PATCH from the base but skipping is off (--no-skip)".to_string()
                            );
                        }
                        let Some(b) = &self.base else {
                            return Err(
                                "PATCH from the base but the target offered none".to_string()
                            );
                        };
                        if end.is_none_or(|e| e > b.total_size) {
                            return Err(format!(
                                "PATCH reference {ref_offset}+{ref_len} is outside the base image ({} bytes)",
                                b.total_size
                            ));
                        }
                    }
                    PatchSource::Staging => {
                        // Only bytes already accepted: everything before this chunk.
                        let at = seg.offset.saturating_add(w.offset);
                        if end.is_none_or(|e| e > at) {
                            return Err(format!(
                                "PATCH reference {ref_offset}+{ref_len} is not before the chunk at {at}"
                            ));
                        }
                    }
                    PatchSource::Unknown(c) => return Err(format!("unknown PATCH source {c}")),
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// NAK gating: one NAK per gap, again only if the host visibly rewound.
    fn maybe_nak(&mut self, seen: Option<u64>, reason: NakReason) {
        let Some(x) = &self.xfer else { return };
        let expected = x.received + 1;
        if expected > x.plan.total() {
            return;
        }
        let send = match (self.link.nak, seen) {
            (Some((e, _)), _) if e != expected => true,
            (None, _) => true,
            (Some((_, max_seen)), Some(s)) => s <= max_seen,
            (Some(_), None) => false,
        };
        if send {
            self.link.nak = Some((expected, seen.unwrap_or(u64::from(expected) << 32)));
            self.send(Message::Nak(Nak {
                seq: expected,
                reason,
            }));
        } else if let (Some((e, m)), Some(s)) = (self.link.nak, seen) {
            self.link.nak = Some((e, m.max(s)));
        }
    }

    /// Starts verification of every segment whose chunks are all received.
    fn complete_segments(&mut self) {
        let Some(x) = &mut self.xfer else { return };
        let mut out = Vec::new();
        for (i, seg) in x.manifest.segments.iter().enumerate() {
            if x.verified[i] || x.verifying[i].is_some() || !x.plan.segment_complete(i, x.received)
            {
                continue;
            }
            if !x.announced[i] {
                x.announced[i] = true;
                out.push(ReceiverAction::Report(ReceiverReport::SegmentWritten {
                    segment: seg.name.clone(),
                    bytes: seg.size,
                }));
            }
            let ticket = self.next_ticket;
            self.next_ticket += 1;
            x.verifying[i] = Some(ticket);
            out.push(ReceiverAction::VerifySegment {
                ticket,
                segment: i,
                name: seg.name.clone(),
                offset: seg.offset,
                size: seg.size,
                sha256: seg.sha256,
            });
        }
        self.actions.extend(out);
    }

    /// Requests a sync when enough chunks are not durable yet (or `force`).
    fn checkpoint(&mut self, force: bool) {
        let interval = self
            .cfg
            .checkpoint_chunks
            .unwrap_or(u32::from(self.link.window.max(1)))
            .max(1);
        let Some(x) = &mut self.xfer else { return };
        if !x.staged || x.sync_in_flight.is_some() || x.received <= x.durable {
            return;
        }
        let all = x.received == x.plan.total();
        if force || all || x.received - x.durable >= interval {
            x.sync_in_flight = Some(x.received);
            let upto_seq = x.received;
            self.push(ReceiverAction::SyncStaging { upto_seq });
        }
    }

    fn on_synced(&mut self, upto: u32) {
        let Some(x) = &mut self.xfer else { return };
        if x.sync_in_flight.is_none() {
            return;
        }
        x.sync_in_flight = None;
        let upto = upto.min(x.received);
        if upto > x.durable {
            x.durable = upto;
            let j = x.journal();
            self.push(ReceiverAction::PersistJournal(j));
        }
        self.checkpoint(false);
        if self.phase == Phase::Finishing {
            self.try_finish();
        }
    }

    fn on_verified(&mut self, ticket: u64, ok: bool, bad_at: Option<u64>) {
        let Some(x) = &mut self.xfer else { return };
        let Some(i) = x.verifying.iter().position(|t| *t == Some(ticket)) else {
            return; // stale (transfer rewound or restarted meanwhile)
        };
        x.verifying[i] = None;
        let name = x
            .manifest
            .segments
            .get(i)
            .map(|s| s.name.clone())
            .unwrap_or_default();
        if ok {
            x.verified[i] = true;
            let durable = x.plan.segment_complete(i, x.durable);
            let j = x.journal();
            if durable {
                self.push(ReceiverAction::PersistJournal(j));
            }
            if !matches!(self.phase, Phase::Idle | Phase::Failed) {
                self.send(Message::Verified(Verified { segment: name }));
            }
            if self.phase == Phase::Finishing {
                self.try_finish();
            }
            return;
        }
        // Bad segment: rewind to its first chunk so a new session re-sends it — or, when the
        // shell named the first bad piece, to that piece (the pieces before it matched their
        // signed hashes). Not for a segment assembled from the installed image: none of it is
        // trusted any more.
        let (first, _) = x.plan.segment_chunks(i).unwrap_or((0, 0));
        let copied = x.used_copy[i];
        let from = match bad_at {
            Some(rel) if !copied => x.plan.chunk_index_at(i, rel).unwrap_or(first).max(first),
            _ => first,
        };
        x.rewind(from);
        x.verified[i] = false;
        x.announced[i] = false;
        let j = x.journal();
        self.push(ReceiverAction::PersistJournal(j));
        if copied {
            // The installed image did not hold what its index said: stop trusting it.
            if let Some(inst) = &mut self.installed {
                inst.index = None;
            }
            self.base = None;
            self.push(ReceiverAction::Report(ReceiverReport::SkipIndexDropped));
        }
        self.push(ReceiverAction::Report(ReceiverReport::VerifyFailed {
            segment: name.clone(),
        }));
        let was = self.phase;
        self.fail(
            ErrorCode::VerifyFailed,
            &format!("verify failed seg={name}"),
        );
        if matches!(was, Phase::Idle) {
            self.phase = Phase::Idle;
        }
    }

    // ------------------------------------------------------------ DONE / install

    fn on_done(&mut self, hash: [u8; 32]) {
        match self.phase {
            Phase::Idle | Phase::Failed => {
                if self.phase == Phase::Idle {
                    self.fail(
                        ErrorCode::NoSession,
                        "DONE without a session (dropped or restarted); send HELLO to resume",
                    );
                }
            }
            Phase::Unchanged => {
                let Some(x) = &self.xfer else { return };
                if hash != x.manifest.image_sha256 {
                    self.fail(
                        ErrorCode::ImageHash,
                        "DONE image hash does not match the manifest",
                    );
                    return;
                }
                let (image_id, total_size) = (x.image_id, x.manifest.total_size);
                self.push(ReceiverAction::Report(ReceiverReport::VerifyOk));
                self.push(ReceiverAction::Install {
                    image_id,
                    image_sha256: hash,
                    total_size,
                    unchanged: true,
                });
                self.phase = Phase::Installing { unchanged: true };
            }
            Phase::Transfer => {
                let Some(x) = &self.xfer else { return };
                if hash != x.manifest.image_sha256 {
                    self.fail(
                        ErrorCode::ImageHash,
                        &format!(
                            "DONE image hash {} does not match the manifest's {}",
                            hex::encode(hash),
                            hex::encode(x.manifest.image_sha256)
                        ),
                    );
                    return;
                }
                if x.received < x.plan.total() {
                    let text = format!(
                        "DONE before complete: received {} of {} chunks",
                        x.received,
                        x.plan.total()
                    );
                    self.fail(ErrorCode::Incomplete, &text);
                    return;
                }
                self.phase = Phase::Finishing;
                self.try_finish();
            }
            Phase::Finishing | Phase::Installing { .. } => self.done_reply(DoneStatus::Pending),
            Phase::Installed { unchanged } => self.done_reply(if unchanged {
                DoneStatus::Unchanged
            } else {
                DoneStatus::Installed
            }),
        }
    }

    fn done_reply(&mut self, status: DoneStatus) {
        let Some(x) = &self.xfer else { return };
        let image_sha256 = x.manifest.image_sha256;
        self.send(Message::DoneReply(DoneReply {
            status,
            image_sha256,
        }));
    }

    fn try_finish(&mut self) {
        let Some(x) = &self.xfer else { return };
        if !x.verified.iter().all(|v| *v) {
            if x.verifying.iter().all(Option::is_none) {
                // Nothing in flight but not all verified: cannot happen when complete;
                // restart the verifications defensively.
                self.complete_segments();
            }
            self.done_reply(DoneStatus::Pending);
            return;
        }
        let (image_id, image_sha256, total_size) =
            (x.image_id, x.manifest.image_sha256, x.manifest.total_size);
        // The trust store may have changed since HELLO (a long transfer): decide again right
        // before the install, so nothing is installed that the device would refuse now.
        let refusal = match ImageHead::parse(&x.head) {
            Ok(head) => self
                .cfg
                .trust
                .check(&head, self.link.allow_downgrade)
                .err()
                .map(|r| (r.is_rollback(), r.to_string())),
            Err(e) => Some((false, format!("image head rejected: {e}"))),
        };
        if let Some((rollback, reason)) = refusal {
            self.push(ReceiverAction::Report(ReceiverReport::Refused {
                reason: reason.clone(),
            }));
            let code = if rollback {
                ErrorCode::Rollback
            } else {
                ErrorCode::Signature
            };
            self.fail(code, &format!("refused image: {reason}"));
            return;
        }
        self.push(ReceiverAction::Report(ReceiverReport::VerifyOk));
        self.push(ReceiverAction::Install {
            image_id,
            image_sha256,
            total_size,
            unchanged: false,
        });
        self.phase = Phase::Installing { unchanged: false };
    }

    fn on_installed(&mut self, ok: bool, detail: &str) {
        let Phase::Installing { unchanged } = self.phase else {
            return;
        };
        if !ok {
            self.phase = Phase::Failed;
            self.fail(
                ErrorCode::InstallFailed,
                &format!("install failed: {detail}; the previous install is untouched"),
            );
            self.after_install();
            return;
        }
        self.push(ReceiverAction::Report(ReceiverReport::Installed));
        if let Some(x) = &self.xfer {
            let keep_index = self
                .installed
                .as_ref()
                .filter(|i| i.image_id == x.image_id)
                .and_then(|i| i.index.clone());
            self.installed = Some(InstalledImage {
                image_id: x.image_id,
                image_sha256: x.manifest.image_sha256,
                total_size: x.manifest.total_size,
                version: x.manifest.version.clone(),
                index: keep_index,
            });
        }
        if !unchanged {
            self.push(ReceiverAction::ClearJournal);
            self.journal = None;
            if let Some(x) = &mut self.xfer {
                // The staging file became the install.
                x.staged = false;
            }
        }
        self.phase = Phase::Installed { unchanged };
        self.done_reply(if unchanged {
            DoneStatus::Unchanged
        } else {
            DoneStatus::Installed
        });
        self.after_install();
    }

    fn after_install(&mut self) {
        if let Some(h) = self.deferred_hello.take() {
            self.on_hello(h);
        }
    }
}

fn new_xfer(image_id: [u8; 32], head: Bytes, manifest: Manifest, plan: Plan) -> Xfer {
    let n = manifest.segments.len();
    Xfer {
        image_id,
        head,
        manifest,
        plan,
        received: 0,
        durable: 0,
        sync_in_flight: None,
        verified: vec![false; n],
        verifying: vec![None; n],
        announced: vec![false; n],
        used_copy: vec![false; n],
        staged: true,
    }
}

/// A transfer from a journal, if it is for this image and usable.
fn resume_from_journal(
    j: &Journal,
    image_id: [u8; 32],
    manifest: &Manifest,
    host_chunk: u32,
    head: &Bytes,
) -> Option<Xfer> {
    if j.image_id != image_id
        || j.image_sha256 != manifest.image_sha256
        || j.total_size != manifest.total_size
        || j.chunk_size > host_chunk
        || j.verified.len() != manifest.segments.len()
    {
        return None;
    }
    let plan = Plan::new(manifest, j.chunk_size).ok()?;
    if plan.total() != j.plan_chunks || j.durable_seq > plan.total() {
        return None;
    }
    let mut x = new_xfer(image_id, head.clone(), manifest.clone(), plan);
    x.received = j.durable_seq;
    x.durable = j.durable_seq;
    for (i, v) in j.verified.iter().enumerate() {
        // Only trust a verified flag whose chunks are all durable.
        x.verified[i] = *v && x.plan.segment_complete(i, x.durable);
        x.announced[i] = x.verified[i];
    }
    Some(x)
}
