//! QEMU runner for nexus guests (see `docs/runner/qemu.md`).
//!
//! - [`Config`]: the QEMU command line — q35 + TCG, the kernel, the recovery or normal
//!   initramfs, `console=ttyS0`, virtio-serial ports on unix sockets under `build/qemu/`,
//!   virtio-blk for `state.img` and `disk.img` (both optional).
//! - [`Runner`]: runs QEMU as the **boot firmware**: `-no-reboot` makes a guest reboot exit
//!   QEMU; the runner then reads the one-shot next-boot record `/boot/next_mode` from
//!   `state.img` (read-only, with `debugfs`, QEMU stopped) and boots the recovery ramdisk or
//!   the normal initramfs, until the guest powers off or the caller stops it. The console is
//!   captured to `build/qemu/console.log` (and echoed when asked); markers are awaited in order.
//!   QEMU is always killed on stop, drop, and when the runner thread dies (`PR_SET_PDEATHSIG`).
//! - [`markers`]: the marker contract (`qemu/markers.toml`) and the profile checker.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod firmware;
pub mod markers;
mod runner;

pub use runner::{Hit, Outcome, Runner};

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Errors of the runner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file the run needs is missing.
    #[error("{what} {path} is missing; build it with `cargo xtask guest`")]
    Missing { what: &'static str, path: PathBuf },
    /// An I/O error on a path.
    #[error(transparent)]
    Io(#[from] nx_contract::PathIoError),
    /// QEMU could not be started.
    #[error(
        "could not start {qemu}: {source} (install it with `apt-get install -y qemu-system-x86`)"
    )]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A marker did not show up in time.
    #[error("timed out after {}s waiting for marker {marker:?}", .timeout.as_secs_f64())]
    Timeout { marker: String, timeout: Duration },
    /// The guest stopped (powered off, panicked, QEMU died) before the marker showed up.
    #[error("guest stopped ({outcome}) before marker {marker:?}")]
    Stopped { marker: String, outcome: Outcome },
    /// The console is not a pipe (interactive run), so nothing can be sent.
    #[error("console input is attached to the terminal; cannot send")]
    NoConsoleInput,
    /// `markers.toml` is unreadable or invalid.
    #[error("marker contract {path}: {reason}")]
    Markers { path: PathBuf, reason: String },
}

/// Which initramfs the firmware boots: the contract's next-boot grammar
/// ([`nx_contract::NextBoot`]), named for what the runner does with it.
pub use nx_contract::NextBoot as BootTarget;

/// A named virtio-serial port on a host unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Port name seen by the guest (`/sys/class/virtio-ports/*/name`).
    pub name: String,
    /// Host socket (QEMU listens; clients such as `nx` connect).
    pub socket: PathBuf,
}

/// Debian's OVMF firmware code (package `ovmf`, 4 MiB flash layout).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's empty variable store: the template of a device's NVRAM.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// UEFI firmware for a run: the read-only code and the device's variable store (written by
/// the firmware and the bootloader: boot counting's one-shot and default entry live there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uefi {
    pub code: PathBuf,
    pub vars: PathBuf,
}

impl Uefi {
    /// Debian's OVMF with the variable store `vars` (created from [`OVMF_VARS`] when missing).
    pub fn ovmf(vars: PathBuf) -> Uefi {
        Uefi {
            code: PathBuf::from(OVMF_CODE),
            vars,
        }
    }
}

/// Everything a run needs. Build it with [`Config::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct Config {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `debugfs` (reads the next-boot record from state.img).
    pub debugfs: PathBuf,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The recovery ramdisk.
    pub recovery_initrd: PathBuf,
    /// The normal initramfs.
    pub normal_initrd: PathBuf,
    /// The ext4 `/state` disk; `None` runs without /state.
    pub state_img: Option<PathBuf>,
    /// The GPT slot disk; `None` runs without slots.
    pub disk_img: Option<PathBuf>,
    /// Run directory: sockets and `console.log`.
    pub run_dir: PathBuf,
    /// virtio-serial ports, in order: the first is `vport0p1`.
    pub ports: Vec<Port>,
    /// First boot into recovery (`RECOVERY=1`: adds `recovery=1 nexus.target=recovery`).
    pub recovery: bool,
    /// Force the first boot's target without reading the records (tests that play a boot
    /// firmware ignoring them, e.g. the normal init's guard against a pending factory wipe).
    /// `recovery` wins. Later boots always follow the records.
    pub first_boot: Option<BootTarget>,
    /// Extra kernel arguments (e.g. `nexus.selftest=1`), on every boot.
    pub extra_cmdline: Vec<String>,
    /// Keep kernel messages off the console (`quiet`).
    pub quiet: bool,
    /// Guest memory.
    pub memory_mib: u32,
    /// vCPUs (`-smp`, default 2: flashd verifies a segment on its hasher thread while the
    /// receiving thread goes on, and the boot starts its services in parallel; each vCPU is a
    /// host thread under MTTCG). `NX_QEMU_SMP` overrides it.
    pub smp: u32,
    /// Use KVM (opt-in; TCG is the default and the only thing verified here).
    pub kvm: bool,
    /// Echo the console to stdout.
    pub echo: bool,
    /// Attach the console to this terminal (stdin) for a user; otherwise a pipe that
    /// [`Runner::send`] writes to.
    pub interactive: bool,
    /// Follow guest reboots (the firmware loop); otherwise a reboot ends the run.
    pub follow_reboots: bool,
    /// Upper bound on boots in one run (a reboot loop is a failure, not a hang).
    pub max_boots: u32,
    /// Boot through UEFI firmware (OVMF) and the disk's own bootloader instead of loading the
    /// kernel and an initramfs directly: the ESP of `disk_img` decides what boots (its default
    /// entry; `recovery`, `first_boot` and `extra_cmdline` do not apply).
    pub uefi: Option<Uefi>,
    /// Disks served over NBD instead of opened as files: `("state" | "disk", unix socket)`
    /// (the crash simulator records every write and flush this way). The file of the same
    /// disk must still be set: the firmware loop reads the next-boot record from it.
    pub nbd: Vec<(String, PathBuf)>,
}

impl Config {
    /// The standard layout under `build/` (as written by `cargo xtask guest`): all three ports
    /// (flash first, so it is `/dev/vport0p1`), both disks, TCG, 1 GiB, quiet console off.
    pub fn new(build_dir: &Path) -> Self {
        let run_dir = build_dir.join("qemu");
        let ports = nx_contract::ports::STANDARD
            .iter()
            .map(|p| Port {
                name: p.name.to_string(),
                socket: run_dir.join(p.socket),
            })
            .collect();
        Config {
            qemu: PathBuf::from("qemu-system-x86_64"),
            debugfs: find_tool("debugfs"),
            kernel: build_dir.join("kernel/vmlinuz"),
            recovery_initrd: build_dir.join("recovery/initrd.cpio"),
            normal_initrd: build_dir.join("initrd.cpio"),
            state_img: Some(build_dir.join("state.img")),
            disk_img: Some(build_dir.join("disk.img")),
            run_dir,
            ports,
            recovery: false,
            first_boot: None,
            extra_cmdline: Vec::new(),
            quiet: true,
            memory_mib: 1024,
            smp: 2,
            kvm: false,
            echo: false,
            interactive: false,
            follow_reboots: true,
            max_boots: 16,
            nbd: Vec::new(),
            uefi: None,
        }
    }

    /// Apply the environment: `RECOVERY=1`, `NX_QEMU_KVM=1`, `NX_QEMU_APPEND="k=v …"`,
    /// `NX_QEMU_VERBOSE=1` (kernel messages on the console), `NX_QEMU_SMP=n`.
    pub fn apply_env(mut self) -> Self {
        let on = |k: &str| std::env::var(k).is_ok_and(|v| v == "1" || v == "true" || v == "yes");
        if on("RECOVERY") {
            self.recovery = true;
        }
        if on("NX_QEMU_KVM") {
            self.kvm = true;
        }
        if on("NX_QEMU_VERBOSE") {
            self.quiet = false;
        }
        if let Some(n) = std::env::var("NX_QEMU_SMP")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            self.smp = n;
        }
        if let Ok(extra) = std::env::var("NX_QEMU_APPEND") {
            self.extra_cmdline
                .extend(extra.split_whitespace().map(str::to_string));
        }
        self
    }

    /// Add (or re-point) a named port; its socket is `run_dir/<file>`.
    pub fn with_port(mut self, name: &str, file: &str) -> Self {
        let socket = self.run_dir.join(file);
        match self.ports.iter_mut().find(|p| p.name == name) {
            Some(p) => p.socket = socket,
            None => self.ports.push(Port {
                name: name.to_string(),
                socket,
            }),
        }
        self
    }

    /// The host socket of a port.
    pub fn port_socket(&self, name: &str) -> Option<&Path> {
        self.ports
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.socket.as_path())
    }

    /// `run_dir/console.log`.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// The kernel command line for a boot of `target`. `recovery=1` (the user's flag) only
    /// goes on the first boot when [`Config::recovery`] is set.
    pub fn cmdline(&self, target: BootTarget, first_boot: bool) -> String {
        let mut words: Vec<String> = vec![
            "console=ttyS0".into(),
            "panic=-1".into(),
            "rdinit=/init".into(),
        ];
        if self.quiet {
            words.push("quiet".into());
        }
        if first_boot && self.recovery {
            words.push("recovery=1".into());
        }
        words.push(format!("nexus.target={}", target.as_str()));
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// The full QEMU argument list for a boot of `target`.
    pub fn qemu_args(&self, target: BootTarget, first_boot: bool) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: &str| a.push(OsString::from(s));
        let accel = if self.kvm { "kvm" } else { "tcg" };
        push("-machine");
        push(&format!("q35,accel={accel}"));
        push("-cpu");
        push(if self.kvm { "host" } else { "max" });
        push("-m");
        push(&self.memory_mib.to_string());
        push("-smp");
        push(&self.smp.to_string());
        for s in [
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ] {
            push(s);
        }
        if self.interactive {
            for s in [
                "-chardev",
                "stdio,id=con0,mux=on,signal=off",
                "-serial",
                "chardev:con0",
            ] {
                push(s);
            }
            for s in ["-mon", "chardev=con0,mode=readline"] {
                push(s);
            }
        } else {
            for s in [
                "-chardev",
                "stdio,id=con0,signal=off",
                "-serial",
                "chardev:con0",
                "-monitor",
                "none",
            ] {
                push(s);
            }
        }
        if let Some(u) = &self.uefi {
            let mut code = OsString::from("if=pflash,format=raw,readonly=on,file=");
            code.push(u.code.as_os_str());
            let mut vars = OsString::from("if=pflash,format=raw,file=");
            vars.push(u.vars.as_os_str());
            for d in [code, vars] {
                a.push("-drive".into());
                a.push(d);
            }
        } else {
            push("-kernel");
            a.push(self.kernel.clone().into_os_string());
            a.push("-initrd".into());
            let initrd = match target {
                BootTarget::Recovery => &self.recovery_initrd,
                BootTarget::Normal => &self.normal_initrd,
            };
            a.push(initrd.clone().into_os_string());
            a.push("-append".into());
            a.push(self.cmdline(target, first_boot).into());
        }
        if !self.ports.is_empty() {
            a.push("-device".into());
            a.push("virtio-serial-pci,id=vser0".into());
            for (i, p) in self.ports.iter().enumerate() {
                let mut chardev =
                    OsString::from(format!("socket,id=port{i},server=on,wait=off,path="));
                chardev.push(p.socket.as_os_str());
                a.push("-chardev".into());
                a.push(chardev);
                a.push("-device".into());
                a.push(
                    format!(
                        "virtserialport,bus=vser0.0,nr={},chardev=port{i},name={}",
                        i + 1,
                        p.name
                    )
                    .into(),
                );
            }
        }
        for (id, img) in [("state", &self.state_img), ("disk", &self.disk_img)] {
            if let Some(img) = img {
                // cache=unsafe: guest flushes are not forwarded to the host disk. Killing QEMU
                // (a power cut) still keeps every write the guest saw complete, because QEMU
                // hands each write to the host kernel before completing it.
                let drive = match self.nbd.iter().find(|(d, _)| d == id) {
                    // Writeback caching in the guest's view: flushes reach the NBD server,
                    // which is the point.
                    Some((_, sock)) => {
                        let mut d = OsString::from(format!(
                            "if=none,id={id},driver=raw,cache=writeback,file.driver=nbd,\
                             file.server.type=unix,file.server.path="
                        ));
                        d.push(sock.as_os_str());
                        d
                    }
                    None => {
                        let mut d = OsString::from(format!(
                            "if=none,id={id},format=raw,cache=unsafe,file="
                        ));
                        d.push(img.as_os_str());
                        d
                    }
                };
                a.push("-drive".into());
                a.push(drive);
                a.push("-device".into());
                a.push(format!("virtio-blk-pci,drive={id},serial=nexus-{id}").into());
            }
        }
        a
    }

    /// Check the files a run needs.
    pub fn check(&self) -> Result<(), Error> {
        if let Some(u) = &self.uefi {
            if !u.code.exists() {
                return Err(Error::Missing {
                    what: "UEFI firmware (apt-get install -y ovmf)",
                    path: u.code.clone(),
                });
            }
        }
        let need = [
            ("kernel", Some(&self.kernel)),
            ("recovery ramdisk", Some(&self.recovery_initrd)),
            ("normal initramfs", Some(&self.normal_initrd)),
            ("state disk", self.state_img.as_ref()),
            ("slot disk", self.disk_img.as_ref()),
        ];
        for (what, p) in need {
            if let Some(p) = p {
                if !p.exists() {
                    return Err(Error::Missing {
                        what,
                        path: p.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Find a tool in `$PATH` or the sbin directories (falls back to the bare name).
pub fn find_tool(bin: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(bin))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(c: &Config, t: BootTarget, first: bool) -> Vec<String> {
        c.qemu_args(t, first)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn command_line() {
        let mut c = Config::new(Path::new("/b"));
        c.recovery = true;
        c.extra_cmdline.push("nexus.selftest=1".into());
        let a = args(&c, BootTarget::Recovery, true);
        let joined = a.join(" ");
        assert!(joined.contains("-machine q35,accel=tcg -cpu max"));
        assert!(joined.contains("-no-reboot"));
        assert!(joined.contains("-initrd /b/recovery/initrd.cpio"));
        assert!(joined.contains("path=/b/qemu/flash.sock"));
        assert!(
            joined.contains("virtserialport,bus=vser0.0,nr=1,chardev=port0,name=com.nexus.flash")
        );
        assert!(joined.contains("name=com.nexus.reboot"));
        assert!(joined.contains("file=/b/state.img"));
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "console=ttyS0 panic=-1 rdinit=/init quiet recovery=1 nexus.target=recovery nexus.selftest=1"
        );
        // later boots: no recovery=1, the firmware's target
        let a = args(&c, BootTarget::Normal, false);
        assert!(a.iter().any(|x| x == "/b/initrd.cpio"));
        assert!(!a.join(" ").contains("recovery=1"));
        // no state disk
        c.state_img = None;
        assert!(!args(&c, BootTarget::Normal, true)
            .join(" ")
            .contains("state.img"));
    }

    #[test]
    fn uefi_boots_from_the_disk() {
        let mut c = Config::new(Path::new("/b"));
        c.uefi = Some(Uefi::ovmf(PathBuf::from("/r/vars.fd")));
        let a = args(&c, BootTarget::Normal, true).join(" ");
        assert!(a.contains("-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd -drive if=pflash,format=raw,file=/r/vars.fd"), "{a}");
        assert!(!a.contains("-kernel") && !a.contains("-append"), "{a}");
    }

    #[test]
    fn a_disk_over_nbd() {
        let mut c = Config::new(Path::new("/b"));
        c.nbd.push(("disk".into(), PathBuf::from("/r/disk.nbd")));
        let a = args(&c, BootTarget::Normal, true).join(" ");
        assert!(
            a.contains("id=disk,driver=raw,cache=writeback,file.driver=nbd,file.server.type=unix,file.server.path=/r/disk.nbd"),
            "{a}"
        );
        assert!(
            a.contains("id=state,format=raw,cache=unsafe,file=/b/state.img"),
            "{a}"
        );
    }

    #[test]
    fn ports() {
        let c = Config::new(Path::new("/b")).with_port("com.nexus.extra", "extra.sock");
        assert_eq!(
            c.port_socket("com.nexus.extra"),
            Some(Path::new("/b/qemu/extra.sock"))
        );
        assert_eq!(c.ports[0].name, "com.nexus.flash");
        assert_eq!(c.console_log(), PathBuf::from("/b/qemu/console.log"));
    }
}
