//! Where a guest program that talks to the daemons and writes diag bundles finds things
//! (`nx-recovery`, `selftest-client`): the state dir, the daemons' sockets, the diag inputs
//! and the kernel's views (fake ones in tests), plus the command-line flags that set them.

use std::path::PathBuf;
use std::time::Duration;

/// Where things are.
#[derive(Debug, Clone)]
pub struct GuestEnv {
    /// The state dir (`/state`).
    pub state_root: PathBuf,
    /// Count an unmounted state dir as unusable (in the guest it would be RAM).
    pub require_mountpoint: bool,
    /// rebootd's guest-local socket.
    pub rebootd: PathBuf,
    /// bootctld's guest-local socket.
    pub bootctld: PathBuf,
    /// A console/marker log file for diag bundles, when there is one.
    pub console_log: Option<PathBuf>,
    /// Kernel log sources for diag.
    pub kmsg_sources: Vec<PathBuf>,
    /// How long an RPC may take.
    pub timeout: Duration,
    /// `/proc` (tests use a fake one).
    pub proc_root: PathBuf,
    /// `/sys/class/virtio-ports` (tests use a fake one).
    pub ports_root: PathBuf,
    /// `/dev`.
    pub dev_root: PathBuf,
}

impl GuestEnv {
    /// The guest's paths (an RPC may take 10 s).
    pub fn guest() -> Self {
        GuestEnv {
            state_root: PathBuf::from(nx_contract::state::STATE_MOUNT),
            require_mountpoint: true,
            rebootd: PathBuf::from(nx_rpc::reboot::SOCKET),
            bootctld: PathBuf::from(nx_rpc::bootctl::SOCKET),
            console_log: None,
            kmsg_sources: crate::KMSG_SOURCES.iter().map(PathBuf::from).collect(),
            timeout: Duration::from_secs(10),
            proc_root: PathBuf::from("/proc"),
            ports_root: PathBuf::from(nx_guest::port::SYS_VIRTIO_PORTS),
            dev_root: PathBuf::from("/dev"),
        }
    }
}

/// The flags of a [`GuestEnv`] (`#[command(flatten)]` them into a program's arguments).
#[derive(Debug, Clone, clap::Args)]
pub struct GuestArgs {
    /// The state dir.
    #[arg(long, default_value = nx_contract::state::STATE_MOUNT)]
    pub state: PathBuf,
    /// Accept a state dir that is not a mount point (host runs).
    #[arg(long)]
    pub allow_unmounted_state: bool,
    /// rebootd's socket.
    #[arg(long, default_value = nx_rpc::reboot::SOCKET)]
    pub rebootd: PathBuf,
    /// bootctld's socket.
    #[arg(long, default_value = nx_rpc::bootctl::SOCKET)]
    pub bootctld: PathBuf,
    /// A console/marker log file for diag bundles.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
}

impl GuestArgs {
    /// Set what the flags say in `env`.
    pub fn apply(self, env: &mut GuestEnv) {
        env.state_root = self.state;
        env.require_mountpoint = !self.allow_unmounted_state;
        env.rebootd = self.rebootd;
        env.bootctld = self.bootctld;
        env.console_log = self.console_log;
    }
}
