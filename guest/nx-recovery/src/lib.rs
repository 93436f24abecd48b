//! # nx-recovery — the recovery menu on the console
//!
//! The "SystemUI entry" of recovery: a numbered menu on the serial console —
//! flash mode (flashd waits for `nx flash send`), diag, slot status, factory reset, reboot.
//!
//! The logic is a byte-in / bytes-out state machine ([`Menu::feed`]) over a [`Backend`], so
//! tests drive it with a byte stream and a fake backend; [`guest::GuestBackend`] is the real
//! one (rebootd and bootctld over their guest-local sockets, nx-diag on `/state`).
//!
//! Factory reset asks twice before it does anything ([`ResetConfirm`]): first `yes`, then the
//! device name rebootd reports; any other answer (or Ctrl-C) cancels with a message and
//! changes nothing. Only then is rebootd's `factoryWipe()` called (the one reboot
//! authority); recovery-init performs the wipe at the next boot.
//!
//! [`ResetConfirm`], [`render_slots`] and the [`guest`] functions are what recovery-sh's
//! built-ins (`reset factory`, `slot status`, `diag`, `reboot …`) call as well.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod guest;

use bootctld::machine::{BootState, Slot};
use nx_contract::reset_plan::Plan;
use std::fmt::Write as _;

pub use nx_contract::NextBoot as Target;

/// Longest input line, in bytes.
pub const MAX_LINE: usize = 256;
/// The menu prompt.
pub const PROMPT: &str = "choice> ";

/// What the menu needs from the system. Every method returns the text to show; errors are
/// messages for the operator.
pub trait Backend {
    /// Flash mode: what flashd is doing / how to flash from the host.
    fn flash_status(&mut self) -> String;
    /// Write a diag bundle; the console lines (markers) it printed.
    fn diag(&mut self) -> Result<String, String>;
    /// The slot table, rendered.
    fn slot_status(&mut self) -> Result<String, String>;
    /// The factory-reset plan and the device name (from rebootd).
    fn reset_plan(&mut self) -> Result<(Plan, String), String>;
    /// rebootd `factoryWipe()`: returns whether the guest really reboots.
    fn factory_wipe(&mut self) -> Result<bool, String>;
    /// rebootd `mode(target)`: returns whether the guest really reboots.
    fn reboot(&mut self, target: Target) -> Result<bool, String>;
}

/// Why the menu ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// `q`: leave the menu (the caller decides what runs next).
    Leave,
}

/// The double confirmation of a factory reset, one answer line at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetConfirm {
    device: String,
    got_yes: bool,
}

/// The result of one answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Show this prompt and wait for the next answer.
    Ask(String),
    /// Both answers were right: do the reset.
    Confirmed,
    /// Cancelled (the message says why); nothing was changed.
    Cancelled(String),
}

/// Printable, bounded text for messages.
fn shown(s: &str) -> String {
    s.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

impl ResetConfirm {
    /// Start a confirmation for `device`; returns it and the first prompt.
    pub fn new(device: &str) -> (Self, String) {
        (
            ResetConfirm {
                device: device.to_string(),
                got_yes: false,
            },
            format!(
                "This erases everything in /state/apps, /state/content and /state/settings on \"{device}\" \
                 (trust, boot and slot state are kept).\nType yes to continue: "
            ),
        )
    }

    /// Feed one answer line.
    pub fn answer(&mut self, line: &str) -> Answer {
        let a = line.trim();
        if !self.got_yes {
            if a == "yes" {
                self.got_yes = true;
                return Answer::Ask(format!(
                    "Type the device name ({}) to confirm: ",
                    self.device
                ));
            }
            return Answer::Cancelled(format!(
                "factory reset cancelled: the answer was \"{}\", not \"yes\"; nothing was changed",
                shown(a)
            ));
        }
        if a == self.device {
            Answer::Confirmed
        } else {
            Answer::Cancelled(format!(
                "factory reset cancelled: \"{}\" is not the device name \"{}\"; nothing was changed",
                shown(a),
                self.device
            ))
        }
    }
}

/// The slot table as text (the same columns as `nx boot status`).
pub fn render_slots(s: &BootState, persistent: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<5} {:<7} {:<8} {:<6} {:<6} version",
        "slot", "active", "health", "trial", "tries"
    );
    for slot in Slot::ALL {
        let info = s.slot(slot);
        let version = if info.version.is_empty() {
            "-".to_string()
        } else {
            shown(&info.version)
        };
        let _ = writeln!(
            out,
            "{:<5} {:<7} {:<8} {:<6} {:<6} {}",
            slot.as_str(),
            if slot == s.active { "*" } else { "" },
            info.health.as_str(),
            if info.trial { "yes" } else { "no" },
            info.tries_left,
            version
        );
    }
    if let Some(lb) = &s.last_boot {
        let _ = writeln!(
            out,
            "last boot: slot {}{}",
            lb.slot,
            if lb.trial { " (trial)" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "storage: {}",
        if persistent {
            "persistent (/state/bootctl/state.nxs)"
        } else {
            "RAM-only stub/placeholder — no /state; nothing survives a reboot"
        }
    );
    out
}

/// The plan's summary for the console (trees and totals; every path: `nx reset factory
/// --dry-run` on the host).
pub fn plan_summary(plan: &Plan) -> String {
    let full = plan.render_text();
    full.lines()
        .filter(|l| !l.starts_with("    "))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Main,
    Reset(ResetConfirm),
    RebootWhich,
}

/// The menu: a bounded line editor plus the menu state.
#[derive(Debug)]
pub struct Menu {
    state: State,
    line: Vec<u8>,
    too_long: bool,
    bad_byte: bool,
    last_cr: bool,
}

impl Default for Menu {
    fn default() -> Self {
        Self::new()
    }
}

/// The menu text.
pub const MENU: &str = "\
nexus recovery menu
  1  flash mode: wait for `nx flash send` on the flash port
  2  diag: write a diagnostics bundle to /state/recovery
  3  slot status
  4  factory reset (wipes apps, content, settings; asks twice)
  5  reboot (normal or recovery)
  q  leave the menu
";

impl Menu {
    /// A menu in its main state.
    pub fn new() -> Self {
        Menu {
            state: State::Main,
            line: Vec::new(),
            too_long: false,
            bad_byte: false,
            last_cr: false,
        }
    }

    /// The first screen: the ready marker, the menu and the prompt.
    pub fn start(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(
            format!(
                "{}\n{MENU}{PROMPT}",
                nx_contract::markers::recovery::menu_ready()
            )
            .as_bytes(),
        );
    }

    /// Feed input bytes (raw console); echo and answers go to `out`.
    pub fn feed(
        &mut self,
        backend: &mut dyn Backend,
        bytes: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Exit> {
        for &b in bytes {
            let after_cr = std::mem::take(&mut self.last_cr);
            match b {
                b'\r' | b'\n' => {
                    if b == b'\n' && after_cr {
                        continue;
                    }
                    self.last_cr = b == b'\r';
                    out.push(b'\n');
                    let line = std::mem::take(&mut self.line);
                    let (too_long, bad) = (self.too_long, self.bad_byte);
                    self.too_long = false;
                    self.bad_byte = false;
                    if too_long {
                        out.extend_from_slice(
                            format!(
                                "nx-recovery: error: line longer than {MAX_LINE} bytes, ignored\n"
                            )
                            .as_bytes(),
                        );
                        self.cancel_pending(out);
                        self.prompt(out);
                    } else if bad {
                        out.extend_from_slice(
                            b"nx-recovery: error: only printable ASCII is accepted, line ignored\n",
                        );
                        self.cancel_pending(out);
                        self.prompt(out);
                    } else if let Some(exit) =
                        self.line(backend, &String::from_utf8_lossy(&line), out)
                    {
                        return Some(exit);
                    }
                }
                0x7f | 0x08 => self.backspace(out),
                0x03 => {
                    // Ctrl-C: drop the line and any confirmation in progress.
                    self.line.clear();
                    self.too_long = false;
                    self.bad_byte = false;
                    out.extend_from_slice(b"^C\n");
                    self.cancel_pending(out);
                    self.prompt(out);
                }
                0x20..=0x7e => {
                    if self.line.len() < MAX_LINE && !self.too_long {
                        self.line.push(b);
                        out.push(b);
                    } else if !self.too_long {
                        self.too_long = true;
                        out.push(0x07);
                    }
                }
                0x80..=0xff => self.bad_byte = true,
                _ => {}
            }
        }
        None
    }

    fn backspace(&mut self, out: &mut Vec<u8>) {
        if !self.too_long && self.line.pop().is_some() {
            out.extend_from_slice(b"\x08 \x08");
        }
    }

    fn cancel_pending(&mut self, out: &mut Vec<u8>) {
        match std::mem::replace(&mut self.state, State::Main) {
            State::Reset(_) => {
                out.extend_from_slice(b"factory reset cancelled; nothing was changed\n")
            }
            State::RebootWhich => out.extend_from_slice(b"reboot cancelled\n"),
            State::Main => {}
        }
    }

    fn prompt(&self, out: &mut Vec<u8>) {
        if self.state == State::Main {
            out.extend_from_slice(PROMPT.as_bytes());
        }
    }

    /// Handle one complete input line (already bounded and ASCII).
    pub fn line(
        &mut self,
        backend: &mut dyn Backend,
        line: &str,
        out: &mut Vec<u8>,
    ) -> Option<Exit> {
        let text = line.trim();
        match std::mem::replace(&mut self.state, State::Main) {
            State::Reset(mut confirm) => {
                match confirm.answer(text) {
                    Answer::Ask(p) => {
                        out.extend_from_slice(p.as_bytes());
                        self.state = State::Reset(confirm);
                        return None;
                    }
                    Answer::Cancelled(msg) => out.extend_from_slice(format!("{msg}\n").as_bytes()),
                    Answer::Confirmed => match backend.factory_wipe() {
                        Ok(true) => out.extend_from_slice(
                            b"factory reset: the wipe request is recorded; rebooting into recovery, which wipes and boots normal\n",
                        ),
                        Ok(false) => out.extend_from_slice(
                            b"factory reset: the wipe request is recorded, but rebootd cannot reboot here (stub); the wipe runs at the next boot into recovery\n",
                        ),
                        Err(e) => out.extend_from_slice(
                            format!("factory reset failed: {e}; nothing was changed\n").as_bytes(),
                        ),
                    },
                }
                out.extend_from_slice(PROMPT.as_bytes());
                None
            }
            State::RebootWhich => {
                let target = match text {
                    "n" | "normal" => Some(Target::Normal),
                    "r" | "recovery" => Some(Target::Recovery),
                    _ => None,
                };
                match target {
                    None => out.extend_from_slice(b"reboot cancelled\n"),
                    Some(t) => match backend.reboot(t) {
                        Ok(true) => {
                            out.extend_from_slice(format!("rebooting into {t}\n").as_bytes())
                        }
                        Ok(false) => out.extend_from_slice(
                            format!(
                                "next boot: {t} (recorded); rebootd cannot reboot here (stub)\n"
                            )
                            .as_bytes(),
                        ),
                        Err(e) => out.extend_from_slice(format!("reboot failed: {e}\n").as_bytes()),
                    },
                }
                out.extend_from_slice(PROMPT.as_bytes());
                None
            }
            State::Main => {
                match text {
                    "" => {}
                    "1" => out.extend_from_slice(backend.flash_status().as_bytes()),
                    "2" => match backend.diag() {
                        Ok(t) => out.extend_from_slice(t.as_bytes()),
                        Err(e) => out.extend_from_slice(format!("diag failed: {e}\n").as_bytes()),
                    },
                    "3" => match backend.slot_status() {
                        Ok(t) => out.extend_from_slice(t.as_bytes()),
                        Err(e) => {
                            out.extend_from_slice(format!("slot status failed: {e}\n").as_bytes())
                        }
                    },
                    "4" => match backend.reset_plan() {
                        Ok((plan, device)) => {
                            out.extend_from_slice(plan_summary(&plan).as_bytes());
                            let (confirm, prompt) = ResetConfirm::new(&device);
                            out.extend_from_slice(prompt.as_bytes());
                            self.state = State::Reset(confirm);
                            return None;
                        }
                        Err(e) => out.extend_from_slice(
                            format!("factory reset unavailable: {e}; nothing was changed\n")
                                .as_bytes(),
                        ),
                    },
                    "5" => {
                        out.extend_from_slice(
                            b"reboot into n(ormal) or r(ecovery)? anything else cancels: ",
                        );
                        self.state = State::RebootWhich;
                        return None;
                    }
                    "q" | "quit" => return Some(Exit::Leave),
                    "h" | "help" | "?" => out.extend_from_slice(MENU.as_bytes()),
                    other => out.extend_from_slice(
                        format!(
                            "nx-recovery: unknown choice '{}' (1-5, q; h shows the menu)\n",
                            shown(other)
                        )
                        .as_bytes(),
                    ),
                }
                out.extend_from_slice(PROMPT.as_bytes());
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Fake {
        calls: Vec<String>,
        plan_fails: bool,
    }

    impl Backend for Fake {
        fn flash_status(&mut self) -> String {
            self.calls.push("flash".into());
            "flashd waits\n".into()
        }
        fn diag(&mut self) -> Result<String, String> {
            self.calls.push("diag".into());
            Ok("recovery: diag written (bytes=10)\n".into())
        }
        fn slot_status(&mut self) -> Result<String, String> {
            self.calls.push("slots".into());
            Err("bootctld is not running".into())
        }
        fn reset_plan(&mut self) -> Result<(Plan, String), String> {
            self.calls.push("plan".into());
            if self.plan_fails {
                return Err("no /state".into());
            }
            let d = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(d.path().join("apps")).unwrap();
            std::fs::write(d.path().join("apps/x"), b"12").unwrap();
            Ok((nx_reset::plan(d.path()).unwrap(), "board-7".into()))
        }
        fn factory_wipe(&mut self) -> Result<bool, String> {
            self.calls.push("wipe".into());
            Ok(true)
        }
        fn reboot(&mut self, target: Target) -> Result<bool, String> {
            self.calls.push(format!("reboot {target}"));
            Ok(false)
        }
    }

    fn drive(fake: &mut Fake, input: &[u8]) -> (String, Option<Exit>) {
        let mut m = Menu::new();
        let mut out = Vec::new();
        m.start(&mut out);
        let exit = m.feed(fake, input, &mut out);
        (String::from_utf8(out).unwrap(), exit)
    }

    #[test]
    fn reset_needs_yes_then_the_device_name() {
        let mut f = Fake::default();
        let (out, _) = drive(&mut f, b"4\ryes\rboard-7\r");
        assert_eq!(f.calls, ["plan", "wipe"]);
        assert!(out.contains("WIPED"), "{out}");
        assert!(
            out.contains("/state/apps/  1 file, 0 dirs, 2 bytes"),
            "{out}"
        );
        assert!(out.contains("Type yes to continue: "), "{out}");
        assert!(
            out.contains("Type the device name (board-7) to confirm: "),
            "{out}"
        );
        assert!(
            out.contains("the wipe request is recorded; rebooting"),
            "{out}"
        );
        assert!(out.ends_with(PROMPT));
    }

    #[test]
    fn wrong_answers_cancel_and_do_nothing() {
        for input in [
            &b"4\rno\r"[..],
            b"4\rYES\rboard-7\r",
            b"4\ryes\rboard-8\r",
            b"4\ryes\r\r",
            b"4\ryes\x03board-7\r",
            b"4\r\x03yes\rboard-7\r",
        ] {
            let mut f = Fake::default();
            let (out, _) = drive(&mut f, input);
            assert_eq!(
                f.calls,
                ["plan"],
                "{:?}: {out}",
                String::from_utf8_lossy(input)
            );
            assert!(out.contains("cancelled"), "{out}");
            assert!(out.contains("nothing was changed"), "{out}");
            assert!(out.ends_with(PROMPT), "{out}");
        }
        let mut f = Fake {
            plan_fails: true,
            ..Fake::default()
        };
        let (out, _) = drive(&mut f, b"4\ryes\r");
        assert_eq!(f.calls, ["plan"]);
        assert!(
            out.contains("factory reset unavailable: no /state"),
            "{out}"
        );
        assert!(out.contains("unknown choice 'yes'"), "{out}");
    }

    #[test]
    fn other_items() {
        let mut f = Fake::default();
        let (out, exit) = drive(&mut f, b"1\n2\n3\n5\nr\n5\nx\n9\nq\n");
        assert_eq!(f.calls, ["flash", "diag", "slots", "reboot recovery"]);
        assert!(out.starts_with("recovery: menu ready\nnexus recovery menu\n"));
        assert!(out.contains("recovery: diag written (bytes=10)"));
        assert!(out.contains("slot status failed: bootctld is not running"));
        assert!(out.contains("next boot: recovery (recorded)"));
        assert!(out.contains("reboot cancelled"));
        assert!(out.contains("unknown choice '9'"));
        assert_eq!(exit, Some(Exit::Leave));
    }

    #[test]
    fn bounded_input() {
        let mut f = Fake::default();
        let mut input = vec![b'4'; 10 * 1024];
        input.push(b'\r');
        let (out, _) = drive(&mut f, &input);
        assert!(f.calls.is_empty());
        assert!(out.contains("line longer than 256 bytes"));
        assert!(out.len() < 2000, "echo is bounded");
        let (out, _) = drive(&mut f, "4\ryes\rbo\u{e4}rd\r".as_bytes());
        assert!(out.contains("only printable ASCII"), "{out}");
        assert!(out.contains("factory reset cancelled"), "{out}");
        assert_eq!(f.calls, ["plan"]);
    }

    #[test]
    fn slots_render() {
        let s = BootState::factory_default();
        let t = render_slots(&s, true);
        assert!(t.contains("a     *       good"), "{t}");
        assert!(t.contains("b             empty"), "{t}");
        assert!(t.contains("storage: persistent"));
    }
}
