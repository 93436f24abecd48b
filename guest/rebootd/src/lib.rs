//! # rebootd — the next-boot authority in the guest
//!
//! One authority sets the next-boot mode: rebootd persists the one-shot record
//! `STATE/boot/next_mode` (`normal\n` | `recovery\n`, see [`record`]) and then
//! reboots the guest through PID 1 (SIGTERM, see [`pid1`]). It serves the
//! `Reboot` capability of `proto/schema/reboot.capnp` over Cap'n Proto RPC on the
//! virtio-serial port `com.nexus.reboot` and on unix sockets (`/run/rebootd.sock`
//! in the guest, any `--listen` path in host tests), see [`transport`].
//!
//! The transport and the atomic small-file helpers ([`fsutil`]) are shared
//! with `bootctld`, which asks rebootd to reboot.
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
pub mod transport;

pub use nx_diag;
pub use nx_reset;

use std::path::PathBuf;
use std::time::Duration;

/// Default guest-local socket.
pub const DEFAULT_SOCKET: &str = "/run/rebootd.sock";
/// The virtio-serial port name.
pub const PORT_NAME: &str = "com.nexus.reboot";

/// Daemon configuration (the CLI flags of `rebootd`).
#[derive(Debug, Clone)]
pub struct Config {
    /// The state dir (`/state`); `None`: RAM-only.
    pub state: Option<PathBuf>,
    /// Only persist when the state dir is a mount point.
    pub require_mountpoint: bool,
    /// Where to serve.
    pub endpoints: Vec<transport::Endpoint>,
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
        }
    }
}

/// [`run_with`] with the default [`Options`].
pub async fn run(config: Config) -> Result<(), transport::TransportError> {
    run_with(config, Options::default()).await
}

/// Open the store, print the startup markers, bind and serve forever.
/// Must run inside a tokio `LocalSet`.
pub async fn run_with(config: Config, options: Options) -> Result<(), transport::TransportError> {
    let store = record::Store::open(config.state.as_deref(), config.require_mountpoint);
    match &store {
        record::Store::Dir(dir) => println!("rebootd: next-boot record in {}", dir.display()),
        record::Store::Ram { reason, .. } => println!(
            "rebootd: stub/placeholder — {reason}; the next-boot record is RAM-only, \
             so `mode`/`factoryWipe` are refused (nothing would survive the reboot)"
        ),
    }
    let method = pid1::RebootMethod::resolve(config.reboot_method);
    println!("rebootd: reboot method: {}", method.describe());
    let listeners = transport::bind(&config.endpoints)?;
    println!("rebootd: device name {}", options.device);
    let service = service::RebootService::with_options(store, method, options);
    let client: proto::rpc::reboot_capnp::reboot::Client = capnp_rpc::new_client(service);
    println!("rebootd: ready");
    listeners.serve(client.client, "rebootd").await;
    Ok(())
}

/// Ask the rebootd at `socket` to persist `target` and reboot; returns whether
/// a real reboot was started (`false`: the stub case).
pub async fn request_mode(
    socket: &std::path::Path,
    target: record::Target,
    timeout: Duration,
) -> Result<bool, transport::TransportError> {
    transport::call_unix(
        socket,
        timeout,
        |client: proto::rpc::reboot_capnp::reboot::Client| async move {
            let mut req = client.mode_request();
            req.get().set_target(target.as_str());
            let resp = req.send().promise.await?;
            Ok(resp.get()?.get_rebooting())
        },
    )
    .await
}

/// Ask the rebootd at `socket` to persist `target` without rebooting.
pub async fn request_set_next(
    socket: &std::path::Path,
    target: record::Target,
    timeout: Duration,
) -> Result<(), transport::TransportError> {
    transport::call_unix(
        socket,
        timeout,
        |client: proto::rpc::reboot_capnp::reboot::Client| async move {
            let mut req = client.set_next_request();
            req.get().set_target(target.as_str());
            req.send().promise.await?;
            Ok(())
        },
    )
    .await
}

/// Ask the rebootd at `socket` to record a factory wipe and reboot to
/// recovery; returns whether a real reboot was started.
pub async fn request_factory_wipe(
    socket: &std::path::Path,
    timeout: Duration,
) -> Result<bool, transport::TransportError> {
    transport::call_unix(
        socket,
        timeout,
        |client: proto::rpc::reboot_capnp::reboot::Client| async move {
            let resp = client.factory_wipe_request().send().promise.await?;
            Ok(resp.get()?.get_rebooting())
        },
    )
    .await
}

/// Ask the rebootd at `socket` what the records say: `(target, factory_wipe, persistent)`,
/// `target` `None` when there is no next-boot record.
pub async fn request_pending(
    socket: &std::path::Path,
    timeout: Duration,
) -> Result<(Option<record::Target>, bool, bool), transport::TransportError> {
    transport::call_unix(
        socket,
        timeout,
        |client: proto::rpc::reboot_capnp::reboot::Client| async move {
            let resp = client.pending_request().send().promise.await?;
            let r = resp.get()?;
            let target = r.get_target()?.to_str().unwrap_or("");
            let target = if target.is_empty() {
                None
            } else {
                Some(
                    record::Target::parse(target)
                        .map_err(|e| capnp::Error::failed(e.to_string()))?,
                )
            };
            Ok((target, r.get_factory_wipe(), r.get_persistent()))
        },
    )
    .await
}

/// Ask the rebootd at `socket` to remove the next-boot record.
pub async fn request_clear_next(
    socket: &std::path::Path,
    timeout: Duration,
) -> Result<(), transport::TransportError> {
    transport::call_unix(
        socket,
        timeout,
        |client: proto::rpc::reboot_capnp::reboot::Client| async move {
            client.clear_next_request().send().promise.await?;
            Ok(())
        },
    )
    .await
}

/// Ask the rebootd at `socket` for the factory-reset plan: `(plan JSON, device name)`.
pub async fn request_reset_plan(
    socket: &std::path::Path,
    timeout: Duration,
) -> Result<(String, String), transport::TransportError> {
    transport::call_unix(
        socket,
        timeout,
        |client: proto::rpc::reboot_capnp::reboot::Client| async move {
            let resp = client.reset_plan_request().send().promise.await?;
            let r = resp.get()?;
            Ok((r.get_json()?.to_string()?, r.get_device()?.to_string()?))
        },
    )
    .await
}

/// Ask the rebootd at `socket` for the newest diag bundle (a new one first with
/// `create`): `(file name, bytes)`.
pub async fn request_fetch_diag(
    socket: &std::path::Path,
    create: bool,
    timeout: Duration,
) -> Result<(String, Vec<u8>), transport::TransportError> {
    transport::call_unix(
        socket,
        timeout,
        |client: proto::rpc::reboot_capnp::reboot::Client| async move {
            let mut req = client.fetch_diag_request();
            req.get().set_create(create);
            let resp = req.send().promise.await?;
            let r = resp.get()?;
            Ok((r.get_name()?.to_string()?, r.get_data()?.to_vec()))
        },
    )
    .await
}
