//! Cap'n Proto RPC over a link without connection boundaries (sans-IO).
//!
//! A virtio-serial port is one byte stream for the guest: when `nx` closes its
//! socket and the next `nx` connects, the guest may never see the EOF between
//! them (both control events can be handled before the daemon reads again),
//! and bytes of the old connection (a half-written message, a late reply) can
//! still be in flight. Raw two-party RPC would then mix two conversations.
//!
//! So on such links every RPC byte travels in a [`crate::frame`] frame:
//!
//! ```text
//! frame.msg_type = RPC_DATA (0x52, 'R')     frame.flags = 0
//! frame.seq      = chunk counter of this session and direction, from 0
//! frame.payload  = session: u32 LE  ++  chunk (1..=MAX_CHUNK bytes of the capnp stream)
//! ```
//!
//! * The client (host) picks a random `session` per connection.
//! * The server (guest) runs one RPC session per `session` value: a chunk with a
//!   new value ends the old session and starts a new one. Replies carry the
//!   session of the conversation they belong to.
//! * The client ignores frames of other sessions (stale replies).
//! * A gap in `seq` means lost bytes: the server ends that session.
//! * Garbage and cut frames are skipped by the frame decoder (magic + CRC).
//!
//! Recovering a lost opening (a stale EOF on the port can swallow the first bytes of a new
//! host connection):
//!
//! * The server answers a session it cannot serve with a reset frame:
//!
//!   ```text
//!   frame.msg_type = RPC_RESET (0x58, 'X')   frame.flags = 0   frame.seq = 0
//!   frame.payload  = session: u32 LE  ++  reason: u8 (see [`ResetReason`])
//!   ```
//!
//!   [`ResetReason::NotStarted`]: a chunk with `seq != 0` of a session whose chunk 0 the
//!   server never saw — nothing of it reached an RPC system, so the client may send it again.
//!   [`ResetReason::Lost`]: the session had started and lost bytes (or was cut by an EOF):
//!   it is over, and what it asked may or may not have been done — never resent.
//! * Until the client has its first frame of the session back, it retransmits every chunk
//!   it sent (same session, same `seq`) on a `NotStarted` reset and after
//!   [`RETRANSMIT_FIRST`] (doubling) without an answer. The server drops chunks with a `seq`
//!   it already has, so every byte reaches the RPC system once: a request is never executed
//!   twice.
//!
//! A server can tell a framed connection from a raw capnp one by its first four
//! bytes: [`crate::frame::MAGIC`] (as a capnp segment count it would be absurd).

use crate::frame::{Frame, FrameDecoder, FrameError, HEADER_LEN, MAGIC};
use bytes::{Buf, Bytes, BytesMut};

/// `msg_type` of RPC data frames.
pub const RPC_DATA: u8 = 0x52;
/// `msg_type` of the server's reset of a session it cannot serve.
pub const RPC_RESET: u8 = 0x58;
/// How long a client waits for its first answer before retransmitting its opening (the
/// wait doubles after each retransmission).
pub const RETRANSMIT_FIRST: std::time::Duration = std::time::Duration::from_millis(1000);
/// Largest chunk of RPC stream bytes in one frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Bytes of the session id in front of each chunk.
pub const SESSION_LEN: usize = 4;
/// Largest frame payload accepted on an RPC link.
pub const MAX_LINK_PAYLOAD: usize = SESSION_LEN + MAX_CHUNK;

/// Errors building a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// A chunk over [`MAX_CHUNK`] (split it) or an empty one.
    #[error("rpc chunk of {0} bytes; chunks are 1..={MAX_CHUNK} bytes")]
    BadChunk(usize),
}

/// Append the frame carrying `chunk` of `session` (counter `seq`) to `out`.
pub fn encode(session: u32, seq: u32, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), LinkError> {
    if chunk.is_empty() || chunk.len() > MAX_CHUNK {
        return Err(LinkError::BadChunk(chunk.len()));
    }
    let mut payload = Vec::with_capacity(SESSION_LEN + chunk.len());
    payload.extend_from_slice(&session.to_le_bytes());
    payload.extend_from_slice(chunk);
    let frame = Frame::new(RPC_DATA, 0, seq, Bytes::from(payload))
        .map_err(|_| LinkError::BadChunk(chunk.len()))?;
    frame.encode_to_vec(out);
    Ok(())
}

/// Why the server reset a session (the byte after the session id of an [`RPC_RESET`] frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// The server never saw chunk 0 of the session; none of it was served: resend.
    NotStarted,
    /// The session started and lost bytes; it is over (its requests may have run).
    Lost,
    /// A reason this build does not know (treated like [`ResetReason::Lost`]).
    Unknown(u8),
}

impl ResetReason {
    /// The wire byte.
    pub fn to_u8(self) -> u8 {
        match self {
            ResetReason::NotStarted => 0,
            ResetReason::Lost => 1,
            ResetReason::Unknown(b) => b,
        }
    }

    /// From the wire byte.
    pub fn from_u8(b: u8) -> Self {
        match b {
            0 => ResetReason::NotStarted,
            1 => ResetReason::Lost,
            b => ResetReason::Unknown(b),
        }
    }
}

/// Append the reset frame of `session` to `out`.
pub fn encode_reset(session: u32, reason: ResetReason, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(SESSION_LEN + 1);
    payload.extend_from_slice(&session.to_le_bytes());
    payload.push(reason.to_u8());
    // Five payload bytes always fit a frame.
    if let Ok(frame) = Frame::new(RPC_RESET, 0, 0, Bytes::from(payload)) {
        frame.encode_to_vec(out);
    }
}

/// Whether a connection's first bytes are a framed RPC link.
pub fn is_framed(first: &[u8]) -> bool {
    first.len() >= MAGIC.len() && first[..MAGIC.len()] == MAGIC
}

/// One chunk of one session's RPC stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// The session it belongs to.
    pub session: u32,
    /// Its counter in that session.
    pub seq: u32,
    /// The stream bytes.
    pub data: Bytes,
}

/// What the decoder found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A chunk.
    Chunk(Chunk),
    /// The server reset a session (see [`RPC_RESET`]).
    Reset {
        /// The session.
        session: u32,
        /// Why.
        reason: ResetReason,
    },
    /// A client asked who this is ([`crate::ident`]): the server answers with its reply.
    Probe,
    /// Bytes that were not a valid RPC frame were discarded (the stream goes on).
    Skipped {
        /// How many.
        bytes: usize,
        /// Why.
        reason: String,
    },
}

/// Streaming decoder of an RPC link: push bytes, pull [`Event`]s.
#[derive(Debug, Default)]
pub struct LinkDecoder {
    frames: FrameDecoder,
    buf: BytesMut,
}

impl LinkDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append bytes read from the link.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next event, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<Event> {
        // A (possibly false) magic declaring more than an RPC frame can hold:
        // do not wait for megabytes that will never come, skip it.
        if self.buf.len() >= HEADER_LEN && self.buf[..MAGIC.len()] == MAGIC {
            let len = u32::from_le_bytes([self.buf[12], self.buf[13], self.buf[14], self.buf[15]]);
            if len as usize > MAX_LINK_PAYLOAD {
                self.buf.advance(1);
                return Some(Event::Skipped {
                    bytes: 1,
                    reason: format!(
                        "frame declares {len} payload bytes, more than an rpc frame holds"
                    ),
                });
            }
        }
        match self.frames.decode(&mut self.buf) {
            Ok(None) => None,
            Ok(Some(frame)) => {
                let p = frame.payload();
                if frame.msg_type() == RPC_RESET && p.len() == SESSION_LEN + 1 {
                    return Some(Event::Reset {
                        session: u32::from_le_bytes([p[0], p[1], p[2], p[3]]),
                        reason: ResetReason::from_u8(p[SESSION_LEN]),
                    });
                }
                if crate::ident::is_probe(&frame) {
                    return Some(Event::Probe);
                }
                if frame.msg_type() != RPC_DATA || p.len() <= SESSION_LEN {
                    return Some(Event::Skipped {
                        bytes: frame.encoded_len(),
                        reason: format!(
                            "not an rpc data frame (type {:#04x}, {} payload bytes)",
                            frame.msg_type(),
                            p.len()
                        ),
                    });
                }
                let session = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                Some(Event::Chunk(Chunk {
                    session,
                    seq: frame.seq(),
                    data: p.slice(SESSION_LEN..),
                }))
            }
            Err(FrameError::Skipped { bytes, reason }) => Some(Event::Skipped {
                bytes,
                reason: reason.to_string(),
            }),
            Err(e) => {
                // Not produced by `decode`; drop what we have and go on.
                let bytes = self.buf.len();
                self.buf.clear();
                Some(Event::Skipped {
                    bytes,
                    reason: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_garbage_and_split_reads() {
        let mut wire = b"junk from an old connection".to_vec();
        encode(7, 0, b"hello", &mut wire).unwrap();
        encode(9, 0, b"world", &mut wire).unwrap();
        let mut dec = LinkDecoder::new();
        let mut events = Vec::new();
        for b in wire.chunks(3) {
            dec.push(b);
            while let Some(e) = dec.next_event() {
                events.push(e);
            }
        }
        let chunks: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Chunk(c) => Some((c.session, c.seq, c.data.to_vec())),
                Event::Skipped { .. } | Event::Reset { .. } | Event::Probe => None,
            })
            .collect();
        assert_eq!(
            chunks,
            vec![(7, 0, b"hello".to_vec()), (9, 0, b"world".to_vec())]
        );
        assert!(events.iter().any(|e| matches!(e, Event::Skipped { .. })));
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn a_probe_between_chunks_is_reported() {
        let mut wire = Vec::new();
        encode(7, 0, b"a", &mut wire).unwrap();
        wire.extend_from_slice(&crate::ident::probe());
        encode(7, 1, b"b", &mut wire).unwrap();
        let mut dec = LinkDecoder::new();
        dec.push(&wire);
        assert!(matches!(dec.next_event(), Some(Event::Chunk(_))));
        assert_eq!(dec.next_event(), Some(Event::Probe));
        assert!(matches!(dec.next_event(), Some(Event::Chunk(c)) if c.seq == 1));
    }

    #[test]
    fn reset_roundtrip() {
        let mut wire = Vec::new();
        encode_reset(0xdead_beef, ResetReason::NotStarted, &mut wire);
        encode_reset(5, ResetReason::Lost, &mut wire);
        let mut dec = LinkDecoder::new();
        dec.push(&wire);
        assert_eq!(
            dec.next_event(),
            Some(Event::Reset {
                session: 0xdead_beef,
                reason: ResetReason::NotStarted
            })
        );
        assert_eq!(
            dec.next_event(),
            Some(Event::Reset {
                session: 5,
                reason: ResetReason::Lost
            })
        );
        assert_eq!(dec.next_event(), None);
        assert_eq!(ResetReason::from_u8(7), ResetReason::Unknown(7));
    }

    #[test]
    fn bounds_and_detection() {
        let mut out = Vec::new();
        assert!(encode(1, 0, &[], &mut out).is_err());
        assert!(encode(1, 0, &vec![0; MAX_CHUNK + 1], &mut out).is_err());
        encode(1, 0, &vec![1; MAX_CHUNK], &mut out).unwrap();
        assert!(is_framed(&out));
        assert!(!is_framed(&[0, 0, 0, 0]));
        // A false magic with a huge length is skipped, not waited for.
        let mut dec = LinkDecoder::new();
        let mut evil = MAGIC.to_vec();
        evil.extend_from_slice(&[1, RPC_DATA, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x00]);
        dec.push(&evil);
        dec.push(&out);
        let mut got = None;
        while let Some(e) = dec.next_event() {
            if let Event::Chunk(c) = e {
                got = Some(c.data.len());
            }
        }
        assert_eq!(got, Some(MAX_CHUNK));
    }
}
