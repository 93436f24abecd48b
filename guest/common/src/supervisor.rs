//! The minimal service supervisor of PID 1: start services, reap every child, restart the
//! ones that exit (with exponential backoff), and turn signals into a shutdown action.

use crate::marker;
use crate::sys::{self, Shutdown, PID1_SIGNALS};
use nx_contract::markers;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// First restart delay; doubles per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Largest restart delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service that ran this long before exiting starts again from the base delay.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// One supervised program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Short name for markers (`flashd`).
    pub name: String,
    /// Absolute path of the binary in the initramfs.
    pub path: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Restart when it exits.
    pub restart: bool,
    /// Device for stdin/stdout/stderr (e.g. `/dev/ttyS0` for a shell); `None` = inherit the
    /// console so its markers land in the console log.
    pub tty: Option<PathBuf>,
}

impl Service {
    /// A restarted service on the console.
    pub fn daemon(name: &str, path: &str, args: &[&str]) -> Self {
        Service {
            name: name.to_string(),
            path: PathBuf::from(path),
            args: args.iter().map(|s| s.to_string()).collect(),
            restart: true,
            tty: None,
        }
    }

    /// bootctld as both inits run it (`/bin/bootctld`): on its virtio-serial port, with the
    /// state mount, listening on the guest-local socket `listen`.
    pub fn bootctld(bin_dir: &Path, listen: &str) -> Self {
        Service::daemon(
            "bootctld",
            &bin_dir.join("bootctld").to_string_lossy(),
            &[
                "--port-name",
                nx_contract::ports::BOOTCTL.name,
                "--state",
                nx_contract::state::STATE_MOUNT,
                "--listen",
                listen,
                "--esp",
                nx_contract::loader::ESP_MOUNT,
                "--efivars",
                crate::efivar::EFIVARFS,
            ],
        )
    }

    /// rebootd as both inits run it (`/bin/rebootd`): on its virtio-serial port, with the
    /// state mount, listening on the guest-local socket `listen`.
    pub fn rebootd(bin_dir: &Path, listen: &str) -> Self {
        Service::daemon(
            "rebootd",
            &bin_dir.join("rebootd").to_string_lossy(),
            &[
                "--port-name",
                nx_contract::ports::REBOOT.name,
                "--state",
                nx_contract::state::STATE_MOUNT,
                "--listen",
                listen,
                "--efivars",
                crate::efivar::EFIVARFS,
            ],
        )
    }
}

/// Delay before the next start after `failures` consecutive failures (1 = first failure).
pub fn backoff(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1u32 << shift).min(BACKOFF_MAX)
}

#[derive(Debug)]
struct Slot {
    svc: Service,
    pid: Option<i32>,
    started: Option<Instant>,
    failures: u32,
    next_start: Option<Instant>,
}

/// PID 1's supervisor. `prefix` starts every line it prints (`recovery`, `init`).
#[derive(Debug)]
pub struct Supervisor {
    prefix: String,
    slots: Vec<Slot>,
}

impl Supervisor {
    /// An empty supervisor.
    pub fn new(prefix: &str) -> Self {
        Supervisor {
            prefix: prefix.to_string(),
            slots: Vec::new(),
        }
    }

    /// Add a service (started by [`Supervisor::start_all`] or the run loop).
    pub fn add(&mut self, svc: Service) {
        self.slots.push(Slot {
            svc,
            pid: None,
            started: None,
            failures: 0,
            next_start: Some(Instant::now()),
        });
    }

    /// Names of the services, in start order.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.svc.name.clone()).collect()
    }

    /// Start every service that is due now. Returns how many are running.
    pub fn start_due(&mut self) -> usize {
        let now = Instant::now();
        let prefix = self.prefix.clone();
        for slot in &mut self.slots {
            if slot.pid.is_none() && slot.next_start.is_some_and(|t| t <= now) {
                slot.next_start = None;
                match spawn(&slot.svc) {
                    Ok(pid) => {
                        slot.pid = Some(pid);
                        slot.started = Some(now);
                    }
                    Err(e) => {
                        slot.failures = slot.failures.saturating_add(1);
                        let delay = backoff(slot.failures);
                        marker::show(&markers::pid1::service_start_failed(
                            &prefix,
                            &slot.svc.name,
                            e,
                            delay.as_millis(),
                        ));
                        if slot.svc.restart {
                            slot.next_start = Some(now + delay);
                        }
                    }
                }
            }
        }
        self.slots.iter().filter(|s| s.pid.is_some()).count()
    }

    fn on_exit(&mut self, pid: i32, what: &str) {
        let now = Instant::now();
        let prefix = self.prefix.clone();
        let Some(slot) = self.slots.iter_mut().find(|s| s.pid == Some(pid)) else {
            return; // an orphan re-parented to PID 1: reaped, nothing to do
        };
        slot.pid = None;
        let ran = slot
            .started
            .map(|t| now.duration_since(t))
            .unwrap_or_default();
        if ran >= HEALTHY_RUN {
            slot.failures = 0;
        }
        slot.failures = slot.failures.saturating_add(1);
        if slot.svc.restart {
            let delay = backoff(slot.failures);
            marker::show(&markers::pid1::service_restarting(
                &prefix,
                &slot.svc.name,
                what,
                delay.as_millis(),
            ));
            slot.next_start = Some(now + delay);
        } else {
            marker::show(&markers::pid1::service_exited(
                &prefix,
                &slot.svc.name,
                what,
            ));
        }
    }

    /// The PID 1 loop: restart services when due, reap children, and return the shutdown
    /// action when a shutdown signal arrives.
    pub fn run(&mut self) -> Shutdown {
        loop {
            self.start_due();
            let now = Instant::now();
            let timeout = self
                .slots
                .iter()
                .filter_map(|s| s.next_start)
                .map(|t| t.saturating_duration_since(now))
                .min()
                .unwrap_or(Duration::from_secs(3600));
            match sys::wait_signal(&PID1_SIGNALS, timeout) {
                Ok(Some(sig)) => {
                    if let Some(action) = Shutdown::from_signal(sig) {
                        for (pid, what) in sys::reap() {
                            self.on_exit(pid, &what);
                        }
                        return action;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    marker::show(&markers::pid1::signal_wait_failed(&self.prefix, e));
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            for (pid, what) in sys::reap() {
                self.on_exit(pid, &what);
            }
        }
    }
}

fn spawn(svc: &Service) -> std::io::Result<i32> {
    let mut cmd = Command::new(&svc.path);
    cmd.args(&svc.args)
        .env_clear()
        .env("PATH", "/bin")
        .current_dir("/");
    if let Some(tty) = &svc.tty {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(tty)?;
        cmd.stdin(Stdio::from(f.try_clone()?))
            .stdout(Stdio::from(f.try_clone()?))
            .stderr(Stdio::from(f));
    }
    // SAFETY: the hook only calls async-signal-safe functions (sigemptyset, sigprocmask).
    unsafe {
        cmd.pre_exec(sys::unblock_all_signals);
    }
    let child = cmd.spawn()?;
    // The child is reaped by the run loop (`waitpid(-1)`), not through `Child`.
    i32::try_from(child.id()).map_err(|_| std::io::Error::other("pid out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(4), Duration::from_secs(2));
        assert_eq!(backoff(100), BACKOFF_MAX);
    }

    #[test]
    fn missing_binary_is_rescheduled() {
        let mut s = Supervisor::new("test");
        s.add(Service::daemon("nope", "/nonexistent/nope", &[]));
        assert_eq!(s.start_due(), 0);
        assert!(s.slots[0].next_start.is_some());
        assert_eq!(s.slots[0].failures, 1);
        assert_eq!(s.names(), vec!["nope".to_string()]);
    }
}
