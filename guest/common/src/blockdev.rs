//! Block devices: find the `/state` disk by its ext4 label and slot partitions by GPT name.
//!
//! Everything read here (superblocks, sysfs `uevent` files) is bounded and validated.

use crate::{bounded, Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the kernel lists block devices (disks and partitions).
pub const SYS_CLASS_BLOCK: &str = "/sys/class/block";
/// Where the kernel lists virtio devices.
pub const SYS_VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";

/// Offset of the ext2/3/4 superblock.
const SB_OFFSET: usize = 1024;
/// `s_magic` offset inside the superblock.
const SB_MAGIC: usize = 56;
/// `s_volume_name` offset and size inside the superblock.
const SB_LABEL: usize = 120;
const SB_LABEL_LEN: usize = 16;
const EXT_MAGIC: u16 = 0xEF53;
/// Longest uevent file we read.
const MAX_UEVENT: usize = 4096;

/// The label of an ext2/3/4 file system from the first 2 KiB of a device, or `None` when the
/// bytes are not an ext superblock or the label is not printable UTF-8.
pub fn ext4_label_from_bytes(head: &[u8]) -> Option<String> {
    let sb = head.get(SB_OFFSET..SB_OFFSET + 1024)?;
    let magic = u16::from_le_bytes([*sb.get(SB_MAGIC)?, *sb.get(SB_MAGIC + 1)?]);
    if magic != EXT_MAGIC {
        return None;
    }
    let raw = sb.get(SB_LABEL..SB_LABEL + SB_LABEL_LEN)?;
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let label = std::str::from_utf8(raw.get(..end)?).ok()?;
    if label.is_empty() || !label.chars().all(|c| c.is_ascii_graphic()) {
        return None;
    }
    Some(label.to_string())
}

/// Read the ext label of the device at `dev`.
pub fn ext4_label(dev: &Path) -> Result<Option<String>> {
    let mut f = std::fs::File::open(dev).map_err(|e| Error::io("open", dev, e))?;
    let mut head = vec![0u8; SB_OFFSET + 1024];
    let mut got = 0;
    while got < head.len() {
        let slot = head.get_mut(got..).unwrap_or_default();
        match f.read(slot) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", dev, e)),
        }
    }
    Ok(ext4_label_from_bytes(head.get(..got).unwrap_or_default()))
}

/// The fields of a sysfs block `uevent` file we care about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Uevent {
    pub devname: Option<String>,
    pub devtype: Option<String>,
    pub partname: Option<String>,
}

/// Parse a `uevent` file (`KEY=value` lines). A DEVNAME that is not a safe plain name is
/// dropped (it would become a `/dev` path).
pub fn parse_uevent(text: &str) -> Uevent {
    let mut u = Uevent::default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "DEVNAME" if bounded::is_safe_name(v) => u.devname = Some(v.to_string()),
            "DEVTYPE" => u.devtype = Some(v.to_string()),
            "PARTNAME" if v.len() <= 72 => u.partname = Some(v.to_string()),
            _ => {}
        }
    }
    u
}

/// All block devices listed under `sys_dir`, sorted by name.
pub fn list(sys_dir: &Path) -> Result<Vec<Uevent>> {
    let entries = match std::fs::read_dir(sys_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", sys_dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", sys_dir, e))?;
        if let Ok(Some(text)) = bounded::read_string_opt(&entry.path().join("uevent"), MAX_UEVENT) {
            let u = parse_uevent(&text);
            if u.devname.is_some() {
                out.push(u);
            }
        }
    }
    out.sort_by(|a, b| a.devname.cmp(&b.devname));
    Ok(out)
}

/// The first device (disk or partition, by name order) carrying an ext file system labelled
/// `label`.
pub fn find_by_ext4_label(sys_dir: &Path, dev_dir: &Path, label: &str) -> Result<Option<PathBuf>> {
    for u in list(sys_dir)? {
        let Some(name) = u.devname else { continue };
        let dev = dev_dir.join(&name);
        if let Ok(Some(l)) = ext4_label(&dev) {
            if l == label {
                return Ok(Some(dev));
            }
        }
    }
    Ok(None)
}

/// The GPT partition named `partname` (`PARTNAME=` in sysfs).
pub fn find_partition(sys_dir: &Path, dev_dir: &Path, partname: &str) -> Result<Option<PathBuf>> {
    for u in list(sys_dir)? {
        if u.devtype.as_deref() == Some("partition") && u.partname.as_deref() == Some(partname) {
            if let Some(name) = u.devname {
                return Ok(Some(dev_dir.join(name)));
            }
        }
    }
    Ok(None)
}

/// Wait (bounded) until every virtio block device on the bus has its disk in sysfs, so a
/// lookup by label does not race the driver. Returns at once when there is none.
pub fn wait_for_virtio_disks(timeout: Duration) -> Result<usize> {
    let start = Instant::now();
    let expected = count_virtio_block_devices(Path::new(SYS_VIRTIO_DEVICES));
    loop {
        let disks = list(Path::new(SYS_CLASS_BLOCK))?
            .into_iter()
            .filter(|u| {
                u.devtype.as_deref() == Some("disk")
                    && u.devname.as_deref().is_some_and(|n| n.starts_with("vd"))
            })
            .count();
        if disks >= expected {
            return Ok(disks);
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: format!("{expected} virtio disks (have {disks})"),
                waited_ms: start.elapsed().as_millis(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn count_virtio_block_devices(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| {
            bounded::read_string(&e.path().join("device"), 64)
                .map(|s| s.trim() == "0x0002")
                .unwrap_or(false)
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn superblock(label: &[u8], magic: u16) -> Vec<u8> {
        let mut head = vec![0u8; 2048];
        head[SB_OFFSET + SB_MAGIC..SB_OFFSET + SB_MAGIC + 2].copy_from_slice(&magic.to_le_bytes());
        head[SB_OFFSET + SB_LABEL..SB_OFFSET + SB_LABEL + label.len()].copy_from_slice(label);
        head
    }

    #[test]
    fn reads_label() {
        assert_eq!(
            ext4_label_from_bytes(&superblock(b"state", EXT_MAGIC)),
            Some("state".into())
        );
        assert_eq!(ext4_label_from_bytes(&superblock(b"state", 0x1234)), None);
        assert_eq!(ext4_label_from_bytes(&superblock(b"", EXT_MAGIC)), None);
        assert_eq!(
            ext4_label_from_bytes(&superblock(&[0xff, 0xfe], EXT_MAGIC)),
            None
        );
        assert_eq!(ext4_label_from_bytes(&[0u8; 100]), None);
        let full = superblock(b"0123456789abcdef", EXT_MAGIC);
        assert_eq!(
            ext4_label_from_bytes(&full),
            Some("0123456789abcdef".into())
        );
    }

    #[test]
    fn label_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vda");
        std::fs::write(&p, superblock(b"state", EXT_MAGIC)).unwrap();
        assert_eq!(ext4_label(&p).unwrap(), Some("state".into()));
    }

    #[test]
    fn uevent_parsing_and_partition_lookup() {
        let u = parse_uevent(
            "MAJOR=254\nMINOR=18\nDEVNAME=vdb2\nDEVTYPE=partition\nPARTN=2\nPARTNAME=system_b\n",
        );
        assert_eq!(u.devname.as_deref(), Some("vdb2"));
        assert_eq!(u.partname.as_deref(), Some("system_b"));
        assert_eq!(parse_uevent("DEVNAME=../sda\n").devname, None);

        let sys = tempfile::tempdir().unwrap();
        for (d, text) in [
            ("vdb", "DEVNAME=vdb\nDEVTYPE=disk\n"),
            (
                "vdb1",
                "DEVNAME=vdb1\nDEVTYPE=partition\nPARTNAME=system_a\n",
            ),
            (
                "vdb2",
                "DEVNAME=vdb2\nDEVTYPE=partition\nPARTNAME=system_b\n",
            ),
        ] {
            std::fs::create_dir_all(sys.path().join(d)).unwrap();
            std::fs::write(sys.path().join(d).join("uevent"), text).unwrap();
        }
        let dev = Path::new("/dev");
        assert_eq!(
            find_partition(sys.path(), dev, "system_b").unwrap(),
            Some(PathBuf::from("/dev/vdb2"))
        );
        assert_eq!(find_partition(sys.path(), dev, "system_c").unwrap(), None);
    }
}
