//! The typed client of bootctld's `BootCtl` capability (`proto/schema/bootctl.capnp`) over its
//! guest-local unix socket ([`SOCKET`]). Each call opens its own connection (retrying the
//! connect for [`crate::CONNECT_GRACE`] while the daemon starts); call from a tokio
//! current-thread runtime (no `LocalSet` needed). Slots travel as the schema's
//! [`Slot`]; bootctld's own types (`BootDecision`, `BootState`) are built from these answers
//! by `bootctld::client`.

use crate::{call_unix, retry_connect, TransportError, CONNECT_GRACE};
pub use proto::rpc::bootctl_capnp::boot_ctl::Client;
pub use proto::rpc::bootctl_capnp::Slot;
use std::future::Future;
use std::path::Path;
use std::time::Duration;

/// bootctld's guest-local socket.
pub const SOCKET: &str = "/run/bootctld.sock";
/// bootctld's virtio-serial port.
pub const PORT: &str = nx_contract::ports::BOOTCTL.name;
/// How long a call waits for bootctld.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest JSON view [`fetch_view`] keeps.
pub const MAX_JSON: usize = 16 * 1024;

/// Run `f` with a client of the bootctld at `sock` (connect retried for [`CONNECT_GRACE`],
/// the call bounded by [`TIMEOUT`]).
pub async fn call<F, Fut, T>(sock: &Path, f: F) -> Result<T, TransportError>
where
    F: Fn(Client) -> Fut,
    Fut: Future<Output = Result<T, capnp::Error>>,
{
    retry_connect(CONNECT_GRACE, || call_unix(sock, TIMEOUT, &f)).await
}

/// The calls on a connected client (over any connection: [`call`] here, or
/// [`crate::call_framed`] from `nx` on the host).
pub mod on {
    use super::{Client, Slot};

    /// `confirm()`: the slot booted in this boot is healthy.
    pub async fn confirm(c: Client) -> Result<(), capnp::Error> {
        c.confirm_request().send().promise.await?;
        Ok(())
    }

    /// `markBad(slot)`.
    pub async fn mark_bad(c: Client, slot: Slot) -> Result<(), capnp::Error> {
        let mut req = c.mark_bad_request();
        req.get().set_slot(slot);
        req.send().promise.await?;
        Ok(())
    }

    /// `setActive(slot, trial, tries)`.
    pub async fn set_active(
        c: Client,
        slot: Slot,
        trial: bool,
        tries: u8,
    ) -> Result<(), capnp::Error> {
        let mut req = c.set_active_request();
        req.get().set_slot(slot);
        req.get().set_trial(trial);
        req.get().set_tries_left(tries);
        req.send().promise.await?;
        Ok(())
    }

    /// `slotImaged(slot, version)`.
    pub async fn slot_imaged(c: Client, slot: Slot, version: String) -> Result<(), capnp::Error> {
        let mut req = c.slot_imaged_request();
        req.get().set_slot(slot);
        req.get().set_version(version.as_str());
        req.send().promise.await?;
        Ok(())
    }

    /// `prepareInstall(slot)`.
    pub async fn prepare_install(c: Client, slot: Slot) -> Result<(), capnp::Error> {
        let mut req = c.prepare_install_request();
        req.get().set_slot(slot);
        req.send().promise.await?;
        Ok(())
    }

    /// `exportJson()`: the JSON view.
    pub async fn export_json(c: Client) -> Result<String, capnp::Error> {
        let resp = c.export_json_request().send().promise.await?;
        Ok(resp.get()?.get_json()?.to_string()?)
    }

    /// `reboot()`: reboot into the normal boot (via rebootd); `false` = stub.
    pub async fn reboot(c: Client) -> Result<bool, capnp::Error> {
        let resp = c.reboot_request().send().promise.await?;
        Ok(resp.get()?.get_rebooting())
    }
}

/// `confirm()`: the slot booted in this boot is healthy.
pub async fn confirm(sock: &Path) -> Result<(), TransportError> {
    call(sock, on::confirm).await
}

/// `markBad(slot)` (`slot`: the schema's, or a type that converts to it, e.g. bootctld's).
pub async fn mark_bad(sock: &Path, slot: impl Into<Slot>) -> Result<(), TransportError> {
    let slot = slot.into();
    call(sock, move |c| on::mark_bad(c, slot)).await
}

/// `setActive(slot, trial, tries)`.
pub async fn set_active(
    sock: &Path,
    slot: impl Into<Slot>,
    trial: bool,
    tries: u8,
) -> Result<(), TransportError> {
    let slot = slot.into();
    call(sock, move |c| on::set_active(c, slot, trial, tries)).await
}

/// `slotImaged(slot, version)`: flashd finished installing into `slot`.
pub async fn slot_imaged(
    sock: &Path,
    slot: impl Into<Slot>,
    version: &str,
) -> Result<(), TransportError> {
    let slot = slot.into();
    call(sock, move |c| on::slot_imaged(c, slot, version.to_string())).await
}

/// `prepareInstall(slot)`: flashd is about to overwrite `slot` (bootctld empties it and
/// withdraws its boot entry).
pub async fn prepare_install(sock: &Path, slot: Slot) -> Result<(), TransportError> {
    call(sock, move |c| on::prepare_install(c, slot)).await
}

/// `exportJson()`: the JSON view.
pub async fn export_json(sock: &Path) -> Result<String, TransportError> {
    call(sock, on::export_json).await
}

/// `reboot()`: reboot into the normal boot (via rebootd); `false` = stub.
pub async fn reboot(sock: &Path) -> Result<bool, TransportError> {
    call(sock, on::reboot).await
}

/// bootctld's JSON view as a diag bundle records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum View {
    /// The JSON text bootctld answered, and where it came from.
    Json { text: String, source: String },
    /// Why there is none.
    Unavailable(String),
}

/// Ask the bootctld at `sock` for its JSON view (bounded in time and size, one connect
/// attempt). Never fails: an error becomes [`View::Unavailable`] with the reason.
pub async fn fetch_view(sock: &Path, timeout: Duration) -> View {
    let export = call_unix(sock, timeout, on::export_json);
    match tokio::time::timeout(timeout, export).await {
        Err(_) | Ok(Err(TransportError::Timeout { .. })) => View::Unavailable(format!(
            "bootctld on {} did not answer within {} s",
            sock.display(),
            timeout.as_secs()
        )),
        Ok(Err(e)) => View::Unavailable(format!("bootctld on {}: {}", sock.display(), cause(&e))),
        Ok(Ok(text)) if text.len() > MAX_JSON => View::Unavailable(format!(
            "bootctld on {} sent {} bytes, more than the {MAX_JSON}-byte bound",
            sock.display(),
            text.len()
        )),
        Ok(Ok(text)) => View::Json {
            text,
            source: format!("exportJson() on {}", sock.display()),
        },
    }
}

/// The reason of a failed view fetch, worded as nx-diag always did.
fn cause(e: &TransportError) -> String {
    match e {
        TransportError::Connect { source, .. } => format!("cannot connect ({source})"),
        TransportError::Rpc { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}
