//! Receiver transitions, one by one, against hand-made host frames.

use crate::support::*;
use bytes::Bytes;
use proto::frame::Frame;
use proto::image::{public_key_of, sign_manifest, ImageHead};
use proto::msg::*;
use proto::session::*;
use proto::trust::{TrustPolicy, TrustedKey};

const CHUNK: u32 = 8192;

/// kernel: 40 KiB dense (5 chunks, seq 1-5); rootfs: 64 KiB with a 16 KiB hole (6 chunks, seq 6-11).
fn image() -> TestImage {
    let mut rng = Rng(11);
    let kernel = rng.bytes(40 * 1024);
    let mut rootfs = rng.bytes(64 * 1024);
    rootfs[16 * 1024..32 * 1024].fill(0);
    build_image("1", &[("kernel", kernel), ("rootfs", rootfs)])
}

fn rcfg() -> ReceiverConfig {
    ReceiverConfig {
        max_window: 4,
        checkpoint_chunks: Some(3),
        ..ReceiverConfig::new("nexus-qemu")
    }
}

fn hello(img: &TestImage, nonce: u64, skip: bool) -> Frame {
    Message::Hello(Hello {
        allow_downgrade: false,
        exact_chunk: false,
        proto: PROTO_VERSION,
        nonce,
        window: 8,
        chunk_size: CHUNK,
        compression: COMPRESS_ZSTD,
        skip,
        host: "host-1".into(),
        head: img.head.clone(),
    })
    .to_frame()
    .unwrap()
}

fn write_msg(img: &TestImage, seq: u32) -> Write {
    let plan = Plan::new(&img.manifest, CHUNK).unwrap();
    let c = plan.chunk(seq).unwrap();
    Write {
        seq,
        segment: img.manifest.segments[c.segment].name.clone(),
        offset: c.rel_offset,
        len: c.len,
        body: WriteBody::Raw(Bytes::copy_from_slice(
            &img.bytes[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
        )),
    }
}

fn wframe(w: Write) -> ReceiverEvent {
    ReceiverEvent::Frame(Message::Write(w).to_frame().unwrap())
}

fn ev(m: Message) -> ReceiverEvent {
    ReceiverEvent::Frame(m.to_frame().unwrap())
}

fn errors(a: &[ReceiverAction]) -> Vec<ErrorMsg> {
    frames_of(a)
        .into_iter()
        .filter_map(|m| {
            if let Message::Error(e) = m {
                Some(e)
            } else {
                None
            }
        })
        .collect()
}

fn reply_of(a: &[ReceiverAction]) -> HelloReply {
    frames_of(a)
        .into_iter()
        .find_map(|m| {
            if let Message::HelloReply(r) = m {
                Some(r)
            } else {
                None
            }
        })
        .unwrap()
}

fn has_install(a: &[ReceiverAction]) -> bool {
    a.iter()
        .any(|x| matches!(x, ReceiverAction::Install { .. }))
}

/// A receiver after a fresh HELLO.
fn started(img: &TestImage) -> Receiver {
    let mut rx = Receiver::new(rcfg(), None, None);
    rx.handle(ReceiverEvent::Frame(hello(img, 1, true)));
    drain_rx(&mut rx);
    rx
}

#[test]
fn a_corrupt_frame_before_any_session_is_answered_nak_0_unless_it_is_short_garbage() {
    let mut rx = Receiver::new(rcfg(), None, None);
    rx.handle(ReceiverEvent::Corrupt { bytes: 10 });
    assert!(drain_rx(&mut rx).is_empty());
    rx.handle(ReceiverEvent::Corrupt { bytes: 5000 });
    let a = drain_rx(&mut rx);
    let naks: Vec<Message> = a
        .iter()
        .filter_map(|x| match x {
            ReceiverAction::Send(f) => Some(Message::from_frame(f).unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(
        naks,
        vec![Message::Nak(Nak {
            seq: 0,
            reason: NakReason::Corrupt
        })]
    );
}

#[test]
fn fresh_hello_opens_staging_and_replies() {
    let img = image();
    let mut rx = Receiver::new(rcfg(), None, None);
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    let a = drain_rx(&mut rx);
    // Unprovisioned (no key): said once per HELLO, right after it.
    assert!(matches!(
        a[1],
        ReceiverAction::Report(ReceiverReport::Trusted { key: None, .. })
    ));
    let a = without_trust(a);
    assert_eq!(markers_of(&a), vec!["flashd: hello host=host-1 proto=1"]);
    assert!(matches!(a[1], ReceiverAction::ClearJournal));
    assert!(matches!(
        a[2],
        ReceiverAction::OpenStaging { fresh: true, total_size, .. } if total_size == img.manifest.total_size
    ));
    assert!(matches!(&a[3], ReceiverAction::WriteHead(h) if *h == img.head));
    let ReceiverAction::PersistJournal(j) = &a[4] else {
        panic!("{a:?}")
    };
    assert_eq!((j.durable_seq, j.plan_chunks, j.chunk_size), (0, 11, CHUNK));
    assert_eq!(j.image_id, img.manifest.id());
    let r = reply_of(&a);
    assert_eq!(
        (r.window, r.chunk_size, r.compression),
        (4, CHUNK, COMPRESS_ZSTD)
    );
    assert_eq!(
        (r.resume_seq, r.resumed, r.already_installed),
        (0, false, false)
    );
    assert!(r.index.is_empty());
}

#[test]
fn wrong_proto_bad_head_unsigned_and_too_large_are_refused() {
    let img = image();
    let mut rx = Receiver::new(rcfg(), None, None);
    let mut h = Message::from_frame(&hello(&img, 1, true)).unwrap();
    if let Message::Hello(x) = &mut h {
        x.proto = 2;
    }
    rx.handle(ev(h));
    let a = drain_rx(&mut rx);
    assert_eq!(errors(&a)[0].code, ErrorCode::Version);
    assert!(markers_of(&a)[0].starts_with("flashd: error 2 "));

    let mut head = img.head.to_vec();
    head[proto::image::HEADER_LEN + 5] ^= 0x20; // corrupt the manifest text
    let f = Message::Hello(Hello {
        allow_downgrade: false,
        exact_chunk: false,
        proto: 1,
        nonce: 2,
        window: 4,
        chunk_size: CHUNK,
        compression: 0,
        skip: true,
        host: "h".into(),
        head: Bytes::from(head),
    })
    .to_frame()
    .unwrap();
    rx.handle(ReceiverEvent::Frame(f));
    let a = drain_rx(&mut rx);
    assert_eq!(errors(&a)[0].code, ErrorCode::BadImage);
    assert!(!a
        .iter()
        .any(|x| matches!(x, ReceiverAction::OpenStaging { .. })));

    let seed = [7u8; 32];
    let mut signed = ReceiverConfig {
        trust: TrustPolicy {
            keys: vec![TrustedKey {
                name: "release".into(),
                key: public_key_of(&seed),
                development: false,
            }],
            floor: 0,
            broken: None,
        },
        ..rcfg()
    };
    let mut rx = Receiver::new(signed.clone(), None, None);
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    let a = drain_rx(&mut rx);
    let e = &errors(&a)[0];
    assert_eq!(e.code, ErrorCode::Signature);
    assert!(e.text.contains("not signed"), "{}", e.text);
    // signed by another key
    let sig = sign_manifest(&[9u8; 32], &img.manifest.to_canonical_bytes());
    let other = ImageHead::build(&img.manifest, Some(sig))
        .unwrap()
        .to_bytes();
    let mut f = Message::from_frame(&hello(&img, 3, true)).unwrap();
    if let Message::Hello(x) = &mut f {
        x.head = Bytes::from(other);
    }
    rx.handle(ev(f.clone()));
    assert_eq!(errors(&drain_rx(&mut rx))[0].code, ErrorCode::Signature);
    // signed by the right key
    let sig = sign_manifest(&seed, &img.manifest.to_canonical_bytes());
    let good = ImageHead::build(&img.manifest, Some(sig))
        .unwrap()
        .to_bytes();
    if let Message::Hello(x) = &mut f {
        x.head = Bytes::from(good);
    }
    rx.handle(ev(f));
    assert!(errors(&drain_rx(&mut rx)).is_empty());

    signed.trust = TrustPolicy::default();
    signed.max_image_size = 1000;
    let mut rx = Receiver::new(signed, None, None);
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    assert_eq!(errors(&drain_rx(&mut rx))[0].code, ErrorCode::TooLarge);
}

#[test]
fn in_order_write_is_written_at_its_absolute_offset_and_acked() {
    let img = image();
    let mut rx = started(&img);
    rx.handle(wframe(write_msg(&img, 1)));
    let a = drain_rx(&mut rx);
    let ReceiverAction::Write {
        seq, offset, len, ..
    } = &a[0]
    else {
        panic!("{a:?}")
    };
    assert_eq!(
        (*seq, *offset, *len),
        (1, img.manifest.segments[0].offset, CHUNK)
    );
    assert_eq!(frames_of(&a), vec![Message::Ack(Ack { ack: 1 })]);
    assert_eq!(rx.received(), 1);
}

#[test]
fn duplicate_is_reacked_and_a_gap_is_naked_once() {
    let img = image();
    let mut rx = started(&img);
    rx.handle(wframe(write_msg(&img, 1)));
    drain_rx(&mut rx);
    rx.handle(wframe(write_msg(&img, 1)));
    let a = drain_rx(&mut rx);
    assert_eq!(frames_of(&a), vec![Message::Ack(Ack { ack: 1 })]);
    assert!(!a.iter().any(|x| matches!(x, ReceiverAction::Write { .. })));
    // 2 lost: 3 triggers one NAK(2); 4 and 5 are dropped silently
    rx.handle(wframe(write_msg(&img, 3)));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![Message::Nak(Nak {
            seq: 2,
            reason: NakReason::Gap
        })]
    );
    for s in [4, 5] {
        rx.handle(wframe(write_msg(&img, s)));
        assert!(drain_rx(&mut rx).is_empty());
    }
    // the host rewound but 2 was lost again: 3 arrives again → NAK again
    rx.handle(wframe(write_msg(&img, 3)));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![Message::Nak(Nak {
            seq: 2,
            reason: NakReason::Gap
        })]
    );
    // corrupt bytes while the NAK for 2 is outstanding: no NAK storm
    rx.handle(ReceiverEvent::Corrupt { bytes: 100 });
    assert!(drain_rx(&mut rx).is_empty());
    rx.handle(wframe(write_msg(&img, 2)));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![Message::Ack(Ack { ack: 2 })]
    );
    // corrupt bytes with no NAK outstanding: NAK the next expected
    rx.handle(ReceiverEvent::Corrupt { bytes: 100 });
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![Message::Nak(Nak {
            seq: 3,
            reason: NakReason::Corrupt
        })]
    );
}

fn assert_bad_write(img: &TestImage, w: Write, needle: &str) {
    let mut rx = started(img);
    rx.handle(wframe(w));
    let a = drain_rx(&mut rx);
    let e = errors(&a);
    assert_eq!(e.len(), 1, "{a:?}");
    assert_eq!(e[0].code, ErrorCode::BadWrite);
    assert!(
        e[0].text.contains(needle),
        "{} does not contain {needle}",
        e[0].text
    );
    assert!(markers_of(&a)[0].starts_with("flashd: error 5 "));
    assert!(!a.iter().any(|x| matches!(x, ReceiverAction::Write { .. })));
    // after the error, further writes are ignored (no second error, no write)
    rx.handle(wframe(write_msg(img, 1)));
    assert!(drain_rx(&mut rx).is_empty());
}

#[test]
fn bad_writes_are_rejected_with_a_clear_error() {
    let img = image();
    assert_bad_write(
        &img,
        Write {
            segment: "initrd".into(),
            ..write_msg(&img, 1)
        },
        "unknown segment",
    );
    let past = Write {
        offset: 36 * 1024,
        len: 8192,
        ..write_msg(&img, 1)
    };
    assert_bad_write(
        &img,
        Write {
            body: WriteBody::Raw(Bytes::from(vec![1u8; 8192])),
            ..past
        },
        "past the end of segment kernel",
    );
    assert_bad_write(
        &img,
        Write {
            offset: 4096,
            ..write_msg(&img, 1)
        },
        "the plan says segment kernel offset 0",
    );
    assert_bad_write(
        &img,
        Write {
            seq: 1,
            ..write_msg(&img, 6)
        },
        "the plan says segment kernel",
    );
    assert_bad_write(
        &img,
        Write {
            seq: 12,
            ..write_msg(&img, 11)
        },
        "beyond the plan",
    );
    let w = write_msg(&img, 1);
    assert_bad_write(
        &img,
        Write {
            body: WriteBody::Copy {
                src_offset: 0,
                hash: [0; 16],
            },
            ..w.clone()
        },
        "nothing is installed",
    );
}

#[test]
fn names_with_slash_or_dotdot_are_rejected_at_decode() {
    let img = image();
    let mut rx = started(&img);
    let mut p = vec![5u8];
    p.extend_from_slice(b"../..");
    p.extend_from_slice(&0u64.to_le_bytes());
    p.extend_from_slice(&1u32.to_le_bytes());
    p.push(0xAA);
    rx.handle(ReceiverEvent::Frame(
        Frame::new(0x10, 0, 1, Bytes::from(p)).unwrap(),
    ));
    let a = drain_rx(&mut rx);
    let e = errors(&a);
    assert_eq!(e[0].code, ErrorCode::BadWrite);
    assert!(e[0].text.contains("segment"), "{}", e[0].text);
}

#[test]
fn zstd_without_negotiation_and_copy_with_no_skip_are_refused() {
    let img = image();
    let mut rx = Receiver::new(
        ReceiverConfig {
            zstd: false,
            ..rcfg()
        },
        None,
        None,
    );
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    assert_eq!(reply_of(&drain_rx(&mut rx)).compression, 0);
    rx.handle(wframe(Write {
        body: WriteBody::Zstd(Bytes::from_static(b"z")),
        ..write_msg(&img, 1)
    }));
    let e = errors(&drain_rx(&mut rx));
    assert!(e[0].text.contains("zstd"), "{}", e[0].text);

    let inst = InstalledImage {
        image_id: [1; 32],
        image_sha256: [2; 32],
        total_size: 1 << 20,
        version: "0".into(),
        index: None,
    };
    let mut rx = Receiver::new(rcfg(), None, Some(inst));
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, false)));
    drain_rx(&mut rx);
    rx.handle(wframe(Write {
        body: WriteBody::Copy {
            src_offset: 0,
            hash: [0; 16],
        },
        ..write_msg(&img, 1)
    }));
    let e = errors(&drain_rx(&mut rx));
    assert!(e[0].text.contains("--no-skip"), "{}", e[0].text);
}

#[test]
fn write_before_hello_and_done_without_session_say_no_session() {
    // A fresh target (or one that dropped a stalled session) gets data: on a link without
    // connections the host cannot know; the code tells it to send HELLO again.
    let img = image();
    let mut rx = Receiver::new(rcfg(), None, None);
    rx.handle(wframe(write_msg(&img, 1)));
    let e = &errors(&drain_rx(&mut rx))[0];
    assert_eq!(e.code, ErrorCode::NoSession, "{}", e.text);
    assert!(e.text.starts_with("WRITE before HELLO"), "{}", e.text);
    // ... and the HELLO that follows is served.
    rx.handle(ReceiverEvent::Frame(hello(&img, 2, true)));
    assert!(frames_of(&drain_rx(&mut rx))
        .iter()
        .any(|m| matches!(m, Message::HelloReply(_))));
    let mut rx = Receiver::new(rcfg(), None, None);
    rx.handle(ev(Message::Done(Done {
        image_sha256: [0; 32],
    })));
    assert_eq!(errors(&drain_rx(&mut rx))[0].code, ErrorCode::NoSession);
}

/// Sends chunks `from..=to` in order and returns the actions.
fn feed(rx: &mut Receiver, img: &TestImage, from: u32, to: u32) -> Vec<ReceiverAction> {
    let mut out = Vec::new();
    for s in from..=to {
        rx.handle(wframe(write_msg(img, s)));
        out.extend(drain_rx(rx));
    }
    out
}

#[test]
fn complete_segment_is_announced_and_verified() {
    let img = image();
    let mut rx = started(&img);
    let a = feed(&mut rx, &img, 1, 5);
    assert_eq!(
        markers_of(&a),
        vec![format!("flashd: wrote seg=kernel bytes={}", 40 * 1024)]
    );
    let v: Vec<_> = a
        .iter()
        .filter_map(|x| match x {
            ReceiverAction::VerifySegment {
                ticket,
                segment,
                offset,
                size,
                sha256,
                name,
            } => Some((*ticket, *segment, *offset, *size, *sha256, name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(v.len(), 1);
    let seg = &img.manifest.segments[0];
    assert_eq!(
        (v[0].1, v[0].2, v[0].3, v[0].4),
        (0, seg.offset, seg.size, seg.sha256)
    );
    // the verification comes after the write it covers and after its ACK
    let wi = a
        .iter()
        .rposition(|x| matches!(x, ReceiverAction::Write { seq: 5, .. }))
        .unwrap();
    let vi = a
        .iter()
        .position(|x| matches!(x, ReceiverAction::VerifySegment { .. }))
        .unwrap();
    assert!(wi < vi);
    rx.handle(ReceiverEvent::SegmentVerified {
        ticket: v[0].0,
        ok: true,
    });
    let b = drain_rx(&mut rx);
    assert!(frames_of(&b).contains(&Message::Verified(Verified {
        segment: "kernel".into()
    })));
    // a stale ticket is ignored
    rx.handle(ReceiverEvent::SegmentVerified {
        ticket: 999,
        ok: false,
    });
    assert!(drain_rx(&mut rx).is_empty());
}

#[test]
fn journal_is_persisted_after_the_data_is_synced() {
    let img = image();
    let mut rx = started(&img);
    let a = feed(&mut rx, &img, 1, 3);
    // checkpoint every 3 chunks: one sync request, no journal before it is answered
    let syncs: Vec<u32> = a
        .iter()
        .filter_map(|x| {
            if let ReceiverAction::SyncStaging { upto_seq } = x {
                Some(*upto_seq)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(syncs, vec![3]);
    assert!(!a
        .iter()
        .any(|x| matches!(x, ReceiverAction::PersistJournal(_))));
    // more writes while the sync is in flight: no second sync yet
    let b = feed(&mut rx, &img, 4, 6);
    assert!(!b
        .iter()
        .any(|x| matches!(x, ReceiverAction::SyncStaging { .. })));
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 3 });
    let c = drain_rx(&mut rx);
    let ReceiverAction::PersistJournal(j) = &c[0] else {
        panic!("{c:?}")
    };
    assert_eq!(j.durable_seq, 3);
    assert_eq!(j.durable_offset, img.manifest.segments[0].offset + 3 * 8192);
    assert_eq!(
        j.resume_point(),
        ResumePoint {
            resume_seq: 3,
            verified: 0
        }
    );
    // 6 - 3 = 3 pending chunks → the next sync follows right away
    assert!(matches!(c[1], ReceiverAction::SyncStaging { upto_seq: 6 }));
    // JSON round trip (the lead's storage layer persists it with serde_json)
    let s = serde_json::to_string(j).unwrap();
    assert!(s.contains(&hex::encode(img.manifest.id())));
    assert_eq!(&serde_json::from_str::<Journal>(&s).unwrap(), j);
}

/// Drives a receiver to "all chunks written, all verified", answering syncs and verifies.
fn complete(img: &TestImage, rx: &mut Receiver) -> Vec<ReceiverAction> {
    let mut all = Vec::new();
    for s in 1..=11 {
        rx.handle(wframe(write_msg(img, s)));
        let mut q: Vec<ReceiverAction> = drain_rx(rx);
        while !q.is_empty() {
            let mut next = Vec::new();
            for a in &q {
                match a {
                    ReceiverAction::SyncStaging { upto_seq } => {
                        rx.handle(ReceiverEvent::StagingSynced {
                            upto_seq: *upto_seq,
                        });
                        next.extend(drain_rx(rx));
                    }
                    ReceiverAction::VerifySegment { ticket, .. } => {
                        rx.handle(ReceiverEvent::SegmentVerified {
                            ticket: *ticket,
                            ok: true,
                        });
                        next.extend(drain_rx(rx));
                    }
                    _ => {}
                }
            }
            all.extend(q);
            q = next;
        }
    }
    all
}

#[test]
fn done_with_everything_verified_installs_and_replies() {
    let img = image();
    let mut rx = started(&img);
    let a = complete(&img, &mut rx);
    assert_eq!(
        markers_of(&a),
        vec![
            format!("flashd: wrote seg=kernel bytes={}", 40 * 1024),
            format!("flashd: wrote seg=rootfs bytes={}", 64 * 1024),
        ]
    );
    let last_journal = a
        .iter()
        .filter_map(|x| {
            if let ReceiverAction::PersistJournal(j) = x {
                Some(j.clone())
            } else {
                None
            }
        })
        .last()
        .unwrap();
    assert_eq!(last_journal.durable_seq, 11);
    assert_eq!(last_journal.verified, vec![true, true]);
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    let b = drain_rx(&mut rx);
    assert_eq!(markers_of(&b), vec!["flashd: verify ok"]);
    let Some(ReceiverAction::Install {
        unchanged: false,
        image_sha256,
        ..
    }) = b.last()
    else {
        panic!("{b:?}")
    };
    assert_eq!(*image_sha256, img.manifest.image_sha256);
    // a repeated DONE while installing: pending
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    let c = frames_of(&drain_rx(&mut rx));
    assert!(matches!(
        &c[..],
        [Message::DoneReply(DoneReply {
            status: DoneStatus::Pending,
            ..
        })]
    ));
    rx.handle(ReceiverEvent::Installed {
        ok: true,
        detail: String::new(),
    });
    let d = drain_rx(&mut rx);
    assert_eq!(markers_of(&d), vec!["flashd: installed"]);
    assert!(d.iter().any(|x| matches!(x, ReceiverAction::ClearJournal)));
    assert!(matches!(
        frames_of(&d)[..],
        [Message::DoneReply(DoneReply {
            status: DoneStatus::Installed,
            ..
        })]
    ));
    assert_eq!(rx.installed().unwrap().image_id, img.manifest.id());
    assert_eq!(rx.journal(), None);
    // and again after the install: the same answer
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    assert!(matches!(
        frames_of(&drain_rx(&mut rx))[..],
        [Message::DoneReply(DoneReply {
            status: DoneStatus::Installed,
            ..
        })]
    ));
}

#[test]
fn done_before_complete_or_with_another_hash_is_refused() {
    let img = image();
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 4);
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    let a = drain_rx(&mut rx);
    let e = &errors(&a)[0];
    assert_eq!(e.code, ErrorCode::Incomplete);
    assert!(e.text.contains("received 4 of 11"), "{}", e.text);
    assert!(!has_install(&a));

    let mut rx = started(&img);
    complete(&img, &mut rx);
    rx.handle(ev(Message::Done(Done {
        image_sha256: [0xEE; 32],
    })));
    let a = drain_rx(&mut rx);
    assert_eq!(errors(&a)[0].code, ErrorCode::ImageHash);
    assert!(!has_install(&a));
}

#[test]
fn done_waits_for_pending_verifications() {
    let img = image();
    let mut rx = started(&img);
    let a = feed(&mut rx, &img, 1, 11);
    let tickets: Vec<u64> = a
        .iter()
        .filter_map(|x| {
            if let ReceiverAction::VerifySegment { ticket, .. } = x {
                Some(*ticket)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(tickets.len(), 2);
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    let b = drain_rx(&mut rx);
    assert!(!has_install(&b));
    assert!(matches!(
        frames_of(&b)[..],
        [Message::DoneReply(DoneReply {
            status: DoneStatus::Pending,
            ..
        })]
    ));
    rx.handle(ReceiverEvent::SegmentVerified {
        ticket: tickets[0],
        ok: true,
    });
    assert!(!has_install(&drain_rx(&mut rx)));
    rx.handle(ReceiverEvent::SegmentVerified {
        ticket: tickets[1],
        ok: true,
    });
    let c = drain_rx(&mut rx);
    assert!(has_install(&c));
    assert_eq!(markers_of(&c), vec!["flashd: verify ok"]);
}

/// Verify both segments of a fully received and synced image: the kernel passes, the rootfs
/// fails with `bad`; the journal persisted after that failure.
fn journal_after_rootfs_failure(bad: impl FnOnce(u64) -> ReceiverEvent) -> proto::session::Journal {
    let img = image();
    let mut rx = started(&img);
    let a = feed(&mut rx, &img, 1, 11);
    let t: Vec<u64> = a
        .iter()
        .filter_map(|x| match x {
            ReceiverAction::VerifySegment { ticket, .. } => Some(*ticket),
            _ => None,
        })
        .collect();
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 11 });
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::SegmentVerified {
        ticket: t[0],
        ok: true,
    });
    drain_rx(&mut rx);
    rx.handle(bad(t[1]));
    let b = drain_rx(&mut rx);
    assert_eq!(
        errors(&b)[0].code,
        ErrorCode::VerifyFailed,
        "either way the session fails"
    );
    b.iter()
        .rev()
        .find_map(|x| match x {
            ReceiverAction::PersistJournal(j) => Some(j.clone()),
            _ => None,
        })
        .unwrap()
}

#[test]
fn a_rejected_piece_rewinds_to_that_piece_not_the_segment_start() {
    // rootfs (chunks 6..=11 of 8 KiB): data at 0..16K (6, 7) and 32K..64K (8..=11).
    let whole =
        journal_after_rootfs_failure(|ticket| ReceiverEvent::SegmentVerified { ticket, ok: false });
    assert_eq!(
        whole.durable_seq, 5,
        "unknown bad piece: from the segment's start"
    );
    // The piece holding rootfs byte 40960 (chunk 9) was the first bad one: chunks up to 8 stay.
    let piece = journal_after_rootfs_failure(|ticket| ReceiverEvent::SegmentRejected {
        ticket,
        rel_offset: 40 * 1024,
    });
    assert_eq!(piece.durable_seq, 8);
    assert_eq!(piece.verified, vec![true, false]);
    // An offset inside a zero run resumes at the next chunk with data; one past the end
    // falls back to the segment's start.
    let gap = journal_after_rootfs_failure(|ticket| ReceiverEvent::SegmentRejected {
        ticket,
        rel_offset: 20 * 1024,
    });
    assert_eq!(gap.durable_seq, 7);
    let past = journal_after_rootfs_failure(|ticket| ReceiverEvent::SegmentRejected {
        ticket,
        rel_offset: 1 << 40,
    });
    assert_eq!(past.durable_seq, 5);
}

#[test]
fn verify_failure_reports_the_segment_and_never_installs() {
    let img = image();
    let mut rx = started(&img);
    let a = feed(&mut rx, &img, 1, 11);
    let v: Vec<(u64, usize)> = a
        .iter()
        .filter_map(|x| match x {
            ReceiverAction::VerifySegment {
                ticket, segment, ..
            } => Some((*ticket, *segment)),
            _ => None,
        })
        .collect();
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 3 });
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::SegmentVerified {
        ticket: v[0].0,
        ok: true,
    });
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::SegmentVerified {
        ticket: v[1].0,
        ok: false,
    });
    let b = drain_rx(&mut rx);
    assert_eq!(
        markers_of(&b),
        vec![
            "flashd: verify failed seg=rootfs",
            "flashd: error 6 verify failed seg=rootfs"
        ]
    );
    let e = &errors(&b)[0];
    assert_eq!(
        (e.code, e.text.as_str()),
        (ErrorCode::VerifyFailed, "verify failed seg=rootfs")
    );
    // the journal rewinds to the segment's first chunk
    let j = b
        .iter()
        .find_map(|x| {
            if let ReceiverAction::PersistJournal(j) = x {
                Some(j.clone())
            } else {
                None
            }
        })
        .unwrap();
    assert!(j.durable_seq <= 5);
    assert_eq!(
        j.verified,
        vec![false, false],
        "kernel not durable yet, rootfs bad"
    );
    // DONE now: refused, nothing installed
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    assert!(!has_install(&drain_rx(&mut rx)));
    // a new session resumes at the bad segment
    rx.handle(ReceiverEvent::LinkDown);
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::Frame(hello(&img, 2, true)));
    let r = reply_of(&drain_rx(&mut rx));
    assert_eq!(r.resume_seq, 5);
    assert_eq!(r.verified, 0b01);
}

#[test]
fn restarted_receiver_resumes_from_its_journal() {
    let img = image();
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 7);
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 3 });
    let j = drain_rx(&mut rx)
        .into_iter()
        .find_map(|x| {
            if let ReceiverAction::PersistJournal(j) = x {
                Some(j)
            } else {
                None
            }
        })
        .unwrap();
    // flashd killed; a new one starts from the persisted journal
    let mut rx2 = Receiver::new(rcfg(), Some(j.clone()), None);
    rx2.handle(ReceiverEvent::Frame(hello(&img, 9, true)));
    let a = without_trust(drain_rx(&mut rx2));
    assert!(matches!(
        a[1],
        ReceiverAction::OpenStaging { fresh: false, .. }
    ));
    assert!(!a.iter().any(|x| matches!(x, ReceiverAction::ClearJournal)));
    let r = reply_of(&a);
    assert_eq!((r.resume_seq, r.resumed), (3, true));
    // continues at 4
    rx2.handle(wframe(write_msg(&img, 4)));
    assert_eq!(
        frames_of(&drain_rx(&mut rx2)),
        vec![Message::Ack(Ack { ack: 4 })]
    );
    // a journal for another chunk size larger than the host allows: fresh start
    let mut rx3 = Receiver::new(
        rcfg(),
        Some(Journal {
            chunk_size: 1 << 20,
            ..j.clone()
        }),
        None,
    );
    rx3.handle(ReceiverEvent::Frame(hello(&img, 9, true)));
    let a = drain_rx(&mut rx3);
    assert!(a
        .iter()
        .any(|x| matches!(x, ReceiverAction::OpenStaging { fresh: true, .. })));
    assert_eq!(reply_of(&a).resume_seq, 0);
    // a journal for another image: fresh start
    let mut rx4 = Receiver::new(
        rcfg(),
        Some(Journal {
            image_id: [3; 32],
            ..j
        }),
        None,
    );
    rx4.handle(ReceiverEvent::Frame(hello(&img, 9, true)));
    assert_eq!(reply_of(&drain_rx(&mut rx4)).resume_seq, 0);
}

#[test]
fn link_cut_resumes_from_memory_and_checkpoints() {
    let img = image();
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 2);
    rx.handle(ReceiverEvent::LinkDown);
    let a = drain_rx(&mut rx);
    assert!(matches!(
        a[..],
        [ReceiverAction::SyncStaging { upto_seq: 2 }]
    ));
    assert!(rx.is_idle());
    rx.handle(ReceiverEvent::Frame(hello(&img, 2, true)));
    let r = reply_of(&drain_rx(&mut rx));
    assert_eq!((r.resume_seq, r.resumed), (2, true));
}

#[test]
fn repeated_hello_on_the_same_link_gets_the_same_answer() {
    let img = image();
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 2);
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    let a = drain_rx(&mut rx);
    assert!(markers_of(&a).is_empty(), "no new session");
    assert_eq!(reply_of(&a).resume_seq, 2);
}

#[test]
fn abort_keeps_the_transfer_resumable() {
    let img = image();
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 2);
    rx.handle(ev(Message::Abort(Abort::new(ErrorCode::Aborted, "ctrl-c"))));
    let a = drain_rx(&mut rx);
    assert!(a
        .iter()
        .any(|x| matches!(x, ReceiverAction::SyncStaging { upto_seq: 2 })));
    assert!(rx.is_idle());
    assert!(errors(&a).is_empty());
}

fn installed_of(img: &TestImage, chunk: u32) -> InstalledImage {
    let plan = Plan::new(&img.manifest, chunk).unwrap();
    let index = SkipIndex::build(&img.manifest, &plan, |o, l| {
        Ok::<_, ()>(img.bytes[o as usize..(o + u64::from(l)) as usize].to_vec())
    })
    .unwrap();
    InstalledImage {
        image_id: img.manifest.id(),
        image_sha256: img.manifest.image_sha256,
        total_size: img.manifest.total_size,
        version: img.manifest.version.clone(),
        index: Some(index),
    }
}

#[test]
fn identical_installed_image_short_circuits() {
    let img = image();
    let mut rx = Receiver::new(rcfg(), None, Some(installed_of(&img, CHUNK)));
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    let a = drain_rx(&mut rx);
    assert!(
        !a.iter().any(|x| matches!(
            x,
            ReceiverAction::OpenStaging { .. }
                | ReceiverAction::ClearJournal
                | ReceiverAction::PersistJournal(_)
        )),
        "staging untouched: {a:?}"
    );
    let r = reply_of(&a);
    assert!(r.already_installed);
    assert!(r.index.is_empty());
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    let b = drain_rx(&mut rx);
    assert_eq!(markers_of(&b), vec!["flashd: verify ok"]);
    assert!(matches!(
        b.last(),
        Some(ReceiverAction::Install {
            unchanged: true,
            ..
        })
    ));
    rx.handle(ReceiverEvent::Installed {
        ok: true,
        detail: String::new(),
    });
    let c = drain_rx(&mut rx);
    assert_eq!(markers_of(&c), vec!["flashd: installed"]);
    assert!(matches!(
        frames_of(&c)[..],
        [Message::DoneReply(DoneReply {
            status: DoneStatus::Unchanged,
            ..
        })]
    ));
}

#[test]
fn no_skip_forces_a_full_transfer_without_index() {
    let img = image();
    let mut rx = Receiver::new(rcfg(), None, Some(installed_of(&img, CHUNK)));
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, false)));
    let r = reply_of(&drain_rx(&mut rx));
    assert!(!r.already_installed);
    assert!(r.index.is_empty());
    assert_eq!(r.resume_seq, 0);
}

#[test]
fn an_explicit_chunk_size_is_kept_despite_the_skip_index() {
    let old = image();
    let new = build_image("2", &[("kernel", vec![7u8; 40 * 1024])]);
    let mut rx = Receiver::new(rcfg(), None, Some(installed_of(&old, 4096)));
    let Message::Hello(mut h) = Message::from_frame(&hello(&new, 1, true)).unwrap() else {
        panic!("not a hello")
    };
    h.exact_chunk = true;
    rx.handle(ReceiverEvent::Frame(Message::Hello(h).to_frame().unwrap()));
    let r = reply_of(&drain_rx(&mut rx));
    // The index still helps (COPY by content), but the plan uses the host's chunk size.
    assert_eq!(r.chunk_size, CHUNK);
    assert_ne!(CHUNK, 4096);
}

#[test]
fn skip_index_is_offered_and_copy_writes_are_accepted() {
    let old = image();
    let mut rng = Rng(99);
    let new = {
        let mut kernel =
            old.bytes[old.manifest.segments[0].offset as usize..][..40 * 1024].to_vec();
        kernel[100] ^= 0xFF; // first chunk differs
        let rootfs = content(&mut rng, 64 * 1024, false);
        build_image("2", &[("kernel", kernel), ("rootfs", rootfs)])
    };
    // the index was built with a smaller chunk size: the receiver picks it
    let mut rx = Receiver::new(rcfg(), None, Some(installed_of(&old, 4096)));
    rx.handle(ReceiverEvent::Frame(hello(&new, 1, true)));
    let r = reply_of(&drain_rx(&mut rx));
    assert_eq!(r.chunk_size, 4096);
    assert_eq!(r.index.len(), 10 + 12);
    let c2 = Plan::new(&new.manifest, 4096).unwrap().chunk(2).unwrap();
    let e = r.index.iter().find(|e| e.offset == c2.offset).unwrap();
    let w = Write {
        seq: 2,
        segment: "kernel".into(),
        offset: c2.rel_offset,
        len: c2.len,
        body: WriteBody::Copy {
            src_offset: e.offset,
            hash: e.hash,
        },
    };
    let plan = Plan::new(&new.manifest, 4096).unwrap();
    let c1 = plan.chunk(1).unwrap();
    rx.handle(wframe(Write {
        seq: 1,
        segment: "kernel".into(),
        offset: 0,
        len: 4096,
        body: WriteBody::Raw(Bytes::copy_from_slice(
            &new.bytes[c1.offset as usize..][..4096],
        )),
    }));
    drain_rx(&mut rx);
    rx.handle(wframe(w));
    let a = drain_rx(&mut rx);
    assert!(matches!(
        &a[0],
        ReceiverAction::Write {
            body: WriteBody::Copy { .. },
            seq: 2,
            ..
        }
    ));
    // a copy source outside the installed image is refused
    rx.handle(wframe(Write {
        seq: 3,
        segment: "kernel".into(),
        offset: 8192,
        len: 4096,
        body: WriteBody::Copy {
            src_offset: u64::MAX - 10,
            hash: [0; 16],
        },
    }));
    assert_eq!(errors(&drain_rx(&mut rx))[0].code, ErrorCode::BadWrite);
}

#[test]
fn failed_copy_verification_drops_the_skip_index() {
    let img = image();
    let mut inst = installed_of(&img, CHUNK);
    inst.image_id = [5; 32]; // pretend another image is installed with the same chunks
    let mut rx = Receiver::new(rcfg(), None, Some(inst));
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    let r = reply_of(&drain_rx(&mut rx));
    let mut a = Vec::new();
    for s in 1..=5 {
        let c = Plan::new(&img.manifest, CHUNK).unwrap().chunk(s).unwrap();
        let e = r.index.iter().find(|e| e.offset == c.offset).unwrap();
        rx.handle(wframe(Write {
            seq: s,
            segment: "kernel".into(),
            offset: c.rel_offset,
            len: c.len,
            body: WriteBody::Copy {
                src_offset: e.offset,
                hash: e.hash,
            },
        }));
        a.extend(drain_rx(&mut rx));
    }
    let ticket = a
        .iter()
        .find_map(|x| {
            if let ReceiverAction::VerifySegment { ticket, .. } = x {
                Some(*ticket)
            } else {
                None
            }
        })
        .unwrap();
    rx.handle(ReceiverEvent::SegmentVerified { ticket, ok: false });
    drain_rx(&mut rx);
    assert!(rx.installed().unwrap().index.is_none());
    rx.handle(ReceiverEvent::LinkDown);
    rx.handle(ReceiverEvent::Frame(hello(&img, 2, true)));
    let r = reply_of(&drain_rx(&mut rx));
    assert!(r.index.is_empty(), "the retry sends real data");
    assert_eq!(r.resume_seq, 0);
}

#[test]
fn install_failure_is_reported_and_the_transfer_stays_resumable() {
    let img = image();
    let mut rx = started(&img);
    complete(&img, &mut rx);
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::Installed {
        ok: false,
        detail: "rename: EXDEV".into(),
    });
    let a = drain_rx(&mut rx);
    let e = &errors(&a)[0];
    assert_eq!(e.code, ErrorCode::InstallFailed);
    assert!(
        e.text.contains("EXDEV") && e.text.contains("untouched"),
        "{}",
        e.text
    );
    assert!(markers_of(&a)[0].starts_with("flashd: error 10 "));
    assert_eq!(rx.installed(), None);
    rx.handle(ReceiverEvent::LinkDown);
    rx.handle(ReceiverEvent::Frame(hello(&img, 5, true)));
    let r = reply_of(&drain_rx(&mut rx));
    assert_eq!((r.resume_seq, r.verified), (11, 0b11));
}

#[test]
fn storage_failure_fails_the_session_and_rewinds_to_durable() {
    let img = image();
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 4);
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 3 });
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::ActionFailed {
        code: ErrorCode::Storage,
        text: "ENOSPC writing staging".into(),
    });
    let a = drain_rx(&mut rx);
    assert_eq!(errors(&a)[0].code, ErrorCode::Storage);
    assert_eq!(
        markers_of(&a),
        vec!["flashd: error 9 ENOSPC writing staging"]
    );
    assert_eq!(rx.received(), 3);
}

#[test]
fn hello_during_install_is_answered_after_it() {
    let img = image();
    let mut rx = started(&img);
    complete(&img, &mut rx);
    rx.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::LinkDown);
    rx.handle(ReceiverEvent::Frame(hello(&img, 7, true)));
    assert!(reply_of_opt(&drain_rx(&mut rx)).is_none());
    rx.handle(ReceiverEvent::Installed {
        ok: true,
        detail: String::new(),
    });
    let a = drain_rx(&mut rx);
    let r = reply_of(&a);
    assert!(r.already_installed);
}

fn reply_of_opt(a: &[ReceiverAction]) -> Option<HelloReply> {
    frames_of(a).into_iter().find_map(|m| {
        if let Message::HelloReply(r) = m {
            Some(r)
        } else {
            None
        }
    })
}

#[test]
fn info_reports_installed_and_partial_transfer() {
    let img = image();
    let mut rx = Receiver::new(rcfg(), None, Some(installed_of(&img, CHUNK)));
    rx.handle(ev(Message::Info));
    let m = frames_of(&drain_rx(&mut rx));
    let Message::InfoReply(r) = &m[0] else {
        panic!()
    };
    assert_eq!(r.installed.as_ref().unwrap().image_id, img.manifest.id());
    assert!(r.transfer.is_none());
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 3);
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 3 });
    drain_rx(&mut rx);
    rx.handle(ev(Message::Info));
    let m = frames_of(&drain_rx(&mut rx));
    let Message::InfoReply(r) = &m[0] else {
        panic!()
    };
    let t = r.transfer.as_ref().unwrap();
    assert_eq!((t.next_seq, t.plan_chunks, t.chunk_size), (3, 11, CHUNK));
}

#[test]
fn unexpected_message_from_host_is_a_protocol_error() {
    let img = image();
    let mut rx = started(&img);
    rx.handle(ev(Message::Ack(Ack { ack: 1 })));
    let a = drain_rx(&mut rx);
    assert_eq!(errors(&a)[0].code, ErrorCode::Protocol);
    assert!(errors(&a)[0].text.contains("unexpected ACK"));
}

#[test]
fn lost_staging_file_restarts_the_transfer_from_scratch() {
    let img = image();
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 3);
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 3 });
    let j = drain_rx(&mut rx)
        .into_iter()
        .find_map(|x| {
            if let ReceiverAction::PersistJournal(j) = x {
                Some(j)
            } else {
                None
            }
        })
        .unwrap();
    let mut rx = Receiver::new(rcfg(), Some(j), None);
    rx.handle(ReceiverEvent::Frame(hello(&img, 4, true)));
    // the shell executes the marker, then fails to open the staging file
    assert!(matches!(
        rx.poll_action(),
        Some(ReceiverAction::Report(ReceiverReport::Hello { .. }))
    ));
    assert!(matches!(
        rx.poll_action(),
        Some(ReceiverAction::Report(ReceiverReport::Trusted { .. }))
    ));
    assert!(matches!(
        rx.poll_action(),
        Some(ReceiverAction::OpenStaging { fresh: false, .. })
    ));
    rx.handle(ReceiverEvent::StagingLost);
    let a = drain_rx(&mut rx);
    assert!(markers_of(&a).is_empty(), "no second hello marker");
    assert!(a.iter().any(|x| matches!(x, ReceiverAction::ClearJournal)));
    assert!(a
        .iter()
        .any(|x| matches!(x, ReceiverAction::OpenStaging { fresh: true, .. })));
    let replies: Vec<HelloReply> = frames_of(&a)
        .into_iter()
        .filter_map(|m| {
            if let Message::HelloReply(r) = m {
                Some(r)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(replies.len(), 1, "the stale resume reply was discarded");
    assert_eq!((replies[0].resume_seq, replies[0].resumed), (0, false));
}

#[test]
fn failed_write_discards_its_queued_ack() {
    let img = image();
    let mut rx = started(&img);
    rx.handle(wframe(write_msg(&img, 1)));
    assert!(matches!(
        rx.poll_action(),
        Some(ReceiverAction::Write { seq: 1, .. })
    ));
    rx.handle(ReceiverEvent::ActionFailed {
        code: ErrorCode::Storage,
        text: "EIO".into(),
    });
    let a = drain_rx(&mut rx);
    assert!(
        !frames_of(&a).iter().any(|m| matches!(m, Message::Ack(_))),
        "{a:?}"
    );
    assert_eq!(errors(&a)[0].code, ErrorCode::Storage);
    assert_eq!(rx.received(), 0);
}

#[test]
fn a_target_without_state_refuses_to_flash_but_answers_info() {
    let img = image();
    let cfg = ReceiverConfig {
        refuse: Some("no usable state dir /state/flash (stub/placeholder: not flashing)".into()),
        device: "bad name!".into(),
        ..rcfg()
    };
    let mut rx = Receiver::new(cfg, None, None);
    rx.handle(ReceiverEvent::Frame(hello(&img, 1, true)));
    let a = drain_rx(&mut rx);
    assert_eq!(errors(&a)[0].code, ErrorCode::NoState);
    assert!(!a.iter().any(|x| matches!(
        x,
        ReceiverAction::OpenStaging { .. } | ReceiverAction::Install { .. }
    )));
    assert!(markers_of(&a)
        .iter()
        .any(|m| m.starts_with("flashd: error 11 no usable state dir")));
    rx.handle(ev(Message::Info));
    let m = frames_of(&drain_rx(&mut rx));
    let Message::InfoReply(r) = &m[0] else {
        panic!("{m:?}")
    };
    assert_eq!(r.device, "bad-name-");
}

#[test]
fn rewinding_below_a_verified_segment_forgets_its_verification() {
    let img = image();
    let mut rx = started(&img);
    let a = feed(&mut rx, &img, 1, 5);
    let ticket = a
        .iter()
        .find_map(|x| {
            if let ReceiverAction::VerifySegment { ticket, .. } = x {
                Some(*ticket)
            } else {
                None
            }
        })
        .unwrap();
    rx.handle(ReceiverEvent::SegmentVerified { ticket, ok: true });
    drain_rx(&mut rx);
    // nothing durable yet; a write fails → back to 0: the kernel must be verified again
    rx.handle(ReceiverEvent::ActionFailed {
        code: ErrorCode::Storage,
        text: "EIO".into(),
    });
    drain_rx(&mut rx);
    rx.handle(ReceiverEvent::LinkDown);
    rx.handle(ReceiverEvent::Frame(hello(&img, 2, true)));
    let r = reply_of(&drain_rx(&mut rx));
    assert_eq!((r.resume_seq, r.verified), (0, 0));
    let a = feed(&mut rx, &img, 1, 5);
    assert!(a
        .iter()
        .any(|x| matches!(x, ReceiverAction::VerifySegment { segment: 0, .. })));
}

/// The actions without the trust decision reports.
fn without_trust(a: Vec<ReceiverAction>) -> Vec<ReceiverAction> {
    a.into_iter()
        .filter(|x| !matches!(x, ReceiverAction::Report(ReceiverReport::Trusted { .. })))
        .collect()
}

fn floor(n: u64) -> TrustPolicy {
    TrustPolicy {
        keys: vec![],
        floor: n,
        broken: None,
    }
}

/// MCUboot's trap: an install started before the floor was raised must not complete (or
/// resume) after it. Every HELLO — fresh, resumed from memory, resumed from the journal — and
/// the install itself are checked against the floor in force at that moment.
#[test]
fn a_resumed_or_finishing_install_is_checked_against_the_current_floor() {
    let img = image(); // security_version 0
    let mut rx = started(&img);
    feed(&mut rx, &img, 1, 7);
    rx.handle(ReceiverEvent::StagingSynced { upto_seq: 3 });
    let j = drain_rx(&mut rx)
        .into_iter()
        .find_map(|x| match x {
            ReceiverAction::PersistJournal(j) => Some(j),
            _ => None,
        })
        .unwrap();

    // Link cut; meanwhile the device confirmed a slot with security version 1.
    rx.handle(ReceiverEvent::LinkDown);
    drain_rx(&mut rx);
    rx.set_trust(floor(1));
    rx.handle(ReceiverEvent::Frame(hello(&img, 2, true)));
    let a = drain_rx(&mut rx);
    assert_eq!(errors(&a)[0].code, ErrorCode::Rollback, "{a:?}");
    assert!(errors(&a)[0]
        .text
        .starts_with("refused image: image security version 0 is below"));
    assert!(markers_of(&a)
        .iter()
        .any(|m| m.starts_with("flashd: refused image: ")));
    assert!(!a.iter().any(|x| matches!(
        x,
        ReceiverAction::OpenStaging { .. } | ReceiverAction::WriteHead(_)
    )));

    // flashd restarted from the journal: refused too, nothing opened.
    let mut rx2 = Receiver::new(
        ReceiverConfig {
            trust: floor(1),
            ..rcfg()
        },
        Some(j),
        None,
    );
    rx2.handle(ReceiverEvent::Frame(hello(&img, 9, true)));
    let a = drain_rx(&mut rx2);
    assert_eq!(errors(&a)[0].code, ErrorCode::Rollback);
    assert!(!a.iter().any(|x| matches!(
        x,
        ReceiverAction::OpenStaging { .. } | ReceiverAction::WriteHead(_)
    )));

    // The floor rises while the last chunks are in flight: no install.
    let mut rx3 = started(&img);
    let mut all = complete(&img, &mut rx3);
    rx3.set_trust(floor(1));
    rx3.handle(ev(Message::Done(Done {
        image_sha256: img.manifest.image_sha256,
    })));
    all.extend(drain_rx(&mut rx3));
    assert!(!has_install(&all), "{all:?}");
    assert_eq!(errors(&all)[0].code, ErrorCode::Rollback);

    // With --allow-downgrade on an unprovisioned target the install goes on.
    let mut rx4 = Receiver::new(
        ReceiverConfig {
            trust: floor(1),
            ..rcfg()
        },
        None,
        None,
    );
    let mut m = Message::from_frame(&hello(&img, 5, true)).unwrap();
    if let Message::Hello(h) = &mut m {
        h.allow_downgrade = true;
    }
    rx4.handle(ev(m));
    let a = drain_rx(&mut rx4);
    assert!(errors(&a).is_empty(), "{a:?}");
    let r = reply_of(&a);
    assert!(r.unprovisioned);
}

#[test]
fn a_provisioned_target_says_so_in_its_reply() {
    let img = image();
    let seed = [5u8; 32];
    let sig = sign_manifest(&seed, &img.manifest.to_canonical_bytes());
    let head = ImageHead::build(&img.manifest, Some(sig))
        .unwrap()
        .to_bytes();
    let mut rx = Receiver::new(
        ReceiverConfig {
            trust: TrustPolicy {
                keys: vec![TrustedKey {
                    name: "release".into(),
                    key: public_key_of(&seed),
                    development: false,
                }],
                floor: 0,
                broken: None,
            },
            ..rcfg()
        },
        None,
        None,
    );
    let mut m = Message::from_frame(&hello(&img, 1, true)).unwrap();
    if let Message::Hello(h) = &mut m {
        h.head = Bytes::from(head);
    }
    rx.handle(ev(m));
    let a = drain_rx(&mut rx);
    assert!(!reply_of(&a).unprovisioned);
    assert!(a.iter().any(|x| matches!(
        x,
        ReceiverAction::Report(ReceiverReport::Trusted { key: Some(k), .. }) if k == "release"
    )));
}

/// Bytes `[at, end)` of `payload` as a WRITE_PART of `seq`.
fn part_of(seq: u32, payload: &Bytes, at: u32, end: u32) -> ReceiverEvent {
    ev(Message::WritePart(WritePart {
        seq,
        kind: WriteKind::Raw,
        total: payload.len() as u32,
        at,
        data: payload.slice(at as usize..end as usize),
    }))
}

#[test]
fn parts_past_a_hole_are_kept_and_acknowledged_selectively() {
    let img = image();
    let mut rx = started(&img);
    let w = write_msg(&img, 1);
    let payload = Message::Write(w).to_frame().unwrap().payload().clone();
    let total = payload.len() as u32;
    let pa = |have, gap, sack| {
        Message::PartAck(PartAck {
            seq: 1,
            have,
            gap,
            sack,
        })
    };
    rx.handle(part_of(1, &payload, 0, 1000));
    assert_eq!(frames_of(&drain_rx(&mut rx)), vec![pa(1000, false, None)]);
    // [1000, 2000) lost: the next parts are kept past the hole, each PART_ACK names the run
    rx.handle(part_of(1, &payload, 2000, 3000));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![pa(1000, true, Some((2000, 3000)))]
    );
    rx.handle(part_of(1, &payload, 3000, 4000));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![pa(1000, true, Some((2000, 4000)))]
    );
    // a second hole [4000, 5000): a second run
    rx.handle(part_of(1, &payload, 5000, 6000));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![pa(1000, true, Some((5000, 6000)))]
    );
    // a part already held: says what is held, nothing is written
    rx.handle(part_of(1, &payload, 2000, 3000));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![pa(1000, true, Some((2000, 4000)))]
    );
    // the first hole is filled: the prefix jumps over the first run
    rx.handle(part_of(1, &payload, 1000, 2000));
    assert_eq!(
        frames_of(&drain_rx(&mut rx)),
        vec![pa(4000, false, Some((5000, 6000)))]
    );
    rx.handle(part_of(1, &payload, 4000, 5000));
    assert_eq!(frames_of(&drain_rx(&mut rx)), vec![pa(6000, false, None)]);
    assert_eq!(rx.received(), 0);
    // the tail completes the WRITE: handled like a whole one (written, ACK)
    rx.handle(part_of(1, &payload, 6000, total));
    let a = drain_rx(&mut rx);
    assert_eq!(frames_of(&a), vec![Message::Ack(Ack { ack: 1 })]);
    let Some(ReceiverAction::Write { seq, body, .. }) = a.first() else {
        panic!("{a:?}")
    };
    assert_eq!(*seq, 1);
    assert_eq!(
        body,
        &write_msg(&img, 1).body,
        "reassembled out of order, intact"
    );
    assert_eq!(rx.received(), 1);
}

#[test]
fn held_runs_past_holes_are_bounded() {
    let img = image();
    let mut rx = started(&img);
    let payload = Message::Write(write_msg(&img, 1))
        .to_frame()
        .unwrap()
        .payload()
        .clone();
    // every other 16-byte part: each opens a run of its own
    let mut kept = 0;
    for i in 0..200u32 {
        let at = 32 + 32 * i;
        rx.handle(part_of(1, &payload, at, at + 16));
        let f = frames_of(&drain_rx(&mut rx));
        let Some(Message::PartAck(a)) = f.first() else {
            panic!("{f:?}")
        };
        assert_eq!(a.have, 0);
        if a.sack == Some((at, at + 16)) {
            kept += 1;
        }
    }
    assert!((16..200).contains(&kept), "kept {kept} runs");
    // a part extending a held run is still kept
    let last_kept = 32 + 32 * (kept - 1);
    rx.handle(part_of(1, &payload, last_kept + 16, last_kept + 32));
    let f = frames_of(&drain_rx(&mut rx));
    assert!(
        matches!(f.first(), Some(Message::PartAck(a)) if a.sack == Some((last_kept, last_kept + 32))),
        "{f:?}"
    );
}
