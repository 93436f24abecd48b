//! `selftest-client --mode recovery|normal [--confirm] [--force] [paths…]`
//!
//! Does nothing (exit 0) unless `nexus.selftest=1` is on the kernel command line (or
//! `--force`). Prints the SELFTEST markers (see the library docs); exit 1 when a check failed.

use clap::Parser;
use selftest_client::{confirm_slot, run_all, Ctx, Mode};

/// In-guest selftest: prints a SELFTEST marker after each real check.
#[derive(Parser)]
#[command(name = "selftest-client", version = BUILD)]
struct Args {
    /// Which boot this is (recovery-init passes recovery, init passes normal).
    #[arg(long, value_enum)]
    mode: Mode,
    /// Run even without nexus.selftest=1 on the kernel command line.
    #[arg(long)]
    force: bool,
    /// Normal boot: after every check passed, confirm() the booted slot (the health check).
    #[arg(long)]
    confirm: bool,
    #[command(flatten)]
    guest: nx_diag::env::GuestArgs,
    /// Seconds to wait for the daemons (they start together with the selftest).
    #[arg(long, default_value_t = 30)]
    wait: u64,
}

/// `--version`: the package version, or the build note a build sets (`NX_BUILD_NOTE`; the
/// delta benchmark rebuilds this binary with one to make a realistic "changed service").
const BUILD: &str = match option_env!("NX_BUILD_NOTE") {
    Some(n) => n,
    None => env!("CARGO_PKG_VERSION"),
};

use nx_contract::markers::selftest as m;
use nx_guest::marker::show;

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if !args.force {
        let on = nx_guest::cmdline::Cmdline::system()
            .map(|c| c.flag("nexus.selftest"))
            .unwrap_or(false);
        if !on {
            show(&m::not_enabled());
            return std::process::ExitCode::SUCCESS;
        }
    }
    let mut ctx = Ctx::guest(args.mode);
    args.guest.apply(&mut ctx.env);
    ctx.wait = std::time::Duration::from_secs(args.wait);
    show(&m::start(match args.mode {
        Mode::Recovery => "recovery",
        Mode::Normal => "normal",
    }));
    let summary = run_all(&ctx, &mut |l| show(l));
    if args.confirm && args.mode == Mode::Normal {
        if summary.failed == 0 {
            match confirm_slot(&ctx) {
                Ok(()) => show(&m::confirmed()),
                Err(e) => show(&m::error(e)),
            }
        } else {
            show(&m::not_confirming());
        }
    }
    if summary.failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
