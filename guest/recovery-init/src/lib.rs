//! recovery-init — PID 1 of the recovery ramdisk, the one recovery authority.
//!
//! Boot: mount proc/sys/devtmpfs/tmpfs, load the modules baked into the ramdisk, mount
//! `/state` by label, select the target, start the minimal service graph (flashd, and rebootd /
//! bootctld when the ramdisk has them), wait for the flash port, start `recovery-sh` on ttyS0,
//! then reap and supervise until a shutdown signal (see `nx_guest::sys` for the PID 1 signal
//! contract). Markers, exact and in order:
//! `recovery: boot target selected`, `recovery: init start`, `recovery: services ready`,
//! `recovery: ready (serial=@/dev/vport0p1)`, `recovery: shell ready` (printed by recovery-sh).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use nx_guest::cmdline::Cmdline;
use nx_guest::port;
use nx_guest::state::BootMode;
use nx_guest::supervisor::Service;
use std::path::PathBuf;

/// Marker: the boot target was chosen.
pub const M_TARGET: &str = "recovery: boot target selected";
/// Marker: recovery init proper starts.
pub const M_START: &str = "recovery: init start";
/// Marker: the service graph was started.
pub const M_SERVICES: &str = "recovery: services ready";
/// The flashd command line contract.
pub const FLASHD: &str = "/bin/flashd";
/// rebootd's guest-local socket (flashd's automatic reboot, bootctld's `reboot()`, shells).
pub const REBOOTD_SOCK: &str = "/run/rebootd.sock";
/// bootctld's guest-local socket (flashd's slot-aware install, shells).
pub const BOOTCTLD_SOCK: &str = "/run/bootctld.sock";
/// The shell.
pub const SHELL: &str = "/bin/recovery-sh";
/// The console the shell runs on.
pub const SHELL_TTY: &str = "/dev/ttyS0";

/// `recovery: ready (serial=@<port device>)`.
pub fn ready_marker(port_dev: &str) -> String {
    format!("recovery: ready (serial=@{port_dev})")
}

/// Why a target was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `nexus.target=` on the kernel command line.
    CmdlineTarget,
    /// `recovery=1` on the kernel command line.
    RecoveryFlag,
    /// The persisted one-shot record `/state/boot/next_mode`.
    NextBootRecord,
    /// Nothing asked: this is the recovery ramdisk, so recovery.
    Default,
}

impl Reason {
    /// Text for the console.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::CmdlineTarget => "kernel command line nexus.target=",
            Reason::RecoveryFlag => "kernel command line recovery=1",
            Reason::NextBootRecord => "next-boot record /state/boot/next_mode",
            Reason::Default => "recovery ramdisk default",
        }
    }
}

/// Choose the boot target: `nexus.target=` wins, then `recovery=1`, then the next-boot record,
/// then recovery (the firmware booted the recovery ramdisk). An unknown `nexus.target` value is
/// ignored.
pub fn select_target(cmdline: &Cmdline, record: Option<BootMode>) -> (BootMode, Reason) {
    if let Some(t) = cmdline.get("nexus.target").and_then(BootMode::parse) {
        return (t, Reason::CmdlineTarget);
    }
    if cmdline.flag("recovery") {
        return (BootMode::Recovery, Reason::RecoveryFlag);
    }
    if let Some(r) = record {
        return (r, Reason::NextBootRecord);
    }
    (BootMode::Recovery, Reason::Default)
}

/// The minimal service graph. `present(path)` tells whether a binary is in the ramdisk.
/// flashd is always part of it, installing into the inactive A/B slot (`--install-slot auto`:
/// bootctld at /run/bootctld.sock picks the slot; after a verified install flashd activates it
/// on trial and rebootd reboots into it); without /state it refuses with its own
/// stub/placeholder marker; rebootd and bootctld only when present; selftest-client only with
/// `nexus.selftest=1`.
pub fn services(cmdline: &Cmdline, present: &dyn Fn(&str) -> bool) -> Vec<Service> {
    let mut out = vec![Service::daemon(
        "flashd",
        FLASHD,
        &[
            "--port-name",
            port::FLASH_PORT,
            "--state",
            "/state",
            "--install-slot",
            "auto",
        ],
    )];
    if present("/bin/rebootd") {
        out.push(Service::daemon(
            "rebootd",
            "/bin/rebootd",
            &[
                "--port-name",
                port::REBOOT_PORT,
                "--state",
                "/state",
                "--listen",
                REBOOTD_SOCK,
            ],
        ));
    }
    if present("/bin/bootctld") {
        out.push(Service::daemon(
            "bootctld",
            "/bin/bootctld",
            &[
                "--port-name",
                port::BOOTCTL_PORT,
                "--state",
                "/state",
                "--listen",
                BOOTCTLD_SOCK,
            ],
        ));
    }
    if cmdline.flag("nexus.selftest") && present("/bin/selftest-client") {
        let mut s = Service::daemon(
            "selftest-client",
            "/bin/selftest-client",
            &["--mode", "recovery"],
        );
        s.restart = false;
        out.push(s);
    }
    out
}

/// The recovery shell on ttyS0, restarted when it exits.
pub fn shell_service() -> Service {
    Service {
        name: "recovery-sh".into(),
        path: PathBuf::from(SHELL),
        args: Vec::new(),
        restart: true,
        tty: Some(PathBuf::from(SHELL_TTY)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_priority() {
        let c = |s: &str| Cmdline::parse(s);
        assert_eq!(
            select_target(&c(""), None),
            (BootMode::Recovery, Reason::Default)
        );
        assert_eq!(
            select_target(&c(""), Some(BootMode::Normal)),
            (BootMode::Normal, Reason::NextBootRecord)
        );
        assert_eq!(
            select_target(&c("recovery=1"), Some(BootMode::Normal)),
            (BootMode::Recovery, Reason::RecoveryFlag)
        );
        assert_eq!(
            select_target(&c("recovery=1 nexus.target=recovery"), None),
            (BootMode::Recovery, Reason::CmdlineTarget)
        );
        assert_eq!(
            select_target(&c("nexus.target=bogus"), Some(BootMode::Recovery)),
            (BootMode::Recovery, Reason::NextBootRecord)
        );
    }

    #[test]
    fn service_graph() {
        let none = |_: &str| false;
        let all = |_: &str| true;
        let c = Cmdline::parse("");
        let s = services(&c, &none);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].path, PathBuf::from("/bin/flashd"));
        assert_eq!(
            s[0].args,
            [
                "--port-name",
                "com.nexus.flash",
                "--state",
                "/state",
                "--install-slot",
                "auto"
            ]
        );
        let names: Vec<_> = services(&c, &all).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["flashd", "rebootd", "bootctld"]);
        let graph = services(&c, &all);
        assert_eq!(
            graph[1].args,
            [
                "--port-name",
                "com.nexus.reboot",
                "--state",
                "/state",
                "--listen",
                "/run/rebootd.sock"
            ]
        );
        assert_eq!(
            graph[2].args,
            [
                "--port-name",
                "com.nexus.bootctl",
                "--state",
                "/state",
                "--listen",
                "/run/bootctld.sock"
            ]
        );
        let names: Vec<_> = services(&Cmdline::parse("nexus.selftest=1"), &all)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["flashd", "rebootd", "bootctld", "selftest-client"]);
        assert_eq!(
            ready_marker("/dev/vport0p1"),
            "recovery: ready (serial=@/dev/vport0p1)"
        );
    }
}
