//! The parser targets: each decodes untrusted bytes and, when they decode, checks that
//! encoding what was decoded and decoding it again gives the same value.

use bytes::{Bytes, BytesMut};
use proto::frame::{Frame, FrameDecoder, FrameError, MAX_FRAME_LEN, MAX_PAYLOAD};
use proto::image::ImageHead;
use proto::manifest::Manifest;
use proto::msg::Message;

/// The frame decoder over `data`, fed in pieces whose sizes come from the first byte.
pub fn frame(data: &[u8]) {
    let Some((&step, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(step).max(1);
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let check = |f: Frame| {
        assert!(f.payload().len() <= MAX_PAYLOAD, "payload beyond the bound");
        // A decoded frame re-encodes to a frame that decodes to itself.
        let mut again = BytesMut::from(&f.to_bytes()[..]);
        let mut d2 = FrameDecoder::new();
        match d2.decode(&mut again) {
            Ok(Some(g)) => assert_eq!(f, g, "re-encoded frame decodes differently"),
            other => panic!("re-encoded frame does not decode: {other:?}"),
        }
    };
    for piece in rest.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => check(f),
                Ok(None) => break,
                Err(e) => {
                    if !e.is_recoverable() {
                        return;
                    }
                }
            }
            // The decoder never holds more than one frame's worth of a partial frame.
            assert!(
                buf.len() <= MAX_FRAME_LEN + step,
                "decoder buffers {} bytes",
                buf.len()
            );
        }
    }
    loop {
        match dec.decode_eof(&mut buf) {
            Ok(Some(f)) => check(f),
            Ok(None) | Err(FrameError::TrailingBytes { .. }) => break,
            Err(e) if e.is_recoverable() => {}
            Err(_) => break,
        }
    }
}

/// Message decoding: first byte the type, then the seq's low byte, the rest the payload.
pub fn msg(data: &[u8]) {
    let [ty, seq, payload @ ..] = data else {
        return;
    };
    let Ok(frame) = Frame::new(*ty, 0, u32::from(*seq), Bytes::copy_from_slice(payload)) else {
        return;
    };
    let Ok(m) = Message::from_frame(&frame) else {
        return;
    };
    let f2 = m
        .to_frame()
        .unwrap_or_else(|e| panic!("decoded {m:?} but cannot encode it: {e}"));
    let m2 = Message::from_frame(&f2)
        .unwrap_or_else(|e| panic!("re-encoded {m:?} does not decode: {e}"));
    assert_eq!(m, m2, "message changes through encode/decode");
}

/// The image head (header + manifest + signature) and the manifest alone.
pub fn image(data: &[u8]) {
    if let Ok(h) = ImageHead::parse(data) {
        let again = ImageHead::parse(&h.to_bytes())
            .unwrap_or_else(|e| panic!("re-encoded head does not parse: {e}"));
        assert_eq!(h, again, "head changes through encode/parse");
    }
    if let Ok(m) = Manifest::from_bytes(data) {
        let canon = m.to_canonical_bytes();
        let again = Manifest::from_bytes(&canon)
            .unwrap_or_else(|e| panic!("canonical manifest does not parse: {e}"));
        assert_eq!(m, again, "manifest changes through canonical form");
    }
}

/// bootctld's snapshot decoder.
pub fn snapshot(data: &[u8]) {
    if let Ok(s) = bootctld::snapshot::decode(data) {
        let enc = bootctld::snapshot::encode(&s);
        let again = bootctld::snapshot::decode(&enc)
            .unwrap_or_else(|e| panic!("re-encoded snapshot does not decode: {e}"));
        assert_eq!(s, again, "snapshot changes through encode/decode");
    }
}
