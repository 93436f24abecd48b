//! The shell against a fake backend that records every call.

use super::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Diag,
    SlotStatus,
    ResetPlan,
    FactoryWipe,
    RebootInto(Target),
    Shutdown(Shutdown),
}

impl Call {
    /// Calls that change something on `/state` (or power state).
    fn writes(&self) -> bool {
        matches!(
            self,
            Call::Diag | Call::FactoryWipe | Call::RebootInto(_) | Call::Shutdown(_)
        )
    }
}

const DEVICE: &str = "board-7";
const SUMMARY: &str = "factory reset plan for /state\nWIPED (1 file, 2 bytes):\n  /state/apps/  1 file, 0 dirs, 2 bytes\nPRESERVED:\n  /state/trust/\n";

struct Fake {
    calls: Vec<Call>,
    diag_fails: bool,
    slots_fail: bool,
    plan_fails: bool,
    wipe: Option<RebootOutcome>,
    reboot: Option<RebootOutcome>,
    pid1_fails: bool,
}

impl Default for Fake {
    fn default() -> Self {
        Fake {
            calls: Vec::new(),
            diag_fails: false,
            slots_fail: false,
            plan_fails: false,
            wipe: Some(RebootOutcome::Rebooting),
            reboot: Some(RebootOutcome::Rebooting),
            pid1_fails: false,
        }
    }
}

impl Backend for Fake {
    fn diag(&mut self) -> DiagReport {
        self.calls.push(Call::Diag);
        if self.diag_fails {
            return DiagReport {
                lines: vec!["nx-diag: collecting".into()],
                result: Err(BackendError::Diag(
                    "write /state/recovery/diag-1.tar.zst: No space left on device".into(),
                )),
            };
        }
        DiagReport {
            lines: vec![
                "nx-diag: wrote /state/recovery/diag-1.tar.zst (8 members)".into(),
                "recovery: diag written (bytes=1234)".into(),
            ],
            result: Ok(()),
        }
    }
    fn slot_status(&mut self) -> Result<String, BackendError> {
        self.calls.push(Call::SlotStatus);
        if self.slots_fail {
            return Err(BackendError::Service(
                "bootctld on /run/bootctld.sock did not answer (connect: No such file)\n; is bootctld running?".into(),
            ));
        }
        Ok("slot  active  health   trial  tries  version\na     *       good     no     0      1\x1b[31m\nb             empty    no     0      -".into())
    }
    fn reset_plan(&mut self) -> Result<ResetPlan, BackendError> {
        self.calls.push(Call::ResetPlan);
        if self.plan_fails {
            return Err(BackendError::Service(
                "rebootd on /run/rebootd.sock: connect: No such file or directory".into(),
            ));
        }
        Ok(ResetPlan {
            summary: SUMMARY.into(),
            device: DEVICE.into(),
        })
    }
    fn factory_wipe(&mut self) -> Result<RebootOutcome, BackendError> {
        self.calls.push(Call::FactoryWipe);
        self.wipe.ok_or_else(|| {
            BackendError::Service("rebootd on /run/rebootd.sock: state is not persistent".into())
        })
    }
    fn reboot_into(&mut self, target: Target) -> Result<RebootOutcome, BackendError> {
        self.calls.push(Call::RebootInto(target));
        self.reboot
            .ok_or_else(|| BackendError::Service("rebootd on /run/rebootd.sock: timed out".into()))
    }
    fn shutdown(&mut self, what: Shutdown) -> Result<(), BackendError> {
        self.calls.push(Call::Shutdown(what));
        if self.pid1_fails {
            return Err(BackendError::Pid1(nx_guest::Error::Sys {
                what: "kill(1, 15)".into(),
                source: std::io::Error::from_raw_os_error(1),
            }));
        }
        Ok(())
    }
}

/// Feed `input` to a fresh shell (after its start screen) and return the output of the
/// input alone.
fn run_with(fake: &mut Fake, input: &[u8]) -> String {
    let mut sh = Shell::new();
    let mut start = Vec::new();
    sh.start(&mut start);
    let mut out = Vec::new();
    sh.feed(fake, input, &mut out);
    String::from_utf8(out).unwrap()
}

fn run(input: &[u8]) -> (String, Vec<Call>) {
    let mut f = Fake::default();
    let out = run_with(&mut f, input);
    (out, f.calls)
}

fn error_lines(out: &str) -> Vec<&str> {
    out.lines()
        .filter(|l| l.contains("recovery-sh: error:"))
        .collect()
}

#[test]
fn start_screen() {
    let mut out = Vec::new();
    Shell::new().start(&mut out);
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with("recovery: shell ready\n"), "{out}");
    assert!(out.ends_with(PROMPT));
    assert!(
        !out.contains("recovery-sh: built-ins"),
        "help only when asked"
    );
}

#[test]
fn help_lists_every_builtin() {
    let (out, calls) = run(b"help\r");
    assert!(calls.is_empty());
    assert!(out.starts_with("help\nrecovery-sh: built-ins"), "{out}");
    for (usage, _) in BUILTINS {
        assert!(out.contains(&format!("  {usage} ")), "{usage}: {out}");
    }
    for word in [
        "diag",
        "slot status",
        "reset factory",
        "reboot normal|recovery",
        "poweroff",
    ] {
        assert!(out.contains(word), "{word}");
    }
    assert!(out.ends_with(PROMPT));
    let (out, calls) = run(b"help me\r");
    assert!(calls.is_empty());
    assert_eq!(
        error_lines(&out),
        ["recovery-sh: error: 'help' takes no arguments (type 'help')"]
    );
}

#[test]
fn diag_prints_the_markers() {
    let (out, calls) = run(b"diag\r");
    assert_eq!(calls, [Call::Diag]);
    assert!(
        out.contains("\nrecovery: diag written (bytes=1234)\n"),
        "{out}"
    );
    assert!(out.ends_with(PROMPT));
    assert!(error_lines(&out).is_empty());

    let mut f = Fake {
        diag_fails: true,
        ..Fake::default()
    };
    let out = run_with(&mut f, b"diag\r");
    assert_eq!(f.calls, [Call::Diag]);
    assert!(out.contains("nx-diag: collecting\n"), "{out}");
    assert_eq!(
        error_lines(&out),
        ["recovery-sh: error: diag failed: write /state/recovery/diag-1.tar.zst: No space left on device (is /state mounted and writable?)"]
    );
    assert!(out.ends_with(PROMPT));

    let (out, calls) = run(b"diag now\r");
    assert!(calls.is_empty());
    assert!(out.contains("'diag' takes no arguments"), "{out}");
}

#[test]
fn slot_status_shows_the_table() {
    let (out, calls) = run(b"slot status\r");
    assert_eq!(calls, [Call::SlotStatus]);
    assert!(out.contains("a     *       good"), "{out}");
    assert!(
        !out.contains('\x1b'),
        "escape sequences from a backend are defused"
    );
    assert!(out.ends_with(&format!("-\n{PROMPT}")), "{out:?}");

    let mut f = Fake {
        slots_fail: true,
        ..Fake::default()
    };
    let out = run_with(&mut f, b"slot   status \r");
    assert_eq!(f.calls, [Call::SlotStatus]);
    let errs = error_lines(&out);
    assert_eq!(errs.len(), 1, "one line: {out}");
    assert!(errs[0].contains("slot status unavailable: bootctld on /run/bootctld.sock did not answer (connect: No such file) ; is bootctld running?"), "{out}");
    assert!(out.ends_with(PROMPT));

    for bad in ["slot\r", "slot stat\r", "slot status now\r", "status\r"] {
        let (out, calls) = run(bad.as_bytes());
        assert!(calls.is_empty(), "{bad}");
        assert_eq!(error_lines(&out).len(), 1, "{bad}: {out}");
    }
    assert!(run(b"slot\r").0.contains("usage: slot status"));
}

#[test]
fn reset_factory_yes_and_the_device_name_wipes() {
    let mut f = Fake::default();
    let mut sh = Shell::new();
    let mut out = Vec::new();
    sh.feed(&mut f, b"reset factory\r", &mut out);
    let o = String::from_utf8(std::mem::take(&mut out)).unwrap();
    assert_eq!(f.calls, [Call::ResetPlan]);
    assert!(o.contains(SUMMARY), "the plan summary first: {o}");
    assert!(o.ends_with("Type yes to continue: "), "{o}");
    sh.feed(&mut f, b"yes\r", &mut out);
    let o = String::from_utf8(std::mem::take(&mut out)).unwrap();
    assert_eq!(o, "yes\nType the device name (board-7) to confirm: ");
    assert_eq!(
        f.calls,
        [Call::ResetPlan],
        "nothing before the second answer"
    );
    sh.feed(&mut f, b"board-7\r", &mut out);
    let o = String::from_utf8(std::mem::take(&mut out)).unwrap();
    assert_eq!(f.calls, [Call::ResetPlan, Call::FactoryWipe]);
    assert!(o.contains("factory reset confirmed"), "{o}");
    assert!(
        o.contains("the wipe request is recorded; rebooting into recovery"),
        "{o}"
    );
    assert!(
        !o.ends_with(PROMPT),
        "no prompt while the guest reboots: {o}"
    );
    assert!(sh.shutting_down());
    // The answers are not history.
    assert_eq!(sh.history().collect::<Vec<_>>(), ["reset factory"]);
}

#[test]
fn reset_factory_other_outcomes() {
    // rebootd records but cannot reboot (stub): the prompt comes back.
    let mut f = Fake {
        wipe: Some(RebootOutcome::RecordedOnly),
        ..Fake::default()
    };
    let out = run_with(&mut f, b"reset factory\ryes\rboard-7\rhelp\r");
    assert_eq!(f.calls, [Call::ResetPlan, Call::FactoryWipe]);
    assert!(
        out.contains("the wipe request is recorded, but rebootd cannot reboot here (stub)"),
        "{out}"
    );
    assert!(
        out.contains("recovery-sh: built-ins"),
        "prompt is back: {out}"
    );
    // rebootd fails: one error line, prompt.
    let mut f = Fake {
        wipe: None,
        ..Fake::default()
    };
    let out = run_with(&mut f, b"reset factory\ryes\rboard-7\r");
    assert_eq!(
        error_lines(&out),
        ["recovery-sh: error: factory reset failed: rebootd on /run/rebootd.sock: state is not persistent; nothing was wiped (is rebootd running? 'diag' collects the logs)"]
    );
    assert!(out.ends_with(PROMPT));
    // No plan: no confirmation starts, "yes" is just an unknown command.
    let mut f = Fake {
        plan_fails: true,
        ..Fake::default()
    };
    let out = run_with(&mut f, b"reset factory\ryes\rboard-7\r");
    assert_eq!(f.calls, [Call::ResetPlan]);
    assert!(
        out.contains("factory reset unavailable: rebootd on /run/rebootd.sock: connect: No such file or directory; nothing was changed"),
        "{out}"
    );
    assert!(out.contains("unknown command 'yes'"), "{out}");
    assert!(out.contains("unknown command 'board-7'"), "{out}");
    // Usage errors.
    for bad in ["reset\r", "reset factory now\r", "reset all\r"] {
        let (out, calls) = run(bad.as_bytes());
        assert!(calls.is_empty(), "{bad}");
        assert!(out.contains("usage: reset factory"), "{bad}: {out}");
    }
}

#[test]
fn wrong_answers_and_ctrl_c_cancel_the_reset() {
    let mut long = b"reset factory\ryes\r".to_vec();
    long.extend(std::iter::repeat_n(b'b', 10 * 1024));
    long.push(b'\r');
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no", b"reset factory\rno\r".to_vec()),
        ("YES", b"reset factory\rYES\rboard-7\r".to_vec()),
        ("y", b"reset factory\ry\rboard-7\r".to_vec()),
        ("empty first", b"reset factory\r\rboard-7\r".to_vec()),
        ("wrong name", b"reset factory\ryes\rboard-8\r".to_vec()),
        ("name prefix", b"reset factory\ryes\rboard\r".to_vec()),
        ("empty name", b"reset factory\ryes\r\r".to_vec()),
        ("yes twice", b"reset factory\ryes\ryes\r".to_vec()),
        (
            "Ctrl-C at the first question",
            b"reset factory\r\x03yes\rboard-7\r".to_vec(),
        ),
        (
            "Ctrl-C while typing yes",
            b"reset factory\rye\x03s\rboard-7\r".to_vec(),
        ),
        (
            "Ctrl-C at the second question",
            b"reset factory\ryes\rboard\x03-7\r".to_vec(),
        ),
        (
            "Ctrl-D at the second question",
            b"reset factory\ryes\r\x04board-7\r".to_vec(),
        ),
        ("too long name", long),
        (
            "non-ASCII name",
            "reset factory\ryes\rbo\u{e4}rd-7\r".as_bytes().to_vec(),
        ),
    ];
    for (what, input) in cases {
        let mut f = Fake::default();
        let out = run_with(&mut f, &input);
        assert_eq!(f.calls, [Call::ResetPlan], "{what}: {out}");
        assert!(out.contains("factory reset cancelled"), "{what}: {out}");
        assert!(out.contains("nothing was changed"), "{what}: {out}");
        assert!(out.ends_with(PROMPT), "{what}: {out}");
    }
    // Ctrl-U keeps the question and asks it again.
    let mut f = Fake::default();
    let out = run_with(&mut f, b"reset factory\ryes\rboa\x15board-7\r");
    assert_eq!(f.calls, [Call::ResetPlan, Call::FactoryWipe], "{out}");
    assert!(out.contains("^U\nType the device name (board-7) to confirm: board-7\n"));
}

#[test]
fn reboot_and_poweroff_ask_pid1() {
    for (input, call, msg) in [
        (
            &b"reboot\r"[..],
            Call::Shutdown(Shutdown::Reboot),
            "recovery-sh: rebooting",
        ),
        (
            b"  reboot  \n",
            Call::Shutdown(Shutdown::Reboot),
            "recovery-sh: rebooting",
        ),
        (
            b"poweroff\r",
            Call::Shutdown(Shutdown::Poweroff),
            "recovery-sh: powering off",
        ),
    ] {
        let mut f = Fake::default();
        let out = run_with(&mut f, input);
        assert_eq!(f.calls, [call]);
        assert!(out.contains(msg), "{out}");
        assert!(!out.ends_with(PROMPT), "{out}");
    }
    // PID 1 does not take the signal: error, prompt, usable again.
    let mut f = Fake {
        pid1_fails: true,
        ..Fake::default()
    };
    let out = run_with(&mut f, b"poweroff\rhelp\r");
    assert_eq!(f.calls, [Call::Shutdown(Shutdown::Poweroff)]);
    assert_eq!(
        error_lines(&out),
        ["recovery-sh: error: poweroff failed: cannot signal PID 1: kill(1, 15): Operation not permitted (os error 1) (is recovery-init PID 1?)"]
    );
    assert!(out.contains("recovery-sh: built-ins"));
    let (out, calls) = run(b"poweroff now\r");
    assert!(calls.is_empty());
    assert!(out.contains("'poweroff' takes no arguments"));
}

#[test]
fn reboot_normal_and_recovery_go_through_rebootd() {
    for (input, t) in [
        (&b"reboot normal\r"[..], Target::Normal),
        (b"reboot recovery\r", Target::Recovery),
    ] {
        let mut f = Fake::default();
        let out = run_with(&mut f, input);
        assert_eq!(f.calls, [Call::RebootInto(t)], "never PID 1 directly");
        assert!(out.contains(&format!("recovery-sh: rebooting into {t}\n")));
        assert!(!out.ends_with(PROMPT));
    }
    let mut f = Fake {
        reboot: Some(RebootOutcome::RecordedOnly),
        ..Fake::default()
    };
    let out = run_with(&mut f, b"reboot recovery\r");
    assert!(
        out.contains("next boot: recovery (recorded), but rebootd cannot reboot here (stub)"),
        "{out}"
    );
    assert!(out.ends_with(PROMPT));
    let mut f = Fake {
        reboot: None,
        ..Fake::default()
    };
    let out = run_with(&mut f, b"reboot normal\r");
    assert_eq!(
        error_lines(&out),
        ["recovery-sh: error: reboot normal failed: rebootd on /run/rebootd.sock: timed out (plain 'reboot' asks PID 1 directly)"]
    );
    assert!(out.ends_with(PROMPT));
    for bad in [
        "reboot fastboot\r",
        "reboot Normal\r",
        "reboot normal now\r",
        "reboot -f\r",
    ] {
        let (out, calls) = run(bad.as_bytes());
        assert!(calls.is_empty(), "{bad}");
        assert_eq!(error_lines(&out).len(), 1, "{bad}: {out}");
        assert!(out.contains("usage: reboot [normal|recovery]"), "{bad}");
        assert!(out.ends_with(PROMPT));
    }
}

/// Issue 6 acceptance: `sh`, `/bin/sh`, `exec …` or a 10 KiB line get an error and the
/// prompt; nothing runs.
#[test]
fn nothing_executes() {
    for cmd in [
        "sh",
        "/bin/sh",
        "exec /bin/sh",
        "exec",
        "exec reboot",
        "busybox sh",
        "busybox",
        "; reboot",
        ";reboot",
        "reboot;sh",
        "reboot&&sh",
        "$(reboot)",
        "`reboot`",
        "|sh",
        "./recovery-sh",
        "/bin/recovery-sh",
        "nx-recovery",
        "HELP",
        "Reboot",
        "sh -c reboot",
        "env",
        "..",
        "'reboot'",
        "\"poweroff\"",
    ] {
        let (out, calls) = run(format!("{cmd}\r").as_bytes());
        assert!(calls.is_empty(), "{cmd}: {calls:?}");
        let first = cmd.split_whitespace().next().unwrap();
        assert_eq!(
            error_lines(&out),
            [format!(
                "recovery-sh: error: unknown command '{first}' (type 'help')"
            )],
            "{cmd}"
        );
        assert_eq!(
            out,
            format!("{cmd}\nrecovery-sh: error: unknown command '{first}' (type 'help')\n{PROMPT}")
        );
    }
    // The strings the QEMU script profile `recovery-shell` expects.
    assert!(run(b"/bin/sh\r")
        .0
        .contains("recovery-sh: error: unknown command '/bin/sh'"));
    assert!(run(b"exec /bin/sh\r")
        .0
        .contains("recovery-sh: error: unknown command 'exec'"));
    // Empty and blank lines: just the prompt again.
    for blank in [&b"\r"[..], b"   \r", b"\t\r", b"\x01\x02\r"] {
        let (out, calls) = run(blank);
        assert!(calls.is_empty());
        assert!(out.ends_with(&format!("\n{PROMPT}")), "{out:?}");
        assert!(error_lines(&out).is_empty());
    }
    // A long unknown name is shown cut.
    let (out, _) = run(format!("{}\r", "z".repeat(200)).as_bytes());
    assert!(out.contains(&format!("unknown command '{}'", "z".repeat(32))));
}

#[test]
fn a_10kib_line_is_refused_whole() {
    for fill in [&b"a"[..], b"reboot ", b"poweroff;", b" ", b"reset factory "] {
        let mut input: Vec<u8> = fill.iter().copied().cycle().take(10 * 1024).collect();
        input.extend_from_slice(b"reboot\r");
        let (out, calls) = run(&input);
        assert!(
            calls.is_empty(),
            "{:?}: {calls:?}",
            String::from_utf8_lossy(fill)
        );
        assert_eq!(
            error_lines(&out),
            ["recovery-sh: error: line longer than 256 bytes, ignored; nothing was run"]
        );
        assert!(out.ends_with(PROMPT));
        assert!(out.len() < MAX_LINE + 200, "echo is bounded: {}", out.len());
    }
    // The excess is dropped with the line, not run as a next command, and the next line works.
    let mut input = vec![b'x'; MAX_LINE];
    input.extend_from_slice(b"poweroff\rslot status\r");
    let (out, calls) = run(&input);
    assert_eq!(calls, [Call::SlotStatus], "{out}");
    assert_eq!(error_lines(&out).len(), 1);
    // A long line without Enter runs nothing either.
    let (_, calls) = run(&vec![b'r'; 64 * 1024]);
    assert!(calls.is_empty());
    // Exactly MAX_LINE bytes is a line (an unknown command); one more is refused.
    let (out, _) = run(&[vec![b'x'; MAX_LINE], b"\r".to_vec()].concat());
    assert!(out.contains("unknown command"));
    let (out, _) = run(&[vec![b'x'; MAX_LINE + 1], b"\r".to_vec()].concat());
    assert!(out.contains("line longer than 256 bytes"));
    // Backspace does not revive a refused line.
    let mut input = vec![b'x'; MAX_LINE + 10];
    input.extend(std::iter::repeat_n(0x7f, 300));
    input.extend_from_slice(b"help\r");
    let (out, _) = run(&input);
    assert!(out.contains("line longer than"));
    assert!(!out.contains("built-ins"));
}

#[test]
fn editing_keys() {
    // Backspace fixes a typo.
    assert_eq!(run(b"rebooq\x7ft\r").1, [Call::Shutdown(Shutdown::Reboot)]);
    assert_eq!(run(b"diaf\x08g\r").1, [Call::Diag]);
    // Ctrl-C and Ctrl-U drop the line.
    let (out, calls) = run(b"reboot\x03\r");
    assert!(calls.is_empty());
    assert!(out.contains("^C\n"));
    assert!(run(b"reboot\x15\r").1.is_empty());
    // Ctrl-D: a hint on an empty line, nothing in a line.
    let (out, calls) = run(b"\x04");
    assert!(calls.is_empty());
    assert!(out.contains("Ctrl-D does nothing here"), "{out}");
    assert!(out.ends_with(PROMPT));
    assert_eq!(run(b"dia\x04g\r").1, [Call::Diag]);
    // CR LF gives one prompt, not two; LF alone is Enter too.
    let (out, _) = run(b"\r\n");
    assert_eq!(out, format!("\n{PROMPT}"));
    let (out, _) = run(b"\n\n");
    assert_eq!(out, format!("\n{PROMPT}\n{PROMPT}"));
    // Non-ASCII input is refused.
    let (out, calls) = run("r\u{e9}boot\r".as_bytes());
    assert!(calls.is_empty());
    assert!(out.contains("only printable ASCII"));
}

#[test]
fn escape_sequences_are_swallowed() {
    // Left/right, home/end, function keys, Alt-x: nothing reaches the line.
    for seq in [
        &b"\x1b[D"[..],
        b"\x1b[C",
        b"\x1b[H",
        b"\x1b[1;5C",
        b"\x1b[15~",
        b"\x1bOP",
        b"\x1bOD",
        b"\x1bx",
        b"\x1b[?2004h",
    ] {
        let input = [b"pow".as_slice(), seq, b"eroff\r"].concat();
        let (out, calls) = run(&input);
        assert_eq!(
            calls,
            [Call::Shutdown(Shutdown::Poweroff)],
            "{seq:?}: {out:?}"
        );
    }
    // Enter inside a broken sequence still ends the line.
    let (out, calls) = run(b"help\x1b[12\r");
    assert!(calls.is_empty());
    assert!(out.contains("recovery-sh: built-ins"), "{out:?}");
    let (_, calls) = run(b"diag\x1b\r");
    assert_eq!(calls, [Call::Diag]);
    // An endless parameter list is bounded (nothing stored) and runs nothing.
    let mut input = b"\x1b[".to_vec();
    input.extend(std::iter::repeat_n(b'1', 10 * 1024));
    let (out, calls) = run(&input);
    assert!(calls.is_empty());
    assert!(out.is_empty());
}

#[test]
fn history_is_bounded_and_recalled_with_arrows() {
    let mut f = Fake::default();
    let mut sh = Shell::new();
    let mut out = Vec::new();
    sh.feed(&mut f, b"help\rslot status\rslot status\r\r", &mut out);
    assert_eq!(
        sh.history().collect::<Vec<_>>(),
        ["help", "slot status"],
        "no repeats, no empty lines"
    );
    // Up twice → help, Enter runs it; Up/Down with SS3 too.
    out.clear();
    sh.feed(&mut f, b"\x1b[A\x1b[A", &mut out);
    assert!(
        String::from_utf8_lossy(&out).ends_with(&format!("\r\x1b[K{PROMPT}help")),
        "{out:?}"
    );
    sh.feed(&mut f, b"\r", &mut out);
    assert!(String::from_utf8_lossy(&out).contains("recovery-sh: built-ins"));
    out.clear();
    sh.feed(&mut f, b"\x1bOA\x1bOB", &mut out);
    assert!(
        String::from_utf8_lossy(&out).ends_with(&format!("\r\x1b[K{PROMPT}")),
        "Down past the newest gives an empty line: {out:?}"
    );
    out.clear();
    sh.feed(&mut f, b"\x1b[B", &mut out);
    assert_eq!(out, b"\x07", "Down when not browsing rings");
    sh.feed(&mut f, b"\r", &mut out);
    // Bounded: the oldest fall off.
    let mut f = Fake::default();
    let mut sh = Shell::new();
    for i in 0..(MAX_HISTORY + 8) {
        sh.feed(&mut f, format!("cmd{i}\r").as_bytes(), &mut Vec::new());
    }
    let h: Vec<_> = sh.history().collect();
    assert_eq!(h.len(), MAX_HISTORY);
    assert_eq!(h[0], "cmd8");
    assert_eq!(h[MAX_HISTORY - 1], format!("cmd{}", MAX_HISTORY + 7));
    let mut out = Vec::new();
    let ups: Vec<u8> = b"\x1b[A".repeat(MAX_HISTORY + 5);
    sh.feed(&mut f, &ups, &mut out);
    let o = String::from_utf8_lossy(&out);
    assert!(
        o.ends_with(&format!("{PROMPT}cmd8\x07\x07\x07\x07\x07")),
        "Up past the oldest rings: {o:?}"
    );
    assert_eq!(sh.line, b"cmd8");
    assert!(f.calls.is_empty());
    // Refused lines are not history; recalled lines are run like typed ones.
    let mut f = Fake::default();
    let mut sh = Shell::new();
    sh.feed(
        &mut f,
        &[vec![b'y'; 300], b"\r".to_vec()].concat(),
        &mut Vec::new(),
    );
    sh.feed(&mut f, "\u{e9}\r".as_bytes(), &mut Vec::new());
    assert_eq!(sh.history().count(), 0);
    sh.feed(&mut f, b"reset factory\r\x03\x1b[A\r", &mut Vec::new());
    assert_eq!(
        f.calls,
        [Call::ResetPlan, Call::ResetPlan],
        "a recalled reset asks again"
    );
    // No history inside a confirmation (Up does not leak the last command into an answer).
    let mut out = Vec::new();
    sh.feed(&mut f, b"\x1b[A", &mut out);
    assert!(out.is_empty(), "{out:?}");
    sh.feed(&mut f, b"yes\r", &mut out);
    assert!(String::from_utf8_lossy(&out).contains("Type the device name"));
}

#[test]
fn input_is_ignored_while_shutting_down() {
    let mut f = Fake::default();
    let mut sh = Shell::new();
    let mut out = Vec::new();
    sh.feed(
        &mut f,
        b"reboot\rreset factory\ryes\rboard-7\rdiag\r",
        &mut out,
    );
    assert_eq!(f.calls, [Call::Shutdown(Shutdown::Reboot)]);
    let o = String::from_utf8(std::mem::take(&mut out)).unwrap();
    assert_eq!(
        o.matches("shutting down; input is ignored").count(),
        4,
        "{o}"
    );
    // Ctrl-C gives the prompt back in case the reboot never comes.
    sh.feed(&mut f, b"\x03", &mut out);
    let o = String::from_utf8(std::mem::take(&mut out)).unwrap();
    assert!(o.contains("has not happened (yet)"), "{o}");
    assert!(o.ends_with(PROMPT));
    assert!(!sh.shutting_down());
    sh.feed(&mut f, b"slot status\r", &mut out);
    assert_eq!(
        f.calls,
        [Call::Shutdown(Shutdown::Reboot), Call::SlotStatus]
    );
}

/// Recovery is read-only by default: no input except `diag`, a confirmed `reset factory` and
/// the reboot / power-off commands leads to a backend call that writes.
#[test]
fn read_only_unless_asked() {
    let mut input = Vec::new();
    for line in [
        "help",
        "slot status",
        "reset factory",
        "no",
        "reset factory",
        "yes",
        "board-8",
        "reset factory",
        "yes",
        "BOARD-7",
        "sh",
        "/bin/sh",
        "exec /bin/sh",
        "diag x",
        "diag;",
        "Diag",
        "reboot now",
        "reboot -f",
        "poweroff -f",
        "reset factory --yes",
        "reset",
        "board-7",
        "yes",
    ] {
        input.extend_from_slice(line.as_bytes());
        input.push(b'\r');
    }
    input.extend_from_slice(b"reset factory\ryes\rboard-\x037\r");
    input.extend_from_slice(b"reset factory\ryes\r\x04");
    input.extend_from_slice(b"reset factory\r\x1b[Aboard-7\r");
    input.extend(std::iter::repeat_n(b'd', 10 * 1024));
    input.extend_from_slice(b"\r\x04\x1b[A\x1b[B\x15\x03");
    let mut f = Fake::default();
    let out = run_with(&mut f, &input);
    let writes: Vec<_> = f.calls.iter().filter(|c| c.writes()).collect();
    assert!(writes.is_empty(), "{writes:?}\n{out}");
    assert!(f.calls.contains(&Call::SlotStatus));
    assert!(f.calls.contains(&Call::ResetPlan));
    // And the writing calls come only from their own commands.
    for (line, call) in [
        ("diag\r", Call::Diag),
        ("reset factory\ryes\rboard-7\r", Call::FactoryWipe),
        ("reboot normal\r", Call::RebootInto(Target::Normal)),
        ("reboot recovery\r", Call::RebootInto(Target::Recovery)),
        ("reboot\r", Call::Shutdown(Shutdown::Reboot)),
        ("poweroff\r", Call::Shutdown(Shutdown::Poweroff)),
    ] {
        let (_, calls) = run(line.as_bytes());
        let writes: Vec<_> = calls.into_iter().filter(Call::writes).collect();
        assert_eq!(writes, [call], "{line:?}");
    }
}

/// Random bytes (deterministic): never a panic, never a wipe or a power action, the prompt
/// keeps coming back.
#[test]
fn random_input_is_harmless() {
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet: &[u8] =
        b"shexcbin/ ;|&$`'\"reboot\x1b[AOBDC~0123456789\x03\x04\x08\x15\x7f\r\n\t\x80\xff";
    let mut f = Fake::default();
    let mut sh = Shell::new();
    for _ in 0..200 {
        let len = (next() % 2048) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        let mut out = Vec::new();
        sh.feed(&mut f, &bytes, &mut out);
        assert!(sh.line.len() <= MAX_LINE);
        assert!(sh.history().count() <= MAX_HISTORY);
    }
    assert!(
        f.calls
            .iter()
            .all(|c| !matches!(c, Call::FactoryWipe | Call::Shutdown(_))),
        "{:?}",
        f.calls
    );
}

#[test]
fn error_messages_are_one_bounded_line() {
    assert_eq!(one_line("a\nb\tc"), "a b c");
    let long = "x".repeat(1000);
    let s = one_line(&long);
    assert_eq!(s.chars().count(), MAX_MESSAGE + 1);
    assert!(s.ends_with('…'));
    assert_eq!(clean_text("a\x1b[31mb"), "a?[31mb\n");
    assert_eq!(clean_text(""), "");
}
