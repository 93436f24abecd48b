//! A fault-injecting relay for `cargo xtask bench link`: listens on a unix socket, connects
//! every accepted client to a target unix socket and copies both directions; in each
//! direction every byte, with probability `p`, gets one random bit flipped (a noisy line).
//! Deterministic: a seeded xorshift64 per connection and direction. The gaps between flipped
//! bytes are drawn geometrically, so a clean stretch costs no random numbers per byte.

use anyhow::Context;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Bytes per read/write of a copying thread.
const BUF: usize = 64 * 1024;

/// xorshift64: deterministic, no crate.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        // Never zero (xorshift's fixed point).
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}

/// Flips one random bit of a byte with probability `p` per byte.
struct Flipper {
    rng: XorShift,
    p: f64,
    /// Bytes to pass clean before the next flipped one (`u64::MAX`: never).
    gap: u64,
}

impl Flipper {
    fn new(p: f64, seed: u64) -> Flipper {
        let mut f = Flipper {
            rng: XorShift::new(seed),
            p,
            gap: u64::MAX,
        };
        f.gap = f.draw_gap();
        f
    }

    /// Geometric(p) number of clean bytes before the next flip.
    fn draw_gap(&mut self) -> u64 {
        if self.p <= 0.0 {
            return u64::MAX;
        }
        if self.p >= 1.0 {
            return 0;
        }
        let g = (self.rng.unit().ln() / (1.0 - self.p).ln()).floor();
        if g >= u64::MAX as f64 {
            u64::MAX
        } else {
            g as u64
        }
    }

    /// Corrupt `buf` in place; returns the number of bytes flipped.
    fn apply(&mut self, buf: &mut [u8]) -> u64 {
        let mut flips = 0;
        let mut i = 0usize;
        loop {
            let left = (buf.len() - i) as u64;
            if self.gap >= left {
                if self.gap != u64::MAX {
                    self.gap -= left;
                }
                return flips;
            }
            i += self.gap as usize;
            if let Some(b) = buf.get_mut(i) {
                *b ^= 1 << (self.rng.next() % 8);
                flips += 1;
            }
            i += 1;
            self.gap = self.draw_gap();
        }
    }
}

/// A running relay; stops (and removes its socket) when dropped.
pub struct Relay {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    flips: Arc<AtomicU64>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listen on `listen`, relay each client to `target`, flipping bits with probability `p`
    /// per byte in both directions.
    pub fn start(listen: &Path, target: &Path, p: f64, seed: u64) -> anyhow::Result<Relay> {
        let _ = std::fs::remove_file(listen);
        let listener = UnixListener::bind(listen)
            .with_context(|| format!("relay: bind {}", listen.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flips = Arc::new(AtomicU64::new(0));
        let (stop2, flips2, target) = (stop.clone(), flips.clone(), target.to_path_buf());
        let accept = std::thread::spawn(move || {
            let mut conn = 0u64;
            for client in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = UnixStream::connect(&target) else {
                    eprintln!("relay: cannot connect to {}", target.display());
                    continue;
                };
                conn += 1;
                let base = seed ^ conn.wrapping_mul(0x1000_0000_01B3);
                for (i, (from, to)) in [(&client, &server), (&server, &client)]
                    .into_iter()
                    .enumerate()
                {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let flipper = Flipper::new(p, base.wrapping_add(i as u64 * 7919));
                    let flips = flips2.clone();
                    std::thread::spawn(move || pump(from, to, flipper, &flips));
                }
            }
        });
        Ok(Relay {
            path: listen.to_path_buf(),
            stop,
            flips,
            accept: Some(accept),
        })
    }

    /// Bytes flipped so far (all connections, both directions).
    pub fn flips(&self) -> u64 {
        self.flips.load(Ordering::SeqCst)
    }
}

/// Copy `from` → `to` through the flipper until EOF or an error, then half-close `to`.
fn pump(mut from: UnixStream, mut to: UnixStream, mut f: Flipper, flips: &AtomicU64) {
    let mut buf = vec![0u8; BUF];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let Some(chunk) = buf.get_mut(..n) else { break };
        flips.fetch_add(f.apply(chunk), Ordering::Relaxed);
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_rate_matches_p_and_each_flip_is_one_bit() {
        let n = 4_000_000usize;
        let mut f = Flipper::new(1e-3, 42);
        let mut buf = vec![0u8; n];
        let mut flipped = 0;
        for c in buf.chunks_mut(1000) {
            flipped += f.apply(c);
        }
        let ones: u64 = buf.iter().map(|b| u64::from(b.count_ones())).sum();
        let changed = buf.iter().filter(|b| **b != 0).count() as u64;
        assert_eq!(changed, flipped);
        assert_eq!(
            ones, flipped,
            "each flipped byte has exactly one bit flipped"
        );
        // expected 4000, sd ≈ 63
        assert!((3700..=4300).contains(&flipped), "{flipped}");
    }

    #[test]
    fn clean_line_is_untouched_and_deterministic() {
        let mut buf = vec![0xA5u8; 100_000];
        assert_eq!(Flipper::new(0.0, 1).apply(&mut buf), 0);
        assert!(buf.iter().all(|b| *b == 0xA5));
        let (mut a, mut b) = (vec![0u8; 100_000], vec![0u8; 100_000]);
        Flipper::new(1e-3, 9).apply(&mut a);
        Flipper::new(1e-3, 9).apply(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn relay_copies_both_ways_and_flips() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.sock");
        let listen = dir.path().join("r.sock");
        let l = UnixListener::bind(&target).unwrap();
        let echo = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut v = Vec::new();
            s.read_to_end(&mut v).unwrap();
            s.write_all(&v).unwrap();
            v
        });
        let relay = Relay::start(&listen, &target, 1e-2, 5).unwrap();
        let mut c = UnixStream::connect(&listen).unwrap();
        let sent = vec![0u8; 200_000];
        c.write_all(&sent).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        let got = echo.join().unwrap();
        assert_eq!(got.len(), sent.len());
        assert_eq!(back.len(), sent.len());
        let one_way = got.iter().filter(|b| **b != 0).count();
        assert!(one_way > 1000, "{one_way}");
        assert_ne!(back, got, "the way back is noisy too");
        assert!(relay.flips() >= one_way as u64);
    }
}
