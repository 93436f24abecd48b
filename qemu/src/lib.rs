//! QEMU runner for nexus guests (see `docs/runner/qemu.md`).
//!
//! - [`Config`]: the QEMU command line — q35 + TCG, OVMF (code + the device's variable store
//!   on pflash), `disk.img` (whose ESP holds systemd-boot and the boot entries) and
//!   `state.img` on virtio-blk, virtio-serial ports on unix sockets under `build/qemu/`.
//! - [`Runner`]: **just QEMU**: the firmware and the disk's own bootloader decide every boot;
//!   a guest reboot is a real reset inside the same QEMU. The runner only watches the console
//!   (captured to `build/qemu/console.log`, echoed when asked; markers awaited in order),
//!   counts boots (each time the firmware starts a boot loader), can cut the power (kill
//!   QEMU, start it again on the same disks and variables) and, before a power-on, can set
//!   the bootloader's one-shot entry in the variable store ([`varstore`]: `RECOVERY=1`).
//!   Without a slot disk there is nothing to boot from, so such a run loads the kernel and an
//!   initramfs directly (`-kernel`, one boot). QEMU is always killed on stop, drop, and when
//!   the runner thread dies (`PR_SET_PDEATHSIG`).
//! - [`markers`]: the marker contract (`qemu/markers.toml`) and the profile checker.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod markers;
mod runner;
pub mod varstore;

pub use runner::{Hit, Outcome, Runner, FIRMWARE_BOOT_LINE, STARTED_NOTE};

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

/// What a boot starts: the contract's next-boot grammar ([`nx_contract::NextBoot`]).
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
    /// The kernel image (direct boots only: runs without a slot disk).
    pub kernel: PathBuf,
    /// The recovery ramdisk (direct boots only).
    pub recovery_initrd: PathBuf,
    /// The normal initramfs (direct boots only).
    pub normal_initrd: PathBuf,
    /// The ext4 `/state` disk; `None` runs without /state.
    pub state_img: Option<PathBuf>,
    /// The GPT slot disk; `None` runs without slots.
    pub disk_img: Option<PathBuf>,
    /// Run directory: sockets and `console.log`.
    pub run_dir: PathBuf,
    /// virtio-serial ports, in order: the first is `vport0p1`.
    pub ports: Vec<Port>,
    /// The second 16550 (`/dev/ttyS1` in the guest): QEMU listens on this unix socket for it
    /// ([`nx_contract::ports::UART`]); `None` leaves the guest with the console UART only.
    pub uart: Option<PathBuf>,
    /// Put the second 16550 on a host pseudo-terminal (`-chardev pty`) instead of the `uart`
    /// socket, for hosts that open it as a serial device (`nx … --port serial:/dev/pts/N`):
    /// QEMU prints `char device redirected to /dev/pts/N (label uart1)` on the console at
    /// every power-on ([`Runner::uart_pty`] finds it). Needs `uart` to be `Some`.
    pub uart_pty: bool,
    /// First boot into recovery (`RECOVERY=1`): the runner writes the bootloader's one-shot
    /// entry `recovery.conf` into the variable store before powering on.
    pub recovery: bool,
    /// The first boot's entry regardless of what the device's variables say: `Recovery`
    /// writes the one-shot, `Normal` removes a pending one (tests of the normal init's own
    /// guards, e.g. against a pending factory wipe). `recovery` wins. Later boots are the
    /// bootloader's.
    pub first_boot: Option<BootTarget>,
    /// Extra options for our programs (e.g. `nexus.selftest=1`), on every boot. The boot
    /// entries own the kernel command line, so these travel as a QEMU firmware config file
    /// ([`FW_CFG_CMDLINE`]) that the guest's command-line reader adds; direct boots append
    /// them to the kernel command line.
    pub extra_cmdline: Vec<String>,
    /// Keep kernel messages off the console (`quiet`; direct boots — the entries say `quiet`).
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
    /// The firmware and the device's variable store: every run with a slot disk boots
    /// through it and the disk's own bootloader. `None` (or no `disk_img`): a direct boot of
    /// the kernel and the initramfs of `first_boot` / `recovery`, one boot only.
    pub uefi: Option<Uefi>,
    /// Disks served over NBD instead of opened as files: `("state" | "disk" | "vars", unix
    /// socket)` (the crash simulator records every write and flush this way; `vars` is the
    /// UEFI variable store's pflash, whose file must still exist at `uefi.vars`).
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
            kernel: build_dir.join("kernel/vmlinuz"),
            recovery_initrd: build_dir.join("recovery/initrd.cpio"),
            normal_initrd: build_dir.join("initrd.cpio"),
            state_img: Some(build_dir.join("state.img")),
            disk_img: Some(build_dir.join("disk.img")),
            uart: Some(run_dir.join(nx_contract::ports::UART.socket)),
            uart_pty: false,
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
            uefi: Some(Uefi::ovmf(build_dir.join("ovmf-vars.fd"))),
        }
    }

    /// A new device's NVRAM at `vars`: any old file there is removed, so the runner starts
    /// from OVMF's empty template (same inputs, same boot).
    pub fn fresh_vars(&mut self, vars: PathBuf) {
        let _ = std::fs::remove_file(&vars);
        self.uefi = Some(Uefi::ovmf(vars));
    }

    /// Whether this run boots through the firmware and the disk's bootloader.
    pub fn boots_uefi(&self) -> bool {
        self.uefi.is_some() && self.disk_img.is_some()
    }

    /// The first boot's one-shot entry: `Some(Some(entry))` sets it, `Some(None)` removes a
    /// pending one, `None` leaves the variables as they are.
    pub fn first_oneshot(&self) -> Option<Option<&'static str>> {
        const RECOVERY_CONF: &str = "recovery.conf";
        if self.recovery {
            return Some(Some(RECOVERY_CONF));
        }
        match self.first_boot {
            Some(BootTarget::Recovery) => Some(Some(RECOVERY_CONF)),
            Some(BootTarget::Normal) => Some(None),
            None => None,
        }
    }

    /// The target of a direct boot (no firmware).
    pub fn direct_target(&self) -> BootTarget {
        if self.recovery {
            BootTarget::Recovery
        } else {
            self.first_boot.unwrap_or(BootTarget::Normal)
        }
    }

    /// Move the run dir (console log, sockets) to `dir`: every port's socket and the UART's
    /// socket follow it (kept under their file names), so nothing is left under the default
    /// run dir (which may not exist).
    pub fn move_run_dir(&mut self, dir: PathBuf) {
        for p in &mut self.ports {
            p.socket = dir.join(p.socket.file_name().unwrap_or_default());
        }
        if let Some(u) = &mut self.uart {
            *u = dir.join(u.file_name().unwrap_or_default());
        }
        self.run_dir = dir;
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

    /// The kernel command line of a direct boot of `target` (the boot entries' options: the
    /// contract's [`nx_contract::loader::BASE_OPTIONS`] and the target's words).
    pub fn cmdline(&self, target: BootTarget) -> String {
        use nx_contract::loader;
        let mut words: Vec<String> = loader::BASE_OPTIONS
            .split_whitespace()
            .filter(|w| self.quiet || *w != "quiet")
            .map(str::to_string)
            .collect();
        let extra = match target {
            BootTarget::Recovery => loader::RECOVERY_OPTIONS,
            BootTarget::Normal => loader::NORMAL_OPTIONS,
        };
        words.extend(extra.split_whitespace().map(str::to_string));
        words.extend(self.extra_cmdline.iter().cloned());
        words.join(" ")
    }

    /// The full QEMU argument list.
    pub fn qemu_args(&self) -> Vec<OsString> {
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
        for s in ["-nodefaults", "-no-user-config", "-display", "none"] {
            push(s);
        }
        if !self.boots_uefi() {
            // A direct boot has no firmware to come back to: a reboot ends the run.
            push("-no-reboot");
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
        if let Some(sock) = &self.uart {
            // After the console's -serial: this one is ttyS1.
            push("-chardev");
            if self.uart_pty {
                push(&format!("pty,id={UART_CHARDEV}"));
            } else {
                push(&format!(
                    "socket,id={UART_CHARDEV},server=on,wait=off,path={}",
                    sock.display()
                ));
            }
            push("-serial");
            push(&format!("chardev:{UART_CHARDEV}"));
        }
        match (&self.uefi, self.boots_uefi()) {
            (Some(u), true) => {
                let mut code = OsString::from("if=pflash,format=raw,readonly=on,file=");
                code.push(u.code.as_os_str());
                // The variable store over NBD when asked (the crash simulator records NVRAM
                // writes too); otherwise the file itself.
                let vars = match self.nbd.iter().find(|(d, _)| d == "vars") {
                    Some((_, sock)) => {
                        let mut v = OsString::from(
                            "if=pflash,format=raw,file.driver=nbd,file.server.type=unix,\
                             file.server.path=",
                        );
                        v.push(sock.as_os_str());
                        v
                    }
                    None => {
                        let mut v = OsString::from("if=pflash,format=raw,file=");
                        v.push(u.vars.as_os_str());
                        v
                    }
                };
                for d in [code, vars] {
                    a.push("-drive".into());
                    a.push(d);
                }
                if !self.extra_cmdline.is_empty() {
                    a.push("-fw_cfg".into());
                    a.push(
                        format!(
                            "name={FW_CFG_CMDLINE},string={}",
                            self.extra_cmdline.join(" ").replace(',', ",,")
                        )
                        .into(),
                    );
                }
            }
            _ => {
                let target = self.direct_target();
                push("-kernel");
                a.push(self.kernel.clone().into_os_string());
                a.push("-initrd".into());
                let initrd = match target {
                    BootTarget::Recovery => &self.recovery_initrd,
                    BootTarget::Normal => &self.normal_initrd,
                };
                a.push(initrd.clone().into_os_string());
                a.push("-append".into());
                a.push(self.cmdline(target).into());
            }
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
        // The slot disk first: the firmware tries the disks in order, and only it has an ESP.
        for (id, img) in [("disk", &self.disk_img), ("state", &self.state_img)] {
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
                // bootindex: the firmware boots the slot disk first whatever boot order its
                // variables remember from other runs.
                // (A direct boot has its own boot device, the -kernel option ROM.)
                let boot = if id == "disk" && self.boots_uefi() {
                    ",bootindex=0"
                } else {
                    ""
                };
                a.push(format!("virtio-blk-pci,drive={id},serial=nexus-{id}{boot}").into());
            }
        }
        a
    }

    /// Check the files a run needs.
    pub fn check(&self) -> Result<(), Error> {
        let uefi = self.boots_uefi();
        if let (Some(u), true) = (&self.uefi, uefi) {
            if !u.code.exists() {
                return Err(Error::Missing {
                    what: "UEFI firmware (apt-get install -y ovmf)",
                    path: u.code.clone(),
                });
            }
        }
        let direct = (!uefi).then_some(());
        let need = [
            ("kernel", direct.map(|_| &self.kernel)),
            ("recovery ramdisk", direct.map(|_| &self.recovery_initrd)),
            ("normal initramfs", direct.map(|_| &self.normal_initrd)),
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

/// The one plain `qemu-system-x86_64` command that boots a device with no runner at all
/// (docs/runner/boot.md shows it with `my-vars.fd`, `build/disk.img`, `build/state.img`; a
/// test checks the doc and this agree, and the e2e `update` scenario boots the flashed disk
/// with it).
pub fn plain_args(vars: &str, disk: &str, state: &str) -> Vec<String> {
    [
        "-machine",
        "q35,accel=tcg",
        "-cpu",
        "max",
        "-m",
        "1024",
        "-smp",
        "2",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-drive",
        &format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"),
        "-drive",
        &format!("if=pflash,format=raw,file={vars}"),
        "-drive",
        &format!("file={disk},if=none,id=disk,format=raw"),
        "-device",
        "virtio-blk-pci,drive=disk,bootindex=0",
        "-drive",
        &format!("file={state},if=virtio,format=raw"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// QEMU's chardev id of the second 16550 (the label in `char device redirected to … (label
/// uart1)`).
pub const UART_CHARDEV: &str = "uart1";

/// The pseudo-terminal of a `char device redirected to /dev/pts/N (label uart1)` console line.
pub fn uart_pty_of_line(line: &str) -> Option<PathBuf> {
    let rest = line.split("char device redirected to ").nth(1)?;
    let (path, label) = rest.split_once(" (label ")?;
    (label.trim_end().trim_end_matches(')') == UART_CHARDEV && path.starts_with("/dev/"))
        .then(|| PathBuf::from(path))
}

/// The QEMU firmware config file that carries [`Config::extra_cmdline`] to the guest
/// (`/sys/firmware/qemu_fw_cfg/by_name/<this>/raw`, read by `nx_guest::cmdline`).
pub const FW_CFG_CMDLINE: &str = nx_contract::loader::FW_CFG_CMDLINE;

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

    #[test]
    fn moving_the_run_dir_moves_every_socket() {
        let mut c = Config::new(Path::new("/b"));
        assert!(c.uart.as_ref().unwrap().starts_with("/b/qemu"));
        c.move_run_dir(PathBuf::from("/x/run"));
        assert_eq!(c.run_dir, PathBuf::from("/x/run"));
        assert_eq!(
            c.uart.as_deref(),
            Some(
                Path::new("/x/run")
                    .join(nx_contract::ports::UART.socket)
                    .as_path()
            )
        );
        assert!(!c.ports.is_empty());
        for p in &c.ports {
            assert_eq!(p.socket.parent(), Some(Path::new("/x/run")), "{p:?}");
        }
        let joined = args(&c).join(" ");
        assert!(!joined.contains("/b/qemu/"), "{joined}");
    }

    fn args(c: &Config) -> Vec<String> {
        c.qemu_args()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn a_direct_boot_without_a_slot_disk() {
        let mut c = Config::new(Path::new("/b"));
        c.disk_img = None;
        c.recovery = true;
        c.extra_cmdline.push("nexus.selftest=1".into());
        let a = args(&c);
        let joined = a.join(" ");
        assert!(joined.contains("-machine q35,accel=tcg -cpu max"));
        assert!(joined.contains("-no-reboot"));
        assert!(!joined.contains("pflash"));
        assert!(joined.contains("-initrd /b/recovery/initrd.cpio"));
        assert!(joined.contains("path=/b/qemu/flash.sock"));
        assert!(
            joined.contains("virtserialport,bus=vser0.0,nr=1,chardev=port0,name=com.nexus.flash")
        );
        assert!(joined.contains("name=com.nexus.reboot"));
        let console = joined.find("-serial chardev:con0").unwrap();
        let uart = joined
            .find("-chardev socket,id=uart1,server=on,wait=off,path=/b/qemu/uart.sock -serial chardev:uart1")
            .unwrap();
        assert!(console < uart, "the console must stay ttyS0");
        assert_eq!(
            uart_pty_of_line("char device redirected to /dev/pts/7 (label uart1)"),
            Some(PathBuf::from("/dev/pts/7"))
        );
        assert_eq!(
            uart_pty_of_line("char device redirected to /dev/pts/7 (label other)"),
            None
        );
        assert!(joined.contains("file=/b/state.img"));
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "console=ttyS0 panic=-1 rdinit=/init quiet recovery=1 nexus.target=recovery nexus.selftest=1"
        );
        // A direct boot with the slot disk attached (the bench): no bootindex beside -kernel.
        let mut d = Config::new(Path::new("/b"));
        d.uefi = None;
        let j = args(&d).join(" ");
        assert!(j.contains("-kernel") && !j.contains("bootindex"), "{j}");
        c.recovery = false;
        let a = args(&c);
        assert!(a.iter().any(|x| x == "/b/initrd.cpio"));
        assert!(!a.join(" ").contains("recovery=1"));
        c.state_img = None;
        assert!(!args(&c).join(" ").contains("state.img"));
    }

    #[test]
    fn with_a_slot_disk_the_firmware_boots_it() {
        let mut c = Config::new(Path::new("/b"));
        c.uefi = Some(Uefi::ovmf(PathBuf::from("/r/vars.fd")));
        c.recovery = true;
        c.extra_cmdline.push("nexus.selftest=1".into());
        let a = args(&c).join(" ");
        assert!(a.contains("-drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd -drive if=pflash,format=raw,file=/r/vars.fd"), "{a}");
        assert!(
            !a.contains("-kernel") && !a.contains("-append") && !a.contains("-no-reboot"),
            "{a}"
        );
        assert!(
            a.contains("-fw_cfg name=opt/com.nexus/cmdline,string=nexus.selftest=1"),
            "{a}"
        );
        // The slot disk is the first disk (the firmware tries disks in order).
        assert!(
            a.find("id=disk").unwrap() < a.find("id=state").unwrap(),
            "{a}"
        );
        assert_eq!(c.first_oneshot(), Some(Some("recovery.conf")));
        c.recovery = false;
        assert_eq!(c.first_oneshot(), None);
        c.first_boot = Some(BootTarget::Normal);
        assert_eq!(c.first_oneshot(), Some(None));
    }

    /// docs/runner/boot.md shows exactly [`plain_args`].
    #[test]
    fn the_documented_plain_command_is_plain_args() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/runner/boot.md"),
        )
        .unwrap();
        let start = doc.find("qemu-system-x86_64 -machine").unwrap();
        let block = &doc[start..];
        let block = &block[..block.find("```").unwrap()];
        let words: Vec<&str> = block
            .split_whitespace()
            .filter(|w| *w != "\\")
            .skip(1)
            .collect();
        assert_eq!(
            words,
            plain_args("my-vars.fd", "build/disk.img", "build/state.img"),
            "docs/runner/boot.md's plain command and nx_qemu::plain_args differ"
        );
    }

    #[test]
    fn a_disk_over_nbd() {
        let mut c = Config::new(Path::new("/b"));
        c.nbd.push(("disk".into(), PathBuf::from("/r/disk.nbd")));
        let a = args(&c).join(" ");
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
    fn the_variable_store_over_nbd() {
        let mut c = Config::new(Path::new("/b"));
        let plain = args(&c).join(" ");
        assert!(
            plain.contains("if=pflash,format=raw,file=/b/ovmf-vars.fd"),
            "{plain}"
        );
        c.nbd.push(("vars".into(), PathBuf::from("/r/vars.nbd")));
        let a = args(&c).join(" ");
        assert!(
            a.contains("if=pflash,format=raw,file.driver=nbd,file.server.type=unix,file.server.path=/r/vars.nbd"),
            "{a}"
        );
        assert!(!a.contains("file=/b/ovmf-vars.fd"), "{a}");
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
