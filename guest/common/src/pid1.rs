//! The shared skeleton of both PID 1 programs (`recovery-init`, normal `init`): early mounts,
//! module loading, `/state`, and the final shutdown. Each init keeps its own policy (target
//! selection, service graph, markers); this module only does the mechanics.

use crate::cmdline::Cmdline;
use crate::sys::{self, Shutdown};
use crate::{marker, modules, state};
use nx_contract::markers;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What early boot found.
#[derive(Debug, Clone)]
pub struct Early {
    /// The kernel command line (empty when unreadable).
    pub cmdline: Cmdline,
    /// Number of modules loaded from the initramfs load list.
    pub modules: usize,
    /// The device mounted on `/state`, or `None` (no state disk, or mounting failed).
    pub state_dev: Option<PathBuf>,
    /// The ESP mounted on `/boot/efi`, or `None` (no slot disk, or mounting failed).
    pub esp_dev: Option<PathBuf>,
}

/// Block PID 1's signals, mount the pseudo file systems, load modules, mount `/state`.
/// Failures are reported on the console with `prefix` and boot continues with what works.
pub fn early(prefix: &str) -> Early {
    if let Err(e) = sys::block_signals(&sys::PID1_SIGNALS) {
        marker::show(&markers::pid1::signal_setup_failed(prefix, e));
    }
    if let Err(e) = sys::mount_early() {
        marker::show(&markers::pid1::early_mounts_failed(prefix, e));
    }
    let modules = modules::load_all(Path::new(modules::MODULE_DIR)).unwrap_or_else(|e| {
        marker::show(&markers::pid1::modules_failed(prefix, e));
        0
    });
    // After the modules: the firmware config file needs qemu_fw_cfg.
    let cmdline = Cmdline::system().unwrap_or_else(|e| {
        marker::show(&markers::pid1::cmdline_unreadable(prefix, e));
        Cmdline::default()
    });
    if let Err(e) = crate::efivar::mount() {
        marker::show(&markers::pid1::efivars_error(prefix, e));
    }
    let state_dev = match state::find_and_mount() {
        Ok(dev) => dev,
        Err(e) => {
            marker::show(&markers::pid1::state_error(prefix, e));
            None
        }
    };
    // After /state: waiting for the virtio disks happened there.
    let esp_dev = match crate::esp::find_and_mount() {
        Ok(dev) => dev,
        Err(e) => {
            marker::show(&markers::pid1::esp_error(prefix, e));
            None
        }
    };
    Early {
        cmdline,
        modules,
        state_dev,
        esp_dev,
    }
}

/// Seconds since boot from `/proc/uptime` (for the console; `None` when unreadable).
pub fn uptime() -> Option<f64> {
    let text = crate::bounded::read_string(Path::new("/proc/uptime"), 128).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// Print `<prefix>: <action>` and shut down. Never returns: if `reboot(2)` fails, PID 1 must
/// not exit (that panics the kernel), so it reports and sleeps.
pub fn finish(prefix: &str, action: Shutdown) -> ! {
    marker::show(&markers::pid1::shutting_down(prefix, action.as_str()));
    let err = sys::shutdown(action, Duration::from_secs(3));
    marker::show(&markers::pid1::halting(prefix, err));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
