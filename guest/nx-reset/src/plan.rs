//! Computing the factory-reset plan of a `/state` tree: exactly what a wipe removes and what
//! it preserves. The plan type, its JSON and its rendering are
//! [`nx_contract::reset_plan`] (shared with `nx reset` on the host).

use crate::walk::{self, display, Event, Skip, WalkOptions};
use crate::ResetError;
use nx_contract::reset_plan::{
    Kind, Plan, PlanEntry, Totals, TreePlan, LISTED_PRESERVED, PLAN_FORMAT, PRESERVED, SHOWN_ROOT,
    WIPED,
};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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
