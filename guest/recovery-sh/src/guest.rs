//! The real backend: nx-recovery's guest functions (rebootd and bootctld over
//! `/run/rebootd.sock` and `/run/bootctld.sock`, nx-diag on `/state`) and PID 1 signals
//! (`nx_guest::sys::request_pid1`: SIGTERM = reboot, SIGUSR2 = power off).

use crate::{Backend, BackendError, DiagReport, RebootOutcome, ResetPlan, Target};
use nx_guest::sys::Shutdown;
use nx_recovery::guest::{self as rg, GuestConfig};

/// [`Backend`] over [`GuestConfig`].
#[derive(Debug, Clone)]
pub struct GuestBackend {
    /// Where things are.
    pub cfg: GuestConfig,
}

impl GuestBackend {
    /// The guest's paths (`GuestConfig::guest()`).
    pub fn new() -> Self {
        GuestBackend {
            cfg: GuestConfig::guest(),
        }
    }
}

impl Default for GuestBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for GuestBackend {
    fn diag(&mut self) -> DiagReport {
        let (mut lines, r) = rg::diag(&self.cfg);
        let result = match r {
            Ok(_) => Ok(()),
            Err(e) => {
                // nx-recovery appends its own `nx-diag: error: …` line; the shell prints the
                // error once, with a hint.
                if lines
                    .last()
                    .is_some_and(|l| *l == nx_contract::markers::diag::error(&e).as_str())
                {
                    lines.pop();
                }
                Err(BackendError::Diag(e))
            }
        };
        DiagReport { lines, result }
    }

    fn slot_status(&mut self) -> Result<String, BackendError> {
        rg::slot_status(&self.cfg).map_err(BackendError::Service)
    }

    fn reset_plan(&mut self) -> Result<ResetPlan, BackendError> {
        let (plan, device) = rg::reset_plan(&self.cfg).map_err(BackendError::Service)?;
        Ok(ResetPlan {
            summary: nx_recovery::plan_summary(&plan),
            device,
        })
    }

    fn factory_wipe(&mut self) -> Result<RebootOutcome, BackendError> {
        rg::factory_wipe(&self.cfg)
            .map(RebootOutcome::from_rebooting)
            .map_err(BackendError::Service)
    }

    fn reboot_into(&mut self, target: Target) -> Result<RebootOutcome, BackendError> {
        rg::reboot(&self.cfg, target)
            .map(RebootOutcome::from_rebooting)
            .map_err(BackendError::Service)
    }

    fn shutdown(&mut self, what: Shutdown) -> Result<(), BackendError> {
        nx_guest::sys::request_pid1(what).map_err(BackendError::from)
    }
}
