//! A fault-injecting proxy between `nx` and flashd: drops frames, flips bits, cuts
//! connections at random points.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bytes::BytesMut;
use proto::frame::{FrameDecoder, FrameError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// A small deterministic PRNG (xorshift64*).
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the proxy does to the traffic.
#[derive(Clone, Default)]
pub struct Faults {
    /// Drop every Nth frame (counted per direction, over all connections).
    pub drop_every: Option<u64>,
    /// Flip one random bit in about one of N reads (either direction).
    pub flip_one_in: Option<u64>,
    /// Cut this many connections, each after a random 1..=`cut_max` bytes host→target.
    pub cuts: u64,
    pub cut_max: u64,
    pub seed: u64,
}

#[derive(Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub dropped: AtomicU64,
    pub flipped: AtomicU64,
    pub cuts: AtomicU64,
}

pub struct Proxy {
    pub path: PathBuf,
    pub stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    faults: Faults,
    rng: Mutex<Rng>,
    frames_up: AtomicU64,
    frames_down: AtomicU64,
}

/// Listen on `listen`, forward every connection to the unix socket `upstream`.
pub async fn start_proxy(listen: &Path, upstream: &Path, faults: Faults) -> Proxy {
    let _ = std::fs::remove_file(listen);
    let l = UnixListener::bind(listen).unwrap();
    let stats = Arc::new(ProxyStats::default());
    let shared = Arc::new(Shared {
        rng: Mutex::new(Rng::new(faults.seed)),
        faults,
        frames_up: AtomicU64::new(0),
        frames_down: AtomicU64::new(0),
    });
    let up = upstream.to_path_buf();
    let st = stats.clone();
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = l.accept().await {
            st.connections.fetch_add(1, Ordering::Relaxed);
            let Ok(server) = UnixStream::connect(&up).await else {
                continue; // flashd restarting: drop the client, nx retries
            };
            let cut_at = if st.cuts.load(Ordering::Relaxed) < shared.faults.cuts {
                Some(1 + shared.rng.lock().unwrap().below(shared.faults.cut_max))
            } else {
                None
            };
            tokio::spawn(pump_pair(
                client,
                server,
                shared.clone(),
                st.clone(),
                cut_at,
            ));
        }
    });
    Proxy {
        path: listen.to_path_buf(),
        stats,
        task,
    }
}

async fn pump_pair(
    client: UnixStream,
    server: UnixStream,
    sh: Arc<Shared>,
    st: Arc<ProxyStats>,
    cut_at: Option<u64>,
) {
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pump(cr, sw, sh.clone(), st.clone(), true, cut_at);
    let down = pump(sr, cw, sh, st.clone(), false, None);
    // When either direction ends (EOF, error or cut), both sides are closed.
    tokio::select! {
        cut = up => { if cut { st.cuts.fetch_add(1, Ordering::Relaxed); } }
        _ = down => {}
    }
}

/// Returns true when it cut the connection.
async fn pump(
    mut r: tokio::net::unix::OwnedReadHalf,
    mut w: tokio::net::unix::OwnedWriteHalf,
    sh: Arc<Shared>,
    st: Arc<ProxyStats>,
    upward: bool,
    cut_at: Option<u64>,
) -> bool {
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending = BytesMut::new();
    let mut dec = FrameDecoder::new();
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        let mut chunk = buf[..n].to_vec();
        if let Some(at) = cut_at {
            if total + n as u64 >= at {
                let keep = (at - total) as usize;
                let _ = w.write_all(&chunk[..keep.min(chunk.len())]).await;
                let _ = w.shutdown().await;
                return true;
            }
        }
        total += n as u64;
        if let Some(every) = sh.faults.drop_every {
            pending.extend_from_slice(&chunk);
            chunk.clear();
            loop {
                match dec.decode(&mut pending) {
                    Ok(Some(f)) => {
                        let c = if upward {
                            &sh.frames_up
                        } else {
                            &sh.frames_down
                        };
                        let k = c.fetch_add(1, Ordering::Relaxed) + 1;
                        if k % every == 0 {
                            st.dropped.fetch_add(1, Ordering::Relaxed);
                        } else {
                            chunk.extend_from_slice(&f.to_bytes());
                        }
                    }
                    Ok(None) => break,
                    Err(FrameError::Skipped { .. }) => continue,
                    Err(_) => break,
                }
            }
        }
        if let Some(one_in) = sh.faults.flip_one_in {
            let mut rng = sh.rng.lock().unwrap();
            if !chunk.is_empty() && rng.below(one_in) == 0 {
                let bit = rng.below(chunk.len() as u64 * 8);
                chunk[(bit / 8) as usize] ^= 1 << (bit % 8);
                st.flipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if w.write_all(&chunk).await.is_err() {
            return false;
        }
    }
}
