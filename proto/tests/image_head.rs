#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Image header and head: byte layout, strict parsing, round-trip, signatures.

use proto::image::{
    data_offset_for, decode_public_key, decode_secret_key, encode_public_key, encode_secret_key,
    layout, public_key_of, sign_manifest, Header, ImageError, ImageHead, HEADER_LEN, MAGIC,
    MAX_HEAD_LEN, SIGNATURE_LEN,
};
use proto::manifest::{Manifest, SegmentHasher, FORMAT_VERSION, MAX_MANIFEST_LEN};

fn manifest() -> Manifest {
    let mut h = SegmentHasher::new();
    h.update(b"hello segment");
    let mut k = SegmentHasher::new();
    k.update(&[7u8; 9000]);
    layout(
        "1",
        &[("rootfs".into(), h.finish()), ("kernel".into(), k.finish())],
    )
    .unwrap()
}

const SEED: [u8; 32] = [42u8; 32];

#[test]
fn header_layout_is_byte_exact() {
    let h = ImageHead::build(&manifest(), None).unwrap().header;
    let b = h.to_bytes();
    assert_eq!(&b[..8], &MAGIC);
    assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 4);
    assert_eq!(FORMAT_VERSION, 4);
    assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 4096);
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), 4096);
    assert_eq!(
        u32::from_le_bytes(b[24..28].try_into().unwrap()),
        h.manifest_len
    );
    assert_eq!(
        u64::from_le_bytes(b[28..36].try_into().unwrap()),
        4096 + u64::from(h.manifest_len)
    );
    assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(b[40..48].try_into().unwrap()), 8192);
    assert_eq!(
        u64::from_le_bytes(b[48..56].try_into().unwrap()),
        h.total_size
    );
    assert!(b[56..4092].iter().all(|x| *x == 0));
    assert_eq!(
        u32::from_le_bytes(b[4092..].try_into().unwrap()),
        crc32fast::hash(&b[..4092])
    );
    assert_eq!(Header::parse(&b).unwrap(), h);
}

#[test]
fn head_round_trip_unsigned_and_signed() {
    let m = manifest();
    let unsigned = ImageHead::build(&m, None).unwrap();
    let bytes = unsigned.to_bytes();
    assert_eq!(bytes.len() as u64, unsigned.header.data_offset);
    assert_eq!(bytes.len() as u64, m.segments[0].offset);
    assert_eq!(ImageHead::parse(&bytes).unwrap(), unsigned);
    assert!(!unsigned.is_signed());

    let sig = sign_manifest(&SEED, &m.to_canonical_bytes());
    let signed = ImageHead::build(&m, Some(sig)).unwrap();
    let sbytes = signed.to_bytes();
    // signing does not move anything: same length, same manifest
    assert_eq!(sbytes.len(), bytes.len());
    assert_eq!(ImageHead::parse(&sbytes).unwrap(), signed);
    assert_eq!(signed.header.signature_len as usize, SIGNATURE_LEN);
    assert_eq!(
        &sbytes[HEADER_LEN + signed.manifest_bytes.len()..][..64],
        &sig[..]
    );
}

#[test]
fn signature_good_bad_and_wrong_key() {
    let m = manifest();
    let sig = sign_manifest(&SEED, &m.to_canonical_bytes());
    let head = ImageHead::build(&m, Some(sig)).unwrap();
    head.verify_signature(&public_key_of(&SEED)).unwrap();

    // another key
    let other = public_key_of(&[7u8; 32]);
    assert_eq!(head.verify_signature(&other), Err(ImageError::BadSignature));

    // tampered signature
    let mut bad = sig;
    bad[10] ^= 1;
    let head_bad = ImageHead::build(&m, Some(bad)).unwrap();
    assert_eq!(
        head_bad.verify_signature(&public_key_of(&SEED)),
        Err(ImageError::BadSignature)
    );

    // unsigned
    let unsigned = ImageHead::build(&m, None).unwrap();
    assert_eq!(
        unsigned.verify_signature(&public_key_of(&SEED)),
        Err(ImageError::Unsigned)
    );

    // a signature of a different manifest does not carry over
    let mut h = SegmentHasher::new();
    h.update(b"other");
    let m2 = layout("1", &[("rootfs".into(), h.finish())]).unwrap();
    let sig2 = sign_manifest(&SEED, &m2.to_canonical_bytes());
    let swapped = ImageHead::build(&m, Some(sig2)).unwrap();
    assert_eq!(
        swapped.verify_signature(&public_key_of(&SEED)),
        Err(ImageError::BadSignature)
    );
}

#[test]
fn key_text_round_trip_and_errors() {
    let s = encode_secret_key(&SEED);
    assert!(s.starts_with("nexus-ed25519-secret-v1 "));
    assert_eq!(decode_secret_key(&s).unwrap(), SEED);
    let p = encode_public_key(&public_key_of(&SEED));
    assert!(p.starts_with("nexus-ed25519-public-v1 "));
    assert_eq!(decode_public_key(&p).unwrap(), public_key_of(&SEED));
    assert!(matches!(
        decode_public_key(&s),
        Err(ImageError::BadKeyText { .. })
    ));
    assert!(matches!(
        decode_secret_key(&p),
        Err(ImageError::BadKeyText { .. })
    ));
    assert!(decode_secret_key("nexus-ed25519-secret-v1 abcd").is_err());
    assert!(decode_secret_key(&"x".repeat(10_000)).is_err());
}

fn with_crc(mut b: Vec<u8>) -> Vec<u8> {
    let crc = crc32fast::hash(&b[..4092]);
    b[4092..4096].copy_from_slice(&crc.to_le_bytes());
    b
}

#[test]
fn header_corruption_is_rejected() {
    let head = ImageHead::build(&manifest(), None).unwrap();
    let good = head.to_bytes();

    assert!(matches!(
        Header::parse(&good[..100]),
        Err(ImageError::HeaderTooShort { len: 100 })
    ));

    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(Header::parse(&b), Err(ImageError::BadMagic));

    let mut b = good.clone();
    b[8] = 5;
    assert!(matches!(
        Header::parse(&b),
        Err(ImageError::UnsupportedFormat { found: 5 })
    ));

    // A format-1 image (valid crc) is refused with the advice to rebuild it.
    let mut b = good.clone();
    b[8] = 1;
    let e = Header::parse(&with_crc(b)).unwrap_err();
    assert_eq!(e, ImageError::UnsupportedFormat { found: 1 });
    assert!(
        e.to_string()
            .contains("understands format 4); rebuild the image with `nx image build`"),
        "{e}"
    );

    let mut b = good.clone();
    b[100] = 1; // reserved byte, crc not fixed
    assert!(matches!(
        Header::parse(&b),
        Err(ImageError::HeaderCrc { .. })
    ));
    assert!(matches!(
        Header::parse(&with_crc(b)),
        Err(ImageError::ReservedNotZero { offset: 100 })
    ));
}

type Mutation = Box<dyn Fn(&mut Vec<u8>)>;

fn set_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn set_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[test]
fn hostile_lengths_are_rejected_by_the_header() {
    let good = ImageHead::build(&manifest(), None).unwrap().to_bytes();
    let cases: Vec<(&str, Mutation)> = vec![
        ("manifest_len huge", Box::new(|b| set_u32(b, 24, u32::MAX))),
        (
            "manifest_len > bound",
            Box::new(|b| set_u32(b, 24, MAX_MANIFEST_LEN as u32 + 1)),
        ),
        ("manifest_len zero", Box::new(|b| set_u32(b, 24, 0))),
        ("manifest_offset", Box::new(|b| set_u64(b, 16, 0))),
        ("signature_offset", Box::new(|b| set_u64(b, 28, u64::MAX))),
        ("signature_len", Box::new(|b| set_u32(b, 36, 1 << 30))),
        ("data_offset huge", Box::new(|b| set_u64(b, 40, u64::MAX))),
        ("data_offset misaligned", Box::new(|b| set_u64(b, 40, 8193))),
        ("total_size huge", Box::new(|b| set_u64(b, 48, u64::MAX))),
        ("total_size below data", Box::new(|b| set_u64(b, 48, 4096))),
        ("header_len", Box::new(|b| set_u32(b, 12, 8192))),
    ];
    for (what, f) in cases {
        let mut b = good.clone();
        f(&mut b);
        let b = with_crc(b);
        assert!(
            matches!(Header::parse(&b), Err(ImageError::HeaderField { .. })),
            "{what}: {:?}",
            Header::parse(&b)
        );
        assert!(ImageHead::parse(&b).is_err(), "{what}");
    }
    // The largest head a valid header can announce stays within MAX_HEAD_LEN.
    assert!(data_offset_for(MAX_MANIFEST_LEN).unwrap() <= MAX_HEAD_LEN as u64);
}

#[test]
fn head_padding_and_length_are_strict() {
    let head = ImageHead::build(&manifest(), None).unwrap();
    let good = head.to_bytes();

    // wrong buffer length
    assert!(matches!(
        ImageHead::parse(&good[..good.len() - 1]),
        Err(ImageError::HeadLength { .. })
    ));
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(
        ImageHead::parse(&longer),
        Err(ImageError::HeadLength { .. })
    ));

    // non-zero byte in the unsigned signature slot
    let mut b = good.clone();
    b[HEADER_LEN + head.manifest_bytes.len()] = 1;
    assert!(matches!(
        ImageHead::parse(&b),
        Err(ImageError::HeadPaddingNotZero { .. })
    ));

    // non-zero byte in the padding
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] = 1;
    assert_eq!(
        ImageHead::parse(&b),
        Err(ImageError::HeadPaddingNotZero { offset: last })
    );

    // corrupted manifest byte
    let mut b = good.clone();
    b[HEADER_LEN + 20] ^= 0x20;
    assert!(matches!(ImageHead::parse(&b), Err(ImageError::Manifest(_))));
}

#[test]
fn header_must_agree_with_manifest() {
    let head = ImageHead::build(&manifest(), None).unwrap();
    let mut b = head.to_bytes();
    set_u64(&mut b, 48, head.header.total_size + 4096);
    let b = with_crc(b);
    assert!(matches!(
        ImageHead::parse(&b),
        Err(ImageError::HeaderManifestMismatch {
            field: "total_size",
            ..
        })
    ));

    // a manifest laid out for another data_offset cannot be built into a head
    let mut m = manifest();
    for s in &mut m.segments {
        s.offset += 4096;
    }
    m.total_size += 4096;
    m.image_sha256 = proto::manifest::image_sha256(&m.segments);
    assert!(matches!(
        ImageHead::build(&m, None),
        Err(ImageError::HeaderManifestMismatch { .. })
    ));
}

#[test]
fn layout_handles_large_manifests() {
    // Many data ranges push the manifest over several pages; the fixpoint must still hold.
    let mut content = vec![0u8; 4096 * 4000];
    for i in (0..4000).step_by(2) {
        content[i * 4096] = 1;
    }
    let mut h = SegmentHasher::new();
    h.update(&content);
    let m = layout("1", &[("sparse".into(), h.finish())]).unwrap();
    let head = ImageHead::build(&m, None).unwrap();
    assert!(head.header.data_offset > 8192);
    assert_eq!(ImageHead::parse(&head.to_bytes()).unwrap(), head);
}
