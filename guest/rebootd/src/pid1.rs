//! The reboot contract with PID 1.
//!
//! Contract (implemented by `recovery-init` and the normal `init`): **SIGTERM to
//! PID 1 means "reboot"**: PID 1 stops its services, syncs, unmounts `/state`
//! and calls `reboot(2)` (`RB_AUTOBOOT`). The QEMU runner (`-no-reboot`) sees
//! QEMU exit, reads `STATE/boot/next_mode` from state.img and boots the
//! matching initramfs.
//!
//! rebootd only sends the signal when it is managed by our PID 1: its parent is
//! PID 1 and PID 1's `argv[0]` is `/init` (the initramfs convention). Anywhere
//! else (host-run tests, a developer's machine) signalling PID 1 would shut the
//! machine down, so the reboot is a stub that prints `(stub)` and does nothing.

use std::time::Duration;

/// How long after the reply the signal is sent (the reply must reach the caller).
pub const REBOOT_DELAY: Duration = Duration::from_millis(300);

/// The `--reboot-method` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MethodArg {
    /// `init` when managed by our PID 1 (parent is PID 1 and its argv[0] is `/init`), else `stub`.
    Auto,
    /// Always signal PID 1 (SIGTERM).
    Init,
    /// Never reboot; print `(stub)`.
    Stub,
}

/// How a reboot is carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootMethod {
    /// SIGTERM to PID 1.
    Init,
    /// No real reboot possible; the reason is printed.
    Stub(String),
}

impl RebootMethod {
    /// Resolve `--reboot-method`.
    pub fn resolve(arg: MethodArg) -> Self {
        match arg {
            MethodArg::Init => RebootMethod::Init,
            MethodArg::Stub => RebootMethod::Stub("--reboot-method stub".into()),
            MethodArg::Auto => detect(),
        }
    }

    /// Human-readable description for the startup log.
    pub fn describe(&self) -> String {
        match self {
            RebootMethod::Init => "SIGTERM to PID 1 (sync, unmount, reboot(2))".into(),
            RebootMethod::Stub(why) => format!("stub ({why}): reboots are not performed"),
        }
    }
}

fn detect() -> RebootMethod {
    let ppid = rustix::process::getppid().map(|p| p.as_raw_nonzero().get());
    if ppid != Some(1) {
        return RebootMethod::Stub(format!(
            "not started by PID 1 (parent pid {})",
            ppid.map_or_else(|| "none".to_string(), |p| p.to_string())
        ));
    }
    let argv0 = crate::fsutil::read_bounded(std::path::Path::new("/proc/1/cmdline"), 4096)
        .ok()
        .flatten()
        .map(|b| {
            let first = b.split(|&c| c == 0).next().unwrap_or_default();
            String::from_utf8_lossy(first).into_owned()
        })
        .unwrap_or_default();
    if argv0 == "/init" {
        RebootMethod::Init
    } else {
        RebootMethod::Stub(format!("PID 1 is {argv0:?}, not our initramfs /init"))
    }
}

/// Send SIGTERM to PID 1 (the reboot request of the contract).
pub fn signal_init() -> std::io::Result<()> {
    rustix::process::kill_process(rustix::process::Pid::INIT, rustix::process::Signal::TERM)
        .map_err(std::io::Error::from)
}
