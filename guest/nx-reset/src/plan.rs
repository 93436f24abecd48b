//! The factory-reset plan: exactly what a wipe removes and what it preserves.
//!
//! JSON (format 1, fixed key order, pretty, trailing newline — the same tree gives the same
//! bytes):
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
//! paths below the root. Counts and byte totals are always exact; the entry lists are
//! bounded by [`Limits`] (`truncated: true` says entries were left out).

use crate::walk::{self, display, Event, Kind, Skip, WalkOptions};
use crate::{ResetError, LISTED_PRESERVED, PRESERVED, SHOWN_ROOT, WIPED};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Format of the plan JSON.
pub const PLAN_FORMAT: u32 = 1;

/// Bounds of the listed entries (the counts stay exact).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most entries listed over all trees.
    pub max_entries: usize,
    /// Most bytes of listed path and symlink-target text over all trees.
    pub max_path_bytes: usize,
    /// Directories deeper than this are not read (the plan fails: it could not be exact).
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_entries: 1000,
            max_path_bytes: 64 * 1024,
            max_depth: 64,
        }
    }
}

/// One path of a tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanEntry {
    /// As shown in the guest (`/state/apps/x`), escaped ([`walk::display`]).
    pub path: String,
    /// `file` / `dir` / `symlink` / `other`.
    pub kind: Kind,
    /// Apparent size in bytes (0 for directories).
    pub size: u64,
    /// A symlink's target, escaped (it is removed as a link, its target is never touched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// One top-level tree of `/state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub wiped_paths: u64,
    pub wiped_bytes: u64,
    pub preserved_paths: u64,
    pub preserved_bytes: u64,
}

/// The plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// [`plan_with`] with the default [`Limits`].
pub fn plan(state_root: &Path) -> Result<Plan, ResetError> {
    plan_with(state_root, &Limits::default())
}

/// The plan for the state dir `state_root`. Read only. Fails when a wiped or listed tree
/// cannot be read completely (the plan would not be exact).
pub fn plan_with(state_root: &Path, limits: &Limits) -> Result<Plan, ResetError> {
    let root = walk::open_root(state_root).map_err(|e| ResetError::StateDir {
        path: state_root.to_path_buf(),
        reason: format!("cannot open it ({e}); is /state mounted?"),
    })?;
    let mut budget = Budget {
        entries: limits.max_entries,
        path_bytes: limits.max_path_bytes,
    };
    let opts = WalkOptions {
        max_depth: limits.max_depth,
    };
    let mut wiped = Vec::new();
    for name in WIPED {
        wiped.push(tree(
            state_root,
            &root,
            name.as_bytes(),
            true,
            true,
            &opts,
            &mut budget,
        )?);
    }
    let mut preserved = Vec::new();
    for name in PRESERVED {
        let listed = name == LISTED_PRESERVED;
        preserved.push(tree(
            state_root,
            &root,
            name.as_bytes(),
            listed,
            listed,
            &opts,
            &mut budget,
        )?);
    }
    let mut others: Vec<Vec<u8>> = walk::read_names(root.as_fd(), usize::MAX)
        .map_err(ResetError::io("list", state_root))?
        .into_iter()
        .filter(|n| {
            !WIPED
                .iter()
                .chain(PRESERVED.iter())
                .any(|k| k.as_bytes() == n.as_slice())
        })
        .collect();
    others.sort();
    for name in others {
        // Not ours to judge: summarised, errors below it only noted in the counts.
        preserved.push(tree(
            state_root,
            &root,
            &name,
            false,
            false,
            &opts,
            &mut budget,
        )?);
    }
    let mut totals = Totals::default();
    for t in &wiped {
        totals.wiped_paths += t.paths();
        totals.wiped_bytes += t.bytes;
    }
    for t in &preserved {
        totals.preserved_paths += t.paths();
        totals.preserved_bytes += t.bytes;
    }
    Ok(Plan {
        format: PLAN_FORMAT,
        state: SHOWN_ROOT.to_string(),
        wiped,
        preserved,
        totals,
    })
}

struct Budget {
    entries: usize,
    path_bytes: usize,
}

fn shown(rel: &[u8]) -> String {
    format!("{SHOWN_ROOT}/{}", display(rel))
}

fn tree(
    state_root: &Path,
    root: &std::os::fd::OwnedFd,
    name: &[u8],
    listed: bool,
    strict: bool,
    opts: &WalkOptions,
    budget: &mut Budget,
) -> Result<TreePlan, ResetError> {
    let mut t = TreePlan {
        path: shown(name),
        kind: "missing".into(),
        files: 0,
        dirs: 0,
        symlinks: 0,
        other: 0,
        bytes: 0,
        listed,
        truncated: false,
        entries: Vec::new(),
    };
    let mut problem: Option<ResetError> = None;
    let abs = |rel: &[u8]| state_root.join(std::ffi::OsStr::from_bytes(rel));
    let kind = walk::walk(root.as_fd(), name, opts, &mut |e| match e {
        Event::Node(n) if n.depth == 0 => {
            if n.kind != Kind::Dir {
                t.bytes += n.size;
            }
        }
        Event::Node(n) => {
            match n.kind {
                Kind::File => t.files += 1,
                Kind::Dir => t.dirs += 1,
                Kind::Symlink => t.symlinks += 1,
                Kind::Other => t.other += 1,
            }
            t.bytes += n.size;
            if listed {
                let path = shown(&n.rel);
                let target = n.target.as_deref().map(display);
                let cost = path.len() + target.as_ref().map_or(0, String::len);
                if budget.entries > 0 && budget.path_bytes >= cost {
                    budget.entries -= 1;
                    budget.path_bytes -= cost;
                    t.entries.push(PlanEntry {
                        path,
                        kind: n.kind,
                        size: n.size,
                        target,
                    });
                } else {
                    t.truncated = true;
                }
            }
        }
        Event::Error { rel, error } => {
            if strict && problem.is_none() {
                problem = Some(ResetError::Io(nx_contract::PathIoError {
                    what: "read",
                    path: abs(&rel),
                    source: error,
                }));
            }
        }
        Event::Skipped { rel, why } => {
            if strict && problem.is_none() {
                problem = Some(match why {
                    Skip::MountPoint => ResetError::MountPoint { path: abs(&rel) },
                    Skip::TooDeep => ResetError::StateDir {
                        path: abs(&rel),
                        reason: format!(
                            "nested deeper than {} levels; the plan cannot list it",
                            opts.max_depth
                        ),
                    },
                });
            }
        }
    })
    .map_err(ResetError::io("stat", abs(name)))?;
    if let Some(p) = problem {
        return Err(p);
    }
    t.kind = kind.map_or("missing", Kind::as_str).to_string();
    Ok(t)
}

impl Plan {
    /// The JSON view (pretty, fixed key order, trailing newline).
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
