#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The chunk plan against a brute-force model, and the skip index.

use proptest::prelude::*;
use proto::manifest::{image_sha256, DataRange, Manifest, Segment, ALIGN, FORMAT_VERSION};
use proto::session::{Plan, PlanError, SkipIndex};

/// Brute force: walk every data byte, cut at multiples of the chunk size.
fn model(m: &Manifest, c: u64) -> Vec<(usize, u64, u64)> {
    let mut out: Vec<(usize, u64, u64)> = Vec::new();
    for (si, s) in m.segments.iter().enumerate() {
        for r in &s.data_ranges {
            let mut o = r.offset;
            while o < r.end().min(s.size) {
                let end = ((o / c + 1) * c).min(r.end()).min(s.size);
                out.push((si, o, end - o));
                o = end;
            }
        }
    }
    out
}

fn manifest(segs: Vec<(u64, Vec<(u64, u64)>)>) -> Manifest {
    let mut offset = 8192u64;
    let mut segments = Vec::new();
    for (i, (blocks, ranges)) in segs.into_iter().enumerate() {
        let size = blocks * ALIGN - 100; // the last block is short
        let data_ranges = ranges
            .into_iter()
            .map(|(a, n)| DataRange {
                offset: a * ALIGN,
                len: (n * ALIGN).min(size - a * ALIGN),
            })
            .collect();
        segments.push(Segment {
            name: format!("s{i}"),
            offset,
            size,
            sha256: [i as u8; 32],
            data_sha256: [!(i as u8); 32],
            chunk_sha256: Vec::new(),
            data_ranges,
        });
        offset += blocks * ALIGN;
    }
    Manifest {
        format: FORMAT_VERSION,
        version: "1".into(),
        security_version: 0,
        verity: Vec::new(),
        total_size: offset,
        image_sha256: image_sha256(&segments),
        segments,
    }
}

fn arb_manifest() -> impl Strategy<Value = Manifest> {
    proptest::collection::vec(
        (1u64..64).prop_flat_map(|blocks| {
            // disjoint, sorted, non-adjacent ranges of whole blocks
            proptest::collection::vec(any::<bool>(), blocks as usize).prop_map(move |bits| {
                let mut ranges = Vec::new();
                let mut i = 0u64;
                while i < blocks {
                    if bits[i as usize] {
                        let start = i;
                        while i < blocks && bits[i as usize] {
                            i += 1;
                        }
                        ranges.push((start, i - start));
                    }
                    i += 1;
                }
                (blocks, ranges)
            })
        }),
        1..6,
    )
    .prop_map(manifest)
}

proptest! {
    #[test]
    fn plan_matches_brute_force(m in arb_manifest(), shift in 12u32..=16) {
        let c = 1u32 << shift;
        let plan = Plan::new(&m, c).unwrap();
        let want = model(&m, u64::from(c));
        prop_assert_eq!(plan.total() as usize, want.len());
        let mut done = 0u64;
        for (i, (si, rel, len)) in want.iter().enumerate() {
            let seq = i as u32 + 1;
            let ch = plan.chunk(seq).unwrap();
            prop_assert_eq!((ch.seq, ch.segment, ch.rel_offset, u64::from(ch.len)), (seq, *si, *rel, *len));
            prop_assert_eq!(ch.offset, m.segments[*si].offset + rel);
            done += len;
            prop_assert_eq!(plan.bytes_done(seq), done);
        }
        prop_assert!(plan.chunk(0).is_none());
        prop_assert!(plan.chunk(plan.total() + 1).is_none());
        prop_assert_eq!(plan.data_bytes(), done);
        prop_assert_eq!(plan.chunks_from(1).count(), want.len());
        for si in 0..m.segments.len() {
            let (first, count) = plan.segment_chunks(si).unwrap();
            let n = want.iter().filter(|w| w.0 == si).count() as u32;
            prop_assert_eq!(count, n);
            prop_assert!(plan.segment_complete(si, first + count));
            if count > 0 {
                prop_assert!(!plan.segment_complete(si, first + count - 1));
            }
        }
    }
}

#[test]
fn bad_chunk_sizes_are_refused() {
    let m = manifest(vec![(4, vec![(0, 4)])]);
    for c in [0, 2048, 5000, 1 << 21] {
        assert_eq!(Plan::new(&m, c).unwrap_err(), PlanError::ChunkSize(c));
    }
}

#[test]
fn skip_index_hashes_each_planned_chunk_and_serialises() {
    let m = manifest(vec![(8, vec![(1, 3), (6, 2)])]);
    let plan = Plan::new(&m, 8192).unwrap();
    let img: Vec<u8> = (0..m.total_size).map(|i| (i % 251) as u8).collect();
    let ix = SkipIndex::build(&m, &plan, |o, l| {
        Ok::<_, ()>(img[o as usize..(o + u64::from(l)) as usize].to_vec())
    })
    .unwrap();
    assert_eq!(ix.entries.len(), plan.total() as usize);
    assert_eq!(ix.image_id, m.id());
    for (e, c) in ix.entries.iter().zip(plan.chunks_from(1)) {
        assert_eq!((e.offset, e.len), (c.offset, c.len));
        assert_eq!(
            e.hash,
            proto::msg::chunk_hash(&img[c.offset as usize..(c.offset + u64::from(c.len)) as usize])
        );
    }
    let j = serde_json::to_string(&ix).unwrap();
    assert_eq!(serde_json::from_str::<SkipIndex>(&j).unwrap(), ix);
    // a read error propagates
    assert_eq!(
        SkipIndex::build(&m, &plan, |_, _| Err::<Vec<u8>, _>("io")),
        Err("io")
    );
}
