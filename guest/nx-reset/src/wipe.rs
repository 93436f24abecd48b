//! The resumable, power-cut safe factory wipe (see the crate docs for the protocol).
//!
//! Removal works on directory descriptors only: a directory is entered with
//! `openat(parent, name, O_DIRECTORY | O_NOFOLLOW)` (a symlink is never entered, whatever
//! races happen), every entry is removed with `unlinkat` relative to its directory, and the
//! way back up is `openat(dir, "..")`, checked against the device/inode we came from. At
//! most two descriptors are open at any time, so any depth works.

use crate::walk::read_names;
use crate::{fsx, ResetError, JOURNAL, REQUEST, REQUEST_CONTENT};
use nx_contract::markers::reset as m;
use nx_contract::reset_plan::WIPED;
use nx_contract::Marker;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Largest journal we read back.
const MAX_JOURNAL: usize = 1024;
/// Names read from a directory per pass.
const BATCH: usize = 512;

/// The wipe journal (`STATE/boot/factory_wipe.journal`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Journal {
    format: u32,
    /// 1 for the first attempt; a resumed wipe (after a power cut) counts up.
    attempt: u32,
    trees: Vec<String>,
}

/// Whether a wipe is pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pending {
    /// No request.
    None,
    /// A valid request; `attempts` wipe attempts already started (0: not yet begun).
    Requested { attempts: u32 },
    /// `STATE/boot/factory_wipe` exists but is not `wipe\n` (escaped content): [`wipe()`]
    /// removes it and wipes nothing.
    Invalid { content: String },
}

/// Options of [`wipe_with`].
#[derive(Debug, Clone, Copy, Default)]
pub struct WipeOptions {
    /// Power-cut tests: stop (as if the power went) before removal number `n + 1`, i.e.
    /// after `n` removals, returning [`ResetError::Interrupted`]. `None` in production.
    pub stop_after: Option<u64>,
}

/// What a completed wipe did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WipeReport {
    /// Which attempt completed it (1: no power cut in between).
    pub attempt: u32,
    /// Paths removed by this attempt.
    pub removed: u64,
    /// Bytes of the files and symlinks removed by this attempt.
    pub bytes: u64,
}

/// What [`wipe()`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WipeOutcome {
    /// No request: nothing was touched.
    NotRequested,
    /// The request file was invalid: it was removed, nothing else was touched.
    InvalidRequestRemoved { content: String },
    /// The wipe ran to completion and the request is cleared.
    Wiped(WipeReport),
}

fn boot_dir(state_root: &Path) -> PathBuf {
    state_root.join("boot")
}

fn file_name(rel: &str) -> &str {
    rel.rsplit('/').next().unwrap_or(rel)
}

fn read_journal(state_root: &Path) -> Option<Journal> {
    let bytes = fsx::read_bounded(&state_root.join(JOURNAL), MAX_JOURNAL).ok()??;
    serde_json::from_slice(&bytes).ok()
}

/// Whether a wipe is requested under `state_root` (read only, bounded).
pub fn pending(state_root: &Path) -> Result<Pending, ResetError> {
    let path = state_root.join(REQUEST);
    let Some(bytes) = fsx::read_bounded(&path, 64).or_else(|e| {
        if e.kind() == std::io::ErrorKind::InvalidData {
            Ok(Some(b"<more than 64 bytes>".to_vec()))
        } else {
            Err(ResetError::Io(nx_contract::PathIoError {
                what: "read",
                path: path.clone(),
                source: e,
            }))
        }
    })?
    else {
        return Ok(Pending::None);
    };
    if bytes != REQUEST_CONTENT {
        return Ok(Pending::Invalid {
            content: crate::walk::display(&bytes),
        });
    }
    Ok(Pending::Requested {
        attempts: read_journal(state_root).map_or(0, |j| j.attempt),
    })
}

/// [`wipe_with`] without a simulated power cut: what recovery-init calls at every boot,
/// after mounting `/state` and before starting any service.
pub fn wipe(
    state_root: &Path,
    markers: &mut dyn FnMut(&Marker),
) -> Result<WipeOutcome, ResetError> {
    wipe_with(state_root, &WipeOptions::default(), markers)
}

/// Perform the requested wipe (nothing happens without a valid request). On an error other
/// than a simulated power cut it prints `nx: reset factory wipe failed: …` — the request
/// stays, so the wipe runs again at the next boot; the caller must not boot normal.
pub fn wipe_with(
    state_root: &Path,
    opts: &WipeOptions,
    markers: &mut dyn FnMut(&Marker),
) -> Result<WipeOutcome, ResetError> {
    let boot = boot_dir(state_root);
    match pending(state_root)? {
        Pending::None => {
            if state_root.join(JOURNAL).exists() {
                // A wipe finished but the power went before its journal was removed.
                fsx::remove_durable(&boot, file_name(JOURNAL))
                    .map_err(ResetError::io("remove", state_root.join(JOURNAL)))?;
            }
            Ok(WipeOutcome::NotRequested)
        }
        Pending::Invalid { content } => {
            markers(&m::invalid_request_removed(
                state_root.join(REQUEST).display(),
                &content,
            ));
            fsx::remove_durable(&boot, file_name(REQUEST))
                .map_err(ResetError::io("remove", state_root.join(REQUEST)))?;
            Ok(WipeOutcome::InvalidRequestRemoved { content })
        }
        Pending::Requested { attempts } => {
            markers(&m::wipe_start());
            let attempt = attempts.saturating_add(1);
            if attempts > 0 {
                markers(&m::wipe_resumed(attempt));
            }
            match run(state_root, attempt, opts) {
                Ok(report) => {
                    markers(&m::wipe_removed(report.removed, report.bytes, &WIPED));
                    markers(&m::wipe_done());
                    Ok(WipeOutcome::Wiped(report))
                }
                Err(e @ ResetError::Interrupted { .. }) => Err(e),
                Err(e) => {
                    markers(&m::wipe_failed(&e));
                    Err(e)
                }
            }
        }
    }
}

struct Ctx {
    removed: u64,
    bytes: u64,
    stop_after: Option<u64>,
}

impl Ctx {
    /// Called before every removal: the simulated power cut.
    fn may_remove(&self) -> Result<(), ResetError> {
        match self.stop_after {
            Some(n) if self.removed >= n => Err(ResetError::Interrupted {
                removed: self.removed,
            }),
            _ => Ok(()),
        }
    }
}

fn run(state_root: &Path, attempt: u32, opts: &WipeOptions) -> Result<WipeReport, ResetError> {
    let boot = boot_dir(state_root);
    // 1. The in-progress record: the request stays; the journal counts attempts.
    let journal = Journal {
        format: 1,
        attempt,
        trees: WIPED.iter().map(|s| s.to_string()).collect(),
    };
    let text = serde_json::to_vec(&journal).map_err(|e| ResetError::StateDir {
        path: state_root.join(JOURNAL),
        reason: e.to_string(),
    })?;
    fsx::write_atomic(&boot, file_name(JOURNAL), &text)
        .map_err(ResetError::io("write", state_root.join(JOURNAL)))?;

    // 2. Remove the contents of the three trees.
    let state = crate::walk::open_root(state_root).map_err(ResetError::io("open", state_root))?;
    let mut ctx = Ctx {
        removed: 0,
        bytes: 0,
        stop_after: opts.stop_after,
    };
    ctx.may_remove()?;
    for tree in WIPED {
        wipe_tree(state.as_fd(), state_root, tree, &mut ctx)?;
    }

    // 3. Sync: the trees, then the whole file system.
    for tree in WIPED {
        fsx::sync_dir(&state_root.join(tree))
            .map_err(ResetError::io("fsync", state_root.join(tree)))?;
    }
    fsx::sync_dir(state_root).map_err(ResetError::io("fsync", state_root))?;
    rustix::fs::syncfs(&state).map_err(|e| {
        ResetError::Io(nx_contract::PathIoError {
            what: "syncfs",
            path: state_root.to_path_buf(),
            source: e.into(),
        })
    })?;

    // 4. Only now: clear the request (durably), then the journal.
    fsx::remove_durable(&boot, file_name(REQUEST))
        .map_err(ResetError::io("remove", state_root.join(REQUEST)))?;
    fsx::remove_durable(&boot, file_name(JOURNAL))
        .map_err(ResetError::io("remove", state_root.join(JOURNAL)))?;
    Ok(WipeReport {
        attempt,
        removed: ctx.removed,
        bytes: ctx.bytes,
    })
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

fn shown(state_root: &Path, tree: &str, stack: &[Vec<u8>], name: Option<&[u8]>) -> PathBuf {
    let mut p = state_root.join(tree);
    for n in stack.iter().map(Vec::as_slice).chain(name) {
        p.push(OsStr::from_bytes(n));
    }
    p
}

fn sys(what: &'static str, path: PathBuf) -> impl FnOnce(Errno) -> ResetError {
    move |e| {
        ResetError::Io(nx_contract::PathIoError {
            what,
            path,
            source: e.into(),
        })
    }
}

/// Remove everything below `state/tree`, keep (or recreate) `tree` as a directory.
fn wipe_tree(
    state: BorrowedFd<'_>,
    state_root: &Path,
    tree: &str,
    ctx: &mut Ctx,
) -> Result<(), ResetError> {
    let tree_path = state_root.join(tree);
    let root = match rustix::fs::openat(state, tree, dir_flags(), Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => {
            rustix::fs::mkdirat(state, tree, Mode::from_raw_mode(0o755))
                .map_err(sys("create", tree_path))?;
            return Ok(());
        }
        Err(Errno::NOTDIR | Errno::LOOP) => {
            // A symlink or a file where the tree belongs: remove it (as a link: its target
            // is never touched) and put an empty directory back.
            let st = rustix::fs::statat(state, tree, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(sys("stat", tree_path.clone()))?;
            ctx.may_remove()?;
            rustix::fs::unlinkat(state, tree, AtFlags::empty())
                .map_err(sys("remove", tree_path.clone()))?;
            ctx.removed += 1;
            ctx.bytes += u64::try_from(st.st_size).unwrap_or(0);
            rustix::fs::mkdirat(state, tree, Mode::from_raw_mode(0o755))
                .map_err(sys("create", tree_path))?;
            return Ok(());
        }
        Err(e) => return Err(sys("open", tree_path)(e)),
    };
    let root_st = rustix::fs::fstat(&root).map_err(sys("stat", tree_path.clone()))?;
    // Names of the directories we are in below the root, and their (dev, ino).
    let mut stack: Vec<Vec<u8>> = Vec::new();
    let mut ids: Vec<(u64, u64)> = vec![(root_st.st_dev, root_st.st_ino)];
    let mut cur: OwnedFd = root;
    loop {
        let names = read_names(cur.as_fd(), BATCH).map_err(ResetError::io(
            "list",
            shown(state_root, tree, &stack, None),
        ))?;
        if names.is_empty() {
            // `cur` is empty: go up and remove it, or stop at the tree root.
            let Some(child) = stack.pop() else { break };
            ids.pop();
            let here = shown(state_root, tree, &stack, Some(&child));
            let parent = rustix::fs::openat(
                &cur,
                "..",
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys("open the parent of", here.clone()))?;
            let pst =
                rustix::fs::fstat(&parent).map_err(sys("stat the parent of", here.clone()))?;
            if ids.last() != Some(&(pst.st_dev, pst.st_ino)) {
                return Err(ResetError::TreeChanged { path: here });
            }
            drop(cur);
            ctx.may_remove()?;
            match rustix::fs::unlinkat(&parent, child.as_slice(), AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(e) => return Err(sys("remove", here)(e)),
            }
            ctx.removed += 1;
            cur = parent;
            continue;
        }
        let mut entered: Option<(Vec<u8>, OwnedFd, (u64, u64))> = None;
        for name in names {
            let path = || shown(state_root, tree, &stack, Some(&name));
            let st = match rustix::fs::statat(&cur, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(Errno::NOENT) => continue,
                Err(e) => return Err(sys("stat", path())(e)),
            };
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
                if st.st_dev != root_st.st_dev {
                    return Err(ResetError::MountPoint { path: path() });
                }
                match rustix::fs::openat(&cur, name.as_slice(), dir_flags(), Mode::empty()) {
                    Ok(fd) => {
                        let fst = rustix::fs::fstat(&fd).map_err(sys("stat", path()))?;
                        if fst.st_dev != root_st.st_dev {
                            return Err(ResetError::MountPoint { path: path() });
                        }
                        entered = Some((name, fd, (fst.st_dev, fst.st_ino)));
                        break;
                    }
                    // Replaced by a symlink or a file since the stat: remove it as such.
                    Err(Errno::NOTDIR | Errno::LOOP) => {}
                    Err(Errno::NOENT) => continue,
                    Err(e) => return Err(sys("open", path())(e)),
                }
            }
            ctx.may_remove()?;
            match rustix::fs::unlinkat(&cur, name.as_slice(), AtFlags::empty()) {
                Ok(()) => {
                    ctx.removed += 1;
                    ctx.bytes += u64::try_from(st.st_size).unwrap_or(0);
                }
                Err(Errno::NOENT) => {}
                Err(e) => return Err(sys("remove", path())(e)),
            }
        }
        if let Some((name, fd, id)) = entered {
            stack.push(name);
            ids.push(id);
            cur = fd;
        }
    }
    Ok(())
}
