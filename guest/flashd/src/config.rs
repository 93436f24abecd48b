//! Command line of flashd and the resolved configuration.

use crate::FlashdError;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `flashd` — receives images over a link, verifies every byte, installs atomically.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "flashd",
    version,
    about = "The flashing authority on the target: receive, verify, install atomically",
    after_help = examples()
)]
pub struct Args {
    /// Serve a unix socket at SOCK (host use and tests).
    #[arg(
        long,
        value_name = "SOCK",
        conflicts_with_all = ["port_name", "uart"],
        required_unless_present_any = ["port_name", "uart"]
    )]
    pub listen: Option<PathBuf>,
    /// Serve the virtio-serial port with this name (found under /sys/class/virtio-ports/*/name).
    #[arg(long, value_name = "NAME")]
    pub port_name: Option<String>,
    /// Also serve this UART (`/dev/ttyS1`), opened as a raw line (no echo, no flow control,
    /// 115200 8N1). With --port-name both links are served, one at a time: the other gets
    /// `ERROR busy`. A missing UART is logged and skipped when --port-name is given.
    #[arg(long, value_name = "DEV")]
    pub uart: Option<PathBuf>,
    /// State directory (staging file, journal, install records under DIR/flash/).
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// Install into this file or block device.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["install_partition", "install_slot"],
        required_unless_present_any = ["install_partition", "install_slot"]
    )]
    pub install: Option<PathBuf>,
    /// Install into the GPT partition with this name (PARTNAME in /sys/class/block/*/uevent).
    #[arg(long, value_name = "NAME", conflicts_with = "install_slot")]
    pub install_partition: Option<String>,
    /// `auto`: install into the inactive A/B slot (asked from bootctld), then make it active on
    /// trial and reboot into it (bootctld `slotImaged` + `setActive`, rebootd `mode normal`).
    #[arg(long, value_name = "auto", value_parser = ["auto"])]
    pub install_slot: Option<String>,
    /// Stream the transfer straight into the install target when it is a block device,
    /// instead of into a staging file on the state dir that is copied over at install: no
    /// second write, no copy, one read-back. Only for a target that is not live (the inactive
    /// slot): it holds a partial image until the install. Default: on with
    /// --install-slot, off otherwise.
    #[arg(long, value_name = "BOOL")]
    pub direct: Option<bool>,
    /// Refuse images not signed by this Ed25519 public key (`nx image keygen` writes KEY.pub).
    #[arg(long, value_name = "PUB")]
    pub require_signed: Option<PathBuf>,
    /// Serve one connection, then exit (tests).
    #[arg(long)]
    pub once: bool,
    /// Device name sent to the host.
    #[arg(long, default_value = "nexus", value_name = "NAME")]
    pub device: String,
    /// Require the state dir to be a mounted filesystem of its own (default: on with
    /// --port-name, off with --listen).
    #[arg(long, value_name = "BOOL")]
    pub require_mount: Option<bool>,
    /// Drop a connection that sends nothing for this many seconds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub idle_timeout: u64,
    /// Drop a connection that makes no progress (no new image data written, no
    /// verification or install finished) for this many seconds, even if it keeps sending
    /// INFO or HELLO: another client gets in.
    #[arg(long, default_value_t = nx_contract::defaults::STALL_TIMEOUT_SECS, value_name = "SECS")]
    pub stall_timeout: u64,
    /// Largest window accepted (frames in flight).
    #[arg(long, default_value_t = 64)]
    pub max_window: u16,
    /// Largest chunk accepted (bytes, power of two, 4096..=1048576).
    #[arg(long, default_value_t = nx_contract::defaults::CHUNK)]
    pub max_chunk: u32,
    /// Threads that verify the 1 MiB pieces of each segment against their signed hashes
    /// (`chunk_sha256`), reading them back right behind the writes. 0: one per vCPU.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub verify_threads: usize,
}

/// The examples of `--help`, with the guest's port name and state mount.
fn examples() -> String {
    let port = nx_contract::ports::FLASH.name;
    let state = nx_contract::state::STATE_MOUNT;
    format!(
        "Examples:\n  \
        flashd --listen /tmp/flash.sock --state /tmp/state --install /tmp/os.img\n  \
        flashd --port-name {port} --state {state} --install-partition system_b\n  \
        flashd --port-name {port} --state {state} --install-slot auto\n  \
        flashd --port-name {port} --uart {uart} --state {state} --install-slot auto",
        uart = nx_contract::ports::UART.device
    )
}

/// Where flashd receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Listen(PathBuf),
    Port(String),
    /// `--uart DEV`, with or without `--port-name`: every link, served one at a time.
    Links {
        port: Option<String>,
        uart: PathBuf,
    },
}

/// Where a verified image goes.
#[derive(Debug, Clone)]
pub enum InstallSpec {
    /// A file or block device path.
    Path(PathBuf),
    /// A GPT partition by name, looked up in `sys_dir` (normally `/sys/class/block`) and
    /// opened under `dev_dir` (normally `/dev`).
    Partition {
        name: String,
        sys_dir: PathBuf,
        dev_dir: PathBuf,
    },
    /// The inactive A/B slot, chosen by bootctld when first needed (the choice is runtime
    /// state: see [`crate::install::Destination`]).
    Slot { env: crate::slots::SlotEnv },
}

impl InstallSpec {
    /// The slot mode with the guest's sockets and devices.
    pub fn slot(env: crate::slots::SlotEnv) -> InstallSpec {
        InstallSpec::Slot { env }
    }
}

impl InstallSpec {
    /// What to call the target in messages and receipts.
    pub fn describe(&self) -> String {
        match self {
            InstallSpec::Path(p) => p.display().to_string(),
            InstallSpec::Partition { name, .. } => format!("partition {name}"),
            InstallSpec::Slot { .. } => "the inactive slot".to_string(),
        }
    }
}

/// The resolved configuration of a server.
#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub require_mountpoint: bool,
    pub install: InstallSpec,
    pub require_signed: Option<[u8; 32]>,
    pub device: String,
    pub idle_timeout: Duration,
    /// Drop a connection that makes no progress for this long (`--stall-timeout`).
    pub stall_timeout: Duration,
    pub max_window: u16,
    pub max_chunk: u32,
    /// Stream into the install target itself when it is a block device (`--direct`).
    pub direct: bool,
    /// Piece verification threads (`--verify-threads`, resolved: at least 1).
    pub verify_threads: usize,
}

impl Config {
    /// A host-style configuration (tests): state dir need not be a mount point.
    pub fn new(state_dir: impl Into<PathBuf>, install: InstallSpec) -> Config {
        Config {
            state_dir: state_dir.into(),
            require_mountpoint: false,
            install,
            require_signed: None,
            device: "nexus".to_string(),
            idle_timeout: Duration::from_secs(60),
            stall_timeout: Duration::from_secs(nx_contract::defaults::STALL_TIMEOUT_SECS),
            max_window: 64,
            max_chunk: nx_contract::defaults::CHUNK,
            direct: false,
            verify_threads: verify_threads(0),
        }
    }
}

impl Args {
    /// Resolve into a [`Source`] and a [`Config`] (reads the public key file).
    pub fn resolve(&self) -> Result<(Source, Config), FlashdError> {
        let source = match (&self.listen, &self.port_name, &self.uart) {
            (Some(p), None, None) => Source::Listen(p.clone()),
            (None, Some(n), None) => Source::Port(n.clone()),
            (None, port, Some(u)) => Source::Links {
                port: port.clone(),
                uart: u.clone(),
            },
            _ => {
                return Err(FlashdError::Usage(
                    "give --listen SOCK, or --port-name NAME and/or --uart DEV".into(),
                ))
            }
        };
        let install = match (&self.install, &self.install_partition) {
            (None, None) if self.install_slot.is_some() => {
                InstallSpec::slot(crate::slots::SlotEnv::default())
            }
            (Some(p), None) => InstallSpec::Path(p.clone()),
            (None, Some(n)) => {
                proto::msg::validate_peer_name(n)
                    .map_err(|e| FlashdError::Usage(format!("--install-partition: {e}")))?;
                InstallSpec::Partition {
                    name: n.clone(),
                    sys_dir: PathBuf::from(nx_guest::blockdev::SYS_CLASS_BLOCK),
                    dev_dir: PathBuf::from("/dev"),
                }
            }
            _ => {
                return Err(FlashdError::Usage(
                    "give exactly one of --install PATH, --install-partition NAME or --install-slot auto"
                        .into(),
                ))
            }
        };
        proto::msg::validate_peer_name(&self.device)
            .map_err(|e| FlashdError::Usage(format!("--device: {e}")))?;
        let require_signed = match &self.require_signed {
            Some(p) => Some(load_public_key(p)?),
            None => None,
        };
        let direct = self
            .direct
            .unwrap_or(matches!(install, InstallSpec::Slot { .. }));
        let require_mountpoint = self
            .require_mount
            .unwrap_or(matches!(source, Source::Port(_) | Source::Links { .. }));
        Ok((
            source,
            Config {
                state_dir: self.state.clone(),
                require_mountpoint,
                install,
                require_signed,
                device: self.device.clone(),
                idle_timeout: Duration::from_secs(self.idle_timeout.max(1)),
                stall_timeout: Duration::from_secs(self.stall_timeout.max(1)),
                max_window: self.max_window,
                max_chunk: self.max_chunk,
                direct,
                verify_threads: verify_threads(self.verify_threads),
            },
        ))
    }
}

/// `--verify-threads N` resolved: 0 means one per vCPU; always
/// 1..=[`nx_contract::loader::MAX_VERIFY_THREADS`].
pub fn verify_threads(n: usize) -> usize {
    let n = if n == 0 {
        std::thread::available_parallelism().map_or(1, |p| p.get())
    } else {
        n
    };
    n.clamp(1, nx_contract::loader::MAX_VERIFY_THREADS as usize)
}

/// Read an Ed25519 public key file (`nexus-ed25519-public-v1 <hex>`), bounded.
pub fn load_public_key(path: &Path) -> Result<[u8; 32], FlashdError> {
    let bytes = nx_guest::fsx::read_bounded(path, 4096)
        .map_err(|e| FlashdError::Key {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| FlashdError::Key {
            path: path.to_path_buf(),
            reason: "no such file".into(),
        })?;
    let text = String::from_utf8(bytes).map_err(|_| FlashdError::Key {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })?;
    proto::image::decode_public_key(&text).map_err(|e| FlashdError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from([&["flashd", "--port-name", "p", "--state", "/s"], args].concat())
    }

    #[test]
    fn exactly_one_install_target() {
        let a = parse(&["--install-slot", "auto"]).unwrap();
        let (_, cfg) = a.resolve().unwrap();
        assert!(matches!(cfg.install, InstallSpec::Slot { .. }));
        assert!(matches!(
            parse(&["--install", "/x"])
                .unwrap()
                .resolve()
                .unwrap()
                .1
                .install,
            InstallSpec::Path(_)
        ));
        assert!(parse(&["--install-slot", "b"]).is_err());
        assert!(parse(&["--install-slot", "auto", "--install", "/x"]).is_err());
        assert!(parse(&["--install-slot", "auto", "--install-partition", "system_b"]).is_err());
        assert!(parse(&[]).is_err());
    }

    #[test]
    fn uart_with_or_without_the_port() {
        let (src, cfg) = parse(&["--install-slot", "auto", "--uart", "/dev/ttyS1"])
            .unwrap()
            .resolve()
            .unwrap();
        assert_eq!(
            src,
            Source::Links {
                port: Some("p".into()),
                uart: "/dev/ttyS1".into()
            }
        );
        assert!(cfg.require_mountpoint);
        let only = Args::try_parse_from([
            "flashd",
            "--uart",
            "/dev/ttyS1",
            "--state",
            "/s",
            "--install",
            "/x",
        ])
        .unwrap();
        assert_eq!(
            only.resolve().unwrap().0,
            Source::Links {
                port: None,
                uart: "/dev/ttyS1".into()
            }
        );
        assert!(Args::try_parse_from([
            "flashd",
            "--listen",
            "/l",
            "--uart",
            "/dev/ttyS1",
            "--state",
            "/s",
            "--install",
            "/x",
        ])
        .is_err());
    }
}
