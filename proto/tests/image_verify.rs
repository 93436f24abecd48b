#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Whole-image verification with `ImageVerifier`, on in-memory images.

use proto::image::{layout, ImageError, ImageHead, ImageVerifier};
use proto::manifest::{align_up, SegmentHasher};
use sha2::{Digest, Sha256};

struct Built {
    file: Vec<u8>,
    head: ImageHead,
}

fn build(parts: &[(&str, Vec<u8>)]) -> Built {
    let digests: Vec<_> = parts
        .iter()
        .map(|(n, c)| {
            let mut h = SegmentHasher::new();
            h.update(c);
            (n.to_string(), h.finish())
        })
        .collect();
    let m = layout("1", &digests).unwrap();
    let head = ImageHead::build(&m, None).unwrap();
    let mut file = head.to_bytes();
    for (_, c) in parts {
        file.extend_from_slice(c);
        file.resize(align_up(file.len() as u64).unwrap() as usize, 0);
    }
    assert_eq!(file.len() as u64, m.total_size);
    Built { file, head }
}

fn sample() -> Built {
    let mut rootfs = vec![0u8; 20000];
    rootfs[..5].copy_from_slice(b"hsqs!");
    rootfs[12000] = 9;
    let kernel: Vec<u8> = (0..8192u32).map(|i| (i % 7) as u8 + 1).collect();
    build(&[
        ("rootfs", rootfs),
        ("kernel", kernel),
        ("initrd", vec![3u8; 100]),
    ])
}

fn verify(b: &Built, bytes: &[u8], chunk: usize) -> Result<usize, ImageError> {
    let head = ImageHead::parse(&bytes[..b.head.header.data_offset as usize])?;
    let mut v = ImageVerifier::new(&head.manifest);
    for c in bytes[head.header.data_offset as usize..].chunks(chunk) {
        v.update(c)?;
    }
    let n = v.verified_segments();
    v.finish()?;
    Ok(n)
}

#[test]
fn good_image_verifies_at_any_chunking() {
    let b = sample();
    for chunk in [1, 7, 4096, 5000, 1 << 20] {
        assert_eq!(verify(&b, &b.file, chunk).unwrap(), 3, "chunk {chunk}");
    }
}

#[test]
fn flipped_byte_names_its_segment() {
    let b = sample();
    for seg in &b.head.manifest.segments {
        for rel in [0, seg.size / 2, seg.size - 1] {
            let mut f = b.file.clone();
            f[(seg.offset + rel) as usize] ^= 0x01;
            let e = verify(&b, &f, 65536).unwrap_err();
            assert_eq!(e.segment(), Some(seg.name.as_str()), "{e}");
            assert!(matches!(e, ImageError::SegmentHash { .. }), "{e}");
            assert!(
                e.to_string().contains(&format!("segment \"{}\"", seg.name)),
                "{e}"
            );
        }
    }
}

#[test]
fn non_zero_padding_is_caught() {
    let b = sample();
    let seg = &b.head.manifest.segments[2]; // initrd: 100 bytes, then padding
    let mut f = b.file.clone();
    let at = seg.offset + seg.size + 5;
    f[at as usize] = 1;
    assert_eq!(
        verify(&b, &f, 4096),
        Err(ImageError::SegmentPadding {
            segment: "initrd".into(),
            offset: at
        })
    );
}

#[test]
fn truncated_and_trailing_are_caught() {
    let b = sample();
    let f = &b.file[..b.file.len() - 4096];
    let e = verify(&b, f, 4096).unwrap_err();
    assert!(
        matches!(e, ImageError::Truncated { ref segment, .. } if segment == "initrd"),
        "{e}"
    );
    let f = &b.file[..b.head.header.data_offset as usize + 10];
    let e = verify(&b, f, 4096).unwrap_err();
    assert!(
        matches!(e, ImageError::Truncated { ref segment, .. } if segment == "rootfs"),
        "{e}"
    );
    let mut f = b.file.clone();
    f.push(0);
    assert!(matches!(
        verify(&b, &f, 4096),
        Err(ImageError::TrailingData { .. })
    ));
}

/// `b`'s segment bytes behind a head built from the doctored manifest `m` (unsigned).
fn with_manifest(b: &Built, m: &proto::manifest::Manifest) -> Built {
    let head = ImageHead::build(m, None).unwrap();
    let mut file = head.to_bytes();
    file.extend_from_slice(&b.file[b.head.header.data_offset as usize..]);
    Built { file, head }
}

#[test]
fn lying_data_ranges_are_caught() {
    // Build a manifest whose data ranges claim the rootfs is all zero after its first page,
    // while its hash is right: the verifier must still reject it.
    let b = sample();
    let mut m = b.head.manifest.clone();
    m.segments[0].data_ranges.truncate(1);
    let b2 = with_manifest(&b, &m);
    let e = verify(&b2, &b2.file, 4096).unwrap_err();
    assert!(
        matches!(e, ImageError::DataRanges { ref segment, .. } if segment == "rootfs"),
        "{e}"
    );
    assert!(
        e.to_string().contains("outside the listed data ranges"),
        "{e}"
    );
}

#[test]
fn wrong_data_sha256_is_caught_and_named() {
    // Content, sha256 and data ranges right, data_sha256 wrong (a manifest made by hand and
    // signed): a target checking only the data ranges would accept the content, so the host
    // verifier must reject the image, naming the segment like a sha256 mismatch.
    let b = sample();
    for (i, name) in ["rootfs", "kernel", "initrd"].into_iter().enumerate() {
        let mut m = b.head.manifest.clone();
        let good = m.segments[i].data_sha256;
        m.segments[i].data_sha256[31] ^= 0x80;
        let b2 = with_manifest(&b, &m);
        let f = b2.file.clone();
        for chunk in [1, 4096, 1 << 20] {
            let e = verify(&b2, &f, chunk).unwrap_err();
            assert_eq!(e.segment(), Some(name), "{e}");
            assert_eq!(
                e,
                ImageError::SegmentDataHash {
                    segment: name.into(),
                    expected: hex::encode(m.segments[i].data_sha256),
                    found: hex::encode(good),
                }
            );
            assert!(
                e.to_string()
                    .starts_with(&format!("segment \"{name}\": data_sha256 mismatch")),
                "{e}"
            );
        }
    }
}

#[test]
fn data_sha256_in_the_manifest_is_the_hash_of_the_data_ranges() {
    let b = sample();
    for seg in &b.head.manifest.segments {
        let content = &b.file[seg.offset as usize..seg.end() as usize];
        let mut h = Sha256::new();
        for r in &seg.data_ranges {
            h.update(&content[r.offset as usize..r.end() as usize]);
        }
        assert_eq!(
            <[u8; 32]>::from(h.finalize()),
            seg.data_sha256,
            "{}",
            seg.name
        );
    }
    // the rootfs is sparse: its data hash differs from its content hash
    let rootfs = &b.head.manifest.segments[0];
    assert_ne!(rootfs.data_sha256, rootfs.sha256);
}

#[test]
fn hand_built_invalid_manifest_fails_instead_of_looping() {
    let b = sample();
    let mut m = b.head.manifest.clone();
    m.segments[1].offset = 0; // breaks the layout rule
    let mut v = ImageVerifier::new(&m);
    assert!(matches!(v.update(&[0u8; 10]), Err(ImageError::Manifest(_))));
    assert!(matches!(v.finish(), Err(ImageError::Manifest(_))));
}
