//! recovery-sh on the console (stdin/stdout given by recovery-init: `/dev/ttyS0`), with the
//! real backend (rebootd, bootctld, nx-diag, PID 1). Exits when the console is gone;
//! recovery-init restarts it.

use recovery_sh::guest::GuestBackend;
use recovery_sh::Shell;
use std::io::Read;

/// Raw input (no line discipline, no signals from Ctrl-C, no flow control, one byte is
/// enough for a read); output processing (LF → CR LF) stays on.
fn raw_mode() {
    let stdin = std::io::stdin();
    let Ok(mut t) = rustix::termios::tcgetattr(&stdin) else {
        return; // not a tty (tests, pipes): the editor works the same
    };
    use rustix::termios::{InputModes, LocalModes, OptionalActions, SpecialCodeIndex};
    t.local_modes
        .remove(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG | LocalModes::IEXTEN);
    t.input_modes
        .remove(InputModes::ICRNL | InputModes::INLCR | InputModes::IXON);
    t.special_codes[SpecialCodeIndex::VMIN] = 1;
    t.special_codes[SpecialCodeIndex::VTIME] = 0;
    let _ = rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &t);
}

fn main() -> std::process::ExitCode {
    raw_mode();
    let mut backend = GuestBackend::new();
    let mut shell = Shell::new();
    let mut stdout = std::io::stdout().lock();
    shell.start(&mut stdout);
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return std::process::ExitCode::SUCCESS, // console gone; PID 1 restarts us
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return std::process::ExitCode::FAILURE,
        };
        shell.feed(&mut backend, buf.get(..n).unwrap_or_default(), &mut stdout);
    }
}
