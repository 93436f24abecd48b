//! Small-file persistence and buffers shared by every guest program (and `nx`):
//!
//! * [`write_atomic`] / [`AtomicWrite`]: replace `dir/name` so that a reader or a power cut
//!   sees the old or the new content, never a mix. The temp file `.<name>.tmp` is opened
//!   relative to a directory fd with `O_NOFOLLOW | O_EXCL | O_CREAT | O_CLOEXEC` after a
//!   stale one is unlinked (`unlinkat` removes a planted symlink itself, never its target),
//!   written, fsynced, renamed with `renameat` and the directory is fsynced. The directory
//!   is opened `O_NOFOLLOW | O_DIRECTORY` (a symlinked state directory is refused). This is
//!   the one place a guest program (or `nx`) creates a temp file for a state file: every
//!   writer goes through it ([`AtomicWrite::write_with`] for streamed content); the hygiene
//!   test `guest/common/tests/one_atomic_writer.rs` holds it.
//! * [`read_bounded`] / [`read_bounded_nofollow`]: a whole small file, `Ok(None)` when it does
//!   not exist, refused (without allocating more than the bound) when larger than `max`.
//! * [`AlignedBuf`]: a heap buffer aligned for `O_DIRECT`.
//! * [`create_sized`]: a fresh private (`0600`) read-write file of a given length (sparse),
//!   where an image is received.
//!
//! Errors are `std::io::Error`s; a file over the bound is `InvalidData` carrying a
//! [`TooLarge`].

use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// A file was larger than the bound its reader accepts.
#[derive(Debug, thiserror::Error)]
#[error("{path} is larger than {max} bytes")]
pub struct TooLarge {
    pub path: PathBuf,
    pub max: usize,
}

/// How [`AtomicWrite::write`] replaces a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtomicWrite {
    mode: u32,
    /// `mode` was asked for: set exactly, not reduced by the umask.
    exact: bool,
    durable: bool,
    replace: bool,
    /// The directory may be a symlink (a path the user chose on the host).
    follow_dir: bool,
}

impl Default for AtomicWrite {
    fn default() -> Self {
        AtomicWrite::new()
    }
}

impl AtomicWrite {
    /// Mode 0644 (less the umask), durable (fsync of the file and the directory), replacing
    /// an existing file.
    pub const fn new() -> AtomicWrite {
        AtomicWrite {
            mode: 0o644,
            exact: false,
            durable: true,
            replace: true,
            follow_dir: false,
        }
    }

    /// Follow a symlink in the directory's last component: for paths a user names on the host
    /// (`nx image keygen --out keys/release` with `keys -> /secure/keys`). Never for state
    /// files, where a planted link must not redirect the write. The temp file and the target
    /// name are still never followed.
    pub const fn follow_dir_symlink(mut self) -> AtomicWrite {
        self.follow_dir = true;
        self
    }

    /// The permission bits of the new file, exactly (not reduced by the umask; the temp file
    /// is created with them, so it is never more open than asked).
    pub const fn mode(mut self, mode: u32) -> AtomicWrite {
        self.mode = mode;
        self.exact = true;
        self
    }

    /// `false`: skip both fsyncs (the replacement is still atomic, but may be lost on a power
    /// cut). For informational records only.
    pub const fn durable(mut self, durable: bool) -> AtomicWrite {
        self.durable = durable;
        self
    }

    /// `false`: fail with `AlreadyExists` instead of replacing an existing `name`
    /// (`renameat2(RENAME_NOREPLACE)`).
    pub const fn replace(mut self, replace: bool) -> AtomicWrite {
        self.replace = replace;
        self
    }

    /// Write `bytes` as `dir/name` (see the module docs). `name` is one path component.
    pub fn write(&self, dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.write_with(dir, name, |f| f.write_all(bytes))
    }

    /// Like [`AtomicWrite::write`], but `fill` writes the content into the (fresh, empty)
    /// temp file: for content streamed from elsewhere (a copy of a large file).
    pub fn write_with(
        &self,
        dir: &Path,
        name: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> io::Result<()> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a plain file name"),
            ));
        }
        let dirfd = if self.follow_dir {
            rustix::fs::open(
                dir,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )?
        } else {
            open_dir(dir)?
        };
        let tmp = format!(".{name}.tmp");
        // A stale temp (or anything planted there) goes first: unlinkat never follows a
        // symlink, it removes the link itself.
        match rustix::fs::unlinkat(&dirfd, tmp.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(
            &dirfd,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(self.mode),
        )?;
        let mut f = File::from(fd);
        let written = fill(&mut f).and_then(|()| {
            if self.exact {
                f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(self.mode))?;
            }
            if self.durable {
                f.sync_all()?;
            }
            Ok(())
        });
        drop(f);
        let renamed = written.and_then(|()| {
            let r = if self.replace {
                rustix::fs::renameat(&dirfd, tmp.as_str(), &dirfd, name)
            } else {
                rustix::fs::renameat_with(
                    &dirfd,
                    tmp.as_str(),
                    &dirfd,
                    name,
                    RenameFlags::NOREPLACE,
                )
            };
            r.map_err(io::Error::from)
        });
        if let Err(e) = renamed {
            let _ = rustix::fs::unlinkat(&dirfd, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
        if self.durable {
            rustix::fs::fsync(&dirfd)?;
        }
        Ok(())
    }
}

/// Replace `dir/name` with `bytes` atomically and durably, mode 0644 (see [`AtomicWrite`]).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    AtomicWrite::new().write(dir, name, bytes)
}

/// [`write_atomic`] of a full path: its parent directory (`.` when none) and file name.
pub fn write_atomic_path(path: &Path, write: AtomicWrite, bytes: &[u8]) -> io::Result<()> {
    let (dir, name) = split_path(path)?;
    write.write(dir, name, bytes)
}

/// `path`'s directory (`.` when it has none) and its file name.
pub fn split_path(path: &Path) -> io::Result<(&Path, &str)> {
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: no file name", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((dir, name))
}

/// Remove `dir/name` if present and make the removal durable.
pub fn remove_durable(dir: &Path, name: &str) -> io::Result<()> {
    let dirfd = open_dir(dir)?;
    match rustix::fs::unlinkat(&dirfd, name, AtFlags::empty()) {
        Ok(()) => rustix::fs::fsync(&dirfd).map_err(io::Error::from),
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// fsync a directory so a rename or unlink in it survives a power cut.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    rustix::fs::fsync(open_dir(dir)?).map_err(io::Error::from)
}

/// The directory itself is opened `O_NOFOLLOW | O_DIRECTORY`: a symlink planted in place of
/// the last component (`/state/flash -> /`) is refused (`ELOOP`/`ENOTDIR`), not followed.
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// Read a whole file of at most `max` bytes (following symlinks: sysfs, procfs). `Ok(None)`
/// when it does not exist; `InvalidData` ([`TooLarge`]) when larger.
pub fn read_bounded(path: &Path, max: usize) -> io::Result<Option<Vec<u8>>> {
    read_with(path, max, OFlags::empty())
}

/// Like [`read_bounded`], but a symlink at `path` is refused (`ELOOP`): for state files a
/// planted link must not redirect the read.
pub fn read_bounded_nofollow(path: &Path, max: usize) -> io::Result<Option<Vec<u8>>> {
    read_with(path, max, OFlags::NOFOLLOW)
}

fn read_with(path: &Path, max: usize, extra: OFlags) -> io::Result<Option<Vec<u8>>> {
    let fd = match rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::CLOEXEC | extra,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            TooLarge {
                path: path.to_path_buf(),
                max,
            },
        )
    };
    // The bound is checked before anything is allocated or read: a regular file on a real
    // filesystem says its size (sysfs/procfs files say 4096 or 0 whatever they hold: for
    // them the bounded read below decides).
    let real_size = size_is_meaningful(&fd);
    let f = File::from(fd);
    let meta = f.metadata()?;
    let reported = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    if real_size && meta.is_file() && reported > max {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(reported.min(max));
    let limit = u64::try_from(max).unwrap_or(u64::MAX).saturating_add(1);
    f.take(limit).read_to_end(&mut buf)?;
    if buf.len() > max {
        return Err(too_large());
    }
    Ok(Some(buf))
}

/// False on pseudo filesystems (sysfs, procfs, …) whose files report a size unrelated to
/// their content.
fn size_is_meaningful(fd: &OwnedFd) -> bool {
    const PSEUDO: [u32; 8] = [
        0x6265_6572, // sysfs
        0x9fa0,      // proc
        0x6462_6720, // debugfs
        0x7472_6163, // tracefs
        0x7363_6673, // securityfs
        0x6265_6570, // configfs
        0x6367_7270, // cgroup2
        0xde5e_81e4, // efivarfs
    ];
    match rustix::fs::fstatfs(fd) {
        // The magic numbers are 32-bit; `f_type`'s width differs between architectures.
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => !PSEUDO.contains(&(st.f_type as u32)),
        Err(_) => false,
    }
}

/// Alignment of buffers, offsets and lengths for `O_DIRECT`.
pub const ALIGN: usize = 4096;

/// A buffer whose bytes start on an [`ALIGN`] boundary (for `O_DIRECT` reads and writes).
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .finish()
    }
}

impl AlignedBuf {
    /// `len` zeroed bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let raw = vec![0u8; len + ALIGN];
        let off = raw.as_ptr().align_offset(ALIGN);
        // `align_offset` may decline (never for u8 in practice): then the buffer is unaligned
        // and direct I/O falls back to the page cache, which needs no alignment.
        let start = if off < ALIGN { off } else { 0 };
        AlignedBuf { raw, start, len }
    }
    /// Usable bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_slice(&self) -> &[u8] {
        self.raw
            .get(self.start..self.start + self.len)
            .unwrap_or_default()
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let (s, l) = (self.start, self.len);
        self.raw.get_mut(s..s + l).unwrap_or_default()
    }
}

/// Create (or truncate) `path` read-write with mode `0600` and set its length to `len` (the
/// file is sparse: unwritten ranges read as zeros).
pub fn create_sized(path: &Path, len: u64) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.set_len(len)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_symlinked_directory_is_refused_unless_the_caller_follows_it() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("real")).unwrap();
        std::os::unix::fs::symlink(d.path().join("real"), d.path().join("link")).unwrap();
        assert!(write_atomic(&d.path().join("link"), "x", b"1").is_err());
        assert!(!d.path().join("real/x").exists());
        AtomicWrite::new()
            .follow_dir_symlink()
            .write(&d.path().join("link"), "x", b"1")
            .unwrap();
        assert_eq!(std::fs::read(d.path().join("real/x")).unwrap(), b"1");
    }

    #[test]
    fn atomic_write_then_bounded_read() {
        let d = tempfile::tempdir().unwrap();
        write_atomic(d.path(), "x", b"hello\n").unwrap();
        write_atomic(d.path(), "x", b"hello\n").unwrap();
        let p = d.path().join("x");
        assert_eq!(read_bounded(&p, 6).unwrap().unwrap(), b"hello\n");
        let e = read_bounded(&p, 5).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("larger than 5 bytes"), "{e}");
        assert!(read_bounded(&d.path().join("nope"), 5).unwrap().is_none());
        assert!(!d.path().join(".x.tmp").exists());
        remove_durable(d.path(), "x").unwrap();
        remove_durable(d.path(), "x").unwrap();
        assert!(!p.exists());
        assert!(write_atomic(d.path(), "a/b", b"").is_err());
        assert!(write_atomic(d.path(), "..", b"").is_err());
    }

    #[test]
    fn a_symlink_planted_at_the_temp_path_leaves_its_target_untouched() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, d.path().join(".rec.tmp")).unwrap();
        write_atomic(d.path(), "rec", b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(d.path().join("rec")).unwrap(), b"new");
        assert!(!d.path().join(".rec.tmp").exists());
        assert!(!d.path().join("rec").is_symlink());
    }

    #[test]
    fn a_symlinked_directory_is_refused_and_streamed_content_works() {
        let d = tempfile::tempdir().unwrap();
        let real = d.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(write_atomic(&link, "x", b"1").is_err());
        assert!(!real.join("x").exists());
        AtomicWrite::new()
            .write_with(&real, "x", |f| {
                f.write_all(b"ab")?;
                f.write_all(b"cd")
            })
            .unwrap();
        assert_eq!(std::fs::read(real.join("x")).unwrap(), b"abcd");
        // A failed fill leaves neither the temp file nor a new target.
        let e = AtomicWrite::new()
            .write_with(&real, "y", |_| Err(io::Error::other("boom")))
            .unwrap_err();
        assert_eq!(e.to_string(), "boom");
        assert!(!real.join("y").exists() && !real.join(".y.tmp").exists());
    }

    #[test]
    fn mode_and_no_replace() {
        let d = tempfile::tempdir().unwrap();
        let w = AtomicWrite::new().mode(0o600).replace(false);
        w.write(d.path(), "key", b"1").unwrap();
        let meta = std::fs::metadata(d.path().join("key")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let e = w.write(d.path(), "key", b"2").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(d.path().join("key")).unwrap(), b"1");
        assert!(!d.path().join(".key.tmp").exists());
        AtomicWrite::new()
            .durable(false)
            .write(d.path(), "key", b"3")
            .unwrap();
        assert_eq!(std::fs::read(d.path().join("key")).unwrap(), b"3");
    }

    #[test]
    fn nofollow_read_refuses_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("t");
        std::fs::write(&target, b"x").unwrap();
        let link = d.path().join("l");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_bounded(&link, 4).unwrap().unwrap(), b"x");
        assert!(read_bounded_nofollow(&link, 4).is_err());
        assert_eq!(read_bounded_nofollow(&target, 4).unwrap().unwrap(), b"x");
        assert!(read_bounded_nofollow(&d.path().join("none"), 4)
            .unwrap()
            .is_none());
    }

    #[test]
    fn pseudo_files_are_read_by_content_not_reported_size() {
        // /proc files report size 0, sysfs files 4096: both read by content.
        let stat = read_bounded(Path::new("/proc/self/stat"), 4096)
            .unwrap()
            .unwrap();
        assert!(!stat.is_empty());
        let sys = Path::new("/sys/kernel/mm/transparent_hugepage/enabled");
        if sys.exists() {
            assert!(read_bounded_nofollow(sys, 200).unwrap().is_some());
        }
        // A sparse regular file over the bound is refused without reading it.
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big");
        File::create(&big).unwrap().set_len(1 << 40).unwrap();
        assert_eq!(
            read_bounded(&big, 16).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut b = AlignedBuf::new(8192);
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        b.as_mut_slice()[0] = 1;
        assert_eq!(b.as_slice()[0], 1);
        assert!(AlignedBuf::new(0).is_empty());
    }
}
