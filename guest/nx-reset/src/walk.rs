//! A read-only walk of a tree on `/state` that never follows a symlink and never leaves the
//! file system it starts on: every directory is opened relative to its parent's descriptor
//! with `O_NOFOLLOW | O_DIRECTORY`, every entry is `statat(AT_SYMLINK_NOFOLLOW)`'d.
//!
//! Order: depth first, the names of each directory sorted bytewise (deterministic for the
//! same tree). Names are raw bytes; [`display`] escapes them for text and JSON.
//! Shared by the reset plan and `nx-diag`'s tree listing.

use nx_contract::reset_plan::Kind;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

/// What an entry is ([`Kind`], the plan's entry kind), from its `st_mode`.
fn kind_of(mode: u32) -> Kind {
    match FileType::from_raw_mode(mode) {
        FileType::RegularFile => Kind::File,
        FileType::Directory => Kind::Dir,
        FileType::Symlink => Kind::Symlink,
        _ => Kind::Other,
    }
}

/// One entry of a walk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Path relative to the directory the walk started in (e.g. `apps/a/b`), raw bytes.
    pub rel: Vec<u8>,
    /// What it is.
    pub kind: Kind,
    /// Apparent size in bytes (files and symlinks; 0 for directories and others).
    pub size: u64,
    /// A symlink's target (raw bytes, not followed).
    pub target: Option<Vec<u8>>,
    /// Depth below the start (the start itself is 0).
    pub depth: usize,
}

/// Why a directory was not descended into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Another file system is mounted there.
    MountPoint,
    /// Deeper than [`WalkOptions::max_depth`].
    TooDeep,
}

/// What a walk reports.
#[derive(Debug)]
pub enum Event<'a> {
    /// An entry (reported before its children).
    Node(&'a Node),
    /// An entry or directory that could not be read.
    Error { rel: Vec<u8>, error: io::Error },
    /// A directory that was not descended into.
    Skipped { rel: Vec<u8>, why: Skip },
}

/// Limits of a walk.
#[derive(Debug, Clone, Copy)]
pub struct WalkOptions {
    /// Directories deeper than this are reported ([`Skip::TooDeep`]) but not read.
    pub max_depth: usize,
}

impl Default for WalkOptions {
    fn default() -> Self {
        WalkOptions { max_depth: 64 }
    }
}

/// Open the directory a walk starts in (the state root: a trusted mount path, so following
/// a symlink *to* it is fine; nothing below it is followed).
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
}

/// Walk the entry `name` of the directory `parent` (and, when it is a directory on the same
/// file system, everything below it). Returns its kind, or `None` when it does not exist.
/// Errors below the entry are reported as [`Event::Error`]; only a failure to stat `name`
/// itself is returned.
pub fn walk(
    parent: BorrowedFd<'_>,
    name: &[u8],
    opts: &WalkOptions,
    visit: &mut dyn FnMut(Event<'_>),
) -> io::Result<Option<Kind>> {
    let root_dev = rustix::fs::fstat(parent).map_err(io::Error::from)?.st_dev;
    let st = match rustix::fs::statat(parent, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut rel = name.to_vec();
    let kind = visit_one(parent, name, &rel, &st, 0, visit);
    if kind == Kind::Dir {
        descend(parent, name, &mut rel, &st, root_dev, 0, opts, visit);
    }
    Ok(Some(kind))
}

fn visit_one(
    parent: BorrowedFd<'_>,
    name: &[u8],
    rel: &[u8],
    st: &rustix::fs::Stat,
    depth: usize,
    visit: &mut dyn FnMut(Event<'_>),
) -> Kind {
    let kind = kind_of(st.st_mode);
    let size = match kind {
        Kind::File | Kind::Symlink => u64::try_from(st.st_size).unwrap_or(0),
        Kind::Dir | Kind::Other => 0,
    };
    let target = if kind == Kind::Symlink {
        rustix::fs::readlinkat(parent, name, Vec::new())
            .ok()
            .map(|c| c.into_bytes())
    } else {
        None
    };
    let node = Node {
        rel: rel.to_vec(),
        kind,
        size,
        target,
        depth,
    };
    visit(Event::Node(&node));
    kind
}

#[allow(clippy::too_many_arguments)]
fn descend(
    parent: BorrowedFd<'_>,
    name: &[u8],
    rel: &mut Vec<u8>,
    st: &rustix::fs::Stat,
    root_dev: u64,
    depth: usize,
    opts: &WalkOptions,
    visit: &mut dyn FnMut(Event<'_>),
) {
    if st.st_dev != root_dev {
        visit(Event::Skipped {
            rel: rel.clone(),
            why: Skip::MountPoint,
        });
        return;
    }
    if depth >= opts.max_depth {
        visit(Event::Skipped {
            rel: rel.clone(),
            why: Skip::TooDeep,
        });
        return;
    }
    let dir = match rustix::fs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(e) => {
            visit(Event::Error {
                rel: rel.clone(),
                error: e.into(),
            });
            return;
        }
    };
    let names = match read_names(dir.as_fd(), usize::MAX) {
        Ok(n) => n,
        Err(error) => {
            visit(Event::Error {
                rel: rel.clone(),
                error,
            });
            return;
        }
    };
    for child in names {
        let len = rel.len();
        rel.push(b'/');
        rel.extend_from_slice(&child);
        match rustix::fs::statat(dir.as_fd(), child.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(cst) => {
                let kind = visit_one(dir.as_fd(), &child, rel, &cst, depth + 1, visit);
                if kind == Kind::Dir {
                    descend(
                        dir.as_fd(),
                        &child,
                        rel,
                        &cst,
                        root_dev,
                        depth + 1,
                        opts,
                        visit,
                    );
                }
            }
            Err(rustix::io::Errno::NOENT) => {} // gone meanwhile
            Err(e) => visit(Event::Error {
                rel: rel.clone(),
                error: e.into(),
            }),
        }
        rel.truncate(len);
    }
}

/// Up to `max` names of the directory `dir` (without `.` and `..`), sorted bytewise.
pub(crate) fn read_names(dir: BorrowedFd<'_>, max: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let stream = rustix::fs::Dir::read_from(dir).map_err(io::Error::from)?;
    for entry in stream {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push(name.to_vec());
        if out.len() >= max {
            break;
        }
    }
    out.sort();
    Ok(out)
}

/// Escape raw name bytes for text and JSON: printable ASCII stays (a backslash doubles),
/// everything else becomes `\xNN`. Injective, so different names never look the same.
pub fn display(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        match b {
            b'\\' => s.push_str("\\\\"),
            0x20..=0x7e => s.push(char::from(b)),
            _ => s.push_str(&format!("\\x{b:02x}")),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn display_escapes() {
        assert_eq!(display(b"a b.txt"), "a b.txt");
        assert_eq!(display(b"x\ny"), "x\\x0ay");
        assert_eq!(display(b"\\"), "\\\\");
        assert_eq!(display(b"\xff\x1b[31m"), "\\xff\\x1b[31m");
    }

    #[test]
    fn walk_is_sorted_and_never_follows() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        let t = d.path().join("t");
        std::fs::create_dir_all(t.join("b/c")).unwrap();
        std::fs::write(t.join("b/c/f"), b"12345").unwrap();
        std::fs::write(t.join("a"), b"1").unwrap();
        std::os::unix::fs::symlink(outside.path(), t.join("link")).unwrap();
        std::fs::write(t.join(std::ffi::OsStr::from_bytes(b"odd\nname")), b"").unwrap();
        let root = open_root(d.path()).unwrap();
        let mut seen = Vec::new();
        let kind = walk(root.as_fd(), b"t", &WalkOptions::default(), &mut |e| {
            if let Event::Node(n) = e {
                seen.push(format!(
                    "{} {} {}",
                    display(&n.rel),
                    n.kind.as_str(),
                    n.size
                ));
            }
        })
        .unwrap();
        assert_eq!(kind, Some(Kind::Dir));
        let link_len = outside.path().as_os_str().len();
        assert_eq!(
            seen,
            [
                "t dir 0".to_string(),
                "t/a file 1".into(),
                "t/b dir 0".into(),
                "t/b/c dir 0".into(),
                "t/b/c/f file 5".into(),
                format!("t/link symlink {link_len}"),
                "t/odd\\x0aname file 0".into(),
            ]
        );
        assert_eq!(
            walk(
                root.as_fd(),
                b"missing",
                &WalkOptions::default(),
                &mut |_| {}
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn depth_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("t/1/2/3")).unwrap();
        let root = open_root(d.path()).unwrap();
        let mut skipped = Vec::new();
        let mut nodes = 0;
        walk(
            root.as_fd(),
            b"t",
            &WalkOptions { max_depth: 2 },
            &mut |e| match e {
                Event::Node(_) => nodes += 1,
                Event::Skipped { rel, why } => skipped.push((display(&rel), why)),
                Event::Error { .. } => panic!("error"),
            },
        )
        .unwrap();
        assert_eq!(nodes, 3);
        assert_eq!(skipped, [("t/1/2".to_string(), Skip::TooDeep)]);
    }
}
