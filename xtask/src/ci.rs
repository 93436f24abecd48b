//! `cargo xtask ci` — everything CI runs, in order: host packages, fmt, clippy, unit and
//! in-process tests, the guest build, every QEMU marker profile of `qemu/markers.toml`, the
//! flash e2e scenarios, and a short crash-simulator run (`crash::ci`). The host checks stop at the first failure; the QEMU runs all go
//! and the summary line counts them.

use crate::util::{self, cargo, run_cmd};
use std::time::{Duration, Instant};

/// Arguments of `cargo xtask ci`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Args {
    /// Skip the QEMU marker tests and e2e scenarios.
    #[arg(long)]
    pub no_qemu: bool,
    /// Only the guest build, QEMU marker profiles and e2e scenarios (skip fmt/clippy/tests).
    #[arg(long, conflicts_with = "no_qemu")]
    pub qemu_only: bool,
}

/// Timeout per marker profile.
const PROFILE_TIMEOUT: Duration = Duration::from_secs(120);

pub fn run(args: Args) -> anyhow::Result<()> {
    let t0 = Instant::now();
    util::stage("host packages");
    util::ensure_host_tools()?;
    if !args.qemu_only {
        host_checks()?;
    }
    if args.no_qemu {
        return Ok(());
    }
    qemu_tests(t0)
}

/// fmt, clippy, unit and in-process tests.
fn host_checks() -> anyhow::Result<()> {
    util::stage("fmt");
    run_cmd(cargo().args(["fmt", "--all", "--", "--check"]))?;
    util::stage("clippy");
    run_cmd(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::stage("tests");
    run_cmd(cargo().args(["test", "--workspace"]))?;
    Ok(())
}

/// Guest build, every marker profile, the e2e scenarios; all run, then the summary line.
fn qemu_tests(t0: Instant) -> anyhow::Result<()> {
    util::stage("guest build");
    crate::guest::build(&crate::guest::Args::default())?;

    let contract = nx_qemu::markers::Contract::load(&util::root().join("qemu/markers.toml"))?;
    let mut passed = 0usize;
    let mut failed: Vec<String> = Vec::new();
    for name in contract.profile.keys() {
        util::stage(&format!("qemu marker profile {name}"));
        match crate::qemu_test::run_profile(name, PROFILE_TIMEOUT, true, false) {
            Ok(ready) => {
                passed += 1;
                if let Some(r) = ready {
                    println!("qemu: {name}: boot to ready {:.2} s", r.as_secs_f64());
                }
            }
            Err(e) => {
                eprintln!("[error] qemu profile {name}: {e:#}");
                failed.push(format!("profile {name}"));
            }
        }
    }
    for name in crate::e2e::SCENARIOS {
        util::stage(&format!("e2e {name}"));
        match crate::e2e::run_scenario(name, false) {
            Ok(()) => passed += 1,
            Err(e) => {
                eprintln!("[error] e2e {name}: {e:#}");
                failed.push(format!("e2e {name}"));
            }
        }
    }
    // The crash simulator, a short run (docs/runner/crash.md: which paths and why).
    util::stage("crash (short)");
    match crate::crash::ci() {
        Ok(sums) => {
            for s in &sums {
                println!("{}", s.line());
                if s.failures.is_empty() {
                    passed += 1;
                } else {
                    for f in &s.failures {
                        eprintln!("[error] crash {}: {f}", s.path);
                    }
                    failed.push(format!("crash {}", s.path));
                }
            }
        }
        Err(e) => {
            eprintln!("[error] crash: {e:#}");
            failed.push("crash".into());
        }
    }
    util::stage("summary");
    eprintln!("xtask: ci took {:.0} s", t0.elapsed().as_secs_f64());
    if !failed.is_empty() {
        eprintln!("failed: {}", failed.join(", "));
    }
    println!("qemu: {passed} passed, {} failed", failed.len());
    anyhow::ensure!(failed.is_empty(), "{} QEMU test(s) failed", failed.len());
    Ok(())
}
