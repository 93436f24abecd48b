//! `cargo xtask …` — the build system of nexus (see README.md and ARCHITECTURE.md).
//!
//! One module per recipe; `main` only parses and dispatches.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod bench;
mod ci;
mod codegen;
mod crash;
mod crashsim;
mod demo;
mod disks;
mod e2e;
mod esp;
mod fuzz;
mod guest;
mod host_tools;
mod initramfs;
mod install;
mod kernel;
mod keys;
mod qemu_test;
mod recovery;
mod userland;
mod util;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test nexus")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything CI runs: fmt check, clippy -D warnings, all tests (incl. QEMU e2e).
    Ci(ci::Args),
    /// The main job, from nothing to a flashed and rebooted guest.
    Demo(demo::Args),
    /// Build kernel, static guest binaries, initramfs images and disks into build/.
    Guest(guest::Args),
    /// Boot a profile in QEMU and check its marker contract (qemu/markers.toml).
    QemuTest(qemu_test::Args),
    /// End-to-end scenarios in QEMU: flash, cut + resume, power cut + resume, the A/B
    /// update flow (update, rollback, update-powercut), factory reset (reset,
    /// reset-powercut), the recovery console (recovery-console), two guests flashed by one
    /// `nx flash send --port A --port B` (fanout) and README's tour (quickstart); `--only NAME`
    /// runs one.
    E2e(e2e::Args),
    /// Boot the recovery ramdisk, flash build/nexus-os.img, leave the guest up
    /// (`--no-flash`: stay in recovery, as the README's quickstart does).
    Recovery(recovery::Args),
    /// Install `nx` (cargo install --path nx-cli) with its man page and shell completions.
    Install(install::Args),
    /// Benchmarks (not tests): `cargo xtask bench [flash|fanout]`.
    Bench(bench::Args),
    /// Regenerate checked-in Cap'n Proto code (`--check` fails when stale).
    Codegen(codegen::Args),
    /// A coverage-guided fuzz campaign (libFuzzer, stable toolchain): `cargo xtask fuzz
    /// [TARGET] [--time S] [--keep]`; CI replays the checked-in corpus as tests.
    Fuzz(fuzz::Args),
    /// Power cuts that lose what real disks lose: record a path's writes and flushes over NBD
    /// (`--path install|activation|reset-wipe|boot-record|all`), check `--states N` crash
    /// states offline (identical disks once) and boot `--boot B` of them.
    Crash(crash::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every recipe spawns host programs: install what is missing first (`ci` does it in its
    // own "host packages" stage).
    if !matches!(cli.cmd, Cmd::Ci(_)) {
        if let Err(err) = util::ensure_host_tools() {
            eprintln!("xtask: error: {err:#}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.cmd {
        Cmd::Ci(a) => ci::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Guest(a) => guest::run(a),
        Cmd::QemuTest(a) => qemu_test::run(a),
        Cmd::Recovery(a) => recovery::run(a),
        Cmd::Install(a) => install::run(a),
        Cmd::E2e(a) => e2e::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Codegen(a) => codegen::run(a),
        Cmd::Fuzz(a) => fuzz::run(a),
        Cmd::Crash(a) => crash::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
