//! Which prefix a compressed chunk uses (`nx_engine::delta::compress_chunk`): the image's own
//! earlier bytes reach further back on slow links (the realistic OS has its kernel between the
//! rootfs and the initramfs that repeats the rootfs's binaries), and a chunk with new bytes
//! against a base also tries the image's own bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nx_engine::delta::{compress_chunk, BEST_LEVEL, QUICK_LEVEL, SELF_WINDOW, SELF_WINDOW_BEST};
use nx_engine::image_file::ImageFile;
use proto::image::{layout, ImageHead};
use proto::manifest::SegmentHasher;
use proto::msg::{PatchSource, WriteBody};
use std::path::Path;

const MIB: usize = 1 << 20;

fn noise(seed: u32, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// An image file at `path` with one segment holding `data`; opened.
fn image(path: &Path, data: &[u8]) -> ImageFile {
    let mut h = SegmentHasher::new();
    h.update(data);
    let m = layout("1.0", &[("rootfs".to_string(), h.finish())]).unwrap();
    let mut out = ImageHead::build(&m, None).unwrap().to_bytes();
    let seg = &m.segments[0];
    out.resize(seg.offset as usize, 0);
    out.extend_from_slice(data);
    out.resize(seg.padded_end() as usize, 0);
    std::fs::write(path, out).unwrap();
    ImageFile::open(path).unwrap()
}

fn seg_offset(img: &ImageFile) -> u64 {
    img.manifest().segments[0].offset
}

fn frame_of(body: Option<WriteBody>) -> (PatchSource, usize) {
    match body {
        Some(WriteBody::Patch { source, frame, .. }) => (source, frame.len()),
        other => panic!("expected a PATCH, got {other:?}"),
    }
}

#[test]
fn the_self_prefix_reaches_further_back_on_slow_links() {
    const { assert!(SELF_WINDOW < 12 * MIB as u64 && SELF_WINDOW_BEST > 14 * MIB as u64) };
    let dir = tempfile::tempdir().unwrap();
    // r, 12 MiB of other incompressible bytes, r again: only a window beyond 12 MiB finds it.
    let r = noise(1, MIB);
    let mut data = r.clone();
    data.extend(noise(2, 12 * MIB));
    data.extend(&r);
    let img = image(&dir.path().join("i.img"), &data);
    let at = seg_offset(&img) + 13 * MIB as u64;
    let (src, best) = frame_of(compress_chunk(&img, None, true, at, &r, BEST_LEVEL, |_| {
        None
    }));
    assert_eq!(src, PatchSource::Staging);
    assert!(
        best < 4096,
        "the repeat 13 MiB back costs {best} bytes at level 19"
    );
    // At the quick level (fast links) the window is short: the repeat is out of reach.
    let quick = compress_chunk(&img, None, true, at, &r, QUICK_LEVEL, |_| None);
    if let Some(WriteBody::Patch { frame, .. }) = quick {
        assert!(frame.len() > MIB / 2, "{} bytes", frame.len());
    }
}

#[test]
fn new_bytes_against_a_base_may_use_the_image_itself() {
    let dir = tempfile::tempdir().unwrap();
    // v1: a; v2: a, then a new file n of 2 MiB whose second MiB repeats its first.
    let a = noise(3, 3 * MIB);
    let n = noise(4, MIB);
    let base = image(&dir.path().join("v1.img"), &a);
    let mut v2 = a.clone();
    v2.extend(&n);
    v2.extend(&n);
    let img = image(&dir.path().join("v2.img"), &v2);
    let at = seg_offset(&img) + 4 * MIB as u64;
    let (src, len) = frame_of(compress_chunk(
        &img,
        Some(&base),
        true,
        at,
        &n,
        BEST_LEVEL,
        |_| None,
    ));
    assert_eq!(src, PatchSource::Staging, "the base never had n");
    assert!(len < 4096, "{len} bytes");
    // An unchanged chunk still goes against the base.
    let at0 = seg_offset(&img);
    let (src, len) = frame_of(compress_chunk(
        &img,
        Some(&base),
        true,
        at0,
        &a[..MIB],
        BEST_LEVEL,
        |_| None,
    ));
    assert_eq!(src, PatchSource::Base);
    assert!(len < 4096, "{len} bytes");
    // Without self patches (the target did not offer them) the base is all there is.
    let b = compress_chunk(&img, Some(&base), false, at, &n, BEST_LEVEL, |_| None);
    assert!(matches!(
        b,
        Some(WriteBody::Patch {
            source: PatchSource::Base,
            ..
        }) | None
    ));
}
