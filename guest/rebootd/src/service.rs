//! The `Reboot` capability (proto/schema/reboot.capnp).

use crate::pid1::{self, RebootMethod};
use crate::record::{Pending, RecordError, Store, Target};
use crate::Options;
use capnp::capability::Rc;
use nx_contract::markers::rebootd as rm;
use nx_guest::marker::show;
use proto::rpc::reboot_capnp::reboot;
use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

/// Largest plan JSON served by `resetPlan()` (the host reads at most 512 KiB per message).
pub const MAX_PLAN_JSON: usize = 384 * 1024;

/// The next-boot authority: the record store plus the reboot method.
pub struct RebootService {
    inner: RefCell<Inner>,
    options: Options,
}

struct Inner {
    store: Store,
    method: RebootMethod,
    delay: Duration,
}

/// The state root of a persistent store, or why there is none.
fn persistent_root(store: &Store, what: &str) -> Result<PathBuf, capnp::Error> {
    match (store.state_root(), store.not_persistent_reason()) {
        (Some(root), None) => Ok(root.to_path_buf()),
        (_, reason) => {
            Err(capnp::Error::failed(format!(
            "{what} needs the guest's /state, and rebootd runs without it (stub/placeholder: {}); \
             attach the state disk and boot again",
            reason.map(|r| r.to_string()).unwrap_or_else(|| "no state dir".into())
        )))
        }
    }
}

fn rpc_err(e: RecordError) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

impl RebootService {
    /// A service over `store`, rebooting with `method` (default [`Options`]).
    pub fn new(store: Store, method: RebootMethod) -> Self {
        Self::with_options(store, method, Options::default())
    }

    /// A service with explicit [`Options`] (device name, diag sources).
    pub fn with_options(store: Store, method: RebootMethod, options: Options) -> Self {
        RebootService {
            inner: RefCell::new(Inner {
                store,
                method,
                delay: pid1::REBOOT_DELAY,
            }),
            options,
        }
    }

    /// The device name confirmations use.
    pub fn device(&self) -> &str {
        &self.options.device
    }

    /// Remove the next-boot record.
    pub fn clear_next(&self) -> Result<(), RecordError> {
        let mut inner = self.inner.borrow_mut();
        if inner.store.clear_next()? {
            show(&rm::record_cleared(true));
        } else {
            show(&rm::record_cleared(false));
        }
        drop(inner);
        self.hand_to_bootloader(None);
        Ok(())
    }

    /// Make the bootloader's one-shot entry follow the next-boot record: `recovery` sets
    /// `LoaderEntryOneShot` to the recovery entry, `normal` (or no record) removes it so the
    /// default entry boots. A failure is reported; the record itself stays.
    fn hand_to_bootloader(&self, target: Option<Target>) {
        let Some(dir) = &self.options.efivars else {
            return;
        };
        let vars = nx_guest::efivar::LoaderVars::new(dir);
        if !vars.available() {
            show(&rm::no_efivars(format_args!(
                "{} is not mounted: not a UEFI boot",
                dir.display()
            )));
            return;
        }
        let entry = match target {
            Some(Target::Recovery) => {
                Some(format!("{}.conf", nx_contract::loader::RECOVERY_ENTRY_ID))
            }
            Some(Target::Normal) | None => None,
        };
        let name = nx_contract::loader::LOADER_ENTRY_ONESHOT;
        let done = match &entry {
            Some(e) => vars.write_string(name, e),
            None => vars.remove(name),
        };
        match done {
            Ok(()) => show(&rm::oneshot(entry.as_deref())),
            Err(e) => show(&rm::oneshot_failed(e)),
        }
    }

    /// The state root when records are persistent (for the plan and diag).
    fn state_root(&self, what: &str) -> Result<PathBuf, capnp::Error> {
        persistent_root(&self.inner.borrow().store, what)
    }

    /// The records as they are now, and whether they are persistent.
    pub fn pending(&self) -> Result<(Pending, bool), RecordError> {
        let inner = self.inner.borrow();
        Ok((inner.store.pending()?, inner.store.is_persistent()))
    }

    /// Persist `target` without rebooting.
    pub fn set_next(&self, target: Target) -> Result<(), RecordError> {
        let mut inner = self.inner.borrow_mut();
        if inner.store.set_next(target)? {
            show(&rm::next_boot(target));
        } else {
            show(&rm::next_boot_ram(
                target,
                inner
                    .store
                    .not_persistent_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_default(),
            ));
        }
        drop(inner);
        self.hand_to_bootloader(Some(target));
        Ok(())
    }

    /// Persist `target` and reboot. Returns whether a real reboot was started.
    pub fn mode(&self, target: Target) -> Result<bool, RecordError> {
        let mut inner = self.inner.borrow_mut();
        inner.store.require_persistent()?;
        inner.store.set_next(target)?;
        show(&rm::next_boot(target));
        self.hand_to_bootloader(Some(target));
        Ok(inner.reboot())
    }

    /// Persist a factory-wipe request, set the next boot to recovery and reboot.
    pub fn factory_wipe(&self) -> Result<bool, RecordError> {
        let mut inner = self.inner.borrow_mut();
        inner.store.require_persistent()?;
        inner.store.set_factory_wipe()?;
        show(&rm::factory_wipe_requested());
        inner.store.set_next(Target::Recovery)?;
        show(&rm::next_boot(Target::Recovery));
        self.hand_to_bootloader(Some(Target::Recovery));
        Ok(inner.reboot())
    }
}

impl Inner {
    fn reboot(&self) -> bool {
        match &self.method {
            RebootMethod::Init => {
                show(&rm::rebooting());
                let delay = self.delay;
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = pid1::signal_init() {
                        eprintln!("{}", rm::signal_failed(e));
                    }
                });
                true
            }
            RebootMethod::Stub(why) => {
                show(&rm::reboot_stub(why));
                false
            }
        }
    }
}

impl reboot::Server for RebootService {
    async fn mode(
        self: Rc<Self>,
        params: reboot::ModeParams,
        mut results: reboot::ModeResults,
    ) -> Result<(), capnp::Error> {
        let target = proto::rpc::boot_target(params.get()?.get_target())?;
        let rebooting = RebootService::mode(&self, target).map_err(rpc_err)?;
        results.get().set_rebooting(rebooting);
        Ok(())
    }

    async fn pending(
        self: Rc<Self>,
        _params: reboot::PendingParams,
        mut results: reboot::PendingResults,
    ) -> Result<(), capnp::Error> {
        let (pending, persistent) = RebootService::pending(&self).map_err(rpc_err)?;
        let mut r = results.get();
        r.set_has_target(pending.target.is_some());
        r.set_target(pending.target.unwrap_or(Target::Normal).into());
        r.set_factory_wipe(pending.factory_wipe);
        r.set_persistent(persistent);
        Ok(())
    }

    async fn set_next(
        self: Rc<Self>,
        params: reboot::SetNextParams,
        _results: reboot::SetNextResults,
    ) -> Result<(), capnp::Error> {
        let target = proto::rpc::boot_target(params.get()?.get_target())?;
        RebootService::set_next(&self, target).map_err(rpc_err)
    }

    async fn factory_wipe(
        self: Rc<Self>,
        _params: reboot::FactoryWipeParams,
        mut results: reboot::FactoryWipeResults,
    ) -> Result<(), capnp::Error> {
        let rebooting = RebootService::factory_wipe(&self).map_err(rpc_err)?;
        results.get().set_rebooting(rebooting);
        Ok(())
    }

    async fn reset_plan(
        self: Rc<Self>,
        _params: reboot::ResetPlanParams,
        mut results: reboot::ResetPlanResults,
    ) -> Result<(), capnp::Error> {
        let root = self.state_root("the factory-reset plan")?;
        let plan = tokio::task::spawn_blocking(move || nx_reset::plan(&root))
            .await
            .map_err(|e| capnp::Error::failed(format!("the plan task failed: {e}")))?
            .map_err(|e| {
                capnp::Error::failed(format!("cannot compute the factory-reset plan: {e}"))
            })?;
        let json = plan.to_json();
        if json.len() > MAX_PLAN_JSON {
            return Err(capnp::Error::failed(format!(
                "the factory-reset plan is {} bytes, more than the {MAX_PLAN_JSON}-byte bound",
                json.len()
            )));
        }
        let mut r = results.get();
        r.set_json(json.as_str());
        r.set_device(self.options.device.as_str());
        Ok(())
    }

    async fn fetch_diag(
        self: Rc<Self>,
        params: reboot::FetchDiagParams,
        mut results: reboot::FetchDiagResults,
    ) -> Result<(), capnp::Error> {
        let create = params.get()?.get_create();
        let root = self.state_root("a diag bundle")?;
        if create {
            let view = match &self.options.bootctld_socket {
                Some(sock) => nx_rpc::bootctl::fetch_view(sock, Duration::from_secs(3)).await,
                None => nx_rpc::bootctl::View::Unavailable(
                    "rebootd has no bootctld socket configured".into(),
                ),
            };
            let cfg = nx_diag::Config {
                state_root: root.clone(),
                // The store already decided that this state dir is persistent.
                require_mountpoint: false,
                kmsg_sources: self.options.kmsg_sources.clone(),
                console_log: self.options.console_log.clone(),
            };
            tokio::task::spawn_blocking(move || {
                nx_diag::run(&cfg, &view, &mut |line| println!("{line}"))
            })
            .await
            .map_err(|e| capnp::Error::failed(format!("the diag task failed: {e}")))?
            .map_err(|e| capnp::Error::failed(format!("cannot write a diag bundle: {e}")))?;
        }
        let latest_root = root.clone();
        let latest = tokio::task::spawn_blocking(move || nx_diag::store::read_latest(&latest_root))
            .await
            .map_err(|e| capnp::Error::failed(format!("the diag task failed: {e}")))?
            .map_err(|e| {
                capnp::Error::failed(format!("cannot read the newest diag bundle: {e}"))
            })?;
        let Some((name, data)) = latest else {
            return Err(capnp::Error::failed(format!(
                "no diag bundle in {}/recovery yet: run `diag` in the recovery shell, or ask for a new one (`nx recovery diag --new`)",
                root.display()
            )));
        };
        let mut r = results.get();
        r.set_name(name.as_str());
        r.set_data(&data);
        Ok(())
    }

    async fn clear_next(
        self: Rc<Self>,
        _params: reboot::ClearNextParams,
        _results: reboot::ClearNextResults,
    ) -> Result<(), capnp::Error> {
        RebootService::clear_next(&self).map_err(rpc_err)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The next-boot record is handed to the bootloader as its one-shot entry.
    #[test]
    fn the_record_becomes_the_bootloaders_one_shot() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let efivars = d.path().join("efivars");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::create_dir_all(&efivars).unwrap();
        let store = Store::open(Some(&state), false);
        let options = Options {
            efivars: Some(efivars.clone()),
            ..Options::default()
        };
        let svc = RebootService::with_options(store, RebootMethod::Stub("test".into()), options);
        let vars = nx_guest::efivar::LoaderVars::new(&efivars);
        let name = nx_contract::loader::LOADER_ENTRY_ONESHOT;
        svc.set_next(Target::Recovery).unwrap();
        assert_eq!(
            vars.read_string(name).unwrap().as_deref(),
            Some("recovery.conf")
        );
        svc.set_next(Target::Normal).unwrap();
        assert_eq!(vars.read_string(name).unwrap(), None);
        svc.set_next(Target::Recovery).unwrap();
        svc.clear_next().unwrap();
        assert_eq!(vars.read_string(name).unwrap(), None);
    }
}
