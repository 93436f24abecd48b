//! init — PID 1 of the normal initramfs.
//!
//! Boot: the same mechanics as recovery-init (`nx_guest::pid1`), then the normal service graph
//! (rebootd and bootctld, each on its virtio-serial port and on its guest-local socket
//! `/run/rebootd.sock` / `/run/bootctld.sock`; selftest-client with `nexus.selftest=1`), then
//! the A/B slot boot of [`boot`]: bootctld picks the slot (trial tries, rollback), its
//! `rootfs` segment is mounted read-only on `/sysroot`, the health check confirms it.
//! It consumes a `normal` next-boot record; a `recovery` record is left for the boot firmware
//! (only recovery-init runs recovery).
//!
//! Markers, in order: `init: start`, `init: services ready`,
//! `init: booted slot=<a|b> version=<v> trial=<true|false>` (or `init: rootfs unusable …` and a
//! reboot), `init: confirmed slot=<s>`, `init: ready`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod boot;
pub mod system;

use nx_guest::cmdline::Cmdline;
use nx_guest::supervisor::Service;

/// Boot options from the kernel command line (`nexus.confirm=manual`).
pub fn options(cmdline: &Cmdline) -> boot::Options {
    boot::Options {
        manual_confirm: cmdline.get("nexus.confirm") == Some("manual"),
    }
}

/// The normal service graph, run from `bin_dir` (the booted slot's rootfs, `/sysroot/bin`);
/// `present(path)` tells whether a binary is there.
pub fn services(
    cmdline: &Cmdline,
    bin_dir: &std::path::Path,
    present: &dyn Fn(&str) -> bool,
) -> Vec<Service> {
    let mut out = Vec::new();
    let bin = |name: &str| bin_dir.join(name).to_string_lossy().into_owned();
    if present(&bin("rebootd")) {
        out.push(Service::rebootd(bin_dir, system::REBOOTD_SOCK));
    }
    if present(&bin("bootctld")) {
        out.push(Service::bootctld(bin_dir, system::BOOTCTLD_SOCK));
    }
    if cmdline.flag("nexus.selftest") && present(&bin("selftest-client")) {
        let mut s = Service::daemon(
            "selftest-client",
            &bin("selftest-client"),
            &["--mode", "normal"],
        );
        s.restart = false;
        out.push(s);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn normal_graph() {
        let c = Cmdline::parse("");
        assert!(services(&c, Path::new("/sysroot/bin"), &|_| false).is_empty());
        let names: Vec<_> = services(&c, Path::new("/sysroot/bin"), &|_| true)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["rebootd", "bootctld"]);
        let sel = Cmdline::parse("nexus.selftest=1");
        assert_eq!(
            services(&sel, Path::new("/sysroot/bin"), &|_| true).len(),
            3
        );
        let all = services(&c, Path::new("/sysroot/bin"), &|_| true);
        assert_eq!(
            all[0].args,
            [
                "--port-name",
                "com.nexus.reboot",
                "--state",
                "/state",
                "--listen",
                "/run/rebootd.sock",
                "--efivars",
                "/sys/firmware/efi/efivars"
            ]
        );
        assert_eq!(
            all[1].args,
            [
                "--port-name",
                "com.nexus.bootctl",
                "--state",
                "/state",
                "--listen",
                "/run/bootctld.sock",
                "--esp",
                "/boot/efi",
                "--efivars",
                "/sys/firmware/efi/efivars"
            ]
        );
    }
}
