//! recovery-sh on the console (stdin/stdout given by recovery-init: `/dev/ttyS0`).

use recovery_sh::{Action, Shell, PROMPT, READY_MARKER};
use std::io::{Read, Write};

fn raw_mode() {
    let stdin = std::io::stdin();
    let Ok(mut t) = rustix::termios::tcgetattr(&stdin) else {
        return; // not a tty (tests, pipes): the editor works the same
    };
    use rustix::termios::{InputModes, LocalModes, OptionalActions};
    t.local_modes
        .remove(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG | LocalModes::IEXTEN);
    t.input_modes
        .remove(InputModes::ICRNL | InputModes::INLCR | InputModes::IXON);
    let _ = rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &t);
}

fn main() -> std::process::ExitCode {
    raw_mode();
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(format!("{READY_MARKER}\n{PROMPT}").as_bytes());
    let _ = stdout.flush();
    let mut shell = Shell::new();
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return std::process::ExitCode::SUCCESS, // console gone; PID 1 restarts us
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return std::process::ExitCode::FAILURE,
        };
        let mut out = Vec::new();
        let action = shell.feed_all(buf.get(..n).unwrap_or_default(), &mut out);
        let _ = stdout.write_all(&out);
        let _ = stdout.flush();
        if let Some(action) = action {
            let what = match action {
                Action::Reboot => nx_guest::sys::Shutdown::Reboot,
                Action::Poweroff => nx_guest::sys::Shutdown::Poweroff,
            };
            if let Err(e) = nx_guest::sys::request_pid1(what) {
                let _ = stdout.write_all(format!("recovery-sh: error: {e}\n{PROMPT}").as_bytes());
                let _ = stdout.flush();
            }
        }
    }
}
