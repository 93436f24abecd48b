//! Deterministic seed inputs per target, built from real traffic and real encodings, so a
//! campaign starts from inputs that reach deep into each parser. `cargo xtask fuzz --seed`
//! writes them to `fuzz/corpus/<target>/seed-*`.

use bootctld::machine::BootState;
use proto::frame::Frame;

/// Every frame of one honest session (both directions), for the frame and msg seeds.
fn session_frames() -> Vec<Frame> {
    crate::receiver::honest_frames()
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
            vec![head.to_vec(), manifest]
        }
        "receiver" => vec![
            // Defaults, deliver everything.
            [vec![0, 0, 0], vec![0u8; 400]].concat(),
            // Bigger chunks and window, a drop, a duplicate, time passing, then delivery.
            [vec![4, 7, 2], vec![0, 5, 0, 6, 11, 40, 0], vec![0u8; 400]].concat(),
            // A cut link after a few frames, then the resumed session.
            [vec![1, 3, 1], vec![0, 0, 0, 10], vec![0u8; 400]].concat(),
        ],
        "snapshot" => {
            let s = BootState::factory_default();
            vec![bootctld::snapshot::encode(&s)]
        }
        _ => Vec::new(),
    }
}
