//! The typed client of rebootd's `Reboot` capability (`proto/schema/reboot.capnp`) over its
//! guest-local unix socket ([`SOCKET`]). Each call opens its own connection; call from a tokio
//! current-thread runtime (no `LocalSet` needed).
//! `nx` runs the same calls (`mode`, `resetPlan`, …) over [`crate::call_framed`].

use crate::{call_unix, TransportError};
use nx_contract::NextBoot;
pub use proto::rpc::reboot_capnp::reboot::Client;
use std::path::Path;
use std::time::Duration;

/// rebootd's guest-local socket.
pub const SOCKET: &str = "/run/rebootd.sock";
/// rebootd's virtio-serial port.
pub const PORT: &str = nx_contract::ports::REBOOT.name;

/// What `pending()` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    /// The next-boot record (`None`: there is none).
    pub target: Option<NextBoot>,
    /// Whether a factory wipe is requested.
    pub factory_wipe: bool,
    /// Whether rebootd persists its records.
    pub persistent: bool,
}

/// `mode(target)` on a connected client: persist `target` and reboot; whether a real reboot
/// was started (`false`: the stub case).
pub async fn mode(c: Client, target: NextBoot) -> Result<bool, capnp::Error> {
    let mut req = c.mode_request();
    req.get().set_target(target.into());
    let resp = req.send().promise.await?;
    Ok(resp.get()?.get_rebooting())
}

/// `factoryWipe()` on a connected client: whether a real reboot was started.
pub async fn factory_wipe(c: Client) -> Result<bool, capnp::Error> {
    let resp = c.factory_wipe_request().send().promise.await?;
    Ok(resp.get()?.get_rebooting())
}

/// `resetPlan()` on a connected client: `(plan JSON, device name)`.
pub async fn reset_plan(c: Client) -> Result<(String, String), capnp::Error> {
    let resp = c.reset_plan_request().send().promise.await?;
    let r = resp.get()?;
    Ok((r.get_json()?.to_string()?, r.get_device()?.to_string()?))
}

/// `fetchDiag(create)` on a connected client: `(file name, bytes)`.
pub async fn fetch_diag(c: Client, create: bool) -> Result<(String, Vec<u8>), capnp::Error> {
    let mut req = c.fetch_diag_request();
    req.get().set_create(create);
    let resp = req.send().promise.await?;
    let r = resp.get()?;
    Ok((r.get_name()?.to_string()?, r.get_data()?.to_vec()))
}

/// `pending()` on a connected client.
pub async fn pending(c: Client) -> Result<Pending, capnp::Error> {
    let resp = c.pending_request().send().promise.await?;
    let r = resp.get()?;
    let target = if r.get_has_target() {
        Some(proto::rpc::boot_target(r.get_target())?)
    } else {
        None
    };
    Ok(Pending {
        target,
        factory_wipe: r.get_factory_wipe(),
        persistent: r.get_persistent(),
    })
}

/// `setNext(target)` on a connected client: persist `target` without rebooting.
pub async fn set_next(c: Client, target: NextBoot) -> Result<(), capnp::Error> {
    let mut req = c.set_next_request();
    req.get().set_target(target.into());
    req.send().promise.await?;
    Ok(())
}

/// `clearNext()` on a connected client.
pub async fn clear_next(c: Client) -> Result<(), capnp::Error> {
    c.clear_next_request().send().promise.await?;
    Ok(())
}

/// Ask the rebootd at `socket` to persist `target` and reboot; returns whether
/// a real reboot was started (`false`: the stub case).
pub async fn request_mode(
    socket: &Path,
    target: NextBoot,
    timeout: Duration,
) -> Result<bool, TransportError> {
    call_unix(socket, timeout, move |c| mode(c, target)).await
}

/// Ask the rebootd at `socket` to persist `target` without rebooting.
pub async fn request_set_next(
    socket: &Path,
    target: NextBoot,
    timeout: Duration,
) -> Result<(), TransportError> {
    call_unix(socket, timeout, move |c| set_next(c, target)).await
}

/// Ask the rebootd at `socket` to record a factory wipe and reboot to
/// recovery; returns whether a real reboot was started.
pub async fn request_factory_wipe(
    socket: &Path,
    timeout: Duration,
) -> Result<bool, TransportError> {
    call_unix(socket, timeout, factory_wipe).await
}

/// Ask the rebootd at `socket` what the records say: `(target, factory_wipe, persistent)`,
/// `target` `None` when there is no next-boot record.
pub async fn request_pending(
    socket: &Path,
    timeout: Duration,
) -> Result<(Option<NextBoot>, bool, bool), TransportError> {
    let p = call_unix(socket, timeout, pending).await?;
    Ok((p.target, p.factory_wipe, p.persistent))
}

/// Ask the rebootd at `socket` to remove the next-boot record.
pub async fn request_clear_next(socket: &Path, timeout: Duration) -> Result<(), TransportError> {
    call_unix(socket, timeout, clear_next).await
}

/// Ask the rebootd at `socket` for the factory-reset plan: `(plan JSON, device name)`.
pub async fn request_reset_plan(
    socket: &Path,
    timeout: Duration,
) -> Result<(String, String), TransportError> {
    call_unix(socket, timeout, reset_plan).await
}

/// Ask the rebootd at `socket` for the newest diag bundle (a new one first with
/// `create`): `(file name, bytes)`.
pub async fn request_fetch_diag(
    socket: &Path,
    create: bool,
    timeout: Duration,
) -> Result<(String, Vec<u8>), TransportError> {
    call_unix(socket, timeout, move |c| fetch_diag(c, create)).await
}
