//! The wire frame and its streaming decoder.
//!
//! Every message of the flashing conversation travels in one frame:
//!
//! ```text
//! offset  size  field
//!      0     4  magic      b"NXFR"
//!      4     1  version    FRAME_VERSION (1)
//!      5     1  msg_type   see crate::msg::MsgType
//!      6     2  flags      u16 LE, meaning defined per message type
//!      8     4  seq        u32 LE
//!     12     4  len        u32 LE, payload length, <= MAX_PAYLOAD
//!     16   len  payload
//!  16+len    4  crc32      u32 LE, CRC-32 (IEEE) over bytes [4, 16+len)
//! ```
//!
//! The CRC covers the header (version .. len) and the payload; the magic is the
//! resynchronisation marker and is not covered.
//!
//! # Decoding
//!
//! [`FrameDecoder::decode`] works on a [`BytesMut`] the caller appends to, in the
//! style of tokio-util codecs:
//!
//! * a partial frame returns `Ok(None)` (read more and call again);
//! * a complete, valid frame returns `Ok(Some(frame))` and removes its bytes;
//! * garbage, a wrong magic, a bad CRC, an unsupported version or a hostile length
//!   returns `Err(FrameError::Skipped { bytes, reason })`: the decoder has already
//!   removed the `bytes` it discarded and stands on the next magic (or on a possible
//!   magic prefix at the end of the buffer). The error is recoverable: log or count
//!   it and call `decode` again;
//! * [`FrameDecoder::decode_eof`] additionally reports bytes left over at the end of
//!   the stream as [`FrameError::TrailingBytes`].
//!
//! The declared length is checked against [`MAX_PAYLOAD`] before the decoder reserves
//! any memory, so a hostile length never makes it allocate more than
//! [`MAX_FRAME_LEN`] bytes.
//!
//! ```
//! use bytes::{Bytes, BytesMut};
//! use proto::frame::{Frame, FrameDecoder};
//!
//! let frame = Frame::new(0x11, 0, 7, Bytes::from_static(b"hi")).unwrap();
//! let mut wire = BytesMut::new();
//! frame.encode(&mut wire);
//!
//! let mut dec = FrameDecoder::new();
//! let mut buf = BytesMut::new();
//! buf.extend_from_slice(&wire[..5]);
//! assert!(dec.decode(&mut buf).unwrap().is_none()); // partial
//! buf.extend_from_slice(&wire[5..]);
//! assert_eq!(dec.decode(&mut buf).unwrap(), Some(frame));
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Start-of-frame marker.
pub const MAGIC: [u8; 4] = *b"NXFR";
/// The only frame layout version this crate speaks.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the payload: magic, version, type, flags, seq, len.
pub const HEADER_LEN: usize = 16;
/// Bytes after the payload: the CRC-32.
pub const TRAILER_LEN: usize = 4;
/// Largest payload accepted or produced. Big enough for a HELLO carrying the
/// largest image head ([`crate::image::MAX_HEAD_LEN`]) plus its fixed fields.
pub const MAX_PAYLOAD: usize = 2 * 1024 * 1024 + 64 * 1024;
/// Largest encoded frame; the decoder never buffers more than this for one frame.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + MAX_PAYLOAD + TRAILER_LEN;

/// Why the decoder discarded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Bytes that do not start with the magic (noise, a cut frame, line garbage).
    Garbage,
    /// A frame whose CRC-32 does not match; its bytes were not trusted (the decoder
    /// resynchronised on the next magic after its first byte).
    BadCrc { expected: u32, actual: u32 },
    /// A header declaring a payload longer than [`MAX_PAYLOAD`]; nothing was reserved.
    TooLong { len: u32 },
    /// A frame with a valid CRC but a layout version this decoder does not speak.
    UnsupportedVersion { version: u8 },
    /// A frame whose length field was corrupted: it declared `declared` payload bytes,
    /// but the next frame starts after `actual`, where its CRC holds with that length
    /// (see [`FrameDecoder::recover_short_frame`]). Dropped like a bad-CRC frame.
    CorruptLength { declared: u32, actual: u32 },
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SkipReason::Garbage => write!(f, "garbage before the next frame magic"),
            SkipReason::BadCrc { expected, actual } => {
                write!(
                    f,
                    "bad crc32 (frame says {expected:#010x}, computed {actual:#010x})"
                )
            }
            SkipReason::TooLong { len } => write!(
                f,
                "declared payload length {len} exceeds the maximum of {MAX_PAYLOAD}"
            ),
            SkipReason::UnsupportedVersion { version } => write!(
                f,
                "frame version {version} is not supported (this side speaks {FRAME_VERSION})"
            ),
            SkipReason::CorruptLength { declared, actual } => write!(
                f,
                "corrupt length field (declared {declared} payload bytes; the frame ends after {actual})"
            ),
        }
    }
}

/// Frame encoding/decoding errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Recoverable: `bytes` were discarded; the decoder is resynchronised.
    #[error("frame decoder skipped {bytes} bytes: {reason}")]
    Skipped { bytes: usize, reason: SkipReason },
    /// The stream ended in the middle of a frame (or with unparseable bytes).
    #[error("{bytes} bytes left over at end of stream: the last frame is truncated")]
    TrailingBytes { bytes: usize },
    /// A frame was built with a payload over [`MAX_PAYLOAD`]; split the data.
    #[error("payload of {len} bytes exceeds the frame maximum of {MAX_PAYLOAD} bytes")]
    PayloadTooLarge { len: usize },
}

impl FrameError {
    /// `true` for [`FrameError::Skipped`]: the stream continues after it.
    pub fn is_recoverable(&self) -> bool {
        matches!(self, FrameError::Skipped { .. })
    }
}

/// One frame. The payload is a [`Bytes`], so cloning a frame (for retransmission)
/// and slicing its payload (for message decoding) never copies data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    msg_type: u8,
    flags: u16,
    seq: u32,
    payload: Bytes,
    crc: u32,
}

impl Frame {
    /// Builds a frame and computes its CRC. Fails if the payload is over
    /// [`MAX_PAYLOAD`].
    pub fn new(msg_type: u8, flags: u16, seq: u32, payload: Bytes) -> Result<Frame, FrameError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(FrameError::PayloadTooLarge { len: payload.len() });
        }
        let header = header_bytes(msg_type, flags, seq, payload.len() as u32);
        let crc = crc_of(&header[4..], &payload);
        Ok(Frame {
            msg_type,
            flags,
            seq,
            payload,
            crc,
        })
    }

    pub fn msg_type(&self) -> u8 {
        self.msg_type
    }
    pub fn flags(&self) -> u16 {
        self.flags
    }
    pub fn seq(&self) -> u32 {
        self.seq
    }
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }
    /// The CRC-32 carried in the trailer.
    pub fn crc(&self) -> u32 {
        self.crc
    }
    /// Total bytes on the wire.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.payload.len() + TRAILER_LEN
    }

    /// The 16 header bytes (magic .. len). With [`Frame::trailer`] and the payload
    /// this allows a vectored write without copying the payload.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        header_bytes(
            self.msg_type,
            self.flags,
            self.seq,
            self.payload.len() as u32,
        )
    }

    /// The 4 trailer bytes (CRC-32, little-endian).
    pub fn trailer(&self) -> [u8; TRAILER_LEN] {
        self.crc.to_le_bytes()
    }

    /// Appends the encoded frame to `dst` (one copy of the payload; `dst` is grown
    /// exactly once).
    pub fn encode(&self, dst: &mut BytesMut) {
        dst.reserve(self.encoded_len());
        dst.put_slice(&self.header());
        dst.put_slice(&self.payload);
        dst.put_slice(&self.trailer());
    }

    /// Appends the encoded frame to a `Vec`.
    pub fn encode_to_vec(&self, dst: &mut Vec<u8>) {
        dst.reserve(self.encoded_len());
        dst.extend_from_slice(&self.header());
        dst.extend_from_slice(&self.payload);
        dst.extend_from_slice(&self.trailer());
    }

    /// The encoded frame as one buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        self.encode(&mut b);
        b.freeze()
    }
}

fn header_bytes(msg_type: u8, flags: u16, seq: u32, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = FRAME_VERSION;
    h[5] = msg_type;
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h[8..12].copy_from_slice(&seq.to_le_bytes());
    h[12..16].copy_from_slice(&len.to_le_bytes());
    h
}

/// Which implementation computes the frame CRC. Both give the same CRC-32 (IEEE); they
/// differ only in speed, and which one is faster depends on the CPU: `crc32fast` uses
/// PCLMULQDQ where the CPU has it (10+ GB/s natively), but an emulated CPU (QEMU TCG)
/// runs that instruction several times slower than a plain slice-by-16 table lookup. A
/// program picks the engine once at startup (flashd measures both; see
/// [`set_crc_engine`]); the default is [`CrcEngine::Simd`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrcEngine {
    /// `crc32fast`: SIMD (PCLMULQDQ) when the CPU has it, else its own table code.
    Simd,
    /// `crc`'s slice-by-16 tables: no special instructions.
    Table,
}

static TABLE_CRC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
const CRC_TABLE16: crc::Crc<u32, crc::Table<16>> =
    crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISO_HDLC);

/// Select the frame CRC implementation for this process (see [`CrcEngine`]).
pub fn set_crc_engine(engine: CrcEngine) {
    TABLE_CRC.store(
        engine == CrcEngine::Table,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The frame CRC implementation in use.
pub fn crc_engine() -> CrcEngine {
    if TABLE_CRC.load(std::sync::atomic::Ordering::Relaxed) {
        CrcEngine::Table
    } else {
        CrcEngine::Simd
    }
}

/// CRC-32 (IEEE) of the concatenation of `parts` with the given engine.
pub fn crc32_with(engine: CrcEngine, parts: &[&[u8]]) -> u32 {
    match engine {
        CrcEngine::Simd => {
            let mut h = crc32fast::Hasher::new();
            for p in parts {
                h.update(p);
            }
            h.finalize()
        }
        CrcEngine::Table => {
            let mut d = CRC_TABLE16.digest();
            for p in parts {
                d.update(p);
            }
            d.finalize()
        }
    }
}

fn crc_of(header_after_magic: &[u8], payload: &[u8]) -> u32 {
    crc32_with(crc_engine(), &[header_after_magic, payload])
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Position of the first full magic in `buf[from..]`, or of a magic prefix that runs
/// into the end of the buffer (it may complete with more bytes).
fn find_magic(buf: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while i < buf.len() {
        let rest = &buf[i..];
        let n = rest.len().min(MAGIC.len());
        if rest[..n] == MAGIC[..n] {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Streaming frame decoder (see the module docs). It keeps counters of what it
/// skipped, for diagnostics.
#[derive(Debug, Default, Clone)]
pub struct FrameDecoder {
    frames: u64,
    skipped_bytes: u64,
    skip_events: u64,
    eager_resync: bool,
    /// [`FrameDecoder::recover_short_frame`]'s progress through the partial frame at the
    /// head of the buffer: its header and how far it was searched.
    short_scan: Option<([u8; HEADER_LEN], usize)>,
    /// The payload length of recent frames: the largest, decaying by 1/16 per frame.
    recent_len: usize,
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// A decoder that does not wait for a partial frame when a complete, CRC-valid
    /// frame already follows it in the buffer: the partial frame's length was
    /// corrupted (a flipped length bit would otherwise stall the stream until up to
    /// [`MAX_PAYLOAD`] more bytes arrive). Only for streams whose payloads never
    /// carry encoded frames (the target → host direction of the flash port: ACKs,
    /// NAKs, replies); a WRITE may carry arbitrary image bytes.
    pub fn eager() -> FrameDecoder {
        FrameDecoder {
            eager_resync: true,
            ..FrameDecoder::default()
        }
    }

    /// The link went idle with a partial frame buffered: a sender writes whole frames,
    /// so that frame's length was corrupted. Discards its first byte and everything
    /// up to the next magic (frames hidden behind it are found again) and reports it
    /// like [`FrameDecoder::decode`] reports skipped bytes. `None` if nothing is
    /// buffered. Shells call this when no byte arrived for a while.
    pub fn abandon_partial(&mut self, buf: &mut BytesMut) -> Option<FrameError> {
        if buf.is_empty() {
            return None;
        }
        let len = if buf.len() >= HEADER_LEN {
            le_u32(&buf[12..16])
        } else {
            0
        };
        Some(self.resync(buf, SkipReason::TooLong { len }))
    }

    /// The link went quiet with a partial frame buffered: was its length field
    /// corrupted? A flipped length bit makes a frame claim up to [`MAX_PAYLOAD`] bytes,
    /// and the frames sent after it vanish into it until that many bytes arrived (a
    /// sender waiting for acknowledgements sends few). The frame really ends where a
    /// later magic starts if its CRC holds with the length that implies: then the
    /// frame's bytes are discarded (reported as [`SkipReason::CorruptLength`]) and the
    /// frames behind it decode again. A false match needs a CRC-32 collision; an encoded
    /// frame inside a payload does not match (the outer CRC covers different bytes).
    /// Only a frame longer than the recent ones is searched (a sender's frames are alike,
    /// and a length corrupted downwards just fails its CRC): a quiet moment in the middle
    /// of an honest frame costs nothing. The search resumes where the last call stopped,
    /// so calling this on every quiet moment costs one pass over the frame at most.
    /// `None`: nothing to recover (no partial frame, or its length may be right).
    pub fn recover_short_frame(&mut self, buf: &mut BytesMut) -> Option<FrameError> {
        if buf.len() < HEADER_LEN || buf[..MAGIC.len()] != MAGIC {
            return None;
        }
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&buf[..HEADER_LEN]);
        let declared = le_u32(&buf[12..16]);
        if HEADER_LEN + declared as usize + TRAILER_LEN <= buf.len()
            || (declared as usize) <= self.recent_len
        {
            return None;
        }
        let from = match self.short_scan {
            Some((h, upto)) if h == head && upto <= buf.len() => upto,
            _ => HEADER_LEN + TRAILER_LEN,
        };
        let mut at = from;
        while let Some(i) = find_magic(buf, at) {
            if i + MAGIC.len() > buf.len() {
                // A magic prefix at the end: look at it again when more arrived.
                self.short_scan = Some((head, i));
                return None;
            }
            let actual = (i - HEADER_LEN - TRAILER_LEN) as u32;
            let mut h = [0u8; HEADER_LEN - 4];
            h.copy_from_slice(&buf[4..HEADER_LEN]);
            h[8..12].copy_from_slice(&actual.to_le_bytes());
            let trailer = le_u32(&buf[i - TRAILER_LEN..i]);
            if crc_of(&h, &buf[HEADER_LEN..i - TRAILER_LEN]) == trailer {
                self.short_scan = None;
                return Some(self.skip(buf, i, SkipReason::CorruptLength { declared, actual }));
            }
            at = i + 1;
        }
        self.short_scan = Some((head, buf.len()));
        None
    }

    /// Is there a complete CRC-valid frame at a magic after offset 0?
    fn valid_frame_follows(buf: &[u8]) -> bool {
        let mut from = 1;
        while let Some(i) = find_magic(buf, from) {
            let rest = &buf[i..];
            if rest.len() >= HEADER_LEN {
                let len = le_u32(&rest[12..16]) as usize;
                let total = HEADER_LEN + len + TRAILER_LEN;
                if len <= MAX_PAYLOAD && rest.len() >= total {
                    let expected = le_u32(&rest[HEADER_LEN + len..total]);
                    if crc_of(&rest[4..HEADER_LEN], &rest[HEADER_LEN..HEADER_LEN + len]) == expected
                    {
                        return true;
                    }
                }
            }
            from = i + 1;
        }
        false
    }

    /// Frames decoded so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }
    /// Bytes discarded so far (garbage, bad CRC, hostile length, bad version).
    pub fn skipped_bytes(&self) -> u64 {
        self.skipped_bytes
    }
    /// Number of [`FrameError::Skipped`] reports so far.
    pub fn skip_events(&self) -> u64 {
        self.skip_events
    }

    fn skip(&mut self, buf: &mut BytesMut, n: usize, reason: SkipReason) -> FrameError {
        buf.advance(n);
        self.skipped_bytes += n as u64;
        self.skip_events += 1;
        FrameError::Skipped { bytes: n, reason }
    }

    /// Discards the first byte of a (bad) frame start and everything up to the next
    /// magic candidate.
    fn resync(&mut self, buf: &mut BytesMut, reason: SkipReason) -> FrameError {
        let n = find_magic(buf, 1).unwrap_or(buf.len());
        self.skip(buf, n, reason)
    }

    /// Decodes the next frame from `buf` (see the module docs for the contract).
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if buf.is_empty() {
            return Ok(None);
        }
        // 1. Stand on a magic.
        match find_magic(buf, 0) {
            Some(0) => {}
            Some(n) => return Err(self.skip(buf, n, SkipReason::Garbage)),
            None => {
                let n = buf.len();
                return Err(self.skip(buf, n, SkipReason::Garbage));
            }
        }
        if buf.len() < HEADER_LEN {
            // Partial header (possibly only a magic prefix).
            return Ok(None);
        }
        // 2. Bound the length before reserving anything.
        let len = le_u32(&buf[12..16]);
        if len as usize > MAX_PAYLOAD {
            return Err(self.resync(buf, SkipReason::TooLong { len }));
        }
        let total = HEADER_LEN + len as usize + TRAILER_LEN;
        if buf.len() < total && self.eager_resync && Self::valid_frame_follows(buf) {
            // The length cannot be right: report it as an implausible length.
            return Err(self.resync(buf, SkipReason::TooLong { len }));
        }
        if buf.len() < total {
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        // 3. Check the CRC over header (after magic) and payload.
        let expected = le_u32(&buf[HEADER_LEN + len as usize..total]);
        let actual = crc_of(
            &buf[4..HEADER_LEN],
            &buf[HEADER_LEN..HEADER_LEN + len as usize],
        );
        if expected != actual {
            return Err(self.resync(buf, SkipReason::BadCrc { expected, actual }));
        }
        let version = buf[4];
        if version != FRAME_VERSION {
            return Err(self.skip(buf, total, SkipReason::UnsupportedVersion { version }));
        }
        let msg_type = buf[5];
        let flags = u16::from_le_bytes([buf[6], buf[7]]);
        let seq = le_u32(&buf[8..12]);
        let mut whole = buf.split_to(total);
        whole.advance(HEADER_LEN);
        whole.truncate(len as usize);
        self.frames += 1;
        self.recent_len = (len as usize).max(self.recent_len - self.recent_len / 16);
        Ok(Some(Frame {
            msg_type,
            flags,
            seq,
            payload: whole.freeze(),
            crc: expected,
        }))
    }

    /// Like [`FrameDecoder::decode`], for when the stream has ended: bytes that do
    /// not form a complete frame are discarded and reported as
    /// [`FrameError::TrailingBytes`].
    pub fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        match self.decode(buf)? {
            Some(f) => Ok(Some(f)),
            None if buf.is_empty() => Ok(None),
            None => {
                let bytes = buf.len();
                buf.clear();
                self.skipped_bytes += bytes as u64;
                Err(FrameError::TrailingBytes { bytes })
            }
        }
    }
}

/// tokio-util `Encoder`/`Decoder` adapter (feature `codec`).
///
/// The decoder's item is [`Incoming`](self::codec::Incoming): a frame, or a report of skipped bytes (the
/// stream continues). Only I/O errors and a truncated last frame end the stream.
#[cfg(feature = "codec")]
pub mod codec {
    use super::{Frame, FrameDecoder, FrameError, SkipReason};
    use bytes::BytesMut;

    /// What the codec yields.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Incoming {
        Frame(Frame),
        Skipped { bytes: usize, reason: SkipReason },
    }

    /// Errors that end a framed stream.
    #[derive(Debug, thiserror::Error)]
    pub enum CodecError {
        #[error("frame stream i/o failed: {0}")]
        Io(#[from] std::io::Error),
        #[error(transparent)]
        Frame(#[from] FrameError),
    }

    /// The frame codec: `Framed::new(io, FrameCodec::default())`.
    #[derive(Debug, Default)]
    pub struct FrameCodec {
        inner: FrameDecoder,
    }

    impl FrameCodec {
        pub fn new() -> FrameCodec {
            FrameCodec::default()
        }
        /// A codec around [`FrameDecoder::eager`] (for the host side of the flash port).
        pub fn eager() -> FrameCodec {
            FrameCodec {
                inner: FrameDecoder::eager(),
            }
        }
        /// The decoder's counters.
        pub fn decoder(&self) -> &FrameDecoder {
            &self.inner
        }
    }

    fn map(r: Result<Option<Frame>, FrameError>) -> Result<Option<Incoming>, CodecError> {
        match r {
            Ok(Some(f)) => Ok(Some(Incoming::Frame(f))),
            Ok(None) => Ok(None),
            Err(FrameError::Skipped { bytes, reason }) => {
                Ok(Some(Incoming::Skipped { bytes, reason }))
            }
            Err(e) => Err(CodecError::Frame(e)),
        }
    }

    impl tokio_util::codec::Decoder for FrameCodec {
        type Item = Incoming;
        type Error = CodecError;

        fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, CodecError> {
            map(self.inner.decode(src))
        }

        fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Incoming>, CodecError> {
            map(self.inner.decode_eof(src))
        }
    }

    impl tokio_util::codec::Encoder<Frame> for FrameCodec {
        type Error = CodecError;
        fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            item.encode(dst);
            Ok(())
        }
    }

    impl tokio_util::codec::Encoder<&Frame> for FrameCodec {
        type Error = CodecError;
        fn encode(&mut self, item: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
            item.encode(dst);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: &Frame) -> BytesMut {
        let mut b = BytesMut::new();
        f.encode(&mut b);
        b
    }

    #[test]
    fn layout_is_byte_exact() {
        let f = Frame::new(0x10, 0x0102, 0x0a0b0c0d, Bytes::from_static(b"xyz")).unwrap();
        let b = enc(&f);
        assert_eq!(&b[0..4], b"NXFR");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 0x10);
        assert_eq!(&b[6..8], &[0x02, 0x01]);
        assert_eq!(&b[8..12], &[0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(&b[12..16], &[3, 0, 0, 0]);
        assert_eq!(&b[16..19], b"xyz");
        let crc = crc32fast::hash(&b[4..19]);
        assert_eq!(&b[19..23], &crc.to_le_bytes());
        assert_eq!(b.len(), f.encoded_len());
    }

    #[test]
    fn too_large_payload_is_refused() {
        let big = Bytes::from(vec![0u8; MAX_PAYLOAD + 1]);
        assert_eq!(
            Frame::new(1, 0, 0, big),
            Err(FrameError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1
            })
        );
    }

    #[test]
    fn magic_prefix_at_end_waits() {
        let mut d = FrameDecoder::new();
        let mut b = BytesMut::from(&b"zzNX"[..]);
        assert_eq!(
            d.decode(&mut b),
            Err(FrameError::Skipped {
                bytes: 2,
                reason: SkipReason::Garbage
            })
        );
        assert_eq!(&b[..], b"NX");
        assert_eq!(d.decode(&mut b), Ok(None));
        assert_eq!(
            d.decode_eof(&mut b),
            Err(FrameError::TrailingBytes { bytes: 2 })
        );
    }

    #[test]
    fn both_crc_engines_agree() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for cut in [0usize, 1, 15, 16, 17, 4096, 99_999, 100_000] {
            let (a, b) = data.split_at(cut);
            let simd = crc32_with(CrcEngine::Simd, &[a, b]);
            assert_eq!(simd, crc32fast::hash(&data));
            assert_eq!(crc32_with(CrcEngine::Table, &[a, b]), simd, "cut {cut}");
        }
        // The check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32_with(CrcEngine::Table, &[b"123456789"]), 0xcbf4_3926);
    }
}
