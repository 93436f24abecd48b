//! Background work of the server, so receiving never waits for hashing or fsync:
//!
//! * the **hasher** thread follows each segment while it streams in. Every segment of a
//!   format-4 manifest carries the signed SHA-256 of each 1 MiB piece that holds data
//!   (`chunk_sha256`): as soon as a piece is completely written, the hasher hands it to the
//!   **piece pool** ([`PiecePool`], `--verify-threads`, one thread per vCPU by default), whose
//!   threads read it back and check it independently and in parallel. The segment is verified
//!   when its last piece is; the first bad piece is named, and the transfer resumes from it.
//!   Without piece hashes (no manifest yet) the hasher hashes the segment itself as it
//!   streams in (the data of every WRITE, zero runs filled in); it falls
//!   back to reading the staging file back when it did not see the whole segment (resume,
//!   rewind, segments without data). When the transfer streams straight into a block device
//!   (the inactive slot, see [`crate::store::Staging::create`]) it hashes what it reads back
//!   from that device right behind the writes instead (`O_DIRECT`, so from the disk): one
//!   SHA-256 pass then checks both the link and the storage, and the install needs no second
//!   read-back;
//! * the **durability** thread runs fsyncs, journal writes and the install, strictly in the
//!   order they were queued (a journal never claims data that was not synced first).
//!
//! Both queues are bounded, and the server loop never waits on them: a job that does not
//! fit goes to a small backlog ([`JobQueue`]) that is moved on as the thread takes jobs,
//! and while a backlog holds a queue's worth the loop stops reading frames (backpressure)
//! but keeps answering results and watching the stall timeout. Memory stays bounded by
//! about `2 × HASH_QUEUE × chunk` whatever the image size.

use crate::records::{self, Counters};
use crate::store::{self, Staging, StateDir};
use bytes::Bytes;
use proto::manifest::{DataRange, HashedPiece};
use proto::session::Journal;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Jobs queued to the hasher thread (more wait in the backlog, see the module docs).
pub const HASH_QUEUE: usize = 4;
/// Jobs queued to the durability thread (more wait in the backlog).
pub const DURABLE_QUEUE: usize = 16;

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Results reported back to the server loop.
#[derive(Debug)]
pub enum WorkResult {
    Verified {
        ticket: u64,
        ok: bool,
        streamed: bool,
        /// Checked piece by piece: the offset (relative to the segment) of the first piece
        /// that did not match, if one did not.
        bad_piece: Option<u64>,
    },
    Synced {
        upto_seq: u32,
    },
    Installed {
        ok: bool,
        detail: String,
    },
    /// The skip index of the image just installed.
    Index(Option<Box<proto::session::SkipIndex>>),
    /// A background step failed (sync, journal): the session must not claim progress.
    Failed {
        what: String,
        text: String,
    },
}

/// Jobs of the hasher thread.
pub enum HashJob {
    /// Start hashing the content of a segment (at absolute `offset`) from its first byte.
    /// `data`: hash only the bytes inside these ranges (relative to the segment; the digest
    /// is then the manifest's `data_sha256`). Read-back mode only.
    Begin {
        segment: usize,
        offset: u64,
        data: Option<Arc<[DataRange]>>,
        /// The segment's signed pieces: verify them on the pool instead of hashing the
        /// segment here.
        pieces: Option<Arc<[HashedPiece]>>,
    },
    /// The next bytes of the current segment, in order.
    Data(Bytes),
    /// The next `len` bytes of the current segment were written to the file set with
    /// `readback`: read them back from it and hash them.
    Written(u64),
    /// The next `len` bytes of the current segment are zero.
    Zeros(u64),
    /// Finish: `streamed` = the current hash covers the segment from its start up to
    /// where the writes stopped (the rest is zero); otherwise hash the staging file.
    Verify {
        ticket: u64,
        segment: usize,
        offset: u64,
        size: u64,
        sha256: [u8; 32],
        streamed: bool,
        /// As in [`HashJob::Begin`]: `sha256` is then the `data_sha256` of these ranges.
        data: Option<Arc<[DataRange]>>,
        /// As in [`HashJob::Begin`]: check these pieces (`sha256` is then not used).
        pieces: Option<Arc<[HashedPiece]>>,
    },
    /// The staging file to read back from (or none). `readback`: the transfer streams into a
    /// block device and [`HashJob::Written`]/[`HashJob::Zeros`] are read back from `file`.
    SetFile {
        file: Option<Arc<File>>,
        readback: bool,
    },
}

/// The sending end of a worker's bounded queue with a backlog in front of it: queueing
/// never waits (see the module docs).
struct JobQueue<T> {
    tx: Option<SyncSender<T>>,
    backlog: VecDeque<T>,
}

impl<T> JobQueue<T> {
    fn new(tx: SyncSender<T>) -> JobQueue<T> {
        JobQueue {
            tx: Some(tx),
            backlog: VecDeque::new(),
        }
    }

    /// Queue `job` behind every job queued before it; never waits.
    fn push(&mut self, job: T) {
        self.backlog.push_back(job);
        self.flush();
    }

    /// Move backlog jobs into the channel while it has room; never waits. A gone thread
    /// drops them (its results are then never reported: the session fails on its own).
    fn flush(&mut self) {
        let Some(tx) = &self.tx else {
            self.backlog.clear();
            return;
        };
        while let Some(job) = self.backlog.pop_front() {
            match tx.try_send(job) {
                Ok(()) => {}
                Err(TrySendError::Full(job)) => {
                    self.backlog.push_front(job);
                    return;
                }
                Err(TrySendError::Disconnected(_)) => {
                    self.backlog.clear();
                    return;
                }
            }
        }
    }

    /// Hand the whole backlog to the thread, waiting for room (a barrier, shutdown).
    fn flush_wait(&mut self) {
        if let Some(tx) = &self.tx {
            while let Some(job) = self.backlog.pop_front() {
                if tx.send(job).is_err() {
                    self.backlog.clear();
                }
            }
        }
    }

    /// Close the queue (after the backlog went to the thread).
    fn close(&mut self) {
        self.flush_wait();
        self.tx = None;
    }
}

/// Handle of the hasher thread.
pub struct Hasher {
    q: JobQueue<HashJob>,
    handle: Option<JoinHandle<()>>,
}

impl Hasher {
    /// The hasher thread and its piece pool of `verify_threads` threads (at least one).
    pub fn spawn(results: Sender<WorkResult>, verify_threads: usize) -> std::io::Result<Hasher> {
        let (tx, rx) = mpsc::sync_channel(HASH_QUEUE);
        let pool = PiecePool::spawn(verify_threads)?;
        let handle = std::thread::Builder::new()
            .name("flashd-hash".into())
            .spawn(move || hasher_loop(rx, results, pool))?;
        Ok(Hasher {
            q: JobQueue::new(tx),
            handle: Some(handle),
        })
    }

    /// Queue a job; never waits (see [`Hasher::backlogged`]).
    pub fn send(&mut self, job: HashJob) {
        self.q.push(job);
    }

    /// Move backlog jobs on as the thread makes room; never waits.
    pub fn flush(&mut self) {
        self.q.flush();
    }

    /// Jobs waiting in front of the full queue.
    pub fn backlog(&self) -> usize {
        self.q.backlog.len()
    }

    /// A queue's worth of jobs waits: stop reading frames until it moved on.
    pub fn backlogged(&self) -> bool {
        self.backlog() >= HASH_QUEUE
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        self.q.close();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Read size of the pool threads: a whole piece in one `O_DIRECT` read (in the TCG guest,
/// four 256 KiB reads per piece cost ~20% more verify CPU than one). At most
/// `nx_contract::loader::MAX_VERIFY_THREADS` buffers of it exist.
const PIECE_READ: usize = 1024 * 1024;

/// One piece to check: read it back from `file` (the segment starts at absolute `base`),
/// compare its SHA-256 with the signed one, report to `check`.
struct PieceJob {
    file: Arc<File>,
    base: u64,
    piece: HashedPiece,
    check: Arc<SegmentCheck>,
}

/// The piece checks of one segment, shared by the hasher and the pool threads. `pending`
/// counts the pieces in flight, plus one until the hasher seals the segment (it queued every
/// piece); whoever brings it to zero reports the segment, so nobody ever waits for it.
struct SegmentCheck {
    pending: AtomicUsize,
    state: Mutex<CheckState>,
    results: Sender<WorkResult>,
}

#[derive(Default)]
struct CheckState {
    ticket: u64,
    streamed: bool,
    /// The lowest offset of a piece that did not match (or could not be read).
    bad: Option<u64>,
}

impl SegmentCheck {
    fn new(results: Sender<WorkResult>) -> Arc<SegmentCheck> {
        Arc::new(SegmentCheck {
            pending: AtomicUsize::new(1),
            state: Mutex::new(CheckState::default()),
            results,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, CheckState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn piece_done(&self, rel_offset: u64, ok: bool) {
        if !ok {
            let mut s = self.state();
            s.bad = Some(s.bad.map_or(rel_offset, |b| b.min(rel_offset)));
        }
        self.release();
    }

    /// Every piece was queued: the result is due when the last one is checked.
    fn seal(&self, ticket: u64, streamed: bool) {
        {
            let mut s = self.state();
            s.ticket = ticket;
            s.streamed = streamed;
        }
        self.release();
    }

    fn release(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let s = self.state();
            let _ = self.results.send(WorkResult::Verified {
                ticket: s.ticket,
                ok: s.bad.is_none(),
                streamed: s.streamed,
                bad_piece: s.bad,
            });
        }
    }
}

/// The threads that check pieces (`--verify-threads`). Its queue is bounded (two pieces
/// per thread): a full queue makes the hasher wait, and that backs up to the server loop
/// like any other hasher backlog, so memory stays bounded.
struct PiecePool {
    tx: Option<SyncSender<PieceJob>>,
    handles: Vec<JoinHandle<()>>,
}

impl PiecePool {
    fn spawn(threads: usize) -> std::io::Result<PiecePool> {
        let n = threads.max(1);
        let (tx, rx) = mpsc::sync_channel::<PieceJob>(2 * n);
        let rx = Arc::new(Mutex::new(rx));
        let mut pool = PiecePool {
            tx: Some(tx),
            handles: Vec::with_capacity(n),
        };
        for _ in 0..n {
            let rx = rx.clone();
            pool.handles.push(
                std::thread::Builder::new()
                    .name("flashd-verify".into())
                    .spawn(move || piece_loop(&rx))?,
            );
        }
        Ok(pool)
    }

    /// Queue a piece (waits while the queue is full).
    fn submit(&self, job: PieceJob) {
        let Some(tx) = &self.tx else {
            job.check.piece_done(job.piece.rel_offset, false);
            return;
        };
        if let Err(mpsc::SendError(job)) = tx.send(job) {
            // No pool thread left: the piece cannot be vouched for.
            job.check.piece_done(job.piece.rel_offset, false);
        }
    }
}

impl Drop for PiecePool {
    fn drop(&mut self) {
        self.tx = None;
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn piece_loop(rx: &Mutex<Receiver<PieceJob>>) {
    let mut buf = crate::blockio::AlignedBuf::new(PIECE_READ);
    loop {
        let job = {
            let q = rx.lock().unwrap_or_else(|e| e.into_inner());
            q.recv()
        };
        let Ok(job) = job else { return };
        let mut sha = Sha256::new();
        let ok = job
            .base
            .checked_add(job.piece.rel_offset)
            .and_then(|at| hash_range(&job.file, at, job.piece.len, &mut sha, &mut buf))
            .is_some()
            && <[u8; 32]>::from(sha.finalize()) == job.piece.sha256;
        job.check.piece_done(job.piece.rel_offset, ok);
    }
}

/// A segment checked piece by piece: the pieces, how many were queued, their check.
struct PieceStream {
    list: Arc<[HashedPiece]>,
    next: usize,
    check: Arc<SegmentCheck>,
}

impl PieceStream {
    fn new(list: Arc<[HashedPiece]>, results: &Sender<WorkResult>) -> PieceStream {
        PieceStream {
            list,
            next: 0,
            check: SegmentCheck::new(results.clone()),
        }
    }

    /// Queue every piece that ends at or before `upto` (relative to the segment) and was
    /// not queued yet. Without a file to read back from, they count as bad.
    fn dispatch(&mut self, pool: &PiecePool, file: Option<&Arc<File>>, base: u64, upto: u64) {
        while let Some(p) = self.list.get(self.next) {
            if p.rel_offset.saturating_add(p.len) > upto {
                break;
            }
            self.next += 1;
            self.check.pending.fetch_add(1, Ordering::AcqRel);
            match file {
                Some(f) => pool.submit(PieceJob {
                    file: f.clone(),
                    base,
                    piece: *p,
                    check: self.check.clone(),
                }),
                None => self.check.piece_done(p.rel_offset, false),
            }
        }
    }
}

struct Current {
    segment: usize,
    /// Absolute offset of the segment.
    base: u64,
    pos: u64,
    sha: Sha256,
    data: Option<Arc<[DataRange]>>,
    /// Checked piece by piece on the pool (then `sha` is not used).
    pieces: Option<PieceStream>,
}

fn hasher_loop(rx: Receiver<HashJob>, results: Sender<WorkResult>, pool: PiecePool) {
    let mut cur: Option<Current> = None;
    let mut file: Option<Arc<File>> = None;
    let mut readback = false;
    let mut buf: Option<crate::blockio::AlignedBuf> = None;
    // A read-back that failed poisons the segment's hash (it then never matches).
    let mut failed = false;
    while let Ok(job) = rx.recv() {
        match job {
            HashJob::Begin {
                segment,
                offset,
                data,
                pieces,
            } => {
                failed = false;
                cur = Some(Current {
                    segment,
                    base: offset,
                    pos: 0,
                    sha: Sha256::new(),
                    data,
                    pieces: pieces.map(|l| PieceStream::new(l, &results)),
                })
            }
            // Piece mode: the bytes are in the file now; queue the pieces they complete.
            HashJob::Data(_) | HashJob::Written(_) | HashJob::Zeros(_)
                if cur.as_ref().is_some_and(|c| c.pieces.is_some()) =>
            {
                let n = match &job {
                    HashJob::Data(b) => b.len() as u64,
                    HashJob::Written(n) | HashJob::Zeros(n) => *n,
                    _ => 0,
                };
                if let Some(c) = &mut cur {
                    c.pos = c.pos.saturating_add(n);
                    if let Some(ps) = &mut c.pieces {
                        ps.dispatch(&pool, file.as_ref(), c.base, c.pos);
                    }
                }
            }
            HashJob::Data(b) => {
                if let Some(c) = &mut cur {
                    match c.data.as_deref() {
                        Some(ranges) => {
                            for (x, y) in overlaps(ranges, c.pos, b.len() as u64) {
                                let (x, y) = ((x - c.pos) as usize, (y - c.pos) as usize);
                                c.sha.update(b.get(x..y).unwrap_or_default());
                            }
                        }
                        None => c.sha.update(&b),
                    }
                    c.pos += b.len() as u64;
                }
            }
            HashJob::Written(n) | HashJob::Zeros(n) if readback => {
                if let (Some(c), Some(f)) = (&mut cur, &file) {
                    let b = buf.get_or_insert_with(|| {
                        crate::blockio::AlignedBuf::new(crate::blockio::COPY_BLOCK)
                    });
                    failed |=
                        hash_part(f, c.base, c.pos, n, c.data.as_deref(), &mut c.sha, b).is_none();
                    c.pos += n;
                }
            }
            HashJob::Written(n) | HashJob::Zeros(n) => {
                if let Some(c) = &mut cur {
                    hash_zeros_in(&mut c.sha, c.data.as_deref(), c.pos, n);
                    c.pos += n;
                }
            }
            HashJob::SetFile {
                file: f,
                readback: r,
            } => {
                file = f;
                readback = r;
            }
            HashJob::Verify {
                ticket,
                segment,
                offset,
                size,
                sha256,
                streamed,
                data,
                pieces,
            } => {
                let taken = cur.take();
                if let Some(list) = pieces {
                    // Piece mode: queue what is left (the streamed tail, or every piece when
                    // the segment did not stream in), then seal; the pool reports.
                    let (mut ps, base, streamed) = match taken {
                        Some(Current {
                            segment: s,
                            pos,
                            base,
                            pieces: Some(ps),
                            ..
                        }) if streamed && s == segment && pos <= size => (ps, base, true),
                        other => {
                            if let Some(c) = other {
                                if c.segment != segment {
                                    cur = Some(c);
                                }
                            }
                            (PieceStream::new(list, &results), offset, false)
                        }
                    };
                    ps.dispatch(&pool, file.as_ref(), base, u64::MAX);
                    ps.check.seal(ticket, streamed);
                    continue;
                }
                let b = buf.get_or_insert_with(|| {
                    crate::blockio::AlignedBuf::new(crate::blockio::COPY_BLOCK)
                });
                let digest: Option<[u8; 32]> = match taken {
                    Some(mut c) if streamed && c.segment == segment && c.pos <= size => {
                        let tail = size - c.pos;
                        match (&file, readback) {
                            (Some(f), true) => {
                                failed |= hash_part(
                                    f,
                                    c.base,
                                    c.pos,
                                    tail,
                                    c.data.as_deref(),
                                    &mut c.sha,
                                    b,
                                )
                                .is_none();
                            }
                            _ => hash_zeros_in(&mut c.sha, c.data.as_deref(), c.pos, tail),
                        }
                        (!failed).then(|| c.sha.finalize().into())
                    }
                    other => {
                        // Keep a stream of another segment (should not happen, but harmless).
                        if let Some(c) = other {
                            if c.segment != segment {
                                cur = Some(c);
                            }
                        }
                        file.as_ref().and_then(|f| {
                            let mut sha = Sha256::new();
                            hash_part(f, offset, 0, size, data.as_deref(), &mut sha, b)?;
                            Some(sha.finalize().into())
                        })
                    }
                };
                let ok = digest == Some(sha256);
                let _ = results.send(WorkResult::Verified {
                    ticket,
                    ok,
                    streamed: streamed && digest.is_some(),
                    bad_piece: None,
                });
            }
        }
    }
}

/// The parts of `[from, from + len)` inside `ranges` (sorted, relative to the segment).
fn overlaps(ranges: &[DataRange], from: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let to = from.saturating_add(len);
    let first = ranges.partition_point(|r| r.end() <= from);
    ranges
        .get(first..)
        .unwrap_or_default()
        .iter()
        .take_while(move |r| r.offset < to)
        .map(move |r| (r.offset.max(from), r.end().min(to)))
        .filter(|(a, b)| a < b)
}

/// Hash `n` zeros at segment position `pos`: with `data` ranges (the digest is the
/// manifest's `data_sha256`) only those inside them, so a zero run outside the data ranges
/// costs nothing however long it is.
fn hash_zeros_in(sha: &mut Sha256, data: Option<&[DataRange]>, pos: u64, n: u64) {
    match data {
        Some(ranges) => {
            for (a, b) in overlaps(ranges, pos, n) {
                hash_zeros(sha, b - a);
            }
        }
        None => hash_zeros(sha, n),
    }
}

fn hash_zeros(sha: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        sha.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

/// Hash bytes `[from, from + len)` of the segment at absolute `base` in `f`: all of them, or
/// with `data` only those inside these ranges (relative to the segment, sorted).
fn hash_part(
    f: &File,
    base: u64,
    from: u64,
    len: u64,
    data: Option<&[DataRange]>,
    sha: &mut Sha256,
    buf: &mut crate::blockio::AlignedBuf,
) -> Option<()> {
    let to = from.checked_add(len)?;
    let Some(ranges) = data else {
        return hash_range(f, base.checked_add(from)?, len, sha, buf);
    };
    let first = ranges.partition_point(|r| r.end() <= from);
    for r in ranges.get(first..)? {
        if r.offset >= to {
            break;
        }
        let (a, b) = (r.offset.max(from), r.end().min(to));
        if a < b {
            hash_range(f, base.checked_add(a)?, b - a, sha, buf)?;
        }
    }
    Some(())
}

/// Hash `len` bytes of `f` at `offset`, read in block-aligned pieces into the aligned `buf`
/// (so an `O_DIRECT` descriptor works; a plain one does too). `None` on a read error or an
/// early end of file.
fn hash_range(
    f: &File,
    offset: u64,
    len: u64,
    sha: &mut Sha256,
    buf: &mut crate::blockio::AlignedBuf,
) -> Option<()> {
    let align = crate::blockio::ALIGN as u64;
    let end = offset.checked_add(len)?;
    let mut pos = offset;
    while pos < end {
        let start = pos - pos % align;
        let skip = (pos - start) as usize;
        let want = ((end - start) as usize).min(buf.len());
        let read_len = want.next_multiple_of(crate::blockio::ALIGN).min(buf.len());
        let slot = buf.as_mut_slice().get_mut(..read_len)?;
        let mut got = 0usize;
        while got < want {
            match f.read_at(slot.get_mut(got..)?, start + got as u64) {
                Ok(0) => return None,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        sha.update(slot.get(skip..want)?);
        pos = start + want as u64;
    }
    Some(())
}

/// A small write on the state dir, run in order with the other durability jobs.
pub type RecordJob = Box<dyn FnOnce(&StateDir) -> Result<(), String> + Send>;

/// Jobs of the durability thread (executed in order).
pub enum DurableJob {
    /// fdatasync the staging file, then report `Synced`. Without a file (it was handed to
    /// the install queued before this job, which syncs it itself) just report.
    Sync {
        file: Option<Arc<File>>,
        upto_seq: u32,
    },
    /// Persist the journal (and the receipt counters) atomically.
    Journal(Box<Journal>, Option<Box<Counters>>),
    /// Remove the journal and counters.
    ClearJournal,
    /// Install the staging file into the target, then report `Installed`.
    Install {
        staging: PathBuf,
        /// The verified image: the read-back of a block device is checked against it.
        image_id: [u8; 32],
        total_size: u64,
        target: Option<store::InstallTarget>,
        target_error: Option<String>,
        unchanged: bool,
        /// Re-read the target (or the device streamed into) and check it against this
        /// manifest ([`store::verify_content`]) before it counts: an unchanged install (the
        /// installed image's manifest), a resumed direct transfer (its own).
        check: Option<Box<proto::manifest::Manifest>>,
    },
    /// Write a small record (install record, receipt) — ordered after the install.
    Run(RecordJob),
}

/// Handle of the durability thread.
pub struct Durable {
    q: JobQueue<DurableJob>,
    handle: Option<JoinHandle<()>>,
}

impl Durable {
    pub fn spawn(state: StateDir, results: Sender<WorkResult>) -> std::io::Result<Durable> {
        let (tx, rx) = mpsc::sync_channel(DURABLE_QUEUE);
        let handle = std::thread::Builder::new()
            .name("flashd-sync".into())
            .spawn(move || durable_loop(state, rx, results))?;
        Ok(Durable {
            q: JobQueue::new(tx),
            handle: Some(handle),
        })
    }

    /// Queue a job (after every job queued before it); never waits.
    pub fn send(&mut self, job: DurableJob) {
        self.q.push(job);
    }

    /// Queue a job and hand everything queued to the thread, waiting for room (barriers).
    pub fn send_wait(&mut self, job: DurableJob) {
        self.q.push(job);
        self.q.flush_wait();
    }

    /// Move backlog jobs on as the thread makes room; never waits.
    pub fn flush(&mut self) {
        self.q.flush();
    }

    /// Jobs waiting in front of the full queue.
    pub fn backlog(&self) -> usize {
        self.q.backlog.len()
    }

    /// A queue's worth of jobs waits: stop reading frames until it moved on.
    pub fn backlogged(&self) -> bool {
        self.backlog() >= DURABLE_QUEUE
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        self.q.close();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn durable_loop(state: StateDir, rx: Receiver<DurableJob>, results: Sender<WorkResult>) {
    while let Ok(job) = rx.recv() {
        match job {
            DurableJob::Sync { file, upto_seq } => {
                let r = match file.map_or(Ok(()), |f| f.sync_data()) {
                    Ok(()) => WorkResult::Synced { upto_seq },
                    Err(e) => WorkResult::Failed {
                        what: "sync".into(),
                        text: format!("fsync of the staging file failed: {e}"),
                    },
                };
                let _ = results.send(r);
            }
            DurableJob::Journal(j, counters) => {
                if let Err(e) = records::save_journal(&state, &j) {
                    let _ = results.send(WorkResult::Failed {
                        what: "journal".into(),
                        text: format!("cannot persist the journal: {e}"),
                    });
                    continue;
                }
                if let Some(c) = counters {
                    // Counters only feed the receipt: a failure is not fatal.
                    let _ = records::save_counters(&state, &c);
                }
            }
            DurableJob::ClearJournal => {
                if let Err(e) = records::clear_journal(&state) {
                    let _ = results.send(WorkResult::Failed {
                        what: "journal".into(),
                        text: format!("cannot clear the journal: {e}"),
                    });
                }
            }
            DurableJob::Install {
                staging,
                image_id,
                total_size,
                target,
                target_error,
                unchanged,
                check,
            } => {
                let r = run_install(
                    &staging,
                    &image_id,
                    total_size,
                    target,
                    target_error,
                    unchanged,
                    check.as_deref(),
                );
                let (ok, detail) = match r {
                    Ok(d) => (true, d),
                    Err(d) => (false, d),
                };
                let _ = results.send(WorkResult::Installed { ok, detail });
            }
            DurableJob::Run(f) => {
                if let Err(text) = f(&state) {
                    let _ = results.send(WorkResult::Failed {
                        what: "record".into(),
                        text,
                    });
                }
            }
        }
    }
}

fn run_install(
    staging: &std::path::Path,
    image_id: &[u8; 32],
    total_size: u64,
    target: Option<store::InstallTarget>,
    target_error: Option<String>,
    unchanged: bool,
    check: Option<&proto::manifest::Manifest>,
) -> Result<String, String> {
    let Some(target) = target else {
        return Err(target_error.unwrap_or_else(|| "no install target".into()));
    };
    if unchanged {
        // The identical image is installed: confirm the target is still there and still
        // holds it.
        let len = std::fs::metadata(target.path())
            .map(|m| m.len())
            .map_err(|e| format!("install target {}: {e}", target.path().display()))?;
        if matches!(target, store::InstallTarget::File(_)) && len != total_size {
            return Err(format!(
                "install target {} is {len} bytes, the installed image is {total_size}: flash again with --no-skip",
                target.path().display()
            ));
        }
        let m = check.ok_or_else(|| {
            format!(
                "cannot check install target {}: the installed image's manifest is unknown; \
                 flash again with --no-skip",
                target.path().display()
            )
        })?;
        store::verify_content(target.path(), m).map_err(|e| {
            format!(
                "install target {} no longer holds the installed image ({e}): flash again \
                 with --no-skip",
                target.path().display()
            )
        })?;
        return Ok(format!(
            "{} unchanged (content re-read and verified)",
            target.path().display()
        ));
    }
    if std::fs::metadata(staging)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
    {
        // The transfer streamed straight into this device: it must be the target.
        if staging != target.path() {
            return Err(format!(
                "the transfer streamed into {} but the install target is {}: flash again",
                staging.display(),
                target.path().display()
            ));
        }
        if let Some(m) = check {
            // Resumed: what an earlier process (or a power cut) left outside the ranges
            // written since must be what the manifest says, zeros included.
            store::verify_content(staging, m).map_err(|e| {
                format!(
                    "after the resume, {} does not hold the image ({e}): flash again",
                    staging.display()
                )
            })?;
        }
        let times = store::finish_direct(staging, image_id).map_err(|e| e.to_string())?;
        return Ok(format!(
            "installed into {} (streamed directly, segments read back as they completed; {times})",
            target.path().display()
        ));
    }
    let s = Staging::open_existing(staging, total_size)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| {
            format!(
                "staging file {} is missing or has the wrong size",
                staging.display()
            )
        })?;
    let times = store::install_image(s, &target, image_id).map_err(|e| e.to_string())?;
    Ok(format!(
        "installed into {} ({times})",
        target.path().display()
    ))
}

#[cfg(test)]
mod tests {
    use super::{hash_zeros_in, overlaps, JobQueue};

    #[test]
    fn queueing_never_waits_and_keeps_the_order() {
        // A worker that takes nothing yet: a full channel must not block the caller.
        let (tx, rx) = std::sync::mpsc::sync_channel::<u32>(2);
        let mut q = JobQueue::new(tx);
        let t = std::time::Instant::now();
        for i in 0..10 {
            q.push(i);
        }
        assert!(t.elapsed() < std::time::Duration::from_millis(100));
        assert_eq!(q.backlog.len(), 8);
        // As the worker takes jobs, the backlog moves on, in order.
        assert_eq!(rx.try_recv().unwrap(), 0);
        q.flush();
        assert_eq!(q.backlog.len(), 7);
        let worker = std::thread::spawn(move || rx.iter().collect::<Vec<_>>());
        q.close();
        assert_eq!(worker.join().unwrap(), (1..10).collect::<Vec<_>>());
    }
    use proto::manifest::SegmentHasher;
    use sha2::{Digest, Sha256};

    /// A 5.5 MiB segment (piece 3 all zero) at offset 4096 of a file; its manifest segment.
    fn piece_fixture(dir: &std::path::Path) -> (std::path::PathBuf, proto::manifest::Segment) {
        const MIB: usize = 1 << 20;
        let mut seg: Vec<u8> = (0..MIB * 11 / 2).map(|i| (i % 253) as u8 | 1).collect();
        seg[3 * MIB..4 * MIB].fill(0);
        let mut h = SegmentHasher::new();
        h.update(&seg);
        let m = proto::image::layout("1", &[("rootfs".to_string(), h.finish())]).unwrap();
        let s = m.segments[0].clone();
        let mut file = vec![0u8; s.offset as usize];
        file.extend_from_slice(&seg);
        let path = dir.join("staging");
        std::fs::write(&path, &file).unwrap();
        (path, s)
    }

    fn verify(
        hasher: &mut super::Hasher,
        rx: &std::sync::mpsc::Receiver<super::WorkResult>,
        s: &proto::manifest::Segment,
        ticket: u64,
        streamed: bool,
    ) -> (bool, bool, Option<u64>) {
        hasher.send(super::HashJob::Verify {
            ticket,
            segment: 0,
            offset: s.offset,
            size: s.size,
            sha256: s.data_sha256,
            streamed,
            data: Some(std::sync::Arc::from(s.data_ranges.as_slice())),
            pieces: Some(s.hashed_pieces().collect()),
        });
        // As the server loop does: move the backlog on while waiting.
        let t = std::time::Instant::now();
        let got = loop {
            hasher.flush();
            match rx.recv_timeout(std::time::Duration::from_millis(20)) {
                Ok(r) => break r,
                Err(_) => assert!(t.elapsed().as_secs() < 20, "no verification result"),
            }
        };
        match got {
            super::WorkResult::Verified {
                ticket: t,
                ok,
                streamed,
                bad_piece,
            } => {
                assert_eq!(t, ticket);
                (ok, streamed, bad_piece)
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn pieces_verify_on_the_pool_and_the_first_bad_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, s) = piece_fixture(dir.path());
        assert_eq!(s.hashed_pieces().count(), 5, "pieces 0, 1, 2, 4, 5");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut hasher = super::Hasher::spawn(tx, 3).unwrap();
        let file = std::sync::Arc::new(std::fs::File::open(&path).unwrap());
        hasher.send(super::HashJob::SetFile {
            file: Some(file),
            readback: true,
        });
        // Streamed: written in odd steps, zeros in between; the pool checks what completes.
        hasher.send(super::HashJob::Begin {
            segment: 0,
            offset: s.offset,
            data: Some(std::sync::Arc::from(s.data_ranges.as_slice())),
            pieces: Some(s.hashed_pieces().collect()),
        });
        // Pieces 0..=2 written, piece 3 zeros; the tail (4, 5) is queued by the Verify.
        for step in [300_000u64, 1 << 20, 2 * (1 << 20) - 300_000] {
            hasher.send(super::HashJob::Written(step));
        }
        hasher.send(super::HashJob::Zeros(1 << 20));
        assert_eq!(verify(&mut hasher, &rx, &s, 7, true), (true, true, None));
        // Not streamed (e.g. after a resume): every piece is read back.
        assert_eq!(verify(&mut hasher, &rx, &s, 8, false), (true, false, None));
        // Flip a byte in piece 4 and one in piece 1 (as a bad disk would): piece 1 is named.
        let mut bytes = std::fs::read(&path).unwrap();
        for rel in [4 * (1 << 20) + 5, (1 << 20) + 77] {
            bytes[s.offset as usize + rel] ^= 0x10;
        }
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            verify(&mut hasher, &rx, &s, 9, false),
            (false, false, Some(1 << 20))
        );
        // A non-zero byte in the all-zero piece 3 is outside every hashed piece: flashd
        // never writes there (writes outside the data ranges must be zero), so the pieces
        // alone decide.
        bytes[s.offset as usize + 3 * (1 << 20) + 1] = 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(verify(&mut hasher, &rx, &s, 10, false).2, Some(1 << 20));
        // Without a file to read back from, nothing can be vouched for.
        hasher.send(super::HashJob::SetFile {
            file: None,
            readback: true,
        });
        assert_eq!(
            verify(&mut hasher, &rx, &s, 11, false),
            (false, false, Some(0))
        );
    }

    #[test]
    fn data_sha256_is_computed_from_data_and_zeros_without_hashing_zero_runs() {
        // data, a long zero run, data, zero tail
        let mut seg = vec![7u8; 4096];
        seg.extend_from_slice(&[0u8; 3 * 4096]);
        seg.extend_from_slice(&[9u8; 100]);
        seg.extend_from_slice(&[0u8; 4096]);
        let mut h = SegmentHasher::new();
        h.update(&seg);
        let d = h.finish();
        let mut sha = Sha256::new();
        // Fed as the hasher sees a stream: data chunk, zeros, data chunk (with its zero
        // padding inside the block), zeros; plus a zero run of 1 TiB outside the ranges.
        for (x, y) in overlaps(&d.data_ranges, 0, 4096) {
            sha.update(&seg[x as usize..y as usize]);
        }
        hash_zeros_in(&mut sha, Some(&d.data_ranges), 4096, 3 * 4096);
        for (x, y) in overlaps(&d.data_ranges, 4 * 4096, 4096) {
            sha.update(&seg[x as usize..y as usize]);
        }
        hash_zeros_in(&mut sha, Some(&d.data_ranges), 5 * 4096, 1 << 40);
        assert_eq!(<[u8; 32]>::from(sha.finalize()), d.data_sha256);
    }
}
