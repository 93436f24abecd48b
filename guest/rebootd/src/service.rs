//! The `Reboot` capability (proto/schema/reboot.capnp).

use crate::pid1::{self, RebootMethod};
use crate::record::{Pending, RecordError, Store, Target};
use capnp::capability::Rc;
use proto::rpc::reboot_capnp::reboot;
use std::cell::RefCell;
use std::time::Duration;

/// The next-boot authority: the record store plus the reboot method.
pub struct RebootService {
    inner: RefCell<Inner>,
}

struct Inner {
    store: Store,
    method: RebootMethod,
    delay: Duration,
}

fn rpc_err(e: RecordError) -> capnp::Error {
    capnp::Error::failed(e.to_string())
}

fn text_arg(t: capnp::text::Reader<'_>) -> Result<String, capnp::Error> {
    t.to_str()
        .map(|s| s.to_string())
        .map_err(|_| capnp::Error::failed("target is not UTF-8".into()))
}

impl RebootService {
    /// A service over `store`, rebooting with `method`.
    pub fn new(store: Store, method: RebootMethod) -> Self {
        RebootService {
            inner: RefCell::new(Inner {
                store,
                method,
                delay: pid1::REBOOT_DELAY,
            }),
        }
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
            println!("rebootd: next-boot={target}");
        } else {
            println!(
                "rebootd: next-boot={target} (stub/placeholder: RAM only, not persisted — {})",
                inner
                    .store
                    .not_persistent_reason()
                    .map(|r| r.to_string())
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Persist `target` and reboot. Returns whether a real reboot was started.
    pub fn mode(&self, target: Target) -> Result<bool, RecordError> {
        let mut inner = self.inner.borrow_mut();
        inner.store.require_persistent()?;
        inner.store.set_next(target)?;
        println!("rebootd: next-boot={target}");
        Ok(inner.reboot())
    }

    /// Persist a factory-wipe request, set the next boot to recovery and reboot.
    pub fn factory_wipe(&self) -> Result<bool, RecordError> {
        let mut inner = self.inner.borrow_mut();
        inner.store.require_persistent()?;
        inner.store.set_factory_wipe()?;
        println!("rebootd: factory-wipe requested");
        inner.store.set_next(Target::Recovery)?;
        println!("rebootd: next-boot=recovery");
        Ok(inner.reboot())
    }
}

impl Inner {
    fn reboot(&self) -> bool {
        match &self.method {
            RebootMethod::Init => {
                println!("rebootd: rebooting (SIGTERM to PID 1)");
                let delay = self.delay;
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(delay).await;
                    if let Err(e) = pid1::signal_init() {
                        eprintln!("rebootd: error: SIGTERM to PID 1 failed: {e}; the guest does not reboot");
                    }
                });
                true
            }
            RebootMethod::Stub(why) => {
                println!("rebootd: reboot (stub) — {why}; not rebooting");
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
        let target = text_arg(params.get()?.get_target()?)?;
        let target = Target::parse(&target).map_err(rpc_err)?;
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
        r.set_target(pending.target.map_or("", Target::as_str));
        r.set_factory_wipe(pending.factory_wipe);
        r.set_persistent(persistent);
        Ok(())
    }

    async fn set_next(
        self: Rc<Self>,
        params: reboot::SetNextParams,
        _results: reboot::SetNextResults,
    ) -> Result<(), capnp::Error> {
        let target = text_arg(params.get()?.get_target()?)?;
        let target = Target::parse(&target).map_err(rpc_err)?;
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
}
