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
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod fsutil;
pub mod pid1;
pub mod record;
pub mod service;
pub mod transport;

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

/// Open the store, print the startup markers, bind and serve forever.
/// Must run inside a tokio `LocalSet`.
pub async fn run(config: Config) -> Result<(), transport::TransportError> {
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
    let service = service::RebootService::new(store, method);
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
