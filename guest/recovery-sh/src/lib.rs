//! recovery-sh — the recovery shell on the serial console.
//!
//! Built-ins only: `help`, `diag`, `slot status`, `reset factory`, `reboot [normal|recovery]`,
//! `poweroff`. There is no code path that executes a program, so `sh`, `/bin/sh`, `exec …`,
//! `busybox`, `; reboot` are just unknown commands (one error line, then the prompt).
//!
//! The line editor is bounded: printable ASCII, at most [`MAX_LINE`] bytes; a longer line is
//! rejected as a whole when Enter is pressed (its excess bytes are dropped, never run as a
//! next command). History keeps the last [`MAX_HISTORY`] command lines (Up/Down); other escape
//! sequences are swallowed. Ctrl-C cancels the line or a factory-reset confirmation, Ctrl-U
//! clears the line, Ctrl-D only prints a hint (or cancels a confirmation).
//!
//! Recovery is read-only by default: the only [`Backend`] calls that write are
//! [`Backend::diag`] (a bundle into `/state/recovery/`), [`Backend::factory_wipe`] (only after
//! [`ResetConfirm`] said [`Answer::Confirmed`]: `yes`, then the device name), and the reboot
//! requests themselves ([`Backend::reboot_into`]: rebootd's next-boot record; plain `reboot`
//! and `poweroff` go to PID 1).
//!
//! The logic is a pure state machine ([`Shell::feed`]: bytes in → console output and
//! [`Backend`] calls out), so it is tested with a fake backend and no tty; [`guest`] is the real
//! backend (nx-recovery's guest functions and PID 1 signals).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod guest;

use nx_contract::markers::recovery_sh as m;
use nx_guest::sys::Shutdown;
use nx_recovery::{Answer, ResetConfirm};
use std::collections::VecDeque;
use std::io::Write;

pub use nx_recovery::Target;

/// Longest accepted command line, in bytes.
pub const MAX_LINE: usize = 256;
/// How many command lines the history keeps.
pub const MAX_HISTORY: usize = 32;
/// The prompt.
pub const PROMPT: &str = m::PROMPT;
/// Longest error message shown (characters).
const MAX_MESSAGE: usize = 240;
/// Longest command name echoed back in "unknown command" (characters).
const MAX_SHOWN: usize = 32;

/// The built-ins, in `help` order: `(usage, what it does)`.
pub const BUILTINS: [(&str, &str); 7] = [
    ("help", "list the built-in commands"),
    (
        "diag",
        "write a diagnostics bundle to /state/recovery/diag-<n>.tar.zst",
    ),
    ("slot status", "show the A/B slot table (from bootctld)"),
    (
        "reset factory",
        "wipe /state/apps, /state/content, /state/settings (shows the plan, asks twice)",
    ),
    (
        "reboot",
        "reboot now through PID 1 (the boot firmware picks normal or recovery)",
    ),
    (
        "reboot normal|recovery",
        "rebootd records the next boot, then reboots into it",
    ),
    ("poweroff", "sync, unmount /state and power off"),
];

/// Why a backend call failed. Messages are for the operator (one line each).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// rebootd or bootctld did not answer, refused, or sent something unusable (the message
    /// names the daemon and its socket).
    #[error("{0}")]
    Service(String),
    /// nx-diag could not write the bundle.
    #[error("{0}")]
    Diag(String),
    /// Signalling PID 1 failed.
    #[error("cannot signal PID 1: {0}")]
    Pid1(#[from] nx_guest::Error),
}

/// What a reboot request through rebootd did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootOutcome {
    /// The record is persisted and the guest reboots now.
    Rebooting,
    /// The record is persisted, but rebootd cannot reboot here (its stub reboot method).
    RecordedOnly,
}

impl RebootOutcome {
    /// From rebootd's `rebooting` answer.
    pub fn from_rebooting(rebooting: bool) -> Self {
        if rebooting {
            RebootOutcome::Rebooting
        } else {
            RebootOutcome::RecordedOnly
        }
    }
}

/// The factory-reset plan as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetPlan {
    /// The plan's summary (wiped and preserved trees with totals; `nx_recovery::plan_summary`).
    pub summary: String,
    /// The device name the operator must type to confirm.
    pub device: String,
}

/// What `diag` printed and how it ended.
#[derive(Debug)]
pub struct DiagReport {
    /// The console lines (markers) of nx-diag, `recovery: diag written (bytes=<n>)` last.
    pub lines: Vec<String>,
    /// `Ok` when a bundle was written or diag is not available (no /state); `Err` on failure.
    pub result: Result<(), BackendError>,
}

/// The side effects of the built-ins. Only [`Backend::diag`], [`Backend::factory_wipe`] and
/// [`Backend::reboot_into`] (the next-boot record) write anything.
pub trait Backend {
    /// Write a diag bundle into `/state/recovery/`.
    fn diag(&mut self) -> DiagReport;
    /// The slot table, rendered (reads only).
    fn slot_status(&mut self) -> Result<String, BackendError>;
    /// The factory-reset plan and the device name (reads only).
    fn reset_plan(&mut self) -> Result<ResetPlan, BackendError>;
    /// rebootd `factoryWipe()`: record the wipe request, next boot recovery, reboot.
    fn factory_wipe(&mut self) -> Result<RebootOutcome, BackendError>;
    /// rebootd `mode(target)`: persist the next-boot record and reboot.
    fn reboot_into(&mut self, target: Target) -> Result<RebootOutcome, BackendError>;
    /// Ask PID 1 to reboot (SIGTERM) or power off (SIGUSR2).
    fn shutdown(&mut self, what: Shutdown) -> Result<(), BackendError>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Esc {
    #[default]
    None,
    /// After ESC.
    Start,
    /// After ESC `[`: parameters until a final byte.
    Csi,
    /// After ESC `O`: one final byte.
    Ss3,
}

#[derive(Debug)]
enum Mode {
    /// The command prompt.
    Command,
    /// A factory reset waits for an answer (`prompt` is the current question).
    Confirm {
        confirm: ResetConfirm,
        prompt: String,
    },
    /// A reboot / power-off was requested and accepted: input is ignored (Ctrl-C gives the
    /// prompt back in case it never happens).
    ShuttingDown,
}

/// The line editor + interpreter.
#[derive(Debug)]
pub struct Shell {
    mode: Mode,
    line: Vec<u8>,
    too_long: bool,
    bad_byte: bool,
    last_cr: bool,
    esc: Esc,
    history: VecDeque<String>,
    /// Position in `history` while browsing with Up/Down.
    browse: Option<usize>,
}

impl Default for Shell {
    fn default() -> Self {
        Self::new()
    }
}

/// Write to the console. A console write error has nowhere to be reported; the read loop
/// ends when the console is gone.
fn put(out: &mut dyn Write, bytes: &[u8]) {
    let _ = out.write_all(bytes);
}

/// `text` as one bounded line: control characters become spaces.
fn one_line(text: &str) -> String {
    let mut s: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_MESSAGE)
        .collect();
    if text.chars().nth(MAX_MESSAGE).is_some() {
        s.push('…');
    }
    s
}

/// Text from a backend, safe for the console: control characters other than newlines
/// (escape sequences included) become `?`.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}

/// [`sanitize`]d multi-line text that ends with a newline (when not empty).
fn clean_text(text: &str) -> String {
    let mut s = sanitize(text);
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

fn error(out: &mut dyn Write, msg: &str) {
    put(out, format!("{}\n", m::error(one_line(msg))).as_bytes());
}

fn say(out: &mut dyn Write, msg: &str) {
    put(out, format!("{}\n", m::say(one_line(msg))).as_bytes());
}

impl Shell {
    /// A shell at the command prompt, with an empty line and history.
    pub fn new() -> Self {
        Shell {
            mode: Mode::Command,
            line: Vec::new(),
            too_long: false,
            bad_byte: false,
            last_cr: false,
            esc: Esc::None,
            history: VecDeque::new(),
            browse: None,
        }
    }

    /// The first screen: the ready marker, a hint and the prompt.
    pub fn start(&self, out: &mut dyn Write) {
        put(
            out,
            format!(
                "{}\n{}\n{PROMPT}",
                nx_contract::markers::recovery::shell_ready(),
                m::type_help()
            )
            .as_bytes(),
        );
        let _ = out.flush();
    }

    /// Whether a reboot / power-off was requested and accepted (input is ignored).
    pub fn shutting_down(&self) -> bool {
        matches!(self.mode, Mode::ShuttingDown)
    }

    /// The history, oldest first.
    pub fn history(&self) -> impl Iterator<Item = &str> {
        self.history.iter().map(String::as_str)
    }

    /// Feed raw console bytes; echo and messages go to `out` (flushed before every backend
    /// call and at the end).
    pub fn feed(&mut self, backend: &mut dyn Backend, bytes: &[u8], out: &mut dyn Write) {
        for &b in bytes {
            self.byte(backend, b, out);
        }
        let _ = out.flush();
    }

    fn byte(&mut self, backend: &mut dyn Backend, b: u8, out: &mut dyn Write) {
        let after_cr = std::mem::take(&mut self.last_cr);
        match self.esc {
            Esc::None => {}
            // A control or non-ASCII byte ends a sequence and counts on its own (Enter
            // inside a broken sequence still ends the line).
            _ if !(0x20..0x7f).contains(&b) => self.esc = Esc::None,
            Esc::Start => {
                self.esc = match b {
                    b'[' => Esc::Csi,
                    b'O' => Esc::Ss3,
                    _ => Esc::None, // Alt-<key>: swallowed
                };
                return;
            }
            Esc::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    self.esc = Esc::None;
                    self.key(b, out);
                }
                return;
            }
            Esc::Ss3 => {
                self.esc = Esc::None;
                self.key(b, out);
                return;
            }
        }
        if self.shutting_down() {
            self.while_shutting_down(b, after_cr, out);
            return;
        }
        match b {
            b'\r' | b'\n' => {
                if b == b'\n' && after_cr {
                    return; // CR LF: the line was already taken at CR
                }
                self.last_cr = b == b'\r';
                put(out, b"\n");
                self.enter(backend, out);
            }
            0x7f | 0x08 => self.backspace(out),
            0x03 => {
                self.clear_line();
                put(out, b"^C\n");
                if matches!(self.mode, Mode::Confirm { .. }) {
                    self.mode = Mode::Command;
                    say(out, "factory reset cancelled (Ctrl-C); nothing was changed");
                }
                self.prompt(out);
            }
            0x15 => {
                self.clear_line();
                put(out, b"^U\n");
                self.prompt(out);
            }
            0x04 => {
                if !self.line.is_empty() || self.too_long || self.bad_byte {
                    return; // Ctrl-D in a line: nothing
                }
                put(out, b"^D\n");
                if matches!(self.mode, Mode::Confirm { .. }) {
                    self.mode = Mode::Command;
                    say(out, "factory reset cancelled (Ctrl-D); nothing was changed");
                } else {
                    say(
                        out,
                        "Ctrl-D does nothing here; type 'reboot' or 'poweroff' to leave recovery",
                    );
                }
                self.prompt(out);
            }
            0x1b => self.esc = Esc::Start,
            0x20..=0x7e => {
                if self.line.len() < MAX_LINE && !self.too_long {
                    self.line.push(b);
                    put(out, &[b]);
                } else if !self.too_long {
                    // Over the bound: the rest of this line is dropped, the line is refused
                    // at Enter.
                    self.too_long = true;
                    put(out, b"\x07");
                }
            }
            0x80..=0xff => self.bad_byte = true,
            _ => {} // other control bytes (Tab, …) are ignored
        }
    }

    fn backspace(&mut self, out: &mut dyn Write) {
        // A refused (too long) line stays refused until Enter, Ctrl-C or Ctrl-U.
        if !self.too_long && self.line.pop().is_some() {
            put(out, b"\x08 \x08");
        }
    }

    fn while_shutting_down(&mut self, b: u8, after_cr: bool, out: &mut dyn Write) {
        match b {
            0x03 => {
                self.mode = Mode::Command;
                self.clear_line();
                put(out, b"^C\n");
                say(
                    out,
                    "the requested reboot/power-off has not happened (yet); the prompt is back",
                );
                self.prompt(out);
            }
            b'\r' | b'\n' => {
                if b == b'\n' && after_cr {
                    return;
                }
                self.last_cr = b == b'\r';
                put(out, b"\n");
                say(
                    out,
                    "shutting down; input is ignored (Ctrl-C gives the prompt back)",
                );
            }
            _ => {}
        }
    }

    /// The final byte of an escape sequence: Up / Down browse the history, the rest is
    /// swallowed.
    fn key(&mut self, b: u8, out: &mut dyn Write) {
        if !matches!(self.mode, Mode::Command) {
            return;
        }
        match b {
            b'A' => self.history_up(out),
            b'B' => self.history_down(out),
            _ => {}
        }
    }

    fn history_up(&mut self, out: &mut dyn Write) {
        let idx = match self.browse {
            None => self.history.len().checked_sub(1),
            Some(i) => i.checked_sub(1),
        };
        match idx {
            Some(i) => {
                self.browse = Some(i);
                self.load_history(i, out);
            }
            None => put(out, b"\x07"),
        }
    }

    fn history_down(&mut self, out: &mut dyn Write) {
        match self.browse {
            None => put(out, b"\x07"),
            Some(i) if i + 1 < self.history.len() => {
                self.browse = Some(i + 1);
                self.load_history(i + 1, out);
            }
            Some(_) => {
                self.browse = None;
                self.clear_line();
                self.redraw(out);
            }
        }
    }

    fn load_history(&mut self, i: usize, out: &mut dyn Write) {
        let entry = self.history.get(i).cloned().unwrap_or_default();
        self.clear_line();
        self.line = entry.into_bytes();
        self.line.truncate(MAX_LINE);
        self.redraw(out);
    }

    fn redraw(&self, out: &mut dyn Write) {
        put(out, b"\r\x1b[K");
        put(out, PROMPT.as_bytes());
        put(out, &self.line);
    }

    fn clear_line(&mut self) {
        self.line.clear();
        self.too_long = false;
        self.bad_byte = false;
    }

    fn prompt(&self, out: &mut dyn Write) {
        match &self.mode {
            Mode::Command => put(out, PROMPT.as_bytes()),
            Mode::Confirm { prompt, .. } => put(out, sanitize(prompt).as_bytes()),
            Mode::ShuttingDown => {}
        }
    }

    fn remember(&mut self, text: &str) {
        let t = text.trim();
        if t.is_empty() || self.history.back().map(String::as_str) == Some(t) {
            return;
        }
        while self.history.len() >= MAX_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(t.to_string());
    }

    /// Enter: the line is complete.
    fn enter(&mut self, backend: &mut dyn Backend, out: &mut dyn Write) {
        let line = std::mem::take(&mut self.line);
        let too_long = std::mem::take(&mut self.too_long);
        let bad = std::mem::take(&mut self.bad_byte);
        self.browse = None;
        let refused = if too_long {
            Some(m::line_too_long_why(MAX_LINE))
        } else if bad {
            Some("only printable ASCII is accepted, line ignored; nothing was run".to_string())
        } else {
            None
        };
        if let Some(why) = refused {
            error(out, &why);
            if matches!(self.mode, Mode::Confirm { .. }) {
                self.mode = Mode::Command;
                say(out, "factory reset cancelled; nothing was changed");
            }
            self.prompt(out);
            return;
        }
        // Printable ASCII only (checked byte by byte above), so this is lossless.
        let text = String::from_utf8_lossy(&line).into_owned();
        match std::mem::replace(&mut self.mode, Mode::Command) {
            Mode::Confirm { confirm, .. } => self.answer(backend, confirm, &text, out),
            Mode::Command => {
                self.remember(&text);
                self.command(backend, &text, out);
            }
            Mode::ShuttingDown => self.mode = Mode::ShuttingDown, // not reached: filtered in byte()
        }
        self.prompt(out);
    }

    /// One answer to the factory-reset confirmation.
    fn answer(
        &mut self,
        backend: &mut dyn Backend,
        mut confirm: ResetConfirm,
        text: &str,
        out: &mut dyn Write,
    ) {
        match confirm.answer(text) {
            Answer::Ask(prompt) => self.mode = Mode::Confirm { confirm, prompt },
            Answer::Cancelled(msg) => say(out, &msg),
            Answer::Confirmed => {
                say(out, m::RESET_CONFIRMED_WHY);
                let _ = out.flush();
                match backend.factory_wipe() {
                    Ok(RebootOutcome::Rebooting) => {
                        say(out, "the wipe request is recorded; rebooting into recovery, which wipes apps, content and settings and then boots normal");
                        self.mode = Mode::ShuttingDown;
                    }
                    Ok(RebootOutcome::RecordedOnly) => say(out, "the wipe request is recorded, but rebootd cannot reboot here (stub); the wipe runs at the next boot into recovery (type 'reboot')"),
                    Err(e) => error(
                        out,
                        &format!("factory reset failed: {e}; nothing was wiped (is rebootd running? 'diag' collects the logs)"),
                    ),
                }
            }
        }
    }

    /// One command line at the prompt.
    fn command(&mut self, backend: &mut dyn Backend, text: &str, out: &mut dyn Write) {
        let words: Vec<&str> = text.split_ascii_whitespace().collect();
        let Some((&cmd, args)) = words.split_first() else {
            return; // empty line: just the prompt again
        };
        match (cmd, args) {
            ("help", []) => help(out),
            ("diag", []) => {
                say(out, "writing a diagnostics bundle to /state/recovery/");
                let _ = out.flush();
                let report = backend.diag();
                for l in &report.lines {
                    put(out, clean_text(&one_line(l)).as_bytes());
                }
                if let Err(e) = report.result {
                    error(
                        out,
                        &format!("diag failed: {e} (is /state mounted and writable?)"),
                    );
                }
            }
            ("slot", ["status"]) => {
                let _ = out.flush();
                match backend.slot_status() {
                    Ok(table) => put(out, clean_text(&table).as_bytes()),
                    Err(e) => error(out, &format!("slot status unavailable: {e}")),
                }
            }
            ("reset", ["factory"]) => {
                let _ = out.flush();
                match backend.reset_plan() {
                    Ok(plan) => {
                        put(out, clean_text(&plan.summary).as_bytes());
                        let (confirm, prompt) = ResetConfirm::new(&plan.device);
                        self.mode = Mode::Confirm { confirm, prompt };
                    }
                    Err(e) => error(
                        out,
                        &format!("factory reset unavailable: {e}; nothing was changed"),
                    ),
                }
            }
            ("reboot", []) => {
                say(
                    out,
                    "rebooting (PID 1 syncs, unmounts /state and reboots; the boot firmware picks normal or recovery)",
                );
                self.ask_pid1(backend, Shutdown::Reboot, out);
            }
            ("reboot", [which]) => match target(which) {
                Some(t) => self.reboot_into(backend, t, out),
                None => error(
                    out,
                    &format!(
                        "reboot: unknown target '{}'; usage: reboot [normal|recovery]",
                        which.chars().take(MAX_SHOWN).collect::<String>()
                    ),
                ),
            },
            ("poweroff", []) => {
                say(
                    out,
                    "powering off (PID 1 syncs, unmounts /state and powers off)",
                );
                self.ask_pid1(backend, Shutdown::Poweroff, out);
            }
            ("help" | "diag" | "poweroff", _) => {
                error(out, &format!("'{cmd}' takes no arguments (type 'help')"))
            }
            ("slot", _) => error(out, "usage: slot status"),
            ("reset", _) => error(
                out,
                "usage: reset factory (shows the plan and asks twice before anything is wiped)",
            ),
            ("reboot", _) => error(out, "usage: reboot [normal|recovery]"),
            _ => {
                let shown: String = cmd.chars().take(MAX_SHOWN).collect();
                error(out, &m::unknown_command_why(shown));
            }
        }
    }

    fn reboot_into(&mut self, backend: &mut dyn Backend, t: Target, out: &mut dyn Write) {
        say(out, &format!("asking rebootd to reboot into {t}"));
        let _ = out.flush();
        match backend.reboot_into(t) {
            Ok(RebootOutcome::Rebooting) => {
                say(out, &format!("rebooting into {t}"));
                self.mode = Mode::ShuttingDown;
            }
            Ok(RebootOutcome::RecordedOnly) => say(
                out,
                &format!("next boot: {t} (recorded), but rebootd cannot reboot here (stub); type 'reboot' to reboot through PID 1"),
            ),
            Err(e) => error(
                out,
                &format!("reboot {t} failed: {e} (plain 'reboot' asks PID 1 directly)"),
            ),
        }
    }

    fn ask_pid1(&mut self, backend: &mut dyn Backend, what: Shutdown, out: &mut dyn Write) {
        let _ = out.flush();
        match backend.shutdown(what) {
            Ok(()) => self.mode = Mode::ShuttingDown,
            Err(e) => error(
                out,
                &format!("{} failed: {e} (is recovery-init PID 1?)", what.as_str()),
            ),
        }
    }
}

fn target(word: &str) -> Option<Target> {
    match word {
        "normal" => Some(Target::Normal),
        "recovery" => Some(Target::Recovery),
        _ => None,
    }
}

fn help(out: &mut dyn Write) {
    put(out, format!("{}\n", m::builtins()).as_bytes());
    for (usage, what) in BUILTINS {
        put(out, format!("  {usage:<24} {what}\n").as_bytes());
    }
    put(
        out,
        format!(
            "Read-only unless asked: only 'diag', a confirmed 'reset factory' and 'reboot normal|recovery'\n\
             (rebootd's next-boot record) write to /state.\n\
             Keys: Backspace, Ctrl-U clears the line, Ctrl-C cancels, Up/Down: the last {MAX_HISTORY} commands.\n\
             Lines are at most {MAX_LINE} bytes of printable ASCII.\n"
        )
        .as_bytes(),
    );
}

#[cfg(test)]
mod tests;
