//! The block-device install: copy the verified staging file into the device with large aligned
//! `O_DIRECT` writes, fsync, then read the device back (again `O_DIRECT`, so the bytes come
//! from the disk and not from the page cache) and check them.
//!
//! What the read-back is checked against:
//!
//! * [`Expect::Image`] (flashd's installs): the image the receiver verified — the head bytes
//!   (whose manifest has the verified image id), every segment's SHA-256 from that manifest,
//!   zeros everywhere else. The device is thus compared end to end with the manifest, not with
//!   a second reading of the staging file, and the copy itself needs no hashing: one SHA-256
//!   pass for the install instead of two.
//! * [`Expect::Copied`] (any other staging content): the SHA-256 of what was read from the
//!   staging file during the copy.
//!
//! Reads run on a helper thread with a few 1 MiB buffers in flight, so disk I/O (done by the
//! host) overlaps hashing (done by the guest CPU).

use crate::error::{io_err, StoreError};
pub use nx_guest::fsx::{AlignedBuf, ALIGN};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::time::Instant;

/// Block size for copies during install and read-back.
pub const COPY_BLOCK: usize = 1 << 20;
/// Buffers in flight between the reading thread and the consumer.
const DEPTH: usize = 3;

/// The image the device must hold after the install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedImage {
    /// The bytes `[0, data_offset)`.
    pub head: Vec<u8>,
    /// `(offset, size, sha256)` of each segment, in file order.
    pub segments: Vec<(u64, u64, [u8; 32])>,
    pub total_size: u64,
}

impl ExpectedImage {
    /// From a parsed image head.
    pub fn new(head: Vec<u8>, manifest: &proto::manifest::Manifest) -> ExpectedImage {
        let mut segments: Vec<(u64, u64, [u8; 32])> = manifest
            .segments
            .iter()
            .map(|s| (s.offset, s.size, s.sha256))
            .collect();
        segments.sort_by_key(|s| s.0);
        ExpectedImage {
            head,
            segments,
            total_size: manifest.total_size,
        }
    }

    /// Read and parse the head of the image in `staging`; its manifest must have `image_id`
    /// (the id of the image the receiver verified).
    pub fn from_staging(
        staging: &File,
        path: &Path,
        image_id: &[u8; 32],
    ) -> Result<ExpectedImage, StoreError> {
        let invalid = |reason: String| StoreError::RecordInvalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut header = vec![0u8; proto::image::HEADER_LEN];
        staging
            .read_exact_at(&mut header, 0)
            .map_err(io_err("read", path))?;
        let h = proto::image::Header::parse(&header)
            .map_err(|e| invalid(format!("staging head: {e}")))?;
        let len = usize::try_from(h.data_offset)
            .ok()
            .filter(|n| *n <= proto::image::MAX_HEAD_LEN)
            .ok_or_else(|| invalid("staging head too long".into()))?;
        let mut head = vec![0u8; len];
        staging
            .read_exact_at(&mut head, 0)
            .map_err(io_err("read", path))?;
        let parsed = proto::image::ImageHead::parse(&head)
            .map_err(|e| invalid(format!("staging head: {e}")))?;
        if &parsed.manifest.id() != image_id {
            return Err(invalid(
                "the staging file holds another image than the one verified".into(),
            ));
        }
        Ok(ExpectedImage::new(head, &parsed.manifest))
    }
}

/// What the read-back is compared with.
pub enum Expect<'a> {
    Image(&'a ExpectedImage),
    /// SHA-256 of the bytes read from the staging file during the copy.
    Copied,
}

/// Where the time of a block install went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub copy: std::time::Duration,
    pub sync: std::time::Duration,
    pub verify: std::time::Duration,
}

/// Read `len` bytes of `file` from offset 0 in [`COPY_BLOCK`] pieces on a helper thread,
/// handing them to `f(offset, bytes)` in order. Each read asks for whole [`ALIGN`] blocks
/// (for `O_DIRECT`); a short read at the end of the file is fine as long as it covers `len`.
fn pipelined_read(
    file: &File,
    path: &Path,
    len: u64,
    f: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    pipelined_read_ranges(file, path, std::iter::once(Ok((0, len))), f)
}

/// [`pipelined_read`] of the given `(start, end)` ranges only, in order.
fn pipelined_read_ranges(
    file: &File,
    path: &Path,
    ranges: impl Iterator<Item = io::Result<(u64, u64)>> + Send,
    mut f: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    let (full_tx, full_rx) = mpsc::sync_channel::<io::Result<(AlignedBuf, u64, usize)>>(DEPTH);
    for _ in 0..DEPTH {
        let _ = free_tx.send(AlignedBuf::new(COPY_BLOCK));
    }
    std::thread::scope(|s| {
        s.spawn(move || {
            for range in ranges {
                let (mut off, end) = match range {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = full_tx.send(Err(e));
                        return;
                    }
                };
                while off < end {
                    let Ok(mut buf) = free_rx.recv() else { return };
                    let need = (end - off).min(COPY_BLOCK as u64) as usize;
                    let ask = need.next_multiple_of(ALIGN).min(COPY_BLOCK);
                    let slot = buf.as_mut_slice().get_mut(..ask).unwrap_or_default();
                    let r = read_at_least(file, slot, off, need);
                    let failed = r.is_err();
                    if full_tx.send(r.map(|()| (buf, off, need))).is_err() || failed {
                        return;
                    }
                    off += need as u64;
                }
            }
        });
        let mut result = Ok(());
        for item in full_rx.iter() {
            let step = item
                .map_err(io_err("read", path))
                .and_then(|(buf, off, n)| {
                    let r = f(off, buf.as_slice().get(..n).unwrap_or_default());
                    let _ = free_tx.send(buf);
                    r
                });
            if let Err(e) = step {
                result = Err(e);
                break;
            }
        }
        // Dropping the receivers stops the reader at its next send.
        drop(full_rx);
        drop(free_tx);
        result
    })
}

/// The data extents of `file` in `[0, len)` (`SEEK_DATA`/`SEEK_HOLE`), widened to whole
/// [`ALIGN`] blocks; the whole range where the file system cannot tell. Holes read as zeros,
/// so they need not be read at all.
struct Extents<'a> {
    file: &'a File,
    len: u64,
    pos: u64,
    whole: bool,
}

impl<'a> Extents<'a> {
    fn new(file: &'a File, len: u64) -> Extents<'a> {
        Extents {
            file,
            len,
            pos: 0,
            whole: false,
        }
    }
}

impl Iterator for Extents<'_> {
    type Item = io::Result<(u64, u64)>;
    fn next(&mut self) -> Option<Self::Item> {
        use rustix::fs::{seek, SeekFrom};
        if self.pos >= self.len {
            return None;
        }
        if self.whole {
            let r = (self.pos, self.len);
            self.pos = self.len;
            return Some(Ok(r));
        }
        let start = match seek(self.file, SeekFrom::Data(self.pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => {
                self.pos = self.len; // only a hole up to the end
                return None;
            }
            Err(_) => {
                self.whole = true;
                return self.next();
            }
        };
        if start >= self.len {
            self.pos = self.len;
            return None;
        }
        let end = seek(self.file, SeekFrom::Hole(start))
            .unwrap_or(self.len)
            .min(self.len);
        let align = ALIGN as u64;
        let a = (start - start % align).max(self.pos);
        let b = end.next_multiple_of(align).max(a + align).min(self.len);
        self.pos = b;
        Some(Ok((a, b)))
    }
}

/// Make `[off, off + len)` of the device read as zeros: `fallocate(ZERO_RANGE)` (the device
/// zeroes it without the data crossing the bus), else plain writes of zeros.
pub(crate) fn zero_range(dev: &File, device: &Path, off: u64, len: u64) -> Result<(), StoreError> {
    if len == 0 {
        return Ok(());
    }
    let flags = rustix::fs::FallocateFlags::ZERO_RANGE | rustix::fs::FallocateFlags::KEEP_SIZE;
    if rustix::fs::fallocate(dev, flags, off, len).is_ok() {
        return Ok(());
    }
    static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(ZEROS.len() as u64) as usize;
        dev.write_all_at(ZEROS.get(..n).unwrap_or_default(), off + done)
            .map_err(io_err("write", device))?;
        done += n as u64;
    }
    Ok(())
}

/// `pread` into `buf` at `off` until at least `need` bytes arrived (EOF before that is an error).
fn read_at_least(file: &File, buf: &mut [u8], off: u64, need: usize) -> io::Result<()> {
    let mut got = 0;
    while got < need {
        let slot = buf.get_mut(got..).unwrap_or_default();
        match file.read_at(slot, off + got as u64) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "end of file at {} (wanted {need} bytes at {off})",
                        off + got as u64
                    ),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Open `path` with `O_DIRECT` (for reading and writing), or `None` where the file system
/// refuses it (tmpfs in tests): then the plain descriptor is used.
/// Open `path` read-only with `O_DIRECT` (reads come from the disk, not the page cache), or
/// `None` where that is refused.
pub fn open_direct_read(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Read `buf.len()` bytes at the block-aligned `off` into an aligned buffer (works with an
/// `O_DIRECT` descriptor), then hand the first `want` bytes to `f`.
fn read_aligned<T>(
    file: &File,
    path: &Path,
    off: u64,
    want: usize,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<T, StoreError> {
    let mut buf = AlignedBuf::new(want.next_multiple_of(ALIGN).max(ALIGN));
    read_at_least(file, buf.as_mut_slice(), off, want).map_err(io_err("read", path))?;
    Ok(f(buf.as_slice().get(..want).unwrap_or_default()))
}

/// Read the image head back from `file` (offset 0) and check that its manifest is the image
/// `image_id`.
pub fn check_head(file: &File, path: &Path, image_id: &[u8; 32]) -> Result<(), StoreError> {
    let invalid = |reason: String| StoreError::ReadBackMismatch {
        path: path.to_path_buf(),
        expected: format!("the head of image {}", hex::encode(image_id)),
        actual: reason,
    };
    let header = read_aligned(file, path, 0, proto::image::HEADER_LEN, |b| {
        proto::image::Header::parse(b).map(|h| h.data_offset)
    })?
    .map_err(|e| invalid(format!("head: {e}")))?;
    let len = usize::try_from(header)
        .ok()
        .filter(|n| *n <= proto::image::MAX_HEAD_LEN)
        .ok_or_else(|| invalid("head too long".into()))?;
    let id = read_aligned(file, path, 0, len, |b| {
        proto::image::ImageHead::parse(b).map(|p| p.manifest.id())
    })?
    .map_err(|e| invalid(format!("head: {e}")))?;
    if &id != image_id {
        return Err(invalid(format!("image {}", hex::encode(id))));
    }
    Ok(())
}

fn open_direct(path: &Path) -> Option<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// Copy `size` bytes of `staging` into `dev`, fsync, read back and check (module docs).
pub fn install_block(
    staging: &File,
    staging_path: &Path,
    size: u64,
    dev: &File,
    device: &Path,
    expect: Expect<'_>,
) -> Result<Phases, StoreError> {
    let mut phases = Phases::default();
    let direct = open_direct(device);

    // Copy.
    let t = Instant::now();
    let mut copied = matches!(expect, Expect::Copied).then(Sha256::new);
    let mut direct_ok = direct.is_some();
    // Only the data extents of the (sparse) staging file are read and written; the holes
    // between them become zero ranges on the device. (The generic mode hashes every byte it
    // copies, so it reads everything.)
    let ranges: Box<dyn Iterator<Item = io::Result<(u64, u64)>> + Send> = match expect {
        Expect::Image(_) => Box::new(Extents::new(staging, size)),
        Expect::Copied => Box::new(std::iter::once(Ok((0, size)))),
    };
    let mut next = 0u64;
    pipelined_read_ranges(staging, staging_path, ranges, |off, data| {
        if off > next {
            zero_range(dev, device, next, off - next)?;
        }
        next = off + data.len() as u64;
        if let Some(h) = &mut copied {
            h.update(data);
        }
        let aligned = data.len().is_multiple_of(ALIGN) && off.is_multiple_of(ALIGN as u64);
        if let (true, true, Some(d)) = (aligned, direct_ok, &direct) {
            match d.write_all_at(data, off) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => direct_ok = false,
                Err(e) => return Err(io_err("write", device)(e)),
            }
        }
        dev.write_all_at(data, off).map_err(io_err("write", device))
    })?;
    if size > next {
        zero_range(dev, device, next, size - next)?;
    }
    phases.copy = t.elapsed();

    // Durable.
    let t = Instant::now();
    dev.sync_all().map_err(io_err("fsync", device))?;
    phases.sync = t.elapsed();

    // Read back from the disk and check.
    let t = Instant::now();
    let reader = match (&direct, direct_ok) {
        (Some(d), true) => d,
        _ => {
            // No O_DIRECT here: drop the cached pages so the read-back comes from the disk.
            // SAFETY: plain fadvise on an open descriptor.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(dev),
                    0,
                    0,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
            dev
        }
    };
    match expect {
        Expect::Copied => {
            let written: [u8; 32] = copied.map(|h| h.finalize().into()).unwrap_or_default();
            let mut h = Sha256::new();
            pipelined_read(reader, device, size, |_, data| {
                h.update(data);
                Ok(())
            })?;
            let read: [u8; 32] = h.finalize().into();
            if read != written {
                return Err(StoreError::ReadBackMismatch {
                    path: device.to_path_buf(),
                    expected: hex::encode(written),
                    actual: hex::encode(read),
                });
            }
        }
        Expect::Image(img) => {
            let mut c = Checker::new(img, device);
            pipelined_read(reader, device, size, |off, data| c.feed(off, data))?;
            c.finish()?;
        }
    }
    phases.verify = t.elapsed();
    Ok(phases)
}

/// Streaming check of a read-back against an [`ExpectedImage`].
struct Checker<'a> {
    img: &'a ExpectedImage,
    path: &'a Path,
    /// The segment being hashed: index and hasher.
    seg: Option<(usize, Sha256)>,
    next_seg: usize,
}

impl<'a> Checker<'a> {
    fn new(img: &'a ExpectedImage, path: &'a Path) -> Checker<'a> {
        Checker {
            img,
            path,
            seg: None,
            next_seg: 0,
        }
    }

    fn mismatch(&self, what: String) -> StoreError {
        StoreError::ReadBackMismatch {
            path: self.path.to_path_buf(),
            expected: what,
            actual: "other bytes on the device".into(),
        }
    }

    /// Bytes `[off, off + data.len())`, fed in order.
    fn feed(&mut self, mut off: u64, mut data: &[u8]) -> Result<(), StoreError> {
        while !data.is_empty() {
            let head_len = self.img.head.len() as u64;
            if off < head_len {
                let n = ((head_len - off) as usize).min(data.len());
                let want = self
                    .img
                    .head
                    .get(off as usize..off as usize + n)
                    .unwrap_or_default();
                if data.get(..n) != Some(want) {
                    return Err(self.mismatch(format!("the image head at {off}")));
                }
                (off, data) = (off + n as u64, data.get(n..).unwrap_or_default());
                continue;
            }
            // Inside a segment being hashed?
            if let Some((i, h)) = &mut self.seg {
                let (s_off, s_size, s_sha) = self.img.segments.get(*i).copied().unwrap_or_default();
                let end = s_off.saturating_add(s_size);
                let n = (end.saturating_sub(off).min(data.len() as u64)) as usize;
                h.update(data.get(..n).unwrap_or_default());
                (off, data) = (off + n as u64, data.get(n..).unwrap_or_default());
                if off >= end {
                    let i = *i;
                    let digest: [u8; 32] = self
                        .seg
                        .take()
                        .map(|(_, h)| h.finalize().into())
                        .unwrap_or_default();
                    if digest != s_sha {
                        return Err(StoreError::ReadBackMismatch {
                            path: self.path.to_path_buf(),
                            expected: format!("segment #{i} sha256 {}", hex::encode(s_sha)),
                            actual: hex::encode(digest),
                        });
                    }
                }
                continue;
            }
            // Zero bytes until the next segment starts (or the end).
            let next = self.img.segments.get(self.next_seg).copied();
            let until = next.map_or(u64::MAX, |(o, _, _)| o);
            if off >= until {
                self.seg = Some((self.next_seg, Sha256::new()));
                self.next_seg += 1;
                continue;
            }
            let n = ((until - off).min(data.len() as u64)) as usize;
            if !is_zero(data.get(..n).unwrap_or_default()) {
                return Err(self.mismatch(format!("zeros at {off}..{}", off + n as u64)));
            }
            (off, data) = (off + n as u64, data.get(n..).unwrap_or_default());
        }
        Ok(())
    }

    fn finish(self) -> Result<(), StoreError> {
        if self.seg.is_some() || self.next_seg < self.img.segments.len() {
            return Err(self.mismatch("every segment on the device".into()));
        }
        Ok(())
    }
}

/// Whether every byte is zero (word-wise, so it vectorizes; this runs over every zero run of
/// a sparse image).
pub fn is_zero(d: &[u8]) -> bool {
    d.chunks(4096).all(|block| {
        let mut words = block.chunks_exact(8);
        let acc = words.by_ref().fold(0u64, |a, w| {
            a | u64::from_ne_bytes(w.try_into().unwrap_or([0xff; 8]))
        });
        acc == 0 && words.remainder().iter().all(|b| *b == 0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::{build_image, noise};

    /// An image with two segments (one with a zero run inside), its id and an expectation.
    fn image() -> (Vec<u8>, [u8; 32], ExpectedImage) {
        let mut b = noise(2, 3 << 20);
        b[(1 << 20)..(2 << 20)].fill(0);
        let bytes = build_image("7", &[("kernel", noise(1, 70_001)), ("rootfs", b)], None).unwrap();
        let h = proto::image::Header::parse(&bytes).unwrap();
        let head = bytes[..h.data_offset as usize].to_vec();
        let parsed = proto::image::ImageHead::parse(&head).unwrap();
        let id = parsed.manifest.id();
        let exp = ExpectedImage::new(head, &parsed.manifest);
        (bytes, id, exp)
    }

    fn files(dir: &Path, bytes: &[u8]) -> (File, File) {
        std::fs::write(dir.join("staging"), bytes).unwrap();
        let dev = File::create(dir.join("dev")).unwrap();
        dev.set_len(bytes.len() as u64 + (5 << 20)).unwrap();
        // Old content on the "device": the install must overwrite all of it.
        dev.write_all_at(&noise(9, bytes.len()), 0).unwrap();
        let s = File::open(dir.join("staging")).unwrap();
        let d = OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("dev"))
            .unwrap();
        (s, d)
    }

    #[test]
    fn image_install_copies_and_verifies_against_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id, _) = image();
        let (s, d) = files(dir.path(), &bytes);
        let exp = ExpectedImage::from_staging(&s, &dir.path().join("staging"), &id).unwrap();
        let p = dir.path().join("dev");
        install_block(
            &s,
            &dir.path().join("staging"),
            bytes.len() as u64,
            &d,
            &p,
            Expect::Image(&exp),
        )
        .unwrap();
        let got = std::fs::read(&p).unwrap();
        assert_eq!(&got[..bytes.len()], &bytes[..]);
        // Generic mode: the same bytes, checked against the copy's hash.
        let (s, d) = files(dir.path(), &bytes);
        install_block(
            &s,
            &dir.path().join("staging"),
            bytes.len() as u64,
            &d,
            &p,
            Expect::Copied,
        )
        .unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[..bytes.len()], &bytes[..]);
    }

    #[test]
    fn holes_of_a_sparse_staging_file_become_zeros_on_the_device() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, id, _) = image();
        let (_, d) = files(dir.path(), &bytes);
        // Sparse staging: only the non-zero 4 KiB blocks are written.
        let sp = dir.path().join("sparse");
        let s = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&sp)
            .unwrap();
        s.set_len(bytes.len() as u64).unwrap();
        for (i, b) in bytes.chunks(4096).enumerate() {
            if !is_zero(b) {
                s.write_all_at(b, (i * 4096) as u64).unwrap();
            }
        }
        s.sync_all().unwrap();
        let extents: Vec<_> = Extents::new(&s, bytes.len() as u64)
            .map(|r| r.unwrap())
            .collect();
        assert!(extents.windows(2).all(|w| w[0].1 <= w[1].0), "{extents:?}");
        let exp = ExpectedImage::from_staging(&s, &sp, &id).unwrap();
        let p = dir.path().join("dev");
        install_block(&s, &sp, bytes.len() as u64, &d, &p, Expect::Image(&exp)).unwrap();
        assert_eq!(&std::fs::read(&p).unwrap()[..bytes.len()], &bytes[..]);
    }

    #[test]
    fn another_image_in_staging_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (bytes, mut id, _) = image();
        let (s, _) = files(dir.path(), &bytes);
        id[0] ^= 1;
        let err = ExpectedImage::from_staging(&s, &dir.path().join("staging"), &id).unwrap_err();
        assert!(err.to_string().contains("another image"), "{err}");
    }

    #[test]
    fn checker_finds_every_kind_of_difference() {
        let (bytes, _, exp) = image();
        let p = Path::new("/dev/test");
        let check = |b: &[u8], piece: usize| -> Result<(), StoreError> {
            let mut c = Checker::new(&exp, p);
            for (i, chunk) in b.chunks(piece).enumerate() {
                c.feed((i * piece) as u64, chunk)?;
            }
            c.finish()
        };
        for piece in [4096, 1 << 20, 333_333] {
            check(&bytes, piece).unwrap();
        }
        let seg = &exp.segments;
        for (at, what) in [
            (10usize, "head"),
            (seg[0].0 as usize + 5, "segment"),
            (seg[0].0 as usize + seg[0].1 as usize + 1, "zero"),
            (seg[1].0 as usize + (1 << 20) + 7, "sha256"),
            (bytes.len() - 1, "zero"),
        ] {
            let mut b = bytes.clone();
            b[at] ^= 0x40;
            let err = check(&b, 1 << 20).unwrap_err().to_string();
            assert!(
                err.contains("does not match") || err.contains(what),
                "{at}: {err}"
            );
        }
        // Short read-back: the last segment was never completed.
        assert!(check(&bytes[..seg[1].0 as usize + 10], 4096).is_err());
    }

    #[test]
    fn zero_check() {
        assert!(is_zero(&[0u8; 10_000]));
        let mut v = vec![0u8; 10_003];
        v[10_002] = 1;
        assert!(!is_zero(&v));
        v[10_002] = 0;
        v[5] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
