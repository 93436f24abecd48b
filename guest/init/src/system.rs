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
}

impl Default for SysMounter {
    fn default() -> Self {
        SysMounter {
            sys_dir: PathBuf::from(blockdev::SYS_CLASS_BLOCK),
            dev_dir: PathBuf::from("/dev"),
            mountpoint: PathBuf::from(slotfs::SYSROOT),
        }
    }
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
        slotfs::mount_rootfs(&part, &self.mountpoint, &self.dev_dir).map_err(MountError::Slot)
    }
}
