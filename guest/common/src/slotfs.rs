//! The root file system of an A/B slot.
//!
//! A slot partition (`system_a` / `system_b`) holds an image file written byte for byte at the
//! partition start (docs/provisioning/overview.md). To boot it, the normal init reads the head
//! from the partition (bounded, strictly parsed by `proto::image`), finds segment `rootfs` and
//! mounts it as squashfs, read-only. `/etc/os-release` inside gives the version. Nothing on
//! the partition is trusted: it may be blank, half-written (power cut), junk, or an image whose
//! rootfs is not a file system.
//!
//! How the rootfs bytes are checked depends on the manifest ([`RootfsCheck`]):
//! - with a `verity` entry for `rootfs` (what `nx image build` makes): nothing is hashed in
//!   advance. The rootfs range (padded to 4 KiB) and the hash-tree segment each become a
//!   read-only loop device, a read-only dm-verity device ([`crate::dm`]) joins them with the
//!   manifest's root hash and salt, and squashfs is mounted from it: the kernel checks every
//!   block when it is read, so the boot time no longer grows with the rootfs size, and a
//!   corrupted block fails its read with `EIO` (at the mount for the superblock:
//!   [`SlotFsError::Corrupted`]).
//! - without one (older or `--no-verity` images, a rootfs of one block): the whole segment is
//!   hashed against the manifest before the mount, as before, then mounted from a read-only
//!   loop device over exactly its bytes.
//!
//! Errors tell apart a fault of the *slot* (its content is unusable: never confirm it, it
//! rolls back) from a fault of the *environment* (no loop driver, no squashfs driver, no
//! device mapper or dm-verity: not the slot's fault, never mark it bad for that) —
//! [`SlotFsError::is_slot_fault`].

use crate::dm;
use crate::loopdev::{self, Range};
use proto::image::{Header, ImageHead, HEADER_LEN};
use proto::manifest::{validate_version, Segment, SegmentHasher};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The image segment holding the root file system.
pub const ROOTFS_SEGMENT: &str = "rootfs";
/// Where the normal init mounts the booted slot's rootfs.
pub const SYSROOT: &str = "/sysroot";
/// Largest os-release file read.
pub const MAX_OS_RELEASE: usize = 4096;
/// Read size while hashing the rootfs segment.
const HASH_CHUNK: usize = 1 << 20;

/// Why a slot's rootfs cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SlotFsError {
    /// Reading the partition failed.
    #[error("reading {path} failed: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The partition does not start with a valid image head (blank, junk, half-written).
    #[error("{path} holds no valid nexus image: {reason}")]
    NoImage { path: PathBuf, reason: String },
    /// The image is larger than the partition (cannot be a complete install).
    #[error("the image in {path} is {total} bytes but the partition holds only {capacity}")]
    Truncated {
        path: PathBuf,
        total: u64,
        capacity: u64,
    },
    /// The image has no `rootfs` segment.
    #[error(
        "the image in {path} (version {version}) has no `rootfs` segment (segments: {segments})"
    )]
    NoRootfs {
        path: PathBuf,
        version: String,
        segments: String,
    },
    /// The rootfs bytes do not match the manifest.
    #[error("the rootfs segment in {path} does not match its manifest: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    /// No loop device (environment).
    #[error("cannot attach a loop device to the rootfs segment of {path}: {source}")]
    Loop {
        path: PathBuf,
        #[source]
        source: crate::Error,
    },
    /// The mount point could not be prepared (environment).
    #[error("cannot prepare mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        #[source]
        source: crate::Error,
    },
    /// The dm-verity device could not be set up (environment: no device mapper, no
    /// dm-verity target; the table comes from a validated manifest).
    #[error("cannot set up dm-verity for the rootfs segment of {path}: {source}")]
    Verity {
        path: PathBuf,
        #[source]
        source: crate::Error,
    },
    /// dm-verity refused a block of the rootfs: it does not match the manifest's root hash.
    #[error(
        "{refused} of {path} ({device}): {source}; a block does not match the root hash in the \
         manifest (the slot's content is corrupted or was modified)",
        refused = nx_contract::markers::init::VERITY_REFUSED
    )]
    Corrupted {
        path: PathBuf,
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The rootfs segment does not mount as squashfs.
    #[error("the rootfs segment of {path} does not mount as squashfs ({device}): {source}")]
    Mount {
        path: PathBuf,
        device: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `/etc/os-release` is missing, too large, or has no usable VERSION.
    #[error("os-release of the rootfs in {path}: {reason}")]
    OsRelease { path: PathBuf, reason: String },
}

impl SlotFsError {
    /// True when the slot's content is at fault (the slot must not be confirmed and may be
    /// marked bad); false for a problem of the booted environment (missing drivers).
    pub fn is_slot_fault(&self) -> bool {
        match self {
            SlotFsError::Loop { .. }
            | SlotFsError::MountPoint { .. }
            | SlotFsError::Verity { .. } => false,
            // No squashfs driver at all: the environment.
            SlotFsError::Mount { source, .. } => source.raw_os_error() != Some(libc::ENODEV),
            _ => true,
        }
    }
}

/// How the rootfs bytes are checked (chosen by the manifest).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootfsCheck {
    /// dm-verity checks every block as it is read against the tree in segment `hash`.
    Verity {
        /// The segment holding the hash tree (boxed: a segment carries its chunk hash list).
        hash: Box<Segment>,
        /// The manifest's salt.
        salt: Vec<u8>,
        /// The manifest's root hash.
        root_hash: [u8; 32],
    },
    /// No verity entry: the whole segment was hashed against the manifest before the mount.
    WholeSegment,
}

impl RootfsCheck {
    /// The first 16 hex digits of the verity root hash, if verity is used.
    pub fn root_prefix(&self) -> Option<String> {
        match self {
            RootfsCheck::Verity { root_hash, .. } => {
                Some(hex::encode(root_hash).chars().take(16).collect())
            }
            RootfsCheck::WholeSegment => None,
        }
    }
}

/// A mounted slot rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// The block device the rootfs is mounted from (a dm-verity device, or a loop device).
    pub device: PathBuf,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// `VERSION` of the rootfs' os-release.
    pub version: String,
    /// The image version in the manifest.
    pub image_version: String,
    /// Bytes of the rootfs segment.
    pub rootfs_bytes: u64,
    /// The manifest's anti-rollback counter (the floor rises to it once the slot is confirmed).
    pub security_version: u64,
    /// How its bytes are checked.
    pub check: RootfsCheck,
    /// Time from opening the partition to the mounted rootfs (head, checks, mount).
    pub took: Duration,
}

fn read_exact_at(f: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), SlotFsError> {
    f.read_exact_at(buf, offset)
        .map_err(|source| SlotFsError::Read {
            path: path.to_path_buf(),
            source,
        })
}

/// Size of a file or block device.
pub fn capacity(f: &File, path: &Path) -> Result<u64, SlotFsError> {
    let mut h = f;
    std::io::Seek::seek(&mut h, std::io::SeekFrom::End(0)).map_err(|source| SlotFsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Read and strictly parse the image head at the start of `f` (`capacity` bytes long).
pub fn read_head(f: &File, path: &Path, capacity: u64) -> Result<ImageHead, SlotFsError> {
    let no_image = |reason: String| SlotFsError::NoImage {
        path: path.to_path_buf(),
        reason,
    };
    if capacity < HEADER_LEN as u64 {
        return Err(no_image(format!("only {capacity} bytes")));
    }
    let mut header = vec![0u8; HEADER_LEN];
    read_exact_at(f, path, &mut header, 0)?;
    if header.iter().all(|&b| b == 0) {
        return Err(no_image("the partition is blank (never imaged)".into()));
    }
    let h = Header::parse(&header).map_err(|e| no_image(e.to_string()))?;
    // Header::parse bounds data_offset by MAX_HEAD_LEN (2 MiB), so this allocation is bounded.
    let head_len = usize::try_from(h.data_offset).map_err(|_| no_image("head too large".into()))?;
    if h.data_offset > capacity {
        return Err(no_image(format!(
            "head of {} bytes is larger than the partition",
            h.data_offset
        )));
    }
    let mut head = vec![0u8; head_len];
    read_exact_at(f, path, &mut head, 0)?;
    let parsed = ImageHead::parse(&head).map_err(|e| no_image(e.to_string()))?;
    if parsed.manifest.total_size > capacity {
        return Err(SlotFsError::Truncated {
            path: path.to_path_buf(),
            total: parsed.manifest.total_size,
            capacity,
        });
    }
    Ok(parsed)
}

/// The `rootfs` segment of a parsed head.
pub fn rootfs_segment(head: &ImageHead, path: &Path) -> Result<Segment, SlotFsError> {
    head.manifest
        .segment(ROOTFS_SEGMENT)
        .cloned()
        .ok_or_else(|| SlotFsError::NoRootfs {
            path: path.to_path_buf(),
            version: head.manifest.version.clone(),
            segments: head
                .manifest
                .segments
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Hash the segment's bytes on `f` and compare with the manifest (size, SHA-256, data ranges).
pub fn verify_segment(f: &File, path: &Path, seg: &Segment) -> Result<(), SlotFsError> {
    let mut hasher = SegmentHasher::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    let mut done = 0u64;
    while done < seg.size {
        let n = usize::try_from((seg.size - done).min(HASH_CHUNK as u64)).unwrap_or(HASH_CHUNK);
        let piece = buf.get_mut(..n).unwrap_or_default();
        read_exact_at(f, path, piece, seg.offset + done)?;
        hasher.update(piece);
        done += n as u64;
    }
    seg.check(&hasher.finish())
        .map_err(|e| SlotFsError::Corrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// The loop range of a segment: its bytes plus the zero padding to the next 4 KiB boundary
/// (inside the image, so inside the partition once [`read_head`] checked `total_size`).
pub fn segment_range(seg: &Segment) -> Range {
    Range {
        offset: seg.offset,
        len: seg.padded_end().saturating_sub(seg.offset),
    }
}

/// The version in an os-release text: `VERSION`, else `VERSION_ID` (quotes removed). It must be
/// a valid image version (`[A-Za-z0-9._+~:-]{1,64}`), so it can go into a marker as is.
pub fn os_release_version(text: &str) -> Result<String, String> {
    let field = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| {
                let v = v.trim();
                let unq = v
                    .strip_prefix('"')
                    .and_then(|x| x.strip_suffix('"'))
                    .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                    .unwrap_or(v);
                unq.to_string()
            })
        })
    };
    let v = field("VERSION")
        .or_else(|| field("VERSION_ID"))
        .ok_or_else(|| "no VERSION= or VERSION_ID= line".to_string())?;
    validate_version(&v).map_err(|e| format!("VERSION {v:?}: {e}"))?;
    Ok(v)
}

/// Read `etc/os-release` (or `usr/lib/os-release`) of the tree at `root`, resolving symlinks
/// inside that tree only (`RESOLVE_IN_ROOT`), bounded.
pub fn read_os_release(root: &Path) -> Result<String, String> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = File::open(root).map_err(|e| format!("open {}: {e}", root.display()))?;
    let mut last = String::new();
    for rel in ["etc/os-release", "usr/lib/os-release"] {
        match rustix::fs::openat2(
            dir.as_fd(),
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
            ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS | ResolveFlags::NO_XDEV,
        ) {
            Ok(fd) => {
                let f = File::from(fd);
                let meta = f.metadata().map_err(|e| format!("{rel}: {e}"))?;
                if !meta.is_file() {
                    return Err(format!("{rel} is not a regular file"));
                }
                let mut buf = Vec::new();
                let limit = u64::try_from(MAX_OS_RELEASE).unwrap_or(u64::MAX) + 1;
                std::io::Read::read_to_end(&mut std::io::Read::take(&f, limit), &mut buf)
                    .map_err(|e| format!("read {rel}: {e}"))?;
                if buf.len() > MAX_OS_RELEASE {
                    return Err(format!("{rel} is larger than {MAX_OS_RELEASE} bytes"));
                }
                return String::from_utf8(buf).map_err(|_| format!("{rel} is not UTF-8"));
            }
            Err(e) => last = format!("{rel}: {e}"),
        }
    }
    Err(format!("no os-release ({last})"))
}

/// A slot whose head is parsed and whose rootfs is checked as far as it can be before the mount.
#[derive(Debug)]
pub struct CheckedSlot {
    /// The partition, open read-only.
    pub file: File,
    /// Its size.
    pub capacity: u64,
    /// The parsed image head.
    pub head: ImageHead,
    /// The `rootfs` segment.
    pub rootfs: Segment,
    /// How the rootfs is checked.
    pub check: RootfsCheck,
}

/// How the manifest has the rootfs checked: its verity entry (the manifest's validation
/// guarantees the hash segment exists and has exactly the tree's size), else the whole segment.
pub fn rootfs_check(head: &ImageHead) -> RootfsCheck {
    let m = &head.manifest;
    match m
        .verity_of(ROOTFS_SEGMENT)
        .and_then(|v| Some((v, m.segment(&v.hash)?)))
    {
        Some((v, hash)) => RootfsCheck::Verity {
            hash: Box::new(hash.clone()),
            salt: v.salt.clone(),
            root_hash: v.root_hash,
        },
        None => RootfsCheck::WholeSegment,
    }
}

/// Everything up to the mount: open the partition read-only, parse the head, find the rootfs
/// segment; without a verity entry, hash the whole segment against the manifest (with one,
/// dm-verity checks each block at read time, nothing is hashed here).
pub fn check_slot(partition: &Path) -> Result<CheckedSlot, SlotFsError> {
    let file = File::open(partition).map_err(|source| SlotFsError::Read {
        path: partition.to_path_buf(),
        source,
    })?;
    let capacity = capacity(&file, partition)?;
    let head = read_head(&file, partition, capacity)?;
    let rootfs = rootfs_segment(&head, partition)?;
    let check = rootfs_check(&head);
    if check == RootfsCheck::WholeSegment {
        verify_segment(&file, partition, &rootfs)?;
    }
    Ok(CheckedSlot {
        file,
        capacity,
        head,
        rootfs,
        check,
    })
}

/// The dm-verity table of a rootfs `data` segment with its tree in `hash`, on the loop
/// devices `data_dev` (the segment padded to 4 KiB) and `hash_dev` (the tree from its block 0).
pub fn verity_table(
    data: &Segment,
    data_dev: (u32, u32),
    hash_dev: (u32, u32),
    salt: &[u8],
    root_hash: [u8; 32],
) -> dm::VerityTable {
    dm::VerityTable {
        data_dev,
        hash_dev,
        data_block_size: proto::verity::BLOCK as u32,
        hash_block_size: proto::verity::BLOCK as u32,
        data_blocks: proto::verity::data_blocks(data.size),
        hash_start_block: 0,
        root_hash,
        salt: salt.to_vec(),
    }
}

/// The device-mapper name of the rootfs of `partition`: `nx-rootfs-<partition file name>`.
pub fn dm_name(partition: &Path) -> String {
    let base: String = partition
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(64)
        .collect();
    format!("nx-rootfs-{base}")
}

/// A read-only autoclear loop device over `range` of the checked slot's partition.
fn attach(
    slot: &CheckedSlot,
    partition: &Path,
    range: &Range,
    dev_dir: &Path,
) -> Result<loopdev::LoopDevice, SlotFsError> {
    let loop_err = |source| SlotFsError::Loop {
        path: partition.to_path_buf(),
        source,
    };
    range.check(slot.capacity).map_err(loop_err)?;
    loopdev::attach_read_only(&slot.file, range, dev_dir).map_err(loop_err)
}

/// The block device the rootfs is mounted from, and what keeps it alive until the mount holds it.
struct RootfsDevice {
    path: PathBuf,
    /// The loop device of a rootfs without verity: with autoclear it would detach as soon as
    /// this handle closes, so it is kept until the mount holds the device.
    _loop: Option<loopdev::LoopDevice>,
    /// The dm-verity device, removed again when the mount fails.
    dm: Option<dm::Device>,
}

/// The block device to mount the rootfs from: a dm-verity device over two loop devices (verity
/// entry), else a loop device over the (already hashed) segment.
fn rootfs_device(
    slot: &CheckedSlot,
    partition: &Path,
    dev_dir: &Path,
) -> Result<RootfsDevice, SlotFsError> {
    let data = attach(slot, partition, &segment_range(&slot.rootfs), dev_dir)?;
    let RootfsCheck::Verity {
        hash,
        salt,
        root_hash,
    } = &slot.check
    else {
        return Ok(RootfsDevice {
            path: data.path().to_path_buf(),
            _loop: Some(data),
            dm: None,
        });
    };
    let tree = attach(slot, partition, &segment_range(hash), dev_dir)?;
    let verity_err = |source| SlotFsError::Verity {
        path: partition.to_path_buf(),
        source,
    };
    let table = verity_table(
        &slot.rootfs,
        data.dev_number().map_err(verity_err)?,
        tree.dev_number().map_err(verity_err)?,
        salt,
        *root_hash,
    );
    // dm-verity holds both loop devices open from here on; dropping our handles lets them
    // detach themselves (autoclear) once the dm device goes.
    let dev = dm::create_verity(dev_dir, &dm_name(partition), &table).map_err(verity_err)?;
    Ok(RootfsDevice {
        path: dev.path().to_path_buf(),
        _loop: None,
        dm: Some(dev),
    })
}

/// Check the slot on `partition`, mount its rootfs read-only on `mountpoint` (squashfs through
/// dm-verity, or on a loop device over the hashed segment, see the module docs) and read its
/// version. On an os-release failure the file system is unmounted again.
pub fn mount_rootfs(
    partition: &Path,
    mountpoint: &Path,
    dev_dir: &Path,
) -> Result<Mounted, SlotFsError> {
    let started = Instant::now();
    let slot = check_slot(partition)?;
    crate::sys::mkdir_p(mountpoint).map_err(|source| SlotFsError::MountPoint {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    let rootfs = rootfs_device(&slot, partition, dev_dir)?;
    let device = rootfs.path.clone();
    let dm_dev = rootfs.dm;
    use rustix::mount::MountFlags;
    if let Err(e) = rustix::mount::mount(
        &device,
        mountpoint,
        "squashfs",
        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
        None,
    ) {
        if let Some(d) = dm_dev {
            let _ = d.remove();
            if e == rustix::io::Errno::IO {
                return Err(SlotFsError::Corrupted {
                    path: partition.to_path_buf(),
                    device,
                    source: e.into(),
                });
            }
        }
        return Err(SlotFsError::Mount {
            path: partition.to_path_buf(),
            device,
            source: e.into(),
        });
    }
    // The mount holds the device now; a loop device with autoclear detaches at unmount.
    drop(rootfs._loop);
    let version = read_os_release(mountpoint).and_then(|t| os_release_version(&t));
    match version {
        Ok(version) => Ok(Mounted {
            device,
            mountpoint: mountpoint.to_path_buf(),
            version,
            security_version: slot.head.manifest.security_version,
            image_version: slot.head.manifest.version.clone(),
            rootfs_bytes: slot.rootfs.size,
            check: slot.check,
            took: started.elapsed(),
        }),
        Err(reason) => {
            let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
            if let Some(d) = dm_dev {
                // Busy until the lazy unmount lets go; then it stays (harmless, read-only).
                let _ = d.remove();
            }
            Err(SlotFsError::OsRelease {
                path: partition.to_path_buf(),
                reason,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::manifest::SegmentDigest;

    /// A minimal valid image with the given segments (name, bytes).
    fn image(version: &str, segs: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let parts: Vec<(String, SegmentDigest)> = segs
            .iter()
            .map(|(n, b)| {
                let mut h = SegmentHasher::new();
                h.update(b);
                (n.to_string(), h.finish())
            })
            .collect();
        let m = proto::image::layout(version, &parts).unwrap();
        let head = ImageHead::build(&m, None).unwrap().to_bytes();
        let mut out = vec![0u8; usize::try_from(m.total_size).unwrap()];
        out[..head.len()].copy_from_slice(&head);
        for (s, (_, b)) in m.segments.iter().zip(segs) {
            let o = usize::try_from(s.offset).unwrap();
            out[o..o + b.len()].copy_from_slice(b);
        }
        out
    }

    /// An image whose `rootfs` has its dm-verity tree in `rootfs-verity` (as `nx image build`
    /// makes it), plus a `kernel` segment.
    fn verity_image(rootfs: &[u8], salt: &[u8]) -> (Vec<u8>, [u8; 32]) {
        let tree = proto::verity::tree(salt, rootfs);
        let segs: Vec<(&str, Vec<u8>)> = vec![
            ("rootfs", rootfs.to_vec()),
            ("rootfs-verity", tree.bytes.clone()),
            ("kernel", vec![9u8; 100]),
        ];
        let parts: Vec<(String, SegmentDigest)> = segs
            .iter()
            .map(|(n, b)| {
                let mut h = SegmentHasher::new();
                h.update(b);
                (n.to_string(), h.finish())
            })
            .collect();
        let opts = proto::image::LayoutOptions {
            version: "3".into(),
            security_version: 0,
            verity: vec![proto::manifest::Verity {
                data: "rootfs".into(),
                hash: "rootfs-verity".into(),
                salt: salt.to_vec(),
                root_hash: tree.root_hash,
            }],
        };
        let m = proto::image::layout_with(&opts, &parts).unwrap();
        let head = ImageHead::build(&m, None).unwrap().to_bytes();
        let mut out = vec![0u8; usize::try_from(m.total_size).unwrap()];
        out[..head.len()].copy_from_slice(&head);
        for (s, (_, b)) in m.segments.iter().zip(&segs) {
            let o = usize::try_from(s.offset).unwrap();
            out[o..o + b.len()].copy_from_slice(b);
        }
        (out, tree.root_hash)
    }

    #[test]
    fn with_a_verity_entry_nothing_is_hashed_before_the_mount() {
        let rootfs: Vec<u8> = (0..(200 * 4096 + 77u32)).map(|i| (i % 253) as u8).collect();
        let (mut img, root) = verity_image(&rootfs, &[7u8; 32]);
        // Corrupt a rootfs byte: the whole-segment hash would refuse it; with verity the check
        // is deferred to dm-verity (block by block at read time).
        let head_len = usize::try_from(Header::parse(&img).unwrap().data_offset).unwrap();
        let head = ImageHead::parse(&img[..head_len]).unwrap();
        let rootfs_off = usize::try_from(head.manifest.segment("rootfs").unwrap().offset).unwrap();
        img[rootfs_off + 5000] ^= 0xff;
        let (_d, p) = part(&img, 4 << 20);
        let c = check_slot(&p).unwrap();
        let RootfsCheck::Verity {
            hash,
            salt,
            root_hash,
        } = &c.check
        else {
            panic!("no verity plan: {:?}", c.check);
        };
        assert_eq!(*root_hash, root);
        assert_eq!(salt, &vec![7u8; 32]);
        assert_eq!(hash.name, "rootfs-verity");
        assert_eq!(hash.offset, c.rootfs.padded_end());
        assert_eq!(c.check.root_prefix().unwrap(), hex::encode(&root[..8]));
        // The table: the data device is the segment padded to 4 KiB (201 blocks), the tree
        // starts at block 0 of the hash device.
        let t = verity_table(&c.rootfs, (7, 0), (7, 1), salt, *root_hash);
        assert_eq!(t.data_blocks, 201);
        assert_eq!(segment_range(&c.rootfs).len, 201 * 4096);
        assert_eq!(
            t.line(),
            format!(
                "0 1608 verity 1 7:0 7:1 4096 4096 201 0 sha256 {} {}",
                hex::encode(root),
                hex::encode([7u8; 32])
            )
        );
        assert!(segment_range(hash).len >= proto::verity::tree_size(201));

        // The same corruption without a verity entry: caught by the whole-segment hash.
        let plain = image("3", &[("rootfs", rootfs.clone())]);
        let mut bad = plain.clone();
        bad[8192 + 5000] ^= 0xff;
        let (_d, p) = part(&bad, 4 << 20);
        assert!(matches!(
            check_slot(&p).unwrap_err(),
            SlotFsError::Corrupt { .. }
        ));
        let (_d, p) = part(&plain, 4 << 20);
        assert_eq!(check_slot(&p).unwrap().check, RootfsCheck::WholeSegment);
    }

    #[test]
    fn dm_names_are_valid() {
        assert_eq!(dm_name(Path::new("/dev/vda1")), "nx-rootfs-vda1");
        assert!(crate::dm::valid_name(&dm_name(Path::new(
            "/tmp/x y/system a"
        ))));
        assert!(crate::dm::valid_name(&dm_name(Path::new("/"))));
    }

    fn part(bytes: &[u8], size: usize) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("system_a");
        let mut v = bytes.to_vec();
        v.resize(size.max(bytes.len()), 0);
        std::fs::write(&p, v).unwrap();
        (d, p)
    }

    #[test]
    fn finds_and_verifies_rootfs() {
        let img = image(
            "2",
            &[("rootfs", vec![7u8; 5000]), ("extra", vec![1u8; 10])],
        );
        let (_d, p) = part(&img, 1 << 20);
        let c = check_slot(&p).unwrap();
        let (head, seg) = (c.head, c.rootfs);
        assert_eq!(c.check, RootfsCheck::WholeSegment);
        assert_eq!(head.manifest.version, "2");
        assert_eq!(seg.size, 5000);
        let r = segment_range(&seg);
        assert_eq!(r.len, 8192);
        r.check(1 << 20).unwrap();
    }

    #[test]
    fn blank_junk_truncated_and_corrupt_slots_are_slot_faults() {
        let (_d, p) = part(&[], 1 << 20);
        let e = check_slot(&p).unwrap_err();
        assert!(matches!(e, SlotFsError::NoImage { .. }), "{e}");
        assert!(e.to_string().contains("blank"));
        assert!(e.is_slot_fault());

        let (_d, p) = part(&[0x5a; 8192], 1 << 20);
        assert!(matches!(
            check_slot(&p).unwrap_err(),
            SlotFsError::NoImage { .. }
        ));

        let (_d, p) = part(&[1, 2, 3], 0);
        assert!(matches!(
            check_slot(&p).unwrap_err(),
            SlotFsError::NoImage { .. }
        ));

        let img = image("1", &[("rootfs", vec![3u8; 100_000])]);
        // Only part of the image fits (a partition smaller than the image).
        let (_d, p) = part(&img[..img.len() - 8192], 0);
        assert!(matches!(
            check_slot(&p).unwrap_err(),
            SlotFsError::Truncated { .. }
        ));

        // A half-written install: head fine, data missing (zeros).
        let mut half = img.clone();
        let n = half.len();
        half[n - 20_000..].fill(0);
        let (_d, p) = part(&half, 1 << 20);
        let e = check_slot(&p).unwrap_err();
        assert!(matches!(e, SlotFsError::Corrupt { .. }), "{e}");
        assert!(e.is_slot_fault());

        let img = image("1", &[("kernel", vec![3u8; 10])]);
        let (_d, p) = part(&img, 1 << 20);
        let e = check_slot(&p).unwrap_err();
        assert!(e
            .to_string()
            .contains("no `rootfs` segment (segments: kernel)"));
    }

    #[test]
    fn verity_faults() {
        let e = SlotFsError::Verity {
            path: "/dev/vda1".into(),
            source: crate::Error::Sys {
                what: "open /dev/mapper/control".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            },
        };
        assert!(!e.is_slot_fault());
        let e = SlotFsError::Corrupted {
            path: "/dev/vda1".into(),
            device: "/dev/dm-0".into(),
            source: std::io::Error::from_raw_os_error(libc::EIO),
        };
        assert!(e.is_slot_fault());
        assert!(e
            .to_string()
            .starts_with(nx_contract::markers::init::VERITY_REFUSED));
    }

    #[test]
    fn environment_faults_are_not_slot_faults() {
        let e = SlotFsError::Mount {
            path: "/dev/vdb1".into(),
            device: "/dev/loop0".into(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        };
        assert!(!e.is_slot_fault());
        let e = SlotFsError::Mount {
            path: "/dev/vdb1".into(),
            device: "/dev/loop0".into(),
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        };
        assert!(e.is_slot_fault());
    }

    #[test]
    fn os_release_versions() {
        assert_eq!(
            os_release_version("NAME=\"nexus\"\nVERSION=\"2\"\nVERSION_ID=2\n").unwrap(),
            "2"
        );
        assert_eq!(os_release_version("VERSION_ID=1.0.0\n").unwrap(), "1.0.0");
        assert_eq!(os_release_version("VERSION='3'\n").unwrap(), "3");
        assert!(os_release_version("NAME=x\n").is_err());
        assert!(os_release_version("VERSION=\"1 (buster)\"\n").is_err());
        assert!(os_release_version("VERSION=\"\"\n").is_err());
    }

    #[test]
    fn os_release_stays_inside_the_tree() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        std::fs::create_dir_all(d.path().join("usr/lib")).unwrap();
        std::fs::write(d.path().join("usr/lib/os-release"), "VERSION=9\n").unwrap();
        // An absolute symlink resolves inside the tree, not on the host.
        std::os::unix::fs::symlink("/usr/lib/os-release", d.path().join("etc/os-release")).unwrap();
        let t = read_os_release(d.path());
        assert_eq!(os_release_version(&t.unwrap()).unwrap(), "9");
        // A symlink escaping with .. stays inside too.
        std::fs::remove_file(d.path().join("etc/os-release")).unwrap();
        std::os::unix::fs::symlink(
            "../../../../../etc/hostname",
            d.path().join("etc/os-release"),
        )
        .unwrap();
        std::fs::write(d.path().join("etc/hostname"), "VERSION=inside\n").unwrap();
        assert_eq!(
            os_release_version(&read_os_release(d.path()).unwrap()).unwrap(),
            "inside"
        );
        std::fs::remove_file(d.path().join("etc/os-release")).unwrap();
        std::fs::write(d.path().join("usr/lib/os-release"), "x".repeat(5000)).unwrap();
        assert!(read_os_release(d.path()).unwrap_err().contains("larger"));
        let empty = tempfile::tempdir().unwrap();
        assert!(read_os_release(empty.path())
            .unwrap_err()
            .contains("no os-release"));
    }

    /// The whole path on the build host when it allows it (root, loop devices, squashfs):
    /// the demo image that `cargo xtask guest` builds, in a partition-like file, mounts and
    /// reports its os-release version; the broken image is a slot fault.
    #[test]
    fn mount_demo_image_on_host_when_possible() {
        let build = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build");
        let demo = build.join("nexus-os.img");
        if rustix::process::geteuid().as_raw() != 0 || !demo.exists() {
            eprintln!("skipped: not root or no build/nexus-os.img (cargo xtask guest)");
            return;
        }
        let (_d, p) = part(&std::fs::read(&demo).unwrap(), 4 << 20);
        let mnt = tempfile::tempdir().unwrap();
        match mount_rootfs(&p, mnt.path(), Path::new("/dev")) {
            Ok(m) => {
                // Unmount before asserting, so a failure leaves no mount behind.
                let unmounted =
                    rustix::mount::unmount(mnt.path(), rustix::mount::UnmountFlags::empty());
                assert_eq!(m.version, m.image_version);
                assert!(
                    m.device.to_string_lossy().starts_with("/dev/loop")
                        || m.device.to_string_lossy().starts_with("/dev/dm-"),
                    "{}",
                    m.device.display()
                );
                unmounted.unwrap();
            }
            Err(e) if !e.is_slot_fault() => {
                eprintln!("skipped: cannot mount here ({e})");
                return;
            }
            Err(SlotFsError::Mount { source, .. })
                if source.raw_os_error() == Some(libc::EPERM) =>
            {
                eprintln!("skipped: mounting not permitted here");
                return;
            }
            Err(e) => panic!("demo image did not mount: {e}"),
        }
        let broken = build.join("nexus-os-broken.img");
        if broken.exists() {
            let (_d, p) = part(&std::fs::read(&broken).unwrap(), 4 << 20);
            let e = mount_rootfs(&p, mnt.path(), Path::new("/dev")).unwrap_err();
            assert!(matches!(e, SlotFsError::Mount { .. }), "{e}");
            assert!(e.is_slot_fault());
        }
    }
}
