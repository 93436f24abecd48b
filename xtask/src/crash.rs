//! `cargo xtask crash [--path install] [--states N] [--seed S]`: power cuts that lose what
//! real disks lose (the block-layer crash simulator of `crashsim.rs`).
//!
//! Record: a guest boots with both disks attached over NBD to the recorder and runs a path —
//! `install`: recovery, `nx flash send` of the v2 image, the reboot into the trial slot, its
//! confirmation — while every write and flush of both disks is logged in completion order.
//! Replay: for each of `--states` crash states (a random cut point in the log; every write
//! before the last flush of its disk kept, each later write kept or lost at random) the disks
//! are rebuilt and booted normally. The device must come up with the old slot (a, version 1) or
//! the new one (b, version 2) — never neither. Failures keep their console under
//! `build/crash/<path>/failures/`.

use crate::crashsim::{crash_state, surviving, Op, Recorder};
use crate::util::{self, cargo, run_cmd};
use anyhow::{bail, Context};
use nx_contract::markers::{init, recovery};
use nx_contract::ports;
use nx_qemu::{Config, Runner};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Arguments of `cargo xtask crash`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The path to record and cut: `install` (flash, activation, trial boot, confirm).
    #[arg(long, default_value = "install")]
    pub path: String,
    /// Crash states to boot.
    #[arg(long, default_value_t = 20)]
    pub states: usize,
    /// Seed of the cut points and lost writes (same seed, same states).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Echo the guest console.
    #[arg(long)]
    pub echo: bool,
}

/// Time for one boot or one step of the recording.
const STEP: Duration = Duration::from_secs(120);

/// Deterministic PRNG (splitmix64).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn sparse_copy(from: &Path, to: &Path) -> anyhow::Result<()> {
    run_cmd(
        Command::new(util::tool("cp")?)
            .args(["--sparse=always", "--reflink=auto"])
            .arg(from)
            .arg(to),
    )
}

/// The runner configuration for disks `state`/`disk` with its run directory `run`.
fn config(run: &Path, state: &Path, disk: &Path, echo: bool) -> anyhow::Result<Config> {
    let build = util::build_dir();
    let mut cfg = Config::new(&build);
    cfg.qemu = util::tool("qemu-system-x86_64")?;
    cfg.state_img = Some(state.to_path_buf());
    cfg.disk_img = Some(disk.to_path_buf());
    cfg.run_dir = run.to_path_buf();
    cfg.fresh_vars(run.join("ovmf-vars.fd"));
    for p in &mut cfg.ports {
        p.socket = run.join(p.socket.file_name().unwrap_or_default());
    }
    cfg.echo = echo;
    Ok(cfg)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.path != "install" {
        bail!(
            "unknown path {:?}: `install` is recorded so far (activation, reset-wipe and the \
             boot record are the next paths: stub/placeholder)",
            args.path
        );
    }
    let out = crate::guest::build(&crate::guest::Args::default())?;
    let v2 = out
        .v2_image
        .context("no build/nexus-os-v2.img (stub/placeholder images): cannot record an install")?;
    let demo = out
        .demo_image
        .context("no build/nexus-os.img: cannot seed slot a")?;
    let dir = util::build_dir().join("crash").join(&args.path);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("failures"))?;
    let (state_base, disk_base) = (dir.join("state.base.img"), dir.join("disk.base.img"));
    crate::disks::ensure_state(&state_base, true)?;
    crate::disks::ensure_disk(&disk_base, true, Some(&demo))?;

    util::stage(&format!("crash {}: record", args.path));
    let (state_work, disk_work) = (dir.join("state.rec.img"), dir.join("disk.rec.img"));
    sparse_copy(&state_base, &state_work)?;
    sparse_copy(&disk_base, &disk_work)?;
    let run_dir = dir.join("qemu");
    std::fs::create_dir_all(&run_dir)?;
    let (s_sock, d_sock) = (run_dir.join("state.nbd"), run_dir.join("disk.nbd"));
    let rec = Recorder::start(&[(&state_work, &s_sock), (&disk_work, &d_sock)])?;
    let ops = record_install(&args, &rec, &run_dir, &state_work, &disk_work, &v2)?;
    let writes = ops
        .iter()
        .filter(|o| !matches!(o, Op::Flush { .. }))
        .count();
    let bytes: usize = ops
        .iter()
        .map(|o| match o {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        })
        .sum();
    println!(
        "crash {}: recorded {} operations ({writes} writes/zeroings, {} flushes, {} MiB written)",
        args.path,
        ops.len(),
        ops.len() - writes,
        bytes >> 20
    );

    util::stage(&format!(
        "crash {}: {} crash states",
        args.path, args.states
    ));
    let mut rng = Rng(args.seed);
    let (state_crash, disk_crash) = (dir.join("state.crash.img"), dir.join("disk.crash.img"));
    let mut old = 0;
    let mut new = 0;
    let mut failed = Vec::new();
    for i in 0..args.states {
        let cut = 1 + (rng.next() % ops.len().max(1) as u64) as usize;
        let keep_seed = rng.next();
        let mut k = Rng(keep_seed);
        let apply = surviving(&ops, cut, |_| k.next() & 1 == 1);
        crash_state(
            &[&state_base, &disk_base],
            &ops,
            &apply,
            &[&state_crash, &disk_crash],
        )?;
        let t0 = Instant::now();
        let verdict = boot_state(&args, &run_dir, &state_crash, &disk_crash, &dir, i);
        let took = t0.elapsed().as_secs_f64();
        match verdict {
            Ok(Outcome::Old) => old += 1,
            Ok(Outcome::New) => new += 1,
            Err(e) => failed.push(format!("state {i} (cut {cut}/{}): {e:#}", ops.len())),
        }
        println!(
            "crash {} state {i}: cut after {cut}/{} ops, {} of them applied: {} ({took:.1} s)",
            args.path,
            ops.len(),
            apply.len(),
            failed
                .last()
                .filter(|f| f.starts_with(&format!("state {i} ")))
                .map_or_else(|| "ok".to_string(), |_| "FAILED".to_string())
        );
    }
    util::stage("crash summary");
    println!(
        "crash {}: {} states: {old} booted the old slot (a, 1), {new} the new one (b, 2), {} neither",
        args.path,
        args.states,
        failed.len()
    );
    for f in &failed {
        eprintln!("[error] crash {}: {f}", args.path);
    }
    anyhow::ensure!(
        failed.is_empty(),
        "{} crash state(s) did not boot a slot",
        failed.len()
    );
    Ok(())
}

fn record_install(
    args: &Args,
    rec: &Recorder,
    run_dir: &Path,
    state: &Path,
    disk: &Path,
    v2: &Path,
) -> anyhow::Result<Vec<Op>> {
    let mut cfg = config(run_dir, state, disk, args.echo)?;
    cfg.recovery = true;
    let sock = |i: usize| -> anyhow::Result<PathBuf> {
        Ok(rec.socket(i).context("recorder socket")?.to_path_buf())
    };
    cfg.nbd = vec![("state".into(), sock(0)?), ("disk".into(), sock(1)?)];
    let flash = cfg
        .port_socket(ports::FLASH.name)
        .context("no flash port")?
        .to_path_buf();
    let mut runner = Runner::start(cfg)?;
    let step = |runner: &Runner, m: &str| -> anyhow::Result<()> {
        runner.wait_for(m, STEP).map(|_| ()).map_err(|e| {
            anyhow::anyhow!(
                "{m:?} not seen: {e}\nconsole tail:\n{}",
                runner.tail(40).join("\n")
            )
        })
    };
    step(&runner, recovery::ready("/dev/vport0p1").as_str())?;
    run_cmd(cargo().args(["build", "-q", "-p", "nx-cli", "--bin", "nx"]))?;
    let st = Command::new(util::root().join("target/debug/nx"))
        .args(["flash", "send", "--port"])
        .arg(format!("unix:{}", flash.display()))
        .arg(v2)
        .status()
        .context("nx flash send")?;
    if !st.success() {
        bail!(
            "nx flash send failed ({st})\nconsole tail:\n{}",
            runner.tail(40).join("\n")
        );
    }
    step(&runner, init::confirmed('b').as_str())?;
    step(&runner, init::ready().as_str())?;
    runner.stop();
    if let Some(e) = rec.error() {
        bail!("the NBD recorder failed: {e}");
    }
    Ok(rec.ops())
}

enum Outcome {
    Old,
    New,
}

/// Boot a crash state normally; the slot it comes up with.
fn boot_state(
    args: &Args,
    run_dir: &Path,
    state: &Path,
    disk: &Path,
    dir: &Path,
    i: usize,
) -> anyhow::Result<Outcome> {
    let cfg = config(run_dir, state, disk, args.echo)?;
    let mut runner = Runner::start(cfg)?;
    let result = runner.wait_for(init::ready().as_str(), STEP).map(|_| ());
    let booted = runner.grep(init::BOOTED_PREFIX);
    let tail = runner.tail(60);
    runner.stop();
    let outcome = match (result, booted.last()) {
        (Ok(()), Some(l)) if l.starts_with(init::booted('a', 1, false).as_str()) => {
            Ok(Outcome::Old)
        }
        (Ok(()), Some(l))
            if l.starts_with(init::booted('b', 2, true).as_str())
                || l.starts_with(init::booted('b', 2, false).as_str()) =>
        {
            Ok(Outcome::New)
        }
        (Ok(()), Some(l)) => Err(anyhow::anyhow!("booted something else: {l}")),
        (Ok(()), None) => Err(anyhow::anyhow!("init: ready without a booted slot")),
        (Err(e), _) => Err(anyhow::anyhow!("no slot came up: {e}")),
    };
    if outcome.is_err() {
        let log = dir.join("failures").join(format!("state-{i}.console.txt"));
        std::fs::write(&log, tail.join("\n"))
            .with_context(|| format!("write {}", log.display()))?;
    }
    outcome
}
