//! The daemon core (state + store + markers) and the `BootCtl` capability.

use crate::json;
use crate::machine::{BootDecision, BootState, MachineError, Slot};
use crate::snapshot;
use crate::store::{Store, StoreError};
use capnp::capability::Rc;
use nx_contract::loader::EntryName;
use nx_contract::NextBoot;
use nx_guest::esp::{Esp, EspError};
use proto::rpc::bootctl_capnp::boot_ctl;
use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long `reboot()` waits for rebootd.
pub const REBOOTD_TIMEOUT: Duration = Duration::from_secs(10);

/// How `reboot()` reboots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootVia {
    /// Ask the rebootd at this unix socket (`mode("normal")`).
    Rebootd(PathBuf),
    /// No real reboot possible here (host-run); the reason.
    Stub(String),
}

/// Errors of a daemon operation (sent to RPC callers as the failure text).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state machine refused.
    #[error(transparent)]
    Refused(#[from] MachineError),
    /// Persisting failed (the change was not applied).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// rebootd could not be asked.
    #[error("could not ask rebootd to reboot: {0}; is rebootd running?")]
    Rebootd(#[from] nx_rpc::TransportError),
    /// The boot entry of the change could not be written (the change was not applied).
    #[error("{0}; the slot state is unchanged")]
    Entry(#[from] nx_guest::esp::EspError),
}

/// Where console markers go: stdout (the guest console) by default; tests
/// add a collector.
#[derive(Clone)]
pub struct Markers(Arc<dyn Fn(&str) + Send + Sync>);

use nx_contract::markers::bootctld as bm;
use nx_contract::Marker;

impl Markers {
    /// Print each marker on its own stdout line.
    pub fn stdout() -> Self {
        Markers(Arc::new(|line: &str| println!("{line}")))
    }

    /// Send markers to `f`.
    pub fn new(f: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Markers(Arc::new(f))
    }

    /// Emit one contract marker (`nx_contract::markers::bootctld`).
    pub fn emit(&self, marker: &Marker) {
        (self.0)(marker.as_str())
    }
}

impl Default for Markers {
    fn default() -> Self {
        Markers::stdout()
    }
}

impl std::fmt::Debug for Markers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Markers")
    }
}

/// The slot-state authority: current state, its store, this boot's id.
#[derive(Debug)]
pub struct Daemon {
    state: BootState,
    store: Store,
    boot_id: String,
    reboot: RebootVia,
    markers: Markers,
    esp: Option<Esp>,
    loader: Option<LoaderBoot>,
}

/// What the bootloader did for this boot (read at startup from the kernel command line and
/// the Boot Loader Interface variables).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoaderBoot {
    /// The entry it booted (`LoaderEntrySelected`).
    pub entry: String,
    /// The slot of that entry (`nexus.slot=` on the command line the entry gave).
    pub slot: Slot,
    /// The entry's tries left after this boot's try (`LoaderBootCountPath`); `None`: the
    /// entry has no boot counter (blessed).
    pub tries_left: Option<u32>,
}

impl LoaderBoot {
    /// From the command line's `nexus.slot` and the variables' values (`count_path` like
    /// `\loader\entries\nexus-2-b+2-1.conf`). `None`: no slot on the command line.
    pub fn from_parts(
        slot: Option<&str>,
        selected: Option<String>,
        count_path: Option<&str>,
    ) -> Option<LoaderBoot> {
        let slot = Slot::parse(slot?)?;
        let tries_left = count_path
            .and_then(|p| p.rsplit(['\\', '/']).next())
            .and_then(EntryName::parse)
            .and_then(|e| e.counter)
            .map(|c| c.left);
        Some(LoaderBoot {
            entry: selected.unwrap_or_default(),
            slot,
            tries_left,
        })
    }
}

impl Daemon {
    /// A daemon starting from `state` kept in `store`; `boot_id` identifies this boot.
    pub fn new(
        state: BootState,
        store: Store,
        boot_id: String,
        reboot: RebootVia,
        markers: Markers,
    ) -> Self {
        Daemon {
            state,
            store,
            boot_id,
            reboot,
            markers,
            esp: None,
            loader: None,
        }
    }

    /// The bootloader decided this boot (see [`LoaderBoot`]): `bootAttempt` follows it.
    pub fn with_loader(mut self, loader: Option<LoaderBoot>) -> Self {
        self.loader = loader;
        self
    }

    /// Project the slot state onto the boot entries of `esp` (systemd-boot's entries with
    /// boot counting, see [`nx_guest::esp`]); `None`: no ESP, nothing projected.
    pub fn with_esp(mut self, esp: Option<Esp>) -> Self {
        self.esp = esp;
        self
    }

    /// The ESP the state is projected onto.
    pub fn esp(&self) -> Option<&Esp> {
        self.esp.as_ref()
    }

    /// A projection that follows a committed change: a failure is reported on the console
    /// (the next boot's reconciliation repairs it), never undoes the change.
    fn project(&self, f: impl FnOnce(&Esp) -> Result<Option<EntryName>, EspError>) {
        if let Some(esp) = &self.esp {
            match f(esp) {
                Ok(Some(name)) => self.markers.emit(&bm::entry(name.file_name())),
                Ok(None) => {}
                Err(e) => self.markers.emit(&bm::entry_failed(e)),
            }
        }
    }

    /// The marker sink.
    pub fn markers(&self) -> &Markers {
        &self.markers
    }

    /// The current state.
    pub fn state(&self) -> &BootState {
        &self.state
    }

    /// Whether the state survives a reboot.
    pub fn is_persistent(&self) -> bool {
        self.store.is_persistent()
    }

    /// The JSON view.
    pub fn json(&self) -> String {
        let bootloader = self.esp.as_ref().and_then(|esp| {
            let entries = esp.slot_entries().ok()?;
            Some(json::Bootloader::from_entries(
                &entries,
                self.loader.as_ref().map(|l| l.entry.clone()),
                self.state.active.as_str(),
            ))
        });
        json::render_with(&self.state, &self.store.persistence(), bootloader.as_ref())
    }

    /// How `reboot()` reboots.
    pub fn reboot_via(&self) -> &RebootVia {
        &self.reboot
    }

    /// Apply a transition to a copy, persist it when it changed, then commit:
    /// a failed write leaves the state (in RAM and on disk) untouched.
    fn apply<T>(
        &mut self,
        f: impl FnOnce(&mut BootState) -> Result<T, MachineError>,
    ) -> Result<T, DaemonError> {
        let mut next = self.state.clone();
        let out = f(&mut next)?;
        if next != self.state {
            self.store.save(&next)?;
            self.state = next;
        }
        Ok(out)
    }

    /// `setActive`. With an ESP, the slot's entry is written first (a new generation, with
    /// `tries` boot-counting tries on trial): the change is applied only when the bootloader
    /// will boot it.
    pub fn set_active(&mut self, slot: Slot, trial: bool, tries: u8) -> Result<(), DaemonError> {
        let mut check = self.state.clone();
        check.set_active(slot, trial, tries)?;
        let entry = match &self.esp {
            None => None,
            Some(esp) => {
                let version = self.state.slot(slot).version.clone();
                let c = slot.as_char();
                Some(if trial {
                    esp.install_entry(c, &version, Some(u32::from(tries)))?
                } else {
                    match esp.promote(c) {
                        Err(EspError::NoEntry { .. }) => esp.install_entry(c, &version, None)?,
                        other => other?,
                    }
                })
            }
        };
        self.apply(|s| s.set_active(slot, trial, tries))?;
        self.markers.emit(&bm::set_active(slot, trial, tries));
        if let Some(name) = entry {
            self.markers.emit(&bm::entry(name.file_name()));
        }
        Ok(())
    }

    /// `prepareInstall`: the slot becomes empty and its entry is withdrawn *before* flashd
    /// overwrites it, so no entry ever points at half-written files.
    pub fn prepare_install(&mut self, slot: Slot) -> Result<(), DaemonError> {
        let mut check = self.state.clone();
        check.prepare_install(slot)?;
        if let Some(esp) = &self.esp {
            esp.withdraw(slot.as_char())?;
        }
        self.apply(|s| s.prepare_install(slot))?;
        self.markers.emit(&bm::prepare_install(slot));
        Ok(())
    }

    /// `confirm`.
    pub fn confirm(&mut self) -> Result<Slot, DaemonError> {
        let id = self.boot_id.clone();
        let slot = self.apply(|s| s.confirm(&id))?;
        self.markers.emit(&bm::confirm());
        self.project(|esp| match esp.bless(slot.as_char()) {
            Err(EspError::NoEntry { .. }) => Ok(None),
            other => other.map(Some),
        });
        Ok(slot)
    }

    /// `markBad`.
    pub fn mark_bad(&mut self, slot: Slot) -> Result<(), DaemonError> {
        let switched = self.apply(|s| Ok(s.mark_bad(slot)))?;
        self.markers.emit(&bm::mark_bad(slot));
        self.project(|esp| esp.mark_bad(slot.as_char()));
        if let Some(active) = switched {
            self.markers.emit(&bm::active(active));
        }
        Ok(())
    }

    /// `slotImaged`.
    pub fn slot_imaged(&mut self, slot: Slot, version: &str) -> Result<(), DaemonError> {
        self.apply(|s| s.slot_imaged(slot, version))?;
        self.markers.emit(&bm::slot_imaged(slot, version));
        Ok(())
    }

    /// `bootAttempt`: the decision is persisted before it is returned.
    pub fn boot_attempt(&mut self) -> Result<BootDecision, DaemonError> {
        let id = self.boot_id.clone();
        let d = match self.loader.clone() {
            Some(l) => {
                self.markers
                    .emit(&bm::loader_booted(&l.entry, l.slot, l.tries_left));
                let d = self.apply(|s| Ok(s.boot_attempt_loader(&id, l.slot, l.tries_left)))?;
                if !d.bootable {
                    // Keep the bootloader from booting it again.
                    self.project(|esp| esp.mark_bad(l.slot.as_char()));
                }
                d
            }
            None => self.apply(|s| Ok(s.boot_attempt(&id)))?,
        };
        if let Some(bad) = d.marked_bad {
            self.markers.emit(&bm::mark_bad(bad));
            self.markers.emit(&bm::out_of_tries(bad));
            self.project(|esp| esp.mark_bad(bad.as_char()));
        }
        if d.rolled_back {
            self.markers.emit(&bm::rollback(d.slot));
        }
        if d.bootable {
            self.markers
                .emit(&bm::boot_attempt(d.slot, d.trial, d.tries_left));
        } else {
            self.markers.emit(&bm::no_bootable_slot());
        }
        Ok(d)
    }

    /// `reboot`: ask rebootd for a normal boot. Returns whether a real
    /// reboot was started; prints `bootctl: reboot` or `bootctl: reboot (stub)`.
    pub async fn reboot(via: RebootVia, markers: Markers) -> Result<bool, DaemonError> {
        match via {
            RebootVia::Stub(why) => {
                markers.emit(&bm::reboot_stub(why));
                Ok(false)
            }
            RebootVia::Rebootd(sock) => {
                let real =
                    nx_rpc::reboot::request_mode(&sock, NextBoot::Normal, REBOOTD_TIMEOUT).await?;
                if real {
                    markers.emit(&bm::reboot());
                } else {
                    markers.emit(&bm::reboot_stub("rebootd cannot reboot here"));
                }
                Ok(real)
            }
        }
    }
}

/// The `BootCtl` capability over a shared [`Daemon`].
pub struct BootCtlService {
    daemon: RefCell<Daemon>,
}

impl BootCtlService {
    /// Serve `daemon`.
    pub fn new(daemon: Daemon) -> Self {
        BootCtlService {
            daemon: RefCell::new(daemon),
        }
    }
}

fn err(e: DaemonError) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

fn slot_param(
    s: Result<proto::rpc::bootctl_capnp::Slot, capnp::NotInSchema>,
) -> Result<Slot, capnp::Error> {
    s.map(snapshot::slot_from_schema)
        .map_err(|e| capnp::Error::failed(format!("unknown slot value {}", e.0)))
}

impl boot_ctl::Server for BootCtlService {
    async fn state(
        self: Rc<Self>,
        _params: boot_ctl::StateParams,
        mut results: boot_ctl::StateResults,
    ) -> Result<(), capnp::Error> {
        let d = self.daemon.borrow();
        let mut r = results.get();
        r.set_persistent(d.is_persistent());
        snapshot::fill(r.init_state(), d.state());
        Ok(())
    }

    async fn set_active(
        self: Rc<Self>,
        params: boot_ctl::SetActiveParams,
        _results: boot_ctl::SetActiveResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let slot = slot_param(p.get_slot())?;
        self.daemon
            .borrow_mut()
            .set_active(slot, p.get_trial(), p.get_tries_left())
            .map_err(err)
    }

    async fn confirm(
        self: Rc<Self>,
        _params: boot_ctl::ConfirmParams,
        _results: boot_ctl::ConfirmResults,
    ) -> Result<(), capnp::Error> {
        self.daemon.borrow_mut().confirm().map(|_| ()).map_err(err)
    }

    async fn mark_bad(
        self: Rc<Self>,
        params: boot_ctl::MarkBadParams,
        _results: boot_ctl::MarkBadResults,
    ) -> Result<(), capnp::Error> {
        let slot = slot_param(params.get()?.get_slot())?;
        self.daemon.borrow_mut().mark_bad(slot).map_err(err)
    }

    async fn reboot(
        self: Rc<Self>,
        _params: boot_ctl::RebootParams,
        mut results: boot_ctl::RebootResults,
    ) -> Result<(), capnp::Error> {
        let (via, markers) = {
            let d = self.daemon.borrow();
            (d.reboot_via().clone(), d.markers().clone())
        };
        let real = Daemon::reboot(via, markers).await.map_err(err)?;
        results.get().set_rebooting(real);
        Ok(())
    }

    async fn boot_attempt(
        self: Rc<Self>,
        _params: boot_ctl::BootAttemptParams,
        mut results: boot_ctl::BootAttemptResults,
    ) -> Result<(), capnp::Error> {
        let d = self.daemon.borrow_mut().boot_attempt().map_err(err)?;
        let mut r = results.get().init_decision();
        r.set_bootable(d.bootable);
        r.set_slot(snapshot::slot_to_schema(d.slot));
        r.set_trial(d.trial);
        r.set_tries_left(d.tries_left);
        r.set_rolled_back(d.rolled_back);
        r.set_version(d.version.as_str());
        Ok(())
    }

    async fn slot_imaged(
        self: Rc<Self>,
        params: boot_ctl::SlotImagedParams,
        _results: boot_ctl::SlotImagedResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let slot = slot_param(p.get_slot())?;
        let version = p
            .get_version()?
            .to_str()
            .map_err(|_| capnp::Error::failed("version is not UTF-8".into()))?
            .to_string();
        self.daemon
            .borrow_mut()
            .slot_imaged(slot, &version)
            .map_err(err)
    }

    async fn prepare_install(
        self: Rc<Self>,
        params: boot_ctl::PrepareInstallParams,
        _results: boot_ctl::PrepareInstallResults,
    ) -> Result<(), capnp::Error> {
        let slot = slot_param(params.get()?.get_slot())?;
        self.daemon.borrow_mut().prepare_install(slot).map_err(err)
    }

    async fn export_json(
        self: Rc<Self>,
        _params: boot_ctl::ExportJsonParams,
        mut results: boot_ctl::ExportJsonResults,
    ) -> Result<(), capnp::Error> {
        let j = self.daemon.borrow().json();
        results.get().set_json(j.as_str());
        Ok(())
    }
}
