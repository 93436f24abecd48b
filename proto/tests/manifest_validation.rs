#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Every rule of `Manifest::validate`: names, layout, sizes, data ranges, hashes.

use proto::image::layout;
use proto::manifest::{
    image_sha256, validate_segment_name, DataRange, Manifest, ManifestError, SegmentHasher,
    MAX_SEGMENTS,
};

fn manifest(sizes: &[usize]) -> Manifest {
    let parts: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let mut h = SegmentHasher::new();
            h.update(&vec![0xa5u8; *n]);
            (format!("s{i}"), h.finish())
        })
        .collect();
    layout("1", &parts).unwrap()
}

/// Apply `f`, fix up image_sha256 (so only the intended rule is broken) and validate.
fn broken(sizes: &[usize], f: impl FnOnce(&mut Manifest)) -> ManifestError {
    let mut m = manifest(sizes);
    f(&mut m);
    m.image_sha256 = image_sha256(&m.segments);
    let err = m.validate().unwrap_err();
    // The parser must reject the same thing (it validates before the canonical check).
    assert!(Manifest::from_bytes(&m.to_canonical_bytes()).is_err());
    err
}

#[test]
fn good_names() {
    for n in ["rootfs", "a", "kernel-6_1", "0", &"z".repeat(32)] {
        validate_segment_name(n).unwrap();
    }
}

#[test]
fn bad_names_are_rejected() {
    for n in [
        "",
        "a/b",
        "..",
        "../x",
        "Rootfs",
        "ROOTFS",
        &"z".repeat(33),
        "a b",
        "a.b",
        "é",
        "a\0",
    ] {
        assert!(
            matches!(validate_segment_name(n), Err(ManifestError::BadName { .. })),
            "accepted {n:?}"
        );
        let e = broken(&[10], |m| m.segments[0].name = n.to_string());
        assert!(matches!(e, ManifestError::BadName { .. }), "{n:?}: {e:?}");
    }
}

#[test]
fn duplicate_names_are_rejected() {
    let e = broken(&[10, 10], |m| m.segments[1].name = "s0".into());
    assert_eq!(e, ManifestError::DuplicateName { name: "s0".into() });
}

#[test]
fn bad_versions_are_rejected() {
    for v in ["", "1 2", "a\"b", "x\\y", &"1".repeat(65), "1\n"] {
        let e = broken(&[10], |m| m.version = v.to_string());
        assert!(
            matches!(e, ManifestError::BadVersion { .. }),
            "{v:?}: {e:?}"
        );
    }
}

#[test]
fn wrong_format_is_rejected() {
    for format in [0, 1, 2, 3, 5] {
        let e = broken(&[10], |m| m.format = format);
        assert_eq!(e, ManifestError::UnsupportedFormat { found: format });
    }
    let e = broken(&[10], |m| m.format = 1);
    assert!(
        e.to_string()
            .contains("rebuild the image with `nx image build`"),
        "{e}"
    );
}

#[test]
fn misaligned_first_segment_is_rejected() {
    let e = broken(&[10], |m| {
        m.segments[0].offset += 1;
        m.total_size += 4096;
    });
    assert!(matches!(e, ManifestError::FirstOffset { .. }), "{e:?}");
    let e = broken(&[10], |m| {
        m.segments[0].offset = 4096; // inside the header/manifest area
        m.total_size = 8192;
    });
    assert!(matches!(e, ManifestError::FirstOffset { .. }), "{e:?}");
}

#[test]
fn overlapping_gapped_and_out_of_order_segments_are_rejected() {
    // overlap: second segment starts inside the first
    let e = broken(&[5000, 10], |m| m.segments[1].offset -= 4096);
    assert!(matches!(e, ManifestError::Layout { .. }), "{e:?}");
    // gap: second segment one page later than the layout rule
    let e = broken(&[5000, 10], |m| {
        m.segments[1].offset += 4096;
        m.total_size += 4096;
    });
    assert!(matches!(e, ManifestError::Layout { .. }), "{e:?}");
    // misaligned second segment
    let e = broken(&[5000, 10], |m| m.segments[1].offset += 8);
    assert!(matches!(e, ManifestError::Layout { .. }), "{e:?}");
    // out of order: table order swapped
    let e = broken(&[5000, 10], |m| m.segments.swap(0, 1));
    assert!(matches!(e, ManifestError::Layout { .. }), "{e:?}");
}

#[test]
fn empty_segment_is_rejected() {
    let e = broken(&[10], |m| {
        m.segments[0].size = 0;
        m.segments[0].data_ranges.clear();
        m.total_size = m.segments[0].offset;
    });
    assert!(matches!(e, ManifestError::EmptySegment { .. }), "{e:?}");
}

#[test]
fn no_segments_and_too_many_segments_are_rejected() {
    let e = broken(&[10], |m| {
        m.segments.clear();
    });
    assert_eq!(e, ManifestError::NoSegments);
    let sizes = vec![1usize; MAX_SEGMENTS + 1];
    let parts: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, _)| {
            let mut h = SegmentHasher::new();
            h.update(&[1]);
            (format!("s{i}"), h.finish())
        })
        .collect();
    assert!(layout("1", &parts).is_err());
}

#[test]
fn total_size_must_match() {
    let e = broken(&[10], |m| m.total_size += 4096);
    assert!(matches!(e, ManifestError::TotalSize { .. }), "{e:?}");
    let e = broken(&[10], |m| m.total_size -= 1);
    assert!(matches!(e, ManifestError::TotalSize { .. }), "{e:?}");
}

#[test]
fn offsets_near_u64_max_do_not_overflow() {
    let e = broken(&[10, 10], |m| m.segments[1].size = u64::MAX - 10);
    assert!(matches!(e, ManifestError::TooLarge { .. }), "{e:?}");
}

#[test]
fn image_sha256_must_match() {
    let mut m = manifest(&[10]);
    m.image_sha256[0] ^= 1;
    assert!(matches!(m.validate(), Err(ManifestError::ImageHash { .. })));
    let mut m = manifest(&[10]);
    m.segments[0].sha256[0] ^= 1; // table changed, image hash not updated
    assert!(matches!(m.validate(), Err(ManifestError::ImageHash { .. })));
}

#[test]
fn bad_data_ranges_are_rejected() {
    let r = |offset, len| DataRange { offset, len };
    let cases: Vec<Vec<DataRange>> = vec![
        vec![r(0, 0)],                   // empty
        vec![r(1, 4095)],                // misaligned offset
        vec![r(0, 100)],                 // short range not at the end
        vec![r(0, 3 * 4096)],            // beyond the segment (size 10000)
        vec![r(4096, 4096), r(0, 4096)], // unsorted
        vec![r(0, 8192), r(4096, 4096)], // overlapping
        vec![r(0, 4096), r(4096, 4096)], // adjacent, not merged
        vec![r(8192, 10000 - 8192 + 1)], // one byte past the end
        vec![r(u64::MAX - 4095, 4096)],  // overflow
    ];
    for ranges in cases {
        let e = broken(&[10000], |m| m.segments[0].data_ranges = ranges.clone());
        assert!(
            matches!(e, ManifestError::DataRange { .. }),
            "{ranges:?}: {e:?}"
        );
    }
    // the clipped last range is fine
    let mut m = manifest(&[10000]);
    assert_eq!(m.segments[0].data_ranges, vec![r(0, 10000)]);
    m.segments[0].data_ranges = vec![r(0, 4096), r(8192, 10000 - 8192)];
    m.image_sha256 = image_sha256(&m.segments);
    m.validate().unwrap();
}
