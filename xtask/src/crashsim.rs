//! Power cuts as real disks have them: a block-layer crash simulator.
//!
//! `cache=unsafe` + SIGKILL (what the power-cut scenarios did so far) keeps every write the
//! guest issued; a real disk keeps only what was flushed, plus any subset of what came after.
//! [`Recorder`] is an NBD server (fixed newstyle handshake, simple replies) that QEMU attaches a
//! disk through (`-drive driver=raw,file.driver=nbd,file.server.type=unix,file.server.path=…`).
//! It serves reads from a working copy and records every write, zeroing and flush in order.
//! [`crash_state`] then builds the disk as a power cut at any point of that log could leave it:
//! everything before the last completed flush, plus a chosen subset of the writes after it
//! (FUA writes are durable when acknowledged). Booting each state shows whether the install,
//! activation, reset-wipe and boot-record paths always come up with the old or the new slot.

use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// One recorded operation on disk number `disk` (the order of [`Recorder::start`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Data written at `offset`; `fua`: durable once acknowledged.
    Write {
        disk: usize,
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    /// `len` bytes at `offset` zeroed (WRITE_ZEROES or TRIM).
    Zero { disk: usize, offset: u64, len: u64 },
    /// A completed flush of `disk`: everything written to it before is durable.
    Flush { disk: usize },
}

impl Op {
    /// The disk the operation went to.
    pub fn disk(&self) -> usize {
        match self {
            Op::Write { disk, .. } | Op::Zero { disk, .. } | Op::Flush { disk } => *disk,
        }
    }
}

/// Most bytes of write data one recording keeps in memory.
const MAX_LOGGED: u64 = 4 << 30;
/// Largest single request accepted (QEMU sends at most 32 MiB).
const MAX_REQUEST: u32 = 64 << 20;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;

const INFO_EXPORT: u16 = 0;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;

const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

#[derive(Debug, Default)]
struct Log {
    ops: Vec<Op>,
    logged: u64,
    /// The first protocol error, if any (a recording with one proves nothing).
    error: Option<String>,
}

/// NBD servers over working copies of disks that record every write and flush of all of
/// them in one log, in the order they completed (a power cut hits every disk at once).
pub struct Recorder {
    log: Arc<Mutex<Log>>,
    sockets: Vec<PathBuf>,
}

fn lock(m: &Mutex<Log>) -> MutexGuard<'_, Log> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Recorder {
    /// Serve each `(work, socket)`: `work` is a copy of a disk the caller made (it is written
    /// to), `socket` the unix socket its NBD server listens on, one client connection after
    /// another, from a background thread per disk. Disk numbers in [`Op`] follow this order.
    pub fn start(disks: &[(&Path, &Path)]) -> anyhow::Result<Recorder> {
        let log = Arc::new(Mutex::new(Log::default()));
        let mut sockets = Vec::new();
        for (disk, &(work, socket)) in disks.iter().enumerate() {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(work)
                .with_context(|| format!("open {}", work.display()))?;
            let size = file.metadata()?.len();
            let _ = std::fs::remove_file(socket);
            let listener =
                UnixListener::bind(socket).with_context(|| format!("bind {}", socket.display()))?;
            let l2 = Arc::clone(&log);
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { break };
                    if let Err(e) = serve(conn, &file, size, disk, &l2) {
                        let mut g = lock(&l2);
                        if g.error.is_none() {
                            g.error = Some(format!("disk {disk}: {e:#}"));
                        }
                    }
                }
            });
            sockets.push(socket.to_path_buf());
        }
        Ok(Recorder { log, sockets })
    }

    /// The socket of disk `i`.
    pub fn socket(&self, i: usize) -> Option<&Path> {
        self.sockets.get(i).map(PathBuf::as_path)
    }

    /// The operations recorded so far, in order.
    pub fn ops(&self) -> Vec<Op> {
        lock(&self.log).ops.clone()
    }

    /// How many operations were recorded so far (a mark in the log, without copying it).
    pub fn len(&self) -> usize {
        lock(&self.log).ops.len()
    }

    /// The first protocol or I/O error of a connection, if any.
    pub fn error(&self) -> Option<String> {
        lock(&self.log).error.clone()
    }
}

fn read_u16(s: &mut UnixStream) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut UnixStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut UnixStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]) -> std::io::Result<()> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v)
}

fn transmission_flags() -> u16 {
    TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
}

/// Handshake; returns when the client entered transmission (`true`) or aborted (`false`).
fn handshake(s: &mut UnixStream, size: u64) -> anyhow::Result<bool> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let client_flags = read_u32(s)?;
    loop {
        let magic = read_u64(s)?;
        if magic != IHAVEOPT {
            bail!("option without IHAVEOPT ({magic:#x})");
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > 4096 {
            bail!("option {opt} of {len} bytes");
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let mut v = Vec::new();
                v.extend_from_slice(&size.to_be_bytes());
                v.extend_from_slice(&transmission_flags().to_be_bytes());
                if client_flags & CLIENT_NO_ZEROES == 0 {
                    v.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&v)?;
                return Ok(true);
            }
            OPT_INFO | OPT_GO => {
                let mut info = Vec::new();
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&size.to_be_bytes());
                info.extend_from_slice(&transmission_flags().to_be_bytes());
                option_reply(s, opt, REP_INFO, &info)?;
                option_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            OPT_ABORT => {
                let _ = option_reply(s, opt, REP_ACK, &[]);
                return Ok(false);
            }
            _ => option_reply(s, opt, REP_ERR_UNSUP, &[])?,
        }
    }
}

fn simple_reply(s: &mut UnixStream, error: u32, handle: u64, data: &[u8]) -> std::io::Result<()> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v)
}

fn serve(
    mut s: UnixStream,
    file: &std::fs::File,
    size: u64,
    disk: usize,
    log: &Mutex<Log>,
) -> anyhow::Result<()> {
    if !handshake(&mut s, size)? {
        return Ok(());
    }
    loop {
        let magic = match read_u32(&mut s) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        if magic != REQUEST_MAGIC {
            bail!("request without its magic ({magic:#x})");
        }
        let flags = read_u16(&mut s)?;
        let cmd = read_u16(&mut s)?;
        let handle = read_u64(&mut s)?;
        let offset = read_u64(&mut s)?;
        let len = read_u32(&mut s)?;
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= size);
        match cmd {
            CMD_READ => {
                if !in_range || len > MAX_REQUEST {
                    simple_reply(&mut s, EINVAL, handle, &[])?;
                    continue;
                }
                let mut buf = vec![0u8; len as usize];
                match file.read_exact_at(&mut buf, offset) {
                    Ok(()) => simple_reply(&mut s, 0, handle, &buf)?,
                    Err(_) => simple_reply(&mut s, EIO, handle, &[])?,
                }
            }
            CMD_WRITE => {
                if len > MAX_REQUEST {
                    bail!("write of {len} bytes");
                }
                let mut buf = vec![0u8; len as usize];
                s.read_exact(&mut buf)?;
                if !in_range {
                    simple_reply(&mut s, ENOSPC, handle, &[])?;
                    continue;
                }
                let mut g = lock(log);
                if g.logged + u64::from(len) > MAX_LOGGED {
                    drop(g);
                    simple_reply(&mut s, ENOSPC, handle, &[])?;
                    bail!("more than {MAX_LOGGED} bytes written in one recording");
                }
                if file.write_all_at(&buf, offset).is_err() {
                    drop(g);
                    simple_reply(&mut s, EIO, handle, &[])?;
                    continue;
                }
                g.logged += u64::from(len);
                g.ops.push(Op::Write {
                    disk,
                    offset,
                    data: buf,
                    fua: flags & CMD_FLAG_FUA != 0,
                });
                drop(g);
                simple_reply(&mut s, 0, handle, &[])?;
            }
            CMD_WRITE_ZEROES | CMD_TRIM => {
                if !in_range {
                    simple_reply(&mut s, ENOSPC, handle, &[])?;
                    continue;
                }
                let zeros = vec![0u8; (len as usize).min(1 << 20)];
                let mut at = offset;
                let end = offset + u64::from(len);
                let mut ok = true;
                while at < end {
                    let n = (end - at).min(zeros.len() as u64) as usize;
                    ok &= file.write_all_at(&zeros[..n], at).is_ok();
                    at += n as u64;
                }
                let mut g = lock(log);
                g.ops.push(Op::Zero {
                    disk,
                    offset,
                    len: u64::from(len),
                });
                if flags & CMD_FLAG_FUA != 0 {
                    g.ops.push(Op::Flush { disk });
                }
                drop(g);
                simple_reply(&mut s, if ok { 0 } else { EIO }, handle, &[])?;
            }
            CMD_FLUSH => {
                let ok = file.sync_data().is_ok();
                lock(log).ops.push(Op::Flush { disk });
                simple_reply(&mut s, if ok { 0 } else { EIO }, handle, &[])?;
            }
            CMD_DISC => return Ok(()),
            _ => simple_reply(&mut s, EINVAL, handle, &[])?,
        }
    }
}

/// Which operations survive a power cut after `cut` operations of `ops`: on each disk, every
/// write before that disk's last flush in `ops[..cut]`, FUA writes, and each later write `i`
/// for which `keep(i)`. Returns the indices of the operations to apply, in order.
pub fn surviving(ops: &[Op], cut: usize, mut keep: impl FnMut(usize) -> bool) -> Vec<usize> {
    let cut = cut.min(ops.len());
    let barrier = |disk: usize| {
        ops[..cut]
            .iter()
            .rposition(|o| *o == Op::Flush { disk })
            .unwrap_or(0)
    };
    let disks = ops.iter().map(Op::disk).max().map_or(0, |m| m + 1);
    let barriers: Vec<usize> = (0..disks).map(barrier).collect();
    let mut out = Vec::new();
    for (i, op) in ops.iter().enumerate().take(cut) {
        if matches!(op, Op::Flush { .. }) {
            continue;
        }
        let flushed = barriers.get(op.disk()).is_some_and(|&b| i < b);
        let durable = matches!(op, Op::Write { fua: true, .. });
        if flushed || durable || keep(i) {
            out.push(i);
        }
    }
    out
}

/// Build the disks a power cut could leave: `outs[d]` = `bases[d]` (disk `d` before the
/// recording) with the operations `apply` (from [`surviving`]) on disk `d` applied in order.
pub fn crash_state(
    bases: &[&Path],
    ops: &[Op],
    apply: &[usize],
    outs: &[&Path],
) -> anyhow::Result<()> {
    anyhow::ensure!(bases.len() == outs.len(), "one output per disk");
    let mut files = Vec::new();
    for (base, out) in bases.iter().zip(outs) {
        let st = std::process::Command::new(crate::util::tool("cp")?)
            .args(["--sparse=always", "--reflink=auto"])
            .arg(base)
            .arg(out)
            .status()
            .context("cp")?;
        anyhow::ensure!(
            st.success(),
            "cp {} {} failed",
            base.display(),
            out.display()
        );
        files.push(
            std::fs::OpenOptions::new()
                .write(true)
                .open(out)
                .with_context(|| format!("open {}", out.display()))?,
        );
    }
    let zeros = vec![0u8; 1 << 20];
    for &i in apply {
        let Some(op) = ops.get(i) else { continue };
        let Some(f) = files.get(op.disk()) else {
            bail!("operation {i} on disk {} of {}", op.disk(), files.len());
        };
        match op {
            Op::Write { offset, data, .. } => f.write_all_at(data, *offset)?,
            Op::Zero { offset, len, .. } => {
                let mut at = *offset;
                while at < offset + len {
                    let n = (offset + len - at).min(zeros.len() as u64) as usize;
                    f.write_all_at(&zeros[..n], at)?;
                    at += n as u64;
                }
            }
            Op::Flush { .. } => {}
        }
    }
    for f in &files {
        f.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(disk: usize, offset: u64, b: u8, fua: bool) -> Op {
        Op::Write {
            disk,
            offset,
            data: vec![b; 512],
            fua,
        }
    }
    const F0: Op = Op::Flush { disk: 0 };

    #[test]
    fn a_cut_keeps_what_was_flushed_and_a_subset_of_the_rest() {
        let ops = vec![
            w(0, 0, 1, false),
            F0,
            w(0, 512, 2, false),
            w(0, 1024, 3, true),
            w(0, 1536, 4, false),
        ];
        // Cut before the flush completed: nothing is durable but what `keep` picks.
        assert_eq!(surviving(&ops, 1, |_| false), Vec::<usize>::new());
        assert_eq!(surviving(&ops, 1, |_| true), vec![0]);
        // After the flush: write 0 always; FUA write 3 always; 2 and 4 as chosen.
        assert_eq!(surviving(&ops, 5, |_| false), vec![0, 3]);
        assert_eq!(surviving(&ops, 5, |i| i == 4), vec![0, 3, 4]);
        assert_eq!(surviving(&ops, 99, |_| true), vec![0, 2, 3, 4]);
    }

    #[test]
    fn a_flush_makes_only_its_own_disk_durable() {
        let ops = vec![
            w(0, 0, 1, false),
            w(1, 0, 2, false),
            Op::Flush { disk: 1 },
            w(0, 512, 3, false),
        ];
        // Disk 1's write is durable; disk 0's first write is not (its disk was never flushed).
        assert_eq!(surviving(&ops, 4, |_| false), vec![1]);
        assert_eq!(surviving(&ops, 4, |i| i == 0), vec![0, 1]);
    }

    /// QEMU's own NBD client (qemu-io, package qemu-utils) writes, flushes and reads through
    /// the recorder; the log has the writes and the flush in order, and a crash state built
    /// from it holds exactly what survives.
    #[test]
    fn qemu_io_through_the_recorder() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.img");
        std::fs::File::create(&base)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let work = d.path().join("work.img");
        std::fs::copy(&base, &work).unwrap();
        let sock = d.path().join("nbd.sock");
        let rec = Recorder::start(&[(&work, &sock)]).unwrap();
        let qemu_io = crate::util::tool("qemu-io").unwrap();
        let url = format!("nbd+unix:///?socket={}", rec.socket(0).unwrap().display());
        let run = |cmds: &[&str]| {
            let mut c = std::process::Command::new(&qemu_io);
            // writeback: no FUA on every write (qemu-io's default is writethrough).
            c.args(["-f", "raw", "-t", "writeback"]);
            for x in cmds {
                c.args(["-c", x]);
            }
            let out = c.arg(&url).output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(&["write -P 0xaa 0 4k", "flush", "write -P 0xbb 8k 4k"]);
        let out = run(&["read -P 0xaa 0 4k", "read -P 0xbb 8k 4k"]);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        assert_eq!(rec.error(), None);
        let ops = rec.ops();
        let writes: Vec<(u64, u8)> = ops
            .iter()
            .filter_map(|o| match o {
                Op::Write { offset, data, .. } => Some((*offset, data[0])),
                _ => None,
            })
            .collect();
        assert_eq!(writes, vec![(0, 0xaa), (8192, 0xbb)]);
        let flush_at = ops.iter().position(|o| *o == F0).unwrap();
        let second = ops
            .iter()
            .position(|o| matches!(o, Op::Write { offset: 8192, .. }))
            .unwrap();
        assert!(flush_at < second, "{ops:?}");
        // A cut right after the second write (qemu-io flushes again when it closes the image)
        // that loses it.
        let state = d.path().join("crash.img");
        crash_state(
            &[&base],
            &ops,
            &surviving(&ops, second + 1, |_| false),
            &[&state],
        )
        .unwrap();
        let bytes = std::fs::read(&state).unwrap();
        assert!(bytes[..4096].iter().all(|&b| b == 0xaa));
        assert!(bytes[8192..12288].iter().all(|&b| b == 0));
    }
}
