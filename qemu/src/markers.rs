//! The marker contract: `qemu/markers.toml` holds, per profile, how to boot (recovery or
//! normal, with or without disks, extra kernel arguments), the ordered markers that must
//! appear, markers that must never appear, and an optional console script (send / expect).

use crate::{Config, Error, Hit, Runner};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// Console lines shown with a failure.
pub const TAIL_LINES: usize = 40;

/// The whole contract file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    /// Applies to every profile.
    #[serde(default)]
    pub defaults: Defaults,
    /// Profiles by name.
    pub profile: BTreeMap<String, Profile>,
    /// What flashd prints during one successful transfer (checked by the flash e2e tests).
    #[serde(default)]
    pub flash: FlashMarkers,
    /// The A/B update e2e scenarios (`cargo xtask e2e --only <name>`): the whole console of
    /// the scenario's run (every boot) must show these markers in order, and never a
    /// forbidden one.
    #[serde(default)]
    pub e2e: BTreeMap<String, Scenario>,
}

/// The console contract of one e2e scenario.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// What it proves.
    pub description: String,
    /// Markers in order over the whole run.
    pub markers: Vec<String>,
    /// Markers that must never appear.
    #[serde(default)]
    pub forbidden: Vec<String>,
    /// `[defaults]` forbidden markers this scenario expects (e.g. the kernel panics of a
    /// slot whose init cannot run).
    #[serde(default)]
    pub allowed: Vec<String>,
}

/// Check `markers` in order (each after the line of the previous one) and the absence of
/// `forbidden` in a finished console (`lines`). Returns the line index of every marker.
pub fn check_lines(
    lines: &[String],
    markers: &[String],
    forbidden: &[String],
) -> Result<Vec<usize>, CheckError> {
    let tail = || {
        let start = lines.len().saturating_sub(TAIL_LINES);
        lines.get(start..).unwrap_or_default().to_vec()
    };
    let mut at = Vec::with_capacity(markers.len());
    let mut cursor = 0usize;
    for m in markers {
        let found = lines
            .get(cursor..)
            .and_then(|ls| ls.iter().position(|l| l.contains(m.as_str())));
        match found {
            Some(off) => {
                at.push(cursor + off);
                cursor += off + 1;
            }
            None => {
                let reason = if lines.iter().any(|l| l.contains(m.as_str())) {
                    "present, but not after the previous marker: out of order".to_string()
                } else {
                    "not in the console log".to_string()
                };
                return Err(CheckError::Missing {
                    marker: m.clone(),
                    reason,
                    tail: tail(),
                });
            }
        }
    }
    for f in forbidden {
        if lines.iter().any(|l| l.contains(f.as_str())) {
            return Err(CheckError::Forbidden {
                marker: f.clone(),
                tail: tail(),
            });
        }
    }
    Ok(at)
}

/// flashd's markers for one successful transfer, in order.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlashMarkers {
    /// Ordered markers.
    #[serde(default)]
    pub markers: Vec<String>,
    /// Markers a resumed transfer must show (after the cut), in order.
    #[serde(default)]
    pub resume_markers: Vec<String>,
}

/// Settings for every profile.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Markers that fail every profile (e.g. a kernel panic).
    #[serde(default)]
    pub forbidden: Vec<String>,
}

fn yes() -> bool {
    true
}

/// One profile.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// What it proves.
    pub description: String,
    /// First boot into recovery (`RECOVERY=1`).
    #[serde(default)]
    pub recovery: bool,
    /// Attach `state.img`.
    #[serde(default = "yes")]
    pub state: bool,
    /// Attach `disk.img`.
    #[serde(default = "yes")]
    pub disk: bool,
    /// Extra kernel arguments.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Markers that must appear, in this order.
    pub markers: Vec<String>,
    /// Markers that must appear at some point of the run, in any order (lines of processes
    /// that run concurrently with the ordered ones). Checked after `markers`, waiting for
    /// each up to the overall timeout.
    #[serde(default)]
    pub present: Vec<String>,
    /// The marker whose time since boot is reported as the boot time.
    #[serde(default)]
    pub ready: Option<String>,
    /// Markers that must never appear.
    #[serde(default)]
    pub forbidden: Vec<String>,
    /// Steps after the markers: type into the console, then expect a line.
    #[serde(default)]
    pub script: Vec<Step>,
    /// Keep the guest running this long after the last step before judging `forbidden`.
    #[serde(default)]
    pub settle_ms: u64,
}

/// One console step.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Bytes to type (TOML escapes such as `\r` work).
    #[serde(default)]
    pub send: Option<String>,
    /// A marker to wait for afterwards.
    #[serde(default)]
    pub expect: Option<String>,
}

impl Contract {
    /// Read and validate a contract file.
    pub fn load(path: &Path) -> Result<Contract, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Io(nx_contract::PathIoError {
                what: "read",
                path: path.to_path_buf(),
                source: e,
            })
        })?;
        Self::parse(&text).map_err(|reason| Error::Markers {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parse and validate.
    pub fn parse(text: &str) -> Result<Contract, String> {
        let c: Contract = toml::from_str(text).map_err(|e| e.to_string())?;
        for (name, p) in &c.profile {
            if p.markers.is_empty() {
                return Err(format!("profile {name} has no markers"));
            }
            if let Some(r) = &p.ready {
                if !p.markers.contains(r) {
                    return Err(format!(
                        "profile {name}: ready marker {r:?} is not one of its markers"
                    ));
                }
            }
        }
        Ok(c)
    }

    /// A profile by name, or an error listing the known ones.
    pub fn get(&self, name: &str) -> Result<&Profile, String> {
        self.profile.get(name).ok_or_else(|| {
            format!(
                "unknown profile {name:?}; known: {}",
                self.profile.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

impl Profile {
    /// Apply the profile's boot settings to a runner configuration.
    pub fn apply(&self, cfg: &mut Config) {
        cfg.recovery |= self.recovery;
        if !self.state {
            cfg.state_img = None;
        }
        if !self.disk {
            cfg.disk_img = None;
        }
        cfg.extra_cmdline.extend(self.cmdline.iter().cloned());
        // Through OVMF and the disk's own bootloader, from a fresh NVRAM per run (same inputs,
        // same boot); without a slot disk the runner boots the kernel directly.
        let vars = cfg.run_dir.join("ovmf-vars.fd");
        cfg.fresh_vars(vars);
    }
}

/// What a passing check saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Every awaited marker with its hit, in order.
    pub hits: Vec<(String, Hit)>,
    /// Time from QEMU start to the profile's `ready` marker.
    pub ready: Option<Duration>,
}

/// A failed check. `Display` is the contract's error format.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A marker did not appear (in order) in time.
    #[error("[error] Missing marker: {marker} ({reason})\n{}", render_tail(.tail))]
    Missing {
        marker: String,
        reason: String,
        tail: Vec<String>,
    },
    /// A forbidden marker appeared.
    #[error("[error] Forbidden marker seen: {marker}\n{}", render_tail(.tail))]
    Forbidden { marker: String, tail: Vec<String> },
    /// The console could not be written.
    #[error("[error] {0}")]
    Runner(Error),
}

fn render_tail(tail: &[String]) -> String {
    let mut s = format!("--- last {} console lines ---\n", tail.len());
    for l in tail {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("--- end of console ---");
    s
}

/// Check a profile on a running guest: every marker in order, then the script, then (after
/// `settle_ms`) that no forbidden marker appeared. `timeout` covers the whole check.
pub fn check(
    runner: &Runner,
    profile: &Profile,
    defaults: &Defaults,
    timeout: Duration,
) -> Result<Report, CheckError> {
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let missing = |marker: &str, e: Error| CheckError::Missing {
        marker: marker.to_string(),
        reason: e.to_string(),
        tail: runner.tail(TAIL_LINES),
    };
    let forbidden: Vec<&String> = defaults
        .forbidden
        .iter()
        .chain(profile.forbidden.iter())
        .collect();
    let check_forbidden = || -> Result<(), CheckError> {
        for f in &forbidden {
            if runner.console_contains(f) {
                return Err(CheckError::Forbidden {
                    marker: f.to_string(),
                    tail: runner.tail(TAIL_LINES),
                });
            }
        }
        Ok(())
    };
    let mut hits = Vec::new();
    let mut ready = None;
    for m in &profile.markers {
        let hit = runner
            .wait_for(m, left())
            .map_err(|e| check_forbidden().err().unwrap_or_else(|| missing(m, e)))?;
        if profile.ready.as_deref() == Some(m.as_str()) {
            ready = Some(hit.since_boot);
        }
        hits.push((m.clone(), hit));
    }
    for m in &profile.present {
        loop {
            if runner.console_contains(m) {
                break;
            }
            if let Some(outcome) = runner.outcome() {
                return Err(check_forbidden().err().unwrap_or_else(|| {
                    missing(
                        m,
                        Error::Stopped {
                            marker: m.clone(),
                            outcome,
                        },
                    )
                }));
            }
            if left().is_zero() {
                return Err(missing(
                    m,
                    Error::Timeout {
                        marker: m.clone(),
                        timeout,
                    },
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for step in &profile.script {
        if let Some(text) = &step.send {
            runner.send(text.as_bytes()).map_err(CheckError::Runner)?;
        }
        if let Some(m) = &step.expect {
            let hit = runner.wait_for(m, left()).map_err(|e| missing(m, e))?;
            hits.push((m.clone(), hit));
        }
    }
    if profile.settle_ms > 0 {
        std::thread::sleep(Duration::from_millis(profile.settle_ms).min(left()));
    }
    check_forbidden()?;
    Ok(Report { hits, ready })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checked_in_contract_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("markers.toml");
        let c = Contract::load(&path).unwrap();
        let r = c.get("recovery").unwrap();
        assert_eq!(
            r.markers,
            [
                "recovery: boot target selected",
                "recovery: init start",
                "recovery: services ready",
                "recovery: ready (serial=@/dev/vport0p1)",
                "recovery: ready (serial=@/dev/ttyS1)",
                "recovery: shell ready",
            ]
        );
        assert!(r.recovery);
        let n = c.get("normal").unwrap();
        assert_eq!(n.markers.first().map(String::as_str), Some("init: start"));
        assert_eq!(n.markers.last().map(String::as_str), Some("init: ready"));
        let ns = c.get("recovery-nostate").unwrap();
        assert!(!ns.state);
        assert!(ns.forbidden.iter().any(|f| f == "flashd: installed"));
        assert!(ns.markers.iter().any(|m| m.contains("stub/placeholder")));
        assert!(c.get("nope").is_err());
        assert_eq!(
            c.flash.markers.last().map(String::as_str),
            Some("flashd: installed")
        );
        let st = c.get("normal-selftest").unwrap();
        assert!(st.cmdline.iter().any(|a| a == "nexus.selftest=1"));
        assert!(st.present.iter().any(|m| m == "init: ready"));
        for name in [
            "update",
            "update-cut",
            "rollback",
            "update-powercut",
            "reset",
            "reset-powercut",
            "reset-normal-guard",
            "recovery-console",
        ] {
            let sc = c.e2e.get(name).unwrap();
            assert!(!sc.markers.is_empty(), "{name}");
        }
    }

    #[test]
    fn ordered_check_of_a_finished_console() {
        let lines: Vec<String> = ["a 1", "b 2", "a 3", "c"].map(String::from).to_vec();
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            check_lines(&lines, &m(&["a", "b", "a"]), &[]).unwrap(),
            [0, 1, 2]
        );
        let e = check_lines(&lines, &m(&["c", "b"]), &[]).unwrap_err();
        assert!(e.to_string().contains("out of order"), "{e}");
        let e = check_lines(&lines, &m(&["zzz"]), &[]).unwrap_err();
        assert!(e.to_string().contains("not in the console log"), "{e}");
        let e = check_lines(&lines, &m(&["a"]), &m(&["b 2"])).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("[error] Forbidden marker seen: b 2"));
    }

    #[test]
    fn validation() {
        assert!(Contract::parse("[profile.x]\ndescription='d'\nmarkers=[]\n").is_err());
        assert!(
            Contract::parse("[profile.x]\ndescription='d'\nmarkers=['a']\nready='b'\n").is_err()
        );
        assert!(Contract::parse("[profile.x]\ndescription='d'\nmarkers=['a']\nbogus=1\n").is_err());
        let c = Contract::parse(
            "[profile.x]\ndescription='d'\nmarkers=['a']\n[[profile.x.script]]\nsend=\"help\\r\"\n",
        )
        .unwrap();
        assert_eq!(c.profile["x"].script[0].send.as_deref(), Some("help\r"));
    }

    #[test]
    fn error_format() {
        let e = CheckError::Missing {
            marker: "m".into(),
            reason: "r".into(),
            tail: vec!["a".into(), "b".into()],
        };
        let s = e.to_string();
        assert!(
            s.starts_with("[error] Missing marker: m (r)\n--- last 2 console lines ---\na\nb\n")
        );
    }
}
