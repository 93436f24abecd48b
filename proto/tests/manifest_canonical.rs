#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Canonical manifest encoding: pinned bytes, round-trip, rejection of anything non-canonical.

use proptest::prelude::*;
use proto::image::layout;
use proto::manifest::{
    data_ranges_of, DataRange, Manifest, ManifestError, SegmentDigest, SegmentHasher, ALIGN,
    FORMAT_VERSION, MAX_MANIFEST_LEN,
};

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
        "{\"format\":1,\"version\":\"2.0.1\",",
        "{\"version\":\"2.0.1\",\"format\":1,",
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
fn non_integer_numbers_and_unknown_fields_are_rejected() {
    let canon = String::from_utf8(sample().to_canonical_bytes()).unwrap();
    for bad in [
        canon.replacen("\"format\":1", "\"format\":1.0", 1),
        canon.replacen("\"format\":1", "\"format\":1e0", 1),
        canon.replacen("\"offset\":8192", "\"offset\":-8192", 1),
        canon.replacen("{\"format\":1,", "{\"format\":1,\"extra\":0,", 1),
        canon.replacen("{\"format\":1,", "{\"format\":1,\"format\":1,", 1),
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
    let seg = r#"{"name":"a","offset":0,"size":1,"sha256":"","data_ranges":[]}"#;
    let mut s = String::from(r#"{"format":1,"version":"1","total_size":0,"segments":["#);
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
        r#"{"format":1,"version":"1","total_size":0,"segments":[{"name":"a","offset":0,"size":1,"sha256":"","data_ranges":["#,
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
