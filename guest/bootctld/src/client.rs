//! bootctld's own types over the one typed client [`nx_rpc::bootctl`] (for the normal init,
//! flashd, the selftest client and the shells): raw Cap'n Proto RPC over the unix socket
//! (default [`crate::DEFAULT_SOCKET`]). Each call opens its own connection; call from a tokio
//! current-thread runtime (no `LocalSet` needed). Calls without bootctld types
//! (`confirm`, `exportJson`, `reboot`) and those taking a slot (`markBad`, `setActive`,
//! `slotImaged`: a [`crate::machine::Slot`] converts to the schema's) are [`nx_rpc::bootctl`]'s,
//! re-exported here.
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

use crate::machine::{BootDecision, BootState};
use crate::snapshot;
use crate::TransportError;
/// `markBad`, `setActive` and `slotImaged` take a [`crate::machine::Slot`] (it converts to
/// the schema's).
pub use nx_rpc::bootctl::{
    confirm, export_json, mark_bad, reboot, set_active, slot_imaged, TIMEOUT,
};
pub use nx_rpc::{retry_connect, CONNECT_GRACE};
use std::path::Path;

/// `bootAttempt()`: which slot this boot uses (a trial try is spent and
/// persisted before the answer). `marked_bad` is not reported over RPC (None).
pub async fn boot_attempt(sock: &Path) -> Result<BootDecision, TransportError> {
    nx_rpc::bootctl::call(sock, |c| async move {
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

/// `state()`: the slot table and whether it is persistent.
pub async fn state(sock: &Path) -> Result<(BootState, bool), TransportError> {
    nx_rpc::bootctl::call(sock, |c| async move {
        let resp = c.state_request().send().promise.await?;
        let r = resp.get()?;
        let st = snapshot::read(r.get_state()?)
            .map_err(|e| capnp::Error::failed(format!("bad BootState from bootctld: {e}")))?;
        Ok((st, r.get_persistent()))
    })
    .await
}
