//! recovery-init — PID 1 of the recovery ramdisk, the one recovery authority.
//!
//! Boot: mount proc/sys/devtmpfs/tmpfs, load the modules baked into the ramdisk, mount
//! `/state` by label, perform a pending factory wipe ([`wipe_at_boot`], before any service
//! runs), select the target, start the minimal service graph (flashd, and rebootd / bootctld
//! when the ramdisk has them), wait for the flash port, start `recovery-sh` on ttyS0, then reap
//! and supervise until a shutdown signal (see `nx_guest::sys` for the PID 1 signal contract).
//! Markers, exact and in order:
//! `recovery: boot target selected`, `recovery: init start`, `recovery: services ready`,
//! `recovery: ready (serial=@/dev/vport0p1)`, then — when the guest has the flashing UART
//! (`nx_contract::ports::UART`, which flashd also serves) — `recovery: ready
//! (serial=@/dev/ttyS1)`, and `recovery: shell ready` (printed by recovery-sh).
//!
//! After a completed factory wipe (`nx: reset factory wipe start` … `nx: reset factory wipe
//! done`) recovery-init does not start the shell: it asks rebootd — the one reboot authority —
//! for a normal boot ([`reboot_normal_after_wipe`]). A failed wipe keeps the guest in recovery
//! (the request stays, so neither the boot firmware nor the normal init boots normal).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use nx_contract::loader::{MAX_VERIFY_THREADS, VERIFY_THREADS_OPTION};
use nx_contract::{markers, ports, Marker, NextBoot};
use nx_guest::cmdline::Cmdline;
use nx_guest::supervisor::Service;
use nx_reset::{WipeOutcome, WipeReport};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
pub fn select_target(cmdline: &Cmdline, record: Option<NextBoot>) -> (NextBoot, Reason) {
    if let Some(t) = cmdline.get("nexus.target").and_then(NextBoot::parse_record) {
        return (t, Reason::CmdlineTarget);
    }
    if cmdline.flag("recovery") {
        return (NextBoot::Recovery, Reason::RecoveryFlag);
    }
    if let Some(r) = record {
        return (r, Reason::NextBootRecord);
    }
    (NextBoot::Recovery, Reason::Default)
}

/// flashd's `--verify-threads` from the kernel command line ([`VERIFY_THREADS_OPTION`]):
/// `Ok(None)` when the word is absent, `Ok(Some(n))` for `0..=`[`MAX_VERIFY_THREADS`], `Err`
/// (the value and why) for anything else — then flashd keeps its default and the caller logs it.
pub fn verify_threads(cmdline: &Cmdline) -> Result<Option<u32>, (String, String)> {
    let Some(v) = cmdline.get(VERIFY_THREADS_OPTION) else {
        return Ok(None);
    };
    let bad = |why: String| Err((v.to_string(), why));
    if v.is_empty() || v.len() > 3 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return bad(format!("not a number 0..={MAX_VERIFY_THREADS}"));
    }
    match v.parse::<u32>() {
        Ok(n) if n <= MAX_VERIFY_THREADS => Ok(Some(n)),
        _ => bad(format!("not a number 0..={MAX_VERIFY_THREADS}")),
    }
}

/// The minimal service graph. `present(path)` tells whether a binary is in the ramdisk.
/// flashd is always part of it, serving the virtio-serial flash port and the UART `/dev/ttyS1`
/// (one link at a time; without a UART it serves the port alone), installing into the inactive A/B slot (`--install-slot auto`:
/// bootctld at /run/bootctld.sock picks the slot; after a verified install flashd activates it
/// on trial and rebootd reboots into it); without /state it refuses with its own
/// stub/placeholder marker; rebootd and bootctld only when present; selftest-client only with
/// `nexus.selftest=1`. A valid `nexus.verify_threads=N` ([`verify_threads`]) adds
/// `--verify-threads N` to flashd's arguments.
pub fn services(cmdline: &Cmdline, present: &dyn Fn(&str) -> bool) -> Vec<Service> {
    let mut flashd = Service::daemon(
        "flashd",
        FLASHD,
        &[
            "--port-name",
            ports::FLASH.name,
            "--uart",
            ports::UART.device,
            "--state",
            nx_contract::state::STATE_MOUNT,
            "--install-slot",
            "auto",
        ],
    );
    if let Ok(Some(n)) = verify_threads(cmdline) {
        flashd.args.push("--verify-threads".into());
        flashd.args.push(n.to_string());
    }
    let mut out = vec![flashd];
    if present("/bin/rebootd") {
        out.push(Service::rebootd(std::path::Path::new("/bin"), REBOOTD_SOCK));
    }
    if present("/bin/bootctld") {
        out.push(Service::bootctld(
            std::path::Path::new("/bin"),
            BOOTCTLD_SOCK,
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

/// What the boot did about a factory-wipe request (`STATE/boot/factory_wipe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WipeAtBoot {
    /// No usable `/state`: nothing to wipe (and no request can exist).
    NoState,
    /// No request.
    NotRequested,
    /// The request was invalid; it was removed and nothing was wiped.
    InvalidRemoved,
    /// The wipe completed, was synced, and the request is cleared: boot normal next.
    Wiped(WipeReport),
    /// The wipe failed (why). The request stays: stay in recovery, never boot normal.
    Failed(String),
}

/// Run [`nx_reset::wipe`] on `state_root` (a no-op without a request), printing its markers
/// (`nx: reset factory wipe start`, `nx: reset factory wipe done`, …) through `emit`.
/// `state_mounted = false`: there is no persistent `/state`, nothing is touched.
pub fn wipe_at_boot(
    state_root: &Path,
    state_mounted: bool,
    emit: &mut dyn FnMut(&Marker),
) -> WipeAtBoot {
    if !state_mounted {
        return WipeAtBoot::NoState;
    }
    match nx_reset::wipe(state_root, emit) {
        Ok(WipeOutcome::NotRequested) => WipeAtBoot::NotRequested,
        Ok(WipeOutcome::InvalidRequestRemoved { .. }) => WipeAtBoot::InvalidRemoved,
        Ok(WipeOutcome::Wiped(report)) => WipeAtBoot::Wiped(report),
        Err(e) => {
            let why = e.to_string();
            emit(&markers::recovery::wipe_failed(&why));
            WipeAtBoot::Failed(why)
        }
    }
}

/// Whether a valid factory-wipe request is pending on `/state` (the wipe will run, so a power
/// cut during it must bring the device back to recovery).
pub fn rearm_for_wipe(state_root: &Path) -> bool {
    matches!(
        nx_reset::pending(state_root),
        Ok(nx_reset::Pending::Requested { .. })
    )
}

/// How long rebootd gets to accept connections after it was started.
pub const REBOOTD_WAIT: Duration = Duration::from_secs(15);
/// How long the `mode(normal)` call may take.
pub const REBOOTD_CALL: Duration = Duration::from_secs(10);

/// Wait (bounded by `wait`) until the unix socket `sock` accepts a connection.
pub fn wait_accepting(sock: &Path, wait: Duration) -> Result<(), String> {
    nx_guest::unixsock::wait_accepting(sock, wait, Duration::from_millis(20))
        .map_err(|e| format!("{e} (is rebootd running? see its lines above)"))
}

/// After a completed wipe: ask the rebootd at `sock` to persist `next_mode=normal` and
/// reboot (`nx_rpc::reboot::request_mode`, from a current-thread tokio runtime). `Ok(true)`: rebootd
/// is rebooting (SIGTERM to PID 1 follows); `Ok(false)`: it recorded the next boot but cannot
/// reboot here (stub).
pub fn reboot_normal_after_wipe(
    sock: &Path,
    wait: Duration,
    call: Duration,
) -> Result<bool, String> {
    wait_accepting(sock, wait)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))?;
    rt.block_on(nx_rpc::reboot::request_mode(
        sock,
        nx_contract::NextBoot::Normal,
        call,
    ))
    .map_err(|e| format!("rebootd mode(normal) on {}: {e}", sock.display()))
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
            (NextBoot::Recovery, Reason::Default)
        );
        assert_eq!(
            select_target(&c(""), Some(NextBoot::Normal)),
            (NextBoot::Normal, Reason::NextBootRecord)
        );
        assert_eq!(
            select_target(&c("recovery=1"), Some(NextBoot::Normal)),
            (NextBoot::Recovery, Reason::RecoveryFlag)
        );
        assert_eq!(
            select_target(&c("recovery=1 nexus.target=recovery"), None),
            (NextBoot::Recovery, Reason::CmdlineTarget)
        );
        assert_eq!(
            select_target(&c("nexus.target=bogus"), Some(NextBoot::Recovery)),
            (NextBoot::Recovery, Reason::NextBootRecord)
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
                "--uart",
                "/dev/ttyS1",
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
                "/run/rebootd.sock",
                "--efivars",
                "/sys/firmware/efi/efivars"
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
                "/run/bootctld.sock",
                "--esp",
                "/boot/efi",
                "--efivars",
                "/sys/firmware/efi/efivars"
            ]
        );
        let names: Vec<_> = services(&Cmdline::parse("nexus.selftest=1"), &all)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["flashd", "rebootd", "bootctld", "selftest-client"]);
        assert_eq!(
            markers::recovery::ready("/dev/vport0p1").as_str(),
            "recovery: ready (serial=@/dev/vport0p1)"
        );
    }

    #[test]
    fn verify_threads_from_the_command_line() {
        let c = Cmdline::parse;
        assert_eq!(verify_threads(&c("")), Ok(None));
        assert_eq!(verify_threads(&c("nexus.verify_threads=1")), Ok(Some(1)));
        assert_eq!(verify_threads(&c("nexus.verify_threads=0")), Ok(Some(0)));
        assert_eq!(verify_threads(&c("nexus.verify_threads=4")), Ok(Some(4)));
        // The last word wins, as for every key.
        assert_eq!(
            verify_threads(&c("nexus.verify_threads=4 nexus.verify_threads=2")),
            Ok(Some(2))
        );
        // (`= 1` splits into an empty value and a word `1`.)
        for (word, value) in [
            ("5", "5"),
            ("-1", "-1"),
            ("+1", "+1"),
            ("x", "x"),
            ("1x", "1x"),
            ("", ""),
            ("99999999999", "99999999999"),
            (" 1", ""),
        ] {
            let got = verify_threads(&c(&format!("nexus.verify_threads={word}")));
            let Err((v, why)) = got else {
                panic!("{word:?} accepted: {got:?}")
            };
            assert_eq!(v, value);
            assert!(why.contains("0..=4"), "{why}");
        }
        // A bare word (no value) is not a value.
        assert_eq!(verify_threads(&c("nexus.verify_threads")), Ok(None));

        let all = |_: &str| true;
        let flashd = |s: &str| services(&c(s), &all).remove(0).args;
        let plain = flashd("");
        assert!(!plain.iter().any(|a| a == "--verify-threads"));
        let one = flashd("quiet nexus.verify_threads=1");
        assert_eq!(&one[..plain.len()], &plain[..]);
        assert_eq!(&one[plain.len()..], ["--verify-threads", "1"]);
        // Invalid: ignored, flashd keeps its default (the caller logs it).
        assert_eq!(flashd("nexus.verify_threads=lots"), plain);
        assert_eq!(
            markers::recovery::verify_threads(1).as_str(),
            "recovery: flashd --verify-threads 1 (kernel command line nexus.verify_threads=1)"
        );
    }

    fn seed(root: &Path) {
        for d in nx_guest::state::STATE_DIRS {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::create_dir_all(root.join("apps/com.example/db")).unwrap();
        std::fs::write(root.join("apps/com.example/db/notes.db"), b"notes").unwrap();
        std::fs::write(root.join("content/a.jpg"), vec![7u8; 1234]).unwrap();
        std::fs::write(root.join("settings/locale"), b"en_US\n").unwrap();
        std::fs::write(root.join("trust/root.pub"), b"trust me").unwrap();
        std::os::unix::fs::symlink("../trust/root.pub", root.join("settings/key-link")).unwrap();
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn wipe_at_boot_runs_the_requested_wipe_only() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        seed(root);
        let mut lines = Vec::new();
        // Without a mounted /state nothing is touched, even with a request.
        std::fs::write(root.join(nx_reset::REQUEST), nx_reset::REQUEST_CONTENT).unwrap();
        assert_eq!(
            wipe_at_boot(root, false, &mut |l| lines.push(l.to_string())),
            WipeAtBoot::NoState
        );
        assert!(lines.is_empty());
        assert_eq!(listing(&root.join("content")), ["a.jpg"]);
        // With the request: wiped, markers in order, trust untouched, request gone.
        let out = wipe_at_boot(root, true, &mut |l| lines.push(l.to_string()));
        let WipeAtBoot::Wiped(report) = out else {
            panic!("{out:?}")
        };
        assert_eq!(report.attempt, 1);
        assert_eq!(
            lines.first().map(String::as_str),
            Some(markers::reset::wipe_start().as_str())
        );
        assert_eq!(
            lines.last().map(String::as_str),
            Some(markers::reset::wipe_done().as_str())
        );
        for t in nx_contract::reset_plan::WIPED {
            assert!(listing(&root.join(t)).is_empty(), "{t}");
        }
        assert_eq!(
            std::fs::read(root.join("trust/root.pub")).unwrap(),
            b"trust me"
        );
        assert!(!root.join(nx_reset::REQUEST).exists());
        // No request: nothing happens.
        lines.clear();
        assert_eq!(
            wipe_at_boot(root, true, &mut |l| lines.push(l.to_string())),
            WipeAtBoot::NotRequested
        );
        assert!(lines.is_empty());
        // An invalid request is removed, nothing is wiped.
        std::fs::write(root.join("content/b"), b"b").unwrap();
        std::fs::write(root.join(nx_reset::REQUEST), b"please\n").unwrap();
        assert_eq!(
            wipe_at_boot(root, true, &mut |l| lines.push(l.to_string())),
            WipeAtBoot::InvalidRemoved
        );
        assert_eq!(listing(&root.join("content")), ["b"]);
        assert!(!root.join(nx_reset::REQUEST).exists());
    }

    #[test]
    fn a_failed_wipe_keeps_the_request() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        seed(root);
        std::fs::write(root.join(nx_reset::REQUEST), nx_reset::REQUEST_CONTENT).unwrap();
        // A non-empty directory where the wipe journal goes: writing the journal (rename
        // over it) fails even for root, before anything is removed.
        std::fs::create_dir_all(root.join(nx_reset::JOURNAL).join("x")).unwrap();
        let mut lines = Vec::new();
        let out = wipe_at_boot(root, true, &mut |l| lines.push(l.to_string()));
        assert!(matches!(out, WipeAtBoot::Failed(_)), "{out:?}");
        assert!(root.join(nx_reset::REQUEST).exists());
        assert!(lines
            .iter()
            .any(|l| l.starts_with("recovery: error: factory wipe failed")));
        assert!(!lines
            .iter()
            .any(|l| l == markers::reset::wipe_done().as_str()));
        assert_eq!(listing(&root.join("content")), ["a.jpg"]);
    }

    #[test]
    fn after_the_wipe_rebootd_records_a_normal_boot() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        seed(&state);
        let sock = d.path().join("rebootd.sock");
        let config = rebootd::Config {
            state: Some(state.clone()),
            require_mountpoint: false,
            endpoints: vec![rebootd::Endpoint::Unix(sock.clone())],
            reboot_method: rebootd::pid1::MethodArg::Stub,
        };
        let (tx, rx) = futures::channel::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let run = std::pin::pin!(rebootd::run(config));
                let _ = futures::future::select(run, rx).await;
            });
        });
        // The socket appears later than we start waiting (rebootd starts with us).
        let rebooting =
            reboot_normal_after_wipe(&sock, Duration::from_secs(10), Duration::from_secs(10));
        let _ = tx.send(());
        server.join().unwrap();
        // Stub reboot method: recorded, not rebooting.
        assert_eq!(rebooting, Ok(false));
        assert_eq!(
            std::fs::read(state.join("boot/next_mode")).unwrap(),
            b"normal\n"
        );
        // Nobody listening: a clear error within the bound.
        let e = reboot_normal_after_wipe(
            &d.path().join("none.sock"),
            Duration::from_millis(100),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(e.contains("did not accept a connection"), "{e}");
    }
}
