//! rawrecv — the physical-limit baseline of `cargo xtask bench guest`.
//!
//! A tiny receiver with none of flashd's work (no framing, no journal, no staging, no
//! verification): it reads a virtio-serial port in 1 MiB blocks and writes them with
//! `O_DIRECT` into a slot partition, then fsyncs — what `dd bs=1M iflag=fullblock
//! oflag=direct` does, on the same link into the same partition as flashd. Whatever flashd
//! achieves is measured against this.
//!
//! Protocol on the port (one session per host connection, the port is opened once):
//!
//! ```text
//! host → guest   NXRAW1 len=<bytes> mode=dd|pipe hash=0|sha256|sha256-par|crc32 sink=part|null|state\n
//!                <len bytes>
//! guest → host   rawrecv: done bytes=<n> ms=<t> read_ms=.. write_ms=.. sync_ms=.. hash_ms=.. [digest=<hex>|crc32:<hex>]\n
//!           or   rawrecv: error <text>\n
//! ```
//!
//! * `mode=dd`: read a block, (hash it), write it, repeat — one thread, like `dd`.
//!   `mode=pipe`: a reader thread and a writer thread with [`DEPTH`] buffers in flight (the
//!   port is read while the disk writes).
//! * `hash=sha256` (or `1`): SHA-256 of the data as it passes (the guest's hashing cost);
//!   `hash=crc32`: CRC-32 (the cost of flashd's per-frame link check).
//!   `hash=sha256-par`: SHA-256 of every [`PIECE`] (1 MiB, aligned from the first byte — the
//!   manifest's `chunk_sha256` pieces) on a pool of one thread per vCPU
//!   ([`std::thread::available_parallelism`]) while the reader keeps reading, at most two
//!   pieces per thread in flight ([`ParSha`]); `hash_ms` is then the **sum** of the pool's
//!   hashing time over all its threads (the wall-clock effect shows in `ms`), and `digest` the
//!   SHA-256 over the concatenated piece hashes in order ([`piece_digest`] computes the same
//!   serially).
//! * `sink=part`: the partition (`O_DIRECT`, the tail through the page cache, fdatasync);
//!   `sink=null`: nothing (the link alone); `sink=state`: a buffered file on `/state` with a
//!   final fdatasync, removed afterwards (what flashd's staging file costs).
//!
//! The same line is printed on the console. The header is bounded ([`MAX_HEADER`]) and
//! validated; a length larger than the sink is refused before anything is written.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

use nx_contract::markers::rawrecv as m;
use nx_contract::Marker;
pub use nx_guest::fsx::AlignedBuf;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The benchmark port (host socket `build/bench/qemu/bench.sock`).
pub const BENCH_PORT: &str = nx_contract::ports::BENCH.name;
/// The partition written by default (the one flashd installs into in recovery).
pub const DEFAULT_PARTITION: &str = "system_b";
/// Block size of reads and writes.
pub const BLOCK: usize = 1 << 20;
/// Alignment of the buffers (O_DIRECT).
pub const ALIGN: usize = nx_guest::fsx::ALIGN;
/// Longest header line accepted.
pub const MAX_HEADER: usize = 256;
/// Buffers in flight in `mode=pipe`.
pub const DEPTH: usize = 4;
/// Header magic.
pub const MAGIC: &str = "NXRAW1";
/// The file `sink=state` writes (removed after the session).
pub const STATE_FILE: &str = "/state/flash/rawrecv.bin";
/// The piece `hash=sha256-par` hashes on its own (the manifest's `chunk_sha256` piece, 1 MiB).
pub const PIECE: usize = nx_contract::defaults::CHUNK as usize;
/// Pieces in flight per pool thread in `hash=sha256-par` (queued or being hashed).
pub const PIECES_PER_THREAD: usize = 2;

/// How the data moves through the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One thread: read a block, write it.
    Dd,
    /// Reader and writer threads, [`DEPTH`] buffers.
    Pipe,
}

/// Where the data goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// The slot partition, O_DIRECT.
    Part,
    /// Discarded.
    Null,
    /// A buffered file on /state, fdatasync at the end.
    State,
}

/// What to compute over the data as it passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    None,
    /// SHA-256 (what flashd verifies with).
    Sha256,
    /// CRC-32 (what protects every frame on flashd's link).
    Crc32,
    /// SHA-256 of every [`PIECE`] on a pool of one thread per vCPU ([`ParSha`]).
    Sha256Par,
}

/// One session's parameters (the header line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub len: u64,
    pub mode: Mode,
    pub hash: HashKind,
    pub sink: SinkKind,
}

impl Request {
    /// Parse a header line (without the newline).
    pub fn parse(line: &str) -> Result<Request, String> {
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some(MAGIC) {
            return Err(format!("header does not start with {MAGIC}"));
        }
        let mut req = Request {
            len: 0,
            mode: Mode::Dd,
            hash: HashKind::None,
            sink: SinkKind::Part,
        };
        let mut have_len = false;
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| format!("header word {w:?} is not key=value"))?;
            match (k, v) {
                ("len", n) => {
                    req.len = n.parse().map_err(|_| format!("bad len {n:?}"))?;
                    have_len = true;
                }
                ("mode", "dd") => req.mode = Mode::Dd,
                ("mode", "pipe") => req.mode = Mode::Pipe,
                ("hash", "0") => req.hash = HashKind::None,
                ("hash", "1" | "sha256") => req.hash = HashKind::Sha256,
                ("hash", "crc32") => req.hash = HashKind::Crc32,
                ("hash", "sha256-par") => req.hash = HashKind::Sha256Par,
                ("sink", "part") => req.sink = SinkKind::Part,
                ("sink", "null") => req.sink = SinkKind::Null,
                ("sink", "state") => req.sink = SinkKind::State,
                _ => return Err(format!("unknown header word {w:?}")),
            }
        }
        if !have_len {
            return Err("header has no len=".into());
        }
        Ok(req)
    }

    /// The header line (with the newline).
    pub fn to_line(&self) -> String {
        format!(
            "{MAGIC} len={} mode={} hash={} sink={}\n",
            self.len,
            match self.mode {
                Mode::Dd => "dd",
                Mode::Pipe => "pipe",
            },
            match self.hash {
                HashKind::None => "0",
                HashKind::Sha256 => "sha256",
                HashKind::Crc32 => "crc32",
                HashKind::Sha256Par => "sha256-par",
            },
            match self.sink {
                SinkKind::Part => "part",
                SinkKind::Null => "null",
                SinkKind::State => "state",
            }
        )
    }
}

/// What a session measured.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub bytes: u64,
    /// From the header to the end of the final fsync.
    pub total: Duration,
    /// Time blocked reading the port (the link, including waiting for the host).
    pub read: Duration,
    /// Time in write(2) to the sink.
    pub write: Duration,
    /// The final fsync.
    pub sync: Duration,
    /// Time hashing.
    pub hash: Duration,
    pub digest: Option<String>,
}

impl Stats {
    /// The reply line (without the newline).
    pub fn line(&self) -> Marker {
        let ms = |d: Duration| d.as_millis();
        m::done(
            self.bytes,
            [
                ms(self.total),
                ms(self.read),
                ms(self.write),
                ms(self.sync),
                ms(self.hash),
            ],
            self.digest.as_deref(),
        )
    }

    /// Parse a reply line back (host side): `(bytes, ms)` and every `key=value` field.
    pub fn parse_fields(line: &str) -> Option<Vec<(String, String)>> {
        let rest = line.trim().strip_prefix(m::DONE_PREFIX)?;
        Some(
            rest.split_ascii_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

/// Where blocks go.
pub trait Sink: Send {
    /// Write `data` at `offset` (whole blocks, except the last one).
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Make everything durable.
    fn finish(&mut self) -> io::Result<()>;
}

/// Discards everything.
pub struct NullSink;

impl Sink for NullSink {
    fn write_at(&mut self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A block device (or file) written with O_DIRECT where the length allows it, through the
/// page cache otherwise (the tail), then fdatasync.
pub struct DirectSink {
    direct: Option<File>,
    plain: File,
}

impl DirectSink {
    pub fn open(path: &Path) -> io::Result<DirectSink> {
        let plain = OpenOptions::new().write(true).open(path)?;
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        Ok(DirectSink { direct, plain })
    }
}

impl Sink for DirectSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let aligned = data.len().is_multiple_of(ALIGN)
            && offset.is_multiple_of(ALIGN as u64)
            && (data.as_ptr() as usize).is_multiple_of(ALIGN);
        if let (true, Some(d)) = (aligned, &self.direct) {
            match d.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    // The file system refuses O_DIRECT: the page cache it is.
                    self.direct = None;
                }
                Err(e) => return Err(e),
            }
        }
        self.plain.write_all_at(data, offset)
    }
    fn finish(&mut self) -> io::Result<()> {
        self.plain.sync_data()
    }
}

/// A buffered file (flashd's staging pattern), fdatasync at the end, removed on drop.
pub struct FileSink {
    file: File,
    path: PathBuf,
}

impl FileSink {
    pub fn create(path: &Path, len: u64) -> io::Result<FileSink> {
        let file = nx_guest::fsx::create_sized(path, len)?;
        Ok(FileSink {
            file,
            path: path.to_path_buf(),
        })
    }
}

impl Sink for FileSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn finish(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// SHA-256 of one piece and how long it took.
type PieceResult = (u64, [u8; 32], Duration);

/// `hash=sha256-par`: SHA-256 of every [`PIECE`] of the data (aligned from its first byte) on
/// a pool of threads, while the caller keeps feeding data.
///
/// Memory is bounded: `PIECES_PER_THREAD × threads` piece buffers exist, allocated once; the
/// caller fills a free one (waiting for one when all are queued or being hashed), so at most
/// that many pieces are in flight. The results are folded in order into the digest (SHA-256
/// over the concatenated piece hashes) as they come back; out-of-order results wait in a map
/// that holds at most the pieces in flight.
pub struct ParSha {
    threads: usize,
    work: Option<mpsc::Sender<(u64, Vec<u8>)>>,
    free: mpsc::Receiver<Vec<u8>>,
    results: mpsc::Receiver<PieceResult>,
    workers: Vec<JoinHandle<()>>,
    /// The piece being filled.
    cur: Option<Vec<u8>>,
    /// Index of the next piece handed to the pool.
    next_sent: u64,
    /// Index of the next piece folded into `outer`.
    next_folded: u64,
    pending: BTreeMap<u64, [u8; 32]>,
    outer: Sha256,
    /// Hashing time summed over the pool's threads.
    busy: Duration,
}

impl ParSha {
    /// A pool of `threads` threads (at least one).
    pub fn new(threads: usize) -> io::Result<ParSha> {
        let threads = threads.max(1);
        let (work_tx, work_rx) = mpsc::channel::<(u64, Vec<u8>)>();
        let (free_tx, free_rx) = mpsc::channel::<Vec<u8>>();
        let (res_tx, res_rx) = mpsc::channel::<PieceResult>();
        for _ in 0..threads * PIECES_PER_THREAD {
            let _ = free_tx.send(Vec::with_capacity(PIECE));
        }
        let work_rx = Arc::new(Mutex::new(work_rx));
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, res, free) = (work_rx.clone(), res_tx.clone(), free_tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("rawrecv-sha{i}"))
                .spawn(move || loop {
                    // One idle thread waits on the queue, the others on the lock.
                    let job = match rx.lock() {
                        Ok(q) => q.recv(),
                        Err(_) => return,
                    };
                    let Ok((idx, buf)) = job else { return };
                    let t = Instant::now();
                    let h: [u8; 32] = Sha256::digest(&buf).into();
                    if res.send((idx, h, t.elapsed())).is_err() {
                        return;
                    }
                    let _ = free.send(buf);
                })?;
            workers.push(h);
        }
        Ok(ParSha {
            threads,
            work: Some(work_tx),
            free: free_rx,
            results: res_rx,
            workers,
            cur: None,
            next_sent: 0,
            next_folded: 0,
            pending: BTreeMap::new(),
            outer: Sha256::new(),
            busy: Duration::ZERO,
        })
    }

    /// A pool of one thread per vCPU.
    pub fn per_vcpu() -> io::Result<ParSha> {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        ParSha::new(n)
    }

    /// Threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn pool_gone() -> io::Error {
        io::Error::other("the SHA-256 pool stopped (a hashing thread is gone)")
    }

    fn fold(&mut self, (idx, h, t): PieceResult) {
        self.busy += t;
        self.pending.insert(idx, h);
        while let Some(h) = self.pending.remove(&self.next_folded) {
            self.outer.update(h);
            self.next_folded += 1;
        }
    }

    fn drain_ready(&mut self) {
        while let Ok(r) = self.results.try_recv() {
            self.fold(r);
        }
    }

    /// Hand the piece being filled to the pool.
    fn send_cur(&mut self) -> io::Result<()> {
        let Some(buf) = self.cur.take() else {
            return Ok(());
        };
        let work = self.work.as_ref().ok_or_else(Self::pool_gone)?;
        work.send((self.next_sent, buf))
            .map_err(|_| Self::pool_gone())?;
        self.next_sent += 1;
        Ok(())
    }

    /// Feed the next bytes of the data.
    pub fn update(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut buf = match self.cur.take() {
                Some(b) => b,
                None => {
                    self.drain_ready();
                    let mut b = self.free.recv().map_err(|_| Self::pool_gone())?;
                    b.clear();
                    b
                }
            };
            let take = (PIECE - buf.len()).min(data.len());
            let (now, rest) = data.split_at(take);
            buf.extend_from_slice(now);
            data = rest;
            let full = buf.len() == PIECE;
            self.cur = Some(buf);
            if full {
                self.send_cur()?;
            }
        }
        Ok(())
    }

    /// The last (short) piece, wait for the pool: the digest (hex) and the hashing time
    /// summed over the threads.
    pub fn finish(mut self) -> io::Result<(String, Duration)> {
        if self.cur.as_ref().is_some_and(|b| !b.is_empty()) {
            self.send_cur()?;
        }
        // No more work: the threads end once the queue is empty.
        self.work = None;
        while self.next_folded < self.next_sent {
            let r = self.results.recv().map_err(|_| Self::pool_gone())?;
            self.fold(r);
        }
        let outer = std::mem::take(&mut self.outer);
        Ok((hex::encode(outer.finalize()), self.busy))
    }
}

impl Drop for ParSha {
    fn drop(&mut self) {
        self.work = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

/// What `hash=sha256-par` reports, computed serially: SHA-256 over the concatenated SHA-256
/// of every [`PIECE`] of `data` (the last piece may be short; no data, no pieces).
pub fn piece_digest(data: &[u8]) -> String {
    let mut outer = Sha256::new();
    for piece in data.chunks(PIECE) {
        outer.update(Sha256::digest(piece));
    }
    hex::encode(outer.finalize())
}

/// The running digest of a session.
enum Digest2 {
    None,
    Sha(Sha256),
    Crc(crc32fast::Hasher),
    Par(Box<ParSha>),
}

impl Digest2 {
    fn new(k: HashKind) -> io::Result<Digest2> {
        Ok(match k {
            HashKind::None => Digest2::None,
            HashKind::Sha256 => Digest2::Sha(Sha256::new()),
            HashKind::Crc32 => Digest2::Crc(crc32fast::Hasher::new()),
            HashKind::Sha256Par => Digest2::Par(Box::new(ParSha::per_vcpu()?)),
        })
    }
    fn update(&mut self, d: &[u8]) -> io::Result<()> {
        match self {
            Digest2::None => {}
            Digest2::Sha(h) => h.update(d),
            Digest2::Crc(h) => h.update(d),
            Digest2::Par(p) => p.update(d)?,
        }
        Ok(())
    }
    fn is_some(&self) -> bool {
        !matches!(self, Digest2::None)
    }
    /// The digest, and the pool's summed hashing time for `Par` (`None`: the caller timed
    /// the hashing itself).
    fn finish(self) -> io::Result<(Option<String>, Option<Duration>)> {
        Ok(match self {
            Digest2::None => (None, None),
            Digest2::Sha(h) => (Some(hex::encode(h.finalize())), None),
            Digest2::Crc(h) => (Some(format!("crc32:{:08x}", h.finalize())), None),
            Digest2::Par(p) => {
                let (d, busy) = p.finish()?;
                (Some(d), Some(busy))
            }
        })
    }
}

/// Close a session's digest into `st` (`digest`, and `hash` for the pool).
fn close_digest(d: Digest2, st: &mut Stats) -> io::Result<()> {
    let (digest, pool) = d.finish()?;
    st.digest = digest;
    if let Some(busy) = pool {
        st.hash = busy;
    }
    Ok(())
}

/// Read until `buf` is full; the host going away first is an error.
fn read_full(input: &mut dyn Read, buf: &mut [u8]) -> io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        let slot = buf.get_mut(got..).unwrap_or_default();
        match input.read(slot) {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("host gone after {got} of {} bytes of a block", buf.len()),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receive `req.len` bytes from `input` into `sink`.
pub fn receive(
    input: &mut (dyn Read + Send),
    req: &Request,
    sink: &mut dyn Sink,
) -> io::Result<Stats> {
    let start = Instant::now();
    let mut st = match req.mode {
        Mode::Dd => receive_dd(input, req, sink)?,
        Mode::Pipe => receive_pipe(input, req, sink)?,
    };
    let t = Instant::now();
    sink.finish()?;
    st.sync = t.elapsed();
    st.total = start.elapsed();
    st.bytes = req.len;
    Ok(st)
}

fn receive_dd(input: &mut dyn Read, req: &Request, sink: &mut dyn Sink) -> io::Result<Stats> {
    let mut st = Stats::default();
    let mut sha = Digest2::new(req.hash)?;
    let mut buf = AlignedBuf::new(BLOCK);
    let mut off = 0u64;
    while off < req.len {
        let n = (req.len - off).min(BLOCK as u64) as usize;
        let block = buf.as_mut_slice().get_mut(..n).unwrap_or_default();
        let t = Instant::now();
        read_full(input, block)?;
        st.read += t.elapsed();
        if sha.is_some() {
            let t = Instant::now();
            sha.update(block)?;
            st.hash += t.elapsed();
        }
        let t = Instant::now();
        sink.write_at(off, block)?;
        st.write += t.elapsed();
        off += n as u64;
    }
    close_digest(sha, &mut st)?;
    Ok(st)
}

fn receive_pipe(
    input: &mut (dyn Read + Send),
    req: &Request,
    sink: &mut dyn Sink,
) -> io::Result<Stats> {
    let (free_tx, free_rx) = mpsc::channel::<AlignedBuf>();
    let (full_tx, full_rx) = mpsc::sync_channel::<(AlignedBuf, usize, u64)>(DEPTH);
    for _ in 0..DEPTH {
        let _ = free_tx.send(AlignedBuf::new(BLOCK));
    }
    let mut sha = Digest2::new(req.hash)?;
    std::thread::scope(|s| {
        let writer = s.spawn(move || -> io::Result<Stats> {
            let mut st = Stats::default();
            while let Ok((buf, n, off)) = full_rx.recv() {
                let block = buf.as_slice().get(..n).unwrap_or_default();
                if sha.is_some() {
                    let t = Instant::now();
                    sha.update(block)?;
                    st.hash += t.elapsed();
                }
                let t = Instant::now();
                sink.write_at(off, block)?;
                st.write += t.elapsed();
                // The reader may be gone (error): then the buffer is simply dropped.
                let _ = free_tx.send(buf);
            }
            close_digest(sha, &mut st)?;
            Ok(st)
        });
        let mut read = Duration::ZERO;
        let mut off = 0u64;
        let mut read_result = Ok(());
        while off < req.len {
            let Ok(mut buf) = free_rx.recv() else {
                break; // the writer failed: its error is reported below
            };
            let n = (req.len - off).min(BLOCK as u64) as usize;
            let t = Instant::now();
            let r = read_full(input, buf.as_mut_slice().get_mut(..n).unwrap_or_default());
            read += t.elapsed();
            if let Err(e) = r {
                read_result = Err(e);
                break;
            }
            if full_tx.send((buf, n, off)).is_err() {
                break;
            }
            off += n as u64;
        }
        drop(full_tx);
        let written = writer
            .join()
            .map_err(|_| io::Error::other("writer thread panicked"))?;
        read_result?;
        let mut st = written?;
        st.read = read;
        Ok(st)
    })
}

/// Open the sink of a request. `partition` is a device path for `sink=part`.
pub fn open_sink(req: &Request, partition: Option<&Path>) -> io::Result<Box<dyn Sink>> {
    match req.sink {
        SinkKind::Null => Ok(Box::new(NullSink)),
        SinkKind::State => Ok(Box::new(FileSink::create(Path::new(STATE_FILE), req.len)?)),
        SinkKind::Part => {
            let dev = partition.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("partition {DEFAULT_PARTITION} not found"),
                )
            })?;
            let cap = device_size(dev)?;
            if cap < req.len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} holds {cap} bytes, the request is {} bytes",
                        dev.display(),
                        req.len
                    ),
                ));
            }
            Ok(Box::new(DirectSink::open(dev)?))
        }
    }
}

fn device_size(path: &Path) -> io::Result<u64> {
    let mut f = File::open(path)?;
    io::Seek::seek(&mut f, io::SeekFrom::End(0))
}

/// Read one header line (byte by byte, so no data byte is consumed). `Ok(None)`: no host
/// connected (EOF before any byte).
pub fn read_header(input: &mut dyn Read) -> io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match input.read(&mut byte) {
            Ok(0) if line.is_empty() => return Ok(None),
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "host gone in the middle of the header",
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => {
                line.push(byte[0]);
                if line.len() > MAX_HEADER {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("header longer than {MAX_HEADER} bytes"),
                    ));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(line)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "header is not UTF-8"))
}

/// Serve one session on an open port: header, data, reply. `Ok(false)`: no host connected.
pub fn serve_one(port: &mut File, partition: &dyn Fn() -> Option<PathBuf>) -> io::Result<bool> {
    let Some(line) = read_header(port)? else {
        return Ok(false);
    };
    let reply = match Request::parse(&line) {
        Err(e) => m::error(e),
        Ok(req) => {
            let dev = partition();
            match open_sink(&req, dev.as_deref()) {
                Err(e) => m::sink_error(e),
                Ok(mut sink) => {
                    let mut input = &*port;
                    match receive(&mut input, &req, sink.as_mut()) {
                        Ok(st) => st.line(),
                        Err(e) => m::error(e),
                    }
                }
            }
        }
    };
    nx_guest::marker::show(&reply);
    let mut out = reply.into_string().into_bytes();
    out.push(b'\n');
    // The host may already be gone: the console has the line anyway.
    let _ = port.write_all(&out);
    Ok(true)
}

/// The daemon: wait for the port, open it once read-write, serve sessions forever.
pub fn serve_forever(port_name: &str, partition_name: &str) -> ! {
    let dev = loop {
        match nx_guest::port::find(
            Path::new(nx_guest::port::SYS_VIRTIO_PORTS),
            Path::new("/dev"),
            port_name,
        ) {
            Ok(Some(p)) if p.exists() => break p,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let mut port = loop {
        match OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(f) => break f,
            Err(e) => {
                eprintln!("{}", m::open_retry(dev.display(), e));
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    };
    nx_guest::marker::show(&m::ready(port_name, dev.display(), partition_name));
    let part = partition_name.to_string();
    let find_part = move || {
        nx_guest::blockdev::find_partition(
            Path::new(nx_guest::blockdev::SYS_CLASS_BLOCK),
            Path::new("/dev"),
            &part,
        )
        .ok()
        .flatten()
    };
    loop {
        match serve_one(&mut port, &find_part) {
            Ok(true) => {}
            // No host connected: the port reads EOF until one connects.
            Ok(false) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                nx_guest::marker::show(&m::error(e));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_validation() {
        let r = Request {
            len: 12345,
            mode: Mode::Pipe,
            hash: HashKind::Sha256,
            sink: SinkKind::Null,
        };
        let line = r.to_line();
        assert_eq!(line, "NXRAW1 len=12345 mode=pipe hash=sha256 sink=null\n");
        assert_eq!(Request::parse(line.trim_end()).unwrap(), r);
        assert_eq!(
            Request::parse("NXRAW1 len=1 hash=crc32").unwrap().hash,
            HashKind::Crc32
        );
        assert_eq!(
            Request::parse("NXRAW1 len=1 hash=1").unwrap().hash,
            HashKind::Sha256
        );
        assert!(Request::parse("NXRAW1 mode=dd").is_err());
        assert!(Request::parse("NXRAW2 len=1").is_err());
        assert!(Request::parse("NXRAW1 len=-1").is_err());
        assert!(Request::parse("NXRAW1 len=1 sink=../x").is_err());
        assert!(Request::parse("NXRAW1 len=1 junk").is_err());
    }

    #[test]
    fn header_is_bounded_and_eof_means_no_host() {
        let mut empty: &[u8] = b"";
        assert!(read_header(&mut empty).unwrap().is_none());
        let long = vec![b'x'; MAX_HEADER + 10];
        let mut r: &[u8] = &long;
        assert!(read_header(&mut r).is_err());
        let mut r: &[u8] = b"NXRAW1 len=3\nabc";
        assert_eq!(read_header(&mut r).unwrap().unwrap(), "NXRAW1 len=3");
        assert_eq!(r, b"abc");
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn both_modes_copy_exactly_and_hash() {
        let dir = tempfile::tempdir().unwrap();
        let n = 3 * BLOCK + 1000;
        let src = data(n);
        let want = hex::encode(Sha256::digest(&src));
        for mode in [Mode::Dd, Mode::Pipe] {
            let out = dir.path().join(format!("{mode:?}"));
            File::create(&out)
                .unwrap()
                .set_len(4 * BLOCK as u64)
                .unwrap();
            let req = Request {
                len: n as u64,
                mode,
                hash: HashKind::Sha256,
                sink: SinkKind::Part,
            };
            let mut sink = DirectSink::open(&out).unwrap();
            let mut input: &[u8] = &src;
            let st = receive(&mut input, &req, &mut sink).unwrap();
            assert_eq!(st.bytes, n as u64);
            assert_eq!(st.digest.as_deref(), Some(want.as_str()));
            let got = std::fs::read(&out).unwrap();
            assert_eq!(&got[..n], &src[..]);
            let fields = Stats::parse_fields(st.line().as_str()).unwrap();
            assert!(fields
                .iter()
                .any(|(k, v)| k == "bytes" && *v == n.to_string()));
        }
    }

    #[test]
    fn the_parallel_piece_digest_equals_the_serial_one() {
        // Not a multiple of a piece, fed in uneven slices that straddle piece boundaries.
        let n = 5 * PIECE + 12345;
        let src = data(n);
        let want = piece_digest(&src);
        // Differs from the plain SHA-256 of the data (it is a digest of the piece hashes).
        assert_ne!(want, hex::encode(Sha256::digest(&src)));
        for threads in [1, 2, 3, 8] {
            let mut p = ParSha::new(threads).unwrap();
            assert_eq!(p.threads(), threads);
            let mut rest: &[u8] = &src;
            let mut step = 1usize;
            while !rest.is_empty() {
                let (a, b) = rest.split_at(step.min(rest.len()));
                p.update(a).unwrap();
                rest = b;
                step = step * 3 + 777;
            }
            let (got, busy) = p.finish().unwrap();
            assert_eq!(got, want, "{threads} threads");
            assert!(busy > Duration::ZERO);
        }
        // Exactly one piece, and a short one: the short tail is a piece of its own.
        let one = data(PIECE);
        let mut p = ParSha::new(2).unwrap();
        p.update(&one).unwrap();
        assert_eq!(p.finish().unwrap().0, piece_digest(&one));
        let mut outer = Sha256::new();
        outer.update(Sha256::digest(&src[..PIECE]));
        outer.update(Sha256::digest(&src[PIECE..PIECE + 10]));
        let mut p = ParSha::new(2).unwrap();
        p.update(&src[..PIECE + 10]).unwrap();
        assert_eq!(p.finish().unwrap().0, hex::encode(outer.finalize()));
        // No data: the digest of no pieces.
        let p = ParSha::new(2).unwrap();
        assert_eq!(p.finish().unwrap().0, hex::encode(Sha256::new().finalize()));
    }

    #[test]
    fn sha256_par_sessions_in_both_modes() {
        let n = 3 * BLOCK + 4321;
        let src = data(n);
        let want = piece_digest(&src);
        for mode in [Mode::Dd, Mode::Pipe] {
            let req = Request::parse(&format!(
                "NXRAW1 len={n} mode={} hash=sha256-par sink=null",
                if mode == Mode::Dd { "dd" } else { "pipe" }
            ))
            .unwrap();
            assert_eq!(req.hash, HashKind::Sha256Par);
            assert_eq!(Request::parse(req.to_line().trim_end()).unwrap(), req);
            let mut input: &[u8] = &src;
            let st = receive(&mut input, &req, &mut NullSink).unwrap();
            assert_eq!(st.digest.as_deref(), Some(want.as_str()), "{mode:?}");
            assert!(st.line().as_str().contains(&format!("digest={want}")));
        }
    }

    #[test]
    fn short_input_is_an_error_in_both_modes() {
        for mode in [Mode::Dd, Mode::Pipe] {
            let src = data(BLOCK + 10);
            let req = Request {
                len: 2 * BLOCK as u64,
                mode,
                hash: HashKind::None,
                sink: SinkKind::Null,
            };
            let mut input: &[u8] = &src;
            let err = receive(&mut input, &req, &mut NullSink).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{mode:?}");
        }
    }

    #[test]
    fn a_too_small_partition_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("dev");
        File::create(&dev).unwrap().set_len(4096).unwrap();
        let req = Request {
            len: 8192,
            mode: Mode::Dd,
            hash: HashKind::None,
            sink: SinkKind::Part,
        };
        assert!(open_sink(&req, Some(&dev)).is_err());
        assert!(open_sink(&req, None).is_err());
    }
}
