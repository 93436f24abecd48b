//! Sender transitions, one by one, against hand-made target replies.

use std::time::Duration;

use crate::support::*;
use bytes::Bytes;
use proto::frame::Frame;
use proto::msg::*;
use proto::session::*;

const MS: Duration = Duration::from_millis(1);

/// An image with two segments: 40 KiB dense "kernel", 64 KiB "rootfs" with a hole.
fn image() -> TestImage {
    let mut rng = Rng(7);
    let kernel = rng.bytes(40 * 1024);
    let mut rootfs = rng.bytes(64 * 1024);
    rootfs[16 * 1024..32 * 1024].fill(0);
    build_image("1", &[("kernel", kernel), ("rootfs", rootfs)])
}

fn cfg() -> SenderConfig {
    SenderConfig {
        nonce: 77,
        window: 4,
        chunk_size: 8192,
        compress: CompressMode::None,
        read_ahead: 2,
        rto: Duration::from_millis(100),
        adaptive_rto: false,
        max_retries: 3,
        ..SenderConfig::new("host-1")
    }
}

fn reply(window: u16, chunk: u32) -> HelloReply {
    HelloReply {
        unprovisioned: false,
        proto: PROTO_VERSION,
        nonce: 77,
        device: "dev".into(),
        info: "test".into(),
        window,
        chunk_size: chunk,
        compression: 0,
        already_installed: false,
        resumed: false,
        resume_seq: 0,
        verified: 0,
        index: vec![],
        base: None,
    }
}

fn frame(m: Message) -> SenderEvent {
    SenderEvent::Frame(m.to_frame().unwrap())
}

fn sent(actions: &[SenderAction]) -> Vec<Message> {
    actions
        .iter()
        .filter_map(|a| match a {
            SenderAction::Send(f) => Some(Message::from_frame(f).unwrap()),
            _ => None,
        })
        .collect()
}

fn write_seqs(actions: &[SenderAction]) -> Vec<u32> {
    sent(actions)
        .into_iter()
        .filter_map(|m| match m {
            Message::Write(w) => Some(w.seq),
            _ => None,
        })
        .collect()
}

/// (seq, offset in the WRITE payload, bytes) of every WRITE or WRITE_PART sent; a
/// whole WRITE is (seq, 0, None).
fn pieces(actions: &[SenderAction]) -> Vec<(u32, u32, Option<usize>)> {
    sent(actions)
        .into_iter()
        .filter_map(|m| match m {
            Message::Write(w) => Some((w.seq, 0, None)),
            Message::WritePart(p) => Some((p.seq, p.at, Some(p.data.len()))),
            _ => None,
        })
        .collect()
}

fn reads(actions: &[SenderAction]) -> Vec<(u32, u64, u32, bool)> {
    actions
        .iter()
        .filter_map(|a| match a {
            SenderAction::ReadChunk {
                seq,
                offset,
                len,
                hash,
            } => Some((*seq, *offset, *len, *hash)),
            _ => None,
        })
        .collect()
}

fn progress(actions: &[SenderAction]) -> Vec<ProgressEvent> {
    actions
        .iter()
        .filter_map(|a| match a {
            SenderAction::Progress(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// Answers every read in `actions` with the image bytes.
fn answer_reads(
    tx: &mut Sender,
    img: &TestImage,
    actions: &[SenderAction],
    now: Duration,
) -> Vec<SenderAction> {
    let mut out = Vec::new();
    for (seq, off, len, hash) in reads(actions) {
        let d = Bytes::copy_from_slice(&img.bytes[off as usize..(off + u64::from(len)) as usize]);
        let h = hash.then(|| chunk_hash(&d));
        tx.handle(
            now,
            SenderEvent::ChunkRead {
                seq,
                data: d,
                hash: h,
            },
        );
        out.extend(drain_tx(tx));
    }
    out
}

/// A sender past HELLO with the given reply, and the actions that produced.
fn negotiated(img: &TestImage, r: HelloReply, c: SenderConfig) -> (Sender, Vec<SenderAction>) {
    let mut tx = Sender::new(c, img.head.clone()).unwrap();
    tx.start(Duration::ZERO);
    drain_tx(&mut tx);
    tx.handle(MS, frame(Message::HelloReply(r)));
    let a = drain_tx(&mut tx);
    (tx, a)
}

#[test]
fn start_sends_hello_with_caps_and_head() {
    let img = image();
    let mut tx = Sender::new(cfg(), img.head.clone()).unwrap();
    tx.start(Duration::ZERO);
    let a = drain_tx(&mut tx);
    let m = sent(&a);
    assert_eq!(m.len(), 1);
    let Message::Hello(h) = &m[0] else {
        panic!("{m:?}")
    };
    assert_eq!(h.proto, 1);
    assert_eq!(h.host, "host-1");
    assert_eq!(
        (h.window, h.chunk_size, h.compression, h.skip),
        (4, 8192, 0, true)
    );
    assert_eq!(h.head, img.head);
    assert_eq!(tx.next_deadline(), Some(Duration::from_millis(100)));
}

#[test]
fn bad_head_or_config_is_refused_up_front() {
    let img = image();
    let mut head = img.head.to_vec();
    head[100] ^= 1;
    assert!(matches!(
        Sender::new(cfg(), Bytes::from(head)),
        Err(SessionError::BadImage(_))
    ));
    assert!(Sender::new(SenderConfig { window: 0, ..cfg() }, img.head.clone()).is_err());
    assert!(Sender::new(
        SenderConfig {
            chunk_size: 5000,
            ..cfg()
        },
        img.head.clone()
    )
    .is_err());
    assert!(Sender::new(
        SenderConfig {
            host: "a b".into(),
            ..cfg()
        },
        img.head.clone()
    )
    .is_err());
}

#[test]
fn hello_is_resent_on_timeout_then_gives_up() {
    let img = image();
    let mut tx = Sender::new(cfg(), img.head.clone()).unwrap();
    tx.start(Duration::ZERO);
    drain_tx(&mut tx);
    // too early: nothing
    tx.handle(Duration::from_millis(50), SenderEvent::Tick);
    assert!(drain_tx(&mut tx).is_empty());
    let mut t = Duration::ZERO;
    for _ in 0..3 {
        t = tx.next_deadline().unwrap();
        tx.handle(t, SenderEvent::Tick);
        let m = sent(&drain_tx(&mut tx));
        assert!(matches!(m.as_slice(), [Message::Hello(_)]));
    }
    tx.handle(t + Duration::from_secs(1), SenderEvent::Tick);
    let a = drain_tx(&mut tx);
    assert!(matches!(
        a.last(),
        Some(SenderAction::Failed(SessionError::Timeout { .. }))
    ));
    assert!(tx.is_over());
    assert_eq!(tx.next_deadline(), None);
}

#[test]
fn a_corrupt_hello_reported_by_nak_0_is_resent_at_once_once_per_transmission() {
    let img = image();
    let mut tx = Sender::new(cfg(), img.head.clone()).unwrap();
    tx.start(Duration::ZERO);
    drain_tx(&mut tx);
    let nak0 = || {
        frame(Message::Nak(Nak {
            seq: 0,
            reason: NakReason::Corrupt,
        }))
    };
    // Long before the first timeout (100 ms): the HELLO goes out again right away (the
    // report took 10 ms)...
    tx.handle(10 * MS, nak0());
    assert!(matches!(
        sent(&drain_tx(&mut tx)).as_slice(),
        [Message::Hello(_)]
    ));
    // ...a second report soon after is still about the first transmission...
    tx.handle(12 * MS, nak0());
    assert!(drain_tx(&mut tx).is_empty());
    // ...one a round trip after the resend reports the resend: it goes out again.
    tx.handle(20 * MS, nak0());
    assert!(matches!(
        sent(&drain_tx(&mut tx)).as_slice(),
        [Message::Hello(_)]
    ));
    // Each resend counts against the budget (max_retries 3): the third resend is the
    // last one, the next report fails the session.
    tx.handle(30 * MS, nak0());
    assert!(matches!(
        sent(&drain_tx(&mut tx)).as_slice(),
        [Message::Hello(_)]
    ));
    tx.handle(40 * MS, nak0());
    let a = drain_tx(&mut tx);
    assert!(
        matches!(
            a.last(),
            Some(SenderAction::Failed(SessionError::Timeout { .. }))
        ),
        "{a:?}"
    );
}

#[test]
fn stale_hello_reply_with_other_nonce_is_ignored() {
    let img = image();
    let mut tx = Sender::new(cfg(), img.head.clone()).unwrap();
    tx.start(Duration::ZERO);
    drain_tx(&mut tx);
    tx.handle(
        MS,
        frame(Message::HelloReply(HelloReply {
            nonce: 1,
            ..reply(4, 8192)
        })),
    );
    assert!(drain_tx(&mut tx).is_empty());
}

#[test]
fn reply_starts_plan_reads_and_reports_zero_runs() {
    let img = image();
    let (tx, a) = negotiated(&img, reply(4, 8192), cfg());
    let p = progress(&a);
    let ProgressEvent::Start {
        chunks,
        data_bytes,
        chunk_size,
        window,
        ..
    } = &p[0]
    else {
        panic!("{p:?}")
    };
    // kernel 40 KiB = 5 chunks; rootfs 64 KiB minus a 16 KiB hole = 6 chunks
    assert_eq!(
        (*chunks, *data_bytes, *chunk_size, *window),
        (11, 88 * 1024, 8192, 4)
    );
    assert!(p.contains(&ProgressEvent::Skipped {
        kind: SkipKind::Zero,
        bytes: 16 * 1024
    }));
    // window + read_ahead reads, nothing sent before data is there
    let r = reads(&a);
    assert_eq!(
        r.iter().map(|x| x.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(r[0].1, img.manifest.segments[0].offset);
    assert!(r.iter().all(|x| !x.3), "no hashing without a skip index");
    assert!(write_seqs(&a).is_empty());
    assert_eq!(tx.buffered_chunks(), 6);
    // the hole is not in the plan
    let plan = tx.plan().unwrap();
    let rootfs = &img.manifest.segments[1];
    assert!(plan
        .chunks_from(1)
        .filter(|c| c.segment == 1)
        .all(|c| c.rel_offset + u64::from(c.len) <= 16 * 1024 || c.rel_offset >= 32 * 1024));
    assert_eq!(rootfs.name, "rootfs");
}

#[test]
fn window_fills_then_waits_for_cumulative_ack() {
    let img = image();
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    let b = answer_reads(&mut tx, &img, &a, MS);
    assert_eq!(
        write_seqs(&b),
        vec![1, 2, 3, 4],
        "exactly one window in flight"
    );
    assert!(tx.next_deadline().is_some());
    // cumulative ACK of 3 frees three slots: three more reads and, once read, sends
    tx.handle(2 * MS, frame(Message::Ack(Ack { ack: 3 })));
    let c = drain_tx(&mut tx);
    assert_eq!(
        write_seqs(&c),
        vec![5, 6],
        "5 and 6 were read ahead; 7 needs its read"
    );
    assert_eq!(
        reads(&c).iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![7, 8, 9]
    );
    let p = progress(&c);
    assert!(matches!(&p[0], ProgressEvent::Progress { done_bytes, .. } if *done_bytes == 3 * 8192));
    let d = answer_reads(&mut tx, &img, &c, 2 * MS);
    assert_eq!(write_seqs(&d), vec![7], "window full again (4..=7)");
    assert!(tx.buffered_chunks() <= 6);
}

#[test]
fn duplicate_and_stale_acks_are_harmless_but_an_ack_of_unsent_data_fails() {
    let img = image();
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    answer_reads(&mut tx, &img, &a, MS);
    tx.handle(2 * MS, frame(Message::Ack(Ack { ack: 2 })));
    drain_tx(&mut tx);
    for stale in [0, 1, 2] {
        tx.handle(3 * MS, frame(Message::Ack(Ack { ack: stale })));
        assert!(drain_tx(&mut tx).is_empty(), "ack {stale}");
    }
    assert_eq!(tx.acked(), 2);
    tx.handle(4 * MS, frame(Message::Ack(Ack { ack: 99 })));
    let a = drain_tx(&mut tx);
    assert!(matches!(
        a.last(),
        Some(SenderAction::Failed(SessionError::Protocol(_)))
    ));
}

#[test]
fn nak_rewinds_to_the_named_seq() {
    let img = image();
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    answer_reads(&mut tx, &img, &a, MS);
    // NAK 3 = ACK 2 + resend from 3
    tx.handle(
        2 * MS,
        frame(Message::Nak(Nak {
            seq: 3,
            reason: NakReason::Gap,
        })),
    );
    let b = drain_tx(&mut tx);
    assert_eq!(tx.acked(), 2);
    assert!(progress(&b).contains(&ProgressEvent::Retransmit {
        from_seq: 3,
        reason: "nak".into()
    }));
    // The line corrupted something: half the frame size (4 KiB parts of chunk 3's
    // WRITE); the target reassembles one WRITE at a time, so parts of chunk 4 wait until
    // chunk 3 is acknowledged.
    assert_eq!(
        pieces(&b),
        vec![
            (3, 0, Some(4096)),
            (3, 4096, Some(4096)),
            (3, 8192, Some(19))
        ]
    );
    assert_eq!(tx.stats().retransmitted_frames, 3);
    // the target holds the first part: nothing new to send before chunk 3 is complete
    tx.handle(
        2 * MS,
        frame(Message::PartAck(PartAck {
            seq: 3,
            have: 4096,
            gap: false,
            sack: None,
        })),
    );
    let c = pieces(&drain_tx(&mut tx));
    assert!(c.is_empty(), "{c:?}");
    // a gap PART_ACK without a held run (a target without selective repeat dropped
    // the part) rewinds to the named byte of chunk 3
    tx.handle(
        2 * MS,
        frame(Message::PartAck(PartAck {
            seq: 3,
            have: 4096,
            gap: true,
            sack: None,
        })),
    );
    let d = drain_tx(&mut tx);
    assert_eq!(pieces(&d)[0].0, 3);
    assert_eq!(pieces(&d)[0].1, 4096);
    // a NAK for something never sent is a protocol error
    tx.handle(
        3 * MS,
        frame(Message::Nak(Nak {
            seq: 50,
            reason: NakReason::Gap,
        })),
    );
    assert!(matches!(
        drain_tx(&mut tx).last(),
        Some(SenderAction::Failed(_))
    ));
}

#[test]
fn the_timeout_follows_the_measured_round_trip() {
    let img = image();
    let c = SenderConfig {
        adaptive_rto: true,
        rto: Duration::from_secs(2),
        ..cfg()
    };
    let (mut tx, a) = negotiated(&img, reply(4, 8192), c);
    // HELLO → reply took 1 ms: the first timeout is already the floor, not 2 s
    assert_eq!(tx.srtt(), Some(MS));
    answer_reads(&mut tx, &img, &a, MS);
    let dl = tx.next_deadline().unwrap();
    assert_eq!(dl, MS + MIN_RTO);
    // a slow round trip (1.5 s for chunk 1) raises it, capped by `rto`
    tx.handle(1500 * MS, frame(Message::Ack(Ack { ack: 1 })));
    drain_tx(&mut tx);
    let dl = tx.next_deadline().unwrap() - 1500 * MS;
    assert!(
        dl > Duration::from_millis(500) && dl <= Duration::from_secs(2),
        "{dl:?}"
    );
    // with adaptation off it is always `rto`
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    answer_reads(&mut tx, &img, &a, MS);
    assert_eq!(tx.next_deadline().unwrap(), MS + Duration::from_millis(100));
}

#[test]
fn max_frame_cuts_parts_from_the_first_write_and_caps_their_growth() {
    let img = image();
    let c = SenderConfig {
        max_frame: Some(4096),
        ..cfg()
    };
    let (mut tx, a) = negotiated(&img, reply(4, 8192), c);
    let b = pieces(&answer_reads(&mut tx, &img, &a, MS));
    assert!(!b.is_empty());
    assert!(b.iter().all(|p| p.2.is_some_and(|n| n <= 4096)), "{b:?}");
    assert_eq!(b[0], (1, 0, Some(4096)));
    // a long clean run does not grow frames past the limit
    for ack in 1..=4u32 {
        tx.handle(2 * MS, frame(Message::Ack(Ack { ack })));
        let mut d = drain_tx(&mut tx);
        d.extend(answer_reads(&mut tx, &img, &d, 2 * MS));
        let p = pieces(&d);
        assert!(p.iter().all(|p| p.2.is_some_and(|n| n <= 4096)), "{p:?}");
    }
}

#[test]
fn a_part_lost_in_the_middle_of_a_write_is_resent_alone() {
    let img = image();
    let c = SenderConfig {
        max_frame: Some(1024),
        ..cfg()
    };
    let (mut tx, a) = negotiated(&img, reply(4, 8192), c);
    let b = pieces(&answer_reads(&mut tx, &img, &a, MS));
    // chunk 1's WRITE (8211 bytes) in 9 parts, then nothing of chunk 2 before it is done
    assert_eq!(b.len(), 9, "{b:?}");
    assert!(b.iter().all(|p| p.0 == 1), "{b:?}");
    let part_ack = |have, gap, sack| {
        frame(Message::PartAck(PartAck {
            seq: 1,
            have,
            gap,
            sack,
        }))
    };
    tx.handle(2 * MS, part_ack(1024, false, None));
    assert!(pieces(&drain_tx(&mut tx)).is_empty());
    // [1024, 2048) was lost: the part after it is held past the hole
    tx.handle(2 * MS, part_ack(1024, true, Some((2048, 3072))));
    let d = drain_tx(&mut tx);
    assert_eq!(
        pieces(&d),
        vec![(1, 1024, Some(1024))],
        "only the hole again"
    );
    assert_eq!(tx.stats().retransmitted_frames, 1);
    // the parts sent before the resend arrive: nothing else is resent
    for end in (4096..=8192).step_by(1024) {
        tx.handle(2 * MS, part_ack(1024, true, Some((2048, end))));
        assert!(pieces(&drain_tx(&mut tx)).is_empty(), "at {end}");
    }
    tx.handle(2 * MS, part_ack(1024, true, Some((2048, 8211))));
    assert!(pieces(&drain_tx(&mut tx)).is_empty());
    // the resent part fills the hole: the WRITE is complete, chunk 2 goes out
    tx.handle(3 * MS, frame(Message::Ack(Ack { ack: 1 })));
    let e = pieces(&drain_tx(&mut tx));
    assert!(!e.is_empty() && e.iter().all(|p| p.0 == 2), "{e:?}");
    assert_eq!(tx.stats().retransmitted_frames, 1);
    // 8211 bytes of chunk 1 in 10 frames: one part resent, nothing else
    let resent_bytes: usize = pieces(&d).iter().filter_map(|p| p.2).sum();
    assert_eq!(resent_bytes, 1024);
}

#[test]
fn a_lost_resend_is_resent_once_a_later_part_shows_it() {
    let img = image();
    let c = SenderConfig {
        max_frame: Some(1024),
        ..cfg()
    };
    let (mut tx, a) = negotiated(&img, reply(4, 8192), c);
    answer_reads(&mut tx, &img, &a, MS);
    let part_ack = |have, sack: Option<(u32, u32)>| {
        frame(Message::PartAck(PartAck {
            seq: 1,
            have,
            gap: sack.is_some(),
            sack,
        }))
    };
    // parts 0 and 1 arrive, part 2 ([2048, 3072)) is lost, part 3 shows it
    tx.handle(2 * MS, part_ack(2048, None));
    tx.handle(2 * MS, part_ack(2048, Some((3072, 4096))));
    assert_eq!(pieces(&drain_tx(&mut tx)), vec![(1, 2048, Some(1024))]);
    // the rest of the first transmission arrives; the resend (sent after all of it) is lost
    // too: only the tail loss probe after a corrupt-frame NAK shows that
    tx.handle(2 * MS, part_ack(2048, Some((3072, 8211))));
    assert!(pieces(&drain_tx(&mut tx)).is_empty());
    tx.handle(
        3 * MS,
        frame(Message::Nak(Nak {
            seq: 1,
            reason: NakReason::Corrupt,
        })),
    );
    assert_eq!(pieces(&drain_tx(&mut tx)), vec![(1, 2048, Some(1024))]);
    assert_eq!(tx.stats().retransmitted_frames, 2);
}

#[test]
fn draining_restarts_the_timer_instead_of_resending() {
    let img = image();
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    answer_reads(&mut tx, &img, &a, MS);
    let dl = tx.next_deadline().unwrap();
    // the shell is still writing the window to a slow line: not a timeout
    tx.handle(dl, SenderEvent::Draining);
    let b = drain_tx(&mut tx);
    assert!(write_seqs(&b).is_empty(), "nothing resent while draining");
    assert!(!progress(&b)
        .iter()
        .any(|p| matches!(p, ProgressEvent::Retransmit { .. })));
    let dl2 = tx.next_deadline().unwrap();
    assert_eq!(dl2, dl + Duration::from_millis(100));
    // once it is out, silence is a timeout again
    tx.handle(dl2, SenderEvent::Tick);
    assert!(
        progress(&drain_tx(&mut tx)).contains(&ProgressEvent::Retransmit {
            from_seq: 1,
            reason: "timeout".into()
        })
    );
}

#[test]
fn stale_nak_does_not_rewind() {
    let img = image();
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    answer_reads(&mut tx, &img, &a, MS);
    tx.handle(2 * MS, frame(Message::Ack(Ack { ack: 3 })));
    let b = drain_tx(&mut tx);
    answer_reads(&mut tx, &img, &b, 2 * MS);
    tx.handle(
        3 * MS,
        frame(Message::Nak(Nak {
            seq: 2,
            reason: NakReason::Corrupt,
        })),
    );
    assert!(write_seqs(&drain_tx(&mut tx)).is_empty());
}

#[test]
fn timeout_rewinds_to_last_acked_and_resends_the_window() {
    let img = image();
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    answer_reads(&mut tx, &img, &a, MS);
    tx.handle(2 * MS, frame(Message::Ack(Ack { ack: 1 })));
    drain_tx(&mut tx); // sends 5
    let dl = tx.next_deadline().unwrap();
    assert_eq!(
        dl,
        2 * MS + Duration::from_millis(100),
        "deadline restarts on progress"
    );
    tx.handle(dl, SenderEvent::Tick);
    let b = drain_tx(&mut tx);
    // a timeout quarters the frame size (2 KiB parts) and halves the window (2 chunks'
    // worth of parts); parts of chunk 3 wait until chunk 2 is acknowledged (the target
    // reassembles one WRITE at a time)
    assert_eq!(
        pieces(&b),
        vec![
            (2, 0, Some(2048)),
            (2, 2048, Some(2048)),
            (2, 4096, Some(2048)),
            (2, 6144, Some(2048)),
            (2, 8192, Some(19))
        ]
    );
    assert!(progress(&b).contains(&ProgressEvent::Retransmit {
        from_seq: 2,
        reason: "timeout".into()
    }));
    // repeated timeouts without progress give up, resumably
    for _ in 0..3 {
        let dl = tx.next_deadline().unwrap();
        tx.handle(dl, SenderEvent::Tick);
    }
    let c = drain_tx(&mut tx);
    assert!(matches!(
        c.last(),
        Some(SenderAction::Failed(SessionError::Timeout { .. }))
    ));
    let ProgressEvent::Error { code, .. } = progress(&c).last().unwrap().clone() else {
        panic!()
    };
    assert_eq!(code, ErrorCode::Timeout.code());
}

#[test]
fn reads_may_complete_out_of_order_but_frames_go_in_order() {
    let img = image();
    let (mut tx, a) = negotiated(&img, reply(4, 8192), cfg());
    let mut r = reads(&a);
    r.reverse();
    let mut seqs = Vec::new();
    for (seq, off, len, _) in r {
        let d = Bytes::copy_from_slice(&img.bytes[off as usize..(off + u64::from(len)) as usize]);
        tx.handle(
            MS,
            SenderEvent::ChunkRead {
                seq,
                data: d,
                hash: None,
            },
        );
        seqs.extend(write_seqs(&drain_tx(&mut tx)));
    }
    assert_eq!(seqs, vec![1, 2, 3, 4]);
}

#[test]
fn short_read_fails_with_a_clear_error() {
    let img = image();
    let (mut tx, _) = negotiated(&img, reply(4, 8192), cfg());
    tx.handle(
        MS,
        SenderEvent::ChunkRead {
            seq: 1,
            data: Bytes::from_static(b"abc"),
            hash: None,
        },
    );
    let a = drain_tx(&mut tx);
    let Some(SenderAction::Failed(e)) = a.last() else {
        panic!("{a:?}")
    };
    assert!(e.to_string().contains("expected 8192 bytes"), "{e}");
}

#[test]
fn resume_point_skips_what_the_target_holds() {
    let img = image();
    let r = HelloReply {
        resume_seq: 7,
        resumed: true,
        verified: 0b1,
        ..reply(4, 8192)
    };
    let (mut tx, a) = negotiated(&img, r, cfg());
    let p = progress(&a);
    let plan = tx.plan().unwrap().clone();
    let c8 = plan.chunk(8).unwrap();
    assert!(p.contains(&ProgressEvent::Resumed {
        seq: 8,
        at_offset: c8.offset,
        done_bytes: 7 * 8192
    }));
    assert!(p.contains(&ProgressEvent::SegmentVerified {
        segment: "kernel".into()
    }));
    assert_eq!(reads(&a)[0].0, 8);
    let b = answer_reads(&mut tx, &img, &a, MS);
    assert_eq!(write_seqs(&b), vec![8, 9, 10, 11]);
    assert_eq!(tx.stats().resumed_bytes, 7 * 8192);
}

#[test]
fn resume_at_the_end_sends_done_directly() {
    let img = image();
    let r = HelloReply {
        resume_seq: 11,
        resumed: true,
        ..reply(4, 8192)
    };
    let (_, a) = negotiated(&img, r, cfg());
    let m = sent(&a);
    assert!(
        matches!(m.as_slice(), [Message::Done(d)] if d.image_sha256 == img.manifest.image_sha256)
    );
}

#[test]
fn resume_beyond_the_plan_is_a_protocol_error() {
    let img = image();
    let (_, a) = negotiated(
        &img,
        HelloReply {
            resume_seq: 12,
            ..reply(4, 8192)
        },
        cfg(),
    );
    assert!(matches!(
        a.last(),
        Some(SenderAction::Failed(SessionError::Protocol(_)))
    ));
}

#[test]
fn reply_above_the_offer_is_refused() {
    let img = image();
    let (_, a) = negotiated(&img, reply(8, 8192), cfg());
    assert!(matches!(
        a.last(),
        Some(SenderAction::Failed(SessionError::Protocol(_)))
    ));
    let (_, a) = negotiated(&img, reply(4, 16384), cfg());
    assert!(matches!(
        a.last(),
        Some(SenderAction::Failed(SessionError::Protocol(_)))
    ));
    let (_, a) = negotiated(
        &img,
        HelloReply {
            compression: COMPRESS_ZSTD,
            ..reply(4, 8192)
        },
        cfg(),
    );
    assert!(matches!(
        a.last(),
        Some(SenderAction::Failed(SessionError::Protocol(_)))
    ));
}

#[test]
fn identical_chunks_become_copy_writes() {
    let img = image();
    // The target holds chunk 2 of the kernel somewhere else in its installed image.
    let c2 = {
        let p = Plan::new(&img.manifest, 8192).unwrap();
        p.chunk(2).unwrap()
    };
    let data = &img.bytes[c2.offset as usize..c2.offset as usize + c2.len as usize];
    let r = HelloReply {
        index: vec![IndexEntry {
            offset: 999_424,
            len: c2.len,
            hash: chunk_hash(data),
        }],
        ..reply(4, 8192)
    };
    let (mut tx, a) = negotiated(&img, r, cfg());
    assert!(
        reads(&a).iter().all(|x| x.3),
        "hash requested when an index exists"
    );
    let b = answer_reads(&mut tx, &img, &a, MS);
    let writes: Vec<Write> = sent(&b)
        .into_iter()
        .filter_map(|m| {
            if let Message::Write(w) = m {
                Some(w)
            } else {
                None
            }
        })
        .collect();
    assert!(matches!(writes[0].body, WriteBody::Raw(_)));
    assert_eq!(
        writes[1].body,
        WriteBody::Copy {
            src_offset: 999_424,
            hash: chunk_hash(data)
        }
    );
    assert!(progress(&b).contains(&ProgressEvent::Skipped {
        kind: SkipKind::Identical,
        bytes: 8192
    }));
    assert_eq!(tx.stats().identical_bytes, 8192);
}

#[test]
fn no_skip_ignores_the_index() {
    let img = image();
    let c1 = Plan::new(&img.manifest, 8192).unwrap().chunk(1).unwrap();
    let data = &img.bytes[c1.offset as usize..c1.offset as usize + c1.len as usize];
    let r = HelloReply {
        index: vec![IndexEntry {
            offset: 0,
            len: c1.len,
            hash: chunk_hash(data),
        }],
        ..reply(4, 8192)
    };
    let (mut tx, a) = negotiated(
        &img,
        r,
        SenderConfig {
            skip: false,
            ..cfg()
        },
    );
    let b = answer_reads(&mut tx, &img, &a, MS);
    assert!(sent(&b).iter().all(|m| matches!(
        m,
        Message::Write(Write {
            body: WriteBody::Raw(_),
            ..
        })
    )));
}

#[test]
fn already_installed_short_circuits_to_done_and_unchanged() {
    let img = image();
    let (mut tx, a) = negotiated(
        &img,
        HelloReply {
            already_installed: true,
            ..reply(4, 8192)
        },
        cfg(),
    );
    assert!(reads(&a).is_empty());
    assert!(matches!(sent(&a).as_slice(), [Message::Done(_)]));
    assert!(progress(&a).contains(&ProgressEvent::Skipped {
        kind: SkipKind::Identical,
        bytes: 88 * 1024
    }));
    tx.handle(
        2 * MS,
        frame(Message::DoneReply(DoneReply {
            status: DoneStatus::Unchanged,
            image_sha256: img.manifest.image_sha256,
        })),
    );
    let b = drain_tx(&mut tx);
    let Some(SenderAction::Finished(o)) = b.last() else {
        panic!("{b:?}")
    };
    assert_eq!(o.status, DoneStatus::Unchanged);
    assert!(tx.is_over());
}

#[test]
fn compression_is_used_only_when_it_helps() {
    let img = image();
    let c = SenderConfig {
        compress: CompressMode::Auto,
        ..cfg()
    };
    let r = HelloReply {
        compression: COMPRESS_ZSTD,
        ..reply(4, 8192)
    };
    let (mut tx, a) = negotiated(&img, r, c);
    let rd = reads(&a);
    let (s1, o1, l1, _) = rd[0];
    let (s2, o2, l2, _) = rd[1];
    tx.handle(
        MS,
        SenderEvent::ChunkRead {
            seq: s1,
            data: Bytes::copy_from_slice(&img.bytes[o1 as usize..(o1 + u64::from(l1)) as usize]),
            hash: None,
        },
    );
    let b = drain_tx(&mut tx);
    let Some(SenderAction::Compress { seq, data, .. }) = b.first() else {
        panic!("{b:?}")
    };
    assert_eq!((*seq, data.len()), (1, 8192));
    tx.handle(
        MS,
        SenderEvent::Compressed {
            seq: 1,
            body: Some(WriteBody::Zstd(Bytes::from(vec![1u8; 100]))),
        },
    );
    let c = drain_tx(&mut tx);
    let w = sent(&c);
    assert!(
        matches!(&w[0], Message::Write(Write { body: WriteBody::Zstd(d), len: 8192, .. }) if d.len() == 100)
    );
    assert!(progress(&c).contains(&ProgressEvent::Skipped {
        kind: SkipKind::Compressed,
        bytes: 8092
    }));
    // "auto": barely smaller is not worth it → raw
    tx.handle(
        MS,
        SenderEvent::ChunkRead {
            seq: s2,
            data: Bytes::copy_from_slice(&img.bytes[o2 as usize..(o2 + u64::from(l2)) as usize]),
            hash: None,
        },
    );
    drain_tx(&mut tx);
    tx.handle(
        MS,
        SenderEvent::Compressed {
            seq: 2,
            body: Some(WriteBody::Zstd(Bytes::from(vec![1u8; 8000]))),
        },
    );
    let d = sent(&drain_tx(&mut tx));
    assert!(matches!(
        &d[0],
        Message::Write(Write {
            body: WriteBody::Raw(_),
            ..
        })
    ));
}

#[test]
fn zstd_required_but_unsupported_fails_with_capability() {
    let img = image();
    let (_, a) = negotiated(
        &img,
        reply(4, 8192),
        SenderConfig {
            compress: CompressMode::Zstd,
            ..cfg()
        },
    );
    let Some(SenderAction::Failed(e)) = a.last() else {
        panic!()
    };
    assert_eq!(e.code(), ErrorCode::Capability);
}

#[test]
fn all_zero_chunk_inside_a_data_range_is_sent_as_a_zero_write() {
    let img = image();
    let (mut tx, _) = negotiated(&img, reply(4, 8192), cfg());
    tx.handle(
        MS,
        SenderEvent::ChunkRead {
            seq: 1,
            data: Bytes::from(vec![0u8; 8192]),
            hash: None,
        },
    );
    let a = drain_tx(&mut tx);
    assert!(matches!(
        &sent(&a)[0],
        Message::Write(Write {
            body: WriteBody::Zero,
            ..
        })
    ));
}

#[test]
fn done_waits_through_pending_and_finishes_on_installed() {
    let img = image();
    let (mut tx, a) = negotiated(
        &img,
        reply(16, 8192),
        SenderConfig {
            window: 16,
            ..cfg()
        },
    );
    let mut acts = a;
    let mut t = MS;
    // feed reads until everything is sent, then ack it all
    loop {
        let b = answer_reads(&mut tx, &img, &acts, t);
        if reads(&b).is_empty() {
            break;
        }
        acts = b;
    }
    tx.handle(t, frame(Message::Ack(Ack { ack: 11 })));
    let b = drain_tx(&mut tx);
    assert!(matches!(sent(&b).last(), Some(Message::Done(_))));
    // DONE is resent on timeout; PENDING resets the retry budget
    for _ in 0..10 {
        t = tx.next_deadline().unwrap();
        tx.handle(t, SenderEvent::Tick);
        assert!(matches!(
            sent(&drain_tx(&mut tx)).as_slice(),
            [Message::Done(_)]
        ));
        tx.handle(
            t,
            frame(Message::DoneReply(DoneReply {
                status: DoneStatus::Pending,
                image_sha256: img.manifest.image_sha256,
            })),
        );
        assert!(drain_tx(&mut tx).is_empty());
    }
    tx.handle(
        t,
        frame(Message::Verified(Verified {
            segment: "rootfs".into(),
        })),
    );
    assert_eq!(
        progress(&drain_tx(&mut tx)),
        vec![ProgressEvent::SegmentVerified {
            segment: "rootfs".into()
        }]
    );
    tx.handle(
        t,
        frame(Message::DoneReply(DoneReply {
            status: DoneStatus::Installed,
            image_sha256: img.manifest.image_sha256,
        })),
    );
    let c = drain_tx(&mut tx);
    let Some(SenderAction::Finished(o)) = c.last() else {
        panic!("{c:?}")
    };
    assert_eq!(o.status, DoneStatus::Installed);
    assert_eq!(o.stats.data_bytes, 88 * 1024);
    assert!(matches!(
        progress(&c).last(),
        Some(ProgressEvent::Done {
            unchanged: false,
            ..
        })
    ));
    // NDJSON form of a progress event
    let j = serde_json::to_string(&progress(&c)[0]).unwrap();
    assert!(j.starts_with("{\"event\":\"done\""), "{j}");
}

#[test]
fn remote_error_fails_with_its_code() {
    let img = image();
    let (mut tx, _) = negotiated(&img, reply(4, 8192), cfg());
    tx.handle(
        MS,
        frame(Message::Error(ErrorMsg::new(
            ErrorCode::VerifyFailed,
            "verify failed seg=rootfs",
        ))),
    );
    let a = drain_tx(&mut tx);
    let Some(SenderAction::Failed(SessionError::Remote { code, text })) = a.last() else {
        panic!()
    };
    assert_eq!(*code, ErrorCode::VerifyFailed);
    assert_eq!(text, "verify failed seg=rootfs");
}

#[test]
fn abort_sends_abort_and_fails_resumably() {
    let img = image();
    let (mut tx, _) = negotiated(&img, reply(4, 8192), cfg());
    tx.abort("interrupted by Ctrl-C");
    let a = drain_tx(&mut tx);
    assert!(matches!(sent(&a).as_slice(), [Message::Abort(ab)] if ab.code == ErrorCode::Aborted));
    let Some(SenderAction::Failed(e)) = a.last() else {
        panic!()
    };
    assert!(e.to_string().contains("resumable"), "{e}");
    // events after the end are ignored
    tx.handle(MS, SenderEvent::Tick);
    assert!(drain_tx(&mut tx).is_empty());
}

#[test]
fn undecodable_frame_from_target_fails() {
    let img = image();
    let (mut tx, _) = negotiated(&img, reply(4, 8192), cfg());
    tx.handle(
        MS,
        SenderEvent::Frame(Frame::new(0x11, 0, 0, Bytes::from_static(b"x")).unwrap()),
    );
    assert!(matches!(
        drain_tx(&mut tx).last(),
        Some(SenderAction::Failed(SessionError::Protocol(_)))
    ));
}

#[test]
fn a_late_identification_reply_is_ignored() {
    let img = image();
    let (mut tx, _) = negotiated(&img, reply(4, 8192), cfg());
    let late = proto::ident::reply_frame(proto::ident::Daemon::Flashd).unwrap();
    tx.handle(MS, SenderEvent::Frame(late));
    assert!(
        !drain_tx(&mut tx)
            .iter()
            .any(|a| matches!(a, SenderAction::Failed(_))),
        "a late probe reply ended the session"
    );
}
