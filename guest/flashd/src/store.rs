//! Storage of flashd: the state directory, the staging file, atomic JSON records
//! (journal, install record) and the atomic install into a file or a block device.
//!
//! Layout under the state dir (`/state` in the guest):
//!
//! ```text
//! flash/staging.img        the image being received (sparse, final size from the manifest)
//! flash/staging.where      present while the transfer streams straight into a block device
//!                          (the inactive slot) instead: that device's path
//! flash/journal.json       durable progress of the transfer (in `staging.img` or that device)
//! flash/installed.json     what is installed right now (manifest bytes, id), for skip/short-circuit
//! flash/last-install.json  the receipt of the last install
//! ```
//!
//! Every record is written atomically: temp file, fsync, rename, fsync of the directory.

use crate::blockio::{Expect, ExpectedImage, COPY_BLOCK};
use crate::error::io_err;
pub use crate::error::StoreError;
use nx_contract::state;
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Largest JSON record flashd will read back (journal, install record).
pub const MAX_RECORD_LEN: u64 = 4 << 20;

/// A usable state directory with its `flash/` subdirectory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
    flash: PathBuf,
}

impl StateDir {
    /// Open `root` as the state dir. With `require_mountpoint`, `root` must be a mounted
    /// filesystem of its own (the guest's `/state` disk): an empty directory of the
    /// initramfs is not persistent and is refused. Creates `flash/` when missing and
    /// checks that it is writable.
    pub fn open(root: &Path, require_mountpoint: bool) -> Result<StateDir, StoreError> {
        let unusable = |reason: String| StoreError::StateDirUnusable {
            path: root.to_path_buf(),
            reason,
        };
        let meta = fs::metadata(root).map_err(|e| unusable(format!("cannot stat: {e}")))?;
        if !meta.is_dir() {
            return Err(unusable("not a directory".into()));
        }
        if require_mountpoint {
            let parent = root.join("..");
            let pmeta =
                fs::metadata(&parent).map_err(|e| unusable(format!("cannot stat parent: {e}")))?;
            if pmeta.dev() == meta.dev() && pmeta.ino() != meta.ino() {
                return Err(unusable(
                    "not a mounted filesystem (is the /state disk attached?)".into(),
                ));
            }
        }
        let flash = root.join(state::FLASH_DIR);
        if !flash.is_dir() {
            fs::create_dir_all(&flash)
                .map_err(|e| unusable(format!("cannot create flash/: {e}")))?;
        }
        let probe = flash.join(".probe");
        File::create(&probe).map_err(|e| unusable(format!("flash/ is not writable: {e}")))?;
        fs::remove_file(&probe).map_err(|e| unusable(format!("flash/ is not writable: {e}")))?;
        Ok(StateDir {
            root: root.to_path_buf(),
            flash,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn flash_dir(&self) -> &Path {
        &self.flash
    }
    pub fn staging_path(&self) -> PathBuf {
        self.root.join(state::FLASH_STAGING)
    }
    /// The sidecar naming the block device a direct transfer streams into.
    pub fn staging_where_path(&self) -> PathBuf {
        self.root.join(state::FLASH_STAGING_WHERE)
    }
    /// Where the transfer in progress lives: the device named by `staging.where`, else the
    /// staging file.
    pub fn staging_location(&self) -> PathBuf {
        match read_bounded(&self.staging_where_path(), 4096) {
            Ok(Some(b)) => {
                let text = String::from_utf8_lossy(&b).trim().to_string();
                if text.starts_with('/') && !text.contains('\n') {
                    PathBuf::from(text)
                } else {
                    self.staging_path()
                }
            }
            _ => self.staging_path(),
        }
    }
    /// Record that the transfer now lives on `device` (`None`: in the staging file).
    pub fn set_staging_location(&self, device: Option<&Path>) -> Result<(), StoreError> {
        match device {
            Some(d) => write_atomic(
                &self.staging_where_path(),
                format!("{}\n", d.display()).as_bytes(),
            ),
            None => remove_if_exists(&self.staging_where_path()),
        }
    }
    pub fn journal_path(&self) -> PathBuf {
        self.root.join(state::FLASH_JOURNAL)
    }
    pub fn installed_path(&self) -> PathBuf {
        self.root.join(state::FLASH_INSTALLED)
    }
    pub fn receipt_path(&self) -> PathBuf {
        self.root.join(state::FLASH_LAST_INSTALL)
    }
}

/// Write `bytes` to `path` atomically and durably, mode 0600: the shared hardened writer
/// ([`nx_guest::fsx`]: temp file `.<name>.tmp` opened `O_NOFOLLOW | O_EXCL` through the
/// directory fd, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let how = nx_guest::fsx::AtomicWrite::new().mode(0o600);
    nx_guest::fsx::write_atomic_path(path, how, bytes).map_err(io_err("write", path))
}

/// Serialize `value` as JSON and write it atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| StoreError::RecordInvalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)
}

/// Like [`write_json_atomic`] without the fsyncs: the record is replaced atomically (temp
/// file + rename) but may be lost on a power cut. For informational records only.
pub fn write_json_quick<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(value).map_err(|e| StoreError::RecordInvalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let how = nx_guest::fsx::AtomicWrite::new().mode(0o600).durable(false);
    nx_guest::fsx::write_atomic_path(path, how, &bytes).map_err(io_err("write", path))
}

/// Read a state file of at most `max` bytes (never through a symlink); `Ok(None)` when it
/// does not exist. A larger file is refused before anything is read.
pub fn read_bounded(path: &Path, max: u64) -> Result<Option<Vec<u8>>, StoreError> {
    let bound = usize::try_from(max).unwrap_or(usize::MAX);
    nx_guest::fsx::read_bounded_nofollow(path, bound).map_err(|e| {
        if e.get_ref()
            .is_some_and(|r| r.is::<nx_guest::fsx::TooLarge>())
        {
            let len = fs::symlink_metadata(path).map_or(max.saturating_add(1), |m| m.len());
            StoreError::RecordTooLarge {
                path: path.to_path_buf(),
                len,
                max,
            }
        } else {
            io_err("read", path)(e)
        }
    })
}

/// Read a JSON record written by [`write_json_atomic`]; `Ok(None)` when absent.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let Some(bytes) = read_bounded(path, MAX_RECORD_LEN)? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StoreError::RecordInvalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Remove a file if it exists (and fsync its directory).
pub fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

fn sync_parent(path: &Path) -> Result<(), StoreError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync dir", dir))
}

/// The staging file: the image is assembled here before anything is installed.
#[derive(Debug)]
pub struct Staging {
    file: File,
    path: PathBuf,
    size: u64,
    direct: Option<DirectIo>,
    /// A block device (a direct transfer into the inactive slot), not a file.
    device: bool,
}

/// The `O_DIRECT` side of the staging file: whole, aligned 4 KiB blocks are copied into an
/// aligned buffer and written past the page cache (no dirty pages, no writeback storms under
/// the periodic fdatasync, no second copy in memory); anything else (a segment's partial last
/// block) goes through the page cache. Linux keeps both views coherent.
struct DirectIo {
    file: File,
    buf: std::cell::RefCell<Option<crate::blockio::AlignedBuf>>,
    on: std::cell::Cell<bool>,
}

impl std::fmt::Debug for DirectIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DirectIo(on: {})", self.on.get())
    }
}

impl DirectIo {
    fn open(path: &Path) -> Option<DirectIo> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(DirectIo {
            file,
            buf: std::cell::RefCell::new(None),
            on: std::cell::Cell::new(true),
        })
    }

    /// Write `data` at `offset` if both are block-aligned. `Ok(false)`: not done here (use
    /// the page cache).
    fn write_at(&self, offset: u64, data: &[u8], path: &Path) -> Result<bool, StoreError> {
        use crate::blockio::ALIGN;
        if !self.on.get()
            || !offset.is_multiple_of(ALIGN as u64)
            || !data.len().is_multiple_of(ALIGN)
        {
            return Ok(false);
        }
        let mut slot = self.buf.borrow_mut();
        // As large as the writes (a chunk, 256 KiB by default), at most COPY_BLOCK.
        let want = data.len().clamp(ALIGN, COPY_BLOCK);
        if slot.as_ref().is_none_or(|b| b.len() < want) {
            *slot = Some(crate::blockio::AlignedBuf::new(want));
        }
        let Some(buf) = slot.as_mut() else {
            return Ok(false);
        };
        let mut done = 0usize;
        for piece in data.chunks(buf.len()) {
            let b = buf
                .as_mut_slice()
                .get_mut(..piece.len())
                .unwrap_or_default();
            b.copy_from_slice(piece);
            match self.file.write_all_at(b, offset + done as u64) {
                Ok(()) => done += piece.len(),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && done == 0 => {
                    // The file system refuses O_DIRECT after all: page cache from now on.
                    self.on.set(false);
                    return Ok(false);
                }
                Err(e) => return Err(io_err("write", path)(e)),
            }
        }
        Ok(true)
    }
}

impl Staging {
    /// Create (or truncate) the staging file with its final size. Unwritten ranges read
    /// as zeros (the file is sparse), so zero runs never need to be sent.
    pub fn create(path: &Path, size: u64) -> Result<Staging, StoreError> {
        if is_block_device(path) {
            return Staging::create_on_device(path, size);
        }
        let file = nx_guest::fsx::create_sized(path, size).map_err(io_err("create", path))?;
        Ok(Staging {
            file,
            path: path.to_path_buf(),
            size,
            direct: DirectIo::open(path),
            device: false,
        })
    }

    /// Open an existing staging file to resume into it. Returns `Ok(None)` when it is
    /// missing or does not have the expected size (then the transfer starts over).
    pub fn open_existing(path: &Path, size: u64) -> Result<Option<Staging>, StoreError> {
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", path)(e)),
        };
        let meta = file.metadata().map_err(io_err("stat", path))?;
        let device = std::os::unix::fs::FileTypeExt::is_block_device(&meta.file_type());
        let fits = if device {
            device_capacity(&file).is_some_and(|cap| cap >= size)
        } else {
            meta.len() == size
        };
        if !fits {
            return Ok(None);
        }
        Ok(Some(Staging {
            file,
            path: path.to_path_buf(),
            size,
            direct: DirectIo::open(path),
            device,
        }))
    }

    /// Stream straight into a block device (the inactive slot): no staging file, no copy at
    /// install. `[0, size)` is zeroed first (`fallocate(ZERO_RANGE)`: the device does it
    /// without data crossing the bus), so — as with a fresh sparse file — every byte not
    /// written later reads as zero.
    fn create_on_device(path: &Path, size: u64) -> Result<Staging, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err("open", path))?;
        let capacity = device_capacity(&file).unwrap_or(0);
        if capacity < size {
            return Err(StoreError::TargetTooSmall {
                path: path.to_path_buf(),
                capacity,
                needed: size,
            });
        }
        crate::blockio::zero_range(&file, path, 0, size)?;
        // The zeroing must be durable before the first journal record claims anything about
        // this device: after a power cut, a resume trusts every range the journal does not
        // list as written to read as zero.
        file.sync_all().map_err(io_err("fsync", path))?;
        Ok(Staging {
            file,
            path: path.to_path_buf(),
            size,
            direct: DirectIo::open(path),
            device: true,
        })
    }

    /// Whether this transfer streams into a block device (see [`Staging::create`]).
    pub fn is_device(&self) -> bool {
        self.device
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Write `data` at `offset`. Refuses writes past the end of the file.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), StoreError> {
        self.check_range(offset, data.len() as u64)?;
        if let Some(d) = &self.direct {
            if d.write_at(offset, data, &self.path)? {
                return Ok(());
            }
        }
        self.file
            .write_all_at(data, offset)
            .map_err(io_err("write", &self.path))
    }

    /// Make `len` bytes at `offset` read as zeros (punches a hole where supported).
    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        self.check_range(offset, len)?;
        if self.is_device() {
            return crate::blockio::zero_range(&self.file, &self.path, offset, len);
        }
        let zeros = vec![0u8; COPY_BLOCK.min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file
                .write_all_at(&zeros[..n], offset + done)
                .map_err(io_err("write", &self.path))?;
            done += n as u64;
        }
        Ok(())
    }

    /// Read exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        self.check_range(offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err("read", &self.path))
    }

    /// SHA-256 of `len` bytes at `offset`, read back from the staging file.
    pub fn sha256_range(&self, offset: u64, len: u64) -> Result<[u8; 32], StoreError> {
        self.check_range(offset, len)?;
        sha256_file_range(&self.file, &self.path, offset, len)
    }

    /// Whether the path still names this open file (it was not removed or replaced).
    pub fn is_at_path(&self) -> bool {
        match (fs::metadata(&self.path), self.file.metadata()) {
            (Ok(p), Ok(f)) => p.dev() == f.dev() && p.ino() == f.ino(),
            _ => false,
        }
    }

    /// A second handle on the same open file (for background fsync and read-back).
    pub fn file_handle(&self) -> Result<File, StoreError> {
        self.file.try_clone().map_err(io_err("dup", &self.path))
    }

    /// Flush written data to stable storage (before the journal says it is there).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(io_err("fsync", &self.path))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), StoreError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(StoreError::Io {
                op: "bounds",
                path: self.path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "range {offset}+{len} is outside the staging file of {} bytes",
                        self.size
                    ),
                ),
            }),
        }
    }
}

fn sha256_file_range(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<[u8; 32], StoreError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; COPY_BLOCK.min(len.max(1) as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)
            .map_err(io_err("read", path))?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hasher.finalize().into())
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// Size of an open block device (or file), by seeking to its end.
pub fn device_capacity(file: &File) -> Option<u64> {
    let mut f = file;
    io::Seek::seek(&mut f, io::SeekFrom::End(0)).ok()
}

/// Finish a transfer that streamed straight into the block device `device` (the staging was
/// the device itself): fsync it, then read the image head back from the disk (`O_DIRECT`
/// where possible) and check it is the verified image `image_id`. The segments were already
/// read back from the device and checked against the manifest as they completed (flashd's
/// hasher reads them back in direct mode), and every other byte was zeroed before the
/// transfer started.
pub fn finish_direct(device: &Path, image_id: &[u8; 32]) -> Result<InstallTimes, StoreError> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(io_err("open", device))?;
    let t = Instant::now();
    dev.sync_all().map_err(io_err("fsync", device))?;
    let sync = t.elapsed();
    let t = Instant::now();
    let reader = crate::blockio::open_direct_read(device).unwrap_or(dev);
    crate::blockio::check_head(&reader, device, image_id)?;
    Ok(InstallTimes {
        copy: Duration::ZERO,
        sync,
        verify: t.elapsed(),
    })
}

/// Where a verified image goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallTarget {
    /// A regular file: replaced atomically (fsync + rename).
    File(PathBuf),
    /// A block device (a slot partition): written, fsynced, read back and compared.
    Block(PathBuf),
}

impl InstallTarget {
    /// A path that is a block device is a `Block` target, anything else a `File`.
    pub fn from_path(path: &Path) -> InstallTarget {
        use std::os::unix::fs::FileTypeExt;
        match fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => InstallTarget::Block(path.to_path_buf()),
            _ => InstallTarget::File(path.to_path_buf()),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            InstallTarget::File(p) | InstallTarget::Block(p) => p,
        }
    }
}

/// Install the verified staging file into `target`.
///
/// * File target: the staging file is renamed over the target (same filesystem), or
///   copied to `.target.tmp` beside it ([`nx_guest::fsx::AtomicWrite::write_with`]),
///   fsynced and renamed (other filesystem). Either
///   way the target holds the old bytes or the new bytes, never a mix.
/// * Block target: the staging bytes are written to the device, fsynced, read back and
///   the SHA-256 of the read-back compared with that of the staging file.
///
/// The staging file is consumed (removed or renamed) on success.
pub fn install(staging: Staging, target: &InstallTarget) -> Result<InstallTimes, StoreError> {
    install_inner(staging, target, None)
}

/// [`install`] of a verified image: a block device is read back and checked against the
/// image with id `image_id` (its head in the staging file, every segment's SHA-256 from its
/// manifest, zeros elsewhere) — see [`crate::blockio`].
pub fn install_image(
    staging: Staging,
    target: &InstallTarget,
    image_id: &[u8; 32],
) -> Result<InstallTimes, StoreError> {
    install_inner(staging, target, Some(image_id))
}

fn install_inner(
    staging: Staging,
    target: &InstallTarget,
    image_id: Option<&[u8; 32]>,
) -> Result<InstallTimes, StoreError> {
    match target {
        InstallTarget::File(path) => {
            let t = Instant::now();
            install_file(staging, path)?;
            Ok(InstallTimes {
                copy: t.elapsed(),
                ..Default::default()
            })
        }
        InstallTarget::Block(path) => install_block(staging, path, image_id),
    }
}

/// Where the time of an install went (for the log and `cargo xtask bench`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstallTimes {
    /// Copy (or rename) of the staging file into the target.
    pub copy: Duration,
    /// fsync of the target.
    pub sync: Duration,
    /// Read-back and its verification.
    pub verify: Duration,
}

impl std::fmt::Display for InstallTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "copy {} ms, fsync {} ms, read-back verify {} ms",
            self.copy.as_millis(),
            self.sync.as_millis(),
            self.verify.as_millis()
        )
    }
}

fn install_file(staging: Staging, target: &Path) -> Result<(), StoreError> {
    staging.sync()?;
    let Staging {
        file, path: src, ..
    } = staging;
    match fs::rename(&src, target) {
        Ok(()) => {
            drop(file);
            sync_parent(target)?;
            sync_parent(&src)
        }
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            // The one atomic writer: temp `.<name>.tmp` opened O_NOFOLLOW|O_EXCL beside the
            // target (a planted symlink there is removed, not followed), fsync, rename,
            // directory fsync.
            let (dir, name) = nx_guest::fsx::split_path(target).map_err(io_err("copy", target))?;
            nx_guest::fsx::AtomicWrite::new()
                .mode(0o600)
                .write_with(dir, name, |out| {
                    let mut input = &file;
                    io::copy(&mut input, out).map(|_| ())
                })
                .map_err(io_err("copy", target))?;
            drop(file);
            remove_if_exists(&src)
        }
        Err(e) => Err(io_err("rename", target)(e)),
    }
}

fn install_block(
    staging: Staging,
    device: &Path,
    image_id: Option<&[u8; 32]>,
) -> Result<InstallTimes, StoreError> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .map_err(io_err("open", device))?;
    let capacity = {
        let mut d = &dev;
        io::Seek::seek(&mut d, io::SeekFrom::End(0)).map_err(io_err("size", device))?
    };
    if capacity < staging.size {
        return Err(StoreError::TargetTooSmall {
            path: device.to_path_buf(),
            capacity,
            needed: staging.size,
        });
    }
    let expected = match image_id {
        Some(id) => Some(ExpectedImage::from_staging(
            &staging.file,
            &staging.path,
            id,
        )?),
        None => None,
    };
    let expect = match &expected {
        Some(e) => Expect::Image(e),
        None => Expect::Copied,
    };
    // Read the staging file past the page cache too (it was written that way).
    let direct_src = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&staging.path)
        .ok();
    let p = crate::blockio::install_block(
        direct_src.as_ref().unwrap_or(&staging.file),
        &staging.path,
        staging.size,
        &dev,
        device,
        expect,
    )?;
    let src = staging.path.clone();
    drop(staging);
    remove_if_exists(&src)?;
    Ok(InstallTimes {
        copy: p.copy,
        sync: p.sync,
        verify: p.verify,
    })
}

/// Read-back chunk of [`verify_content`].
const VERIFY_CHUNK: usize = 1 << 20;

/// Check that `path` holds the content `m` describes, without hashing a zero run: per
/// segment, the bytes of the data ranges must hash to `data_sha256` and every other byte of
/// the content must be zero (read back in bounded chunks). With the data ranges part of the
/// manifest this pins the content as `sha256` does. Returns what differs, naming the
/// segment and the offset.
pub fn verify_content(path: &Path, m: &proto::manifest::Manifest) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut buf = vec![0u8; VERIFY_CHUNK];
    for seg in &m.segments {
        let mut hasher = Sha256::new();
        let mut at = 0u64;
        // Data ranges are ordered and disjoint; the gaps (and the tail) must be zero.
        let ends = seg
            .data_ranges
            .iter()
            .map(|r| (r.offset, r.end().min(seg.size)))
            .chain(std::iter::once((seg.size, seg.size)));
        for (start, end) in ends {
            let zero_end = start.min(seg.size);
            read_chunks(&f, seg.offset, at, zero_end, &mut buf, |off, b| {
                match b.iter().position(|&x| x != 0) {
                    Some(i) => Err(format!(
                        "segment {}: byte {} should be zero but is not",
                        seg.name,
                        off + i as u64
                    )),
                    None => Ok(()),
                }
            })?;
            read_chunks(&f, seg.offset, zero_end, end, &mut buf, |_, b| {
                hasher.update(b);
                Ok(())
            })?;
            at = end.max(zero_end);
        }
        if <[u8; 32]>::from(hasher.finalize()) != seg.data_sha256 {
            return Err(format!(
                "segment {}: the data ranges do not match the manifest's data_sha256",
                seg.name
            ));
        }
    }
    Ok(())
}

/// Read `[from, to)` of a segment at `base` in chunks of `buf`, handing each to `f` with its
/// segment-relative offset.
fn read_chunks(
    file: &File,
    base: u64,
    from: u64,
    to: u64,
    buf: &mut [u8],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let mut off = from;
    while off < to {
        let n = usize::try_from(to - off)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let chunk = &mut buf[..n];
        file.read_exact_at(chunk, base.saturating_add(off))
            .map_err(|e| format!("cannot read back offset {}: {e}", base.saturating_add(off)))?;
        f(off, chunk)?;
        off += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Rec {
        a: u32,
        b: String,
    }

    #[test]
    fn json_records_round_trip_and_missing_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.json");
        assert_eq!(read_json::<Rec>(&p).unwrap(), None);
        let r = Rec {
            a: 7,
            b: "x".into(),
        };
        write_json_atomic(&p, &r).unwrap();
        assert_eq!(read_json::<Rec>(&p).unwrap(), Some(r));
        assert!(!dir.path().join(".r.json.tmp").exists());
    }

    #[test]
    fn a_symlink_planted_at_a_record_temp_path_leaves_its_target_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let st = StateDir::open(dir.path(), false).unwrap();
        std::os::unix::fs::symlink(&victim, st.flash_dir().join(".journal.json.tmp")).unwrap();
        std::os::unix::fs::symlink(&victim, st.flash_dir().join(".staging.where.tmp")).unwrap();
        let r = Rec {
            a: 1,
            b: "y".into(),
        };
        write_json_atomic(&st.journal_path(), &r).unwrap();
        st.set_staging_location(Some(Path::new("/dev/vdb2")))
            .unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert_eq!(read_json::<Rec>(&st.journal_path()).unwrap(), Some(r));
        assert_eq!(st.staging_location(), PathBuf::from("/dev/vdb2"));
        // A record replaced by a symlink is not read through it.
        fs::remove_file(st.journal_path()).unwrap();
        std::os::unix::fs::symlink(&victim, st.journal_path()).unwrap();
        assert!(read_json::<Rec>(&st.journal_path()).is_err());
    }

    #[test]
    fn oversized_record_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        let f = File::create(&p).unwrap();
        f.set_len(MAX_RECORD_LEN + 1).unwrap();
        assert!(matches!(
            read_bounded(&p, MAX_RECORD_LEN),
            Err(StoreError::RecordTooLarge { .. })
        ));
    }

    #[test]
    fn garbage_record_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.json");
        fs::write(&p, b"{not json").unwrap();
        let err = read_json::<Rec>(&p).unwrap_err().to_string();
        assert!(err.contains("j.json"), "{err}");
    }

    #[test]
    fn state_dir_requires_a_mountpoint_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        fs::create_dir(&sub).unwrap();
        assert!(StateDir::open(&sub, false).is_ok());
        assert!(sub.join("flash").is_dir());
        // A plain subdirectory shares its parent's device: not a mounted /state.
        let err = StateDir::open(&sub, true).unwrap_err().to_string();
        assert!(err.contains("not a mounted filesystem"), "{err}");
        assert!(StateDir::open(&dir.path().join("missing"), false).is_err());
    }

    #[test]
    fn staging_is_sparse_zero_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.img");
        let s = Staging::create(&p, 3 * 4096).unwrap();
        s.write_at(4096, &[0xAB; 4096]).unwrap();
        let mut buf = [1u8; 4096];
        s.read_at(0, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        s.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0xAB));
        assert!(s.write_at(3 * 4096 - 1, &[1, 2]).is_err());
        assert!(s.write_at(u64::MAX, &[1]).is_err());
        s.write_zeros(4096, 4096).unwrap();
        s.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(
            s.sha256_range(0, 3 * 4096).unwrap(),
            <[u8; 32]>::from(Sha256::digest(vec![0u8; 3 * 4096]))
        );
        drop(s);
        assert!(Staging::open_existing(&p, 3 * 4096).unwrap().is_some());
        assert!(Staging::open_existing(&p, 4096).unwrap().is_none());
        assert!(Staging::open_existing(&dir.path().join("none"), 1)
            .unwrap()
            .is_none());
    }

    #[test]
    fn file_install_replaces_target_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.img");
        fs::write(&target, b"old").unwrap();
        let sp = dir.path().join("staging.img");
        let s = Staging::create(&sp, 8192).unwrap();
        s.write_at(0, &[7u8; 8192]).unwrap();
        install(s, &InstallTarget::from_path(&target)).unwrap();
        assert_eq!(fs::read(&target).unwrap(), vec![7u8; 8192]);
        assert!(!sp.exists());
    }

    #[test]
    fn a_copy_to_another_filesystem_ignores_a_symlink_planted_at_its_temp_path() {
        use std::os::unix::fs::MetadataExt;
        // Staging on the disk, target on tmpfs (/dev/shm): the rename fails with EXDEV and
        // the staging file is copied through the atomic writer.
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir_in("/dev/shm").unwrap();
        assert_ne!(
            fs::metadata(dir.path()).unwrap().dev(),
            fs::metadata(other.path()).unwrap().dev(),
            "the test needs /dev/shm on another filesystem than the temp dir"
        );
        let victim = dir.path().join("root.pub");
        fs::write(&victim, b"precious").unwrap();
        let target = other.path().join("out.img");
        std::os::unix::fs::symlink(&victim, other.path().join(".out.img.tmp")).unwrap();
        let sp = dir.path().join("staging.img");
        let s = Staging::create(&sp, 8192).unwrap();
        s.write_at(0, &[7u8; 8192]).unwrap();
        install(s, &InstallTarget::from_path(&target)).unwrap();
        assert_eq!(fs::read(&target).unwrap(), vec![7u8; 8192]);
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(!other.path().join(".out.img.tmp").is_symlink());
        assert!(!sp.exists());
    }

    #[test]
    fn block_style_install_writes_and_reads_back() {
        // A regular file stands in for the device: same code path as a partition.
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        File::create(&dev).unwrap().set_len(3 << 20).unwrap();
        let sp = dir.path().join("staging.img");
        let s = Staging::create(&sp, (1 << 20) + 4096).unwrap();
        s.write_at(1 << 20, &[9u8; 4096]).unwrap();
        install(s, &InstallTarget::Block(dev.clone())).unwrap();
        let bytes = fs::read(&dev).unwrap();
        assert!(bytes[..1 << 20].iter().all(|&b| b == 0));
        assert!(bytes[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 9));
        assert!(!sp.exists());
    }

    #[test]
    fn block_install_refuses_a_too_small_target_and_keeps_staging() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        File::create(&dev).unwrap().set_len(4096).unwrap();
        let sp = dir.path().join("staging.img");
        let s = Staging::create(&sp, 8192).unwrap();
        let err = install(s, &InstallTarget::Block(dev)).unwrap_err();
        assert!(matches!(err, StoreError::TargetTooSmall { .. }), "{err}");
        assert!(sp.exists());
    }

    #[test]
    fn verify_content_catches_stale_bytes_in_zero_ranges_and_wrong_data() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = crate::testkit::noise(1, 4096);
        seg.extend_from_slice(&[0u8; 8192]);
        seg.extend_from_slice(&crate::testkit::noise(2, 300));
        let img = crate::testkit::build_image("1.0.0", &[("rootfs", seg)], None).unwrap();
        let h = proto::image::Header::parse(&img[..4096]).unwrap();
        let m = proto::image::ImageHead::parse(&img[..h.data_offset as usize])
            .unwrap()
            .manifest;
        let at = m.segments[0].offset;
        let p = dir.path().join("t.img");
        fs::write(&p, &img).unwrap();
        verify_content(&p, &m).unwrap();
        let mut bad = img.clone();
        bad[(at + 4096 + 5000) as usize] = 1;
        fs::write(&p, &bad).unwrap();
        let e = verify_content(&p, &m).unwrap_err();
        assert!(e.contains("should be zero") && e.contains("9096"), "{e}");
        let mut bad = img.clone();
        bad[(at + 12288 + 7) as usize] ^= 0xff;
        fs::write(&p, &bad).unwrap();
        let e = verify_content(&p, &m).unwrap_err();
        assert!(e.contains("data_sha256"), "{e}");
        fs::write(&p, &img[..img.len() - 4000]).unwrap();
        assert!(verify_content(&p, &m).is_err());
    }
}
