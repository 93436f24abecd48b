//! `nx-diag [--state DIR] [--console-log FILE] [--bootctld SOCK|none] [--kmsg PATH]...`
//!
//! Writes `STATE/recovery/diag-<n>.tar.zst` and prints `recovery: diag written (bytes=<n>)`;
//! with no usable state dir: `nx-diag: not available — …` and `recovery: diag written (bytes=0)`
//! (exit 0 both). Exit 1 only when writing failed.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// Write a diagnostics bundle to STATE/recovery/diag-<n>.tar.zst.
#[derive(Parser)]
#[command(name = "nx-diag")]
struct Args {
    /// The state dir (the guest's /state).
    #[arg(long, default_value = nx_contract::state::STATE_MOUNT)]
    state: PathBuf,
    /// Accept a state dir that is not a mount point (host runs).
    #[arg(long)]
    allow_unmounted_state: bool,
    /// The console/marker log file to include (its tail).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// bootctld's socket for the JSON view, or `none`.
    #[arg(long, default_value = nx_diag::BOOTCTLD_SOCKET)]
    bootctld: String,
    /// Kernel log sources, tried in order (default /dev/kmsg, then /proc/kmsg).
    #[arg(long)]
    kmsg: Vec<PathBuf>,
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "{}",
                nx_contract::markers::diag::error(format_args!("{e:#}"))
            );
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut cfg = nx_diag::Config::guest(&args.state);
    cfg.require_mountpoint = !args.allow_unmounted_state;
    cfg.console_log = args.console_log;
    if !args.kmsg.is_empty() {
        cfg.kmsg_sources = args.kmsg;
    }
    let view = if args.bootctld == "none" {
        nx_rpc::bootctl::View::Unavailable("not asked (--bootctld none)".into())
    } else {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("could not start the tokio runtime")?;
        rt.block_on(nx_rpc::bootctl::fetch_view(
            std::path::Path::new(&args.bootctld),
            Duration::from_secs(3),
        ))
    };
    nx_diag::run(&cfg, &view, &mut |l| nx_diag_print(l))
        .context("writing the diag bundle failed; see the reason above")?;
    Ok(())
}

/// Print a contract marker as one line with a single write (nx-diag does not link nx-guest).
fn nx_diag_print(marker: &nx_contract::Marker) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(format!("{marker}\n").as_bytes());
    let _ = out.flush();
}
