//! virtio-serial ports, found by name (`/sys/class/virtio-ports/*/name`), never by number.
//!
//! The names come from the host (QEMU's `virtserialport name=`): they are read bounded and
//! compared byte for byte; the sysfs entry name becomes a `/dev` path only when it is a
//! `vport<N>p<M>` name. This is the only port finder of the workspace (nx-rpc serves on the
//! ports it finds, flashd and the recovery shell look for the flash port with it).

use crate::{bounded, Error, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the kernel lists virtio-serial ports.
pub const SYS_VIRTIO_PORTS: &str = "/sys/class/virtio-ports";
/// The flash port (host socket `build/qemu/flash.sock`): `nx_contract::ports::FLASH`.
pub const FLASH_PORT: &str = nx_contract::ports::FLASH.name;
/// The reboot port (host socket `build/qemu/reboot.sock`): `nx_contract::ports::REBOOT`.
pub const REBOOT_PORT: &str = nx_contract::ports::REBOOT.name;
/// The bootctl port (host socket `build/qemu/bootctl.sock`): `nx_contract::ports::BOOTCTL`.
pub const BOOTCTL_PORT: &str = nx_contract::ports::BOOTCTL.name;

/// Longest port name we accept from sysfs.
const MAX_NAME: usize = 256;

/// Look `name` up under `sys_dir` (normally [`SYS_VIRTIO_PORTS`]); returns `dev_dir/<entry>`
/// (normally `/dev/vportNpM`) or `None` when no port has that name (yet).
pub fn find(sys_dir: &Path, dev_dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(sys_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("list", sys_dir, e)),
    };
    let mut found: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", sys_dir, e))?;
        let Some(dev) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if !bounded::is_safe_name(&dev) || !is_vport_name(&dev) {
            continue;
        }
        let Ok(Some(text)) = bounded::read_string_opt(&entry.path().join("name"), MAX_NAME) else {
            continue;
        };
        if text.strip_suffix('\n').unwrap_or(&text) == name {
            found.push(dev);
        }
    }
    // Deterministic choice if the host (wrongly) named two ports the same.
    found.sort();
    Ok(found.first().map(|d| dev_dir.join(d)))
}

/// `vport<digits>p<digits>` — the only device names we turn into a path.
pub fn is_vport_name(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("vport") else {
        return false;
    };
    let Some((a, b)) = rest.split_once('p') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 4 && s.bytes().all(|c| c.is_ascii_digit());
    digits(a) && digits(b)
}

/// [`find`] in the real sysfs, polling until `timeout` (ports are added asynchronously after
/// `virtio_console` loads).
pub fn wait(name: &str, timeout: Duration) -> Result<PathBuf> {
    let start = Instant::now();
    loop {
        if let Some(p) = find(Path::new(SYS_VIRTIO_PORTS), Path::new("/dev"), name)? {
            if p.exists() {
                return Ok(p);
            }
        }
        if start.elapsed() >= timeout {
            return Err(Error::Timeout {
                what: format!("virtio-serial port {name}"),
                waited_ms: start.elapsed().as_millis(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_port_by_name_not_number() {
        let sys = tempfile::tempdir().unwrap();
        for (dev, name) in [
            ("vport0p1", "com.nexus.reboot\n"),
            ("vport0p2", "com.nexus.flash\n"),
            ("../evil", "x"),
        ] {
            let d = sys.path().join(dev.replace("../", "evil_"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), name).unwrap();
        }
        let got = find(sys.path(), Path::new("/dev"), FLASH_PORT).unwrap();
        assert_eq!(got, Some(PathBuf::from("/dev/vport0p2")));
        assert_eq!(
            find(sys.path(), Path::new("/dev"), "com.nexus.none").unwrap(),
            None
        );
        assert_eq!(
            find(&sys.path().join("missing"), Path::new("/dev"), FLASH_PORT).unwrap(),
            None
        );
    }

    #[test]
    fn vport_names() {
        assert!(is_vport_name("vport0p1"));
        assert!(is_vport_name("vport12p3"));
        assert!(!is_vport_name("vport0"));
        assert!(!is_vport_name("vportp1"));
        assert!(!is_vport_name("../vport0p1"));
        assert!(!is_vport_name("vport0p1x"));
    }

    #[test]
    fn only_vport_entries_count() {
        let sys = tempfile::tempdir().unwrap();
        for (dir, name) in [
            ("vport0p1", "com.nexus.flash\n"),
            ("vport0p2", "com.nexus.bootctl\n"),
            ("evil", "com.nexus.reboot\n"),
        ] {
            std::fs::create_dir_all(sys.path().join(dir)).unwrap();
            std::fs::write(sys.path().join(dir).join("name"), name).unwrap();
        }
        let dev = Path::new("/dev");
        assert_eq!(
            find(sys.path(), dev, BOOTCTL_PORT).unwrap(),
            Some(PathBuf::from("/dev/vport0p2"))
        );
        assert_eq!(find(sys.path(), dev, REBOOT_PORT).unwrap(), None);
    }

    #[test]
    fn oversized_name_is_ignored() {
        let sys = tempfile::tempdir().unwrap();
        let d = sys.path().join("vport0p1");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("name"), "com.nexus.flash".repeat(100)).unwrap();
        assert_eq!(
            find(sys.path(), Path::new("/dev"), FLASH_PORT).unwrap(),
            None
        );
    }
}
