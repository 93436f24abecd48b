//! The factory-reset and recovery-console scenarios of issue 6 on a real QEMU guest: one
//! runner session each, real reboots through the firmware loop, fresh disks under
//! `build/e2e/<name>/` (system_a seeded with the v1 demo image; state.img built with user
//! data in it).
//!
//! - `reset`: state.img seeded with apps/content/settings (a nested app, a photo, a locale,
//!   a symlink into trust) and trust (a key, a cert) → normal boot → `nx reset factory
//!   --dry-run --json` lists exactly the three wiped trees with every seeded path and size and
//!   trust path by path (twice: the same bytes, nothing changed) → `nx reset factory --yes` →
//!   rebootd records the request, reboots → the firmware boots recovery (`factory wipe
//!   pending`) → `nx: reset factory wipe start` … `done` → rebootd `mode(normal)` → slot a
//!   boots → the dry-run plan shows apps/content/settings empty and trust unchanged. After
//!   the run (journal replayed on a copy of state.img): apps/content/settings are empty
//!   directories, `/trust` is byte-identical to the seed, the request and its journal are gone.
//! - `reset-powercut`: as `reset` with 10 000 more files in apps, so the wipe takes a while →
//!   QEMU killed shortly after `nx: reset factory wipe start` → the firmware boots recovery
//!   again (the request is still on disk) → `nx: reset factory wipe resumed (attempt=2)` →
//!   `done` → normal. No normal boot between the first `wipe start` and `wipe done`; the
//!   same offline checks.
//! - `reset-normal-guard`: the request is already on the seeded state.img and the first boot
//!   is forced to normal (a firmware that ignores the request): the normal init boots no slot
//!   (`init: factory wipe pending …`), rebootd reboots to recovery, which wipes; then normal.
//! - `recovery-console` (seeded state.img, first boot recovery): recovery-sh on the serial
//!   console: `sh`, `/bin/sh`, `exec /bin/sh` and a 10 KiB line each get their one-line error
//!   and the prompt again, nothing else is printed and the shell never exits; `help`, `slot
//!   status` (the slot table) and `diag` (`recovery: diag written (bytes=<n>)`, n > 0) work;
//!   `nx recovery diag --out FILE` fetches exactly that bundle; `reset factory` shows the plan
//!   and asks twice — `no` cancels, `yes` + the device name records the request → reboot →
//!   recovery wipes → normal; the same offline checks as `reset`.
//!
//! The whole console of each run is checked against `[e2e.<name>]` of qemu/markers.toml.

use super::support::{check_console, fail, nx, replayed_state_copy, wait, Ctx, STEP_TIMEOUT};
use crate::{disks, util};
use anyhow::{bail, ensure, Context};
use nx_contract::markers;
use nx_qemu::{BootTarget, Runner};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The trees a factory reset wipes, as the guest shows them.
const WIPED: [&str; 3] = ["/state/apps", "/state/content", "/state/settings"];
/// Extra files in apps for the power-cut scenario (so the wipe is still running at the cut).
const BULK_DIRS: usize = 100;
const BULK_FILES_PER_DIR: usize = 100;
/// How long after `nx: reset factory wipe start` the power is cut (`NX_E2E_WIPE_CUT_MS`).
const WIPE_CUT_DELAY: Duration = Duration::from_millis(300);
/// The recovery shell's prompt and line bound (guest/recovery-sh).
const PROMPT: &str = markers::recovery_sh::PROMPT;
const MAX_LINE: usize = 256;

/// One seeded path below `/state` (relative).
#[derive(Debug, Clone)]
enum Seed {
    Dir(String),
    File(String, Vec<u8>),
    Link(String, String),
}

impl Seed {
    fn rel(&self) -> &str {
        match self {
            Seed::Dir(p) | Seed::File(p, _) | Seed::Link(p, _) => p,
        }
    }
}

/// Deterministic bytes.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// The user data and the trust store seeded into state.img.
fn seed() -> Vec<Seed> {
    let d = |p: &str| Seed::Dir(p.into());
    let f = |p: &str, b: Vec<u8>| Seed::File(p.into(), b);
    vec![
        d("apps/com.example.notes"),
        f("apps/com.example.notes/notes.db", pattern(4096, 1)),
        d("apps/com.example.notes/cache"),
        f("apps/com.example.notes/cache/thumb.bin", pattern(100, 2)),
        d("content/photos"),
        f("content/photos/a.jpg", pattern(1234, 3)),
        f("settings/locale", b"en_US.UTF-8\n".to_vec()),
        Seed::Link("settings/key-link".into(), "../trust/root.pub".into()),
        f("trust/root.pub", pattern(32, 4)),
        // The factory provisioning (the development key) and the floor the first boot of the
        // v1 slot keeps (raise_floor leaves an equal floor alone, so trust stays identical).
        d("trust/dev-keys"),
        f(
            "trust/dev-keys/nexus-dev.pub",
            crate::keys::dev_public_text().into_bytes(),
        ),
        f(
            nx_contract::state::TRUST_FLOOR,
            format!(
                "{}\n",
                crate::guest::security_version(crate::guest::DEMO_VERSION)
            )
            .into_bytes(),
        ),
        d("trust/certs"),
        f(
            "trust/certs/ca.pem",
            b"-----BEGIN CERTIFICATE-----\nnexus test ca\n-----END CERTIFICATE-----\n".to_vec(),
        ),
    ]
}

/// Write the /state layout plus `entries` (and `bulk` extra files in apps) into `tree`.
fn write_tree(tree: &Path, entries: &[Seed], bulk: bool) -> anyhow::Result<()> {
    for d in disks::STATE_DIRS {
        std::fs::create_dir_all(tree.join(d))?;
    }
    for e in entries {
        let p = tree.join(e.rel());
        match e {
            Seed::Dir(_) => std::fs::create_dir_all(&p)?,
            Seed::File(_, bytes) => std::fs::write(&p, bytes)?,
            Seed::Link(_, target) => std::os::unix::fs::symlink(target, &p)?,
        }
    }
    if bulk {
        for i in 0..BULK_DIRS {
            let dir = tree.join(format!("apps/bulk/d{i:03}"));
            std::fs::create_dir_all(&dir)?;
            for j in 0..BULK_FILES_PER_DIR {
                std::fs::write(dir.join(format!("f{j:03}")), [b'x'; 16])?;
            }
        }
    }
    Ok(())
}

/// The seeded /state tree (user data in apps/content/settings, the trust store) written into
/// `tree`: the crash simulator's paths start from it too.
pub fn write_seeded_state(tree: &Path) -> anyhow::Result<()> {
    write_tree(tree, &seed(), false)
}

/// Compare the tree `dir` (e.g. an `rdump` of `/trust`) with the seed's entries below `top`:
/// every seeded file, directory and symlink is there and unchanged, nothing else is.
pub fn compare_seeded(dir: &Path, top: &str) -> anyhow::Result<()> {
    compare_tree(dir, top)
}

/// Replace the scenario's fresh state.img by one holding the seed.
fn seed_state(ctx: &Ctx, bulk: bool) -> anyhow::Result<()> {
    let tree = tempfile::tempdir()?;
    write_tree(tree.path(), &seed(), bulk)?;
    disks::mkfs_state(&ctx.dir.join("state.img"), tree.path())?;
    eprintln!(
        "xtask: e2e: seeded {} with apps, content, settings and trust{}",
        ctx.dir.join("state.img").display(),
        if bulk {
            format!(" (+{} files in apps/bulk)", BULK_DIRS * BULK_FILES_PER_DIR)
        } else {
            String::new()
        }
    );
    Ok(())
}

/// `(kind, size, target)` of a plan entry, keyed by its shown path.
type Entries = BTreeMap<String, (String, u64, Option<String>)>;

/// What the plan must list for the seeded paths below `top` (`apps`, `trust`, …).
fn expected_entries(top: &str) -> Entries {
    seed()
        .into_iter()
        .filter(|e| e.rel().split('/').next() == Some(top))
        .map(|e| {
            let path = format!("/state/{}", e.rel());
            let v = match e {
                Seed::Dir(_) => ("dir".to_string(), 0, None),
                Seed::File(_, b) => ("file".to_string(), b.len() as u64, None),
                Seed::Link(_, t) => ("symlink".to_string(), t.len() as u64, Some(t)),
            };
            (path, v)
        })
        .collect()
}

/// The entries of the tree `path` in a plan section (`wiped` / `preserved`).
fn plan_entries(plan: &Value, section: &str, path: &str) -> anyhow::Result<(Value, Entries)> {
    let tree = plan[section]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["path"] == path))
        .with_context(|| format!("the plan has no {section} tree {path}"))?
        .clone();
    let mut out = Entries::new();
    for e in tree["entries"].as_array().into_iter().flatten() {
        let p = e["path"].as_str().context("entry without a path")?;
        out.insert(
            p.to_string(),
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["size"].as_u64().unwrap_or(u64::MAX),
                e["target"].as_str().map(str::to_string),
            ),
        );
    }
    Ok((tree, out))
}

/// `nx reset factory --dry-run --json` of the running guest: (raw JSON, parsed).
fn dry_run(ctx: &Ctx, runner: &Runner) -> anyhow::Result<(String, Value)> {
    let port = ctx.port(runner, nx_contract::ports::REBOOT.name)?;
    let json = nx(
        ctx,
        runner,
        &["reset", "factory", "--dry-run", "--json", "--port", &port],
    )?;
    let v: Value = serde_json::from_str(&json)
        .with_context(|| format!("nx reset factory --dry-run --json is not JSON:\n{json}"))?;
    Ok((json, v))
}

/// The plan lists exactly the three wiped trees, every seeded user path (with kind, size and
/// symlink target), trust path by path; `bulk` extra files are counted in apps.
fn check_plan_before(plan: &Value, bulk: bool) -> anyhow::Result<()> {
    let wiped: Vec<&str> = plan["wiped"]
        .as_array()
        .context("plan without wiped trees")?
        .iter()
        .filter_map(|t| t["path"].as_str())
        .collect();
    ensure!(
        wiped == WIPED,
        "the plan wipes {wiped:?}, not exactly {WIPED:?}"
    );
    let preserved: Vec<&str> = plan["preserved"]
        .as_array()
        .context("plan without preserved trees")?
        .iter()
        .filter_map(|t| t["path"].as_str())
        .collect();
    ensure!(
        preserved.contains(&"/state/trust") && !preserved.iter().any(|p| WIPED.contains(p)),
        "the plan's preserved trees are {preserved:?}"
    );
    for (section, top) in [
        ("wiped", "apps"),
        ("wiped", "content"),
        ("wiped", "settings"),
        ("preserved", "trust"),
    ] {
        let path = format!("/state/{top}");
        let (tree, got) = plan_entries(plan, section, &path)?;
        let want = expected_entries(top);
        // The counts are always exact; the bulk files add to apps.
        let count = |kind: &str| want.values().filter(|v| v.0 == kind).count() as u64;
        let mut want_counts = [count("file"), count("dir"), count("symlink"), 0];
        if bulk && top == "apps" {
            want_counts[0] += (BULK_DIRS * BULK_FILES_PER_DIR) as u64;
            want_counts[1] += BULK_DIRS as u64 + 1;
        }
        let got_counts =
            ["files", "dirs", "symlinks", "other"].map(|k| tree[k].as_u64().unwrap_or(u64::MAX));
        ensure!(
            got_counts == want_counts,
            "the plan counts (files, dirs, symlinks, other) = {got_counts:?} in {path}, the seed has {want_counts:?}"
        );
        // Every path is listed unless the plan's listing bound was reached (the bulk seed).
        let complete = tree["listed"] == true && tree["truncated"] == false;
        ensure!(
            complete || bulk,
            "the plan does not list every path of {path}: {tree}"
        );
        if complete {
            ensure!(
                got == want,
                "the plan of {path} lists\n{got:#?}\nbut the seed is\n{want:#?}"
            );
        }
    }
    Ok(())
}

/// After the reset: the three trees are empty, trust is listed exactly as before.
fn check_plan_after(plan: &Value, trust_before: &Entries) -> anyhow::Result<()> {
    for path in WIPED {
        let (tree, got) = plan_entries(plan, "wiped", path)?;
        let counts: Vec<u64> = ["files", "dirs", "symlinks", "other", "bytes"]
            .iter()
            .map(|k| tree[*k].as_u64().unwrap_or(u64::MAX))
            .collect();
        ensure!(
            got.is_empty() && counts.iter().all(|&c| c == 0) && tree["kind"] == "dir",
            "{path} is not an empty directory after the reset: {tree}"
        );
    }
    let (_, trust) = plan_entries(plan, "preserved", "/state/trust")?;
    ensure!(
        &trust == trust_before,
        "trust changed across the reset:\nbefore {trust_before:#?}\nafter {trust:#?}"
    );
    Ok(())
}

/// Names in a `debugfs -R "ls -p DIR"` listing, without `.` and `..`.
pub fn ls_names(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split('/').collect();
            (f.len() >= 7).then(|| f[5].to_string())
        })
        .filter(|n| n != "." && n != "..")
        .collect()
}

/// Compare a host tree with the seed's entries below `top` (files, dirs, symlinks).
fn compare_tree(dir: &Path, top: &str) -> anyhow::Result<()> {
    let mut want: BTreeMap<String, Seed> = seed()
        .into_iter()
        .filter(|e| e.rel().split('/').next() == Some(top))
        .map(|e| (e.rel().to_string(), e))
        .collect();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("list {}", d.display()))? {
            let e = e?;
            let p = e.path();
            let rel = format!(
                "{top}/{}",
                p.strip_prefix(dir)?
                    .to_string_lossy()
                    .trim_start_matches('/')
            );
            let ft = e.file_type()?;
            let Some(seeded) = want.remove(&rel) else {
                bail!(
                    "{rel} is in {} after the run but was never seeded",
                    dir.display()
                );
            };
            match seeded {
                Seed::Dir(_) if ft.is_dir() => stack.push(p),
                Seed::File(_, bytes) if ft.is_file() => {
                    let got = std::fs::read(&p)?;
                    ensure!(
                        got == bytes,
                        "{rel} changed ({} bytes, seeded {})",
                        got.len(),
                        bytes.len()
                    );
                }
                Seed::Link(_, target) if ft.is_symlink() => {
                    let got = std::fs::read_link(&p)?;
                    ensure!(
                        got == Path::new(&target),
                        "{rel} now points to {}",
                        got.display()
                    );
                }
                other => bail!("{rel} changed its kind (seeded as {other:?})"),
            }
        }
    }
    ensure!(
        want.is_empty(),
        "missing after the run: {:?}",
        want.keys().collect::<Vec<_>>()
    );
    Ok(())
}

/// Offline, on a journal-replayed copy of state.img: the wiped trees are empty directories,
/// trust is byte-identical to the seed, the wipe request and its journal are gone.
fn check_state_offline(ctx: &Ctx) -> anyhow::Result<()> {
    let (tmp, img) = replayed_state_copy(ctx)?;
    let debugfs = util::tool("debugfs")?;
    let ls = |dir: &str| -> anyhow::Result<Vec<String>> {
        let out = util::capture(
            Command::new(&debugfs)
                .arg("-R")
                .arg(format!("ls -p {dir}"))
                .arg(&img),
        )?;
        ensure!(
            out.lines().any(|l| l.contains("/./")),
            "{dir} is not a directory in state.img after the run"
        );
        Ok(ls_names(&out))
    };
    for tree in ["/apps", "/content", "/settings"] {
        let names = ls(tree)?;
        ensure!(
            names.is_empty(),
            "{tree} is not empty after the factory reset: {names:?}"
        );
    }
    let boot = ls("/boot")?;
    ensure!(
        !boot.iter().any(|n| n.starts_with("factory_wipe")),
        "the wipe request (or its journal) is still in /boot: {boot:?}"
    );
    let top = ls("/")?;
    for d in disks::STATE_DIRS {
        ensure!(
            top.iter().any(|n| n == d),
            "/{d} is missing after the reset: {top:?}"
        );
    }
    let dump = tmp.path().join("dump");
    std::fs::create_dir_all(&dump)?;
    util::capture(
        Command::new(&debugfs)
            .arg("-R")
            .arg(format!("rdump /trust {}", dump.display()))
            .arg(&img),
    )?;
    compare_tree(&dump.join("trust"), "trust")?;
    eprintln!(
        "xtask: e2e: state.img after the run (journal replayed on a copy): apps, content, settings empty; trust byte-identical to the seed; no wipe request"
    );
    Ok(())
}

/// Boot normal on the seeded disks, run the dry run, check it; returns the runner and the
/// trust entries of the plan.
fn boot_and_dry_run(ctx: &Ctx, bulk: bool) -> anyhow::Result<(Runner, Entries)> {
    let runner = ctx.boot(false)?;
    wait(
        &runner,
        &[
            markers::init::booted("a", "1", false).as_str(),
            markers::init::confirmed("a").as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    let (json1, plan) = dry_run(ctx, &runner)?;
    check_plan_before(&plan, bulk).map_err(|e| fail(&runner, &format!("dry run: {e:#}")))?;
    let (json2, _) = dry_run(ctx, &runner)?;
    ensure!(
        json1 == json2,
        "a second dry run gives another plan: the first one changed something"
    );
    let (_, trust) = plan_entries(&plan, "preserved", "/state/trust")?;
    eprintln!(
        "xtask: e2e: nx reset factory --dry-run lists exactly {} ({} paths, {} bytes) and trust ({} paths); a second dry run is byte-identical",
        WIPED.join(", "),
        plan["totals"]["wiped_paths"],
        plan["totals"]["wiped_bytes"],
        trust.len()
    );
    Ok((runner, trust))
}

/// `nx reset factory --yes --json`: the request is recorded and the guest reboots.
fn reset_yes(ctx: &Ctx, runner: &Runner) -> anyhow::Result<()> {
    let port = ctx.port(runner, nx_contract::ports::REBOOT.name)?;
    let out = nx(
        ctx,
        runner,
        &["reset", "factory", "--yes", "--json", "--port", &port],
    )?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("nx reset factory --yes --json is not JSON:\n{out}"))?;
    ensure!(
        v["requested"] == true && v["rebooting"] == true,
        "nx reset factory --yes did not start the reset: {out}"
    );
    Ok(())
}

/// Scenario `reset`.
pub fn reset(ctx: &Ctx) -> anyhow::Result<()> {
    seed_state(ctx, false)?;
    let (mut runner, trust_before) = boot_and_dry_run(ctx, false)?;
    reset_yes(ctx, &runner)?;
    wait(
        &runner,
        &[
            "rebootd: factory-wipe requested",
            "[nx-qemu] the bootloader started recovery",
            markers::reset::wipe_start().as_str(),
            markers::reset::wipe_done().as_str(),
            "rebootd: next-boot=normal",
            "[nx-qemu] the bootloader started normal",
            markers::init::booted("a", "1", false).as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    let (_, plan) = dry_run(ctx, &runner)?;
    check_plan_after(&plan, &trust_before)
        .map_err(|e| fail(&runner, &format!("after the reset: {e:#}")))?;
    eprintln!("xtask: e2e: after the reset the guest's plan shows apps, content, settings empty and trust unchanged");
    runner.stop();
    check_console(ctx, &runner)?;
    check_state_offline(ctx)
}

fn wipe_cut_delay() -> Duration {
    std::env::var("NX_E2E_WIPE_CUT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
        .unwrap_or(WIPE_CUT_DELAY)
}

/// Scenario `reset-powercut`.
pub fn reset_powercut(ctx: &Ctx) -> anyhow::Result<()> {
    seed_state(ctx, true)?;
    let (mut runner, _) = boot_and_dry_run(ctx, true)?;
    reset_yes(ctx, &runner)?;
    let start = runner
        .wait_for(markers::reset::wipe_start().as_str(), STEP_TIMEOUT)
        .map_err(|e| {
            fail(
                &runner,
                &format!(
                    "[error] Missing marker: {} ({e})",
                    markers::reset::wipe_start()
                ),
            )
        })?;
    std::thread::sleep(wipe_cut_delay());
    // The firmware decides after the cut (None): the request on disk must make it recovery.
    runner.power_cycle(None);
    wait(&runner, &["[nx-qemu] power cut"])?;
    let cut_lines = runner.lines(start.index, usize::MAX);
    if cut_lines
        .iter()
        .any(|l| l.contains(markers::reset::wipe_done().as_str()))
    {
        bail!(
            "the power cut came too late: the wipe was already done (NX_E2E_WIPE_CUT_MS={} ms after `wipe start`); this run did not cut a wipe",
            wipe_cut_delay().as_millis()
        );
    }
    let resumed = wait_hit(
        &runner,
        &[
            "[nx-qemu] the bootloader started recovery (boot 3)",
            markers::reset::wipe_start().as_str(),
            markers::reset::wipe_resumed(2).as_str(),
        ],
    )?;
    let done = wait_hit(&runner, &[markers::reset::wipe_done().as_str()])?;
    let wipe_secs = done
        .since_boot
        .saturating_sub(resumed.since_boot)
        .as_secs_f64();
    // Never a normal boot while the wipe was incomplete.
    let between = runner.lines(start.index, done.index);
    if let Some(l) = between
        .iter()
        .find(|l| l.contains(markers::init::start().as_str()))
    {
        return Err(fail(
            &runner,
            &format!("a normal boot happened before the wipe was done: {l:?}"),
        ));
    }
    wait(
        &runner,
        &[
            "[nx-qemu] the bootloader started normal",
            markers::init::booted("a", "1", false).as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    let seeded = (BULK_DIRS * BULK_FILES_PER_DIR + BULK_DIRS + 1) as u64
        + expected_entries("apps").len() as u64
        + expected_entries("content").len() as u64
        + expected_entries("settings").len() as u64;
    let line = runner
        .grep(markers::reset::WIPE_REMOVED_PREFIX)
        .pop()
        .unwrap_or_default();
    let removed: Option<u64> = line
        .split("removed ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok());
    let on_disk = match removed {
        Some(n) if n == seeded => {
            "none of the first attempt's removals had reached the disk (ext4 commits every 5 s)"
                .to_string()
        }
        Some(n) if n < seeded => format!(
            "{} of the first attempt's removals had reached the disk",
            seeded - n
        ),
        _ => format!("unexpected: {line:?}"),
    };
    eprintln!(
        "xtask: e2e: power cut {} ms after `wipe start`; the next boot resumed and finished the wipe in {wipe_secs:.1} s, removing {} of {seeded} seeded paths ({on_disk})",
        wipe_cut_delay().as_millis(),
        removed.map_or("?".to_string(), |n| n.to_string()),
    );
    runner.stop();
    check_console(ctx, &runner)?;
    check_state_offline(ctx)
}

/// Scenario `reset-normal-guard`: a wipe request is on /state (written offline, as after a
/// power cut right after rebootd's `factoryWipe()`), and the first boot is forced to normal —
/// a boot firmware that ignores the request. The normal init must not boot a slot: it asks
/// rebootd for recovery, which wipes, then slot a boots.
pub fn reset_normal_guard(ctx: &Ctx) -> anyhow::Result<()> {
    let tree = tempfile::tempdir()?;
    write_tree(tree.path(), &seed(), false)?;
    std::fs::write(tree.path().join("boot/factory_wipe"), b"wipe\n")?;
    disks::mkfs_state(&ctx.dir.join("state.img"), tree.path())?;
    let mut cfg = ctx.config(false)?;
    cfg.first_boot = Some(BootTarget::Normal);
    let mut runner = Runner::start(cfg)?;
    let done = wait_hit(
        &runner,
        &[
            "[nx-qemu] the bootloader started normal (boot 1)",
            markers::init::refuse_for_wipe("a factory wipe was requested").as_str(),
            "rebootd: next-boot=recovery",
            "[nx-qemu] the bootloader started recovery",
            markers::reset::wipe_start().as_str(),
            markers::reset::wipe_done().as_str(),
        ],
    )?;
    let before = runner.lines(0, done.index);
    if let Some(l) = before
        .iter()
        .find(|l| l.contains(markers::init::BOOTED_PREFIX) || l.contains("bootctl: bootAttempt"))
    {
        return Err(fail(
            &runner,
            &format!("the normal init touched a slot while the wipe was pending: {l:?}"),
        ));
    }
    wait(
        &runner,
        &[
            "[nx-qemu] the bootloader started normal",
            markers::init::booted("a", "1", false).as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    eprintln!("xtask: e2e: with a wipe request on /state the normal init booted no slot and rebooted to recovery, which wiped; then slot a booted");
    runner.stop();
    check_console(ctx, &runner)?;
    check_state_offline(ctx)
}

/// [`wait`], returning the last hit.
fn wait_hit(runner: &Runner, markers: &[&str]) -> anyhow::Result<nx_qemu::Hit> {
    let mut last = None;
    for m in markers {
        last = Some(
            runner
                .wait_for(m, STEP_TIMEOUT)
                .map_err(|e| fail(runner, &format!("[error] Missing marker: {m} ({e})")))?,
        );
    }
    last.context("no markers")
}

/// Wait until every `text` appeared somewhere on the console (order-free).
fn wait_present(runner: &Runner, texts: &[&str], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let missing: Vec<&&str> = texts
            .iter()
            .filter(|t| !runner.console_contains(t))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(fail(
                runner,
                &format!("[error] Missing markers: {missing:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Type `input` + Enter; the shell must echo it after its prompt, print exactly `error` and
/// nothing else, and wait at its prompt again.
fn refused(runner: &Runner, input: &str, error: &str) -> anyhow::Result<()> {
    runner.send(format!("{input}\r").as_bytes())?;
    let shown: String = input.chars().take(MAX_LINE).collect();
    let echo = runner
        .wait_for(&format!("{PROMPT}{shown}"), Duration::from_secs(60))
        .map_err(|e| {
            fail(
                runner,
                &format!("no prompt + echo of {:?} ({e})", trunc(input)),
            )
        })?;
    let err = runner
        .wait_for(
            markers::recovery_sh::error(error).as_str(),
            Duration::from_secs(30),
        )
        .map_err(|e| {
            fail(
                runner,
                &format!(
                    "[error] Missing marker: {} ({e})",
                    markers::recovery_sh::error(error)
                ),
            )
        })?;
    at_prompt(runner, Duration::from_secs(30))?;
    // Nothing else: the echo, the one error line, the prompt again.
    let after = runner.lines(echo.index + 1, usize::MAX);
    ensure!(
        after.len() == 1 && after[0] == err.line,
        "the shell printed more than its error for {:?}: {after:?}",
        trunc(input)
    );
    eprintln!(
        "xtask: e2e: recovery-sh refused {:?}: {}",
        trunc(input),
        err.line
    );
    Ok(())
}

fn trunc(s: &str) -> String {
    if s.len() > 40 {
        format!(
            "{}… ({} bytes)",
            s.chars().take(20).collect::<String>(),
            s.len()
        )
    } else {
        s.to_string()
    }
}

/// The shell waits at its prompt: the console's unterminated last line is exactly the prompt
/// and no new line came for a moment.
fn at_prompt(runner: &Runner, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut stable_since: Option<(usize, Instant)> = None;
    loop {
        let n = runner.line_count();
        if runner.partial_line() == PROMPT {
            match stable_since {
                Some((m, t)) if m == n && t.elapsed() >= Duration::from_millis(200) => {
                    return Ok(())
                }
                Some((m, _)) if m == n => {}
                _ => stable_since = Some((n, Instant::now())),
            }
        } else {
            stable_since = None;
        }
        if Instant::now() >= deadline {
            return Err(fail(
                runner,
                &format!(
                    "the shell is not back at its prompt (last partial line {:?})",
                    runner.partial_line()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An empty line: a fresh prompt on a line of its own.
fn prompt_back(runner: &Runner) -> anyhow::Result<()> {
    let before = runner.line_count();
    runner.send(b"\r")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while runner.line_count() == before {
        if Instant::now() >= deadline {
            return Err(fail(runner, "an empty line got no newline back"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    at_prompt(runner, Duration::from_secs(30))
}

/// Scenario `recovery-console`.
pub fn recovery_console(ctx: &Ctx) -> anyhow::Result<()> {
    seed_state(ctx, false)?;
    let mut runner = ctx.boot_recovery()?;
    wait(&runner, &[markers::recovery::shell_ready().as_str()])?;
    // The daemons share the console: let their start-up lines pass first.
    wait_present(
        &runner,
        &[
            "rebootd: ready",
            "bootctld: ready",
            "serving on /dev/vport0p1",
        ],
        STEP_TIMEOUT,
    )?;
    std::thread::sleep(Duration::from_millis(300));
    prompt_back(&runner)?;
    let long = "a".repeat(10 * 1024);
    for (input, error) in [
        ("sh", "unknown command 'sh' (type 'help')"),
        ("/bin/sh", "unknown command '/bin/sh' (type 'help')"),
        ("exec /bin/sh", "unknown command 'exec' (type 'help')"),
        (
            long.as_str(),
            "line longer than 256 bytes, ignored; nothing was run",
        ),
    ] {
        refused(&runner, input, error)?;
    }
    prompt_back(&runner)?;

    runner.send(b"help\r")?;
    wait(
        &runner,
        &[
            markers::recovery_sh::BUILTINS_PREFIX,
            "  slot status",
            "  poweroff",
        ],
    )?;

    runner.send(b"slot status\r")?;
    let header = format!(
        "{:<5} {:<7} {:<8} {:<6} {:<6} version",
        "slot", "active", "health", "trial", "tries"
    );
    let row_a = format!("{:<5} {:<7} {:<8}", "a", "*", "good");
    wait(&runner, &[&header, &row_a])?;

    runner.send(b"diag\r")?;
    let hit = runner
        .wait_for(markers::recovery::DIAG_WRITTEN_PREFIX, STEP_TIMEOUT)
        .map_err(|e| {
            fail(
                &runner,
                &format!("[error] Missing marker: recovery: diag written ({e})"),
            )
        })?;
    let bytes: u64 = hit
        .line
        .split("bytes=")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read the size in {:?}", hit.line))?;
    ensure!(bytes > 0, "diag wrote an empty bundle: {}", hit.line);

    // The host fetches the newest bundle: exactly the one the shell just wrote.
    let out_file: PathBuf = ctx.dir.join("fetched-diag.tar.zst");
    let _ = std::fs::remove_file(&out_file);
    let port = ctx.port(&runner, nx_contract::ports::REBOOT.name)?;
    let out = nx(
        ctx,
        &runner,
        &[
            "recovery",
            "diag",
            "--json",
            "--out",
            &out_file.to_string_lossy(),
            "--port",
            &port,
        ],
    )?;
    let v: Value = serde_json::from_str(&out)
        .with_context(|| format!("nx recovery diag --json is not JSON:\n{out}"))?;
    let saved = std::fs::metadata(&out_file)
        .with_context(|| format!("nx recovery diag did not write {}", out_file.display()))?
        .len();
    ensure!(
        v["bytes"].as_u64() == Some(bytes) && saved == bytes,
        "nx recovery diag fetched {} bytes ({saved} saved), the shell's diag wrote {bytes}: {out}",
        v["bytes"]
    );
    let members = v["members"].as_array().map_or(0, Vec::len);
    eprintln!(
        "xtask: e2e: recovery-sh diag wrote {bytes} bytes; nx recovery diag fetched {} ({members} members) into {}",
        v["bundle"],
        out_file.display()
    );

    // reset factory on the console: asked twice. A wrong first answer cancels.
    runner.send(b"reset factory\r")?;
    wait(&runner, &["WIPED", "PRESERVED"])?;
    wait_partial(&runner, "Type yes to continue: ")?;
    runner.send(b"no\r")?;
    wait(
        &runner,
        &["recovery-sh: factory reset cancelled: the answer was \"no\", not \"yes\"; nothing was changed"],
    )?;
    at_prompt(&runner, Duration::from_secs(30))?;
    // yes + the device name: rebootd records the request and reboots; recovery wipes before
    // any service, then boots normal.
    runner.send(b"reset factory\r")?;
    wait_partial(&runner, "Type yes to continue: ")?;
    runner.send(b"yes\r")?;
    wait_partial(&runner, "Type the device name (nexus) to confirm: ")?;
    runner.send(b"nexus\r")?;
    wait(
        &runner,
        &[
            markers::recovery_sh::say(markers::recovery_sh::RESET_CONFIRMED_WHY).as_str(),
            "rebootd: factory-wipe requested",
            "[nx-qemu] the bootloader started recovery",
            markers::reset::wipe_start().as_str(),
            markers::reset::wipe_removed(8, 5459, &["apps", "content", "settings"]).as_str(),
            markers::reset::wipe_done().as_str(),
            "[nx-qemu] the bootloader started normal",
            markers::init::booted("a", "1", false).as_str(),
            markers::init::ready().as_str(),
        ],
    )?;
    runner.stop();
    check_console(ctx, &runner)?;
    check_state_offline(ctx)
}

/// Wait until the console's unterminated last line ends with `text` (a question waiting for
/// its answer).
fn wait_partial(runner: &Runner, text: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !runner.partial_line().ends_with(text) {
        if Instant::now() >= deadline {
            return Err(fail(
                runner,
                &format!(
                    "the console does not ask {text:?} (last partial line {:?})",
                    runner.partial_line()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_plan_of_the_seed() {
        let apps = expected_entries("apps");
        assert_eq!(apps.len(), 4);
        assert_eq!(
            apps["/state/apps/com.example.notes/notes.db"],
            ("file".to_string(), 4096, None)
        );
        let settings = expected_entries("settings");
        assert_eq!(
            settings["/state/settings/key-link"],
            (
                "symlink".to_string(),
                17,
                Some("../trust/root.pub".to_string())
            )
        );
        // root.pub, certs/, certs/ca.pem, dev-keys/, dev-keys/nexus-dev.pub, security_version
        assert_eq!(expected_entries("trust").len(), 6);
    }

    #[test]
    fn seeded_tree_compares_equal_to_itself() {
        let d = tempfile::tempdir().unwrap();
        write_tree(d.path(), &seed(), false).unwrap();
        compare_tree(&d.path().join("trust"), "trust").unwrap();
        std::fs::write(d.path().join("trust/root.pub"), b"changed").unwrap();
        assert!(compare_tree(&d.path().join("trust"), "trust").is_err());
    }

    #[test]
    fn debugfs_listing_names() {
        let ls = "/12/040755/0/0/.//\n/2/040755/0/0/..//\n/13/100644/0/0/locale/12/\n";
        assert_eq!(ls_names(ls), ["locale"]);
    }
}
