//! (g) The boot chain, stage by stage: a plain power-on of a fresh device (fresh disks and
//! NVRAM under `build/bench/boot/`) into normal, and one into recovery (the runner's one-shot
//! entry), each timed from QEMU start on the console:
//!
//! | stage | ends at |
//! |---|---|
//! | firmware | OVMF's `BdsDxe: starting …` (it starts systemd-boot) |
//! | bootloader | the kernel's start: ready minus the kernel uptime our PID 1 prints at ready (`quiet`: nothing is on the console in between) |
//! | kernel | our PID 1's first line (`init: …` / `recovery: …`) |
//! | userspace | the uptime line at `init: ready` / `recovery: ready` |

use crate::util;
use anyhow::Context;
use nx_contract::markers;
use nx_qemu::Runner;
use std::path::Path;
use std::time::Duration;

/// One boot's stages: `(stage, end marker, time from QEMU start)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Stages {
    /// `normal` or `recovery`.
    pub target: &'static str,
    pub stages: Vec<(&'static str, Duration)>,
}

impl Stages {
    /// QEMU start → ready.
    pub fn total(&self) -> Duration {
        self.stages.last().map(|s| s.1).unwrap_or_default()
    }

    /// `stage: +x.xx s (at y.yy s)` lines.
    pub fn lines(&self) -> Vec<String> {
        let mut prev = Duration::ZERO;
        self.stages
            .iter()
            .map(|(name, at)| {
                let d = at.saturating_sub(prev);
                prev = *at;
                format!(
                    "{:<10} {:>6.2} s  (at {:.2} s)",
                    name,
                    d.as_secs_f64(),
                    at.as_secs_f64()
                )
            })
            .collect()
    }
}

/// Boot a fresh device into `recovery` or normal and time the stages.
fn one(dir: &Path, recovery: bool) -> anyhow::Result<Stages> {
    let seed = util::build_dir().join("nexus-os.img");
    let mut cfg = crate::disks::fresh_device(dir, Some(&seed))?;
    cfg.recovery = recovery;
    let runner = Runner::start(cfg)?;
    let t = Duration::from_secs(120);
    let (prefix, ready, target) = if recovery {
        ("recovery", markers::recovery::READY_PREFIX, "recovery")
    } else {
        ("init", "init: ready", "normal")
    };
    let firmware = runner.wait_for(nx_qemu::FIRMWARE_BOOT_LINE, t)?.since_boot;
    let first = runner.wait_for(&format!("{prefix}: "), t)?.since_boot;
    let ready_at = runner.wait_for(ready, t)?.since_boot;
    // Our PID 1 reports the kernel's uptime next to `ready` (just before or after): the kernel
    // started that long before.
    let up_line = markers::pid1::uptime_prefix(prefix);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(l) = runner.grep(up_line.as_str()).into_iter().next() {
            break l;
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{prefix} printed no uptime line near ready");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let uptime: f64 = line
        .split(up_line.as_str())
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no uptime in {line:?}"))?;
    let kernel_start = ready_at.saturating_sub(Duration::from_secs_f64(uptime.max(0.0)));
    let stages = vec![
        ("firmware", firmware),
        ("bootloader", kernel_start.max(firmware)),
        ("kernel", first.max(kernel_start)),
        ("userspace", ready_at),
    ];
    Ok(Stages { target, stages })
}

/// (g): a normal and a recovery power-on.
pub fn measure(dir: &Path) -> anyhow::Result<Vec<Stages>> {
    Ok(vec![
        one(&dir.join("normal"), false)?,
        one(&dir.join("recovery"), true)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_lines_are_differences() {
        let s = Stages {
            target: "normal",
            stages: vec![
                ("firmware", Duration::from_millis(4500)),
                ("bootloader", Duration::from_millis(5000)),
                ("kernel", Duration::from_millis(6200)),
                ("userspace", Duration::from_millis(7400)),
            ],
        };
        let l = s.lines();
        assert_eq!(l[0], "firmware     4.50 s  (at 4.50 s)");
        assert_eq!(l[1], "bootloader   0.50 s  (at 5.00 s)");
        assert_eq!(l[3], "userspace    1.20 s  (at 7.40 s)");
        assert_eq!(s.total(), Duration::from_millis(7400));
    }
}
