//! `nx-recovery [--state DIR] [--rebootd SOCK] [--bootctld SOCK] [--console-log FILE]`:
//! the recovery menu on stdin/stdout (the console, e.g. /dev/ttyS0). Exits 0 on `q` or when
//! the console closes.

use clap::Parser;
use nx_recovery::guest::{GuestBackend, GuestConfig};
use nx_recovery::Menu;
use std::io::{Read, Write};
use std::path::PathBuf;

/// The recovery menu: flash mode, diag, slot status, factory reset, reboot.
#[derive(Parser)]
#[command(name = "nx-recovery")]
struct Args {
    /// The state dir.
    #[arg(long, default_value = nx_contract::state::STATE_MOUNT)]
    state: PathBuf,
    /// Accept a state dir that is not a mount point (host runs).
    #[arg(long)]
    allow_unmounted_state: bool,
    /// rebootd's socket.
    #[arg(long, default_value = nx_rpc::reboot::SOCKET)]
    rebootd: PathBuf,
    /// bootctld's socket.
    #[arg(long, default_value = nx_rpc::bootctl::SOCKET)]
    bootctld: PathBuf,
    /// A console/marker log file for diag bundles.
    #[arg(long)]
    console_log: Option<PathBuf>,
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
    cfg.state_root = args.state;
    cfg.require_mountpoint = !args.allow_unmounted_state;
    cfg.rebootd = args.rebootd;
    cfg.bootctld = args.bootctld;
    cfg.console_log = args.console_log;
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
