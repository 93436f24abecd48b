//! The real [`Daemons`] (bootctld and rebootd over their guest-local unix sockets) and the
//! real [`Mounter`] (slot partition by GPT name → [`nx_guest::slotfs::mount_rootfs`]).

use crate::boot::{Daemons, MountError, Mounter};
use bootctld::machine::{BootDecision, Slot};
use nx_guest::blockdev;
use nx_guest::slotfs::{self, Mounted};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// bootctld's guest-local socket.
pub const BOOTCTLD_SOCK: &str = nx_rpc::bootctl::SOCKET;
/// rebootd's guest-local socket.
pub const REBOOTD_SOCK: &str = nx_rpc::reboot::SOCKET;
/// How long to wait for a daemon's socket after starting it.
pub const SOCKET_WAIT: Duration = Duration::from_secs(15);
/// How long one rebootd call may take.
const REBOOTD_TIMEOUT: Duration = Duration::from_secs(10);

/// Wait (bounded) until `path` is a unix socket. (It may be bound but not listening yet:
/// the calls then retry their connect, see `bootctld::client::retry_connect`.)
pub fn wait_socket(path: &Path, timeout: Duration) -> Result<Duration, String> {
    use std::os::unix::fs::FileTypeExt;
    let start = Instant::now();
    loop {
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return Err(format!(
                "{} did not appear within {} s (is the daemon running? see its lines above)",
                path.display(),
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// bootctld and rebootd over their unix sockets, from a current-thread tokio runtime.
pub struct RpcDaemons {
    rt: tokio::runtime::Runtime,
    bootctld: PathBuf,
    rebootd: PathBuf,
    /// The mounted `/state` (the trust store lives there); `None`: no state disk.
    state_root: Option<PathBuf>,
}

impl RpcDaemons {
    /// Clients of the daemons at `bootctld` / `rebootd`.
    pub fn new(bootctld: &Path, rebootd: &Path) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
        Ok(RpcDaemons {
            rt,
            bootctld: bootctld.to_path_buf(),
            rebootd: rebootd.to_path_buf(),
            state_root: None,
        })
    }

    /// Where `/state` is mounted (the trust store with the anti-rollback floor).
    pub fn with_state(mut self, root: Option<&Path>) -> Self {
        self.state_root = root.map(Path::to_path_buf);
        self
    }

    fn ready(&self, sock: &Path) -> Result<(), String> {
        wait_socket(sock, SOCKET_WAIT).map(|_| ())
    }
}

impl Daemons for RpcDaemons {
    fn boot_attempt(&mut self) -> Result<BootDecision, String> {
        self.ready(&self.bootctld)?;
        self.rt
            .block_on(bootctld::client::boot_attempt(&self.bootctld))
            .map_err(|e| format!("bootctld: {e}"))
    }

    fn confirm(&mut self) -> Result<(), String> {
        self.rt
            .block_on(nx_rpc::bootctl::confirm(&self.bootctld))
            .map_err(|e| format!("bootctld: {e}"))
    }

    fn mark_bad(&mut self, slot: Slot) -> Result<(), String> {
        self.rt
            .block_on(bootctld::client::mark_bad(&self.bootctld, slot))
            .map_err(|e| format!("bootctld: {e}"))
    }

    fn reboot(&mut self, target: &str) -> Result<bool, String> {
        let t = nx_contract::NextBoot::parse(target).ok_or_else(|| {
            format!(
                "invalid next-boot target {:?}: use \"normal\" or \"recovery\"",
                target.chars().take(32).collect::<String>()
            )
        })?;
        self.ready(&self.rebootd)?;
        let sock = self.rebootd.as_path();
        self.rt
            .block_on(nx_rpc::retry_connect(nx_rpc::CONNECT_GRACE, || {
                nx_rpc::reboot::request_mode(sock, t, REBOOTD_TIMEOUT)
            }))
            .map_err(|e| format!("rebootd: {e}"))
    }

    fn raise_floor(&mut self, security_version: u64) -> Result<u64, String> {
        let root = self
            .state_root
            .as_deref()
            .ok_or_else(|| "no /state disk: the floor cannot be kept".to_string())?;
        nx_guest::trust::raise_floor(root, security_version).map_err(|e| e.to_string())
    }
}

/// Slot partitions found by GPT name (`system_a` / `system_b`) under sysfs, mounted on
/// [`slotfs::SYSROOT`].
pub struct SysMounter {
    pub sys_dir: PathBuf,
    pub dev_dir: PathBuf,
    pub mountpoint: PathBuf,
    /// The device's trust store (`None`: no `/state`): when keys are provisioned, a slot whose
    /// manifest is not signed by one of them is not booted — its root hash would be
    /// attacker-chosen.
    pub trust: Option<proto::trust::TrustPolicy>,
}

impl Default for SysMounter {
    fn default() -> Self {
        SysMounter {
            sys_dir: PathBuf::from(blockdev::SYS_CLASS_BLOCK),
            dev_dir: PathBuf::from("/dev"),
            mountpoint: PathBuf::from(slotfs::SYSROOT),
            trust: None,
        }
    }
}

/// The slot's manifest must be signed by a key the device trusts (when it trusts any). Only
/// the signature: the anti-rollback floor applies to installs (docs/tools/trust.md).
pub fn check_signature(
    partition: &Path,
    trust: &proto::trust::TrustPolicy,
) -> Result<(), slotfs::SlotFsError> {
    if !trust.is_provisioned() {
        return Ok(());
    }
    let f = std::fs::File::open(partition).map_err(|source| slotfs::SlotFsError::Read {
        path: partition.to_path_buf(),
        source,
    })?;
    let cap = slotfs::capacity(&f, partition)?;
    let head = slotfs::read_head(&f, partition, cap)?;
    // Below the floor is fine here: only the signature is checked at boot.
    let relaxed = proto::trust::TrustPolicy {
        floor: 0,
        ..trust.clone()
    };
    relaxed
        .check(&head, false)
        .map(|_| ())
        .map_err(|r| slotfs::SlotFsError::NoImage {
            path: partition.to_path_buf(),
            reason: format!("the manifest is not trusted: {r}"),
        })
}

/// The GPT partition name of a slot.
pub fn partition_name(slot: Slot) -> String {
    format!("system_{slot}")
}

impl Mounter for SysMounter {
    fn slot_disk(&mut self) -> Result<(), String> {
        for slot in Slot::ALL {
            let name = partition_name(slot);
            match blockdev::find_partition(&self.sys_dir, &self.dev_dir, &name) {
                Ok(Some(_)) => {}
                Ok(None) => return Err(format!("no partition {name}")),
                Err(e) => return Err(format!("looking up partition {name}: {e}")),
            }
        }
        Ok(())
    }

    fn mount(&mut self, slot: Slot) -> Result<Mounted, MountError> {
        let name = partition_name(slot);
        let part = blockdev::find_partition(&self.sys_dir, &self.dev_dir, &name)
            .map_err(|e| MountError::NoPartition(format!("looking up partition {name}: {e}")))?
            .ok_or_else(|| MountError::NoPartition(format!("no partition {name}")))?;
        if let Some(trust) = &self.trust {
            check_signature(&part, trust).map_err(MountError::Slot)?;
        }
        slotfs::mount_rootfs(&part, &self.mountpoint, &self.dev_dir).map_err(MountError::Slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::image::{layout, public_key_of, sign_manifest, ImageHead};
    use proto::manifest::SegmentHasher;
    use proto::trust::{TrustPolicy, TrustedKey};

    fn partition(seed: Option<[u8; 32]>) -> (tempfile::TempDir, PathBuf) {
        let mut h = SegmentHasher::new();
        h.update(&[7u8; 8192]);
        let m = layout("1", &[("rootfs".into(), h.finish())]).unwrap();
        let sig = seed.map(|s| sign_manifest(&s, &m.to_canonical_bytes()));
        let head = ImageHead::build(&m, sig).unwrap().to_bytes();
        let mut bytes = vec![0u8; m.total_size as usize];
        bytes[..head.len()].copy_from_slice(&head);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("system_a");
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    fn trusting(seed: [u8; 32]) -> TrustPolicy {
        TrustPolicy {
            keys: vec![TrustedKey {
                name: "release".into(),
                key: public_key_of(&seed),
                development: false,
            }],
            floor: 99,
            broken: None,
        }
    }

    #[test]
    fn a_slot_boots_only_when_a_trusted_key_signed_it() {
        let (_d, signed) = partition(Some([1; 32]));
        check_signature(&signed, &trusting([1; 32])).unwrap();
        // The floor does not matter at boot.
        let (_d2, other) = partition(Some([2; 32]));
        let e = check_signature(&other, &trusting([1; 32])).unwrap_err();
        assert!(e.is_slot_fault());
        assert!(e.to_string().contains("not trusted"), "{e}");
        let (_d3, unsigned) = partition(None);
        assert!(check_signature(&unsigned, &trusting([1; 32]))
            .unwrap_err()
            .is_slot_fault());
        // Unprovisioned: anything boots.
        check_signature(&unsigned, &TrustPolicy::default()).unwrap();
    }
}
