//! `bootctld --state DIR [--port-name NAME] [--listen SOCK]... [--rebootd SOCK|none]`

use anyhow::Context;
use bootctld::service::RebootVia;
use clap::Parser;
use std::path::PathBuf;

/// The A/B slot-state authority (Cap'n Proto RPC).
#[derive(Parser)]
#[command(name = "bootctld")]
struct Args {
    /// State and serving (the snapshot is STATE/bootctl/state.nxs).
    #[command(flatten)]
    serve: nx_rpc::serve_args::ServeArgs,
    /// rebootd's socket for reboot(), or `none` (reboot() is a stub).
    #[arg(long, default_value = nx_rpc::reboot::SOCKET)]
    rebootd: String,
    /// The mounted ESP (e.g. /boot/efi): keep its boot entries in step with the slot state.
    #[arg(long)]
    esp: Option<PathBuf>,
    /// efivarfs (the guest's /sys/firmware/efi/efivars): at bootAttempt, follow what the
    /// bootloader booted (LoaderEntrySelected, LoaderBootCountPath, nexus.slot=).
    #[arg(long)]
    efivars: Option<PathBuf>,
    /// Print the JSON view of the persisted state and exit (no serving).
    #[arg(long)]
    export_json: bool,
    /// Override this boot's id (tests; default: /proc/sys/kernel/random/boot_id).
    #[arg(long, hide = true)]
    boot_id: Option<String>,
}

fn main() -> std::process::ExitCode {
    nx_guest::marker::exit_code(run(Args::parse()), nx_contract::markers::bootctld::error)
}

fn run(args: Args) -> anyhow::Result<()> {
    let reboot = if args.rebootd == "none" {
        RebootVia::Stub("started with --rebootd none".into())
    } else {
        RebootVia::Rebootd(PathBuf::from(&args.rebootd))
    };
    let config = bootctld::Config {
        state: args.serve.state.clone(),
        require_mountpoint: !args.serve.allow_unmounted_state,
        endpoints: args.serve.endpoints(),
        reboot,
        boot_id: args.boot_id,
        markers: bootctld::service::Markers::stdout(),
        esp: args.esp,
        loader: args.efivars.as_deref().and_then(bootctld::read_loader_boot),
    };
    if args.export_json {
        let (daemon, notes) = bootctld::open_daemon(&config);
        for note in &notes {
            eprintln!("{note}");
        }
        print!("{}", daemon.json());
        return Ok(());
    }
    args.serve
        .endpoints_required(bootctld::PORT_NAME, bootctld::DEFAULT_SOCKET)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    local
        .block_on(&rt, bootctld::run(config))
        .context("bootctld failed")?;
    Ok(())
}
