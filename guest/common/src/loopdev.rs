//! Loop devices: expose a byte range of a file or block device (a segment of the image in a
//! slot partition) as a block device of its own, read-only, with `LOOP_CONFIGURE`
//! (Linux ≥ 5.8; the guest kernel is 6.1). `libc` has no loop ioctls, so the ABI of
//! `<linux/loop.h>` is spelled out here.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The loop control device.
pub const LOOP_CONTROL: &str = "/dev/loop-control";

const LOOP_CLR_FD: libc::c_ulong = 0x4C01;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
/// `LO_FLAGS_READ_ONLY`.
const LO_FLAGS_READ_ONLY: u32 = 1;
/// `LO_FLAGS_AUTOCLEAR`: the device detaches itself when its last user (the mount) goes.
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
/// Free loop devices we try before giving up (another process may take the one we got).
const ATTACH_ATTEMPTS: usize = 8;

/// `struct loop_info64` (232 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` (304 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; LO_KEY_SIZE],
            lo_init: [0; 2],
        }
    }
}

/// A byte range of a backing file, as a loop device request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    /// Offset in the backing file (a multiple of 512).
    pub offset: u64,
    /// Length (a multiple of 512, > 0).
    pub len: u64,
}

impl Range {
    /// Check the range against the backing file's size and the loop driver's sector rules.
    pub fn check(&self, backing_size: u64) -> Result<()> {
        let bad = |why: String| Error::Invalid {
            what: "loop device range",
            value: why,
        };
        if self.len == 0 || !self.offset.is_multiple_of(512) || !self.len.is_multiple_of(512) {
            return Err(bad(format!(
                "offset {} / length {} must be non-zero multiples of 512",
                self.offset, self.len
            )));
        }
        match self.offset.checked_add(self.len) {
            Some(end) if end <= backing_size => Ok(()),
            _ => Err(bad(format!(
                "bytes {}..+{} lie beyond the end of the {backing_size}-byte backing device",
                self.offset, self.len
            ))),
        }
    }
}

/// An attached loop device. With `LO_FLAGS_AUTOCLEAR` it detaches itself once nothing uses
/// it any more (after the file system on it is unmounted and this handle is dropped).
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    file: File,
}

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `(major, minor)` of the device.
    pub fn dev_number(&self) -> Result<(u32, u32)> {
        crate::dm::block_dev_number(&self.file, &self.path)
    }

    /// Detach now (`LOOP_CLR_FD`); with autoclear a mounted device detaches at unmount.
    pub fn detach(self) -> Result<()> {
        // SAFETY: LOOP_CLR_FD takes no argument; the fd is a loop device we opened.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), LOOP_CLR_FD as _, 0) };
        if rc != 0 {
            return Err(Error::Sys {
                what: format!("LOOP_CLR_FD {}", self.path.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// `(offset, sizelimit, read_only)` as the driver reports them (`LOOP_GET_STATUS64`).
    pub fn status(&self) -> Result<(u64, u64, bool)> {
        let mut info = LoopInfo64::zeroed();
        // SAFETY: the kernel fills a loop_info64 of exactly this layout.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                LOOP_GET_STATUS64 as _,
                &mut info as *mut LoopInfo64,
            )
        };
        if rc != 0 {
            return Err(Error::Sys {
                what: format!("LOOP_GET_STATUS64 {}", self.path.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok((
            info.lo_offset,
            info.lo_sizelimit,
            info.lo_flags & LO_FLAGS_READ_ONLY != 0,
        ))
    }
}

fn get_free(control: &File) -> Result<u32> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
    let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
    u32::try_from(n).map_err(|_| Error::Sys {
        what: format!("LOOP_CTL_GET_FREE on {LOOP_CONTROL} (is the loop module loaded?)"),
        source: std::io::Error::last_os_error(),
    })
}

/// Attach `range` of `backing` (opened read-only) to a free loop device, read-only and
/// autoclear. `dev_dir` is normally `/dev`.
pub fn attach_read_only(backing: &File, range: &Range, dev_dir: &Path) -> Result<LoopDevice> {
    let control_path = dev_dir.join("loop-control");
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&control_path)
        .map_err(|e| Error::io("open", &control_path, e))?;
    let fd = u32::try_from(backing.as_raw_fd()).map_err(|_| Error::Invalid {
        what: "backing file descriptor",
        value: backing.as_raw_fd().to_string(),
    })?;
    let mut info = LoopInfo64::zeroed();
    info.lo_offset = range.offset;
    info.lo_sizelimit = range.len;
    info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
    let config = LoopConfig {
        fd,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    let mut last = None;
    for _ in 0..ATTACH_ATTEMPTS {
        let n = get_free(&control)?;
        let path = dev_dir.join(format!("loop{n}"));
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::io("open", &path, e))?;
        // SAFETY: LOOP_CONFIGURE reads a loop_config of exactly this layout.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                LOOP_CONFIGURE as _,
                &config as *const LoopConfig,
            )
        };
        if rc == 0 {
            return Ok(LoopDevice { path, file });
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(Error::Sys {
                what: format!(
                    "LOOP_CONFIGURE {} (offset {}, length {})",
                    path.display(),
                    range.offset,
                    range.len
                ),
                source: err,
            });
        }
        // Someone took it between GET_FREE and CONFIGURE: ask again.
        last = Some(err);
    }
    Err(Error::Sys {
        what: format!("no free loop device after {ATTACH_ATTEMPTS} attempts"),
        source: last.unwrap_or_else(|| std::io::Error::from_raw_os_error(libc::EBUSY)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_rules() {
        let r = |offset, len| Range { offset, len };
        r(4096, 8192).check(12288).unwrap();
        assert!(r(4096, 8192).check(12287).is_err());
        assert!(r(0, 0).check(4096).is_err());
        assert!(r(100, 512).check(4096).is_err());
        assert!(r(512, 100).check(4096).is_err());
        assert!(r(u64::MAX - 511, 512).check(u64::MAX).is_err());
    }

    /// Real attach on the build host when it allows it (root with /dev/loop-control):
    /// the loop device shows exactly the requested bytes and is read-only.
    #[test]
    fn attach_on_host_when_possible() {
        use std::io::{Read, Write};
        if !Path::new(LOOP_CONTROL).exists() || rustix::process::geteuid().as_raw() != 0 {
            eprintln!("skipped: no {LOOP_CONTROL} or not root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("backing");
        let mut data = vec![0u8; 3 * 4096];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i / 4096) as u8 + 1;
        }
        std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
        let backing = File::open(&p).unwrap();
        let dev = match attach_read_only(
            &backing,
            &Range {
                offset: 4096,
                len: 4096,
            },
            Path::new("/dev"),
        ) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("skipped: loop devices not usable here ({e})");
                return;
            }
        };
        let (off, limit, ro) = dev.status().unwrap();
        assert_eq!((off, limit, ro), (4096, 4096, true));
        let mut got = Vec::new();
        File::open(dev.path())
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert_eq!(got, vec![2u8; 4096]);
        dev.detach().unwrap();
    }
}
