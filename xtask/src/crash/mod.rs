//! `cargo xtask crash [--path P|all] [--states N] [--boot B] [--seed S]`: power cuts that lose
//! what real disks lose (the block-layer crash simulator of `crashsim.rs`), on four paths:
//!
//! - `install`: recovery, `nx flash send` of v2, activation, the reboot into the trial slot,
//!   its confirmation. The old slot (a, 1) or the new one (b, 2) must boot.
//! - `activation`: the same recording, cut only between `flashd: verify ok` and the firmware
//!   start of the next boot (the boot files, the ESP entry and bootctld's snapshot written).
//! - `reset-wipe`: normal boot, `nx reset factory --yes`, recovery wipes with its journal,
//!   normal again. The device must come up; the wipe is complete, pending (resumed by the
//!   next boot) or never started — and never lost once `nx` was told it was recorded.
//! - `boot-record`: normal boot, `nx flash reboot recovery`, recovery. Normal or recovery
//!   must come up; recovery for every cut between `nx`'s answer and the next boot.
//!
//! Every path: `/state/trust` byte-identical to what was provisioned, in every state.
//!
//! Scale: each of `--states` states (a random cut in the path's window; every write before
//! its disk's last flush kept, each later write kept or lost at random; the variable store is
//! NOR flash: every write before the cut kept) is fingerprinted without rebuilding the disks
//! (`states.rs`); byte-identical states are checked once. Each distinct state is rebuilt and
//! checked offline (`check.rs`, about a second); `--boot` of them are booted (about 10 s
//! each under TCG; states that failed offline first, then round-robin over the offline
//! predictions), and a boot must agree with the prediction. The report line of a path says
//! exactly that: states tried / distinct / checked offline / booted / failures.
//! Failures keep their description (and console) under `build/crash/<path>/failures/`.

mod check;
mod record;
mod states;

use crate::crashsim::crash_state;
use crate::util;
use anyhow::{bail, Context};
use check::{Files, Verdict};
use nx_contract::markers::{init, recovery};
use nx_qemu::Runner;
use record::{Kind, Recording};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The paths, in `--path all` order.
pub const PATHS: [&str; 4] = ["install", "activation", "reset-wipe", "boot-record"];

/// Arguments of `cargo xtask crash`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The path to record and cut: `install`, `activation`, `reset-wipe`, `boot-record`, or
    /// `all`.
    #[arg(long, default_value = "install")]
    pub path: String,
    /// Crash states to try per path (each checked offline; byte-identical ones once).
    #[arg(long, default_value_t = 20)]
    pub states: usize,
    /// Distinct crash states to boot per path (a sample of the offline-checked ones).
    #[arg(long, default_value_t = 6)]
    pub boot: usize,
    /// Seed of the cut points and lost writes (same seed, same states).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Echo the guest console.
    #[arg(long)]
    pub echo: bool,
    /// Do not run `cargo xtask guest` first (the images are already built).
    #[arg(long)]
    pub no_build: bool,
}

/// Failing boots per path whose images are kept (sparse) under `failures/state-<i>/`.
const KEEP_IMAGES: usize = 3;
/// Time for one boot of a crash state (the reset path may boot recovery, then normal).
const BOOT_STEP: Duration = Duration::from_secs(180);
/// How long recovery must stay up (no reset) to count as where the device came up.
const SETTLE: Duration = Duration::from_secs(8);

/// The counts of one path.
#[derive(Debug, Default)]
pub struct Summary {
    pub path: String,
    pub ops: usize,
    pub window: (usize, usize),
    pub tried: usize,
    pub distinct: usize,
    pub offline: usize,
    pub booted: usize,
    /// Offline predictions over the distinct states.
    pub predicted: BTreeMap<String, usize>,
    /// What the booted states came up with.
    pub boots: BTreeMap<String, usize>,
    pub failures: Vec<String>,
    pub secs: f64,
}

fn counts(m: &BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Summary {
    /// The report line: exactly what was done.
    pub fn line(&self) -> String {
        format!(
            "crash {}: {} states tried (cuts in ops {}..={} of {}), {} distinct disks, {} checked offline ({}), {} booted ({}), {} failures",
            self.path,
            self.tried,
            self.window.0 + 1,
            self.window.1,
            self.ops,
            self.distinct,
            self.offline,
            counts(&self.predicted),
            self.booted,
            counts(&self.boots),
            self.failures.len()
        )
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let sums = run_paths(&args)?;
    util::stage("crash summary");
    println!(
        "{:<12} {:>6} {:>8} {:>8} {:>6} {:>8}  offline predictions / boots",
        "path", "tried", "distinct", "offline", "booted", "failures"
    );
    for s in &sums {
        println!(
            "{:<12} {:>6} {:>8} {:>8} {:>6} {:>8}  {} / {}",
            s.path,
            s.tried,
            s.distinct,
            s.offline,
            s.booted,
            s.failures.len(),
            counts(&s.predicted),
            counts(&s.boots)
        );
    }
    for s in &sums {
        println!("{}", s.line());
        for f in &s.failures {
            eprintln!("[error] crash {}: {f}", s.path);
        }
    }
    let failed: usize = sums.iter().map(|s| s.failures.len()).sum();
    anyhow::ensure!(
        failed == 0,
        "{failed} crash state(s) failed (descriptions and consoles under build/crash/<path>/failures/)"
    );
    Ok(())
}

/// Record and cut every path of `args.path`; the summaries.
pub fn run_paths(args: &Args) -> anyhow::Result<Vec<Summary>> {
    let paths: Vec<&str> = if args.path == "all" {
        PATHS.to_vec()
    } else {
        let p = PATHS.iter().find(|p| **p == args.path).with_context(|| {
            format!(
                "unknown path {:?}; known: {}, all",
                args.path,
                PATHS.join(", ")
            )
        })?;
        vec![*p]
    };
    let build = util::build_dir();
    let (v2, demo) = if args.no_build {
        (build.join("nexus-os-v2.img"), build.join("nexus-os.img"))
    } else {
        let out = crate::guest::build(&crate::guest::Args::default())?;
        (
            out.v2_image.context(
                "no build/nexus-os-v2.img (stub/placeholder images): cannot record an install",
            )?,
            out.demo_image
                .context("no build/nexus-os.img: cannot seed slot a")?,
        )
    };
    for f in [&v2, &demo] {
        anyhow::ensure!(
            f.is_file(),
            "{} is missing: run `cargo xtask guest`",
            f.display()
        );
    }
    let root = build.join("crash");
    std::fs::create_dir_all(&root)?;
    let base_dir = root.join("base");
    let _ = std::fs::remove_dir_all(&base_dir);
    std::fs::create_dir_all(&base_dir)?;
    let bases = record::bases(&base_dir, &demo)?;
    let mut recordings: BTreeMap<&str, Recording> = BTreeMap::new();
    let mut sums = Vec::new();
    for (n, path) in paths.iter().enumerate() {
        let started = Instant::now();
        let kind = match *path {
            "install" | "activation" => Kind::Install,
            "reset-wipe" => Kind::ResetWipe,
            _ => Kind::BootRecord,
        };
        let rec_name = match kind {
            Kind::Install => "install",
            Kind::ResetWipe => "reset-wipe",
            Kind::BootRecord => "boot-record",
        };
        let dir = root.join(path);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("failures"))?;
        if !recordings.contains_key(rec_name) {
            util::stage(&format!("crash {rec_name}: record"));
            let rec_dir = root.join(format!("{rec_name}.rec"));
            let _ = std::fs::remove_dir_all(&rec_dir);
            std::fs::create_dir_all(&rec_dir)?;
            let rec = record::record(kind, &rec_dir, &bases, &v2, args.echo)?;
            println!(
                "crash {rec_name}: recorded {} operations ({} writes/zeroings, {} flushes, {} MiB written; disks: {}); marks {:?}",
                rec.ops.len(),
                rec.ops.iter().filter(|o| !matches!(o, crate::crashsim::Op::Flush { .. })).count(),
                rec.ops.iter().filter(|o| matches!(o, crate::crashsim::Op::Flush { .. })).count(),
                rec.ops
                    .iter()
                    .map(|o| match o {
                        crate::crashsim::Op::Write { data, .. } => data.len(),
                        _ => 0,
                    })
                    .sum::<usize>()
                    >> 20,
                if rec.vars { "state, disk, vars" } else { "state, disk" },
                rec.marks
            );
            recordings.insert(rec_name, rec);
        }
        let rec = recordings
            .get(rec_name)
            .context("the recording of this path")?;
        let mut s = run_path(path, rec, args, &dir, args.seed.wrapping_add(n as u64))?;
        s.secs = started.elapsed().as_secs_f64();
        println!("{} ({:.0} s)", s.line(), s.secs);
        sums.push(s);
    }
    Ok(sums)
}

/// The cut window of a path: cuts `c` with `from < c <= to`.
fn window(path: &str, rec: &Recording) -> anyhow::Result<(usize, usize)> {
    let n = rec.ops.len();
    Ok(match path {
        "install" => (0, n),
        "activation" => (
            rec.mark(record::MARK_VERIFY_OK)?,
            rec.mark(record::MARK_ACTIVATED_BOOT)?.min(n),
        ),
        _ => (rec.mark(record::MARK_REQUEST)?, n),
    })
}

fn run_path(
    path: &str,
    rec: &Recording,
    args: &Args,
    dir: &Path,
    seed: u64,
) -> anyhow::Result<Summary> {
    let win = window(path, rec)?;
    anyhow::ensure!(
        win.1 > win.0,
        "crash {path}: the cut window {win:?} is empty (marks {:?})",
        rec.marks
    );
    let mut sum = Summary {
        path: path.to_string(),
        ops: rec.ops.len(),
        window: win,
        tried: args.states,
        ..Summary::default()
    };
    util::stage(&format!(
        "crash {path}: {} states, cuts in ops {}..={}",
        args.states,
        win.0 + 1,
        win.1
    ));
    let st = states::generate(&rec.ops, win, &rec.write_through(), args.states, seed);
    let bases: Vec<&Path> = rec.bases.iter().map(PathBuf::as_path).collect();
    let fp = states::Fingerprinter::new(&rec.ops, &bases)?;
    let groups = states::distinct(&fp, &st);
    sum.distinct = groups.len();
    println!(
        "crash {path}: {} states, {} distinct disks",
        st.len(),
        groups.len()
    );
    let files = Files::in_dir(dir, rec.vars);
    let outs = files.outs();
    // Offline, every distinct state.
    let mut offline: Vec<Result<(Verdict, String), String>> = Vec::new();
    for (k, (_, members)) in groups.iter().enumerate() {
        let s = &st[members[0]];
        crash_state(&bases, &rec.ops, &s.apply, &outs)?;
        let r = offline_check(path, &files, rec, s.cut).map_err(|e| format!("{e:#}"));
        sum.offline += 1;
        match &r {
            Ok((v, _)) => *sum.predicted.entry(v.label().to_string()).or_default() += 1,
            Err(e) => {
                let what = format!(
                    "state {} (cut {}/{}, {} ops applied; {} identical states) offline: {e}",
                    s.index,
                    s.cut,
                    rec.ops.len(),
                    s.apply.len(),
                    members.len()
                );
                std::fs::write(
                    dir.join("failures")
                        .join(format!("state-{}.offline.txt", s.index)),
                    &what,
                )?;
                sum.failures.push(what);
            }
        }
        println!(
            "crash {path} state {} [{}/{}]: cut {}/{}, {} ops applied, {} identical: offline {}",
            s.index,
            k + 1,
            groups.len(),
            s.cut,
            rec.ops.len(),
            s.apply.len(),
            members.len(),
            match &r {
                Ok((v, _)) => v.label().to_string(),
                Err(_) => "FAILED".into(),
            }
        );
        offline.push(r);
    }
    // The boot sample: offline failures first, then the states the model cannot tell, then
    // round-robin over the predictions.
    // At most half the boots go to offline failures (they confirm the finding; the sample
    // of the rest still gets booted).
    let mut pick: Vec<usize> = (0..groups.len())
        .filter(|&k| offline[k].is_err())
        .take(args.boot.div_ceil(2))
        .chain((0..groups.len()).filter(|&k| matches!(offline[k], Ok((Verdict::Unknown, _)))))
        .collect();
    let mut by_verdict: BTreeMap<Verdict, Vec<usize>> = BTreeMap::new();
    for (k, r) in offline.iter().enumerate() {
        match r {
            Ok((Verdict::Unknown, _)) | Err(_) => {}
            Ok((v, _)) => by_verdict.entry(*v).or_default().push(k),
        }
    }
    let mut round = 0;
    while pick.len() < args.boot.min(groups.len()) {
        let mut any = false;
        for ks in by_verdict.values() {
            if let Some(&k) = ks.get(round) {
                any = true;
                if pick.len() < args.boot {
                    pick.push(k);
                }
            }
        }
        if !any {
            break;
        }
        round += 1;
    }
    pick.truncate(args.boot);
    let mut kept = 0;
    for k in pick {
        let s = &st[groups[k].1[0]];
        crash_state(&bases, &rec.ops, &s.apply, &outs)?;
        let t0 = Instant::now();
        let predicted = offline[k]
            .as_ref()
            .ok()
            .map(|(v, _)| *v)
            .filter(|v| *v != Verdict::Unknown);
        let r =
            boot_check(path, &files, rec, s.cut, predicted, dir, args.echo, s.index).map_err(|e| {
                match &offline[k] {
                    Ok((_, d)) if !d.is_empty() => e.context(format!("offline: {d}")),
                    _ => e,
                }
            });
        sum.booted += 1;
        let took = t0.elapsed().as_secs_f64();
        if r.is_err() && kept < KEEP_IMAGES {
            // The images as the power cut left them (the boot changed the working copies),
            // for a look with mtools/debugfs or a boot by hand.
            kept += 1;
            let to = dir.join("failures").join(format!("state-{}", s.index));
            std::fs::create_dir_all(&to)?;
            let keep = Files::in_dir(&to, rec.vars);
            crash_state(&bases, &rec.ops, &s.apply, &keep.outs())?;
        }
        match &r {
            Ok(label) => *sum.boots.entry(label.clone()).or_default() += 1,
            Err(e) => sum.failures.push(format!(
                "state {} (cut {}/{}) boot: {e:#}",
                s.index,
                s.cut,
                rec.ops.len()
            )),
        }
        println!(
            "crash {path} state {}: booted: {} ({took:.1} s)",
            s.index,
            match &r {
                Ok(l) => l.clone(),
                Err(_) => "FAILED".into(),
            }
        );
    }
    Ok(sum)
}

/// The offline prediction of a state and what it rests on.
fn offline_check(
    path: &str,
    f: &Files,
    rec: &Recording,
    cut: usize,
) -> anyhow::Result<(Verdict, String)> {
    let view = check::state_offline(&f.state)?;
    match path {
        "install" | "activation" => {
            let (v, detail) = check::slot_offline(&f.disk)?;
            if cut >= confirmed(rec)? && v != Verdict::New && v != Verdict::Unknown {
                bail!(
                    "the update was reported confirmed (`{}`) before this cut, yet the bootloader boots the {} ({detail})",
                    init::confirmed('b'),
                    v.label()
                );
            }
            Ok((v, detail))
        }
        "reset-wipe" => {
            let v = check::wipe_state(&view)?;
            if cut >= rec.mark(record::MARK_ACKED)? && v == Verdict::Untouched {
                bail!("nx was told the factory reset was recorded, yet neither the request nor the wipe is on the disk");
            }
            Ok((v, String::new()))
        }
        _ => {
            let vars = f.vars.as_deref().context("no variable store")?;
            let v = check::boot_record(vars, &view)?;
            let acked = rec.mark(record::MARK_ACKED)?;
            let rebooted = rec
                .marks
                .get(record::MARK_REBOOTED)
                .copied()
                .unwrap_or(usize::MAX);
            if cut >= acked && cut < rebooted && v == Verdict::Normal {
                bail!("nx was told the next boot is recovery, yet the one-shot entry is not in the variable store");
            }
            Ok((v, String::new()))
        }
    }
}

/// Operations in the install log when the update was reported confirmed (`init: confirmed
/// slot=b`): from there on a power cut must leave the new slot booting.
fn confirmed(rec: &Recording) -> anyhow::Result<usize> {
    rec.mark(record::MARK_CONFIRMED)
}

/// Wait until the console shows `init: ready` (normal) or recovery stays ready for
/// [`SETTLE`] (no reset after it).
fn came_up(runner: &Runner) -> anyhow::Result<Verdict> {
    let deadline = Instant::now() + BOOT_STEP;
    let rec_ready = recovery::ready("/dev/vport0p1");
    let mut recovery_since: Option<(u32, Instant)> = None;
    loop {
        // The last boot's lines decide (an earlier boot may have been recovery).
        if runner.console_contains(init::ready().as_str()) {
            return Ok(Verdict::Normal);
        }
        let boots = runner.boots();
        let ready_now = runner
            .tail(400)
            .iter()
            .any(|l| l.contains(rec_ready.as_str()));
        match recovery_since {
            Some((b, t)) if b == boots && ready_now => {
                if t.elapsed() >= SETTLE {
                    return Ok(Verdict::Recovery);
                }
            }
            _ if ready_now => recovery_since = Some((boots, Instant::now())),
            _ => recovery_since = None,
        }
        if let Some(o) = runner.outcome() {
            bail!("the guest stopped: {o}");
        }
        if Instant::now() >= deadline {
            bail!(
                "neither `{}` nor a settled `{}` within {} s",
                init::ready(),
                rec_ready,
                BOOT_STEP.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[allow(clippy::too_many_arguments)]
fn boot_check(
    path: &str,
    f: &Files,
    rec: &Recording,
    cut: usize,
    predicted: Option<Verdict>,
    dir: &Path,
    echo: bool,
    index: usize,
) -> anyhow::Result<String> {
    let run_dir = dir.join("qemu");
    std::fs::create_dir_all(&run_dir)?;
    // install/activation: a fresh variable store (the one-shot of the recording's recovery
    // boot was consumed by its bootloader before the first write); the others: the state's.
    let vars = match &f.vars {
        Some(v) => v.clone(),
        None => {
            let v = run_dir.join("ovmf-vars.fd");
            let _ = std::fs::remove_file(&v);
            v
        }
    };
    let cfg = record::config(&run_dir, &f.state, &f.disk, &vars, echo)?;
    let mut runner = Runner::start(cfg)?;
    let up = came_up(&runner);
    let booted = runner.grep(init::BOOTED_PREFIX);
    runner.stop();
    let console = runner.config().console_log();
    let keep = |why: &anyhow::Error| {
        let to = dir
            .join("failures")
            .join(format!("state-{index}.console.txt"));
        let _ = std::fs::copy(&console, &to);
        let _ = std::fs::write(
            dir.join("failures").join(format!("state-{index}.boot.txt")),
            format!("{why:#}"),
        );
    };
    let result = (|| -> anyhow::Result<String> {
        let up = up?;
        let last = booted.last().cloned();
        let slot = match (&up, last.as_deref()) {
            (Verdict::Normal, Some(l)) if l.starts_with(init::booted('a', 1, false).as_str()) => {
                Some(Verdict::Old)
            }
            (Verdict::Normal, Some(l))
                if l.starts_with(init::booted('b', 2, true).as_str())
                    || l.starts_with(init::booted('b', 2, false).as_str()) =>
            {
                Some(Verdict::New)
            }
            (Verdict::Normal, l) => bail!("init: ready, but the booted slot is {l:?}"),
            _ => None,
        };
        let after = check::state_offline(&f.state).context("after the boot")?;
        match path {
            "install" | "activation" => {
                let v = slot.with_context(|| "came up in recovery, not a slot".to_string())?;
                anyhow::ensure!(
                    cut < confirmed(rec)? || v == Verdict::New,
                    "the update was reported confirmed before this cut, yet the {} booted",
                    v.label()
                );
                if let Some(p) = predicted {
                    anyhow::ensure!(
                        p == v,
                        "booted the {}, the offline model predicted the {}",
                        v.label(),
                        p.label()
                    );
                }
                Ok(v.label().to_string())
            }
            "reset-wipe" => {
                anyhow::ensure!(
                    up == Verdict::Recovery || slot == Some(Verdict::Old),
                    "the normal system did not boot slot a"
                );
                let w = check::wipe_state(&after)?;
                anyhow::ensure!(
                    w != Verdict::Pending || up == Verdict::Recovery,
                    "the normal system is up with a wipe request still pending"
                );
                let want = match predicted {
                    Some(Verdict::Untouched) => Some(Verdict::Untouched),
                    Some(Verdict::Pending | Verdict::Wiped) => Some(Verdict::Wiped),
                    _ => None,
                };
                if let Some(want) = want {
                    anyhow::ensure!(
                        w == want,
                        "after the boot the data is {}, expected {} (offline: {})",
                        w.label(),
                        want.label(),
                        predicted.map_or("?", Verdict::label)
                    );
                }
                if cut >= rec.mark(record::MARK_ACKED)? {
                    anyhow::ensure!(
                        w == Verdict::Wiped,
                        "the reset was acknowledged but the data is {}",
                        w.label()
                    );
                }
                Ok(format!("{}, {}", up.label(), w.label()))
            }
            _ => {
                if let Some(p) = predicted {
                    anyhow::ensure!(
                        p == up,
                        "came up in {}, the offline model predicted {}",
                        up.label(),
                        p.label()
                    );
                }
                anyhow::ensure!(
                    up == Verdict::Recovery || slot == Some(Verdict::Old),
                    "the normal system did not boot slot a"
                );
                let acked = rec.mark(record::MARK_ACKED)?;
                let rebooted = rec
                    .marks
                    .get(record::MARK_REBOOTED)
                    .copied()
                    .unwrap_or(usize::MAX);
                anyhow::ensure!(
                    !(cut >= acked && cut < rebooted) || up == Verdict::Recovery,
                    "nx was told the next boot is recovery (cut after its answer, before the reboot), yet {} came up",
                    up.label()
                );
                let _ = after;
                Ok(up.label().to_string())
            }
        }
    })();
    if let Err(e) = &result {
        keep(e);
    }
    result
}

/// The short run of `cargo xtask ci`: every path, a few states, one boot each (one install
/// recording serves `install` and `activation`; docs/runner/crash.md).
pub fn ci() -> anyhow::Result<Vec<Summary>> {
    run_paths(&Args {
        path: "all".into(),
        states: CI_STATES,
        boot: CI_BOOTS,
        seed: 1,
        echo: false,
        no_build: true,
    })
}

/// States per path in CI.
const CI_STATES: usize = 4;
/// Boots per path in CI.
const CI_BOOTS: usize = 1;
