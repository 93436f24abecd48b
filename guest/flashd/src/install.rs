//! The install side of a server: where a verified image goes ([`Destination`]: the configured
//! spec plus, in slot mode, the slot chosen for the transfer in progress — runtime state, not
//! configuration), the slot activation after an install and the skip index of the installed
//! image, each on a thread of its own that reports through the injected [`Output`] or the
//! server's result channel.

use crate::config::InstallSpec;
use crate::console::Output;
use crate::store::InstallTarget;
use crate::workers::WorkResult;
use bootctld::machine::Slot;
use nx_contract::markers::flashd as m;
use proto::manifest::Manifest;
use proto::session::{Plan, SkipIndex};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// The install target of a server: the configured [`InstallSpec`] and, in slot mode, the slot
/// bootctld chose when first needed — kept until an install activates a slot, so that every
/// step of one transfer sees the same target.
#[derive(Debug, Clone)]
pub struct Destination {
    spec: InstallSpec,
    chosen: Arc<Mutex<Option<(Slot, PathBuf)>>>,
}

impl Destination {
    pub fn new(spec: InstallSpec) -> Destination {
        Destination {
            spec,
            chosen: Arc::default(),
        }
    }

    /// The configured target.
    pub fn spec(&self) -> &InstallSpec {
        &self.spec
    }

    /// What to call the target in messages and receipts before it is resolved.
    pub fn describe_spec(&self) -> String {
        self.spec.describe()
    }

    /// The slot chosen for the transfer in progress (slot mode).
    pub fn chosen_slot(&self) -> Option<(Slot, PathBuf)> {
        self.chosen.lock().ok().and_then(|c| c.clone())
    }

    /// Forget the slot choice: the next resolution asks bootctld again.
    pub fn forget_slot(&self) {
        if let Ok(mut c) = self.chosen.lock() {
            *c = None;
        }
    }

    /// Resolve the install target now (a partition is looked up by name each time; a slot is
    /// chosen once, see the type docs).
    pub fn resolve(&self) -> Result<InstallTarget, String> {
        match &self.spec {
            InstallSpec::Path(p) => {
                let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
                if let Some(d) = parent {
                    if !d.is_dir() {
                        return Err(format!(
                            "install target {}: directory {} does not exist",
                            p.display(),
                            d.display()
                        ));
                    }
                }
                Ok(InstallTarget::from_path(p))
            }
            InstallSpec::Partition {
                name,
                sys_dir,
                dev_dir,
            } => match nx_guest::blockdev::find_partition(sys_dir, dev_dir, name) {
                Ok(Some(dev)) => Ok(InstallTarget::Block(dev)),
                Ok(None) => Err(format!(
                    "install partition {name} not found (is the slot disk attached?)"
                )),
                Err(e) => Err(format!("install partition {name}: {e}")),
            },
            InstallSpec::Slot { env } => {
                let mut chosen = self
                    .chosen
                    .lock()
                    .map_err(|_| "slot choice lock poisoned".to_string())?;
                if let Some((_, dev)) = chosen.as_ref() {
                    return Ok(InstallTarget::Block(dev.clone()));
                }
                let (slot, dev) =
                    crate::slots::resolve_inactive_slot_in(env).map_err(|e| e.to_string())?;
                *chosen = Some((slot, dev.clone()));
                Ok(InstallTarget::Block(dev))
            }
        }
    }

    /// What to call a resolved target in messages and receipts.
    pub fn describe(&self, t: &InstallTarget) -> String {
        match &self.spec {
            InstallSpec::Path(p) => p.display().to_string(),
            InstallSpec::Partition { name, .. } => {
                format!("partition {name} ({})", t.path().display())
            }
            InstallSpec::Slot { .. } => match self.chosen_slot() {
                Some((slot, _)) => format!("slot {slot} ({})", t.path().display()),
                None => t.path().display().to_string(),
            },
        }
    }

    /// Slot mode, after a verified install: `slotImaged` + `setActive(trial)` + rebootd
    /// `mode normal`, on a thread of its own so the DONE reply reaches the host before
    /// rebootd reboots the guest. The slot choice is cleared once a slot was activated.
    pub fn activate(&self, man: Manifest, out: Arc<dyn Output>) {
        let InstallSpec::Slot { env } = &self.spec else {
            return;
        };
        let Some((slot, dev)) = self.chosen_slot() else {
            out.show(&m::error(
                0,
                "slot install: no slot was chosen; nothing activated",
            ));
            return;
        };
        let env = env.clone();
        let dest = self.clone();
        let thread_out = Arc::clone(&out);
        let spawned = std::thread::Builder::new()
            .name("flashd-activate".into())
            .spawn(
                move || {
                    // The slot's kernel and initramfs go to the ESP first; bootctld writes
                    // the boot entry last (setActive), so the bootloader never sees a slot
                    // whose files are incomplete.
                    match crate::slots::install_boot_files(&env, slot, &dev, &man) {
                        Ok(crate::slots::BootFiles::Installed(files)) => {
                            thread_out.show(&m::boot_files(slot, files.join(" ")));
                        }
                        Ok(crate::slots::BootFiles::Skipped(why)) => {
                            thread_out.show(&m::boot_files_skipped(slot, why));
                        }
                        Err(e) => {
                            thread_out.show(&m::error(
                                0,
                                format!(
                                    "slot {slot} installed but its boot files could not be put on the ESP: {e} (the previous slot stays active)"
                                ),
                            ));
                            return;
                        }
                    }
                    match crate::slots::after_install_in(&env, slot, &man.version) {
                    Ok(a) => {
                        dest.forget_slot();
                        thread_out.show(&m::slot_activated(a.slot, a.tries, a.rebooting));
                    }
                    Err(e) => thread_out.show(&m::error(
                        0,
                        format!(
                            "slot {slot} installed but not activated: {e} (the previous slot stays active)"
                        ),
                    )),
                    }
                },
            );
        if let Err(e) = spawned {
            out.log(&format!("cannot start the slot activation thread: {e}"));
        }
    }
}

/// Hash the skip index of the image `m` installed at `path` on a low-priority thread; the
/// result arrives on `tx` as [`WorkResult::Index`]. `Err`: the thread did not start.
pub fn spawn_index(
    m: Manifest,
    plan: Plan,
    path: PathBuf,
    tx: mpsc::Sender<WorkResult>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("flashd-index".into())
        .spawn(move || {
            // Low priority: the index only speeds up the next transfer.
            let _ = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 10);
            let ix = build_index(&m, &plan, &path).map(Box::new);
            let _ = tx.send(WorkResult::Index(ix));
        })
        .map(|_| ())
}

fn build_index(m: &Manifest, plan: &Plan, path: &Path) -> Option<SkipIndex> {
    let f = File::open(path).ok()?;
    SkipIndex::build(m, plan, |off, len| {
        let mut b = vec![0u8; len as usize];
        f.read_exact_at(&mut b, off).map(|()| b)
    })
    .ok()
}

/// Peak resident set size of this process (`VmHWM` of `/proc/self/status`), KiB.
pub fn peak_rss_kib() -> Option<u64> {
    let status = nx_guest::fsx::read_bounded(Path::new("/proc/self/status"), 64 * 1024).ok()??;
    String::from_utf8_lossy(&status)
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// Size of a block device (or file), by seeking to its end.
pub fn block_capacity(path: &Path) -> Option<u64> {
    let mut f = File::open(path).ok()?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)).ok()
}

/// Bytes available to this process on the filesystem holding `path` (`statvfs`: free blocks
/// for unprivileged users times the fragment size). `None` when it cannot be asked.
pub fn free_space(path: &Path) -> Option<u64> {
    let st = rustix::fs::statvfs(path).ok()?;
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Bytes allocated to the file at `path` (0 when there is none): what replacing it gives back.
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .map(|m| {
            if m.is_file() {
                m.blocks().saturating_mul(512)
            } else {
                0
            }
        })
        .unwrap_or(0)
}
