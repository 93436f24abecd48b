//! Sender and receiver state machines of a flashing session — pure: events in,
//! actions out. No I/O, no clocks, no threads: the I/O shells (`nx flash send`,
//! `flashd`) read and write, hash and compress, and pass the results back in as
//! events; time is a `Duration` since any fixed origin, passed with each event.
//!
//! # The conversation
//!
//! ```text
//! host (Sender)                                  target (Receiver)
//!   HELLO proto=1 caps + image head   ───────▶   parse head, pick resume point
//!                                     ◀───────   HELLO_REPLY caps, resume_seq, skip index
//!   WRITE seq=r+1 .. r+window         ───────▶   validate, write at offset
//!                                     ◀───────   ACK n (cumulative) / NAK s (resend from s)
//!   ... sliding window ...                       VERIFIED seg (segment hash ok)
//!   DONE image_sha256                 ───────▶   all verified? install
//!                                     ◀───────   DONE_REPLY installed | pending | unchanged
//! ```
//!
//! Both sides compute the same [`Plan`] from the manifest and the negotiated chunk
//! size: chunk `i` of the plan is sent with seq `i + 1`, so a seq identifies a chunk
//! across connections and restarts, and "resume" is a single number.
//!
//! # Shell loop contract (both sides)
//!
//! 1. Feed every decoded frame as `Frame(..)`; feed decoder skips as `Corrupt` on the
//!    receiver (it may NAK early); the sender just counts them.
//! 2. After each `handle`, drain `poll_action()` until `None` and execute the actions
//!    **in order** (the order is what makes ACKs and journals honest: a `Write` comes
//!    before the `Send(ACK)` that covers it, a `SyncStaging` before the
//!    `PersistJournal` that relies on it). Long work (reading, hashing, compressing,
//!    verifying, installing) may run in the background as long as its effects are
//!    ordered the same way; report the result with the matching event.
//! 3. Sender: call `handle(now, SenderEvent::Tick)` when `next_deadline()` passes.
//! 4. A terminal action (`Finished`/`Failed` on the sender) ends the session.
//!
//! ```no_run
//! use std::time::Duration;
//! use proto::session::{Sender, SenderAction, SenderConfig, SenderEvent};
//! # fn io() -> (bytes::Bytes, Duration) { unimplemented!() }
//! let (head, now) = io();
//! let mut s = Sender::new(SenderConfig::new("host"), head).unwrap();
//! s.start(now);
//! loop {
//!     while let Some(a) = s.poll_action() {
//!         match a {
//!             SenderAction::Send(frame) => { /* write frame.encode() to the link */ }
//!             SenderAction::ReadChunk { seq, offset, len, hash } => {
//!                 /* read the image; later: s.handle(now, SenderEvent::ChunkRead {..}) */
//!             }
//!             SenderAction::Compress { seq, data, .. } => {
//!                 /* zstd (against a prefix for PATCH); SenderEvent::Compressed */
//!             }
//!             SenderAction::Progress(p) => { /* render bars / NDJSON */ }
//!             SenderAction::Finished(_) | SenderAction::Failed(_) => return,
//!         }
//!     }
//!     // wait for: a frame from the decoder, a finished read/compress job, or the deadline
//! }
//! ```
//!
//! See [`Sender`] and [`Receiver`] for each side's events and actions, and
//! `docs/provisioning/protocol.md` for the window, resume and skip rules.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::image::ImageError;
use crate::msg::ErrorCode;

mod plan;
mod receiver;
mod sender;

pub use plan::{Chunk, Plan, PlanError, SkipEntry, SkipIndex};
pub use receiver::{
    InstalledImage, Receiver, ReceiverAction, ReceiverConfig, ReceiverEvent, ReceiverReport,
};
pub use sender::{Outcome, Sender, SenderAction, SenderConfig, SenderEvent, Stats};

/// Version of the [`Journal`] layout.
pub const JOURNAL_VERSION: u32 = 1;

/// Compression policy of the host (`--compress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CompressMode {
    /// Offer zstd; use it for chunks it shrinks by at least 1/16; fall back to raw
    /// when the target does not support it.
    #[default]
    Auto,
    /// Require zstd (fail if the target does not support it); use it whenever it
    /// shrinks a chunk.
    Zstd,
    /// Never compress.
    None,
}

/// The receiver's durable progress for one image: written by the shell (e.g. as
/// JSON beside the staging file) on every [`ReceiverAction::PersistJournal`] and
/// passed back to [`Receiver::new`] after a restart.
///
/// Invariant: every chunk with seq ≤ `durable_seq` is in the staging file *and was
/// synced* before this journal was written; `verified[i]` is only set for segments
/// whose chunks are all durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Journal {
    /// [`JOURNAL_VERSION`].
    pub version: u32,
    /// Manifest id of the image in staging.
    #[serde(with = "hexser::arr32")]
    pub image_id: [u8; 32],
    /// Its whole-image hash.
    #[serde(with = "hexser::arr32")]
    pub image_sha256: [u8; 32],
    pub total_size: u64,
    /// Chunk size of the plan the seqs refer to.
    pub chunk_size: u32,
    /// Chunks in that plan.
    pub plan_chunks: u32,
    /// Chunks 1..=durable_seq are durable: the resume point.
    pub durable_seq: u32,
    /// Image offset just after the last durable chunk (informational).
    pub durable_offset: u64,
    /// Per segment (table order): verified and durable.
    pub verified: Vec<bool>,
}

impl Journal {
    /// The resume point this journal gives.
    pub fn resume_point(&self) -> ResumePoint {
        let mut verified = 0u64;
        for (i, v) in self.verified.iter().enumerate().take(64) {
            if *v {
                verified |= 1 << i;
            }
        }
        ResumePoint {
            resume_seq: self.durable_seq,
            verified,
        }
    }
}

/// Where a sender continues: chunks `1..=resume_seq` are held; bit i of `verified`
/// = segment i verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumePoint {
    pub resume_seq: u32,
    pub verified: u64,
}

/// What kind of bytes were not sent as raw data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    /// Zero runs (from the manifest's data ranges, or all-zero chunks).
    Zero,
    /// Chunks the target already holds (COPY writes, or the whole image).
    Identical,
    /// Bytes saved by compression (raw length − compressed length).
    Compressed,
    /// Bytes saved by `PATCH` writes against the target's base image (raw length − wire
    /// length): the bytes the target already had, wherever they were.
    Patched,
    /// Bytes the target computed itself (`DERIVE`: the dm-verity hash tree).
    Derived,
}

/// One segment in [`ProgressEvent::Start`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentProgress {
    pub name: String,
    /// Content bytes.
    pub size: u64,
    /// Bytes in data ranges (what the plan carries).
    pub data_bytes: u64,
}

/// Progress of a sender, as data: the CLI renders it (bars, plain lines or NDJSON:
/// `serde_json::to_string` gives `{"event":"progress",...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ProgressEvent {
    /// The session is negotiated.
    Start {
        /// Manifest id (hex).
        image_id: String,
        version: String,
        device: String,
        image_size: u64,
        /// Bytes the plan carries (data ranges).
        data_bytes: u64,
        chunks: u32,
        chunk_size: u32,
        window: u16,
        /// "zstd" or "none".
        compression: String,
        skip: bool,
        segments: Vec<SegmentProgress>,
    },
    /// The target has no trust key provisioned: it accepts unsigned images (right after
    /// [`ProgressEvent::Start`]; the CLI warns).
    Unprovisioned { device: String },
    /// The target offers a base image to patch from (right after [`ProgressEvent::Start`]):
    /// `held`: the host holds it too and sends only the changes; otherwise the image is
    /// sent whole (pass the base image with `--base`).
    Base { image_id: String, held: bool },
    /// The target already held part of the image.
    Resumed {
        /// Next chunk to send.
        seq: u32,
        /// Image offset of that chunk (`resumed at <bytes>`).
        at_offset: u64,
        /// Data bytes already held.
        done_bytes: u64,
    },
    /// Bytes not sent as raw data (cumulative per kind is up to the consumer).
    Skipped { kind: SkipKind, bytes: u64 },
    /// Cumulative progress after an ACK.
    Progress {
        segment: String,
        segment_done: u64,
        segment_total: u64,
        done_bytes: u64,
        total_bytes: u64,
        wire_bytes: u64,
    },
    /// Retransmission from `from_seq` (`reason`: "nak" or "timeout").
    Retransmit { from_seq: u32, reason: String },
    /// The target verified a segment's SHA-256.
    SegmentVerified { segment: String },
    /// Installed (or already installed: `unchanged`).
    Done {
        unchanged: bool,
        #[serde(with = "hexser::arr32")]
        image_sha256: [u8; 32],
        stats: Stats,
    },
    /// The session failed.
    Error {
        code: u16,
        name: String,
        text: String,
    },
}

/// Why a session failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("image head is invalid: {0}")]
    BadImage(#[from] ImageError),
    #[error("target reported error {code}: {text}")]
    Remote { code: ErrorCode, text: String },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("cannot agree on capabilities: {0}")]
    Capability(String),
    #[error("no answer from the target after {retries} retries while {what}; the transfer is resumable: run the same command again")]
    Timeout { what: &'static str, retries: u32 },
    #[error("reading chunk seq {seq} failed: {detail}")]
    Read { seq: u32, detail: String },
    #[error("aborted: {0}; the transfer is resumable: run the same command again")]
    Aborted(String),
}

impl SessionError {
    /// The stable error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            SessionError::BadImage(_) => ErrorCode::BadImage,
            SessionError::Remote { code, .. } => *code,
            SessionError::Protocol(_) => ErrorCode::Protocol,
            SessionError::Capability(_) => ErrorCode::Capability,
            SessionError::Timeout { .. } => ErrorCode::Timeout,
            SessionError::Read { .. } => ErrorCode::Storage,
            SessionError::Aborted(_) => ErrorCode::Aborted,
        }
    }
}

/// Time is passed in; this is a convenience for deadlines.
pub(crate) fn deadline(now: Duration, rto: Duration) -> Duration {
    now.saturating_add(rto)
}

/// serde helpers: byte arrays as lowercase hex strings.
pub(crate) mod hexser {
    macro_rules! arr {
        ($name:ident, $n:expr) => {
            pub mod $name {
                use serde::{Deserialize, Deserializer, Serializer};
                pub fn serialize<S: Serializer>(v: &[u8; $n], s: S) -> Result<S::Ok, S::Error> {
                    s.serialize_str(&hex::encode(v))
                }
                pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; $n], D::Error> {
                    let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                    if s.len() != 2 * $n {
                        return Err(serde::de::Error::custom(format_args!(
                            "expected {} hex digits, got {}",
                            2 * $n,
                            s.len()
                        )));
                    }
                    let mut out = [0u8; $n];
                    hex::decode_to_slice(s.as_bytes(), &mut out)
                        .map_err(serde::de::Error::custom)?;
                    Ok(out)
                }
            }
        };
    }
    arr!(arr32, 32);
    arr!(arr16, 16);
}
