//! Sending only what changed: `PATCH` bodies (zstd frames compressed against a reference
//! range, like `zstd --patch-from`) and the base images the host can patch from.
//!
//! A chunk of the new image is compressed with a **prefix** the target already holds:
//! * against the target's **base image** (its active slot, or its installed file) when the
//!   target offers one ([`proto::msg::HelloReply::base`]) and the host holds an image with
//!   the same manifest id ([`Bases`]): the prefix is the same segment of the base, around
//!   the same relative offset ([`BASE_WINDOW`] before and after), so unchanged bytes cost a
//!   few bytes of matches even when they moved;
//! * otherwise against the image's **own earlier bytes** (the staging bytes the target has
//!   already accepted, [`SELF_WINDOW`] before the chunk — [`SELF_WINDOW_BEST`] at the
//!   slow-link levels, far enough back that the initramfs finds the rootfs's binaries
//!   across the kernel between them): chunks compress as one long stream would, not each
//!   on its own.
//!
//! The target decompresses with the same prefix and verifies every byte against the signed
//! manifest as for any other write: a wrong base can only cost a retry, never a bad install.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use proto::msg::{PatchSource, WriteBody, MAX_PATCH_REF};

use crate::image_file::ImageFile;

/// Bytes of the base segment before and after the chunk's own offset in the prefix.
pub const BASE_WINDOW: u64 = 4 * 1024 * 1024;
/// Bytes of the image's own earlier data in the prefix of a chunk sent without a base, at
/// [`QUICK_LEVEL`] and below (fast links: little host time and memory per chunk).
pub const SELF_WINDOW: u64 = 8 * 1024 * 1024;
/// The same above [`QUICK_LEVEL`] (slow links, `--compress zstd`): the host's time is
/// cheaper than the line's. With 8 MiB a full flash of the realistic OS was 1.06× `zstd -19
/// --long` of its uncompressed files; with this, 1.00× (`cargo xtask bench delta`).
pub const SELF_WINDOW_BEST: u64 = 32 * 1024 * 1024;
/// zstd level of a first, quick `PATCH` frame against the base: enough to find what is
/// unchanged (wherever it moved).
pub const QUICK_LEVEL: i32 = 3;
/// zstd level for the best ratio (`--compress zstd`, and slow links where the host's time
/// is cheaper than the line's).
pub const BEST_LEVEL: i32 = 19;
/// A quick base patch larger than this fraction of its chunk holds new bytes: it is
/// compressed again at the link's level.
const QUICK_ENOUGH: usize = 64;

/// The zstd level for `PATCH` frames on a link that took `written` bytes in `elapsed`: the
/// slower the line, the more host time a byte saved is worth (about 1 MB/s at level 19
/// against an 8 MiB prefix on one core, 60 MB/s at level 3): 19 on a line below 1 MB/s
/// (seen after 2 s), 9 below 10 MB/s (seen after 4 MiB), else 3. `--compress zstd` always
/// takes the best ratio.
pub fn level_for(
    mode: proto::session::CompressMode,
    written: u64,
    elapsed: std::time::Duration,
) -> i32 {
    if mode == proto::session::CompressMode::Zstd {
        return BEST_LEVEL;
    }
    let secs = elapsed.as_secs_f64();
    let rate = written as f64 / secs.max(1e-3);
    // A slow line shows itself within seconds; a fast one only after some megabytes (the
    // first writes land in socket buffers, the first acknowledgements wait for the target).
    if secs >= 2.0 && rate < 1e6 {
        BEST_LEVEL
    } else if written >= 4 << 20 && rate < 10e6 {
        9
    } else {
        QUICK_LEVEL
    }
}
/// Largest number of files looked at when searching a directory for base images.
const MAX_CANDIDATES: usize = 256;

// Every prefix fits what the target accepts.
const _: () = assert!(2 * BASE_WINDOW + (proto::msg::MAX_CHUNK as u64) <= MAX_PATCH_REF as u64);
const _: () = assert!(SELF_WINDOW <= SELF_WINDOW_BEST);
const _: () = assert!(SELF_WINDOW_BEST <= MAX_PATCH_REF as u64);

/// Why a `--base` image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error("--base {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: crate::image_file::ImageFileError,
    },
}

/// The images the host can patch from, by manifest id.
#[derive(Debug, Default, Clone)]
pub struct Bases {
    by_id: HashMap<[u8; 32], Arc<ImageFile>>,
}

impl Bases {
    /// No base: chunks are compressed against the image's own earlier bytes only.
    pub fn none() -> Bases {
        Bases::default()
    }

    /// The `explicit` images (`--base`, each must be a valid image) plus every image file
    /// (`*.img`) in the directory of `img` (unreadable or invalid ones are skipped: they are
    /// only candidates). The image itself is never its own base.
    pub fn discover(
        img: &ImageFile,
        explicit: &[PathBuf],
        search: bool,
    ) -> Result<Bases, BaseError> {
        let mut b = Bases::default();
        let own = img.manifest().id();
        for p in explicit {
            let f = ImageFile::open(p).map_err(|source| BaseError::Open {
                path: p.clone(),
                source,
            })?;
            b.add(f, own);
        }
        if search {
            let dir = img
                .path()
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            for p in candidates(dir, img.path()) {
                if let Ok(f) = ImageFile::open(&p) {
                    b.add(f, own);
                }
            }
        }
        Ok(b)
    }

    fn add(&mut self, f: ImageFile, own: [u8; 32]) {
        let id = f.manifest().id();
        if id != own {
            self.by_id.entry(id).or_insert_with(|| Arc::new(f));
        }
    }

    /// Manifest ids of the bases (for [`proto::session::SenderConfig::bases`]).
    pub fn ids(&self) -> Vec<[u8; 32]> {
        let mut v: Vec<_> = self.by_id.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The base with this manifest id.
    pub fn get(&self, id: &[u8; 32]) -> Option<Arc<ImageFile>> {
        self.by_id.get(id).cloned()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

/// `*.img` files in `dir` other than `own`, in name order, at most [`MAX_CANDIDATES`].
fn candidates(dir: &Path, own: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let own = std::fs::canonicalize(own).ok();
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .filter(|p| p.is_file())
        .filter(|p| own.is_none() || std::fs::canonicalize(p).ok() != own)
        .take(MAX_CANDIDATES)
        .collect();
    v.sort();
    v
}

/// Where the prefix of a chunk comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reference {
    pub source: PatchSource,
    pub offset: u64,
    pub len: u32,
}

/// The prefix for the chunk at absolute `offset` (`len` bytes) of `img`: the same segment of
/// `base` around the same relative offset, or the image's own bytes before the chunk (how
/// far back depends on the zstd `level`, see [`SELF_WINDOW_BEST`]).
pub fn reference(
    img: &ImageFile,
    base: Option<&ImageFile>,
    offset: u64,
    len: u32,
    level: i32,
) -> Option<Reference> {
    if let Some(base) = base {
        let m = img.manifest();
        let seg = m
            .segments
            .iter()
            .find(|s| s.offset <= offset && offset < s.end())?;
        if let Some(bs) = base.manifest().segment(&seg.name) {
            let rel = offset - seg.offset;
            let center = bs.offset.saturating_add(rel.min(bs.size));
            let lo = center.saturating_sub(BASE_WINDOW).max(bs.offset);
            let hi = center
                .saturating_add(u64::from(len) + BASE_WINDOW)
                .min(bs.end())
                .min(base.len());
            if hi > lo {
                return Some(Reference {
                    source: PatchSource::Base,
                    offset: lo,
                    len: u32::try_from(hi - lo).ok()?,
                });
            }
        }
    }
    self_reference(offset, level)
}

/// The image's own bytes before the chunk at absolute `offset` (up to [`SELF_WINDOW`], or
/// [`SELF_WINDOW_BEST`] above [`QUICK_LEVEL`]).
fn self_reference(offset: u64, level: i32) -> Option<Reference> {
    let window = if level > QUICK_LEVEL {
        SELF_WINDOW_BEST
    } else {
        SELF_WINDOW
    };
    let lo = offset.saturating_sub(window);
    (offset > lo).then(|| Reference {
        source: PatchSource::Staging,
        offset: lo,
        len: (offset - lo) as u32,
    })
}

/// Where the chunk at `offset` (`len` bytes) of `img` sits in `base` if nothing moved: the
/// same segment, the same relative offset (`None` when the base has no such range).
fn same_place(img: &ImageFile, base: &ImageFile, offset: u64, len: u32) -> Option<u64> {
    let seg = img
        .manifest()
        .segments
        .iter()
        .find(|s| s.offset <= offset && offset < s.end())?;
    let bs = base.manifest().segment(&seg.name)?;
    let at = bs.offset.checked_add(offset - seg.offset)?;
    let end = at.checked_add(u64::from(len))?;
    (end <= bs.end() && end <= base.len()).then_some(at)
}

/// One zstd frame of `data` with `prefix` as its single-use dictionary (`--patch-from`).
pub fn patch_frame(prefix: &[u8], data: &[u8], level: i32) -> Option<Vec<u8>> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::try_create()?;
    let span = (prefix.len() + data.len()).max(1) as u64;
    // Window: large enough to reach the start of the prefix from the end of the data.
    let wlog = (64 - (span - 1).leading_zeros()).clamp(10, 27);
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .ok()?;
    cctx.set_parameter(CParameter::WindowLog(wlog)).ok()?;
    if level > QUICK_LEVEL {
        // The match finder's own tables follow the window at the high levels (a 32 MiB
        // prefix would mean ~80 MiB of tables set up for every 1 MiB chunk): cap them at
        // what one chunk and its neighbourhood need; long-distance matching finds the
        // prefix's far bytes. (The quick levels' defaults are below these caps.)
        cctx.set_parameter(CParameter::HashLog(wlog.min(21))).ok()?;
        cctx.set_parameter(CParameter::ChainLog(wlog.min(22)))
            .ok()?;
    }
    // Long-distance matching finds the prefix's bytes however far back they are (what
    // `zstd --long --patch-from` does); the regular match finder of the fast levels keeps
    // too few positions of a multi-MiB prefix.
    cctx.set_parameter(CParameter::EnableLongDistanceMatching(true))
        .ok()?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true)).ok()?;
    cctx.set_parameter(CParameter::ChecksumFlag(false)).ok()?;
    cctx.ref_prefix(prefix).ok()?;
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).ok()?;
    Some(out)
}

/// The decoding side of [`patch_frame`] (the target's is flashd's `patch::decode`).
#[cfg(test)]
fn unpatch(prefix: &[u8], frame: &[u8], len: usize) -> Option<Vec<u8>> {
    use zstd::zstd_safe::{DCtx, DParameter};
    let mut d = DCtx::try_create()?;
    d.set_parameter(DParameter::WindowLogMax(27)).ok()?;
    d.ref_prefix(prefix).ok()?;
    let mut out = Vec::with_capacity(len);
    let n = d.decompress(&mut out, frame).ok()?;
    (n == len).then_some(out)
}

/// The body for one chunk: a `PATCH` against the base (`base` set) or the image's own earlier
/// bytes (`staging`), else a plain zstd frame made by `plain`; `None` when nothing worked.
pub fn compress_chunk(
    img: &ImageFile,
    base: Option<&ImageFile>,
    staging: bool,
    offset: u64,
    data: &[u8],
    level: i32,
    plain: impl FnOnce(&[u8]) -> Option<Vec<u8>>,
) -> Option<WriteBody> {
    let len = u32::try_from(data.len()).ok()?;
    let r = if base.is_some() || staging {
        reference(img, base, offset, len, level)
    } else {
        None
    };
    let r = r.filter(|r| r.source == PatchSource::Base || staging);
    // Fast path: the chunk is byte for byte what the base holds at the same place (most of
    // an update): its own bytes are the whole prefix, a few bytes of frame, little work on
    // either side.
    if let (Some(r), Some(base)) = (r, base) {
        if r.source == PatchSource::Base {
            if let Some(same) = same_place(img, base, offset, len) {
                if let Ok(prefix) = base.read_at(same, len) {
                    if prefix[..] == data[..] {
                        if let Some(frame) = patch_frame(&prefix, data, QUICK_LEVEL) {
                            return Some(WriteBody::Patch {
                                source: PatchSource::Base,
                                ref_offset: same,
                                ref_len: len,
                                frame: Bytes::from(frame),
                            });
                        }
                    }
                }
            }
        }
    }
    if let Some(r) = r {
        let src = match r.source {
            PatchSource::Base => base?,
            _ => img,
        };
        if let Ok(prefix) = src.read_at(r.offset, r.len) {
            if prefix.len() == r.len as usize {
                let frame = if r.source == PatchSource::Base {
                    // Mostly unchanged chunks are done at the quick level; chunks with new
                    // bytes are worth the link's level.
                    let quick = patch_frame(&prefix, data, QUICK_LEVEL.min(level));
                    match quick {
                        Some(q) if q.len() <= data.len() / QUICK_ENOUGH || level <= QUICK_LEVEL => {
                            Some(q)
                        }
                        q => match (q, patch_frame(&prefix, data, level)) {
                            (Some(q), Some(b)) => Some(if b.len() < q.len() { b } else { q }),
                            (q, b) => b.or(q),
                        },
                    }
                } else {
                    patch_frame(&prefix, data, level)
                };
                let mut best = frame.map(|f| (r, f));
                // New bytes against a base: the image's own earlier bytes may hold them
                // better (the later chunks of a new file repeat its first ones, which the
                // base never had). Only for chunks the base did not nearly cover, and only
                // at the link's level (where the ratio is worth the time).
                let new_bytes = best
                    .as_ref()
                    .is_none_or(|(_, f)| f.len() > data.len() / QUICK_ENOUGH);
                if r.source == PatchSource::Base && staging && level > QUICK_LEVEL && new_bytes {
                    if let Some(s) = self_reference(offset, level) {
                        if let Ok(prefix) = img.read_at(s.offset, s.len) {
                            if let Some(f) = patch_frame(&prefix, data, level) {
                                if best.as_ref().is_none_or(|(_, b)| f.len() < b.len()) {
                                    best = Some((s, f));
                                }
                            }
                        }
                    }
                }
                if let Some((r, frame)) = best {
                    return Some(WriteBody::Patch {
                        source: r.source,
                        ref_offset: r.offset,
                        ref_len: r.len,
                        frame: Bytes::from(frame),
                    });
                }
            }
        }
    }
    plain(data).map(|z| WriteBody::Zstd(Bytes::from(z)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_round_trips_and_unchanged_bytes_cost_almost_nothing() {
        let mut old = vec![0u8; 3 << 20];
        let mut x: u32 = 1;
        for b in old.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        // The new chunk: 1 MiB of the old bytes, moved by 4 KiB, with 100 bytes changed.
        let mut new = old[(1 << 20) + 4096..(2 << 20) + 4096].to_vec();
        for b in &mut new[5000..5100] {
            *b ^= 0x5a;
        }
        let f = patch_frame(&old, &new, 3).unwrap();
        assert!(
            f.len() < 2000,
            "patch of 100 changed bytes is {} bytes",
            f.len()
        );
        assert_eq!(unpatch(&old, &f, new.len()).unwrap(), new);
        // With other bytes as the prefix it does not decode to the data.
        let other = vec![0u8; old.len()];
        assert!(unpatch(&other, &f, new.len()).is_none_or(|o| o != new));
    }
}

/// What sending an image would cost, chunk by chunk, computed offline ([`estimate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentEstimate {
    pub name: String,
    /// Bytes in data ranges (what the plan carries).
    pub data_bytes: u64,
    /// Data bytes sent as patches against the base.
    pub patched_bytes: u64,
    /// Data bytes sent compressed (against the image's own earlier bytes, or plain zstd).
    pub compressed_bytes: u64,
    /// Data bytes sent raw (compression did not pay).
    pub raw_bytes: u64,
    /// Data bytes the target computes itself (the dm-verity hash tree: `DERIVE`).
    pub derived_bytes: u64,
    /// Bytes of WRITE bodies on the wire (framing excluded).
    pub wire_bytes: u64,
}

/// Compress every chunk of `img`'s plan at `chunk_size` exactly as `nx flash send` does
/// against `base` (or none), on `threads` threads: the bytes a transfer would put on the
/// wire. All-zero chunks cost nothing.
pub fn estimate(
    img: &ImageFile,
    base: Option<&ImageFile>,
    chunk_size: u32,
    level: i32,
    derive: bool,
    threads: usize,
) -> Result<Vec<SegmentEstimate>, proto::session::PlanError> {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    let plan = proto::session::Plan::new(img.manifest(), chunk_size)?;
    let mut segs: Vec<SegmentEstimate> = img
        .manifest()
        .segments
        .iter()
        .map(|s| SegmentEstimate {
            name: s.name.clone(),
            data_bytes: s.data_bytes(),
            ..SegmentEstimate::default()
        })
        .collect();
    let next = AtomicU32::new(1);
    let out = Mutex::new(&mut segs);
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = plan.chunk(seq) else { break };
                let Ok(data) = img.read_at(c.offset, c.len) else {
                    break;
                };
                let n = data.len() as u64;
                let derived = derive
                    && img.manifest().segments.get(c.segment).is_some_and(|s| {
                        s.size <= proto::msg::MAX_DERIVED
                            && img.manifest().verity.iter().any(|v| v.hash == s.name)
                    });
                let (kind, wire) = if derived {
                    (4, 0)
                } else if proto::manifest::is_all_zero(&data) {
                    (0, 0)
                } else {
                    match compress_chunk(img, base, true, c.offset, &data, level, |d| {
                        zstd::bulk::compress(d, crate::send::ZSTD_LEVEL).ok()
                    }) {
                        Some(b) if b.wire_len() as u64 <= n - n / 16 => {
                            let k = match &b {
                                WriteBody::Patch {
                                    source: PatchSource::Base,
                                    ..
                                } => 1,
                                _ => 2,
                            };
                            (k, b.wire_len() as u64)
                        }
                        _ => (3, n),
                    }
                };
                if let Ok(mut segs) = out.lock() {
                    if let Some(s) = segs.get_mut(c.segment) {
                        s.wire_bytes += wire;
                        match kind {
                            1 => s.patched_bytes += n,
                            2 => s.compressed_bytes += n,
                            3 => s.raw_bytes += n,
                            4 => s.derived_bytes += n,
                            _ => {}
                        }
                    }
                }
            });
        }
    });
    Ok(segs)
}
