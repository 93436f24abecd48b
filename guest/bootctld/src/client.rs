//! Guest-local clients of bootctld (for the normal init, flashd, the
//! selftest client and the shells): raw Cap'n Proto RPC over the unix socket
//! (default [`crate::DEFAULT_SOCKET`]). Each call opens its own connection;
//! call from a tokio current-thread runtime (no `LocalSet` needed).
//!
//! ```no_run
//! # async fn boot() -> Result<(), bootctld::TransportError> {
//! use std::path::Path;
//! let sock = Path::new(bootctld::DEFAULT_SOCKET);
//! let d = bootctld::client::boot_attempt(sock).await?;
//! if !d.bootable { /* ask rebootd for recovery */ }
//! // … mount system_<d.slot> read-only, print `init: booted slot=… version=… trial=…` …
//! bootctld::client::confirm(sock).await?; // from the health check
//! # Ok(()) }
//! ```

use crate::machine::{BootDecision, BootState, Slot};
use crate::snapshot;
use crate::TransportError;
use proto::rpc::bootctl_capnp::boot_ctl;
use std::path::Path;
use std::time::Duration;

/// How long a call waits for bootctld.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a call keeps retrying to *connect* while the daemon is starting (the socket is
/// not there yet, or bound but not listening yet: `ECONNREFUSED`). A failed connect never
/// reached the daemon, so retrying it is safe even for calls that are not idempotent.
pub const CONNECT_GRACE: Duration = Duration::from_secs(3);
/// Pause between connect attempts.
const CONNECT_RETRY: Duration = Duration::from_millis(50);

/// Run `attempt` again while it fails to connect (socket missing or refused), for up to
/// `grace`; any other result (success, an RPC error, a timeout) is returned at once.
pub async fn retry_connect<T, F, Fut>(grace: Duration, mut attempt: F) -> Result<T, TransportError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TransportError>>,
{
    let deadline = tokio::time::Instant::now() + grace;
    loop {
        match attempt().await {
            Err(TransportError::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            other => return other,
        }
    }
}

async fn call<F, Fut, T>(sock: &Path, f: F) -> Result<T, TransportError>
where
    F: Fn(boot_ctl::Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, capnp::Error>>,
{
    retry_connect(CONNECT_GRACE, || {
        rebootd::transport::call_unix(sock, TIMEOUT, &f)
    })
    .await
}

/// `bootAttempt()`: which slot this boot uses (a trial try is spent and
/// persisted before the answer). `marked_bad` is not reported over RPC (None).
pub async fn boot_attempt(sock: &Path) -> Result<BootDecision, TransportError> {
    call(sock, |c| async move {
        let resp = c.boot_attempt_request().send().promise.await?;
        let d = resp.get()?.get_decision()?;
        Ok(BootDecision {
            bootable: d.get_bootable(),
            slot: snapshot::slot_from_schema(d.get_slot()?),
            trial: d.get_trial(),
            tries_left: d.get_tries_left(),
            rolled_back: d.get_rolled_back(),
            version: d.get_version()?.to_string()?,
            marked_bad: None,
        })
    })
    .await
}

/// `confirm()`: the slot booted in this boot is healthy.
pub async fn confirm(sock: &Path) -> Result<(), TransportError> {
    call(sock, |c| async move {
        c.confirm_request().send().promise.await?;
        Ok(())
    })
    .await
}

/// `markBad(slot)`.
pub async fn mark_bad(sock: &Path, slot: Slot) -> Result<(), TransportError> {
    call(sock, move |c| async move {
        let mut req = c.mark_bad_request();
        req.get().set_slot(snapshot::slot_to_schema(slot));
        req.send().promise.await?;
        Ok(())
    })
    .await
}

/// `setActive(slot, trial, tries)`.
pub async fn set_active(
    sock: &Path,
    slot: Slot,
    trial: bool,
    tries: u8,
) -> Result<(), TransportError> {
    call(sock, move |c| async move {
        let mut req = c.set_active_request();
        req.get().set_slot(snapshot::slot_to_schema(slot));
        req.get().set_trial(trial);
        req.get().set_tries_left(tries);
        req.send().promise.await?;
        Ok(())
    })
    .await
}

/// `slotImaged(slot, version)`: flashd finished installing into `slot`.
pub async fn slot_imaged(sock: &Path, slot: Slot, version: &str) -> Result<(), TransportError> {
    call(sock, move |c| {
        let version = version.to_string();
        async move {
            let mut req = c.slot_imaged_request();
            req.get().set_slot(snapshot::slot_to_schema(slot));
            req.get().set_version(version.as_str());
            req.send().promise.await?;
            Ok(())
        }
    })
    .await
}

/// `state()`: the slot table and whether it is persistent.
pub async fn state(sock: &Path) -> Result<(BootState, bool), TransportError> {
    call(sock, |c| async move {
        let resp = c.state_request().send().promise.await?;
        let r = resp.get()?;
        let st = snapshot::read(r.get_state()?)
            .map_err(|e| capnp::Error::failed(format!("bad BootState from bootctld: {e}")))?;
        Ok((st, r.get_persistent()))
    })
    .await
}

/// `exportJson()`: the JSON view (for nx-diag).
pub async fn export_json(sock: &Path) -> Result<String, TransportError> {
    call(sock, |c| async move {
        let resp = c.export_json_request().send().promise.await?;
        Ok(resp.get()?.get_json()?.to_string()?)
    })
    .await
}

/// `reboot()`: reboot into the normal boot (via rebootd); `false` = stub.
pub async fn reboot(sock: &Path) -> Result<bool, TransportError> {
    call(sock, |c| async move {
        let resp = c.reboot_request().send().promise.await?;
        Ok(resp.get()?.get_rebooting())
    })
    .await
}
