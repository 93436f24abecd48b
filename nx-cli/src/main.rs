//! `nx` — flash, verify and recover nexus devices.
//!
//! Thin binary: argument parsing and dispatch. Each verb group lives in its own
//! module of the `nx_cli` library and owns its clap `Args`.

use clap::{CommandFactory, Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "nx",
    version,
    about = "Flash, verify and recover nexus devices",
    long_about = "Flash, verify and recover nexus devices.\n\n\
        Typical session:\n  \
        nx image build --rootfs DIR --version 1 --out build/nexus-os.img\n  \
        nx flash send build/nexus-os.img\n  \
        nx flash reboot normal",
    after_help = nx_cli::exit_table!()
)]
struct Cli {
    /// Less output: errors and results only (no progress, no notes).
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// More output: a line for every connection attempt (`nx flash send`).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build, verify and inspect OS images; make signing keys.
    Image(nx_cli::image::ImageArgs),
    /// A/B slots: status, set-active (trial), confirm, mark-bad (talks to bootctld).
    Boot(nx_cli::boot::BootArgs),
    /// Flash an image to a target (send), query (info) and verify the install; reboot.
    Flash(nx_cli::flash::FlashArgs),
    /// Factory reset: the exact plan (--dry-run), or wipe apps/content/settings after a double confirmation (talks to rebootd).
    Reset(nx_cli::reset::ResetArgs),
    /// Recovery tools: fetch the newest diagnostics bundle from the guest (talks to rebootd).
    Recovery(nx_cli::recovery::RecoveryArgs),
    /// One screen about the target: device, mode, booted slot, both slots, next boot, installed image.
    Status(nx_cli::status::StatusArgs),
    /// The guests this checkout runs: run directory, device, mode, active slot, version.
    Devices(nx_cli::devices::DevicesArgs),
    /// Print the shell completion script (bash, zsh or fish) on stdout.
    Completions(nx_cli::completions::CompletionsArgs),
    /// Print the man page nx(1) (roff) on stdout: `nx man > ~/.local/share/man/man1/nx.1`.
    Man,
}

fn main() -> ExitCode {
    nx_guest::alloc::fix_mmap_threshold();
    let cli = Cli::parse();
    nx_cli::verbosity::set(if cli.quiet {
        nx_cli::verbosity::Level::Quiet
    } else if cli.verbose {
        nx_cli::verbosity::Level::Verbose
    } else {
        nx_cli::verbosity::Level::Normal
    });
    let result = match cli.cmd {
        Command::Image(args) => nx_cli::image::run(args),
        Command::Boot(args) => nx_cli::boot::run(args),
        Command::Flash(args) => nx_cli::flash::run(args),
        Command::Reset(args) => nx_cli::reset::run(args),
        Command::Recovery(args) => nx_cli::recovery::run(args),
        Command::Status(args) => nx_cli::status::run(args),
        Command::Devices(args) => nx_cli::devices::run(args),
        Command::Completions(args) => nx_cli::completions::run(args, Cli::command()),
        Command::Man => nx_cli::man::run(Cli::command()),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("nx: error: {err:#}");
            nx_cli::exit::Exit::of_error(&err).into()
        }
    }
}
