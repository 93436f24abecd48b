#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Frame codec: round trips, streaming at every split point, and every kind of bad input.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use proto::frame::{
    Frame, FrameDecoder, FrameError, SkipReason, HEADER_LEN, MAGIC, MAX_FRAME_LEN, MAX_PAYLOAD,
    TRAILER_LEN,
};

fn frame(t: u8, flags: u16, seq: u32, payload: &[u8]) -> Frame {
    Frame::new(t, flags, seq, Bytes::copy_from_slice(payload)).unwrap()
}

fn encode_all(frames: &[Frame]) -> Vec<u8> {
    let mut v = Vec::new();
    for f in frames {
        f.encode_to_vec(&mut v);
    }
    v
}

/// Decodes everything, collecting frames and skip reports.
fn decode_all(dec: &mut FrameDecoder, buf: &mut BytesMut) -> (Vec<Frame>, Vec<FrameError>) {
    let mut frames = Vec::new();
    let mut errs = Vec::new();
    loop {
        match dec.decode(buf) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(e) => {
                assert!(e.is_recoverable(), "{e}");
                errs.push(e);
            }
        }
    }
    (frames, errs)
}

fn sample_frames() -> Vec<Frame> {
    vec![
        frame(0x01, 0, 0, b""),
        frame(0x10, 2, 1, &[0xAB; 300]),
        frame(0x11, 0, 0, &7u32.to_le_bytes()),
        // a payload that contains the magic itself must not confuse the decoder
        frame(0x10, 0, 2, &[&MAGIC[..], b"inner", &MAGIC[..2]].concat()),
        frame(0x3f, 0, 0, b"text"),
    ]
}

#[test]
fn stream_split_at_every_byte_boundary() {
    let frames = sample_frames();
    let wire = encode_all(&frames);
    for split in 0..=wire.len() {
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&wire[..split]);
        let (mut got, errs) = decode_all(&mut dec, &mut buf);
        assert!(errs.is_empty(), "split {split}: {errs:?}");
        buf.extend_from_slice(&wire[split..]);
        let (rest, errs) = decode_all(&mut dec, &mut buf);
        assert!(errs.is_empty(), "split {split}: {errs:?}");
        got.extend(rest);
        assert_eq!(got, frames, "split at {split}");
        assert_eq!(dec.decode_eof(&mut buf), Ok(None));
    }
}

#[test]
fn stream_fed_one_byte_at_a_time() {
    let frames = sample_frames();
    let wire = encode_all(&frames);
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for b in &wire {
        buf.extend_from_slice(&[*b]);
        let (f, errs) = decode_all(&mut dec, &mut buf);
        assert!(errs.is_empty());
        got.extend(f);
    }
    assert_eq!(got, frames);
    assert_eq!(dec.frames(), frames.len() as u64);
    assert_eq!(dec.skipped_bytes(), 0);
}

#[test]
fn bad_crc_is_reported_and_the_next_frame_decodes() {
    let a = frame(0x10, 0, 1, b"first payload");
    let b = frame(0x10, 0, 2, b"second payload");
    let mut wire = encode_all(&[a.clone(), b.clone()]);
    wire[HEADER_LEN + 3] ^= 0x40; // flip a payload bit of the first frame
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(&wire[..]);
    let (frames, errs) = decode_all(&mut dec, &mut buf);
    assert_eq!(frames, vec![b]);
    assert_eq!(errs.len(), 1);
    match &errs[0] {
        FrameError::Skipped {
            bytes,
            reason: SkipReason::BadCrc { .. },
        } => assert_eq!(*bytes, a.encoded_len()),
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(dec.skipped_bytes(), a.encoded_len() as u64);
}

#[test]
fn bad_crc_in_header_field_is_caught() {
    let a = frame(0x11, 0, 0, &5u32.to_le_bytes());
    for byte in 4..HEADER_LEN {
        if (12..16).contains(&byte) {
            continue; // the length field: covered by the hostile-length tests
        }
        let mut wire = encode_all(std::slice::from_ref(&a));
        wire[byte] ^= 0x01;
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::from(&wire[..]);
        let (frames, errs) = decode_all(&mut dec, &mut buf);
        assert!(frames.is_empty(), "byte {byte}");
        assert!(
            matches!(
                errs.first(),
                Some(FrameError::Skipped {
                    reason: SkipReason::BadCrc { .. },
                    ..
                })
            ),
            "byte {byte}: {errs:?}"
        );
    }
}

#[test]
fn wrong_magic_is_skipped_as_garbage() {
    let good = frame(0x03, 0, 0, b"");
    let mut wire = encode_all(&[good.clone(), good.clone()]);
    wire[0] = b'X'; // first frame loses its magic
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(&wire[..]);
    let (frames, errs) = decode_all(&mut dec, &mut buf);
    assert_eq!(frames, vec![good.clone()]);
    assert_eq!(
        errs,
        vec![FrameError::Skipped {
            bytes: good.encoded_len(),
            reason: SkipReason::Garbage
        }]
    );
}

#[test]
fn garbage_before_a_frame() {
    let good = frame(0x11, 0, 0, &[1, 2, 3, 4]);
    let mut wire = b"login: root\r\n\x00\xffNX".to_vec();
    let garbage = wire.len();
    good.encode_to_vec(&mut wire);
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(&wire[..]);
    let (frames, errs) = decode_all(&mut dec, &mut buf);
    assert_eq!(frames, vec![good]);
    assert_eq!(
        errs,
        vec![FrameError::Skipped {
            bytes: garbage,
            reason: SkipReason::Garbage
        }]
    );
}

#[test]
fn hostile_length_never_reserves_past_the_bound() {
    for len in [MAX_PAYLOAD as u32 + 1, u32::MAX, 0x8000_0000] {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&MAGIC);
        hdr.extend_from_slice(&[1, 0x10, 0, 0]);
        hdr.extend_from_slice(&1u32.to_le_bytes());
        hdr.extend_from_slice(&len.to_le_bytes());
        let good = frame(0x11, 0, 0, &[9, 9, 9, 9]);
        good.encode_to_vec(&mut hdr);
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::with_capacity(64);
        buf.extend_from_slice(&hdr);
        let cap0 = buf.capacity();
        let r = dec.decode(&mut buf);
        assert_eq!(
            r,
            Err(FrameError::Skipped {
                bytes: HEADER_LEN,
                reason: SkipReason::TooLong { len }
            })
        );
        assert!(
            buf.capacity() <= cap0,
            "decoder reserved memory for a hostile length"
        );
        assert_eq!(dec.decode(&mut buf), Ok(Some(good)));
    }
}

#[test]
fn largest_legal_length_reserves_at_most_one_frame() {
    // A header announcing MAX_PAYLOAD: the decoder waits, reserving at most one frame.
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&MAGIC);
    hdr.extend_from_slice(&[1, 0x10, 0, 0]);
    hdr.extend_from_slice(&1u32.to_le_bytes());
    hdr.extend_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&hdr);
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert!(buf.capacity() >= MAX_FRAME_LEN);
    assert!(
        buf.capacity() <= 2 * MAX_FRAME_LEN,
        "capacity {}",
        buf.capacity()
    );
    assert_eq!(
        dec.decode_eof(&mut buf),
        Err(FrameError::TrailingBytes { bytes: HEADER_LEN })
    );
}

#[test]
fn leftover_bytes_at_eof_are_an_error() {
    let good = frame(0x11, 0, 0, &[1, 2, 3, 4]);
    let wire = encode_all(&[good.clone(), good.clone()]);
    let cut = wire.len() - 3;
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(&wire[..cut]);
    assert_eq!(dec.decode_eof(&mut buf), Ok(Some(good)));
    assert_eq!(
        dec.decode_eof(&mut buf),
        Err(FrameError::TrailingBytes {
            bytes: good_len(&wire) - 3
        })
    );
    assert!(buf.is_empty());
    assert_eq!(dec.decode_eof(&mut buf), Ok(None));

    fn good_len(w: &[u8]) -> usize {
        w.len() / 2
    }
}

#[test]
fn unsupported_version_with_valid_crc_is_skipped_whole() {
    let good = frame(0x11, 0, 0, &[1, 2, 3, 4]);
    let mut wire = encode_all(std::slice::from_ref(&good));
    wire[4] = 2;
    let crc = crc32fast::hash(&wire[4..wire.len() - TRAILER_LEN]);
    let n = wire.len();
    wire[n - 4..].copy_from_slice(&crc.to_le_bytes());
    good.encode_to_vec(&mut wire);
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::from(&wire[..]);
    let (frames, errs) = decode_all(&mut dec, &mut buf);
    assert_eq!(frames, vec![good.clone()]);
    assert_eq!(
        errs,
        vec![FrameError::Skipped {
            bytes: good.encoded_len(),
            reason: SkipReason::UnsupportedVersion { version: 2 }
        }]
    );
}

#[test]
fn encode_paths_agree() {
    let f = frame(0x10, 3, 99, &[7u8; 1 << 20]);
    let mut a = BytesMut::new();
    f.encode(&mut a);
    let mut b = Vec::new();
    f.encode_to_vec(&mut b);
    let c = f.to_bytes();
    let d = [&f.header()[..], &f.payload()[..], &f.trailer()[..]].concat();
    assert_eq!(&a[..], &b[..]);
    assert_eq!(&a[..], &c[..]);
    assert_eq!(&a[..], &d[..]);
    assert_eq!(a.len(), f.encoded_len());
}

#[test]
fn decoded_payload_is_a_zero_copy_slice() {
    let f = frame(0x10, 0, 1, &[5u8; 4096]);
    let mut buf = BytesMut::new();
    f.encode(&mut buf);
    let base = buf.as_ptr() as usize;
    let got = FrameDecoder::new().decode(&mut buf).unwrap().unwrap();
    assert_eq!(got.payload().as_ptr() as usize, base + HEADER_LEN);
}

#[cfg(feature = "codec")]
#[test]
fn tokio_util_codec_reports_skips_as_items() {
    use proto::frame::codec::{CodecError, FrameCodec, Incoming};
    use tokio_util::codec::{Decoder, Encoder};

    let good = frame(0x11, 0, 0, &[1, 2, 3, 4]);
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::from(&b"junk"[..]);
    codec.encode(good.clone(), &mut buf).unwrap();
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(Incoming::Skipped {
            bytes: 4,
            reason: SkipReason::Garbage
        })
    );
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(Incoming::Frame(good.clone()))
    );
    codec.encode(&good, &mut buf).unwrap();
    buf.truncate(buf.len() - 1);
    assert!(matches!(
        codec.decode_eof(&mut buf),
        Err(CodecError::Frame(FrameError::TrailingBytes { .. }))
    ));
}

proptest! {
    #[test]
    fn frames_round_trip(
        t in any::<u8>(),
        flags in any::<u16>(),
        seq in any::<u32>(),
        payload in proptest::collection::vec(any::<u8>(), 0..2048),
    ) {
        let f = frame(t, flags, seq, &payload);
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        prop_assert_eq!(buf.len(), HEADER_LEN + payload.len() + TRAILER_LEN);
        let mut dec = FrameDecoder::new();
        let got = dec.decode(&mut buf).unwrap();
        prop_assert_eq!(got, Some(f));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn random_junk_never_panics_and_never_hides_a_following_frame(
        junk in proptest::collection::vec(any::<u8>(), 0..512),
        payload in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let good = frame(0x10, 0, 42, &payload);
        let mut wire = junk.clone();
        good.encode_to_vec(&mut wire);
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::from(&wire[..]);
        let mut got = Vec::new();
        let mut steps = 0;
        loop {
            steps += 1;
            prop_assert!(steps < 10_000);
            match dec.decode_eof(&mut buf) {
                Ok(Some(f)) => got.push(f),
                Ok(None) => break,
                Err(e) => {
                    let ok = matches!(e, FrameError::Skipped { .. } | FrameError::TrailingBytes { .. });
                    prop_assert!(ok, "unexpected error {:?}", e);
                }
            }
        }
        // Junk may by chance contain a frame-looking prefix that swallows the good frame
        // as its "payload" (then a CRC failure resyncs inside it), so the good frame is
        // found unless the junk declared a length reaching past the end of the stream.
        prop_assert!(got.len() <= 1 + junk.len() / 20);
        if !junk.windows(2).any(|w| w == &MAGIC[..2]) && !junk.ends_with(&MAGIC[..1]) {
            prop_assert_eq!(got.last(), Some(&good));
        }
    }
}

/// A flipped bit in a frame's length field makes it swallow the frames behind it; once the
/// link is quiet, `recover_short_frame` finds where it really ends (its CRC holds with that
/// length) and the frames behind it decode again. A frame that is merely incomplete, or
/// one carrying an encoded frame in its payload, is left alone.
#[test]
fn a_corrupted_length_is_found_by_the_next_magic_and_the_following_frames_survive() {
    let payload: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
    let first = frame(0x21, 0, 5, &payload);
    let second = frame(0x21, 0, 6, &payload[..300]);
    let third = frame(0x21, 0, 7, &payload[..10]);
    for bit in [10u32, 14, 20] {
        let mut wire = encode_all(&[first.clone(), second.clone(), third.clone()]);
        wire[12 + (bit / 8) as usize] ^= 1 << (bit % 8);
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&wire);
        // The first frame now waits for bytes that never come.
        let (frames, errs) = decode_all(&mut dec, &mut buf);
        assert!(frames.is_empty() && errs.is_empty(), "bit {bit}");
        let got = dec.recover_short_frame(&mut buf);
        assert_eq!(
            got,
            Some(FrameError::Skipped {
                bytes: HEADER_LEN + payload.len() + TRAILER_LEN,
                reason: SkipReason::CorruptLength {
                    declared: 1000 ^ (1 << bit),
                    actual: 1000
                }
            }),
            "bit {bit}"
        );
        let (frames, errs) = decode_all(&mut dec, &mut buf);
        assert_eq!(frames, vec![second.clone(), third.clone()], "bit {bit}");
        assert!(errs.is_empty());
        assert_eq!(dec.recover_short_frame(&mut buf), None, "nothing left");
    }

    // An honest partial frame: searched, nothing found, nothing dropped; asked again after
    // more bytes arrived, it still holds (the search resumes), and it decodes once whole.
    let mut wire = encode_all(std::slice::from_ref(&first));
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&wire[..500]);
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert_eq!(dec.recover_short_frame(&mut buf), None);
    buf.extend_from_slice(&wire[500..900]);
    assert_eq!(dec.recover_short_frame(&mut buf), None);
    assert_eq!(buf.len(), 900);
    buf.extend_from_slice(&wire[900..]);
    assert_eq!(dec.decode(&mut buf), Ok(Some(first.clone())));

    // A payload that carries a whole encoded frame (an image may hold a capture of this
    // protocol): the inner frame is valid on its own, but the outer frame's CRC does not
    // hold with the length it would imply, so the outer frame keeps waiting.
    let inner = encode_all(std::slice::from_ref(&second));
    let mut outer_payload = payload.clone();
    outer_payload.extend_from_slice(&inner);
    outer_payload.extend_from_slice(&payload);
    let outer = frame(0x21, 0, 9, &outer_payload);
    wire.clear();
    outer.encode_to_vec(&mut wire);
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&wire[..HEADER_LEN + payload.len() + inner.len() + 10]);
    assert_eq!(dec.decode(&mut buf), Ok(None));
    assert_eq!(dec.recover_short_frame(&mut buf), None);
    buf.extend_from_slice(&wire[HEADER_LEN + payload.len() + inner.len() + 10..]);
    assert_eq!(dec.decode(&mut buf), Ok(Some(outer)));

    // After frames at least as long as the one waiting, it is not searched: a sender's
    // frames are alike, so it may simply be slow.
    let big = frame(0x21, 0, 10, &vec![7u8; 5000]);
    let mut wire = encode_all(&[big.clone(), first.clone(), second.clone()]);
    let at = HEADER_LEN + 5000 + TRAILER_LEN + 13;
    wire[at] ^= 1 << 2; // 1000 -> 2024 payload bytes, less than the 5000 just seen
    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&wire);
    let (frames, _) = decode_all(&mut dec, &mut buf);
    assert_eq!(frames, vec![big]);
    assert_eq!(dec.recover_short_frame(&mut buf), None);
}
