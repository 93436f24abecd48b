//! Slot-aware install (issue 5): flashd installs into the *inactive* A/B slot and, once the
//! install is verified, makes it the active slot on trial and reboots into it.
//!
//! bootctld is the only authority on slot state and rebootd the only one on reboots; this
//! module only asks them (over their guest-local sockets, `/run/bootctld.sock` and
//! `/run/rebootd.sock`, raw Cap'n Proto RPC). The policy lives in `bootctld::update`:
//!
//! * [`resolve_inactive_slot`]: which slot to install into — the one that is not active —
//!   and its partition (`system_<slot>`, by GPT name), e.g. `/dev/vdb2`. Refused when that
//!   slot is the last known-good one and the active slot is still unconfirmed.
//! * [`after_install`]: `slotImaged(slot, version)`, `setActive(slot, trial=true, tries=3)`,
//!   `rebootd.mode("normal")` — the automatic reboot into the new slot's trial boot.
//!
//! flashd is synchronous; each call runs on a short-lived current-thread tokio runtime.
//! The module depends only on `bootctld`, `nx-guest` and `tokio` (it is also compiled by the
//! `bootctld_host` tests, which run it against real in-process daemons).

use bootctld::machine::Slot;
use bootctld::update::{self, UpdateError};
use std::path::{Path, PathBuf};

pub use bootctld::update::{Activated, TRIAL_TRIES};

/// bootctld's guest-local socket.
pub const BOOTCTLD_SOCK: &str = bootctld::DEFAULT_SOCKET;
/// rebootd's guest-local socket.
pub const REBOOTD_SOCK: &str = bootctld::REBOOTD_SOCKET;

/// Errors of the slot-aware install. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    /// bootctld / rebootd refused or could not be reached.
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// The slot's partition does not exist.
    #[error("install slot {slot}: no GPT partition {partition} (is the slot disk attached?)")]
    NoPartition { slot: Slot, partition: String },
    /// Looking the partition up failed.
    #[error("install slot {slot}: looking up partition {partition}: {reason}")]
    Lookup {
        slot: Slot,
        partition: String,
        reason: String,
    },
    /// No runtime for the RPC calls.
    #[error("cannot start the tokio runtime for the bootctld/rebootd calls: {0}")]
    Runtime(std::io::Error),
}

/// Where the daemons and the block devices are (the guest defaults, or test directories).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotEnv {
    /// bootctld's unix socket.
    pub bootctld: PathBuf,
    /// rebootd's unix socket.
    pub rebootd: PathBuf,
    /// `/sys/class/block`.
    pub sys_dir: PathBuf,
    /// `/dev`.
    pub dev_dir: PathBuf,
    /// Trial tries of the new slot.
    pub tries: u8,
    /// Where the ESP is mounted (the slots' kernels and initramfs images go there).
    pub esp: PathBuf,
}

impl Default for SlotEnv {
    fn default() -> Self {
        SlotEnv {
            bootctld: PathBuf::from(BOOTCTLD_SOCK),
            rebootd: PathBuf::from(REBOOTD_SOCK),
            sys_dir: PathBuf::from(nx_guest::blockdev::SYS_CLASS_BLOCK),
            dev_dir: PathBuf::from("/dev"),
            tries: TRIAL_TRIES,
            esp: PathBuf::from(nx_contract::loader::ESP_MOUNT),
        }
    }
}

/// The GPT partition name of a slot (`system_a`, `system_b`).
pub fn partition_name(slot: Slot) -> String {
    format!("system_{slot}")
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, SlotError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(SlotError::Runtime)?;
    Ok(rt.block_on(f))
}

/// The slot an install would go to, asked without preparing it (nothing changes on the
/// device): for questions such as "which slot is the base of a patch".
pub fn inactive_slot_in(env: &SlotEnv) -> Result<Slot, SlotError> {
    Ok(block_on(update::install_target(&env.bootctld))??)
}

/// The install target: the slot that is not active (bootctld decides, see
/// `bootctld::update::choose_target`) and its partition device, e.g. `(B, /dev/vdb2)`.
pub fn resolve_inactive_slot_in(env: &SlotEnv) -> Result<(Slot, PathBuf), SlotError> {
    let slot = block_on(update::install_target(&env.bootctld))??;
    let partition = partition_name(slot);
    let dev = match nx_guest::blockdev::find_partition(&env.sys_dir, &env.dev_dir, &partition) {
        Ok(Some(dev)) => dev,
        Ok(None) => return Err(SlotError::NoPartition { slot, partition }),
        Err(e) => {
            return Err(SlotError::Lookup {
                slot,
                partition,
                reason: e.to_string(),
            })
        }
    };
    // Before the first byte is written: the slot stops counting and loses its boot entry.
    block_on(update::prepare_install(&env.bootctld, slot))??;
    Ok((slot, dev))
}

/// What [`install_boot_files`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootFiles {
    /// `kernel` and `initrd` are in the slot's directory on the ESP (paths on the ESP).
    Installed(Vec<String>),
    /// Nothing to install, and why (no ESP mounted, or the image has no such segments).
    Skipped(String),
}

/// Install the image's `kernel` and `initrd` segments from the slot partition `dev` (the
/// image starts at its first byte) into `nexus/<slot>/` on the ESP at `env.esp`, each checked
/// against the manifest's SHA-256 before it is renamed into place. Segments larger than the
/// ESP's bound are refused.
pub fn install_boot_files(
    env: &SlotEnv,
    slot: Slot,
    dev: &Path,
    m: &proto::manifest::Manifest,
) -> Result<BootFiles, String> {
    use nx_contract::loader;
    use std::io::{Read, Seek, SeekFrom};
    let Some(esp) = nx_guest::esp::Esp::open(&env.esp) else {
        return Ok(BootFiles::Skipped(format!(
            "no ESP at {}",
            env.esp.display()
        )));
    };
    let wanted = [
        ("kernel", loader::KERNEL_FILE),
        ("initrd", loader::INITRD_FILE),
    ];
    let segs: Vec<_> = wanted
        .iter()
        .filter_map(|(seg, file)| m.segment(seg).map(|s| (s, *file)))
        .collect();
    if segs.len() != wanted.len() {
        return Ok(BootFiles::Skipped(
            "the image has no kernel and initrd segments".into(),
        ));
    }
    let dir = loader::slot_dir(slot.as_char());
    let mut done = Vec::new();
    let mut f = std::fs::File::open(dev).map_err(|e| format!("open {}: {e}", dev.display()))?;
    for (seg, file) in segs {
        if seg.size > nx_guest::esp::MAX_BOOT_FILE {
            return Err(format!(
                "segment {} is {} bytes; a boot file may have at most {}",
                seg.name,
                seg.size,
                nx_guest::esp::MAX_BOOT_FILE
            ));
        }
        let len = usize::try_from(seg.size).map_err(|e| e.to_string())?;
        let mut bytes = vec![0u8; len];
        f.seek(SeekFrom::Start(seg.offset))
            .and_then(|_| f.read_exact(&mut bytes))
            .map_err(|e| format!("read segment {} from {}: {e}", seg.name, dev.display()))?;
        let rel = format!("{dir}/{file}");
        esp.install_file(&rel, &bytes, &hex::encode(seg.sha256))
            .map_err(|e| e.to_string())?;
        done.push(rel);
    }
    Ok(BootFiles::Installed(done))
}

/// [`resolve_inactive_slot_in`] with bootctld at `bootctld_sock` and the guest's sysfs/dev.
pub fn resolve_inactive_slot(bootctld_sock: &Path) -> Result<(Slot, PathBuf), SlotError> {
    resolve_inactive_slot_in(&SlotEnv {
        bootctld: bootctld_sock.to_path_buf(),
        ..SlotEnv::default()
    })
}

/// After a verified install of image `version` into `slot`: `slotImaged`, `setActive(slot,
/// trial=true, tries)` and `rebootd.mode("normal")`. On error the previously active slot
/// stays active (see [`UpdateError`]).
pub fn after_install_in(env: &SlotEnv, slot: Slot, version: &str) -> Result<Activated, SlotError> {
    Ok(block_on(update::after_install(
        &env.bootctld,
        &env.rebootd,
        slot,
        version,
        env.tries,
    ))??)
}

/// [`after_install_in`] with the given sockets and 3 trial tries.
pub fn after_install(
    bootctld_sock: &Path,
    rebootd_sock: &Path,
    slot: Slot,
    version: &str,
) -> Result<Activated, SlotError> {
    after_install_in(
        &SlotEnv {
            bootctld: bootctld_sock.to_path_buf(),
            rebootd: rebootd_sock.to_path_buf(),
            ..SlotEnv::default()
        },
        slot,
        version,
    )
}

/// `flashd: install slot=b (system_b on /dev/vdb2)`: the marker of the slot an install
/// goes to (`nx_contract::markers::flashd::install_slot`).
pub fn target_marker(slot: Slot, dev: &Path) -> String {
    nx_contract::markers::flashd::install_slot(slot, partition_name(slot), dev.display())
        .into_string()
}

/// `flashd: slot=<s> active on trial (tries=<n>); rebooting` (or the stub variant).
pub fn activated_marker(a: &Activated) -> String {
    nx_contract::markers::flashd::slot_activated(a.slot, a.tries, a.rebooting).into_string()
}
