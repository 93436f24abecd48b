//! `quickstart` (issue 16): README's tour, run as written against a guest started like the
//! README says (`cargo xtask recovery --no-flash`: the recovery ramdisk, not flashed).
//!
//! The tour's lines have one home, README.md between `<!-- tour:begin` and `<!-- tour:end -->`;
//! this scenario extracts them, runs each through `sh -c` from the project root with the
//! freshly built `nx` first on PATH and `NX_DEVICE` naming this scenario's run directory (the
//! documented way to pick a guest that is not `build/qemu/`), and requires exit 0 from every
//! one. `nx devices` must list this guest with all three daemons answering, `nx status` must
//! name its device and recovery mode. After the tour's `nx flash send` the guest boots v2 on
//! trial; `nx status --json` then reports normal mode, booted slot b.

use super::support::{fail, wait, Ctx, STEP_TIMEOUT};
use crate::util;
use anyhow::{bail, ensure, Context};
use nx_contract::markers;
use nx_qemu::Runner;
use std::path::Path;
use std::process::Command;

/// Where the tour lives.
const README: &str = "README.md";
const BEGIN: &str = "<!-- tour:begin";
const END: &str = "<!-- tour:end -->";

/// The tour's command lines from README (comments and blank lines dropped).
pub fn tour_lines(readme: &str) -> anyhow::Result<Vec<String>> {
    let start = readme
        .find(BEGIN)
        .with_context(|| format!("{README} has no `{BEGIN}` marker"))?;
    let rest = &readme[start..];
    let end = rest
        .find(END)
        .with_context(|| format!("{README} has no `{END}` marker after `{BEGIN}`"))?;
    let lines: Vec<String> = rest[..end]
        .lines()
        .skip(1)
        .filter(|l| !l.trim_start().starts_with("```"))
        .map(|l| l.split(" #").next().unwrap_or("").trim().to_string())
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    ensure!(!lines.is_empty(), "{README}'s tour has no command lines");
    Ok(lines)
}

/// One tour line through `sh -c`; its stdout, or an error with the console tail.
fn run_line(runner: &Runner, ctx: &Ctx, run_dir: &Path, line: &str) -> anyhow::Result<String> {
    let bin = ctx
        .nx
        .parent()
        .context("the nx binary has no directory")?
        .to_path_buf();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![bin];
    dirs.extend(std::env::split_paths(&path));
    let out = Command::new("sh")
        .arg("-c")
        .arg(line)
        .current_dir(util::root())
        .env("PATH", std::env::join_paths(dirs)?)
        .env("NX_DEVICE", run_dir)
        .env_remove("NX_PORT")
        .output()
        .with_context(|| format!("could not run `{line}`"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("$ {line}\n{stdout}{stderr}");
    if !out.status.success() {
        return Err(fail(
            runner,
            &format!(
                "tour line `{line}` failed ({}): {}",
                out.status,
                stderr.trim()
            ),
        ));
    }
    Ok(stdout)
}

pub fn quickstart(ctx: &Ctx) -> anyhow::Result<()> {
    let readme = std::fs::read_to_string(util::root().join(README))
        .with_context(|| format!("read {README}"))?;
    let lines = tour_lines(&readme)?;
    // What the tour flashes must exist (the build makes it, as the README says).
    super::support::built_image("nexus-os-v2.img")?;

    let runner = ctx.boot_recovery()?;
    let run_dir = runner.config().run_dir.clone();
    let rel = run_dir
        .strip_prefix(util::root())
        .unwrap_or(&run_dir)
        .display()
        .to_string();
    let mut sent = false;
    for line in &lines {
        let out = run_line(&runner, ctx, &run_dir, line)?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["nx", "devices", ..] => {
                let row = out.lines().find(|l| l.contains(&rel)).ok_or_else(|| {
                    fail(&runner, &format!("nx devices does not list {rel}:\n{out}"))
                })?;
                ensure!(
                    row.starts_with('*')
                        && row.contains("recovery")
                        && row.contains("flashd,rebootd,bootctld"),
                    "nx devices: {rel} is not the default target in recovery with every daemon answering: {row}"
                );
            }
            ["nx", "status"] => {
                ensure!(
                    out.contains("mode:       recovery")
                        && out
                            .lines()
                            .any(|l| l.starts_with("device:     ") && !l.contains("unknown"))
                        && out.contains("next boot:  ")
                        && out.contains("  a* health="),
                    "nx status does not show the recovery guest:\n{out}"
                );
            }
            ["nx", "flash", "send", ..] => sent = true,
            _ => {}
        }
    }
    if !sent {
        bail!("the tour has no `nx flash send`: this scenario checks the boot into v2 after it");
    }
    // The automatic reboot into v2 on trial; then nx status reads the normal guest.
    wait(
        &runner,
        &[
            markers::init::booted("b", "2", true).as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let out = run_line(&runner, ctx, &run_dir, "nx status --json")?;
        let v: serde_json::Value =
            serde_json::from_str(&out).context("nx status --json is not JSON")?;
        if v["mode"] == "normal" && v["bootctld"]["answer"]["last_boot"] == "b" {
            break;
        }
        if std::time::Instant::now() > deadline {
            return Err(fail(
                &runner,
                &format!("nx status never showed normal mode on slot b: {v}"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    run_line(&runner, ctx, &run_dir, "nx status")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_tour_is_found_and_comments_are_dropped() {
        let readme = std::fs::read_to_string(util::root().join(README)).unwrap();
        let lines = tour_lines(&readme).unwrap();
        assert!(lines.iter().all(|l| l.starts_with("nx ")), "{lines:?}");
        assert!(lines.iter().any(|l| l == "nx status"), "{lines:?}");
        assert!(lines.iter().any(|l| l == "nx devices"), "{lines:?}");
        assert!(tour_lines("no tour here").is_err());
    }
}
