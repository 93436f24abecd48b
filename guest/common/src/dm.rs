//! Device mapper without userspace tools: a read-only `verity` device from the DM ioctls on
//! `/dev/mapper/control` (`DM_DEV_CREATE`, `DM_TABLE_LOAD` with one target, `DM_DEV_SUSPEND`
//! without the suspend flag = resume, `DM_DEV_REMOVE` to undo), interface version 4 of
//! `<linux/dm-ioctl.h>`. `libc` has no DM ioctls, so the ABI is spelled out here (and checked
//! field by field in the tests).
//!
//! The device node: devtmpfs creates `/dev/dm-<minor>` when the device is created (no udev);
//! when it is not there (no devtmpfs), a node `mapper/<name>` is made with `mknod` from the
//! device number in the kernel's reply.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The device-mapper control device, relative to `/dev`.
pub const CONTROL: &str = "mapper/control";

/// `DM_VERSION_MAJOR`: the kernel refuses any other major version.
const VERSION: [u32; 3] = [4, 0, 0];
/// `DM_NAME_LEN`.
pub const NAME_LEN: usize = 128;
/// `DM_MAX_TYPE_NAME`.
const TYPE_NAME_LEN: usize = 16;

/// `sizeof(struct dm_ioctl)`.
pub const IOCTL_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
pub const SPEC_SIZE: usize = 40;

// Offsets in `struct dm_ioctl`.
const OFF_VERSION: usize = 0;
const OFF_DATA_SIZE: usize = 12;
const OFF_DATA_START: usize = 16;
const OFF_TARGET_COUNT: usize = 20;
const OFF_FLAGS: usize = 28;
const OFF_DEV: usize = 40;
const OFF_NAME: usize = 48;
// `uuid[DM_UUID_LEN = 129]` at 176 stays zero (no uuid), `data[7]` pads to 312.

// Offsets in `struct dm_target_spec`.
const SPEC_OFF_START: usize = 0;
const SPEC_OFF_LENGTH: usize = 8;
const SPEC_OFF_NEXT: usize = 20;
const SPEC_OFF_TYPE: usize = 24;

/// `DM_READONLY_FLAG` (a verity table must be read-only).
const READONLY_FLAG: u32 = 1 << 0;

/// `_IOWR(DM_IOCTL = 0xfd, cmd, struct dm_ioctl)`.
const fn iowr(cmd: u32) -> u32 {
    (3 << 30) | ((IOCTL_SIZE as u32) << 16) | (0xfd << 8) | cmd
}
const DM_DEV_CREATE: u32 = iowr(3);
const DM_DEV_REMOVE: u32 = iowr(4);
const DM_DEV_SUSPEND: u32 = iowr(6);
const DM_TABLE_LOAD: u32 = iowr(9);

/// Largest parameter string of a target we send (a verity table is ~250 bytes with a 32-byte
/// salt, ~650 with the longest salt).
const MAX_PARAMS: usize = 4096;

/// The parameters of a dm-verity target (format 1, see `proto::verity`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTable {
    /// The data device, `major:minor`.
    pub data_dev: (u32, u32),
    /// The hash device, `major:minor`.
    pub hash_dev: (u32, u32),
    /// Data block size in bytes (4096).
    pub data_block_size: u32,
    /// Hash block size in bytes (4096).
    pub hash_block_size: u32,
    /// Number of data blocks (the device's size in data blocks).
    pub data_blocks: u64,
    /// First hash block (the root block) on the hash device, in hash blocks.
    pub hash_start_block: u64,
    /// Root hash (SHA-256).
    pub root_hash: [u8; 32],
    /// Salt (may be empty: written `-`).
    pub salt: Vec<u8>,
}

impl VerityTable {
    /// Length of the device in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.data_blocks
            .saturating_mul(u64::from(self.data_block_size) / 512)
    }

    /// The target's parameter string:
    /// `1 <data_dev> <hash_dev> <data_bs> <hash_bs> <data_blocks> <hash_start> sha256 <root> <salt>`.
    pub fn params(&self) -> String {
        let salt = if self.salt.is_empty() {
            "-".to_string()
        } else {
            hex::encode(&self.salt)
        };
        format!(
            "1 {}:{} {}:{} {} {} {} {} sha256 {} {salt}",
            self.data_dev.0,
            self.data_dev.1,
            self.hash_dev.0,
            self.hash_dev.1,
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            self.hash_start_block,
            hex::encode(self.root_hash),
        )
    }

    /// The whole table line as `dmsetup table` shows it: `0 <sectors> verity <params>`.
    pub fn line(&self) -> String {
        format!("0 {} verity {}", self.sectors(), self.params())
    }
}

/// A device name the kernel accepts: 1..=127 bytes, no `/`, not `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < NAME_LEN
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'))
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(d) = buf.get_mut(off..off + 4) {
        d.copy_from_slice(&v.to_ne_bytes());
    }
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    if let Some(d) = buf.get_mut(off..off + 8) {
        d.copy_from_slice(&v.to_ne_bytes());
    }
}

fn get_u32(buf: &[u8], off: usize) -> u32 {
    buf.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u32::from_ne_bytes)
}

fn get_u64(buf: &[u8], off: usize) -> u64 {
    buf.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

fn put_str(buf: &mut [u8], off: usize, max: usize, s: &str) {
    let n = s.len().min(max.saturating_sub(1));
    if let Some(d) = buf.get_mut(off..off + n) {
        d.copy_from_slice(&s.as_bytes()[..n]);
    }
}

/// A `struct dm_ioctl` for device `name` with `extra` bytes of payload after it (all zero).
pub fn encode_header(name: &str, flags: u32, extra: usize) -> Vec<u8> {
    let mut buf = vec![0u8; IOCTL_SIZE + extra];
    for (i, v) in VERSION.iter().enumerate() {
        put_u32(&mut buf, OFF_VERSION + 4 * i, *v);
    }
    put_u32(
        &mut buf,
        OFF_DATA_SIZE,
        u32::try_from(IOCTL_SIZE + extra).unwrap_or(u32::MAX),
    );
    put_u32(&mut buf, OFF_DATA_START, IOCTL_SIZE as u32);
    put_u32(&mut buf, OFF_FLAGS, flags);
    put_str(&mut buf, OFF_NAME, NAME_LEN, name);
    buf
}

/// The `DM_TABLE_LOAD` payload for one target: `struct dm_ioctl`, then one
/// `struct dm_target_spec` and its NUL-terminated parameter string, padded to 8 bytes.
pub fn encode_table_load(
    name: &str,
    start: u64,
    length: u64,
    target_type: &str,
    params: &str,
) -> Result<Vec<u8>> {
    if params.len() >= MAX_PARAMS || params.contains('\0') || target_type.len() >= TYPE_NAME_LEN {
        return Err(Error::Invalid {
            what: "device-mapper target",
            value: format!("{target_type} with {} bytes of parameters", params.len()),
        });
    }
    let spec_len = (SPEC_SIZE + params.len() + 1).next_multiple_of(8);
    let mut buf = encode_header(name, READONLY_FLAG, spec_len);
    put_u32(&mut buf, OFF_TARGET_COUNT, 1);
    let s = IOCTL_SIZE;
    put_u64(&mut buf, s + SPEC_OFF_START, start);
    put_u64(&mut buf, s + SPEC_OFF_LENGTH, length);
    put_u32(
        &mut buf,
        s + SPEC_OFF_NEXT,
        u32::try_from(spec_len).unwrap_or(0),
    );
    put_str(&mut buf, s + SPEC_OFF_TYPE, TYPE_NAME_LEN, target_type);
    put_str(&mut buf, s + SPEC_SIZE, params.len() + 1, params);
    Ok(buf)
}

/// `(major, minor)` of the kernel's 32-bit `huge_encode_dev` device number in the reply.
pub fn decode_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    (major, minor)
}

/// `(major, minor)` of an open block device.
pub fn block_dev_number(f: &File, path: &Path) -> Result<(u32, u32)> {
    let meta = f.metadata().map_err(|e| Error::io("stat", path, e))?;
    if !meta.file_type().is_block_device() {
        return Err(Error::Invalid {
            what: "block device",
            value: path.display().to_string(),
        });
    }
    let rdev = meta.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}

fn ioctl(control: &File, cmd: u32, buf: &mut [u8], what: &str, name: &str) -> Result<()> {
    // SAFETY: `buf` starts with a `struct dm_ioctl` whose `data_size` is `buf.len()` (set by
    // `encode_header`); the kernel reads and writes at most `data_size` bytes of it.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), cmd as _, buf.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::Sys {
            what: format!("{what} of device-mapper device {name}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// An active read-only device-mapper device. Dropping it does not remove it (the mount on it
/// keeps it); [`Device::remove`] does.
#[derive(Debug)]
pub struct Device {
    name: String,
    path: PathBuf,
    dev: (u32, u32),
    control: File,
}

impl Device {
    /// The device node (`/dev/dm-<minor>` or `/dev/mapper/<name>`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(major, minor)`.
    pub fn dev(&self) -> (u32, u32) {
        self.dev
    }

    /// The device-mapper name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `DM_DEV_REMOVE` (fails with `EBUSY` while it is mounted or open).
    pub fn remove(self) -> Result<()> {
        remove(&self.control, &self.name)
    }
}

fn remove(control: &File, name: &str) -> Result<()> {
    let mut buf = encode_header(name, 0, 0);
    ioctl(control, DM_DEV_REMOVE, &mut buf, "DM_DEV_REMOVE", name)
}

/// The node of device `(major, minor)`: `dev_dir/dm-<minor>` when devtmpfs made it (a block
/// device of that number), else a new node `dev_dir/mapper/<name>` (mknod, mode 0600).
fn node(dev_dir: &Path, name: &str, dev: (u32, u32)) -> Result<PathBuf> {
    let want = libc::makedev(dev.0, dev.1);
    let dm = dev_dir.join(format!("dm-{}", dev.1));
    if let Ok(m) = std::fs::metadata(&dm) {
        if m.file_type().is_block_device() && m.rdev() == want {
            return Ok(dm);
        }
    }
    let path = dev_dir.join("mapper").join(name);
    let _ = std::fs::remove_file(&path);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::BlockDevice,
        rustix::fs::Mode::from_raw_mode(0o600),
        rustix::fs::makedev(dev.0, dev.1),
    )
    .map_err(|e| Error::Sys {
        what: format!("mknod {} ({}:{})", path.display(), dev.0, dev.1),
        source: e.into(),
    })?;
    Ok(path)
}

/// Create device `name` with one read-only `verity` target of `table` and activate it.
/// `dev_dir` is normally `/dev`. On any failure after the create the device is removed again.
pub fn create_verity(dev_dir: &Path, name: &str, table: &VerityTable) -> Result<Device> {
    if !valid_name(name) {
        return Err(Error::Invalid {
            what: "device-mapper name",
            value: name.chars().take(NAME_LEN).collect(),
        });
    }
    let control_path = dev_dir.join(CONTROL);
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&control_path)
        .map_err(|e| Error::io("open (is the dm_mod module loaded?)", &control_path, e))?;
    let mut buf = encode_header(name, 0, 0);
    ioctl(&control, DM_DEV_CREATE, &mut buf, "DM_DEV_CREATE", name)?;
    let dev = decode_dev(get_u64(&buf, OFF_DEV));
    let activate = || -> Result<PathBuf> {
        let mut load = encode_table_load(name, 0, table.sectors(), "verity", &table.params())?;
        ioctl(
            &control,
            DM_TABLE_LOAD,
            &mut load,
            "DM_TABLE_LOAD (verity; is the dm_verity module loaded?)",
            name,
        )?;
        let mut resume = encode_header(name, 0, 0);
        ioctl(
            &control,
            DM_DEV_SUSPEND,
            &mut resume,
            "DM_DEV_SUSPEND (resume)",
            name,
        )?;
        let flags = get_u32(&resume, OFF_FLAGS);
        if flags & READONLY_FLAG == 0 {
            return Err(Error::Invalid {
                what: "device-mapper device after resume",
                value: format!("{name} is not read-only (flags {flags:#x})"),
            });
        }
        node(dev_dir, name, dev)
    };
    match activate() {
        Ok(path) => Ok(Device {
            name: name.to_string(),
            path,
            dev,
            control,
        }),
        Err(e) => {
            let _ = remove(&control, name);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// `DM_UUID_LEN`.
    const UUID_LEN: usize = 129;
    const OFF_UUID: usize = 176;

    /// `struct dm_ioctl` of `<linux/dm-ioctl.h>`, transcribed field by field.
    #[repr(C)]
    #[allow(dead_code)]
    struct DmIoctl {
        version: [u32; 3],
        data_size: u32,
        data_start: u32,
        target_count: u32,
        open_count: i32,
        flags: u32,
        event_nr: u32,
        padding: u32,
        dev: u64,
        name: [u8; NAME_LEN],
        uuid: [u8; UUID_LEN],
        data: [u8; 7],
    }

    /// `struct dm_target_spec`.
    #[repr(C)]
    #[allow(dead_code)]
    struct DmTargetSpec {
        sector_start: u64,
        length: u64,
        status: i32,
        next: u32,
        target_type: [u8; TYPE_NAME_LEN],
    }

    #[test]
    fn layout_matches_the_uapi_header() {
        assert_eq!(size_of::<DmIoctl>(), IOCTL_SIZE);
        assert_eq!(offset_of!(DmIoctl, version), OFF_VERSION);
        assert_eq!(offset_of!(DmIoctl, data_size), OFF_DATA_SIZE);
        assert_eq!(offset_of!(DmIoctl, data_start), OFF_DATA_START);
        assert_eq!(offset_of!(DmIoctl, target_count), OFF_TARGET_COUNT);
        assert_eq!(offset_of!(DmIoctl, flags), OFF_FLAGS);
        assert_eq!(offset_of!(DmIoctl, dev), OFF_DEV);
        assert_eq!(offset_of!(DmIoctl, name), OFF_NAME);
        assert_eq!(offset_of!(DmIoctl, uuid), OFF_UUID);
        assert_eq!(size_of::<DmTargetSpec>(), SPEC_SIZE);
        assert_eq!(offset_of!(DmTargetSpec, sector_start), SPEC_OFF_START);
        assert_eq!(offset_of!(DmTargetSpec, length), SPEC_OFF_LENGTH);
        assert_eq!(offset_of!(DmTargetSpec, next), SPEC_OFF_NEXT);
        assert_eq!(offset_of!(DmTargetSpec, target_type), SPEC_OFF_TYPE);
        // The ioctl numbers as <linux/dm-ioctl.h> defines them on x86_64 (strace shows these).
        assert_eq!(DM_DEV_CREATE, 0xc138_fd03);
        assert_eq!(DM_DEV_REMOVE, 0xc138_fd04);
        assert_eq!(DM_DEV_SUSPEND, 0xc138_fd06);
        assert_eq!(DM_TABLE_LOAD, 0xc138_fd09);
    }

    #[test]
    fn header_encoding() {
        let b = encode_header("nx-rootfs", READONLY_FLAG, 0);
        assert_eq!(b.len(), 312);
        assert_eq!((get_u32(&b, 0), get_u32(&b, 4), get_u32(&b, 8)), (4, 0, 0));
        assert_eq!(get_u32(&b, OFF_DATA_SIZE), 312);
        assert_eq!(get_u32(&b, OFF_DATA_START), 312);
        assert_eq!(get_u32(&b, OFF_FLAGS), 1);
        assert_eq!(&b[OFF_NAME..OFF_NAME + 10], b"nx-rootfs\0");
        assert!(b[OFF_UUID..].iter().all(|&x| x == 0));
        // A name is always NUL-terminated, even when too long.
        let long = "x".repeat(300);
        let b = encode_header(&long, 0, 0);
        assert_eq!(b[OFF_NAME + NAME_LEN - 1], 0);
        assert_eq!(b[OFF_NAME + NAME_LEN - 2], b'x');
    }

    #[test]
    fn table_load_encoding() {
        let params = "1 7:0 7:1 4096 4096 3 0 sha256 ab -";
        let b = encode_table_load("nx", 0, 24, "verity", params).unwrap();
        let spec_len = (40 + params.len() + 1).next_multiple_of(8);
        assert_eq!(b.len(), 312 + spec_len);
        assert_eq!(b.len() % 8, 0);
        assert_eq!(get_u32(&b, OFF_DATA_SIZE) as usize, b.len());
        assert_eq!(get_u32(&b, OFF_TARGET_COUNT), 1);
        assert_eq!(get_u32(&b, OFF_FLAGS) & READONLY_FLAG, READONLY_FLAG);
        let s = &b[312..];
        assert_eq!(get_u64(s, 0), 0);
        assert_eq!(get_u64(s, 8), 24);
        assert_eq!(get_u32(s, 20) as usize, spec_len);
        assert_eq!(&s[24..31], b"verity\0");
        assert_eq!(&s[40..40 + params.len()], params.as_bytes());
        assert_eq!(s[40 + params.len()], 0);
        assert!(encode_table_load("nx", 0, 8, "verity", &"x".repeat(MAX_PARAMS)).is_err());
        assert!(encode_table_load("nx", 0, 8, "a-very-long-target", "x").is_err());
        assert!(encode_table_load("nx", 0, 8, "verity", "a\0b").is_err());
    }

    #[test]
    fn verity_table_line() {
        let t = VerityTable {
            data_dev: (7, 1),
            hash_dev: (7, 2),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 300,
            hash_start_block: 0,
            root_hash: [0xab; 32],
            salt: vec![1, 2, 0xff],
        };
        assert_eq!(t.sectors(), 2400);
        assert_eq!(
            t.line(),
            format!(
                "0 2400 verity 1 7:1 7:2 4096 4096 300 0 sha256 {} 0102ff",
                "ab".repeat(32)
            )
        );
        let t = VerityTable { salt: vec![], ..t };
        assert!(t.params().ends_with(" -"));
    }

    #[test]
    fn device_numbers_and_names() {
        // new_encode_dev(MKDEV(254, 0)) and MKDEV(259, 300).
        assert_eq!(decode_dev(0xfe00), (254, 0));
        let enc = (300u64 & 0xff) | (259u64 << 8) | ((300u64 & !0xff) << 12);
        assert_eq!(decode_dev(enc), (259, 300));
        assert!(valid_name("nx-rootfs-vdb2"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(128)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
