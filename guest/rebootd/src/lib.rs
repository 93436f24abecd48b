//! # rebootd — the next-boot authority in the guest
//!
//! One authority sets the next-boot mode: rebootd persists the one-shot record
//! `STATE/boot/next_mode` (`normal\n` | `recovery\n`, see [`record`]) and then
//! reboots the guest through PID 1 (SIGTERM, see [`pid1`]). It serves the
//! `Reboot` capability of `proto/schema/reboot.capnp` over Cap'n Proto RPC on the
//! virtio-serial port `com.nexus.reboot` and on unix sockets (`/run/rebootd.sock`
//! in the guest, any `--listen` path in host tests) with the one transport of [`nx_rpc`];
//! its typed client is [`nx_rpc::reboot`].
//!
//! The atomic small-file helpers ([`fsutil`]) are shared with `bootctld`.
//!
//! Issue 6 adds the factory-reset and recovery-diagnostics methods: `resetPlan()`
//! (the [`nx_reset`] plan of the state dir, read only), `factoryWipe()` (the one
//! reboot authority for the wipe request), `fetchDiag(create)` (the newest
//! [`nx_diag`] bundle) and `clearNext()`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod fsutil;
pub mod pid1;
pub mod record;
pub mod service;

pub use nx_diag;
pub use nx_reset;

use nx_contract::markers::rebootd as rm;
use nx_guest::marker::show;
pub use nx_rpc::{Endpoint, TransportError};
use std::path::PathBuf;

/// Default guest-local socket.
pub const DEFAULT_SOCKET: &str = nx_rpc::reboot::SOCKET;
/// The virtio-serial port name.
pub const PORT_NAME: &str = nx_rpc::reboot::PORT;

/// Daemon configuration (the CLI flags of `rebootd`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The state dir (`/state`); `None`: RAM-only.
    pub state: Option<PathBuf>,
    /// Only persist when the state dir is a mount point.
    pub require_mountpoint: bool,
    /// Where to serve.
    pub endpoints: Vec<Endpoint>,
    /// How to reboot.
    pub reboot_method: pid1::MethodArg,
}

/// What rebootd tells and collects beyond the records (the `--device`,
/// `--console-log`, `--bootctld` flags).
#[derive(Debug, Clone)]
pub struct Options {
    /// The device name operators type to confirm a factory reset.
    pub device: String,
    /// bootctld's socket, for the JSON view in new diag bundles (`None`: not asked).
    pub bootctld_socket: Option<PathBuf>,
    /// The console/marker log file new diag bundles include.
    pub console_log: Option<PathBuf>,
    /// Kernel log sources of new diag bundles.
    pub kmsg_sources: Vec<PathBuf>,
    /// efivarfs, where the next-boot record is handed to the bootloader as its one-shot
    /// entry (`None`: not handed over — host runs and direct kernel boots).
    pub efivars: Option<PathBuf>,
}

impl Default for Options {
    /// The kernel hostname or `nexus` ([`nx_reset::device_name`]), `/run/bootctld.sock`,
    /// no console log, `/dev/kmsg` then `/proc/kmsg`.
    fn default() -> Self {
        Options {
            device: nx_reset::device_name(),
            bootctld_socket: Some(PathBuf::from(nx_diag::BOOTCTLD_SOCKET)),
            console_log: None,
            kmsg_sources: nx_diag::KMSG_SOURCES.iter().map(PathBuf::from).collect(),
            efivars: None,
        }
    }
}

/// [`run_with`] with the default [`Options`].
pub async fn run(config: Config) -> Result<(), TransportError> {
    run_with(config, Options::default()).await
}

/// Open the store, print the startup markers, bind and serve forever.
/// Must run inside a tokio `LocalSet`.
pub async fn run_with(config: Config, options: Options) -> Result<(), TransportError> {
    let store = record::Store::open(config.state.as_deref(), config.require_mountpoint);
    match &store {
        record::Store::Dir(dir) => show(&rm::record_in(dir.display())),
        record::Store::Ram { reason, .. } => show(&rm::stub_ram(reason)),
    }
    let method = pid1::RebootMethod::resolve(config.reboot_method);
    show(&rm::reboot_method(method.describe()));
    let listeners = nx_rpc::bind(&config.endpoints)?;
    show(&rm::device_name(&options.device));
    let service = service::RebootService::with_options(store, method, options);
    let client: proto::rpc::reboot_capnp::reboot::Client = capnp_rpc::new_client(service);
    show(&rm::ready());
    listeners.serve(client.client, "rebootd").await;
    Ok(())
}
