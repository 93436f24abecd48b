#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Per-piece SHA-256 (`chunk_sha256`, manifest format 4): one entry per 1 MiB piece that holds
//! data, checked by `Manifest::validate`, covered by the signature, and precise enough that a
//! flipped byte in any piece is caught by that piece's entry alone.

use proto::image::{layout, public_key_of, sign_manifest, ImageHead};
use proto::manifest::{Manifest, ManifestError, SegmentHasher, HASH_CHUNK};
use sha2::{Digest, Sha256};

const MIB: usize = HASH_CHUNK as usize;

/// 2.5 MiB of data, then a whole all-zero piece, then a short data tail.
fn content() -> Vec<u8> {
    let mut v: Vec<u8> = (0..MIB * 5 / 2).map(|i| (i % 251) as u8 | 1).collect();
    v.resize(MIB * 4, 0); // piece 2 is half data, piece 3 is all zero
    v.extend((0..1000).map(|i| (i % 7) as u8 + 1)); // piece 4: short tail
    v
}

fn manifest_of(v: &[u8]) -> Manifest {
    let mut h = SegmentHasher::new();
    // Feed in odd-sized pieces: the result must not depend on how the bytes arrive.
    for part in v.chunks(300_001) {
        h.update(part);
    }
    layout("1", &[("rootfs".to_string(), h.finish())]).unwrap()
}

#[test]
fn one_entry_per_data_piece_and_each_matches_its_bytes() {
    let v = content();
    let m = manifest_of(&v);
    let seg = &m.segments[0];
    // pieces 0, 1, 2 and 4 hold data; piece 3 is all zero and has no entry
    assert_eq!(seg.chunk_sha256.len(), 4);
    assert_eq!(seg.data_pieces(usize::MAX), 4);
    for (k, piece) in v.chunks(MIB).enumerate() {
        let rel = (k * MIB) as u64;
        let got = seg.piece_hash(rel, piece.len() as u64);
        if k == 3 {
            assert_eq!(got, None, "the all-zero piece has no entry");
        } else {
            let want: [u8; 32] = Sha256::digest(piece).into();
            assert_eq!(got, Some(want), "piece {k}");
        }
    }
    // Not whole or not aligned: no per-piece hash (the segment hash checks those).
    assert_eq!(seg.piece_hash(0, 4096), None);
    assert_eq!(seg.piece_hash(4096, HASH_CHUNK), None);
    assert_eq!(seg.piece_hash(4 * HASH_CHUNK, 999), None);
}

#[test]
fn a_flipped_byte_in_any_piece_fails_only_that_piece() {
    let v = content();
    let m = manifest_of(&v);
    let seg = &m.segments[0];
    for at in [0, MIB - 1, MIB + 12_345, 2 * MIB + 7, 4 * MIB + 999] {
        let mut bad = v.clone();
        bad[at] ^= 0x40;
        let k = at / MIB;
        for (j, piece) in bad.chunks(MIB).enumerate() {
            let Some(want) = seg.piece_hash((j * MIB) as u64, piece.len() as u64) else {
                continue;
            };
            let got: [u8; 32] = Sha256::digest(piece).into();
            assert_eq!(got == want, j != k, "flip at {at}: piece {j}");
        }
    }
}

#[test]
fn round_trip_and_a_wrong_list_is_rejected() {
    let m = manifest_of(&content());
    let bytes = m.to_canonical_bytes();
    assert_eq!(Manifest::from_bytes(&bytes).unwrap(), m);

    let mut short = m.clone();
    short.segments[0].chunk_sha256.pop();
    assert!(matches!(
        short.validate(),
        Err(ManifestError::ChunkHashes {
            expected: 4,
            found: 3,
            ..
        })
    ));
    assert!(Manifest::from_bytes(&short.to_canonical_bytes()).is_err());
}

#[test]
fn the_signature_covers_the_list() {
    let m = manifest_of(&content());
    let seed = [7u8; 32];
    let sig = sign_manifest(&seed, &m.to_canonical_bytes());
    let head = ImageHead::build(&m, Some(sig)).unwrap();
    let key = public_key_of(&seed);
    head.verify_signature(&key).unwrap();

    // Same manifest with one piece hash changed (still structurally valid): the signature
    // made over the original bytes no longer verifies.
    let mut forged = m.clone();
    forged.segments[0].chunk_sha256[1][0] ^= 1;
    forged.validate().unwrap();
    let mut forged_head = ImageHead::build(&forged, None).unwrap();
    forged_head.signature = Some(sig);
    assert!(forged_head.verify_signature(&key).is_err());
}

#[test]
fn hashed_pieces_lists_every_entry_with_its_range() {
    let v = content();
    let m = manifest_of(&v);
    let seg = &m.segments[0];
    let got: Vec<_> = seg
        .hashed_pieces()
        .map(|p| (p.rel_offset, p.len, p.sha256))
        .collect();
    let want: Vec<_> = [0usize, 1, 2, 4]
        .iter()
        .map(|k| {
            let rel = k * MIB;
            let bytes = &v[rel..(rel + MIB).min(v.len())];
            (
                rel as u64,
                bytes.len() as u64,
                <[u8; 32]>::from(Sha256::digest(bytes)),
            )
        })
        .collect();
    assert_eq!(got, want);
    // The short last piece is listed with its true length.
    assert_eq!(got.last().unwrap().1, 1000);
}
