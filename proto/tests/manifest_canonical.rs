#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Canonical manifest encoding: pinned bytes, round-trip, rejection of anything non-canonical.

use proptest::prelude::*;
use proto::image::layout;
use proto::manifest::{
    data_ranges_of, DataRange, Manifest, ManifestError, SegmentDigest, SegmentHasher, ALIGN,
    FORMAT_VERSION, MAX_MANIFEST_LEN,
};
use sha2::{Digest, Sha256};

fn digest(bytes: &[u8]) -> SegmentDigest {
    let mut h = SegmentHasher::new();
    h.update(bytes);
    h.finish()
}

/// A small fixed manifest: a sparse "rootfs" and a dense "kernel".
fn sample() -> Manifest {
    let mut rootfs = vec![0u8; 3 * 4096 + 100];
    rootfs[..10].copy_from_slice(b"hsqs-magic");
    rootfs[2 * 4096 + 7] = 0x5a;
    rootfs[3 * 4096 + 99] = 1;
    let kernel: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
    layout(
        "2.0.1",
        &[
            ("rootfs".to_string(), digest(&rootfs)),
            ("kernel".to_string(), digest(&kernel)),
        ],
    )
    .unwrap()
}

#[test]
fn canonical_bytes_are_pinned() {
    let m = sample();
    let text = String::from_utf8(m.to_canonical_bytes()).unwrap();
    insta::assert_snapshot!("canonical_manifest", text);
    insta::assert_snapshot!("canonical_manifest_id", hex::encode(m.id()));
}

#[test]
fn layout_places_segments_contiguously() {
    let m = sample();
    assert_eq!(m.format, FORMAT_VERSION);
    assert_eq!(m.segments[0].offset, 8192);
    assert_eq!(m.segments[1].offset, 8192 + 4 * 4096);
    assert_eq!(m.total_size, m.segments[1].offset + 8192);
    assert_eq!(
        m.segments[0].data_ranges,
        vec![
            DataRange {
                offset: 0,
                len: 4096
            },
            DataRange {
                offset: 8192,
                len: 4096 + 100
            }
        ]
    );
    assert_eq!(
        m.segments[1].data_ranges,
        vec![DataRange {
            offset: 0,
            len: 5000
        }]
    );
    assert_eq!(m.segment("kernel").unwrap().size, 5000);
    assert!(m.segment("initrd").is_none());
}

#[test]
fn round_trip() {
    let m = sample();
    let b = m.to_canonical_bytes();
    let back = Manifest::from_bytes(&b).unwrap();
    assert_eq!(back, m);
    assert_eq!(back.to_canonical_bytes(), b);
    assert_eq!(back.id(), m.id());
}

fn expect_non_canonical(text: &str) {
    match Manifest::from_bytes(text.as_bytes()) {
        Err(ManifestError::NonCanonical { .. }) => {}
        other => panic!("expected NonCanonical for {text:?}, got {other:?}"),
    }
}

#[test]
fn whitespace_reordering_and_uppercase_hex_are_rejected() {
    let canon = String::from_utf8(sample().to_canonical_bytes()).unwrap();
    // trailing newline / pretty printing
    expect_non_canonical(&format!("{canon}\n"));
    expect_non_canonical(&canon.replacen(",\"version\"", ", \"version\"", 1));
    // fields in another order
    let reordered = canon.replacen(
        "{\"format\":4,\"version\":\"2.0.1\",",
        "{\"version\":\"2.0.1\",\"format\":4,",
        1,
    );
    assert_ne!(reordered, canon);
    expect_non_canonical(&reordered);
    // uppercase hex
    let sha = hex::encode(sample().image_sha256);
    let upper = canon.replace(&sha, &sha.to_uppercase());
    assert!(matches!(
        Manifest::from_bytes(upper.as_bytes()),
        Err(ManifestError::BadHex { .. })
    ));
    // escaped character that decodes to the same string
    expect_non_canonical(&canon.replacen("\"rootfs\"", "\"\\u0072ootfs\"", 1));
}

#[test]
fn data_sha256_field_is_checked() {
    let m = sample();
    let canon = String::from_utf8(m.to_canonical_bytes()).unwrap();
    let seg = &m.segments[0];
    let sha = hex::encode(seg.sha256);
    let data_sha = hex::encode(seg.data_sha256);
    // field order: sha256, then data_sha256, then chunk_sha256, then data_ranges
    let chunks: String = seg.chunk_sha256.iter().map(hex::encode).collect();
    assert!(
        canon.contains(&format!(
            "\"sha256\":\"{sha}\",\"data_sha256\":\"{data_sha}\",\"chunk_sha256\":\"{chunks}\",\"data_ranges\":[[0,4096],[8192,4196]]"
        )),
        "{canon}"
    );
    // data_sha256 before sha256: not canonical
    let swapped = canon.replacen(
        &format!("\"sha256\":\"{sha}\",\"data_sha256\":\"{data_sha}\""),
        &format!("\"data_sha256\":\"{data_sha}\",\"sha256\":\"{sha}\""),
        1,
    );
    assert_ne!(swapped, canon);
    expect_non_canonical(&swapped);
    // uppercase or short hex
    let upper = canon.replacen(&data_sha, &data_sha.to_uppercase(), 1);
    match Manifest::from_bytes(upper.as_bytes()) {
        Err(ManifestError::BadHex { field }) => assert_eq!(field, "data_sha256 of segment #0"),
        other => panic!("expected BadHex, got {other:?}"),
    }
    let short = canon.replacen(&data_sha, &data_sha[..62], 1);
    assert!(matches!(
        Manifest::from_bytes(short.as_bytes()),
        Err(ManifestError::BadHex { .. })
    ));
    // missing in a format-3 manifest
    let missing = canon.replacen(&format!(",\"data_sha256\":\"{data_sha}\""), "", 1);
    match Manifest::from_bytes(missing.as_bytes()) {
        Err(ManifestError::Json { detail }) => assert!(detail.contains("data_sha256"), "{detail}"),
        other => panic!("expected Json, got {other:?}"),
    }
    // A wrong data_sha256 still parses (only the content can tell); the verifier catches it.
    let mut wrong = m.clone();
    wrong.segments[0].data_sha256[0] ^= 1;
    let back = Manifest::from_bytes(&wrong.to_canonical_bytes()).unwrap();
    assert_eq!(back, wrong);
}

#[test]
fn format_1_manifest_is_unsupported_with_rebuild_advice() {
    // What format 1 looked like: no data_sha256 field.
    let mut canon = String::from_utf8(sample().to_canonical_bytes()).unwrap();
    for seg in &sample().segments {
        canon = canon.replacen(
            &format!(",\"data_sha256\":\"{}\"", hex::encode(seg.data_sha256)),
            "",
            1,
        );
    }
    assert!(!canon.contains("data_sha256"));
    let v1 = canon.replacen("{\"format\":4,", "{\"format\":1,", 1);
    let e = Manifest::from_bytes(v1.as_bytes()).unwrap_err();
    assert_eq!(e, ManifestError::UnsupportedFormat { found: 1 });
    assert_eq!(
        e.to_string(),
        "unsupported manifest format 1 (this build understands format 4); rebuild the image \
         with `nx image build`"
    );
    // A future format is named too, whatever its fields.
    let v5 = canon.replacen("{\"format\":4,", "{\"format\":5,\"new_field\":[],", 1);
    assert_eq!(
        Manifest::from_bytes(v5.as_bytes()),
        Err(ManifestError::UnsupportedFormat { found: 5 })
    );
    // Format 1 with the current fields: rejected by validation, same error.
    let v1_fields = String::from_utf8(sample().to_canonical_bytes())
        .unwrap()
        .replacen("{\"format\":4,", "{\"format\":1,", 1);
    assert_eq!(
        Manifest::from_bytes(v1_fields.as_bytes()),
        Err(ManifestError::UnsupportedFormat { found: 1 })
    );
}

#[test]
fn non_integer_numbers_and_unknown_fields_are_rejected() {
    let canon = String::from_utf8(sample().to_canonical_bytes()).unwrap();
    for bad in [
        canon.replacen("\"format\":4", "\"format\":4.0", 1),
        canon.replacen("\"format\":4", "\"format\":4e0", 1),
        canon.replacen("\"offset\":8192", "\"offset\":-8192", 1),
        canon.replacen("{\"format\":4,", "{\"format\":4,\"extra\":0,", 1),
        canon.replacen("{\"format\":4,", "{\"format\":4,\"format\":3,", 1),
        canon[..canon.len() - 1].to_string(),
    ] {
        assert!(
            Manifest::from_bytes(bad.as_bytes()).is_err(),
            "accepted {bad}"
        );
    }
}

#[test]
fn oversized_manifest_is_rejected_before_parsing() {
    let big = vec![b' '; MAX_MANIFEST_LEN + 1];
    assert_eq!(
        Manifest::from_bytes(&big),
        Err(ManifestError::TooLong {
            len: MAX_MANIFEST_LEN + 1,
            max: MAX_MANIFEST_LEN
        })
    );
}

#[test]
fn huge_segment_count_is_rejected_while_parsing() {
    // 50 000 tiny segment objects (~1 MiB); the parser must stop at 65.
    let seg = r#"{"name":"a","offset":0,"size":1,"sha256":"","data_sha256":"","chunk_sha256":"","data_ranges":[]}"#;
    let mut s = String::from(
        r#"{"format":4,"version":"1","security_version":0,"total_size":0,"segments":["#,
    );
    while s.len() + seg.len() + 100 < MAX_MANIFEST_LEN {
        s.push_str(seg);
        s.push(',');
    }
    s.push_str(seg);
    s.push_str(r#"],"image_sha256":""}"#);
    match Manifest::from_bytes(s.as_bytes()) {
        Err(ManifestError::Json { detail }) => {
            assert!(detail.contains("too many segments"), "{detail}")
        }
        other => panic!("expected too many segments, got {other:?}"),
    }
}

#[test]
fn huge_data_range_count_is_rejected_while_parsing() {
    let mut s = String::from(
        r#"{"format":4,"version":"1","security_version":0,"total_size":0,"segments":[{"name":"a","offset":0,"size":1,"sha256":"","data_sha256":"","chunk_sha256":"","data_ranges":["#,
    );
    for i in 0..70_000u32 {
        if i > 0 {
            s.push(',');
        }
        s.push_str("[0,1]");
    }
    s.push_str(r#"]}],"image_sha256":""}"#);
    assert!(s.len() < MAX_MANIFEST_LEN);
    match Manifest::from_bytes(s.as_bytes()) {
        Err(ManifestError::Json { detail }) => {
            assert!(detail.contains("too many data ranges"), "{detail}")
        }
        other => panic!("expected too many data ranges, got {other:?}"),
    }
}

/// Sparse content: zero runs, dense runs and lone non-zero bytes in zero runs, of lengths that
/// rarely fall on 4 KiB boundaries.
fn arb_sparse() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((0u8..3, 1usize..10_000, any::<u8>()), 0..8).prop_map(|runs| {
        let mut v = Vec::new();
        for (kind, len, x) in runs {
            match kind {
                0 => v.resize(v.len() + len, 0),
                1 => v.extend((0..len).map(|i| (i as u8) ^ x | 1)),
                _ => {
                    let start = v.len();
                    v.resize(start + len, 0);
                    v[start + (x as usize * 37) % len] = x | 1;
                }
            }
        }
        v
    })
}

fn arb_content() -> impl Strategy<Value = Vec<u8>> {
    // runs of zeros and non-zero bytes, so data ranges get interesting
    prop::collection::vec((any::<bool>(), 1usize..6000), 1..6).prop_map(|runs| {
        let mut v = Vec::new();
        for (data, len) in runs {
            v.extend((0..len).map(|i| if data { (i % 200) as u8 + 1 } else { 0 }));
        }
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn layout_round_trips(contents in prop::collection::vec(arb_content(), 1..5), version in "[A-Za-z0-9._+~:-]{1,20}") {
        let parts: Vec<(String, SegmentDigest)> = contents
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("seg{i}"), digest(c)))
            .collect();
        let m = layout(&version, &parts).unwrap();
        let back = Manifest::from_bytes(&m.to_canonical_bytes()).unwrap();
        prop_assert_eq!(&back, &m);
        for (seg, c) in m.segments.iter().zip(&contents) {
            prop_assert_eq!(seg.offset % ALIGN, 0);
            prop_assert_eq!(&seg.data_ranges, &data_ranges_of(c));
            prop_assert_eq!(seg.data_bytes(), seg.data_ranges.iter().map(|r| r.len).sum::<u64>());
        }
    }

    #[test]
    fn data_sha256_is_the_hash_of_the_data_ranges(
        content in arb_sparse(),
        pieces in prop::collection::vec(1usize..9000, 1..16),
    ) {
        // feed in pieces of random sizes (cycling through `pieces`)
        let mut h = SegmentHasher::new();
        let mut at = 0;
        for p in pieces.iter().cycle() {
            if at >= content.len() {
                break;
            }
            let end = (at + p).min(content.len());
            h.update(&content[at..end]);
            at = end;
        }
        let d = h.finish();
        prop_assert_eq!(d.size, content.len() as u64);
        prop_assert_eq!(&d.data_ranges, &data_ranges_of(&content));
        // the bytes of the data ranges, concatenated
        let mut by_ranges = Sha256::new();
        for r in &d.data_ranges {
            by_ranges.update(&content[r.offset as usize..r.end() as usize]);
        }
        let by_ranges: [u8; 32] = by_ranges.finalize().into();
        prop_assert_eq!(d.data_sha256, by_ranges);
        // the same as the non-zero 4 KiB blocks, the short last one included
        let mut by_blocks = Sha256::new();
        for b in content.chunks(ALIGN as usize).filter(|b| b.iter().any(|x| *x != 0)) {
            by_blocks.update(b);
        }
        let by_blocks: [u8; 32] = by_blocks.finalize().into();
        prop_assert_eq!(d.data_sha256, by_blocks);
        prop_assert_eq!(d.sha256, <[u8; 32]>::from(Sha256::digest(&content)));
        // and a manifest built from it carries it over
        if !content.is_empty() {
            let m = layout("1", &[("s".to_string(), d.clone())]).unwrap();
            prop_assert_eq!(m.segments[0].data_sha256, d.data_sha256);
        }
    }

    #[test]
    fn hasher_is_split_independent(content in arb_content(), cuts in prop::collection::vec(0usize..20000, 0..8)) {
        let whole = digest(&content);
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (content.len() + 1)).collect();
        cuts.sort_unstable();
        let mut h = SegmentHasher::new();
        let mut at = 0;
        for c in cuts {
            h.update(&content[at..c]);
            at = c;
        }
        h.update(&content[at..]);
        prop_assert_eq!(h.finish(), whole);
    }
}

/// A rootfs protected by dm-verity, with a security version.
fn verity_sample() -> Manifest {
    let rootfs: Vec<u8> = (0..(5 * 4096u32)).map(|i| (i % 253) as u8).collect();
    let salt = b"salt".to_vec();
    let tree = proto::verity::tree(&salt, &rootfs);
    proto::image::layout_with(
        &proto::image::LayoutOptions {
            version: "3".into(),
            security_version: 7,
            verity: vec![proto::manifest::Verity {
                data: "rootfs".into(),
                hash: "rootfs-verity".into(),
                salt,
                root_hash: tree.root_hash,
            }],
        },
        &[
            ("rootfs".to_string(), digest(&rootfs)),
            ("rootfs-verity".to_string(), digest(&tree.bytes)),
        ],
    )
    .unwrap()
}

#[test]
fn verity_and_security_version_are_pinned_and_checked() {
    let m = verity_sample();
    let text = String::from_utf8(m.to_canonical_bytes()).unwrap();
    insta::assert_snapshot!("canonical_manifest_verity", text);
    assert_eq!(Manifest::from_bytes(text.as_bytes()).unwrap(), m);
    assert_eq!(m.security_version, 7);
    assert_eq!(m.verity_of("rootfs").unwrap().hash, "rootfs-verity");

    let reject = |f: &dyn Fn(&mut Manifest), what: &str| {
        let mut bad = m.clone();
        f(&mut bad);
        match bad.validate() {
            Err(ManifestError::Verity { reason, .. }) => {
                assert!(reason.contains(what), "{reason} lacks {what:?}")
            }
            other => panic!("expected a verity error with {what:?}, got {other:?}"),
        }
    };
    reject(
        &|b| b.verity[0].data = "nope".into(),
        "no such data segment",
    );
    reject(&|b| b.verity[0].hash = "nope".into(), "no hash segment");
    reject(&|b| b.verity[0].hash = "rootfs".into(), "its own hash tree");
    reject(&|b| b.verity[0].salt = vec![0; 257], "salt is 257 bytes");
    reject(
        &|b| {
            let v = b.verity[0].clone();
            b.verity.push(v);
        },
        "sorted",
    );
    // A hash segment of the wrong size (rebuild the layout around a short tree).
    let short = proto::image::layout_with(
        &proto::image::LayoutOptions {
            version: "3".into(),
            security_version: 0,
            verity: m.verity.clone(),
        },
        &[
            ("rootfs".to_string(), digest(&[1u8; 5 * 4096])),
            ("rootfs-verity".to_string(), digest(&[1u8; 100])),
        ],
    );
    assert!(short.is_err(), "{short:?}");
    // Odd-length or uppercase salt hex is refused by the parser.
    let odd = text.replacen("\"salt\":\"73616c74\"", "\"salt\":\"73616c7\"", 1);
    assert!(matches!(
        Manifest::from_bytes(odd.as_bytes()),
        Err(ManifestError::BadHex { .. })
    ));
    let missing = text.replacen("\"security_version\":7,", "", 1);
    assert!(Manifest::from_bytes(missing.as_bytes()).is_err());
}

#[test]
fn format_3_manifest_without_chunk_hashes_is_unsupported_with_rebuild_advice() {
    // What format 3 looked like: no chunk_sha256 field.
    let m = sample();
    let mut canon = String::from_utf8(m.to_canonical_bytes()).unwrap();
    for seg in &m.segments {
        let list: String = seg.chunk_sha256.iter().map(hex::encode).collect();
        canon = canon.replacen(&format!(",\"chunk_sha256\":\"{list}\""), "", 1);
    }
    assert!(!canon.contains("chunk_sha256"));
    let v3 = canon.replacen("{\"format\":4,", "{\"format\":3,", 1);
    let e = Manifest::from_bytes(v3.as_bytes()).unwrap_err();
    assert_eq!(e, ManifestError::UnsupportedFormat { found: 3 });
    assert!(e.to_string().contains("rebuild the image"), "{e}");
}
