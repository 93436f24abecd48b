//! `rebootd --state DIR [--port-name NAME] [--listen SOCK]... [--reboot-method auto|init|stub]`

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;

/// The next-boot authority: persists STATE/boot/next_mode and reboots via PID 1.
#[derive(Parser)]
#[command(name = "rebootd")]
struct Args {
    /// State and serving (without a state dir reboot requests are refused).
    #[command(flatten)]
    serve: nx_rpc::serve_args::ServeArgs,
    /// How to reboot: `auto` signals PID 1 only when managed by our /init.
    #[arg(long, value_enum, default_value_t = rebootd::pid1::MethodArg::Auto)]
    reboot_method: rebootd::pid1::MethodArg,
    /// The device name operators type to confirm a factory reset
    /// (default: the kernel hostname when it is a plain name, else `nexus`).
    #[arg(long)]
    device: Option<String>,
    /// bootctld's socket for the JSON view in new diag bundles, or `none`.
    #[arg(long, default_value = rebootd::nx_diag::BOOTCTLD_SOCKET)]
    bootctld: String,
    /// A console/marker log file that new diag bundles include (its tail).
    #[arg(long)]
    console_log: Option<PathBuf>,
    /// efivarfs (the guest's /sys/firmware/efi/efivars): hand the next-boot record to the
    /// bootloader as its one-shot entry (LoaderEntryOneShot).
    #[arg(long)]
    efivars: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    nx_guest::marker::exit_code(run(Args::parse()), nx_contract::markers::rebootd::error)
}

fn run(args: Args) -> anyhow::Result<()> {
    let endpoints = args
        .serve
        .endpoints_required(rebootd::PORT_NAME, rebootd::DEFAULT_SOCKET)?;
    let mut options = rebootd::Options::default();
    if let Some(device) = args.device {
        if !rebootd::nx_reset::is_device_name(&device) {
            anyhow::bail!("--device {device:?}: use 1..=64 of [A-Za-z0-9._-]");
        }
        options.device = device;
    }
    options.bootctld_socket = (args.bootctld != "none").then(|| PathBuf::from(&args.bootctld));
    options.console_log = args.console_log;
    options.efivars = args.efivars;
    let config = rebootd::Config {
        state: args.serve.state,
        require_mountpoint: !args.serve.allow_unmounted_state,
        endpoints,
        reboot_method: args.reboot_method,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local
        .block_on(&rt, rebootd::run_with(config, options))
        .context("rebootd failed")?;
    Ok(())
}
