//! `cargo xtask fuzz [TARGET] [--time S] [--keep] [--seed]`: a coverage-guided campaign with
//! libFuzzer on the stable toolchain.
//!
//! The targets are plain functions in `fuzz/` (crate `nx-fuzz`); `fuzz/libfuzzer` links them to
//! libFuzzer and is built here with coverage instrumentation (`-C passes=sancov-module`, the
//! flags cargo-fuzz uses with `--sanitizer none`). Each target runs for `--time` seconds with
//! the checked-in corpus `fuzz/corpus/<target>/` as its seed and `build/fuzz/corpus/<target>/`
//! as its working corpus; crashes land in `build/fuzz/artifacts/<target>/`. `--keep` merges
//! what the campaign found into the checked-in corpus (libFuzzer `-merge=1`: only inputs that
//! add coverage). CI does not run campaigns: `cargo test -p nx-fuzz` replays the corpus.

use crate::util::{self, cargo, run_cmd};
use anyhow::{bail, Context};
use std::path::Path;
use std::process::{Command, Stdio};

/// Arguments of `cargo xtask fuzz`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// One target (frame, msg, image, receiver, snapshot); all when omitted.
    pub target: Option<String>,
    /// Seconds per target.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub time: u64,
    /// Merge new coverage into the checked-in corpus (fuzz/corpus/<target>/).
    #[arg(long)]
    pub keep: bool,
    /// Only (re)write the generated seeds (fuzz/corpus/<target>/seed-*) and stop.
    #[arg(long)]
    pub seed: bool,
}

/// The instrumentation flags (stable rustc).
const RUSTFLAGS: &str = "--cfg fuzzing -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cdebug-assertions -Coverflow-checks";

/// The fuzz targets, from `nx-fuzz list`.
fn targets() -> anyhow::Result<Vec<String>> {
    let out = util::capture(cargo().args(["run", "-q", "-p", "nx-fuzz", "--", "list"]))?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = util::root();
    let corpus = root.join("fuzz/corpus");
    if args.seed {
        return run_cmd(
            cargo()
                .args(["run", "-q", "-p", "nx-fuzz", "--", "seed"])
                .arg(&corpus),
        );
    }
    let all = targets()?;
    let chosen: Vec<String> = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target {t:?}; the targets are: {}", all.join(", ")),
        None => all,
    };
    util::stage("fuzz: build (libFuzzer, coverage instrumentation)");
    let target_dir = root.join("target/fuzz");
    run_cmd(
        cargo()
            .args([
                "build",
                "--release",
                "--target",
                crate::guest::TARGET,
                "--manifest-path",
            ])
            .arg(root.join("fuzz/libfuzzer/Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            .env("RUSTFLAGS", RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS"),
    )
    .context("building the libFuzzer driver")?;
    let bin = target_dir
        .join(crate::guest::TARGET)
        .join("release/nx-fuzz-libfuzzer");
    let mut summary = Vec::new();
    let mut failed = Vec::new();
    for t in &chosen {
        util::stage(&format!("fuzz {t} ({} s)", args.time));
        let work = util::build_dir().join("fuzz/corpus").join(t);
        let artifacts = util::build_dir().join("fuzz/artifacts").join(t);
        for d in [&work, &artifacts] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let seeds = corpus.join(t);
        let (execs, ok, log) = campaign(&bin, t, args.time, &work, &seeds, &artifacts)?;
        let line = format!(
            "fuzz {t}: {execs} execs in {} s ({:.0}/s), corpus {} inputs{}",
            args.time,
            execs as f64 / args.time.max(1) as f64,
            count(&work) + count(&seeds),
            if ok {
                String::new()
            } else {
                format!(", FAILED: see {}", artifacts.display())
            }
        );
        println!("{line}");
        if !ok {
            eprintln!("{log}");
            failed.push(t.clone());
        }
        summary.push(line);
        if args.keep && ok {
            let st = Command::new(&bin)
                .env("NX_FUZZ_TARGET", t)
                .arg("-merge=1")
                .arg(&seeds)
                .arg(&work)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("libFuzzer -merge")?;
            anyhow::ensure!(st.success(), "merging the corpus of {t} failed ({st})");
            println!("fuzz {t}: checked-in corpus now {} inputs", count(&seeds));
        }
    }
    util::stage("fuzz summary");
    for l in &summary {
        println!("{l}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (replay a crash with `cargo run -p nx-fuzz -- replay TARGET FILE`)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// One libFuzzer run; returns (executions, no crash, the log's tail).
fn campaign(
    bin: &Path,
    target: &str,
    secs: u64,
    work: &Path,
    seeds: &Path,
    artifacts: &Path,
) -> anyhow::Result<(u64, bool, String)> {
    let mut prefix = artifacts.as_os_str().to_owned();
    prefix.push("/");
    let out = Command::new(bin)
        .env("NX_FUZZ_TARGET", target)
        .arg(format!("-max_total_time={secs}"))
        .arg("-print_final_stats=1")
        .arg("-max_len=65536")
        .arg({
            let mut a = std::ffi::OsString::from("-artifact_prefix=");
            a.push(&prefix);
            a
        })
        .arg(work)
        .arg(seeds)
        .stdout(Stdio::null())
        .output()
        .context("running the libFuzzer driver")?;
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    let execs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    Ok((execs, out.status.success(), tail))
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}
