//! The running guest: the QEMU process (one per power-on), the watcher thread, console
//! capture, boot counting and marker waits.

use crate::{varstore, BootTarget, Config, Error};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest console line kept (longer lines are split).
const MAX_LINE: usize = 16 * 1024;
/// How long QEMU gets to exit after SIGTERM before SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest powered off.
    PoweredOff,
    /// The guest rebooted and the run does not follow reboots.
    Rebooted,
    /// The caller stopped the run.
    Stopped,
    /// The guest kernel panicked.
    KernelPanic,
    /// More boots than `Config::max_boots`.
    TooManyBoots(u32),
    /// QEMU exited on its own without a guest shutdown (user quit, crash).
    QemuExited(String),
    /// QEMU could not be started.
    SpawnFailed(String),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::PoweredOff => f.write_str("guest powered off"),
            Outcome::Rebooted => f.write_str("guest rebooted"),
            Outcome::Stopped => f.write_str("stopped by the runner"),
            Outcome::KernelPanic => f.write_str("guest kernel panic"),
            Outcome::TooManyBoots(n) => write!(f, "more than {n} boots (reboot loop?)"),
            Outcome::QemuExited(s) => write!(f, "QEMU exited: {s}"),
            Outcome::SpawnFailed(s) => write!(f, "QEMU could not start: {s}"),
        }
    }
}

/// A marker found on the console.
#[derive(Debug, Clone)]
pub struct Hit {
    /// The whole console line.
    pub line: String,
    /// Index of the line in the run's console.
    pub index: usize,
    /// Boot number (1-based) the line belongs to.
    pub boot: u32,
    /// Time from the start of that boot's QEMU to the line.
    pub since_boot: Duration,
}

#[derive(Debug)]
struct Line {
    text: String,
    boot: u32,
    at: Instant,
}

#[derive(Debug)]
struct Boot {
    /// What booted, once the console shows it (`init: start` / `recovery: start`).
    target: Option<BootTarget>,
    started: Instant,
}

/// The firmware hands over to a boot loader: one line per boot (OVMF's boot manager).
pub const FIRMWARE_BOOT_LINE: &str = "BdsDxe: starting ";
/// The runner's note once a boot shows what it started: `[nx-qemu] the bootloader started
/// normal (boot 2)` / `… recovery (boot 3)`.
pub const STARTED_NOTE: &str = "the bootloader started ";
/// The kernel resets the machine (a reboot, or a panic with `panic=-1`).
const RESET_LINES: [&str; 2] = ["reboot: Restarting system", "Kernel panic - not syncing"];

#[derive(Debug, Default)]
struct Inner {
    lines: Vec<Line>,
    partial: Vec<u8>,
    cursor: usize,
    boots: Vec<Boot>,
    finished: Option<Outcome>,
    /// The current QEMU process already showed its first firmware boot line.
    firmware_seen: bool,
    /// Resets seen in the current QEMU process (reboots and panics).
    resets: u32,
    /// A guest reset was seen whose next boot has not started yet.
    reset_pending: bool,
    /// The run boots through the firmware (notes name the bootloader).
    uefi: bool,
}

impl Inner {
    /// Bookkeeping for one finished console line; returns a note for a new boot.
    fn on_line(&mut self, text: &str, now: Instant) -> Option<String> {
        if RESET_LINES.iter().any(|m| text.contains(m)) {
            self.resets += 1;
            self.reset_pending = true;
        }
        let n = self.boots.len();
        if let Some(b) = self.boots.last_mut() {
            if b.target.is_none() {
                if text.starts_with("init: start") {
                    b.target = Some(BootTarget::Normal);
                } else if text.starts_with("recovery: ") {
                    b.target = Some(BootTarget::Recovery);
                }
                if let (Some(t), true) = (b.target, self.uefi) {
                    return Some(format!("{STARTED_NOTE}{t} (boot {n})"));
                }
            }
        }
        if text.contains(FIRMWARE_BOOT_LINE) {
            if !self.firmware_seen {
                self.firmware_seen = true;
                return None;
            }
            self.boots.push(Boot {
                target: None,
                started: now,
            });
            self.reset_pending = false;
            return Some(format!(
                "boot {}: the guest reset; the firmware and the bootloader choose what boots",
                self.boots.len()
            ));
        }
        None
    }
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    cond: Condvar,
    child: Mutex<Option<Child>>,
    stdin: Mutex<Option<ChildStdin>>,
    stop: AtomicBool,
    /// A requested power cycle: `Some(None)` = let the bootloader decide.
    cycle: Mutex<Option<Option<BootTarget>>>,
    log: Mutex<Option<std::fs::File>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn current_boot(&self) -> u32 {
        u32::try_from(lock(&self.inner).boots.len()).unwrap_or(u32::MAX)
    }

    /// Console bytes from QEMU.
    fn feed(&self, bytes: &[u8], echo: bool) {
        if let Some(f) = lock(&self.log).as_mut() {
            let _ = f.write_all(bytes);
        }
        if echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        let now = Instant::now();
        let mut notes = Vec::new();
        let mut inner = lock(&self.inner);
        for &b in bytes {
            let boot = u32::try_from(inner.boots.len()).unwrap_or(u32::MAX);
            match b {
                b'\n' => {
                    let text = String::from_utf8_lossy(&inner.partial)
                        .trim_end_matches('\r')
                        .to_string();
                    inner.partial.clear();
                    let note = inner.on_line(&text, now);
                    let boot = u32::try_from(inner.boots.len()).unwrap_or(u32::MAX);
                    inner.lines.push(Line {
                        text,
                        boot,
                        at: now,
                    });
                    notes.extend(note);
                }
                _ => {
                    inner.partial.push(b);
                    if inner.partial.len() >= MAX_LINE {
                        let text = String::from_utf8_lossy(&inner.partial).into_owned();
                        inner.partial.clear();
                        inner.lines.push(Line {
                            text,
                            boot,
                            at: now,
                        });
                    }
                }
            }
        }
        drop(inner);
        for n in notes {
            self.note(&n, echo);
        }
        self.cond.notify_all();
    }

    /// Flush a partial line (QEMU exited mid-line).
    fn flush_partial(&self) {
        let boot = self.current_boot();
        let mut inner = lock(&self.inner);
        if !inner.partial.is_empty() {
            let text = String::from_utf8_lossy(&inner.partial).into_owned();
            inner.partial.clear();
            inner.lines.push(Line {
                text,
                boot,
                at: Instant::now(),
            });
        }
        drop(inner);
        self.cond.notify_all();
    }

    /// A line from the runner itself (`[nx-qemu] …`), logged and echoed to stderr.
    fn note(&self, msg: &str, echo: bool) {
        let line = format!("[nx-qemu] {msg}");
        if echo {
            eprintln!("{line}");
        }
        if let Some(f) = lock(&self.log).as_mut() {
            let _ = writeln!(f, "{line}");
        }
        let boot = self.current_boot();
        lock(&self.inner).lines.push(Line {
            text: line,
            boot,
            at: Instant::now(),
        });
        self.cond.notify_all();
    }

    fn finish(&self, outcome: Outcome) {
        lock(&self.inner).finished = Some(outcome);
        self.cond.notify_all();
    }

    /// Kill the current QEMU: SIGTERM (lets QEMU restore the terminal) then SIGKILL, or
    /// SIGKILL at once for a power cut.
    fn kill_qemu(&self, hard: bool) {
        let sig = if hard { libc::SIGKILL } else { libc::SIGTERM };
        {
            // Holding the child lock: the firmware thread cannot reap it meanwhile, so the pid
            // is still ours.
            let guard = lock(&self.child);
            let Some(pid) = guard.as_ref().and_then(|c| i32::try_from(c.id()).ok()) else {
                return;
            };
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, sig) };
        }
        if hard {
            return;
        }
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if lock(&self.child).is_none() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(c) = lock(&self.child).as_mut() {
            let _ = c.kill();
        }
    }
}

/// A running guest. Dropping it stops QEMU.
#[derive(Debug)]
pub struct Runner {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    config: Config,
}

impl Runner {
    /// Power the guest on (see the crate docs); with `config.recovery` (or `first_boot`) the
    /// bootloader's one-shot entry is set in the variable store first.
    pub fn start(config: Config) -> Result<Runner, Error> {
        config.check()?;
        std::fs::create_dir_all(&config.run_dir).map_err(|e| {
            Error::Io(nx_contract::PathIoError {
                what: "create",
                path: config.run_dir.clone(),
                source: e,
            })
        })?;
        if let (Some(u), true) = (&config.uefi, config.boots_uefi()) {
            if !u.vars.exists() {
                std::fs::copy(crate::OVMF_VARS, &u.vars).map_err(|e| {
                    Error::Io(nx_contract::PathIoError {
                        what: "create the EFI variable store",
                        path: u.vars.clone(),
                        source: e,
                    })
                })?;
            }
        }
        for p in &config.ports {
            let _ = std::fs::remove_file(&p.socket);
        }
        if let Some(sock) = &config.uart {
            let _ = std::fs::remove_file(sock);
        }
        let log_path = config.console_log();
        let log = std::fs::File::create(&log_path).map_err(|e| {
            Error::Io(nx_contract::PathIoError {
                what: "create",
                path: log_path,
                source: e,
            })
        })?;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            cond: Condvar::new(),
            child: Mutex::new(None),
            stdin: Mutex::new(None),
            stop: AtomicBool::new(false),
            cycle: Mutex::new(None),
            log: Mutex::new(Some(log)),
        });
        let first = power_on_note(&config, config.first_oneshot(), "power on")?;
        let s = Arc::clone(&shared);
        let c = config.clone();
        let thread = std::thread::Builder::new()
            .name("nx-qemu-watch".into())
            .spawn(move || watch(&s, &c, first))
            .map_err(|e| {
                Error::Io(nx_contract::PathIoError {
                    what: "spawn runner thread for",
                    path: config.run_dir.clone(),
                    source: e,
                })
            })?;
        // Wait until QEMU is up (its sockets exist) or the loop ended, so callers can connect.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let up = config.ports.iter().all(|p| p.socket.exists());
            if up || lock(&shared.inner).finished.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Runner {
            shared,
            thread: Some(thread),
            config,
        })
    }

    /// The configuration of this run.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Wait for the next console line containing `marker` (after the previous hit), up to
    /// `timeout`. Markers are thus checked in order.
    pub fn wait_for(&self, marker: &str, timeout: Duration) -> Result<Hit, Error> {
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.shared.inner);
        loop {
            let start = inner.cursor;
            if let Some(off) = inner
                .lines
                .get(start..)
                .and_then(|ls| ls.iter().position(|l| l.text.contains(marker)))
            {
                let index = start + off;
                inner.cursor = index + 1;
                let line = &inner.lines[index];
                let boot_start = usize::try_from(line.boot)
                    .ok()
                    .and_then(|b| b.checked_sub(1))
                    .and_then(|b| inner.boots.get(b))
                    .map(|b| b.started)
                    .unwrap_or(line.at);
                return Ok(Hit {
                    line: line.text.clone(),
                    index,
                    boot: line.boot,
                    since_boot: line.at.saturating_duration_since(boot_start),
                });
            }
            if let Some(outcome) = &inner.finished {
                return Err(Error::Stopped {
                    marker: marker.to_string(),
                    outcome: outcome.clone(),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    marker: marker.to_string(),
                    timeout,
                });
            }
            inner = self
                .shared
                .cond
                .wait_timeout(inner, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// [`Runner::wait_for`] for each marker in order, sharing one overall `timeout`.
    pub fn wait_for_all(&self, markers: &[&str], timeout: Duration) -> Result<Vec<Hit>, Error> {
        let deadline = Instant::now() + timeout;
        markers
            .iter()
            .map(|m| self.wait_for(m, deadline.saturating_duration_since(Instant::now())))
            .collect()
    }

    /// Whether any console line so far contains `text`.
    pub fn console_contains(&self, text: &str) -> bool {
        lock(&self.shared.inner)
            .lines
            .iter()
            .any(|l| l.text.contains(text))
    }

    /// The host pseudo-terminal of the guest's second UART in the current power-on (with
    /// [`crate::Config::uart_pty`]), from QEMU's `char device redirected to …` line.
    pub fn uart_pty(&self) -> Option<std::path::PathBuf> {
        self.grep("char device redirected to ")
            .iter()
            .rev()
            .find_map(|l| crate::uart_pty_of_line(l))
    }

    /// Every console line so far containing `text`, in order.
    pub fn grep(&self, text: &str) -> Vec<String> {
        lock(&self.shared.inner)
            .lines
            .iter()
            .filter(|l| l.text.contains(text))
            .map(|l| l.text.clone())
            .collect()
    }

    /// The console lines with index `from..to` so far (clamped to what exists); indices as in
    /// [`Hit::index`].
    pub fn lines(&self, from: usize, to: usize) -> Vec<String> {
        let inner = lock(&self.shared.inner);
        let to = to.min(inner.lines.len());
        inner
            .lines
            .get(from.min(to)..to)
            .unwrap_or_default()
            .iter()
            .map(|l| l.text.clone())
            .collect()
    }

    /// The console's unterminated last line so far (e.g. a shell prompt waiting for input;
    /// empty when the console ends with a newline).
    pub fn partial_line(&self) -> String {
        String::from_utf8_lossy(&lock(&self.shared.inner).partial)
            .trim_end_matches('\r')
            .to_string()
    }

    /// Number of complete console lines so far (the next line gets this index).
    pub fn line_count(&self) -> usize {
        lock(&self.shared.inner).lines.len()
    }

    /// The last `n` console lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let inner = lock(&self.shared.inner);
        let start = inner.lines.len().saturating_sub(n);
        inner
            .lines
            .iter()
            .skip(start)
            .map(|l| l.text.clone())
            .collect()
    }

    /// Type into the guest console (a pipe unless the run is interactive).
    pub fn send(&self, bytes: &[u8]) -> Result<(), Error> {
        let mut stdin = lock(&self.shared.stdin);
        let Some(s) = stdin.as_mut() else {
            return Err(Error::NoConsoleInput);
        };
        s.write_all(bytes).and_then(|_| s.flush()).map_err(|e| {
            Error::Io(nx_contract::PathIoError {
                what: "write console of",
                path: self.config.console_log(),
                source: e,
            })
        })
    }

    /// Number of boots so far (1 during the first boot).
    pub fn boots(&self) -> u32 {
        self.shared.current_boot()
    }

    /// What the current boot started, once its console shows it.
    pub fn current_target(&self) -> Option<BootTarget> {
        lock(&self.shared.inner).boots.last().and_then(|b| b.target)
    }

    /// How the run ended, if it has.
    pub fn outcome(&self) -> Option<Outcome> {
        lock(&self.shared.inner).finished.clone()
    }

    /// Wait up to `timeout` for the run to end (power-off, panic, …).
    pub fn wait_finished(&self, timeout: Duration) -> Option<Outcome> {
        let deadline = Instant::now() + timeout;
        let mut inner = lock(&self.shared.inner);
        loop {
            if let Some(o) = &inner.finished {
                return Some(o.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            inner = self
                .shared
                .cond
                .wait_timeout(inner, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Simulate a power cut: SIGKILL QEMU (no guest shutdown), then power on again; `target`
    /// `Some(Recovery)` sets the bootloader's one-shot first, `Some(Normal)` removes a pending
    /// one, `None` leaves the device's variables alone (the bootloader decides).
    pub fn power_cycle(&self, target: Option<BootTarget>) {
        *lock(&self.shared.cycle) = Some(target);
        self.shared.kill_qemu(true);
    }

    /// Stop the run: kill QEMU and end the firmware loop. Idempotent.
    pub fn stop(&mut self) -> Outcome {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.kill_qemu(false);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.outcome().unwrap_or(Outcome::Stopped)
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Prepare a power-on: set or clear the one-shot entry when asked (UEFI runs; QEMU is not
/// running), and say what boots.
fn power_on_note(cfg: &Config, oneshot: Option<Option<&str>>, what: &str) -> Result<String, Error> {
    if !cfg.boots_uefi() {
        let t = cfg.direct_target();
        return Ok(format!(
            "{what}: {t} (no slot disk: the kernel and the {t} initramfs are loaded directly, one boot)"
        ));
    }
    let vars = cfg
        .uefi
        .as_ref()
        .map(|u| u.vars.clone())
        .unwrap_or_default();
    let why = match oneshot {
        Some(entry) => {
            varstore::set_oneshot(&vars, entry).map_err(|e| {
                Error::Io(nx_contract::PathIoError {
                    what: "set the one-shot boot entry in",
                    path: vars.clone(),
                    source: std::io::Error::other(e),
                })
            })?;
            match entry {
                Some(e) => format!(
                    "the one-shot entry {e} was written into the EFI variables; the bootloader starts it"
                ),
                None => "any pending one-shot entry was removed; the bootloader starts its default".to_string(),
            }
        }
        None => "the firmware and the bootloader choose what boots".to_string(),
    };
    Ok(format!("{what} ({why})"))
}

fn spawn_qemu(cfg: &Config) -> std::io::Result<Child> {
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args(cfg.qemu_args())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .stdin(if cfg.interactive {
            Stdio::inherit()
        } else {
            Stdio::piped()
        });
    // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid, kill).
    unsafe {
        cmd.pre_exec(|| {
            // QEMU dies with the thread that started it (the watcher), whatever kills us.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Why the watcher stops waiting for the current QEMU.
enum Wake {
    Exited(Option<std::process::ExitStatus>),
    /// The guest reset and the run does not follow reboots.
    Reset,
    TooManyBoots,
}

/// Power on, watch, and power on again after a cut, until the run ends.
fn watch(s: &Arc<Shared>, cfg: &Config, first: String) {
    let echo = cfg.echo || cfg.interactive;
    let mut note = first;
    if cfg.interactive {
        s.note("console attached to this terminal: Ctrl-A x quits QEMU, Ctrl-A c toggles the QEMU monitor", true);
    }
    loop {
        if s.stop.load(Ordering::SeqCst) {
            s.finish(Outcome::Stopped);
            return;
        }
        {
            let mut inner = lock(&s.inner);
            inner.boots.push(Boot {
                target: None,
                started: Instant::now(),
            });
            inner.firmware_seen = !cfg.boots_uefi();
            inner.uefi = cfg.boots_uefi();
            inner.resets = 0;
            inner.reset_pending = false;
        }
        let boot_no = s.current_boot();
        s.note(&format!("boot {boot_no}: {note}"), echo);
        let mut child = match spawn_qemu(cfg) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("{}: {e}", cfg.qemu.display());
                s.note(&format!("cannot start QEMU: {msg}"), true);
                s.finish(Outcome::SpawnFailed(msg));
                return;
            }
        };
        let stdout = child.stdout.take();
        *lock(&s.stdin) = child.stdin.take();
        *lock(&s.child) = Some(child);
        let reader = stdout.map(|mut out| {
            let s2 = Arc::clone(s);
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                loop {
                    match out.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => s2.feed(buf.get(..n).unwrap_or_default(), echo),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            })
        });
        // Poll QEMU (holding the child lock only briefly; see `kill_qemu`).
        let wake = loop {
            {
                let mut guard = lock(&s.child);
                match guard.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(st))) => {
                        *guard = None;
                        break Wake::Exited(Some(st));
                    }
                    Some(Ok(None)) => {}
                    Some(Err(_)) | None => {
                        *guard = None;
                        break Wake::Exited(None);
                    }
                }
            }
            {
                let inner = lock(&s.inner);
                if inner.reset_pending && !cfg.follow_reboots && cfg.boots_uefi() {
                    break Wake::Reset;
                }
                if inner.boots.len() > cfg.max_boots as usize {
                    break Wake::TooManyBoots;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !matches!(wake, Wake::Exited(_)) {
            s.kill_qemu(true);
            // Reap it.
            let deadline = Instant::now() + TERM_GRACE;
            while Instant::now() < deadline
                && lock(&s.child)
                    .as_mut()
                    .is_some_and(|c| !matches!(c.try_wait(), Ok(Some(_))))
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            *lock(&s.child) = None;
        }
        if let Some(r) = reader {
            let _ = r.join();
        }
        s.flush_partial();
        *lock(&s.stdin) = None;
        let status_text = match &wake {
            Wake::Exited(Some(st)) => st.to_string(),
            Wake::Exited(None) => "unknown status".into(),
            Wake::Reset | Wake::TooManyBoots => "killed by the runner".into(),
        };
        if s.stop.load(Ordering::SeqCst) {
            s.finish(Outcome::Stopped);
            return;
        }
        match wake {
            Wake::TooManyBoots => {
                s.note(
                    &format!("giving up: more than {} boots", cfg.max_boots),
                    true,
                );
                s.finish(Outcome::TooManyBoots(cfg.max_boots));
                return;
            }
            Wake::Reset => {
                s.note("guest rebooted; not following reboots", echo);
                s.finish(Outcome::Rebooted);
                return;
            }
            Wake::Exited(_) => {}
        }
        if let Some(req) = lock(&s.cycle).take() {
            s.note(&format!("power cut (QEMU killed, {status_text})"), echo);
            let oneshot = req.map(|t| match t {
                BootTarget::Recovery => Some("recovery.conf"),
                BootTarget::Normal => None,
            });
            note = match power_on_note(cfg, oneshot, "power on after the cut") {
                Ok(n) => n,
                Err(e) => {
                    s.note(&format!("cannot power on again: {e}"), true);
                    s.finish(Outcome::QemuExited(e.to_string()));
                    return;
                }
            };
            continue;
        }
        let (panicked, rebooted, powered_off) = {
            let inner = lock(&s.inner);
            let last = u32::try_from(inner.boots.len()).unwrap_or(u32::MAX);
            let this_boot = inner.lines.iter().rev().take_while(|l| l.boot == last);
            let mut flags = (false, false, false);
            for l in this_boot {
                flags.0 |= l.text.contains("Kernel panic - not syncing");
                flags.1 |= l.text.contains("reboot: Restarting system");
                flags.2 |= l.text.contains("reboot: Power down");
            }
            flags
        };
        if powered_off {
            s.note("guest powered off", echo);
            s.finish(Outcome::PoweredOff);
            return;
        }
        if panicked {
            s.note(&format!("guest kernel panic (QEMU {status_text})"), true);
            s.finish(Outcome::KernelPanic);
            return;
        }
        if rebooted {
            // A direct boot (no firmware to come back to) ends at its reboot.
            s.note("guest rebooted; a direct boot is not followed", echo);
            s.finish(Outcome::Rebooted);
            return;
        }
        s.note(
            &format!("QEMU exited ({status_text}) without a guest reboot or power-off"),
            echo,
        );
        s.finish(Outcome::QemuExited(status_text));
        return;
    }
}
