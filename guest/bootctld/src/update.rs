//! The slot side of an update, for flashd (recovery): which slot to install into, and what
//! to do once the install is complete and verified.
//!
//! 1. [`install_target`]: ask bootctld for the slot table ([`crate::client::state`]); the
//!    target is the slot that is **not** active ([`choose_target`]). Refused when that slot
//!    is the last known-good one and the active slot is still unconfirmed (a trial, or
//!    never confirmed): overwriting it would leave no slot proven to boot.
//!    [`prepare_install`]: bootctld empties that slot and withdraws its boot entry.
//! 2. flashd installs into partition `system_<slot>` and verifies it, then installs the
//!    image's `kernel` and `initrd` into the slot's directory on the ESP (verified again).
//! 3. [`after_install`]: `slotImaged(slot, version)`, `setActive(slot, trial=true,
//!    triesLeft=3)`, then `rebootd.mode("normal")` — the automatic reboot into the trial.
//!
//! A failure in 3 leaves the previous slot active: the device still boots what it booted
//! before (the new slot is imaged but not activated, or activated but not yet rebooted into).

use crate::machine::{BootState, Health, Slot};
use crate::TransportError;
use std::path::Path;
use std::time::Duration;

/// Trial tries of a freshly installed slot.
pub const TRIAL_TRIES: u8 = 3;
/// How long the reboot request may take.
pub const REBOOT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong on the slot side of an update. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// bootctld could not be asked.
    #[error("bootctld at {socket}: {source}; is bootctld running (look for `bootctld: ready` on the console)?")]
    Bootctld {
        socket: String,
        #[source]
        source: TransportError,
    },
    /// Installing would overwrite the only slot proven to boot.
    #[error(
        "refusing to install into slot {target}: it is the last known-good slot, and the active slot \
         {active} is not confirmed yet ({why}); boot slot {active} and let it confirm (or roll back) first, \
         or drop it with `nx boot mark-bad {active}` (then slot {active} is the install target)"
    )]
    WouldOverwriteLastGood {
        target: Slot,
        active: Slot,
        why: String,
    },
    /// A step after the install failed; the previous slot stays active.
    #[error("slot {slot} was installed, but {step} failed: {source}; the previously active slot stays active")]
    Activate {
        slot: Slot,
        step: &'static str,
        #[source]
        source: TransportError,
    },
    /// The reboot request failed (the slot is active: the next reboot boots it).
    #[error("slot {slot} is installed and active on trial, but asking rebootd at {socket} to reboot failed: {source}; reboot with `nx flash reboot normal`")]
    Reboot {
        slot: Slot,
        socket: String,
        #[source]
        source: TransportError,
    },
}

/// The install target for slot table `st` (pure; see the module docs).
pub fn choose_target(st: &BootState) -> Result<Slot, UpdateError> {
    let active = st.active;
    let target = active.other();
    let a = st.slot(active);
    let unconfirmed = a.health != Health::Good && a.health.bootable();
    if st.slot(target).health == Health::Good && unconfirmed {
        let why = if a.trial {
            format!("on trial, {} tries left", a.tries_left)
        } else {
            format!("health {}", a.health.as_str())
        };
        return Err(UpdateError::WouldOverwriteLastGood {
            target,
            active,
            why,
        });
    }
    Ok(target)
}

/// Ask bootctld at `bootctld_sock` for the slot table and choose the install target.
pub async fn install_target(bootctld_sock: &Path) -> Result<Slot, UpdateError> {
    let (st, _persistent) = crate::client::state(bootctld_sock)
        .await
        .map_err(|source| UpdateError::Bootctld {
            socket: bootctld_sock.display().to_string(),
            source,
        })?;
    choose_target(&st)
}

/// Tell bootctld at `bootctld_sock` that `slot` is about to be overwritten (it becomes empty
/// and its boot entry is withdrawn), before the first byte is written.
pub async fn prepare_install(bootctld_sock: &Path, slot: Slot) -> Result<(), UpdateError> {
    nx_rpc::bootctl::prepare_install(bootctld_sock, crate::snapshot::slot_to_schema(slot))
        .await
        .map_err(|source| UpdateError::Bootctld {
            socket: bootctld_sock.display().to_string(),
            source,
        })
}

/// What [`after_install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activated {
    /// The slot now active on trial.
    pub slot: Slot,
    /// Its trial tries.
    pub tries: u8,
    /// rebootd started a real reboot (`false`: stub, e.g. host runs).
    pub rebooting: bool,
}

/// After a verified install of `version` into `slot`: `slotImaged`, `setActive(trial, tries)`
/// and `rebootd.mode("normal")`.
pub async fn after_install(
    bootctld_sock: &Path,
    rebootd_sock: &Path,
    slot: Slot,
    version: &str,
    tries: u8,
) -> Result<Activated, UpdateError> {
    crate::client::slot_imaged(bootctld_sock, slot, version)
        .await
        .map_err(|source| UpdateError::Activate {
            slot,
            step: "slotImaged",
            source,
        })?;
    crate::client::set_active(bootctld_sock, slot, true, tries)
        .await
        .map_err(|source| UpdateError::Activate {
            slot,
            step: "setActive",
            source,
        })?;
    let rebooting = nx_rpc::retry_connect(nx_rpc::CONNECT_GRACE, || {
        nx_rpc::reboot::request_mode(rebootd_sock, nx_contract::NextBoot::Normal, REBOOT_TIMEOUT)
    })
    .await
    .map_err(|source| UpdateError::Reboot {
        slot,
        socket: rebootd_sock.display().to_string(),
        source,
    })?;
    Ok(Activated {
        slot,
        tries,
        rebooting,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st() -> BootState {
        BootState::factory_default()
    }

    #[test]
    fn fresh_device_installs_into_b() {
        assert_eq!(choose_target(&st()).unwrap(), Slot::B);
    }

    #[test]
    fn after_a_confirmed_update_the_old_slot_is_the_target() {
        let mut s = st();
        s.slot_imaged(Slot::B, "2").unwrap();
        s.set_active(Slot::B, true, 3).unwrap();
        s.boot_attempt("boot-1");
        s.confirm("boot-1").unwrap();
        assert_eq!(choose_target(&s).unwrap(), Slot::A);
    }

    #[test]
    fn an_unconfirmed_trial_protects_the_last_good_slot() {
        let mut s = st();
        s.slot_imaged(Slot::B, "2").unwrap();
        s.set_active(Slot::B, true, 3).unwrap();
        let e = choose_target(&s).unwrap_err();
        assert!(e.to_string().contains("last known-good slot"), "{e}");
        assert!(e.to_string().contains("nx boot mark-bad b"), "{e}");
        // Dropping b makes a active again and b the target.
        s.mark_bad(Slot::B);
        assert_eq!(choose_target(&s).unwrap(), Slot::B);
    }

    #[test]
    fn after_a_rollback_the_bad_slot_is_the_target() {
        let mut s = st();
        s.slot_imaged(Slot::B, "3").unwrap();
        s.set_active(Slot::B, true, 1).unwrap();
        s.boot_attempt("boot-1");
        let d = s.boot_attempt("boot-2");
        assert!(d.rolled_back);
        assert_eq!(choose_target(&s).unwrap(), Slot::B);
    }

    #[test]
    fn without_a_good_slot_the_other_one_is_used() {
        let mut s = st();
        s.slot_imaged(Slot::B, "2").unwrap();
        s.set_active(Slot::B, false, 0).unwrap();
        s.mark_bad(Slot::A);
        // a bad, b unknown and active: install into a.
        assert_eq!(choose_target(&s).unwrap(), Slot::A);
    }
}
