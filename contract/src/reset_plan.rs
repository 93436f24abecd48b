//! The factory-reset plan: exactly what a wipe of `/state` removes and what it preserves.
//!
//! One type on both sides of the link: the guest computes it (`nx-reset`'s `plan()`, served
//! by rebootd's `resetPlan()` and shown on the recovery console), `nx reset factory` parses
//! and shows it. This module is the type, its rules ([`Plan::is_sane`]) and its rendering;
//! reading a `/state` tree stays in the guest crate `nx-reset`.
//!
//! JSON (format 1, fixed key order, pretty, trailing newline — the same tree gives the same
//! bytes), with the `serde` feature ([`Plan::to_json`], [`Plan::from_json`]):
//!
//! ```json
//! {
//!   "format": 1,
//!   "state": "/state",
//!   "wiped": [
//!     { "path": "/state/apps", "kind": "dir", "files": 2, "dirs": 1, "symlinks": 0,
//!       "other": 0, "bytes": 15, "listed": true, "truncated": false,
//!       "entries": [ { "path": "/state/apps/x", "kind": "file", "size": 10 }, … ] },
//!     … content, settings …
//!   ],
//!   "preserved": [ … trust (listed path by path), boot, bootctl, flash, recovery,
//!                  then any other top-level entry (summaries) … ],
//!   "totals": { "wiped_paths": 3, "wiped_bytes": 15, "preserved_paths": 9, "preserved_bytes": 120 }
//! }
//! ```
//!
//! A tree's `path`, `kind` and counts describe the tree itself; its `entries` are the paths
//! below it (the wipe removes exactly those and keeps the directory). A wiped tree whose
//! root is not a directory (a symlink or a file in its place) is removed itself and
//! recreated as an empty directory (`kind` says what it is). `files`/`dirs`/… count the
//! paths below the root. Counts and byte totals are always exact; the entry lists may be
//! bounded (`truncated: true` says entries were left out).

use std::fmt::Write as _;

/// Format of the plan JSON.
pub const PLAN_FORMAT: u32 = 1;

/// The trees whose contents a factory reset removes (the directories themselves stay).
pub const WIPED: [&str; 3] = ["apps", "content", "settings"];
/// The known trees a factory reset preserves, in layout order (`trust` is listed path by
/// path in the plan). Any other top-level entry of `/state` is preserved as well.
pub const PRESERVED: [&str; 5] = ["trust", "boot", "bootctl", "flash", "recovery"];
/// The preserved tree whose every path the plan lists.
pub const LISTED_PRESERVED: &str = "trust";
/// How paths are shown in plans: as the guest sees them.
pub const SHOWN_ROOT: &str = crate::state::STATE_MOUNT;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "lowercase"))]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (never followed).
    Symlink,
    /// Anything else (fifo, socket, device node).
    Other,
}

impl Kind {
    /// `file` / `dir` / `symlink` / `other`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Dir => "dir",
            Kind::Symlink => "symlink",
            Kind::Other => "other",
        }
    }
}

/// One path of a tree.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct PlanEntry {
    /// As shown in the guest (`/state/apps/x`), escaped (`nx-reset` escapes every name).
    pub path: String,
    /// `file` / `dir` / `symlink` / `other`.
    pub kind: Kind,
    /// Apparent size in bytes (0 for directories).
    pub size: u64,
    /// A symlink's target, escaped (it is removed as a link, its target is never touched).
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub target: Option<String>,
}

/// One top-level tree of `/state`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct TreePlan {
    /// `/state/<name>`.
    pub path: String,
    /// What the tree root is: `dir`, `symlink`, `file`, `other`, or `missing`.
    pub kind: String,
    /// Regular files below the root.
    pub files: u64,
    /// Directories below the root.
    pub dirs: u64,
    /// Symlinks below the root.
    pub symlinks: u64,
    /// Other entries below the root.
    pub other: u64,
    /// Bytes below the root (plus the root itself when it is not a directory).
    pub bytes: u64,
    /// Whether the plan lists the paths below the root (`wiped` trees and `trust`).
    pub listed: bool,
    /// Listed trees only: some entries were left out (bounds); counts stay exact.
    pub truncated: bool,
    /// The paths below the root, depth first, names sorted bytewise.
    pub entries: Vec<PlanEntry>,
}

impl TreePlan {
    /// Paths this tree accounts for (below the root, plus a non-directory root itself).
    pub fn paths(&self) -> u64 {
        let below = self.files + self.dirs + self.symlinks + self.other;
        if self.kind == "dir" || self.kind == "missing" {
            below
        } else {
            below + 1
        }
    }
}

/// Totals over the wiped and the preserved trees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Totals {
    pub wiped_paths: u64,
    pub wiped_bytes: u64,
    pub preserved_paths: u64,
    pub preserved_bytes: u64,
}

/// The plan.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct Plan {
    /// [`PLAN_FORMAT`].
    pub format: u32,
    /// How the state root is shown ([`SHOWN_ROOT`]).
    pub state: String,
    /// `apps`, `content`, `settings`, in that order.
    pub wiped: Vec<TreePlan>,
    /// `trust`, `boot`, `bootctl`, `flash`, `recovery`, then other top-level entries (sorted).
    pub preserved: Vec<TreePlan>,
    pub totals: Totals,
}

impl Plan {
    /// The JSON view (pretty, fixed key order, trailing newline).
    #[cfg(feature = "serde")]
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            // Serialising plain structs of strings and integers cannot fail; keep a
            // parseable answer anyway.
            format!("{{\"error\": {:?}}}", e.to_string())
        });
        s.push('\n');
        s
    }

    /// Parse a plan JSON (bounded by the caller).
    #[cfg(feature = "serde")]
    pub fn from_json(text: &str) -> Result<Plan, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The human view (the recovery console; `nx reset factory --dry-run` prints the same).
    pub fn render_text(&self) -> String {
        render_text(self)
    }

    /// Whether the wiped trees are exactly `apps`, `content`, `settings` (in that order) and
    /// `trust` is among the preserved ones — the invariant every plan must meet.
    pub fn is_sane(&self) -> bool {
        let wiped: Vec<String> = WIPED.iter().map(|n| format!("{SHOWN_ROOT}/{n}")).collect();
        let trust = format!("{SHOWN_ROOT}/{LISTED_PRESERVED}");
        self.format == PLAN_FORMAT
            && self.wiped.iter().map(|t| &t.path).eq(wiped.iter())
            && self.preserved.iter().any(|t| t.path == trust)
            && !self.preserved.iter().any(|t| wiped.contains(&t.path))
            && self.wiped.iter().all(|t| {
                t.entries
                    .iter()
                    .all(|e| e.path.starts_with(&format!("{}/", t.path)))
            })
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn summary(t: &TreePlan) -> String {
    if t.kind == "missing" {
        return "missing (nothing there)".into();
    }
    let mut s = format!(
        "{}, {}",
        plural(t.files, "file", "files"),
        plural(t.dirs, "dir", "dirs")
    );
    if t.symlinks > 0 {
        let _ = write!(s, ", {}", plural(t.symlinks, "symlink", "symlinks"));
    }
    if t.other > 0 {
        let _ = write!(s, ", {} other", t.other);
    }
    let _ = write!(s, ", {}", plural(t.bytes, "byte", "bytes"));
    if t.kind != "dir" {
        let _ = write!(
            s,
            " (the root is a {}, not a directory)",
            printable(&t.kind, 16)
        );
    }
    s
}

/// Text safe to show on a terminal: control characters become `?`, at most `max` characters.
/// The plan may come from another machine (`nx reset` reads it from the guest), so every
/// string of it is shown through this.
pub fn printable(s: &str, max: usize) -> String {
    s.chars()
        .take(max)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn entry_line(e: &PlanEntry) -> String {
    let path = printable(&e.path, 4096);
    match (&e.kind, &e.target) {
        (Kind::Dir, _) => format!("    {:>12}  {path}/", "-"),
        (Kind::Symlink, Some(t)) => format!(
            "    {:>12}  {path} -> {} (the link only)",
            e.size,
            printable(t, 4096)
        ),
        (Kind::Other, _) => format!("    {:>12}  {path} (special file)", e.size),
        _ => format!("    {:>12}  {path}", e.size),
    }
}

fn tree_lines(out: &mut String, t: &TreePlan, with_entries: bool) {
    let _ = writeln!(out, "  {}/  {}", printable(&t.path, 256), summary(t));
    if !with_entries {
        return;
    }
    for e in &t.entries {
        let _ = writeln!(out, "{}", entry_line(e));
    }
    if t.truncated {
        let _ = writeln!(
            out,
            "    … {} more paths not listed (the counts above are exact)",
            t.paths().saturating_sub(t.entries.len() as u64)
        );
    }
}

/// See [`Plan::render_text`] (`with_entries`: list every path, or only the per-tree summary).
pub fn render(p: &Plan, with_entries: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "factory reset plan for {}", printable(&p.state, 64));
    let _ = writeln!(
        out,
        "WIPED — everything below these directories is removed (the directories stay):"
    );
    for t in &p.wiped {
        tree_lines(&mut out, t, with_entries);
    }
    let _ = writeln!(out, "PRESERVED — never touched:");
    for t in &p.preserved {
        tree_lines(&mut out, t, with_entries);
    }
    let _ = writeln!(
        out,
        "total: wipe {} ({}); preserve {} ({})",
        plural(p.totals.wiped_paths, "path", "paths"),
        plural(p.totals.wiped_bytes, "byte", "bytes"),
        plural(p.totals.preserved_paths, "path", "paths"),
        plural(p.totals.preserved_bytes, "byte", "bytes"),
    );
    out
}

/// See [`Plan::render_text`].
pub fn render_text(p: &Plan) -> String {
    render(p, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(name: &str, files: u64, bytes: u64, entries: Vec<PlanEntry>) -> TreePlan {
        TreePlan {
            path: format!("{SHOWN_ROOT}/{name}"),
            kind: "dir".into(),
            files,
            dirs: 0,
            symlinks: 0,
            other: 0,
            bytes,
            listed: true,
            truncated: false,
            entries,
        }
    }

    fn small() -> Plan {
        let x = PlanEntry {
            path: "/state/apps/x".into(),
            kind: Kind::File,
            size: 10,
            target: None,
        };
        Plan {
            format: PLAN_FORMAT,
            state: SHOWN_ROOT.into(),
            wiped: vec![
                tree("apps", 1, 10, vec![x]),
                tree("content", 0, 0, vec![]),
                tree("settings", 0, 0, vec![]),
            ],
            preserved: vec![tree("trust", 0, 0, vec![])],
            totals: Totals {
                wiped_paths: 1,
                wiped_bytes: 10,
                ..Totals::default()
            },
        }
    }

    #[test]
    fn a_plan_wiping_exactly_the_three_trees_is_sane() {
        let p = small();
        assert!(p.is_sane());
        let mut bad = p.clone();
        bad.wiped.swap(0, 1);
        assert!(!bad.is_sane());
        let mut bad = p.clone();
        bad.preserved.clear();
        assert!(!bad.is_sane());
        let mut bad = p;
        bad.wiped[0].entries[0].path = "/state/trust/key".into();
        assert!(!bad.is_sane());
    }

    #[test]
    fn the_text_lists_wiped_and_preserved() {
        let text = small().render_text();
        assert!(
            text.starts_with("factory reset plan for /state\n"),
            "{text}"
        );
        assert!(
            text.contains("  /state/apps/  1 file, 0 dirs, 10 bytes\n"),
            "{text}"
        );
        assert!(text.contains("              10  /state/apps/x\n"), "{text}");
        assert!(text.contains("PRESERVED — never touched:\n"), "{text}");
        assert!(
            text.ends_with("total: wipe 1 path (10 bytes); preserve 0 paths (0 bytes)\n"),
            "{text}"
        );
        assert!(!render(&small(), false).contains("/state/apps/x"));
    }

    #[test]
    fn printable_escapes_control_characters() {
        assert_eq!(printable("a\x1b[31mb\n", 64), "a?[31mb?");
        assert_eq!(printable("abcdef", 3), "abc");
    }

    #[cfg(feature = "serde")]
    #[test]
    fn json_round_trips_with_lowercase_kinds() {
        let p = small();
        let json = p.to_json();
        assert!(json.ends_with('\n'));
        assert!(json.contains("\"kind\": \"file\""), "{json}");
        assert!(!json.contains("\"target\""), "{json}");
        assert_eq!(Plan::from_json(&json).unwrap(), p);
    }
}
