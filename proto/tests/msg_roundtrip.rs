#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Messages: proptest round trips through frames and bytes, and validation of hostile fields.

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use proto::frame::{Frame, FrameDecoder};
use proto::msg::*;

fn seg_name() -> impl Strategy<Value = String> {
    "[a-z0-9_-]{1,32}"
}
fn peer_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,64}"
}
fn text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[ -~é€]{{0,{}}}", max / 3)).unwrap()
}
fn bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 1..max).prop_map(Bytes::from)
}
fn chunk_size() -> impl Strategy<Value = u32> {
    (12u32..=20).prop_map(|s| 1 << s)
}
fn code() -> impl Strategy<Value = ErrorCode> {
    (1u16..=20).prop_map(ErrorCode::from_code)
}

fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u64>(),
            1u16..=MAX_WINDOW,
            chunk_size(),
            0u8..=1,
            any::<bool>(),
            peer_name(),
            bytes(9000),
            any::<u8>()
        )
            .prop_map(
                |(nonce, window, chunk_size, compression, skip, host, head, proto)| {
                    Message::Hello(Hello {
                        allow_downgrade: false,
                        exact_chunk: !skip,
                        proto,
                        nonce,
                        window,
                        chunk_size,
                        compression,
                        skip,
                        host,
                        head,
                    })
                }
            ),
        (
            any::<u64>(),
            peer_name(),
            text(MAX_INFO_LEN),
            1u16..=MAX_WINDOW,
            chunk_size(),
            0u8..=1,
            any::<(bool, bool)>(),
            any::<(u32, u64)>(),
            (
                proptest::collection::vec(
                    (any::<u64>(), 1u32..=MAX_CHUNK, any::<[u8; 16]>()),
                    0..50
                ),
                proptest::option::of(any::<([u8; 32], u64)>())
            )
        )
            .prop_map(
                |(
                    nonce,
                    device,
                    info,
                    window,
                    chunk_size,
                    compression,
                    (ai, res),
                    (rs, ver),
                    (idx, base),
                )| {
                    Message::HelloReply(HelloReply {
                        unprovisioned: false,
                        proto: PROTO_VERSION,
                        nonce,
                        device,
                        info,
                        window,
                        chunk_size,
                        compression,
                        already_installed: ai,
                        resumed: res,
                        resume_seq: rs,
                        verified: ver,
                        index: idx
                            .into_iter()
                            .map(|(offset, len, hash)| IndexEntry { offset, len, hash })
                            .collect(),
                        base: base.map(|(image_id, total_size)| BaseImage {
                            image_id,
                            total_size,
                        }),
                    })
                }
            ),
        Just(Message::Info),
        (
            peer_name(),
            text(MAX_INFO_LEN),
            1u16..=MAX_WINDOW,
            chunk_size(),
            proptest::option::of((
                any::<[u8; 32]>(),
                any::<[u8; 32]>(),
                any::<u64>(),
                "[0-9.]{1,64}"
            )),
            proptest::option::of((any::<[u8; 32]>(), chunk_size(), any::<(u32, u32, u64)>())),
            proptest::option::of(any::<([u8; 32], u64)>())
        )
            .prop_map(|(device, info, max_window, max_chunk, inst, xfer, base)| {
                Message::InfoReply(InfoReply {
                    proto: PROTO_VERSION,
                    device,
                    info,
                    max_window,
                    max_chunk,
                    compression: COMPRESS_ZSTD,
                    installed: inst.map(|(image_id, image_sha256, total_size, version)| {
                        InstalledInfo {
                            image_id,
                            image_sha256,
                            total_size,
                            version,
                        }
                    }),
                    transfer: xfer.map(
                        |(image_id, chunk_size, (next_seq, plan_chunks, verified))| TransferInfo {
                            image_id,
                            chunk_size,
                            next_seq,
                            plan_chunks,
                            verified,
                        },
                    ),
                    base: base.map(|(image_id, total_size)| BaseImage {
                        image_id,
                        total_size,
                    }),
                })
            }),
        (
            1u32..,
            seg_name(),
            any::<u64>(),
            bytes(4096),
            0u8..5,
            any::<(u64, [u8; 16])>(),
            (any::<bool>(), 0u64..u64::MAX / 2, 1u32..=MAX_PATCH_REF)
        )
            .prop_map(
                |(
                    seq,
                    segment,
                    offset,
                    data,
                    kind,
                    (src_offset, hash),
                    (base, ref_offset, ref_len),
                )| {
                    let len = data.len() as u32;
                    let body = match kind {
                        0 => WriteBody::Raw(data),
                        1 => WriteBody::Zero,
                        2 => WriteBody::Zstd(data.slice(..data.len().div_ceil(2))),
                        3 => WriteBody::Patch {
                            source: if base {
                                PatchSource::Base
                            } else {
                                PatchSource::Staging
                            },
                            ref_offset,
                            ref_len,
                            frame: data.slice(..data.len().div_ceil(3)),
                        },
                        _ => WriteBody::Copy { src_offset, hash },
                    };
                    Message::Write(Write {
                        seq,
                        segment,
                        offset,
                        len,
                        body,
                    })
                }
            ),
        any::<u32>().prop_map(|ack| Message::Ack(Ack { ack })),
        (any::<u32>(), 1u8..=2).prop_map(|(seq, r)| Message::Nak(Nak {
            seq,
            reason: NakReason::from_code(r)
        })),
        seg_name().prop_map(|segment| Message::Verified(Verified { segment })),
        any::<[u8; 32]>().prop_map(|image_sha256| Message::Done(Done { image_sha256 })),
        (0u8..3, any::<[u8; 32]>()).prop_map(|(s, image_sha256)| Message::DoneReply(DoneReply {
            status: match s {
                0 => DoneStatus::Installed,
                1 => DoneStatus::Pending,
                _ => DoneStatus::Unchanged,
            },
            image_sha256
        })),
        (code(), text(MAX_TEXT_LEN))
            .prop_map(|(code, reason)| Message::Abort(Abort { code, reason })),
        (code(), text(MAX_TEXT_LEN))
            .prop_map(|(code, text)| Message::Error(ErrorMsg { code, text })),
    ]
}

proptest! {
    #[test]
    fn messages_round_trip_through_frames_and_bytes(m in arb_message()) {
        let f = m.to_frame().unwrap();
        prop_assert_eq!(f.msg_type(), m.msg_type() as u8);
        let mut wire = BytesMut::new();
        f.encode(&mut wire);
        let f2 = FrameDecoder::new().decode(&mut wire).unwrap().unwrap();
        prop_assert_eq!(&f2, &f);
        prop_assert_eq!(Message::from_frame(&f2).unwrap(), m);
    }

    #[test]
    fn truncated_payloads_are_rejected_not_panicking(m in arb_message(), cut in any::<prop::sample::Index>()) {
        let f = m.to_frame().unwrap();
        let p = f.payload();
        if !p.is_empty() {
            let n = cut.index(p.len());
            let g = Frame::new(f.msg_type(), f.flags(), f.seq(), p.slice(..n)).unwrap();
            // Most cuts are errors; a cut inside a raw/zstd body may still be a valid
            // (different) message — never a panic, and never the same message.
            // The one exception: INFO_REPLY's trailing `has_base = 0` byte may be absent (replies
            // of older targets), so cutting exactly that byte leaves the same message.
            let old_info = matches!(&m, Message::InfoReply(r) if r.base.is_none()) && n + 1 == p.len();
            if let Ok(m2) = Message::from_frame(&g) {
                if !old_info {
                    prop_assert_ne!(m2, m);
                }
            }
        }
    }

    #[test]
    fn random_payloads_never_panic(t in any::<u8>(), flags in 0u16..5, seq in 0u32..3,
                                   p in proptest::collection::vec(any::<u8>(), 0..300)) {
        let f = Frame::new(t, flags, seq, Bytes::from(p)).unwrap();
        let _ = Message::from_frame(&f);
    }
}

fn write_frame(segment: &[u8], offset: u64, len: u32, data: &[u8], flags: u16, seq: u32) -> Frame {
    let mut b = BytesMut::new();
    b.put_u8(segment.len() as u8);
    b.put_slice(segment);
    b.put_u64_le(offset);
    b.put_u32_le(len);
    b.put_slice(data);
    Frame::new(MsgType::Write as u8, flags, seq, b.freeze()).unwrap()
}

#[test]
fn write_segment_names_with_slash_or_dotdot_are_rejected() {
    for name in [
        &b"../etc"[..],
        b"..",
        b"a/b",
        b"/",
        b"ROOT",
        b"",
        b"a\0b",
        b"\xff",
    ] {
        let f = write_frame(name, 0, 1, b"x", 0, 1);
        let e = Message::from_frame(&f).unwrap_err();
        assert!(
            matches!(
                e,
                MsgError::Invalid {
                    field: "segment",
                    ..
                }
            ),
            "{name:?}: {e}"
        );
    }
    let long = [b'a'; 33];
    assert!(Message::from_frame(&write_frame(&long, 0, 1, b"x", 0, 1)).is_err());
    // ... and the encoder refuses to produce them.
    let w = Message::Write(Write {
        seq: 1,
        segment: "../x".into(),
        offset: 0,
        len: 1,
        body: WriteBody::Raw(Bytes::from_static(b"x")),
    });
    assert!(w.to_frame().is_err());
}

#[test]
fn write_body_rules() {
    // raw data length must equal len
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, 2, b"x", 0, 1)).is_err());
    // zstd body must be 1..=len bytes
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, 2, b"xyz", 2, 1)).is_err());
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, 2, b"", 2, 1)).is_err());
    // zero body carries nothing
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, 2, b"", 1, 1)).is_ok());
    assert!(matches!(
        Message::from_frame(&write_frame(b"rootfs", 0, 2, b"x", 1, 1)),
        Err(MsgError::Trailing { extra: 1, .. })
    ));
    // copy body is exactly 24 bytes
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, 2, &[0; 24], 3, 1)).is_ok());
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, 2, &[0; 23], 3, 1)).is_err());
    // len bounds
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, 0, b"", 1, 1)).is_err());
    assert!(Message::from_frame(&write_frame(b"rootfs", 0, MAX_CHUNK + 1, b"", 1, 1)).is_err());
    // unknown kind flag, seq 0
    assert!(matches!(
        Message::from_frame(&write_frame(b"rootfs", 0, 1, b"x", 6, 1)),
        Err(MsgError::BadFlags { .. })
    ));
    assert!(matches!(
        Message::from_frame(&write_frame(b"rootfs", 0, 1, b"x", 0, 0)),
        Err(MsgError::BadSeq { .. })
    ));
}

#[test]
fn non_write_frames_need_zero_flags_and_seq() {
    let f = Message::Ack(Ack { ack: 1 }).to_frame().unwrap();
    let g = Frame::new(f.msg_type(), 1, 0, f.payload().clone()).unwrap();
    assert!(matches!(
        Message::from_frame(&g),
        Err(MsgError::BadFlags { .. })
    ));
    let g = Frame::new(f.msg_type(), 0, 9, f.payload().clone()).unwrap();
    assert!(matches!(
        Message::from_frame(&g),
        Err(MsgError::BadSeq { .. })
    ));
    let g = Frame::new(0x77, 0, 0, Bytes::new()).unwrap();
    assert_eq!(Message::from_frame(&g), Err(MsgError::UnknownType(0x77)));
}

#[test]
fn hello_bounds() {
    let ok = Hello {
        allow_downgrade: false,
        exact_chunk: false,
        proto: 1,
        nonce: 1,
        window: 16,
        chunk_size: 1 << 18,
        compression: COMPRESS_ZSTD,
        skip: true,
        host: "build-host.local".into(),
        head: Bytes::from(vec![0u8; 4096]),
    };
    assert!(Message::Hello(ok.clone()).to_frame().is_ok());
    let bad = [
        Hello {
            window: 0,
            ..ok.clone()
        },
        Hello {
            window: MAX_WINDOW + 1,
            ..ok.clone()
        },
        Hello {
            chunk_size: 3000,
            ..ok.clone()
        },
        Hello {
            chunk_size: 1 << 21,
            ..ok.clone()
        },
        Hello {
            compression: 0x80,
            ..ok.clone()
        },
        Hello {
            host: "a b".into(),
            ..ok.clone()
        },
        Hello {
            host: String::new(),
            ..ok.clone()
        },
        Hello {
            host: "x".repeat(65),
            ..ok.clone()
        },
        Hello {
            head: Bytes::new(),
            ..ok.clone()
        },
        Hello {
            head: Bytes::from(vec![0u8; MAX_HEAD + 1]),
            ..ok.clone()
        },
    ];
    for h in bad {
        assert!(
            Message::Hello(h.clone()).to_frame().is_err(),
            "{:?}",
            (h.window, h.chunk_size, &h.host, h.head.len())
        );
    }
    // The largest head still fits a frame.
    let big = Hello {
        head: Bytes::from(vec![0u8; MAX_HEAD]),
        ..ok.clone()
    };
    let f = Message::Hello(big.clone()).to_frame().unwrap();
    assert_eq!(Message::from_frame(&f).unwrap(), Message::Hello(big));

    // A head length field larger than the bound is rejected before reading it.
    let f = Message::Hello(ok).to_frame().unwrap();
    let mut p = f.payload().to_vec();
    let at = p.len() - 4096 - 4;
    p[at..at + 4].copy_from_slice(&(MAX_HEAD as u32 + 1).to_le_bytes());
    let g = Frame::new(f.msg_type(), 0, 0, Bytes::from(p)).unwrap();
    assert!(matches!(
        Message::from_frame(&g),
        Err(MsgError::Invalid {
            field: "head_len",
            ..
        })
    ));
}

#[test]
fn hello_reply_index_count_is_checked_against_the_payload() {
    let r = HelloReply {
        unprovisioned: false,
        proto: 1,
        nonce: 5,
        device: "nexus-qemu".into(),
        info: "flashd 0.1.0".into(),
        window: 8,
        chunk_size: 1 << 16,
        compression: 0,
        already_installed: false,
        resumed: false,
        resume_seq: 0,
        verified: 0,
        index: vec![IndexEntry {
            offset: 0,
            len: 4096,
            hash: [1; 16],
        }],
        base: None,
    };
    let f = Message::HelloReply(r.clone()).to_frame().unwrap();
    let mut p = f.payload().to_vec();
    let at = p.len() - 28 - 4;
    p[at..at + 4].copy_from_slice(&(u32::MAX).to_le_bytes());
    let g = Frame::new(f.msg_type(), 0, 0, Bytes::from(p)).unwrap();
    assert!(Message::from_frame(&g).is_err());
    // PATCH without zstd, and an unknown bit, are refused; zstd with PATCH and DERIVE is fine
    for c in [0x02u8, 0x08] {
        let bad = HelloReply {
            compression: c,
            ..r.clone()
        };
        assert!(Message::HelloReply(bad).to_frame().is_err(), "{c:#x}");
    }
    let ok = HelloReply {
        compression: COMPRESS_ZSTD | COMPRESS_PATCH | COMPRESS_DERIVE,
        ..r
    };
    assert!(Message::HelloReply(ok).to_frame().is_ok());
}

#[test]
fn text_fields_reject_control_characters_and_overlong_text() {
    let e = ErrorMsg {
        code: ErrorCode::Storage,
        text: "line1\nline2".into(),
    };
    assert!(Message::Error(e).to_frame().is_err());
    let e = ErrorMsg {
        code: ErrorCode::Storage,
        text: "x".repeat(MAX_TEXT_LEN + 1),
    };
    assert!(Message::Error(e).to_frame().is_err());
    // the constructors sanitise instead
    let e = ErrorMsg::new(ErrorCode::Storage, format!("a\nb{}", "x".repeat(600)));
    let f = Message::Error(e.clone()).to_frame().unwrap();
    assert_eq!(Message::from_frame(&f).unwrap(), Message::Error(e));
}

#[test]
fn byte_exact_ack_nak_done() {
    let f = Message::Ack(Ack { ack: 0x01020304 }).to_frame().unwrap();
    assert_eq!((f.msg_type(), f.flags(), f.seq()), (0x11, 0, 0));
    assert_eq!(&f.payload()[..], &[4, 3, 2, 1]);
    let f = Message::Nak(Nak {
        seq: 7,
        reason: NakReason::Gap,
    })
    .to_frame()
    .unwrap();
    assert_eq!(f.msg_type(), 0x12);
    assert_eq!(&f.payload()[..], &[7, 0, 0, 0, 1]);
    let f = Message::Done(Done {
        image_sha256: [0xAA; 32],
    })
    .to_frame()
    .unwrap();
    assert_eq!(f.msg_type(), 0x20);
    assert_eq!(&f.payload()[..], &[0xAA; 32]);
    let f = Message::Error(ErrorMsg {
        code: ErrorCode::VerifyFailed,
        text: "verify failed seg=rootfs".into(),
    })
    .to_frame()
    .unwrap();
    assert_eq!(f.msg_type(), 0x3f);
    let mut want = vec![6, 0, 24, 0];
    want.extend_from_slice(b"verify failed seg=rootfs");
    assert_eq!(&f.payload()[..], &want[..]);
    let f = Message::Write(Write {
        seq: 3,
        segment: "kernel".into(),
        offset: 4096,
        len: 2,
        body: WriteBody::Raw(Bytes::from_static(b"hi")),
    })
    .to_frame()
    .unwrap();
    assert_eq!((f.msg_type(), f.flags(), f.seq()), (0x10, 0, 3));
    let mut want = vec![6];
    want.extend_from_slice(b"kernel");
    want.extend_from_slice(&4096u64.to_le_bytes());
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(b"hi");
    assert_eq!(&f.payload()[..], &want[..]);
}

#[test]
fn write_data_is_zero_copy() {
    let data = Bytes::from(vec![0x5a; 65536]);
    let f = Message::Write(Write {
        seq: 1,
        segment: "rootfs".into(),
        offset: 0,
        len: 65536,
        body: WriteBody::Raw(data),
    })
    .to_frame()
    .unwrap();
    let Message::Write(w) = Message::from_frame(&f).unwrap() else {
        panic!()
    };
    let WriteBody::Raw(d) = w.body else { panic!() };
    let p = f.payload();
    assert_eq!(d.as_ptr() as usize, p.as_ptr() as usize + p.len() - 65536);
}

#[test]
fn part_ack_sack_is_an_optional_trailing_run() {
    let pa = |have, gap, sack| {
        Message::PartAck(PartAck {
            seq: 5,
            have,
            gap,
            sack,
        })
    };
    let raw = |p: &[u8]| Frame::new(MsgType::PartAck as u8, 0, 0, Bytes::copy_from_slice(p));
    // the old layout (no run) is unchanged and still decodes
    let f = pa(1000, true, None).to_frame().unwrap();
    assert_eq!(&f.payload()[..], &[5, 0, 0, 0, 0xe8, 3, 0, 0, 1]);
    assert_eq!(Message::from_frame(&f).unwrap(), pa(1000, true, None));
    // with a held run: two more u32
    let f = pa(1000, true, Some((2000, 3000))).to_frame().unwrap();
    let mut want = vec![5, 0, 0, 0, 0xe8, 3, 0, 0, 1];
    want.extend_from_slice(&2000u32.to_le_bytes());
    want.extend_from_slice(&3000u32.to_le_bytes());
    assert_eq!(&f.payload()[..], &want[..]);
    assert_eq!(
        Message::from_frame(&f).unwrap(),
        pa(1000, true, Some((2000, 3000)))
    );
    // a run must be non-empty, past `have` and within a WRITE payload
    for bad in [(1000, 3000), (999, 3000), (2000, 2000), (3000, 2000)] {
        assert!(pa(1000, true, Some(bad)).to_frame().is_err(), "{bad:?}");
        let mut p = vec![5, 0, 0, 0, 0xe8, 3, 0, 0, 1];
        p.extend_from_slice(&bad.0.to_le_bytes());
        p.extend_from_slice(&bad.1.to_le_bytes());
        assert!(Message::from_frame(&raw(&p).unwrap()).is_err(), "{bad:?}");
    }
    let mut p = vec![5, 0, 0, 0, 0xe8, 3, 0, 0, 1];
    p.extend_from_slice(&2000u32.to_le_bytes());
    p.extend_from_slice(&(MAX_PART_TOTAL + 1).to_le_bytes());
    assert!(Message::from_frame(&raw(&p).unwrap()).is_err());
    // half a run, or more after it, is malformed
    assert!(Message::from_frame(&raw(&want[..13]).unwrap()).is_err());
    let mut longer = want.clone();
    longer.push(0);
    assert!(Message::from_frame(&raw(&longer).unwrap()).is_err());
}
