//! What is installed: the install record, receipt, slot activation and skip index after an
//! install attempt, and forgetting a record that no longer describes the target (at HELLO).

use super::{Phase, Runtime};
use crate::config::InstallSpec;
use crate::records::{self, Counters};
use crate::store::{self, InstallTarget};
use crate::workers::DurableJob;
use proto::manifest::Manifest;
use proto::receipt::InstallState;
use proto::session::Plan;
use std::sync::Arc;

impl Runtime {
    /// A direct transfer of another image overwrites the installed one in place (the record
    /// always describes the target device — see [`Self::forget_vanished_install`]): from its
    /// first write on, neither "unchanged" nor COPY from that image would be true. Forget the
    /// record before the receiver answers the HELLO.
    pub(super) fn forget_overwritten_install(&mut self) {
        let (Some(inst), Some(m)) = (self.rx.installed(), self.hello.manifest.as_ref()) else {
            return;
        };
        if inst.image_id == m.id() || self.direct_device().is_none() {
            return;
        }
        self.out.log("streaming another image into the installed target: forgetting its install record (no COPY from it)");
        self.drop_installed_record();
    }

    /// If the install record describes a file target that is gone or has another size, the
    /// record is stale: forget it, so the host sends the image instead of being told it is
    /// already installed.
    pub(super) fn forget_vanished_install(&mut self) {
        let Some(inst) = self.rx.installed().cloned() else {
            return;
        };
        if let InstallSpec::Slot { .. } = self.dest.spec() {
            // The record describes one slot; COPY and "unchanged" are only true for that slot.
            let current = self.dest.resolve().map(|t| self.dest.describe(&t));
            let recorded = records::installed_target(&self.state);
            if current.as_ref().ok() != recorded.as_ref() {
                self.out.log(&format!(
                    "install record is for {} but the target is {}: forgetting it",
                    recorded.as_deref().unwrap_or("?"),
                    current.as_deref().unwrap_or("?")
                ));
                self.drop_installed_record();
            }
            return;
        }
        let Ok(InstallTarget::File(path)) = self.dest.resolve() else {
            return;
        };
        let len = std::fs::metadata(&path).map(|m| m.len()).ok();
        if len == Some(inst.total_size) {
            return;
        }
        self.out.log(&format!(
            "install record is stale ({} is {}): forgetting it",
            path.display(),
            len.map_or("missing".to_string(), |l| format!("{l} bytes"))
        ));
        self.drop_installed_record();
    }

    /// The image `PATCH` writes may reference for the HELLO being answered: in slot mode the
    /// active slot (the one not being written; its head says what it holds), for a file
    /// target the installed file (replaced only by the final rename). A direct transfer into
    /// a device overwrites what is there: no base.
    pub(super) fn refresh_base(&mut self) {
        let base = self
            .find_base()
            .filter(|(_, b)| self.bad_base != Some(b.image_id));
        self.last_base = base.as_ref().map(|(_, b)| b.image_id);
        if let Some((p, b)) = &base {
            if self.rx.base() != Some(b) {
                self.out.log(&format!(
                    "patch base: {} (image {})",
                    p.display(),
                    &hex::encode(b.image_id)[..16]
                ));
            }
        }
        self.base_path = base.as_ref().map(|(p, _)| p.clone());
        self.rx.set_base(base.map(|(_, b)| b));
    }

    fn find_base(&self) -> Option<(std::path::PathBuf, proto::msg::BaseImage)> {
        match self.dest.spec() {
            InstallSpec::Slot { env } => {
                let slot = match self.dest.chosen_slot() {
                    Some((slot, _)) => slot,
                    None => crate::slots::inactive_slot_in(env).ok()?,
                };
                let active = crate::slots::partition_name(slot.other());
                let dev = nx_guest::blockdev::find_partition(&env.sys_dir, &env.dev_dir, &active)
                    .ok()??;
                let size = crate::install::block_capacity(&dev)?;
                let f = std::fs::File::open(&dev).ok()?;
                let head = nx_guest::slotfs::read_head(&f, &dev, size).ok()?;
                let m = head.manifest;
                (m.total_size <= size).then_some((
                    dev,
                    proto::msg::BaseImage {
                        image_id: m.id(),
                        total_size: m.total_size,
                    },
                ))
            }
            InstallSpec::Path(_) => {
                if self.direct_device().is_some() {
                    return None;
                }
                let inst = self.rx.installed()?;
                let Ok(InstallTarget::File(p)) = self.dest.resolve() else {
                    return None;
                };
                let len = std::fs::metadata(&p).ok()?.len();
                (len == inst.total_size).then_some((
                    p,
                    proto::msg::BaseImage {
                        image_id: inst.image_id,
                        total_size: inst.total_size,
                    },
                ))
            }
            InstallSpec::Partition { .. } => None,
        }
    }

    /// Forget the install record (in the receiver and on disk).
    fn drop_installed_record(&mut self) {
        self.rx.set_installed(None);
        self.durable.send(DurableJob::Run(Box::new(|st| {
            store::remove_if_exists(&st.installed_path()).map_err(|e| e.to_string())
        })));
    }

    /// Replace the install record (in the receiver and on disk).
    pub(super) fn set_installed_record(&mut self, inst: proto::session::InstalledImage) {
        self.rx.set_installed(Some(inst.clone()));
        let target = self.install_target.clone();
        self.durable.send(DurableJob::Run(Box::new(move |st| {
            records::save_installed(st, &inst, &target).map_err(|e| e.to_string())
        })));
    }

    /// Records after an install attempt: install record, receipt, then the skip index.
    pub(super) fn after_install(&mut self, ok: bool) {
        let (unchanged, staged_manifest, before) =
            match std::mem::replace(&mut self.phase, Phase::Idle) {
                Phase::Installing {
                    unchanged,
                    manifest,
                    before,
                } => (unchanged, manifest, before),
                other => {
                    // No install in progress: nothing to record.
                    self.phase = other;
                    return;
                }
            };
        // An unchanged install leaves the phase as it was; a changed one consumed its
        // staging (or, failed, closed it).
        self.phase = match (unchanged, ok) {
            (true, _) => *before,
            (false, true) => Phase::Consumed,
            (false, false) => Phase::Idle,
        };
        let m = if unchanged {
            self.hello.manifest.clone()
        } else {
            staged_manifest
        };
        let Some(m) = m else { return };
        if ok {
            self.dest.activate(m.clone(), Arc::clone(&self.out));
        }
        let state_word = match (ok, unchanged) {
            (false, _) => InstallState::Failed,
            (true, true) => InstallState::Unchanged,
            (true, false) => InstallState::Installed,
        };
        let counters = match &self.counters {
            Some(c) if !unchanged && c.matches(&m) => c.clone(),
            _ => {
                let mut c = Counters::new(&m);
                for (s, seg) in c.segments.iter_mut().zip(&m.segments) {
                    s.skipped_bytes = seg.data_bytes();
                }
                c.host = self.hello.host.clone();
                c.tries = 1;
                c
            }
        };
        let receipt = counters.receipt(&m, &self.cfg.device, &self.install_target, state_word);
        let target = self.install_target.clone();
        let installed = if ok {
            self.rx.installed().cloned()
        } else {
            None
        };
        let need_index = installed.as_ref().is_some_and(|i| i.index.is_none());
        self.durable.send(DurableJob::Run(Box::new(move |st| {
            if let Some(i) = &installed {
                records::save_installed(st, i, &target).map_err(|e| e.to_string())?;
            }
            records::save_receipt(st, &receipt).map_err(|e| e.to_string())
        })));
        if ok && !unchanged {
            self.counters = None;
        }
        // A direct transfer of another image overwrites this one in place, so nothing is ever
        // copied from it (see `forget_overwritten_install`): its index would be hashed for
        // nothing, on the vCPU the next transfer needs.
        if need_index && self.direct_device().is_none() {
            self.build_index_in_background(m);
        }
    }

    fn build_index_in_background(&mut self, m: Manifest) {
        let chunk = self.plan_chunk.unwrap_or(256 * 1024);
        let Ok(plan) = Plan::new(&m, chunk) else {
            return;
        };
        let Ok(target) = self.dest.resolve() else {
            return;
        };
        let path = target.path().to_path_buf();
        match crate::install::spawn_index(m, plan, path, self.results_tx.clone()) {
            Ok(()) => self.outstanding += 1,
            Err(e) => self.out.log(&format!("cannot build the skip index: {e}")),
        }
    }
}
