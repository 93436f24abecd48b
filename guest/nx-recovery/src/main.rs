//! `nx-recovery [--state DIR] [--rebootd SOCK] [--bootctld SOCK] [--console-log FILE]`:
//! the recovery menu on stdin/stdout (the console, e.g. /dev/ttyS0). Exits 0 on `q` or when
//! the console closes.

use clap::Parser;
use nx_recovery::guest::{GuestBackend, GuestConfig};
use nx_recovery::Menu;
use std::io::{Read, Write};

/// The recovery menu: flash mode, diag, slot status, factory reset, reboot.
#[derive(Parser)]
#[command(name = "nx-recovery")]
struct Args {
    #[command(flatten)]
    guest: nx_diag::env::GuestArgs,
}

fn raw_mode() {
    let stdin = std::io::stdin();
    let Ok(mut t) = rustix::termios::tcgetattr(&stdin) else {
        return; // not a tty: the editor works the same
    };
    use rustix::termios::{InputModes, LocalModes, OptionalActions};
    t.local_modes
        .remove(LocalModes::ICANON | LocalModes::ECHO | LocalModes::ISIG | LocalModes::IEXTEN);
    t.input_modes
        .remove(InputModes::ICRNL | InputModes::INLCR | InputModes::IXON);
    let _ = rustix::termios::tcsetattr(&stdin, OptionalActions::Now, &t);
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut cfg = GuestConfig::guest();
    args.guest.apply(&mut cfg);
    let mut backend = GuestBackend { cfg };
    raw_mode();
    let mut menu = Menu::new();
    let mut stdout = std::io::stdout().lock();
    let mut out = Vec::new();
    menu.start(&mut out);
    let _ = stdout.write_all(&out);
    let _ = stdout.flush();
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 256];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) => return std::process::ExitCode::SUCCESS,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return std::process::ExitCode::FAILURE,
        };
        let mut out = Vec::new();
        let exit = menu.feed(&mut backend, buf.get(..n).unwrap_or_default(), &mut out);
        let _ = stdout.write_all(&out);
        let _ = stdout.flush();
        if exit.is_some() {
            return std::process::ExitCode::SUCCESS;
        }
    }
}
