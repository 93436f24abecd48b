//! recovery-sh — the recovery shell on the serial console.
//!
//! Built-ins only: there is no code path that executes a program, so `sh`, `/bin/sh` or
//! `exec …` are just unknown commands. The line editor is bounded ([`MAX_LINE`] bytes,
//! printable ASCII); a longer line is rejected as a whole when Enter is pressed.
//! The logic is a pure byte-in / bytes-out state machine so it is unit-tested without a tty.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

/// Longest accepted command line, in bytes.
pub const MAX_LINE: usize = 256;
/// The prompt.
pub const PROMPT: &str = "recovery> ";
/// Marker printed once the shell is ready for input.
pub const READY_MARKER: &str = "recovery: shell ready";
/// The built-ins, in `help` order.
pub const BUILTINS: [(&str, &str); 3] = [
    ("help", "list the built-in commands"),
    (
        "reboot",
        "sync, unmount /state and reboot (the boot firmware picks normal or recovery)",
    ),
    ("poweroff", "sync, unmount /state and power off"),
];

/// What the shell asks its host (PID 1) to do after a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reboot,
    Poweroff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Esc {
    #[default]
    None,
    Start,
    Csi,
}

/// The line editor + interpreter.
#[derive(Debug, Default)]
pub struct Shell {
    line: Vec<u8>,
    too_long: bool,
    bad_byte: bool,
    last_cr: bool,
    esc: Esc,
}

impl Shell {
    /// A shell with an empty line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one input byte; echo and messages are appended to `out`. Returns an action when
    /// a completed line asks for one.
    pub fn feed(&mut self, b: u8, out: &mut Vec<u8>) -> Option<Action> {
        let after_cr = std::mem::take(&mut self.last_cr);
        match self.esc {
            Esc::Start => {
                self.esc = if b == b'[' { Esc::Csi } else { Esc::None };
                return None;
            }
            Esc::Csi => {
                if (0x40..=0x7e).contains(&b) {
                    self.esc = Esc::None;
                }
                return None;
            }
            Esc::None => {}
        }
        match b {
            b'\r' | b'\n' => {
                if b == b'\n' && after_cr {
                    return None; // CR LF: the line was already taken at CR
                }
                self.last_cr = b == b'\r';
                out.extend_from_slice(b"\n");
                let action = self.finish_line(out);
                if action.is_none() {
                    out.extend_from_slice(PROMPT.as_bytes());
                }
                action
            }
            0x7f | 0x08 => {
                if !self.too_long && self.line.pop().is_some() {
                    out.extend_from_slice(b"\x08 \x08");
                }
                None
            }
            0x03 | 0x15 => {
                // Ctrl-C / Ctrl-U: drop the line.
                self.reset_line();
                out.extend_from_slice(if b == 0x03 { b"^C\n" } else { b"^U\n" });
                out.extend_from_slice(PROMPT.as_bytes());
                None
            }
            0x1b => {
                self.esc = Esc::Start;
                None
            }
            0x20..=0x7e => {
                if self.line.len() < MAX_LINE && !self.too_long {
                    self.line.push(b);
                    out.push(b);
                } else if !self.too_long {
                    self.too_long = true;
                    out.extend_from_slice(b"\x07");
                }
                None
            }
            0x80..=0xff => {
                self.bad_byte = true;
                None
            }
            _ => None, // other control bytes are ignored
        }
    }

    /// Feed many bytes; returns the first action (bytes after it are still consumed).
    pub fn feed_all(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Option<Action> {
        let mut first = None;
        for &b in bytes {
            let a = self.feed(b, out);
            if first.is_none() {
                first = a;
            }
        }
        first
    }

    fn reset_line(&mut self) {
        self.line.clear();
        self.too_long = false;
        self.bad_byte = false;
    }

    fn finish_line(&mut self, out: &mut Vec<u8>) -> Option<Action> {
        let too_long = self.too_long;
        let bad = self.bad_byte;
        let line = String::from_utf8_lossy(&self.line).into_owned();
        self.reset_line();
        if too_long {
            out.extend_from_slice(
                format!("recovery-sh: error: line longer than {MAX_LINE} bytes, ignored\n")
                    .as_bytes(),
            );
            return None;
        }
        if bad {
            out.extend_from_slice(
                b"recovery-sh: error: only printable ASCII is accepted, line ignored\n",
            );
            return None;
        }
        execute(&line, out)
    }
}

/// Run one command line (already bounded and ASCII).
pub fn execute(line: &str, out: &mut Vec<u8>) -> Option<Action> {
    let words: Vec<&str> = line.split_ascii_whitespace().collect();
    let (&cmd, args) = words.split_first()?;
    match (cmd, args) {
        ("help", []) => {
            out.extend_from_slice(b"recovery-sh: built-ins (nothing else can run here):\n");
            for (name, what) in BUILTINS {
                out.extend_from_slice(format!("  {name:<10} {what}\n").as_bytes());
            }
            None
        }
        ("reboot", []) => {
            out.extend_from_slice(b"recovery-sh: rebooting\n");
            Some(Action::Reboot)
        }
        ("poweroff", []) => {
            out.extend_from_slice(b"recovery-sh: powering off\n");
            Some(Action::Poweroff)
        }
        ("help" | "reboot" | "poweroff", _) => {
            out.extend_from_slice(
                format!("recovery-sh: error: {cmd} takes no arguments (type help)\n").as_bytes(),
            );
            None
        }
        _ => {
            let shown: String = cmd.chars().take(32).collect();
            out.extend_from_slice(
                format!("recovery-sh: error: unknown command '{shown}' (type help)\n").as_bytes(),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8]) -> (String, Option<Action>) {
        let mut sh = Shell::new();
        let mut out = Vec::new();
        let a = sh.feed_all(input, &mut out);
        (String::from_utf8(out).unwrap(), a)
    }

    #[test]
    fn help_lists_builtins() {
        let (out, a) = run(b"help\r");
        assert_eq!(a, None);
        assert!(out.starts_with("help\nrecovery-sh: built-ins"));
        for (name, _) in BUILTINS {
            assert!(out.contains(&format!("  {name} ")), "{out}");
        }
        assert!(out.ends_with(PROMPT));
    }

    #[test]
    fn reboot_and_poweroff_are_actions() {
        assert_eq!(run(b"reboot\r").1, Some(Action::Reboot));
        assert_eq!(run(b"  poweroff  \n").1, Some(Action::Poweroff));
        assert_eq!(run(b"reboot now\r").1, None);
    }

    #[test]
    fn nothing_executes() {
        for cmd in [
            "sh",
            "/bin/sh",
            "exec /bin/sh",
            "busybox sh",
            "$(reboot)",
            "reboot;sh",
        ] {
            let (out, a) = run(format!("{cmd}\r").as_bytes());
            assert_eq!(a, None, "{cmd}");
            assert!(
                out.contains("recovery-sh: error: unknown command"),
                "{cmd}: {out}"
            );
            assert!(out.ends_with(PROMPT));
        }
    }

    #[test]
    fn long_line_is_rejected_whole() {
        let mut input = vec![b'a'; 10 * 1024];
        input.extend_from_slice(b"reboot\r");
        let (out, a) = run(&input);
        assert_eq!(a, None);
        assert!(out.contains("line longer than 256 bytes"));
        assert!(out.len() < MAX_LINE + 200, "echo is bounded: {}", out.len());
        // exactly MAX_LINE is fine
        let mut sh = Shell::new();
        let mut o = Vec::new();
        sh.feed_all(&vec![b'x'; MAX_LINE], &mut o);
        sh.feed(b'\r', &mut o);
        assert!(String::from_utf8(o).unwrap().contains("unknown command"));
    }

    #[test]
    fn editing_keys() {
        // backspace fixes a typo
        assert_eq!(run(b"rebooq\x7ft\r").1, Some(Action::Reboot));
        // Ctrl-C and Ctrl-U drop the line
        assert_eq!(run(b"reboot\x03\r").1, None);
        assert_eq!(run(b"reboot\x15\r").1, None);
        // arrow keys are swallowed
        assert_eq!(run(b"\x1b[Apoweroff\x1b[D\r").1, Some(Action::Poweroff));
        // CR LF gives one prompt, not two
        let (out, _) = run(b"\r\n");
        assert_eq!(out, format!("\n{PROMPT}"));
        // non-ASCII input is refused
        let (out, a) = run("r\u{e9}boot\r".as_bytes());
        assert_eq!(a, None);
        assert!(out.contains("only printable ASCII"));
    }
}
