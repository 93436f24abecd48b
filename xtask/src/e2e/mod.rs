//! Flash end-to-end scenarios on a real QEMU guest (run by `cargo xtask ci`, or alone with
//! `cargo xtask e2e [--only NAME]`): the recovery ramdisk's flashd receives an image from
//! `nx flash send` over the real virtio-serial port. Each scenario gets fresh disks under
//! `build/e2e/<name>/` so runs do not depend on each other or on the user's build/state.img.
//!
//! - `flash`: one transfer, every flashd marker of `[flash]` in qemu/markers.toml in order,
//!   installed bytes of `system_b` == the image file.
//! - `flash-cut-resume`: `nx` is killed mid-transfer (the host side of the link is cut), a
//!   second `nx flash send` resumes (a `resumed` event), bytes verified.
//! - `flash-powercut-resume`: QEMU is killed mid-transfer (guest power cut), the guest boots
//!   recovery again, `nx flash send` resumes, bytes verified.
//!
//! Layout: this module holds the scenario list and the dispatch; [`support`] the shared context
//! and helpers (the only module the scenario files import from); the scenarios are grouped
//! in [`flash`] (the three above), [`slots`] (the A/B update scenarios `update`, `rollback`,
//! `update-powercut`), [`reset`] (the factory-reset and recovery-console scenarios of issue 6:
//! `reset`, `reset-powercut`, `reset-normal-guard`, `recovery-console`) and [`fanout`] (issue
//! 7: two guests flashed by one `nx flash send --port A --port B`) and [`verity`] (issue 14:
//! a flipped byte in the rootfs of the booted slot is refused by dm-verity) and [`quickstart`]
//! (issue 16: README's tour, extracted from README and run as written, `nx status` / `nx devices`)
//! and [`uart`] (issue 15: `nx flash send --port serial:/dev/pts/N` over the guest's lossy
//! second 16550, `/dev/ttyS1`).

mod fanout;
mod flash;
mod quickstart;
mod reset;
mod slots;
mod support;
mod trust;
mod uart;
mod verity;

pub use reset::{compare_seeded, ls_names, write_seeded_state};
pub use uart::{bench as uart_bench, UartBench};

/// Seconds `nx flash send IMAGE EXTRA…` takes into a fresh recovery guest (factory slot a =
/// `build/nexus-os.img`) over virtio-serial, with its JSON receipt (for `cargo xtask bench`).
pub fn timed_recovery_send(
    name: &str,
    image: &std::path::Path,
    extra: &[&str],
) -> anyhow::Result<(f64, String)> {
    let ctx = Ctx::new(name, false)?;
    let mut runner = ctx.boot_recovery()?;
    let port = ctx.port(&runner, nx_contract::ports::FLASH.name)?;
    let t = Instant::now();
    let out = std::process::Command::new(&ctx.nx)
        .args(["flash", "send", "--json", "--port", &port])
        .args(extra)
        .arg(image)
        .stderr(std::process::Stdio::null())
        .output()?;
    let secs = t.elapsed().as_secs_f64();
    runner.stop();
    ensure!(
        out.status.success(),
        "nx flash send {} failed: {}",
        image.display(),
        out.status
    );
    let receipt = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    Ok((secs, receipt))
}

use anyhow::{bail, ensure};
use std::time::Instant;
use support::Ctx;

/// Scenario names, in run order.
pub const SCENARIOS: [&str; 18] = [
    "flash",
    "flash-cut-resume",
    "flash-powercut-resume",
    "uart",
    "update",
    "update-cut",
    "rollback",
    "badkernel",
    "verity",
    "verity-rollback",
    "update-powercut",
    "trust",
    "reset",
    "reset-powercut",
    "reset-normal-guard",
    "recovery-console",
    "fanout",
    "quickstart",
];

/// Arguments of `cargo xtask e2e`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Run only this scenario.
    #[arg(long)]
    pub only: Option<String>,
    /// Do not run `cargo xtask guest` first.
    #[arg(long)]
    pub no_build: bool,
    /// Echo the guest console.
    #[arg(long)]
    pub echo: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.no_build {
        crate::guest::build(&crate::guest::Args::default())?;
    }
    let names: Vec<&str> = match &args.only {
        Some(n) => {
            ensure!(
                SCENARIOS.contains(&n.as_str()),
                "unknown scenario {n}; known: {}",
                SCENARIOS.join(", ")
            );
            vec![n.as_str()]
        }
        None => SCENARIOS.to_vec(),
    };
    let mut failed = 0;
    for n in &names {
        if let Err(e) = run_scenario(n, args.echo) {
            eprintln!("[error] e2e {n}: {e:#}");
            failed += 1;
        }
    }
    println!("e2e: {} passed, {failed} failed", names.len() - failed);
    ensure!(failed == 0, "{failed} e2e scenario(s) failed");
    Ok(())
}

/// Run one scenario by name.
pub fn run_scenario(name: &str, echo: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    eprintln!("xtask: e2e {name}: start");
    let ctx = Ctx::new(name, echo)?;
    match name {
        "flash" => flash::flash_basic(&ctx)?,
        "flash-cut-resume" => flash::flash_cut_resume(&ctx)?,
        "flash-powercut-resume" => flash::flash_powercut_resume(&ctx)?,
        "uart" => uart::uart(&ctx)?,
        "update" => slots::update(&ctx)?,
        "update-cut" => slots::update_cut(&ctx)?,
        "rollback" => slots::rollback(&ctx)?,
        "badkernel" => slots::badkernel(&ctx)?,
        "verity" => verity::verity(&ctx)?,
        "verity-rollback" => verity::verity_rollback(&ctx)?,
        "update-powercut" => slots::update_powercut(&ctx)?,
        "trust" => trust::trust(&ctx)?,
        "reset" => reset::reset(&ctx)?,
        "reset-powercut" => reset::reset_powercut(&ctx)?,
        "reset-normal-guard" => reset::reset_normal_guard(&ctx)?,
        "recovery-console" => reset::recovery_console(&ctx)?,
        "fanout" => fanout::fanout(&ctx)?,
        "quickstart" => quickstart::quickstart(&ctx)?,
        other => bail!("unknown scenario {other}"),
    }
    eprintln!("[ok] e2e {name} ({:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
