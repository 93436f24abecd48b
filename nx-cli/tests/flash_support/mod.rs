//! Test support shared by the `flash_*` tests: images and hashes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// A test image: a dense `kernel`, a `rootfs` with zero runs, a small `extra`.
pub fn test_image(seed: u64, scale: usize) -> Vec<u8> {
    use flashd::testkit::{build_image, noise};
    let mut rootfs = noise(seed + 1, 100_000 * scale);
    rootfs.extend(vec![0u8; 300_000 * scale]);
    rootfs.extend(noise(seed + 2, 150_000 * scale));
    build_image(
        "2.0",
        &[
            ("kernel", noise(seed, 200_000 * scale)),
            ("rootfs", rootfs),
            ("extra", noise(seed + 3, 10_000)),
        ],
        None,
    )
    .unwrap()
}

pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}
