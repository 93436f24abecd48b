//! Background work of the server, so receiving never waits for hashing or fsync:
//!
//! * the **hasher** thread hashes each segment while it streams in (the data of every WRITE,
//!   zero runs filled in), so a segment is verified the moment its last chunk lands; it falls
//!   back to reading the staging file back when it did not see the whole segment (resume,
//!   rewind, segments without data);
//! * the **durability** thread runs fsyncs, journal writes and the install, strictly in the
//!   order they were queued (a journal never claims data that was not synced first).
//!
//! Both queues are bounded, so memory stays bounded by `HASH_QUEUE × chunk` whatever the
//! image size.

use crate::records::{self, Counters};
use crate::store::{self, Staging, StateDir};
use bytes::Bytes;
use proto::session::Journal;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Jobs queued to the hasher before the receiving thread waits.
pub const HASH_QUEUE: usize = 4;
/// Jobs queued to the durability thread before the receiving thread waits.
pub const DURABLE_QUEUE: usize = 16;

static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];

/// Results reported back to the server loop.
#[derive(Debug)]
pub enum WorkResult {
    Verified {
        ticket: u64,
        ok: bool,
        streamed: bool,
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
    /// Start hashing the content of a segment from its first byte.
    Begin { segment: usize },
    /// The next bytes of the current segment, in order.
    Data(Bytes),
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
    },
    /// The staging file to read back from (or none).
    SetFile(Option<Arc<File>>),
}

/// Handle of the hasher thread.
pub struct Hasher {
    tx: Option<SyncSender<HashJob>>,
    handle: Option<JoinHandle<()>>,
}

impl Hasher {
    pub fn spawn(results: Sender<WorkResult>) -> std::io::Result<Hasher> {
        let (tx, rx) = mpsc::sync_channel(HASH_QUEUE);
        let handle = std::thread::Builder::new()
            .name("flashd-hash".into())
            .spawn(move || hasher_loop(rx, results))?;
        Ok(Hasher {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    /// Queue a job (waits while the queue is full: that is the backpressure).
    pub fn send(&self, job: HashJob) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

struct Current {
    segment: usize,
    pos: u64,
    sha: Sha256,
}

fn hasher_loop(rx: Receiver<HashJob>, results: Sender<WorkResult>) {
    let mut cur: Option<Current> = None;
    let mut file: Option<Arc<File>> = None;
    while let Ok(job) = rx.recv() {
        match job {
            HashJob::Begin { segment } => {
                cur = Some(Current {
                    segment,
                    pos: 0,
                    sha: Sha256::new(),
                })
            }
            HashJob::Data(b) => {
                if let Some(c) = &mut cur {
                    c.sha.update(&b);
                    c.pos += b.len() as u64;
                }
            }
            HashJob::Zeros(n) => {
                if let Some(c) = &mut cur {
                    hash_zeros(&mut c.sha, n);
                    c.pos += n;
                }
            }
            HashJob::SetFile(f) => file = f,
            HashJob::Verify {
                ticket,
                segment,
                offset,
                size,
                sha256,
                streamed,
            } => {
                let taken = cur.take();
                let digest: Option<[u8; 32]> = match taken {
                    Some(mut c) if streamed && c.segment == segment && c.pos <= size => {
                        hash_zeros(&mut c.sha, size - c.pos);
                        Some(c.sha.finalize().into())
                    }
                    other => {
                        // Keep a stream of another segment (should not happen, but harmless).
                        if let Some(c) = other {
                            if c.segment != segment {
                                cur = Some(c);
                            }
                        }
                        file.as_ref().and_then(|f| read_back(f, offset, size))
                    }
                };
                let ok = digest == Some(sha256);
                let _ = results.send(WorkResult::Verified {
                    ticket,
                    ok,
                    streamed: streamed && digest.is_some(),
                });
            }
        }
    }
}

fn hash_zeros(sha: &mut Sha256, mut n: u64) {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        sha.update(&ZEROS[..k]);
        n -= k as u64;
    }
}

fn read_back(f: &File, offset: u64, size: u64) -> Option<[u8; 32]> {
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; (1usize << 20).min(size.max(1) as usize)];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset + done).ok()?;
        sha.update(&buf[..n]);
        done += n as u64;
    }
    Some(sha.finalize().into())
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
    },
    /// Write a small record (install record, receipt) — ordered after the install.
    Run(RecordJob),
}

/// Handle of the durability thread.
pub struct Durable {
    tx: Option<SyncSender<DurableJob>>,
    handle: Option<JoinHandle<()>>,
}

impl Durable {
    pub fn spawn(state: StateDir, results: Sender<WorkResult>) -> std::io::Result<Durable> {
        let (tx, rx) = mpsc::sync_channel(DURABLE_QUEUE);
        let handle = std::thread::Builder::new()
            .name("flashd-sync".into())
            .spawn(move || durable_loop(state, rx, results))?;
        Ok(Durable {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    pub fn send(&self, job: DurableJob) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(job);
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        self.tx = None;
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
            } => {
                let r = run_install(
                    &staging,
                    &image_id,
                    total_size,
                    target,
                    target_error,
                    unchanged,
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
) -> Result<String, String> {
    let Some(target) = target else {
        return Err(target_error.unwrap_or_else(|| "no install target".into()));
    };
    if unchanged {
        // The identical image is installed: confirm the target is still there.
        let len = std::fs::metadata(target.path())
            .map(|m| m.len())
            .map_err(|e| format!("install target {}: {e}", target.path().display()))?;
        if matches!(target, store::InstallTarget::File(_)) && len != total_size {
            return Err(format!(
                "install target {} is {len} bytes, the installed image is {total_size}: flash again with --no-skip",
                target.path().display()
            ));
        }
        return Ok(format!("{} unchanged", target.path().display()));
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
