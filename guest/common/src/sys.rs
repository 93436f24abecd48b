//! PID 1 system helpers: early mounts, signal set-up, reaping, final shutdown.
//!
//! Contract for PID 1 (both inits; rebootd and recovery-sh rely on it, busybox convention):
//! `SIGTERM` (and `SIGINT`, Ctrl-Alt-Del) = sync, unmount, reboot; `SIGUSR2` (and `SIGUSR1`,
//! "halt", which would only hang a VM) = sync, unmount, power off.

use crate::{Error, Result};
use rustix::mount::{MountFlags, UnmountFlags};
use std::path::Path;
use std::time::Duration;

/// What PID 1 does at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Reboot,
    Poweroff,
}

impl Shutdown {
    /// `"reboot"` / `"poweroff"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Shutdown::Reboot => "reboot",
            Shutdown::Poweroff => "poweroff",
        }
    }

    /// The action a signal to PID 1 asks for, if any.
    pub fn from_signal(sig: i32) -> Option<Self> {
        match sig {
            libc::SIGTERM | libc::SIGINT => Some(Shutdown::Reboot),
            libc::SIGUSR1 | libc::SIGUSR2 => Some(Shutdown::Poweroff),
            _ => None,
        }
    }
}

/// The signals PID 1 takes synchronously with [`wait_signal`].
pub const PID1_SIGNALS: [i32; 6] = [
    libc::SIGCHLD,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGHUP,
];

/// `mkdir -p`.
pub fn mkdir_p(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io("create", path, e))
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MountFlags,
    data: Option<&std::ffi::CStr>,
) -> Result<()> {
    mkdir_p(Path::new(target))?;
    match rustix::mount::mount(source, target, fstype, flags, data) {
        Ok(()) | Err(rustix::io::Errno::BUSY) => Ok(()),
        Err(e) => Err(Error::Sys {
            what: format!("mount {fstype} on {target}"),
            source: e.into(),
        }),
    }
}

/// Mount `/proc`, `/sys`, `/dev` (devtmpfs), `/run` and `/tmp` (tmpfs).
pub fn mount_early() -> Result<()> {
    let nosuid_nodev_noexec = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid_nodev_noexec, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MountFlags::NOSUID,
        Some(c"mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(c"mode=0755"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV,
        Some(c"mode=1777"),
    )?;
    Ok(())
}

extern "C" fn noop_handler(_sig: libc::c_int) {}

fn sigset(signals: &[i32]) -> Result<libc::sigset_t> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set it is given.
    if unsafe { libc::sigemptyset(set.as_mut_ptr()) } != 0 {
        return Err(Error::Sys {
            what: "sigemptyset".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: initialised by sigemptyset above.
    let mut set = unsafe { set.assume_init() };
    for &s in signals {
        // SAFETY: `set` is a valid, initialised sigset_t.
        if unsafe { libc::sigaddset(&mut set, s) } != 0 {
            return Err(Error::Sys {
                what: format!("sigaddset {s}"),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(set)
}

/// Install no-op handlers (so the kernel queues them for PID 1, which ignores signals that
/// have no handler) and block `signals`, to be taken with [`wait_signal`]. Handlers reset to
/// the default on `execve`, but the mask does not: children must call
/// [`unblock_all_signals`] before exec (the supervisor does).
pub fn block_signals(signals: &[i32]) -> Result<()> {
    for &s in signals {
        // SAFETY: installing a handler that does nothing is async-signal-safe.
        let old = unsafe {
            libc::signal(
                s,
                noop_handler as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
        if old == libc::SIG_ERR {
            return Err(Error::Sys {
                what: format!("signal {s}"),
                source: std::io::Error::last_os_error(),
            });
        }
    }
    let set = sigset(signals)?;
    // SAFETY: valid set pointer; old mask not requested.
    let rc = unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(Error::Sys {
            what: "sigprocmask".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Empty this thread's signal mask. Used between fork and exec of every child of PID 1: the
/// mask is inherited across `execve`, and a service with SIGTERM blocked would ignore the
/// shutdown request. Async-signal-safe (no allocation, only `sigemptyset`/`sigprocmask`).
pub fn unblock_all_signals() -> std::io::Result<()> {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigprocmask reads it.
    let rc = unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Wait up to `timeout` for one of the blocked `signals`; `Ok(None)` on timeout.
pub fn wait_signal(signals: &[i32], timeout: Duration) -> Result<Option<i32>> {
    let set = sigset(signals)?;
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
    };
    // SAFETY: valid set and timespec; siginfo not requested.
    let rc = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &ts) };
    if rc >= 0 {
        return Ok(Some(rc));
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
        _ => Err(Error::Sys {
            what: "sigtimedwait".into(),
            source: err,
        }),
    }
}

/// Reap every exited child without blocking: `(pid, exit description)`.
pub fn reap() -> Vec<(i32, String)> {
    let mut out = Vec::new();
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: plain waitpid with a valid status pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        let what = if libc::WIFEXITED(status) {
            format!("exit {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("signal {}", libc::WTERMSIG(status))
        } else {
            format!("status {status}")
        };
        out.push((pid, what));
    }
    out
}

/// Send `sig` to every process but PID 1 (`kill(-1, sig)`). ESRCH (none left) is fine.
pub fn kill_all(sig: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    let _ = unsafe { libc::kill(-1, sig) };
}

/// Ask PID 1 for a reboot or power-off (what recovery-sh and rebootd do).
pub fn request_pid1(action: Shutdown) -> Result<()> {
    let sig = match action {
        Shutdown::Reboot => libc::SIGTERM,
        Shutdown::Poweroff => libc::SIGUSR2,
    };
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(1, sig) } != 0 {
        return Err(Error::Sys {
            what: format!("kill(1, {sig})"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The end of PID 1: stop every process (TERM, up to `grace`, then KILL), sync, unmount
/// `/state`, sync again and `reboot(2)`. Returns only if the final syscall fails.
pub fn shutdown(action: Shutdown, grace: Duration) -> Error {
    kill_all(libc::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        let _ = reap();
        if !any_children() {
            break;
        }
        let _ = wait_signal(&[libc::SIGCHLD], Duration::from_millis(50));
    }
    let left = survivors();
    if !left.is_empty() {
        crate::marker::show(&nx_contract::markers::pid1::shutdown_killing(
            grace.as_millis(),
            &left,
        ));
    }
    kill_all(libc::SIGKILL);
    // Give the kernel a moment to deliver SIGKILL, then reap what is left.
    for _ in 0..20 {
        let _ = reap();
        if !any_children() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    rustix::fs::sync();
    if Path::new(crate::state::STATE_MOUNT).exists() {
        if let Err(e) = rustix::mount::unmount(crate::state::STATE_MOUNT, UnmountFlags::empty()) {
            if e != rustix::io::Errno::INVAL {
                // Busy or worse: make it read-only so the journal is clean, then detach.
                let _ =
                    rustix::mount::mount_remount(crate::state::STATE_MOUNT, MountFlags::RDONLY, "");
                let _ = rustix::mount::unmount(crate::state::STATE_MOUNT, UnmountFlags::DETACH);
            }
        }
    }
    rustix::fs::sync();
    let cmd = match action {
        Shutdown::Reboot => rustix::system::RebootCommand::Restart,
        Shutdown::Poweroff => rustix::system::RebootCommand::PowerOff,
    };
    match rustix::system::reboot(cmd) {
        Ok(()) => Error::Invalid {
            what: "reboot(2)",
            value: "returned".into(),
        },
        Err(e) => Error::Sys {
            what: format!("reboot(2) {}", action.as_str()),
            source: e.into(),
        },
    }
}

/// `name(pid)` of every child of PID 1 still around (for the shutdown report).
fn survivors() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = crate::bounded::read_string(&e.path().join("stat"), 4096) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces, so split at the last ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map(|(_, c)| c).unwrap_or("?");
        let ppid = tail.split_whitespace().nth(1);
        if ppid == Some("1") {
            out.push(format!("{comm}({pid})"));
        }
    }
    out.sort();
    out
}

fn any_children() -> bool {
    // SAFETY: waitpid with WNOHANG|WNOWAIT only peeks.
    let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
    let rc = unsafe {
        libc::waitid(
            libc::P_ALL,
            0,
            info.as_mut_ptr(),
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    // ECHILD (rc = -1) means no children at all.
    rc == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_contract() {
        assert_eq!(Shutdown::from_signal(libc::SIGTERM), Some(Shutdown::Reboot));
        assert_eq!(
            Shutdown::from_signal(libc::SIGUSR2),
            Some(Shutdown::Poweroff)
        );
        assert_eq!(Shutdown::from_signal(libc::SIGCHLD), None);
    }
}
