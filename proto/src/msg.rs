//! Messages of the flashing conversation, each carried in one [`Frame`].
//!
//! The byte-exact tables are in `docs/provisioning/protocol.md`; this module is
//! their reference implementation. All integers are little-endian. Strings are
//! UTF-8 with a length prefix (`str8`: u8 length, `str16`: u16 length) and are
//! validated on decode *and* encode: a message that does not fit the rules never
//! leaves this module and never comes out of it.
//!
//! * The frame's `seq` is the chunk sequence number for `WRITE` (≥ 1) and must be
//!   0 for every other message.
//! * The frame's `flags` carry the `WRITE` body kind ([`WriteKind`]) and must be 0
//!   for every other message.
//! * A payload must be consumed exactly: trailing bytes are an error.
//!
//! ```
//! use proto::msg::{Ack, Message};
//! let frame = Message::Ack(Ack { ack: 41 }).to_frame().unwrap();
//! assert_eq!(Message::from_frame(&frame).unwrap(), Message::Ack(Ack { ack: 41 }));
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{Frame, FrameError, MAX_PAYLOAD};

/// Protocol version carried in HELLO / HELLO_REPLY / INFO_REPLY.
pub const PROTO_VERSION: u8 = 1;
/// Smallest chunk size (= the manifest's data-range granularity).
pub const MIN_CHUNK: u32 = 4096;
/// Largest chunk size.
pub const MAX_CHUNK: u32 = 1024 * 1024;
/// Largest window (WRITE frames in flight).
pub const MAX_WINDOW: u16 = 256;
/// Largest image head carried in HELLO: the image format's bound.
pub const MAX_HEAD: usize = crate::image::MAX_HEAD_LEN;
/// Largest number of skip-index entries in a HELLO_REPLY.
pub const MAX_INDEX_ENTRIES: usize = 65536;
/// Host and device names: `[A-Za-z0-9._-]{1,64}`.
pub const MAX_NAME_LEN: usize = 64;
/// Segment names: `[a-z0-9_-]{1,32}`.
pub const MAX_SEGMENT_NAME_LEN: usize = 32;
/// Device info string.
pub const MAX_INFO_LEN: usize = 128;
/// Image version string.
pub const MAX_VERSION_LEN: usize = 64;
/// ERROR text and ABORT reason.
pub const MAX_TEXT_LEN: usize = 512;

/// Compression set bit: zstd.
pub const COMPRESS_ZSTD: u8 = 0x01;
/// Compression set bit: zstd frames that reference earlier bytes (`PATCH` writes: a zstd
/// frame compressed against a range of the target's base image or of the staging bytes
/// already written, like `zstd --patch-from`). Only together with [`COMPRESS_ZSTD`].
pub const COMPRESS_PATCH: u8 = 0x02;
/// Compression set bit: the target computes derived segments itself (`DERIVE` writes: the
/// dm-verity hash tree of a manifest `verity` entry, from the data segment it already holds).
pub const COMPRESS_DERIVE: u8 = 0x04;
/// Largest derived segment (the target holds it in memory while it writes it).
pub const MAX_DERIVED: u64 = 8 * 1024 * 1024;
/// Largest reference range of a `PATCH` write (the target maps it read-only).
pub const MAX_PATCH_REF: u32 = 64 * 1024 * 1024;

/// HELLO flag: the host forbids skipping (`--no-skip`): send every data chunk.
pub const HELLO_NO_SKIP: u8 = 0x01;
/// HELLO flag: `--allow-downgrade`: install even below the target's security-version floor.
/// The target honours it only for an image signed with one of its development keys.
pub const HELLO_ALLOW_DOWNGRADE: u8 = 0x02;
/// HELLO flag: the host's chunk size was chosen explicitly (`--chunk`): the target uses it
/// (or its own maximum) and does not adopt its skip index's chunk size instead.
pub const HELLO_EXACT_CHUNK: u8 = 0x04;
/// HELLO_REPLY flag: the target already has exactly this image installed.
pub const REPLY_ALREADY_INSTALLED: u8 = 0x01;
/// HELLO_REPLY flag: the target holds a partial transfer of this image.
pub const REPLY_RESUMED: u8 = 0x02;
/// HELLO_REPLY flag: the target has no trust key provisioned and accepts unsigned images.
pub const REPLY_UNPROVISIONED: u8 = 0x04;
/// HELLO_REPLY flag: a [`BaseImage`] follows `verified`: the image the target can patch from.
pub const REPLY_BASE: u8 = 0x08;

// Every message fits a frame: the largest fixed HELLO part is far below the slack.
const _: () = assert!(MAX_HEAD + 4096 <= MAX_PAYLOAD);
const _: () = assert!((MAX_CHUNK as usize) + 4096 <= MAX_PAYLOAD);
const _: () = assert!(MAX_INDEX_ENTRIES * INDEX_ENTRY_LEN + 4096 <= MAX_PAYLOAD);

const INDEX_ENTRY_LEN: usize = 8 + 4 + 16;

/// A 128-bit chunk content hash (first 16 bytes of SHA-256), used for skipping.
pub type ChunkHash = [u8; 16];

/// The code ↔ variant ↔ name tables of a wire enum, written once: the enum, `ALL`, `code`,
/// `from_code` and `name` all come from one list. The first form makes the codes the
/// discriminants (`as u8` works); the second ends with a catch-all variant that keeps codes
/// this version does not know.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $ty:ident: repr($repr:ty) {
            $( $(#[$vmeta:meta])* $var:ident = $code:literal => $text:literal, )*
        }
    ) => {
        $(#[$meta])*
        #[repr($repr)]
        pub enum $ty {
            $( $(#[$vmeta])* $var = $code, )*
        }
        impl $ty {
            /// Every value, in code order.
            pub const ALL: &'static [$ty] = &[$($ty::$var),*];
            /// The value with wire code `c`.
            pub fn from_code(c: $repr) -> Option<$ty> {
                match c {
                    $($code => Some($ty::$var),)*
                    _ => None,
                }
            }
            /// The wire code.
            pub fn code(self) -> $repr {
                self as $repr
            }
            /// The name in logs and documents.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$var => $text,)*
                }
            }
        }
    };
    (
        $(#[$meta:meta])*
        pub enum $ty:ident: $repr:ty {
            $( $(#[$vmeta:meta])* $var:ident = $code:literal => $text:literal, )*
        }
        unknown: $unk:ident => $unk_text:literal, $unk_doc:literal
    ) => {
        $(#[$meta])*
        pub enum $ty {
            $( $(#[$vmeta])* $var, )*
            #[doc = $unk_doc]
            $unk($repr),
        }
        impl $ty {
            /// Every known value, in code order.
            pub const ALL: &'static [$ty] = &[$($ty::$var),*];
            /// The value with wire code `c` (the catch-all variant for a code this version
            /// does not know).
            pub fn from_code(c: $repr) -> $ty {
                match c {
                    $($code => $ty::$var,)*
                    c => $ty::$unk(c),
                }
            }
            /// The wire code.
            pub fn code(self) -> $repr {
                match self {
                    $($ty::$var => $code,)*
                    $ty::$unk(c) => c,
                }
            }
            /// Short stable name (`snake_case`), for logs and JSON.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$var => $text,)*
                    $ty::$unk(_) => $unk_text,
                }
            }
        }
    };
}

wire_enum! {
    /// Message type codes (the frame's `msg_type`).
    ///
    /// `0x52` and `0x58` are reserved for the Cap'n Proto RPC link on the reboot/bootctl
    /// ports ([`crate::rpc::link::RPC_DATA`], [`crate::rpc::link::RPC_RESET`]); no flashing
    /// message may use them.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum MsgType: repr(u8) {
        Hello = 0x01 => "HELLO",
        HelloReply = 0x02 => "HELLO_REPLY",
        Info = 0x03 => "INFO?",
        InfoReply = 0x04 => "INFO_REPLY",
        Write = 0x10 => "WRITE",
        Ack = 0x11 => "ACK",
        Nak = 0x12 => "NAK",
        Verified = 0x13 => "VERIFIED",
        WritePart = 0x14 => "WRITE_PART",
        PartAck = 0x15 => "PART_ACK",
        Done = 0x20 => "DONE",
        DoneReply = 0x21 => "DONE_REPLY",
        Abort = 0x30 => "ABORT",
        Error = 0x3f => "ERROR",
    }
}

impl MsgType {
    /// [`MsgType::from_code`] of a frame's `msg_type`.
    pub fn from_u8(v: u8) -> Option<MsgType> {
        MsgType::from_code(v)
    }
}

wire_enum! {
    /// Stable numeric error codes (ERROR and ABORT). Never renumber; only append.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum ErrorCode: u16 {
        /// 1: malformed message, or a message that is not valid in the current state.
        Protocol = 1 => "protocol",
        /// 2: the peer speaks another protocol version.
        Version = 2 => "version",
        /// 3: the image head (header/manifest) is invalid.
        BadImage = 3 => "bad_image",
        /// 4: a signature is required but missing, or does not verify.
        Signature = 4 => "signature",
        /// 5: a WRITE was rejected (unknown segment, out of bounds, not the planned chunk).
        BadWrite = 5 => "bad_write",
        /// 6: a segment's SHA-256 does not match the manifest.
        VerifyFailed = 6 => "verify_failed",
        /// 7: DONE carries an image hash that does not match the manifest.
        ImageHash = 7 => "image_hash",
        /// 8: DONE before every chunk was received and every segment verified.
        Incomplete = 8 => "incomplete",
        /// 9: target storage failed (staging file, journal).
        Storage = 9 => "storage",
        /// 10: the install step failed; the previous install is untouched.
        InstallFailed = 10 => "install_failed",
        /// 11: the target has no usable state directory and refuses to flash.
        NoState = 11 => "no_state",
        /// 12: no common capabilities (e.g. zstd required, not supported).
        Capability = 12 => "capability",
        /// 13: the image is larger than the target accepts.
        TooLarge = 13 => "too_large",
        /// 14: the host aborted the transfer (it stays resumable).
        Aborted = 14 => "aborted",
        /// 15: the peer stopped answering.
        Timeout = 15 => "timeout",
        /// 16: the image's security version is below the target's anti-rollback floor.
        Rollback = 16 => "rollback",
        /// 17: another link of the target is flashing right now (flashd serves one link at a
        /// time: the virtio-serial port and the UART); retry when it is done.
        Busy = 17 => "busy",
        /// 18: data (WRITE, WRITE_PART, DONE) for a session the target does not hold: it
        /// dropped a stalled one or restarted, and on a link without connections (a UART,
        /// a virtio port) the host cannot tell. Send HELLO again: the transfer resumes.
        NoSession = 18 => "no_session",
    }
    unknown: Unknown => "unknown", "A code this version does not know (kept verbatim)."
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code(), self.name())
    }
}

/// `HELLO` (host → target): opens a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Must be [`PROTO_VERSION`]; the decoder accepts any value so the receiver can
    /// answer a mismatch with `ERROR Version`.
    pub proto: u8,
    /// Random per connection; echoed in the reply.
    pub nonce: u64,
    /// Largest window the host wants (1..=[`MAX_WINDOW`]).
    pub window: u16,
    /// Largest chunk size the host wants (power of two, [`MIN_CHUNK`]..=[`MAX_CHUNK`]).
    pub chunk_size: u32,
    /// Compression algorithms the host can produce (bit set, [`COMPRESS_ZSTD`]).
    pub compression: u8,
    /// `false` = `--no-skip`: the target must not offer its skip index.
    pub skip: bool,
    /// `--allow-downgrade` ([`HELLO_ALLOW_DOWNGRADE`]).
    pub allow_downgrade: bool,
    /// The chunk size is the user's choice ([`HELLO_EXACT_CHUNK`]).
    pub exact_chunk: bool,
    /// Host name, `[A-Za-z0-9._-]{1,64}`.
    pub host: String,
    /// The image head: every byte before the first segment (header, manifest,
    /// signature, padding); 1..=[`MAX_HEAD`] bytes.
    pub head: Bytes,
}

/// One entry of the target's skip index: a chunk of the installed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexEntry {
    /// Absolute offset in the installed image.
    pub offset: u64,
    /// Length in bytes (1..=[`MAX_CHUNK`]).
    pub len: u32,
    /// [`ChunkHash`] of those bytes.
    pub hash: ChunkHash,
}

/// `HELLO_REPLY` (target → host): the negotiated session and where to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub proto: u8,
    /// The HELLO's nonce.
    pub nonce: u64,
    pub device: String,
    pub info: String,
    /// Accepted window (1..=HELLO window).
    pub window: u16,
    /// Accepted chunk size (power of two, MIN_CHUNK..=HELLO chunk size).
    pub chunk_size: u32,
    /// Accepted compression: 0 or exactly one bit of the HELLO set.
    pub compression: u8,
    /// The target already has exactly this image installed (send DONE directly).
    pub already_installed: bool,
    /// The target holds part of this image from an earlier session.
    pub resumed: bool,
    /// The target has no trust key and accepts unsigned images ([`REPLY_UNPROVISIONED`]).
    pub unprovisioned: bool,
    /// Chunks the target already holds: the host continues with seq `resume_seq + 1`.
    pub resume_seq: u32,
    /// Bit i set = segment i (table order) already verified.
    pub verified: u64,
    /// Chunks of the installed image (empty when skipping is off or impossible).
    pub index: Vec<IndexEntry>,
    /// The image `PATCH` writes with [`PatchSource::Base`] may reference (only when the
    /// HELLO offered [`COMPRESS_PATCH`] and skipping is allowed).
    pub base: Option<BaseImage>,
}

/// The image a target holds intact while it receives a new one (its active slot, or the
/// installed file): the base of `PATCH` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseImage {
    /// Manifest id of the base image.
    pub image_id: [u8; 32],
    /// Its total size: every `PATCH` reference lies inside.
    pub total_size: u64,
}

wire_enum! {
    /// What a `PATCH` write references.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub enum PatchSource: u8 {
        /// 1: the target's base image ([`HelloReply::base`]), absolute offsets.
        Base = 1 => "base",
        /// 2: the staging bytes of this image already accepted (before the chunk).
        Staging = 2 => "staging",
    }
    unknown: Unknown => "unknown", "Unknown value, kept verbatim."
}

/// What an INFO_REPLY says about the installed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstalledInfo {
    pub image_id: [u8; 32],
    pub image_sha256: [u8; 32],
    pub total_size: u64,
    pub version: String,
}

/// What an INFO_REPLY says about a partial transfer in staging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferInfo {
    pub image_id: [u8; 32],
    pub chunk_size: u32,
    /// Chunks durably held.
    pub next_seq: u32,
    pub plan_chunks: u32,
    pub verified: u64,
}

/// `INFO_REPLY` (target → host).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoReply {
    pub proto: u8,
    pub device: String,
    pub info: String,
    pub max_window: u16,
    pub max_chunk: u32,
    pub compression: u8,
    pub installed: Option<InstalledInfo>,
    pub transfer: Option<TransferInfo>,
    /// The image the target would patch from ([`HelloReply::base`]); encoded after
    /// `transfer` (absent in replies of older targets).
    pub base: Option<BaseImage>,
}

/// The body kind of a WRITE, carried in the frame flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum WriteKind {
    Raw = 0,
    Zero = 1,
    Zstd = 2,
    Copy = 3,
    Patch = 4,
    Derive = 5,
}

impl WriteKind {
    /// Every kind, in wire order.
    pub const ALL: [WriteKind; 6] = [
        WriteKind::Raw,
        WriteKind::Zero,
        WriteKind::Zstd,
        WriteKind::Copy,
        WriteKind::Patch,
        WriteKind::Derive,
    ];

    /// The kind a WRITE frame's `flags` carry (`None`: not a kind).
    pub fn from_flags(flags: u16) -> Option<WriteKind> {
        WriteKind::ALL.into_iter().find(|k| *k as u16 == flags)
    }
}

/// The data of a WRITE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteBody {
    /// Exactly `len` bytes.
    Raw(Bytes),
    /// `len` zero bytes (nothing on the wire).
    Zero,
    /// A zstd frame that decompresses to exactly `len` bytes; 1..=`len` bytes long.
    Zstd(Bytes),
    /// Copy `len` bytes from the installed image at absolute `src_offset`; they hash
    /// to `hash`.
    Copy { src_offset: u64, hash: ChunkHash },
    /// A zstd frame (1..=`len` bytes) that decompresses to exactly `len` bytes with
    /// `ref_len` bytes at `ref_offset` of `source` as its prefix (`zstd --patch-from`).
    Patch {
        source: PatchSource,
        ref_offset: u64,
        ref_len: u32,
        frame: Bytes,
    },
    /// `len` bytes the target computes itself (the dm-verity hash tree of its segment, from
    /// the data segment already received); nothing on the wire.
    Derive,
}

impl WriteBody {
    pub fn kind(&self) -> WriteKind {
        match self {
            WriteBody::Raw(_) => WriteKind::Raw,
            WriteBody::Zero => WriteKind::Zero,
            WriteBody::Zstd(_) => WriteKind::Zstd,
            WriteBody::Copy { .. } => WriteKind::Copy,
            WriteBody::Patch { .. } => WriteKind::Patch,
            WriteBody::Derive => WriteKind::Derive,
        }
    }
    /// Bytes this body occupies on the wire.
    pub fn wire_len(&self) -> usize {
        match self {
            WriteBody::Raw(b) | WriteBody::Zstd(b) => b.len(),
            WriteBody::Zero | WriteBody::Derive => 0,
            WriteBody::Copy { .. } => 24,
            WriteBody::Patch { frame, .. } => 13 + frame.len(),
        }
    }
}

/// `WRITE` (host → target): one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// Chunk sequence number, ≥ 1 (the frame's seq).
    pub seq: u32,
    /// Segment name, `[a-z0-9_-]{1,32}`.
    pub segment: String,
    /// Offset relative to the segment start.
    pub offset: u64,
    /// Decoded length (1..=[`MAX_CHUNK`]).
    pub len: u32,
    pub body: WriteBody,
}

/// Largest `total` of a [`WritePart`]: a WRITE payload (segment name, offset, len and
/// a body of at most [`MAX_CHUNK`] bytes) never exceeds this.
pub const MAX_PART_TOTAL: u32 = MAX_CHUNK + WRITE_HEADER_MAX;

/// Largest WRITE payload beyond its body: `str8` segment name, `offset`, `len`, and a
/// COPY body's 24 bytes. A receiver bounds a reassembly by `planned len + this`.
pub const WRITE_HEADER_MAX: u32 = 1 + MAX_SEGMENT_NAME_LEN as u32 + 12 + 24;

/// `WRITE_PART` (host → target): bytes `[at, at + data.len())` of the payload of the
/// WRITE for chunk `seq` (body kind `kind`), whose whole payload is `total` bytes. The
/// sender splits a chunk's WRITE this way when the line is too noisy for whole frames;
/// the receiver reassembles the parts in order and then handles the WRITE as if it had
/// arrived in one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritePart {
    /// The chunk's sequence number (frame `seq`, ≥ 1).
    pub seq: u32,
    /// The WRITE's body kind (frame `flags`).
    pub kind: WriteKind,
    /// Length of the whole WRITE payload (1..=[`MAX_PART_TOTAL`]).
    pub total: u32,
    /// Offset of `data` in that payload.
    pub at: u32,
    /// 1.. bytes; `at + data.len() ≤ total`.
    pub data: Bytes,
}

/// `PART_ACK` (target → host): every chunk below `seq` was accepted and bytes
/// `[0, have)` of chunk `seq`'s WRITE payload are held. `gap`: the part that caused it
/// arrived past `have` (something before it was lost). `sack`: bytes `[start, end)`
/// past the hole are held as well (selective acknowledgement: the run the part went
/// into, else the first run past `have`); `have < start < end ≤` [`MAX_PART_TOTAL`].
/// Optional on the wire: the old 9-byte layout decodes with `sack: None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartAck {
    pub seq: u32,
    pub have: u32,
    pub gap: bool,
    pub sack: Option<(u32, u32)>,
}

/// `ACK` (target → host): every WRITE with seq ≤ `ack` was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub ack: u32,
}

wire_enum! {
    /// Why a NAK was sent.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum NakReason: u8 {
        /// 1: a WRITE arrived after a missing one.
        Gap = 1 => "gap",
        /// 2: the decoder discarded corrupt bytes.
        Corrupt = 2 => "corrupt",
    }
    unknown: Unknown => "unknown", "Unknown value, kept verbatim."
}

/// `NAK` (target → host): resend from `seq`; implies ACK of `seq - 1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nak {
    pub seq: u32,
    pub reason: NakReason,
}

/// `VERIFIED` (target → host): a segment's SHA-256 matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub segment: String,
}

/// `DONE` (host → target): everything sent; install if the image hash matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub image_sha256: [u8; 32],
}

/// Status in a DONE_REPLY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoneStatus {
    /// 0: verified and installed.
    Installed,
    /// 1: still verifying or installing; the reply will follow (keep-alive).
    Pending,
    /// 2: the identical image was already installed; nothing changed.
    Unchanged,
}

/// `DONE_REPLY` (target → host).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoneReply {
    pub status: DoneStatus,
    pub image_sha256: [u8; 32],
}

/// `ABORT` (host → target): stop; the transfer stays resumable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Abort {
    pub code: ErrorCode,
    pub reason: String,
}

/// `ERROR` (either way): the session failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub text: String,
}

/// Every message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloReply(HelloReply),
    Info,
    InfoReply(InfoReply),
    Write(Write),
    Ack(Ack),
    Nak(Nak),
    Verified(Verified),
    WritePart(WritePart),
    PartAck(PartAck),
    Done(Done),
    DoneReply(DoneReply),
    Abort(Abort),
    Error(ErrorMsg),
}

/// Why a message could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgError {
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("{msg}: payload ends inside field `{field}`")]
    Truncated {
        msg: &'static str,
        field: &'static str,
    },
    #[error("{msg}: {extra} unexpected bytes after the last field")]
    Trailing { msg: &'static str, extra: usize },
    #[error("{msg}: field `{field}` is invalid: {why}")]
    Invalid {
        msg: &'static str,
        field: &'static str,
        why: String,
    },
    #[error("{msg}: frame flags {flags:#06x} are not valid for this message")]
    BadFlags { msg: &'static str, flags: u16 },
    #[error("{msg}: frame seq {seq} is not valid for this message")]
    BadSeq { msg: &'static str, seq: u32 },
    #[error(transparent)]
    Frame(#[from] FrameError),
}

impl MsgError {
    fn invalid(msg: &'static str, field: &'static str, why: impl Into<String>) -> MsgError {
        MsgError::Invalid {
            msg,
            field,
            why: why.into(),
        }
    }
}

// ---------------------------------------------------------------- validators

/// `[a-z0-9_-]{1,32}` (so never `/`, `.` or `..`).
pub fn validate_segment_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_SEGMENT_NAME_LEN {
        return Err(format!(
            "segment name must be 1..={MAX_SEGMENT_NAME_LEN} bytes, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_' || *c == '-'))
    {
        return Err(format!(
            "segment name {:?} contains {c:?}; allowed: [a-z0-9_-]",
            name.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// Host/device names: `[A-Za-z0-9._-]{1,64}`.
pub fn validate_peer_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!(
            "name must be 1..={MAX_NAME_LEN} bytes, got {}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "name {:?} contains {c:?}; allowed: [A-Za-z0-9._-]",
            name.escape_debug().to_string()
        ));
    }
    Ok(())
}

/// Free text: at most `max` bytes, no control characters.
pub fn validate_text(text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("text is {} bytes, max {max}", text.len()));
    }
    if text.chars().any(char::is_control) {
        return Err("text contains control characters".to_string());
    }
    Ok(())
}

/// Makes arbitrary text fit [`validate_text`]: control characters become spaces,
/// the text is cut (on a char boundary) to `max` bytes.
pub fn sanitize_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > max {
            break;
        }
        out.push(c);
    }
    out
}

/// Chunk size rule: power of two in [`MIN_CHUNK`]..=[`MAX_CHUNK`].
pub fn valid_chunk_size(c: u32) -> bool {
    c.is_power_of_two() && (MIN_CHUNK..=MAX_CHUNK).contains(&c)
}

/// The [`ChunkHash`] of some bytes.
pub fn chunk_hash(data: &[u8]) -> ChunkHash {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    let mut h = [0u8; 16];
    h.copy_from_slice(&d[..16]);
    h
}

// ---------------------------------------------------------------- wire helpers

struct Rd<'a> {
    msg: &'static str,
    buf: &'a Bytes,
    pos: usize,
}

impl<'a> Rd<'a> {
    fn new(msg: &'static str, buf: &'a Bytes) -> Rd<'a> {
        Rd { msg, buf, pos: 0 }
    }
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], MsgError> {
        let buf: &'a [u8] = self.buf;
        if buf.len() - self.pos < n {
            return Err(MsgError::Truncated {
                msg: self.msg,
                field,
            });
        }
        let s = &buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn bytes(&mut self, n: usize, field: &'static str) -> Result<Bytes, MsgError> {
        if self.buf.len() - self.pos < n {
            return Err(MsgError::Truncated {
                msg: self.msg,
                field,
            });
        }
        let b = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }
    fn rest(&mut self) -> Bytes {
        let b = self.buf.slice(self.pos..);
        self.pos = self.buf.len();
        b
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn u8(&mut self, f: &'static str) -> Result<u8, MsgError> {
        Ok(self.take(1, f)?[0])
    }
    fn u16(&mut self, f: &'static str) -> Result<u16, MsgError> {
        let b = self.take(2, f)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, f: &'static str) -> Result<u32, MsgError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4, f)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self, f: &'static str) -> Result<u64, MsgError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8, f)?);
        Ok(u64::from_le_bytes(a))
    }
    fn arr<const N: usize>(&mut self, f: &'static str) -> Result<[u8; N], MsgError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, f)?);
        Ok(a)
    }
    fn flag(&mut self, f: &'static str) -> Result<bool, MsgError> {
        match self.u8(f)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(MsgError::invalid(
                self.msg,
                f,
                format!("must be 0 or 1, got {v}"),
            )),
        }
    }
    fn utf8(&mut self, n: usize, f: &'static str) -> Result<String, MsgError> {
        let b = self.take(n, f)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| MsgError::invalid(self.msg, f, "not valid UTF-8"))
    }
    fn str8(&mut self, f: &'static str) -> Result<String, MsgError> {
        let n = self.u8(f)? as usize;
        self.utf8(n, f)
    }
    fn str16(&mut self, f: &'static str) -> Result<String, MsgError> {
        let n = self.u16(f)? as usize;
        self.utf8(n, f)
    }
    fn check(&self, r: Result<(), String>, f: &'static str) -> Result<(), MsgError> {
        r.map_err(|why| MsgError::invalid(self.msg, f, why))
    }
    fn end(&self) -> Result<(), MsgError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(MsgError::Trailing {
                msg: self.msg,
                extra,
            }),
        }
    }
}

fn put_str8(b: &mut BytesMut, s: &str) {
    // Callers validated the length (≤ 255).
    b.put_u8(s.len() as u8);
    b.put_slice(s.as_bytes());
}

fn put_str16(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}

fn chk(msg: &'static str, field: &'static str, r: Result<(), String>) -> Result<(), MsgError> {
    r.map_err(|why| MsgError::invalid(msg, field, why))
}

fn check_window(msg: &'static str, w: u16) -> Result<(), String> {
    let _ = msg;
    if w == 0 || w > MAX_WINDOW {
        return Err(format!("window must be 1..={MAX_WINDOW}, got {w}"));
    }
    Ok(())
}

fn check_chunk(c: u32) -> Result<(), String> {
    if !valid_chunk_size(c) {
        return Err(format!(
            "chunk size must be a power of two in {MIN_CHUNK}..={MAX_CHUNK}, got {c}"
        ));
    }
    Ok(())
}

fn check_compression_set(c: u8) -> Result<(), String> {
    if c & !(COMPRESS_ZSTD | COMPRESS_PATCH | COMPRESS_DERIVE) != 0 {
        return Err(format!("unknown compression bits {c:#04x}"));
    }
    if c & COMPRESS_PATCH != 0 && c & COMPRESS_ZSTD == 0 {
        return Err(format!("patch needs zstd, got {c:#04x}"));
    }
    Ok(())
}

fn check_head_len(n: usize) -> Result<(), String> {
    if n == 0 || n > MAX_HEAD {
        return Err(format!("image head must be 1..={MAX_HEAD} bytes, got {n}"));
    }
    Ok(())
}

fn check_write_len(len: u32) -> Result<(), String> {
    if len == 0 || len > MAX_CHUNK {
        return Err(format!("chunk length must be 1..={MAX_CHUNK}, got {len}"));
    }
    Ok(())
}

// ---------------------------------------------------------------- encode / decode

impl Message {
    pub fn msg_type(&self) -> MsgType {
        match self {
            Message::Hello(_) => MsgType::Hello,
            Message::HelloReply(_) => MsgType::HelloReply,
            Message::Info => MsgType::Info,
            Message::InfoReply(_) => MsgType::InfoReply,
            Message::Write(_) => MsgType::Write,
            Message::Ack(_) => MsgType::Ack,
            Message::Nak(_) => MsgType::Nak,
            Message::Verified(_) => MsgType::Verified,
            Message::WritePart(_) => MsgType::WritePart,
            Message::PartAck(_) => MsgType::PartAck,
            Message::Done(_) => MsgType::Done,
            Message::DoneReply(_) => MsgType::DoneReply,
            Message::Abort(_) => MsgType::Abort,
            Message::Error(_) => MsgType::Error,
        }
    }

    /// Validates and encodes the message into a frame.
    pub fn to_frame(&self) -> Result<Frame, MsgError> {
        let t = self.msg_type();
        let m = t.name();
        let mut b = BytesMut::new();
        let mut flags = 0u16;
        let mut seq = 0u32;
        match self {
            Message::Hello(h) => {
                chk(m, "window", check_window(m, h.window))?;
                chk(m, "chunk_size", check_chunk(h.chunk_size))?;
                chk(m, "compression", check_compression_set(h.compression))?;
                chk(m, "host", validate_peer_name(&h.host))?;
                chk(m, "head", check_head_len(h.head.len()))?;
                b.reserve(32 + h.head.len());
                b.put_u8(h.proto);
                b.put_u64_le(h.nonce);
                b.put_u16_le(h.window);
                b.put_u32_le(h.chunk_size);
                b.put_u8(h.compression);
                b.put_u8(
                    if h.skip { 0 } else { HELLO_NO_SKIP }
                        | if h.allow_downgrade {
                            HELLO_ALLOW_DOWNGRADE
                        } else {
                            0
                        }
                        | if h.exact_chunk { HELLO_EXACT_CHUNK } else { 0 },
                );
                put_str8(&mut b, &h.host);
                b.put_u32_le(h.head.len() as u32);
                b.put_slice(&h.head);
            }
            Message::HelloReply(r) => {
                chk(m, "device", validate_peer_name(&r.device))?;
                chk(m, "info", validate_text(&r.info, MAX_INFO_LEN))?;
                chk(m, "window", check_window(m, r.window))?;
                chk(m, "chunk_size", check_chunk(r.chunk_size))?;
                chk(m, "compression", check_reply_compression(r.compression))?;
                if r.index.len() > MAX_INDEX_ENTRIES {
                    return Err(MsgError::invalid(
                        m,
                        "index",
                        format!("{} entries, max {MAX_INDEX_ENTRIES}", r.index.len()),
                    ));
                }
                for e in &r.index {
                    chk(m, "index.len", check_write_len(e.len))?;
                }
                b.reserve(64 + r.index.len() * INDEX_ENTRY_LEN);
                b.put_u8(r.proto);
                b.put_u64_le(r.nonce);
                put_str8(&mut b, &r.device);
                put_str8(&mut b, &r.info);
                b.put_u16_le(r.window);
                b.put_u32_le(r.chunk_size);
                b.put_u8(r.compression);
                let mut f = 0u8;
                if r.already_installed {
                    f |= REPLY_ALREADY_INSTALLED;
                }
                if r.resumed {
                    f |= REPLY_RESUMED;
                }
                if r.unprovisioned {
                    f |= REPLY_UNPROVISIONED;
                }
                if r.base.is_some() {
                    f |= REPLY_BASE;
                }
                b.put_u8(f);
                b.put_u32_le(r.resume_seq);
                b.put_u64_le(r.verified);
                if let Some(base) = &r.base {
                    b.put_slice(&base.image_id);
                    b.put_u64_le(base.total_size);
                }
                b.put_u32_le(r.index.len() as u32);
                for e in &r.index {
                    b.put_u64_le(e.offset);
                    b.put_u32_le(e.len);
                    b.put_slice(&e.hash);
                }
            }
            Message::Info => {}
            Message::InfoReply(r) => {
                chk(m, "device", validate_peer_name(&r.device))?;
                chk(m, "info", validate_text(&r.info, MAX_INFO_LEN))?;
                chk(m, "max_window", check_window(m, r.max_window))?;
                chk(m, "max_chunk", check_chunk(r.max_chunk))?;
                chk(m, "compression", check_compression_set(r.compression))?;
                b.put_u8(r.proto);
                put_str8(&mut b, &r.device);
                put_str8(&mut b, &r.info);
                b.put_u16_le(r.max_window);
                b.put_u32_le(r.max_chunk);
                b.put_u8(r.compression);
                match &r.installed {
                    None => b.put_u8(0),
                    Some(i) => {
                        chk(
                            m,
                            "installed.version",
                            validate_text(&i.version, MAX_VERSION_LEN),
                        )?;
                        b.put_u8(1);
                        b.put_slice(&i.image_id);
                        b.put_slice(&i.image_sha256);
                        b.put_u64_le(i.total_size);
                        put_str8(&mut b, &i.version);
                    }
                }
                match &r.transfer {
                    None => b.put_u8(0),
                    Some(t) => {
                        chk(m, "transfer.chunk_size", check_chunk(t.chunk_size))?;
                        b.put_u8(1);
                        b.put_slice(&t.image_id);
                        b.put_u32_le(t.chunk_size);
                        b.put_u32_le(t.next_seq);
                        b.put_u32_le(t.plan_chunks);
                        b.put_u64_le(t.verified);
                    }
                }
                match &r.base {
                    None => b.put_u8(0),
                    Some(base) => {
                        b.put_u8(1);
                        b.put_slice(&base.image_id);
                        b.put_u64_le(base.total_size);
                    }
                }
            }
            Message::Write(w) => {
                if w.seq == 0 {
                    return Err(MsgError::BadSeq { msg: m, seq: 0 });
                }
                chk(m, "segment", validate_segment_name(&w.segment))?;
                chk(m, "len", check_write_len(w.len))?;
                check_body(m, w.len, &w.body)?;
                seq = w.seq;
                flags = w.body.kind() as u16;
                b.reserve(1 + w.segment.len() + 12 + w.body.wire_len());
                put_str8(&mut b, &w.segment);
                b.put_u64_le(w.offset);
                b.put_u32_le(w.len);
                match &w.body {
                    WriteBody::Raw(d) | WriteBody::Zstd(d) => b.put_slice(d),
                    WriteBody::Zero | WriteBody::Derive => {}
                    WriteBody::Copy { src_offset, hash } => {
                        b.put_u64_le(*src_offset);
                        b.put_slice(hash);
                    }
                    WriteBody::Patch {
                        source,
                        ref_offset,
                        ref_len,
                        frame,
                    } => {
                        b.put_u8(source.code());
                        b.put_u64_le(*ref_offset);
                        b.put_u32_le(*ref_len);
                        b.put_slice(frame);
                    }
                }
            }
            Message::WritePart(p) => {
                if p.seq == 0 {
                    return Err(MsgError::BadSeq { msg: m, seq: 0 });
                }
                chk(m, "data", check_part(p.total, p.at, p.data.len()))?;
                seq = p.seq;
                flags = p.kind as u16;
                b.reserve(8 + p.data.len());
                b.put_u32_le(p.total);
                b.put_u32_le(p.at);
                b.put_slice(&p.data);
            }
            Message::PartAck(a) => {
                b.put_u32_le(a.seq);
                b.put_u32_le(a.have);
                b.put_u8(u8::from(a.gap));
                if let Some((start, end)) = a.sack {
                    chk(m, "sack", check_sack(a.have, start, end))?;
                    b.put_u32_le(start);
                    b.put_u32_le(end);
                }
            }
            Message::Ack(a) => b.put_u32_le(a.ack),
            Message::Nak(n) => {
                b.put_u32_le(n.seq);
                b.put_u8(n.reason.code());
            }
            Message::Verified(v) => {
                chk(m, "segment", validate_segment_name(&v.segment))?;
                put_str8(&mut b, &v.segment);
            }
            Message::Done(d) => b.put_slice(&d.image_sha256),
            Message::DoneReply(d) => {
                b.put_u8(match d.status {
                    DoneStatus::Installed => 0,
                    DoneStatus::Pending => 1,
                    DoneStatus::Unchanged => 2,
                });
                b.put_slice(&d.image_sha256);
            }
            Message::Abort(a) => {
                chk(m, "reason", validate_text(&a.reason, MAX_TEXT_LEN))?;
                b.put_u16_le(a.code.code());
                put_str16(&mut b, &a.reason);
            }
            Message::Error(e) => {
                chk(m, "text", validate_text(&e.text, MAX_TEXT_LEN))?;
                b.put_u16_le(e.code.code());
                put_str16(&mut b, &e.text);
            }
        }
        Ok(Frame::new(t as u8, flags, seq, b.freeze())?)
    }

    /// Decodes and validates a frame's message. Bytes of WRITE data are zero-copy
    /// slices of the frame payload.
    pub fn from_frame(frame: &Frame) -> Result<Message, MsgError> {
        let t =
            MsgType::from_u8(frame.msg_type()).ok_or(MsgError::UnknownType(frame.msg_type()))?;
        let m = t.name();
        if t != MsgType::Write && t != MsgType::WritePart {
            if frame.flags() != 0 {
                return Err(MsgError::BadFlags {
                    msg: m,
                    flags: frame.flags(),
                });
            }
            if frame.seq() != 0 {
                return Err(MsgError::BadSeq {
                    msg: m,
                    seq: frame.seq(),
                });
            }
        }
        let mut r = Rd::new(m, frame.payload());
        let msg = match t {
            MsgType::Hello => {
                let proto = r.u8("proto")?;
                let nonce = r.u64("nonce")?;
                let window = r.u16("window")?;
                r.check(check_window(m, window), "window")?;
                let chunk_size = r.u32("chunk_size")?;
                r.check(check_chunk(chunk_size), "chunk_size")?;
                let compression = r.u8("compression")?;
                r.check(check_compression_set(compression), "compression")?;
                let fl = r.u8("flags")?;
                if fl & !(HELLO_NO_SKIP | HELLO_ALLOW_DOWNGRADE | HELLO_EXACT_CHUNK) != 0 {
                    return Err(MsgError::invalid(
                        m,
                        "flags",
                        format!("unknown bits {fl:#04x}"),
                    ));
                }
                let host = r.str8("host")?;
                r.check(validate_peer_name(&host), "host")?;
                let head_len = r.u32("head_len")? as usize;
                r.check(check_head_len(head_len), "head_len")?;
                let head = r.bytes(head_len, "head")?;
                Message::Hello(Hello {
                    proto,
                    nonce,
                    window,
                    chunk_size,
                    compression,
                    skip: fl & HELLO_NO_SKIP == 0,
                    allow_downgrade: fl & HELLO_ALLOW_DOWNGRADE != 0,
                    exact_chunk: fl & HELLO_EXACT_CHUNK != 0,
                    host,
                    head,
                })
            }
            MsgType::HelloReply => {
                let proto = r.u8("proto")?;
                let nonce = r.u64("nonce")?;
                let device = r.str8("device")?;
                r.check(validate_peer_name(&device), "device")?;
                let info = r.str8("info")?;
                r.check(validate_text(&info, MAX_INFO_LEN), "info")?;
                let window = r.u16("window")?;
                r.check(check_window(m, window), "window")?;
                let chunk_size = r.u32("chunk_size")?;
                r.check(check_chunk(chunk_size), "chunk_size")?;
                let compression = r.u8("compression")?;
                r.check(check_reply_compression(compression), "compression")?;
                let fl = r.u8("flags")?;
                if fl
                    & !(REPLY_ALREADY_INSTALLED | REPLY_RESUMED | REPLY_UNPROVISIONED | REPLY_BASE)
                    != 0
                {
                    return Err(MsgError::invalid(
                        m,
                        "flags",
                        format!("unknown bits {fl:#04x}"),
                    ));
                }
                let resume_seq = r.u32("resume_seq")?;
                let verified = r.u64("verified")?;
                let base = if fl & REPLY_BASE != 0 {
                    Some(BaseImage {
                        image_id: r.arr::<32>("base.image_id")?,
                        total_size: r.u64("base.total_size")?,
                    })
                } else {
                    None
                };
                let n = r.u32("index_count")? as usize;
                if n > MAX_INDEX_ENTRIES {
                    return Err(MsgError::invalid(
                        m,
                        "index_count",
                        format!("{n} entries, max {MAX_INDEX_ENTRIES}"),
                    ));
                }
                if r.remaining() != n * INDEX_ENTRY_LEN {
                    return Err(MsgError::invalid(
                        m,
                        "index",
                        format!(
                            "{n} entries need {} bytes, payload has {}",
                            n * INDEX_ENTRY_LEN,
                            r.remaining()
                        ),
                    ));
                }
                let mut index = Vec::with_capacity(n);
                for _ in 0..n {
                    let offset = r.u64("index.offset")?;
                    let len = r.u32("index.len")?;
                    r.check(check_write_len(len), "index.len")?;
                    let hash = r.arr::<16>("index.hash")?;
                    index.push(IndexEntry { offset, len, hash });
                }
                Message::HelloReply(HelloReply {
                    proto,
                    nonce,
                    device,
                    info,
                    window,
                    chunk_size,
                    compression,
                    already_installed: fl & REPLY_ALREADY_INSTALLED != 0,
                    resumed: fl & REPLY_RESUMED != 0,
                    unprovisioned: fl & REPLY_UNPROVISIONED != 0,
                    resume_seq,
                    verified,
                    index,
                    base,
                })
            }
            MsgType::Info => Message::Info,
            MsgType::InfoReply => {
                let proto = r.u8("proto")?;
                let device = r.str8("device")?;
                r.check(validate_peer_name(&device), "device")?;
                let info = r.str8("info")?;
                r.check(validate_text(&info, MAX_INFO_LEN), "info")?;
                let max_window = r.u16("max_window")?;
                r.check(check_window(m, max_window), "max_window")?;
                let max_chunk = r.u32("max_chunk")?;
                r.check(check_chunk(max_chunk), "max_chunk")?;
                let compression = r.u8("compression")?;
                r.check(check_compression_set(compression), "compression")?;
                let installed = if r.flag("has_installed")? {
                    let image_id = r.arr::<32>("installed.image_id")?;
                    let image_sha256 = r.arr::<32>("installed.image_sha256")?;
                    let total_size = r.u64("installed.total_size")?;
                    let version = r.str8("installed.version")?;
                    r.check(
                        validate_text(&version, MAX_VERSION_LEN),
                        "installed.version",
                    )?;
                    Some(InstalledInfo {
                        image_id,
                        image_sha256,
                        total_size,
                        version,
                    })
                } else {
                    None
                };
                let transfer = if r.flag("has_transfer")? {
                    let image_id = r.arr::<32>("transfer.image_id")?;
                    let chunk_size = r.u32("transfer.chunk_size")?;
                    r.check(check_chunk(chunk_size), "transfer.chunk_size")?;
                    let next_seq = r.u32("transfer.next_seq")?;
                    let plan_chunks = r.u32("transfer.plan_chunks")?;
                    let verified = r.u64("transfer.verified")?;
                    Some(TransferInfo {
                        image_id,
                        chunk_size,
                        next_seq,
                        plan_chunks,
                        verified,
                    })
                } else {
                    None
                };
                let base = if r.remaining() > 0 && r.flag("has_base")? {
                    Some(BaseImage {
                        image_id: r.arr::<32>("base.image_id")?,
                        total_size: r.u64("base.total_size")?,
                    })
                } else {
                    None
                };
                Message::InfoReply(InfoReply {
                    proto,
                    device,
                    info,
                    max_window,
                    max_chunk,
                    compression,
                    installed,
                    transfer,
                    base,
                })
            }
            MsgType::Write => {
                if frame.seq() == 0 {
                    return Err(MsgError::BadSeq { msg: m, seq: 0 });
                }
                let kind = write_kind(m, frame.flags())?;
                let segment = r.str8("segment")?;
                r.check(validate_segment_name(&segment), "segment")?;
                let offset = r.u64("offset")?;
                let len = r.u32("len")?;
                r.check(check_write_len(len), "len")?;
                let body = match kind {
                    WriteKind::Raw => WriteBody::Raw(r.rest()),
                    WriteKind::Zero => WriteBody::Zero,
                    WriteKind::Derive => WriteBody::Derive,
                    WriteKind::Zstd => WriteBody::Zstd(r.rest()),
                    WriteKind::Copy => WriteBody::Copy {
                        src_offset: r.u64("src_offset")?,
                        hash: r.arr::<16>("hash")?,
                    },
                    WriteKind::Patch => WriteBody::Patch {
                        source: PatchSource::from_code(r.u8("source")?),
                        ref_offset: r.u64("ref_offset")?,
                        ref_len: r.u32("ref_len")?,
                        frame: r.rest(),
                    },
                };
                check_body(m, len, &body)?;
                Message::Write(Write {
                    seq: frame.seq(),
                    segment,
                    offset,
                    len,
                    body,
                })
            }
            MsgType::WritePart => {
                if frame.seq() == 0 {
                    return Err(MsgError::BadSeq { msg: m, seq: 0 });
                }
                let kind = write_kind(m, frame.flags())?;
                let total = r.u32("total")?;
                let at = r.u32("at")?;
                let data = r.rest();
                r.check(check_part(total, at, data.len()), "data")?;
                Message::WritePart(WritePart {
                    seq: frame.seq(),
                    kind,
                    total,
                    at,
                    data,
                })
            }
            MsgType::PartAck => {
                let seq = r.u32("seq")?;
                let have = r.u32("have")?;
                let gap = match r.u8("gap")? {
                    0 => false,
                    1 => true,
                    v => {
                        return Err(MsgError::invalid(
                            m,
                            "gap",
                            format!("must be 0 or 1, got {v}"),
                        ))
                    }
                };
                // Optional trailing run (absent in the old layout).
                let sack = if r.remaining() > 0 {
                    let start = r.u32("sack_start")?;
                    let end = r.u32("sack_end")?;
                    r.check(check_sack(have, start, end), "sack")?;
                    Some((start, end))
                } else {
                    None
                };
                Message::PartAck(PartAck {
                    seq,
                    have,
                    gap,
                    sack,
                })
            }
            MsgType::Ack => Message::Ack(Ack { ack: r.u32("ack")? }),
            MsgType::Nak => Message::Nak(Nak {
                seq: r.u32("seq")?,
                reason: NakReason::from_code(r.u8("reason")?),
            }),
            MsgType::Verified => {
                let segment = r.str8("segment")?;
                r.check(validate_segment_name(&segment), "segment")?;
                Message::Verified(Verified { segment })
            }
            MsgType::Done => Message::Done(Done {
                image_sha256: r.arr::<32>("image_sha256")?,
            }),
            MsgType::DoneReply => {
                let status = match r.u8("status")? {
                    0 => DoneStatus::Installed,
                    1 => DoneStatus::Pending,
                    2 => DoneStatus::Unchanged,
                    v => {
                        return Err(MsgError::invalid(
                            m,
                            "status",
                            format!("unknown status {v}"),
                        ))
                    }
                };
                Message::DoneReply(DoneReply {
                    status,
                    image_sha256: r.arr::<32>("image_sha256")?,
                })
            }
            MsgType::Abort => {
                let code = ErrorCode::from_code(r.u16("code")?);
                let reason = r.str16("reason")?;
                r.check(validate_text(&reason, MAX_TEXT_LEN), "reason")?;
                Message::Abort(Abort { code, reason })
            }
            MsgType::Error => {
                let code = ErrorCode::from_code(r.u16("code")?);
                let text = r.str16("text")?;
                r.check(validate_text(&text, MAX_TEXT_LEN), "text")?;
                Message::Error(ErrorMsg { code, text })
            }
        };
        r.end()?;
        Ok(msg)
    }
}

fn write_kind(m: &'static str, flags: u16) -> Result<WriteKind, MsgError> {
    WriteKind::from_flags(flags).ok_or(MsgError::BadFlags { msg: m, flags })
}

/// PART_ACK `sack` rule: a non-empty run past `have`, within a WRITE payload.
fn check_sack(have: u32, start: u32, end: u32) -> Result<(), String> {
    if start <= have || end <= start || end > MAX_PART_TOTAL {
        return Err(format!(
            "held run [{start}, {end}) must be non-empty, past have {have} and within {MAX_PART_TOTAL} bytes"
        ));
    }
    Ok(())
}

/// WRITE_PART rule: `1 ≤ total ≤ MAX_PART_TOTAL`, 1.. bytes, `at + n ≤ total`.
fn check_part(total: u32, at: u32, n: usize) -> Result<(), String> {
    if total == 0 || total > MAX_PART_TOTAL {
        return Err(format!("total {total} is outside 1..={MAX_PART_TOTAL}"));
    }
    let end = u64::from(at) + n as u64;
    if n == 0 || end > u64::from(total) {
        return Err(format!(
            "part [{at}, {end}) is empty or past the WRITE's {total} bytes"
        ));
    }
    Ok(())
}

fn check_reply_compression(c: u8) -> Result<(), String> {
    check_compression_set(c)?;
    if (c & !(COMPRESS_PATCH | COMPRESS_DERIVE)).count_ones() > 1 {
        return Err(format!(
            "at most one algorithm may be accepted, got {c:#04x}"
        ));
    }
    Ok(())
}

fn check_body(m: &'static str, len: u32, body: &WriteBody) -> Result<(), MsgError> {
    match body {
        WriteBody::Raw(d) if d.len() != len as usize => Err(MsgError::invalid(
            m,
            "data",
            format!("raw data is {} bytes, len says {len}", d.len()),
        )),
        WriteBody::Zstd(d) if d.is_empty() || d.len() > len as usize => Err(MsgError::invalid(
            m,
            "data",
            format!("compressed data must be 1..={len} bytes, got {}", d.len()),
        )),
        WriteBody::Patch { frame, .. } if frame.is_empty() || frame.len() > len as usize => {
            Err(MsgError::invalid(
                m,
                "data",
                format!("patch frame must be 1..={len} bytes, got {}", frame.len()),
            ))
        }
        WriteBody::Patch { ref_len, .. } if *ref_len == 0 || *ref_len > MAX_PATCH_REF => {
            Err(MsgError::invalid(
                m,
                "ref_len",
                format!("patch reference must be 1..={MAX_PATCH_REF} bytes, got {ref_len}"),
            ))
        }
        WriteBody::Patch {
            source: PatchSource::Unknown(c),
            ..
        } => Err(MsgError::invalid(
            m,
            "source",
            format!("unknown patch source {c}"),
        )),
        WriteBody::Patch {
            ref_offset,
            ref_len,
            ..
        } if ref_offset.checked_add(u64::from(*ref_len)).is_none() => Err(MsgError::invalid(
            m,
            "ref_offset",
            "patch reference overflows".to_string(),
        )),
        _ => Ok(()),
    }
}

impl ErrorMsg {
    /// An ERROR with text made to fit the rules (see [`sanitize_text`]).
    pub fn new(code: ErrorCode, text: impl AsRef<str>) -> ErrorMsg {
        ErrorMsg {
            code,
            text: sanitize_text(text.as_ref(), MAX_TEXT_LEN),
        }
    }
}

impl Abort {
    /// An ABORT with the reason made to fit the rules.
    pub fn new(code: ErrorCode, reason: impl AsRef<str>) -> Abort {
        Abort {
            code,
            reason: sanitize_text(reason.as_ref(), MAX_TEXT_LEN),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn wire_tables_round_trip() {
        for t in MsgType::ALL {
            assert_eq!(MsgType::from_u8(t.code()), Some(*t));
            assert_eq!(*t as u8, t.code());
        }
        let names: std::collections::HashSet<_> = MsgType::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names.len(), MsgType::ALL.len());
        assert_eq!(MsgType::Info.name(), "INFO?");
        for e in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(e.code()), *e);
            assert_ne!(e.name(), "unknown");
        }
        assert_eq!(ErrorCode::ALL.len(), 18);
        assert_eq!(ErrorCode::from_code(999), ErrorCode::Unknown(999));
        assert_eq!(ErrorCode::Unknown(999).code(), 999);
        assert_eq!(ErrorCode::TooLarge.to_string(), "13 (too_large)");
    }

    use super::*;

    #[test]
    fn rpc_link_type_is_not_a_flashing_message() {
        assert!(MsgType::from_u8(crate::rpc::link::RPC_DATA).is_none());
        assert!(MsgType::from_u8(crate::rpc::link::RPC_RESET).is_none());
    }

    #[test]
    fn segment_names() {
        for ok in [
            "rootfs",
            "a",
            "kernel-6_1",
            "0123456789abcdefghij0123456789ab",
        ] {
            assert!(validate_segment_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "a/b",
            "/",
            "A",
            "a.b",
            "root fs",
            "é",
            "0123456789abcdefghij0123456789abc",
        ] {
            assert!(validate_segment_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn write_kinds_round_trip_through_frame_flags() {
        for k in WriteKind::ALL {
            assert_eq!(WriteKind::from_flags(k as u16), Some(k));
        }
        assert_eq!(WriteKind::from_flags(6), None);
        assert_eq!(WriteKind::from_flags(u16::MAX), None);
        // A WRITE_PART of a PATCH keeps its kind on the wire.
        let p = Message::WritePart(WritePart {
            seq: 3,
            kind: WriteKind::Patch,
            total: 40,
            at: 8,
            data: Bytes::from_static(b"0123456789"),
        });
        let f = p.to_frame().unwrap();
        assert_eq!(Message::from_frame(&f).unwrap(), p);
    }

    #[test]
    fn error_codes_are_stable() {
        let table = [
            (ErrorCode::Protocol, 1),
            (ErrorCode::Version, 2),
            (ErrorCode::BadImage, 3),
            (ErrorCode::Signature, 4),
            (ErrorCode::BadWrite, 5),
            (ErrorCode::VerifyFailed, 6),
            (ErrorCode::ImageHash, 7),
            (ErrorCode::Incomplete, 8),
            (ErrorCode::Storage, 9),
            (ErrorCode::InstallFailed, 10),
            (ErrorCode::NoState, 11),
            (ErrorCode::Capability, 12),
            (ErrorCode::TooLarge, 13),
            (ErrorCode::Aborted, 14),
            (ErrorCode::Timeout, 15),
        ];
        for (c, n) in table {
            assert_eq!(c.code(), n);
            assert_eq!(ErrorCode::from_code(n), c);
        }
        assert_eq!(ErrorCode::from_code(999), ErrorCode::Unknown(999));
    }

    #[test]
    fn sanitize_keeps_rules() {
        let s = sanitize_text("a\nb\u{7f}é", 4);
        assert_eq!(s, "a b ");
        assert!(validate_text(&s, 4).is_ok());
    }
}
