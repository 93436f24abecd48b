//! Deterministic newc cpio initramfs images (written with the `cpio` crate): entries sorted
//! by path, parents before children, inode numbers by position, mtime 0, uid/gid 0.
//! Uncompressed: the kernel accepts it and it boots faster than gzip under TCG.

use anyhow::Context;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Char { major: u32, minor: u32, mode: u32 },
}

/// An initramfs being assembled in memory.
#[derive(Debug, Default)]
pub struct Initramfs {
    entries: BTreeMap<String, Node>,
}

fn clean(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl Initramfs {
    /// An empty image.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let p = clean(path);
        let mut acc = String::new();
        for part in p.split('/').filter(|s| !s.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries.entry(acc.clone()).or_insert(Node::Dir);
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((dir, _)) = path.rsplit_once('/') {
            self.dir(dir);
        }
    }

    /// Add a regular file from bytes.
    pub fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        let p = clean(path);
        self.parent(&p);
        self.entries.insert(p, Node::File { data, mode });
    }

    /// Add a regular file copied from the host.
    pub fn file(&mut self, path: &str, src: &Path, mode: u32) -> anyhow::Result<()> {
        let data = std::fs::read(src).with_context(|| format!("read {}", src.display()))?;
        self.bytes(path, data, mode);
        Ok(())
    }

    /// Add a character device node.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32, mode: u32) {
        let p = clean(path);
        self.parent(&p);
        self.entries.insert(p, Node::Char { major, minor, mode });
    }

    /// The newc archive bytes.
    pub fn to_bytes(&self) -> anyhow::Result<Vec<u8>> {
        use cpio::newc::{trailer, Builder};
        use std::io::Write;
        let mut out = Vec::new();
        for (i, (name, node)) in self.entries.iter().enumerate() {
            let ino = u32::try_from(i + 1).context("too many initramfs entries")?;
            let b = Builder::new(name).ino(ino).uid(0).gid(0).mtime(0);
            match node {
                Node::Dir => {
                    b.mode(0o040_755).nlink(2).write(&mut out, 0).finish()?;
                }
                Node::File { data, mode } => {
                    let size = u32::try_from(data.len())
                        .with_context(|| format!("{name} is larger than 4 GiB"))?;
                    let mut w = b.mode(0o100_000 | mode).nlink(1).write(&mut out, size);
                    w.write_all(data)?;
                    w.finish()?;
                }
                Node::Char { major, minor, mode } => {
                    b.mode(0o020_000 | mode)
                        .nlink(1)
                        .rdev_major(*major)
                        .rdev_minor(*minor)
                        .write(&mut out, 0)
                        .finish()?;
                }
            }
        }
        trailer(&mut out)?;
        Ok(out)
    }

    /// The standard skeleton of both ramdisks: mount points and the console/null nodes the
    /// kernel needs before devtmpfs is mounted.
    pub fn skeleton() -> Self {
        let mut i = Self::new();
        for d in [
            "dev",
            "proc",
            "sys",
            "run",
            "tmp",
            "state",
            "bin",
            "lib/modules",
            "etc/nexus",
        ] {
            i.dir(d);
        }
        i.char_dev("dev/console", 5, 1, 0o600);
        i.char_dev("dev/null", 1, 3, 0o666);
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_readable() {
        let build = || {
            let mut i = Initramfs::skeleton();
            i.bytes("/init", b"#!init".to_vec(), 0o755);
            i.bytes("bin/flashd", vec![1, 2, 3], 0o755);
            i.bytes("lib/modules/load.list", b"virtio_ring.ko\n".to_vec(), 0o644);
            i.to_bytes().unwrap()
        };
        let a = build();
        assert_eq!(a, build());
        // read it back with the same crate: parents first, all mtime 0 / uid 0
        let mut names = Vec::new();
        let mut rest: &[u8] = &a;
        loop {
            let r = cpio::NewcReader::new(rest).unwrap();
            if r.entry().is_trailer() {
                break;
            }
            assert_eq!(r.entry().mtime(), 0);
            assert_eq!(r.entry().uid(), 0);
            names.push((r.entry().name().to_string(), r.entry().mode()));
            rest = r.finish().unwrap();
        }
        let pos = |n: &str| names.iter().position(|(x, _)| x == n).unwrap();
        assert!(pos("bin") < pos("bin/flashd"));
        assert!(
            pos("lib") < pos("lib/modules") && pos("lib/modules") < pos("lib/modules/load.list")
        );
        assert_eq!(names[pos("dev/console")].1, 0o020_600);
        assert_eq!(names[pos("init")].1, 0o100_755);
        assert_eq!(a.len() % 4, 0);
    }
}
