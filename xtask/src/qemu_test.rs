//! `cargo xtask qemu-test --profile <name>`: boot a profile of `qemu/markers.toml` in QEMU and
//! check its marker contract. Honours `PROFILE=`, `RECOVERY=1`, `RUN_TIMEOUT=120s` and
//! `RUN_UNTIL_MARKER=1` (stop as soon as the contract is met; otherwise keep the guest up
//! until the timeout or until it powers off, then judge the forbidden markers again).

use crate::util;
use anyhow::{bail, Context};
use nx_qemu::markers::{self, Contract};
use nx_qemu::{Config, Runner};
use std::time::{Duration, Instant};

/// Arguments of `cargo xtask qemu-test`.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Profile in qemu/markers.toml (default: `recovery` with RECOVERY=1, else `normal`).
    #[arg(long, env = "PROFILE")]
    pub profile: Option<String>,
    /// Overall timeout (`120s`, `2m`, `500ms`, or seconds).
    #[arg(long, env = "RUN_TIMEOUT", default_value = "120s")]
    pub timeout: String,
    /// Stop as soon as every marker was seen.
    #[arg(long, env = "RUN_UNTIL_MARKER", value_parser = clap::builder::FalseyValueParser::new())]
    pub until_marker: bool,
    /// Echo the guest console.
    #[arg(long, env = "NX_QEMU_ECHO", value_parser = clap::builder::FalseyValueParser::new())]
    pub echo: bool,
    /// Do not run `cargo xtask guest` first.
    #[arg(long)]
    pub no_build: bool,
}

/// Parse `120s`, `2m`, `500ms`, `90`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, mul_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad duration {s:?} (use e.g. 120s, 2m, 500ms)"))?;
    Ok(Duration::from_millis(n.saturating_mul(mul_ms)))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.no_build {
        crate::guest::build(&crate::guest::Args::default())?;
    }
    let profile = args.profile.clone().unwrap_or_else(|| {
        if std::env::var("RECOVERY").is_ok_and(|v| v == "1") {
            "recovery".into()
        } else {
            "normal".into()
        }
    });
    let timeout = parse_duration(&args.timeout)?;
    let ready = run_profile(&profile, timeout, args.until_marker, args.echo)?;
    if let Some(r) = ready {
        println!(
            "[ok] {profile}: boot to ready took {:.2} s",
            r.as_secs_f64()
        );
    }
    Ok(())
}

/// Boot `profile` and check it. Returns the measured boot-to-ready time.
pub fn run_profile(
    profile: &str,
    timeout: Duration,
    until_marker: bool,
    echo: bool,
) -> anyhow::Result<Option<Duration>> {
    let contract = Contract::load(&util::root().join("qemu/markers.toml"))?;
    let p = contract.get(profile).map_err(anyhow::Error::msg)?;
    let mut cfg = Config::new(&util::build_dir()).apply_env();
    cfg.qemu = util::tool("qemu-system-x86_64")?;
    cfg.echo = echo;
    p.apply(&mut cfg);
    eprintln!("xtask: qemu-test {profile}: {}", p.description);
    eprintln!("xtask: console log: {}", cfg.console_log().display());
    let started = Instant::now();
    let mut runner = Runner::start(cfg).context("could not start the QEMU runner")?;
    let report = match markers::check(&runner, p, &contract.defaults, timeout) {
        Ok(r) => r,
        Err(e) => {
            runner.stop();
            eprintln!("{e}");
            bail!("qemu-test {profile} failed");
        }
    };
    for (m, hit) in &report.hits {
        eprintln!(
            "  [marker] boot {} +{:>6.2}s  {m}",
            hit.boot,
            hit.since_boot.as_secs_f64()
        );
    }
    if !until_marker {
        let left = timeout.saturating_sub(started.elapsed());
        eprintln!(
            "xtask: markers seen; keeping the guest up for {:.0} s (RUN_UNTIL_MARKER=1 stops now)",
            left.as_secs_f64()
        );
        runner.wait_finished(left);
        let forbidden: Vec<&String> = contract
            .defaults
            .forbidden
            .iter()
            .chain(p.forbidden.iter())
            .collect();
        for f in forbidden {
            if runner.console_contains(f) {
                runner.stop();
                eprintln!("[error] Forbidden marker seen: {f}");
                for l in runner.tail(markers::TAIL_LINES) {
                    eprintln!("{l}");
                }
                bail!("qemu-test {profile} failed");
            }
        }
    }
    let outcome = runner.stop();
    eprintln!(
        "[ok] qemu-test {profile}: {} markers in order ({outcome}); total {:.1} s",
        report.hits.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(report.ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("120s").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_duration("soon").is_err());
    }
}
