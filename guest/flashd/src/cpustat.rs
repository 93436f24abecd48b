//! Where flashd's CPU time goes: per-thread user+system time from `/proc/self/task/*/stat`
//! and the machine's idle time from `/proc/stat`, as deltas between two snapshots. Logged
//! after every install (`flashd (log): cpu …`) for `cargo xtask bench` and anyone profiling
//! the guest; nothing depends on it.

use std::collections::BTreeMap;
use std::path::Path;

/// Clock ticks per second of `/proc` times (USER_HZ, 100 on Linux).
const HZ: u64 = 100;

/// One snapshot.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Thread name → ticks (user + system), summed over threads of the same name.
    threads: BTreeMap<String, u64>,
    /// Idle + iowait ticks of the whole machine.
    idle: u64,
    /// All ticks of the whole machine.
    total: u64,
}

fn read(path: &Path) -> Option<String> {
    nx_guest::fsx::read_bounded(path, 64 * 1024)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// `(comm, utime + stime)` from a `/proc/<pid>/task/<tid>/stat` line.
pub fn parse_task_stat(line: &str) -> Option<(String, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let comm = line.get(open + 1..close)?.to_string();
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    // Fields after the comm start at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// `(idle + iowait, total)` from the `cpu` line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((idle, v.iter().sum()))
}

impl Snapshot {
    /// Take a snapshot of this process and the machine (empty where /proc is unreadable).
    pub fn take() -> Snapshot {
        let mut s = Snapshot::default();
        if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
            for e in dir.flatten() {
                if let Some((comm, ticks)) =
                    read(&e.path().join("stat")).and_then(|l| parse_task_stat(&l))
                {
                    *s.threads.entry(comm).or_default() += ticks;
                }
            }
        }
        if let Some((idle, total)) = read(Path::new("/proc/stat")).and_then(|t| parse_proc_stat(&t))
        {
            s.idle = idle;
            s.total = total;
        }
        s
    }

    /// `cpu ms: flashd-rx=… flashd-hash=… …; machine idle …% of … ms` since `earlier`.
    pub fn since(&self, earlier: &Snapshot) -> String {
        let ms = |t: u64| t * 1000 / HZ;
        let mut parts: Vec<String> = self
            .threads
            .iter()
            .map(|(name, t)| {
                let before = earlier.threads.get(name).copied().unwrap_or(0);
                (name, t.saturating_sub(before))
            })
            .filter(|(_, d)| *d > 0)
            .map(|(name, d)| format!("{name}={}", ms(d)))
            .collect();
        if parts.is_empty() {
            parts.push("(no samples)".into());
        }
        let total = self.total.saturating_sub(earlier.total);
        let idle = self.idle.saturating_sub(earlier.idle);
        format!(
            "cpu ms {}; machine idle {}% of {} ms (all vCPUs)",
            parts.join(" "),
            (idle * 100).checked_div(total).unwrap_or(0),
            ms(total)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_lines() {
        let l = "1234 (flashd-hash) S 1 1 1 0 -1 4194624 10 0 0 0 250 17 0 0 20 0 5 0 100 0 0";
        assert_eq!(parse_task_stat(l), Some(("flashd-hash".into(), 267)));
        let l = "7 (a (b) c) R 1 1 1 0 -1 0 0 0 0 0 3 4 0 0";
        assert_eq!(parse_task_stat(l), Some(("a (b) c".into(), 7)));
        assert_eq!(parse_task_stat("garbage"), None);
        let stat = "cpu  100 0 50 800 40 0 10 0 0 0\ncpu0 1 2 3\n";
        assert_eq!(parse_proc_stat(stat), Some((840, 1000)));
        let a = Snapshot {
            threads: [("x".to_string(), 10)].into(),
            idle: 10,
            total: 100,
        };
        let b = Snapshot {
            threads: [("x".to_string(), 35), ("y".to_string(), 0)].into(),
            idle: 60,
            total: 200,
        };
        assert_eq!(
            b.since(&a),
            "cpu ms x=250; machine idle 50% of 1000 ms (all vCPUs)"
        );
    }
}
