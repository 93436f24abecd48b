//! Deterministic seed inputs per target, built from real traffic and real encodings, so a
//! campaign starts from inputs that reach deep into each parser. `cargo xtask fuzz --seed`
//! writes them to `fuzz/corpus/<target>/seed-*`.

use bootctld::machine::BootState;
use proto::frame::Frame;

/// Every frame of one honest session (both directions), for the frame and msg seeds.
fn session_frames() -> Vec<Frame> {
    let mut frames = crate::receiver::honest_frames();
    frames.extend(part_frames());
    frames
}

/// A WRITE sent in parts (a noisy line) and the target's PART_ACKs: the honest session
/// runs on a clean link, so these messages are added explicitly.
fn part_frames() -> Vec<Frame> {
    use proto::msg::{Message, PartAck, Write, WriteBody, WriteKind, WritePart};
    let w = Message::Write(Write {
        seq: 1,
        segment: "rootfs".into(),
        offset: 0,
        len: 600,
        body: WriteBody::Raw(bytes::Bytes::from(vec![0x5a; 600])),
    });
    let Ok(whole) = w.to_frame() else {
        return Vec::new();
    };
    let payload = whole.payload().clone();
    let total = payload.len() as u32;
    let mut out = Vec::new();
    for at in (0..total).step_by(256) {
        let end = (at + 256).min(total);
        let part = Message::WritePart(WritePart {
            seq: 1,
            kind: WriteKind::Raw,
            total,
            at,
            data: payload.slice(at as usize..end as usize),
        });
        let ack = Message::PartAck(PartAck {
            seq: 1,
            have: end.min(total - 1),
            gap: at == 256,
            // a selective acknowledgement: a run held past the hole
            sack: (at == 256).then_some((end + 256, end + 512)),
        });
        out.extend(part.to_frame().ok());
        out.extend(ack.to_frame().ok());
    }
    out
}

/// The head of a signed format-3 image with a security version and a dm-verity entry.
fn verity_head() -> Vec<u8> {
    let rootfs: Vec<u8> = (0..3 * 4096u32).map(|i| (i % 249) as u8).collect();
    let tree = proto::verity::tree(b"seed", &rootfs);
    let digest = |b: &[u8]| {
        let mut h = proto::manifest::SegmentHasher::new();
        h.update(b);
        h.finish()
    };
    let m = proto::image::layout_with(
        &proto::image::LayoutOptions {
            version: "3".into(),
            security_version: 5,
            verity: vec![proto::manifest::Verity {
                data: "rootfs".into(),
                hash: "rootfs-verity".into(),
                salt: b"seed".to_vec(),
                root_hash: tree.root_hash,
            }],
        },
        &[
            ("rootfs".to_string(), digest(&rootfs)),
            ("rootfs-verity".to_string(), digest(&tree.bytes)),
        ],
    );
    m.and_then(|m| {
        let sig = proto::image::sign_manifest(&[9u8; 32], &m.to_canonical_bytes());
        proto::image::ImageHead::build(&m, Some(sig))
    })
    .map(|h| h.to_bytes())
    .unwrap_or_default()
}

/// The seeds of target `name` (empty for an unknown name).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "frame" => {
            let frames = session_frames();
            let mut all = vec![1u8];
            for f in &frames {
                all.extend_from_slice(&f.to_bytes());
            }
            let mut garbage = vec![7u8, 0, 1, 2];
            garbage.extend_from_slice(b"NXFR");
            garbage.extend(
                frames
                    .first()
                    .map(|f| f.to_bytes().to_vec())
                    .unwrap_or_default(),
            );
            vec![all, garbage]
        }
        "msg" => session_frames()
            .iter()
            .map(|f| {
                let mut v = vec![f.msg_type(), f.seq() as u8];
                v.extend_from_slice(f.payload());
                v
            })
            .collect(),
        "image" => {
            let head = crate::receiver::fuzz_head();
            let manifest = proto::image::ImageHead::parse(&head)
                .map(|h| h.manifest.to_canonical_bytes())
                .unwrap_or_default();
            vec![head.to_vec(), manifest, verity_head()]
        }
        "receiver" => vec![
            // Defaults, deliver everything.
            [vec![0, 0, 0], vec![0u8; 400]].concat(),
            // Bigger chunks and window, a drop, a duplicate, time passing, then delivery.
            [vec![4, 7, 2], vec![0, 5, 0, 6, 11, 40, 0], vec![0u8; 400]].concat(),
            // A cut link after a few frames, then the resumed session.
            [vec![1, 3, 1], vec![0, 0, 0, 10], vec![0u8; 400]].concat(),
            // Below the floor: refused; the same with --allow-downgrade: taken.
            [vec![0x20, 0, 0], vec![0u8; 400]].concat(),
            [vec![0x30, 0, 0], vec![0u8; 400]].concat(),
            // A provisioned target and an unsigned image: refused at HELLO.
            [vec![0x40, 0, 0], vec![0u8; 400]].concat(),
        ],
        "snapshot" => {
            let s = BootState::factory_default();
            vec![bootctld::snapshot::encode(&s)]
        }
        _ => Vec::new(),
    }
}
