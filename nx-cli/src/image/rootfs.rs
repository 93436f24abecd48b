//! Pack a directory into a deterministic squashfs (the `rootfs` segment).
//!
//! squashfs 4.0, 128 KiB blocks, padded to 4 KiB, written by `backhand` (pure Rust). Blocks
//! are **stored** (uncompressed; the superblock still names zstd, the kernel reads stored
//! blocks as they are) unless zstd (level 3) is asked for: a stored filesystem changes only
//! where its files change, so an update can be sent as patches against the running image and
//! compressed on the wire (docs/provisioning/protocol.md, "Skip, patch and compression"). Determinism: entries are added in byte-sorted order, every owner is 0:0, every
//! time (inodes and superblock) is the fixed `mtime` (0, or `SOURCE_DATE_EPOCH`; the root
//! directory's own mtime is always 0, a backhand limitation), the id table holds only 0, no
//! host data (hostnames, UUIDs, inode numbers of the host) is recorded. Permission bits
//! (including setuid/setgid/sticky) are kept. Regular files, directories and symlinks are
//! supported; devices, sockets and FIFOs are rejected.

use std::fs;
use std::io::{Seek, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use backhand::compression::Compressor;
use backhand::{FilesystemCompressor, FilesystemWriter, NodeHeader, DEFAULT_BLOCK_SIZE};

/// What was packed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackStats {
    /// Regular files.
    pub files: u64,
    /// Directories (the root not counted).
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
}

/// Pack `dir` into a squashfs written to `out` (from its current position 0) with every
/// timestamp set to `mtime`. Returns what was packed; the filesystem size is `out`'s length.
pub fn pack_squashfs<W: Write + Seek>(
    dir: &Path,
    out: W,
    mtime: u32,
    zstd: bool,
) -> anyhow::Result<PackStats> {
    let meta = fs::metadata(dir)
        .with_context(|| format!("cannot read rootfs directory {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("--rootfs {} is not a directory", dir.display());
    }
    let mut fs = FilesystemWriter::default();
    fs.set_time(mtime);
    fs.set_block_size(DEFAULT_BLOCK_SIZE);
    fs.set_only_root_id();
    fs.set_root_mode(mode_bits(&meta));
    fs.set_root_uid(0);
    fs.set_root_gid(0);
    let compressor = FilesystemCompressor::new(Compressor::Zstd, None)
        .map_err(|e| anyhow::anyhow!("cannot set up zstd compression for squashfs: {e}"))?;
    fs.set_compressor(compressor);
    if !zstd {
        fs.set_kind(backhand::kind::Kind::new_v4(&STORED));
    }

    let mut stats = PackStats::default();
    add_dir(&mut fs, dir, Path::new("/"), mtime, &mut stats)?;
    fs.write(out)
        .map_err(|e| anyhow::anyhow!("cannot write the squashfs for {}: {e}", dir.display()))?;
    Ok(stats)
}

/// A "compressor" whose output is always one byte longer than its input: backhand then keeps
/// every data block, fragment block and metadata block uncompressed (flagged as such in the
/// filesystem, which any squashfs reader handles).
struct Stored;
static STORED: Stored = Stored;

impl backhand::traits::CompressionAction for Stored {
    type Error = backhand::BackhandError;
    type Compressor = Compressor;
    type FilesystemCompressor = FilesystemCompressor;
    type SuperBlock = backhand::SuperBlock;

    fn decompress(
        &self,
        bytes: &[u8],
        out: &mut Vec<u8>,
        compressor: Self::Compressor,
    ) -> Result<(), Self::Error> {
        backhand::compression::DefaultCompressor.decompress(bytes, out, compressor)
    }

    fn compress(
        &self,
        bytes: &[u8],
        _fc: Self::FilesystemCompressor,
        _block_size: u32,
    ) -> Result<Vec<u8>, Self::Error> {
        let mut v = Vec::with_capacity(bytes.len() + 1);
        v.extend_from_slice(bytes);
        v.push(0);
        Ok(v)
    }
}

fn mode_bits(meta: &fs::Metadata) -> u16 {
    (meta.permissions().mode() & 0o7777) as u16
}

fn add_dir(
    fs: &mut FilesystemWriter<'_, '_, '_>,
    src: &Path,
    rel: &Path,
    mtime: u32,
    stats: &mut PackStats,
) -> anyhow::Result<()> {
    let mut entries: Vec<(std::ffi::OsString, PathBuf)> = fs::read_dir(src)
        .with_context(|| format!("cannot list {}", src.display()))?
        .map(|e| e.map(|e| (e.file_name(), e.path())))
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot list {}", src.display()))?;
    // Byte order of the names: independent of locale and of the host's directory order.
    entries.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
    for (name, path) in entries {
        let meta = fs::symlink_metadata(&path)
            .with_context(|| format!("cannot stat {}", path.display()))?;
        let target = rel.join(&name);
        let header = NodeHeader::new(mode_bits(&meta), 0, 0, mtime);
        let ft = meta.file_type();
        let added = if ft.is_dir() {
            stats.dirs += 1;
            fs.push_dir(&target, header)
        } else if ft.is_file() {
            stats.files += 1;
            stats.file_bytes += meta.len();
            fs.push_file_from_path(&path, &target, header)
        } else if ft.is_symlink() {
            stats.symlinks += 1;
            let link = fs::read_link(&path)
                .with_context(|| format!("cannot read symlink {}", path.display()))?;
            fs.push_symlink(link, &target, header)
        } else {
            let kind = if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_fifo() {
                "FIFO"
            } else {
                "special file"
            };
            bail!(
                "rootfs: {} is a {kind}; the rootfs may hold only regular files, directories and \
                 symlinks (create device nodes at boot instead, e.g. with devtmpfs)",
                path.display()
            );
        };
        added.map_err(|e| anyhow::anyhow!("rootfs: cannot add {}: {e}", path.display()))?;
        if ft.is_dir() {
            add_dir(fs, &path, &target, mtime, stats)?;
        }
    }
    Ok(())
}
