//! Crash states of one recording: the random cuts, and a fingerprint of the disks each one
//! rebuilds, so byte-identical states are checked (and booted) once.
//!
//! The fingerprint does not rebuild the disks: every byte outside the ranges the recording
//! touched is the base image's in every state. The touched ranges are split at every
//! operation's boundaries into elementary intervals; a state's content of an interval is the
//! last surviving operation covering it, or the base. The fingerprint is the SHA-256 over the
//! SHA-256 of each interval's content (the bytes themselves, so an operation that rewrites what
//! was there already, or zeroes zeros, does not make a state distinct). Equal fingerprints:
//! byte-identical disks.

use crate::crashsim::{surviving, Op};
use anyhow::Context;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Deterministic PRNG (splitmix64).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// One crash state: a cut after `cut` operations and the operations that survive it.
#[derive(Debug, Clone)]
pub struct State {
    /// Its number in the run (the order the seed generates them).
    pub index: usize,
    /// Operations of the log before the power went.
    pub cut: usize,
    /// Indices of the operations whose data reached the disks.
    pub apply: Vec<usize>,
}

/// `n` crash states with cuts in `window` (`from < cut <= to`): on write-through disks
/// (`write_through[disk]`, the NOR flash of the variable store) every write before the cut
/// survives; on the others what `surviving` keeps, each unflushed write kept with
/// probability 1/2.
pub fn generate(
    ops: &[Op],
    window: (usize, usize),
    write_through: &[bool],
    n: usize,
    seed: u64,
) -> Vec<State> {
    let mut rng = Rng(seed);
    let (from, to) = (window.0.min(ops.len()), window.1.min(ops.len()));
    let span = to.saturating_sub(from).max(1) as u64;
    (0..n)
        .map(|index| {
            let cut = (from + 1 + (rng.next() % span) as usize).min(ops.len());
            let mut k = Rng(rng.next());
            let apply = surviving(ops, cut, |i| {
                let through = ops
                    .get(i)
                    .and_then(|o| write_through.get(o.disk()))
                    .copied()
                    .unwrap_or(false);
                // Draw for every write so the choice of one does not shift the others.
                let coin = k.next() & 1 == 1;
                through || coin
            });
            State { index, cut, apply }
        })
        .collect()
}

type Digest32 = [u8; 32];

/// The interval map of a recording and the content hash of every (operation, interval).
pub struct Fingerprinter {
    /// Per interval: the base image's content hash.
    base: Vec<Digest32>,
    /// Per operation: its first interval and the content hash of each interval it covers
    /// (empty for flushes).
    covers: Vec<(usize, Vec<Digest32>)>,
}

fn sha(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// SHA-256 of `len` zero bytes (cached per length).
fn zeros_hash(cache: &mut HashMap<u64, Digest32>, len: u64) -> Digest32 {
    *cache.entry(len).or_insert_with(|| {
        let block = vec![0u8; 1 << 20];
        let mut h = Sha256::new();
        let mut left = len;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            h.update(&block[..n]);
            left -= n as u64;
        }
        h.finalize().into()
    })
}

fn range(op: &Op) -> Option<(usize, u64, u64)> {
    match op {
        Op::Write {
            disk, offset, data, ..
        } => Some((*disk, *offset, *offset + data.len() as u64)),
        Op::Zero { disk, offset, len } => Some((*disk, *offset, *offset + len)),
        Op::Flush { .. } => None,
    }
}

impl Fingerprinter {
    /// Index `ops` against the base images (`bases[disk]`).
    pub fn new(ops: &[Op], bases: &[&Path]) -> anyhow::Result<Fingerprinter> {
        // Boundaries per disk.
        let disks = bases.len();
        let mut bounds: Vec<Vec<u64>> = vec![Vec::new(); disks];
        for op in ops {
            if let Some((d, s, e)) = range(op) {
                anyhow::ensure!(d < disks, "operation on disk {d} of {disks}");
                bounds[d].push(s);
                bounds[d].push(e);
            }
        }
        for b in &mut bounds {
            b.sort_unstable();
            b.dedup();
        }
        // Global interval numbering: disk by disk, [b[k], b[k+1]).
        let mut first = Vec::with_capacity(disks);
        let mut total = 0usize;
        for b in &bounds {
            first.push(total);
            total += b.len().saturating_sub(1);
        }
        let locate = |d: usize, at: u64| -> usize {
            first[d] + bounds[d].binary_search(&at).unwrap_or_else(|i| i)
        };
        // Which intervals some operation covers (only those are read from the base).
        let mut covered = vec![false; total];
        for op in ops {
            if let Some((d, s, e)) = range(op) {
                for c in covered.iter_mut().take(locate(d, e)).skip(locate(d, s)) {
                    *c = true;
                }
            }
        }
        let mut zc = HashMap::new();
        let mut base = vec![[0u8; 32]; total];
        for (d, b) in bounds.iter().enumerate() {
            let f = std::fs::File::open(bases[d])
                .with_context(|| format!("open {}", bases[d].display()))?;
            let mut buf = Vec::new();
            for k in 0..b.len().saturating_sub(1) {
                let g = first[d] + k;
                if !covered[g] {
                    continue;
                }
                // The recorder refuses writes past the end: every interval is inside the file.
                let (s, e) = (b[k], b[k + 1]);
                let mut h = Sha256::new();
                let mut at = s;
                while at < e {
                    let n = (e - at).min(8 << 20);
                    buf.resize(n as usize, 0);
                    f.read_exact_at(&mut buf, at)
                        .with_context(|| format!("read {}", bases[d].display()))?;
                    h.update(&buf);
                    at += n;
                }
                base[g] = h.finalize().into();
            }
        }
        let mut covers = Vec::with_capacity(ops.len());
        for op in ops {
            let Some((d, s, e)) = range(op) else {
                covers.push((0, Vec::new()));
                continue;
            };
            let (i0, i1) = (locate(d, s), locate(d, e));
            let mut hs = Vec::with_capacity(i1 - i0);
            for k in i0..i1 {
                let lo = bounds[d][k - first[d]];
                let hi = bounds[d][k - first[d] + 1];
                hs.push(match op {
                    Op::Write { data, .. } => sha(&data[(lo - s) as usize..(hi - s) as usize]),
                    _ => zeros_hash(&mut zc, hi - lo),
                });
            }
            covers.push((i0, hs));
        }
        Ok(Fingerprinter { base, covers })
    }

    /// The fingerprint of the disks a state rebuilds.
    pub fn of(&self, apply: &[usize]) -> Digest32 {
        let mut last: Vec<Option<(usize, usize)>> = vec![None; self.base.len()];
        for &i in apply {
            if let Some((i0, hs)) = self.covers.get(i) {
                for k in 0..hs.len() {
                    last[i0 + k] = Some((i, k));
                }
            }
        }
        let mut h = Sha256::new();
        for (g, l) in last.iter().enumerate() {
            match l {
                Some((i, k)) => h.update(self.covers[*i].1[*k]),
                None => h.update(self.base[g]),
            }
        }
        h.finalize().into()
    }
}

/// States grouped by fingerprint, in the order each group first appeared: `(fingerprint,
/// indices into states)`.
pub fn distinct(fp: &Fingerprinter, states: &[State]) -> Vec<(Digest32, Vec<usize>)> {
    let mut order: Vec<(Digest32, Vec<usize>)> = Vec::new();
    let mut at: HashMap<Digest32, usize> = HashMap::new();
    for (i, s) in states.iter().enumerate() {
        let f = fp.of(&s.apply);
        match at.get(&f) {
            Some(&k) => order[k].1.push(i),
            None => {
                at.insert(f, order.len());
                order.push((f, vec![i]));
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crashsim::crash_state;

    fn w(disk: usize, offset: u64, data: &[u8]) -> Op {
        Op::Write {
            disk,
            offset,
            data: data.to_vec(),
            fua: false,
        }
    }

    /// Equal fingerprints exactly when the rebuilt disks are byte-identical: checked against
    /// `crash_state` on every subset of a small log with overlaps, a rewrite of the base's own
    /// bytes and a zeroing.
    #[test]
    fn fingerprints_match_rebuilt_disks() {
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.img");
        let mut bytes = vec![0u8; 8192];
        bytes[100..200].fill(7);
        std::fs::write(&base, &bytes).unwrap();
        let ops = vec![
            w(0, 0, &[1; 512]),
            w(0, 256, &[2; 512]),
            w(0, 100, &[7; 100]), // what the base holds already
            Op::Zero {
                disk: 0,
                offset: 4096,
                len: 1024,
            }, // zeros over zeros
            w(0, 1024, &[3; 10]),
        ];
        let fp = Fingerprinter::new(&ops, &[&base]).unwrap();
        let out = d.path().join("out.img");
        let mut by_fp: HashMap<Digest32, Vec<u8>> = HashMap::new();
        for mask in 0u32..32 {
            let apply: Vec<usize> = (0..5).filter(|i| mask & (1 << i) != 0).collect();
            crash_state(&[&base], &ops, &apply, &[&out]).unwrap();
            let disk = std::fs::read(&out).unwrap();
            let f = fp.of(&apply);
            if let Some(prev) = by_fp.get(&f) {
                assert_eq!(prev, &disk, "same fingerprint, different disks ({apply:?})");
            }
            by_fp.insert(f, disk);
        }
        let distinct_disks: std::collections::HashSet<&Vec<u8>> = by_fp.values().collect();
        assert_eq!(
            by_fp.len(),
            distinct_disks.len(),
            "byte-identical disks got different fingerprints"
        );
        // Ops 2 and 3 change nothing, op 1 hides part of op 0: fewer than 32 disks.
        assert!(by_fp.len() < 32 && by_fp.len() >= 6, "{}", by_fp.len());
    }

    #[test]
    fn write_through_disks_keep_every_write_before_the_cut() {
        let ops = vec![w(1, 0, &[1; 4]), w(0, 0, &[2; 4]), w(1, 4, &[3; 4])];
        for s in generate(&ops, (0, 3), &[false, true], 50, 9) {
            let vars: Vec<usize> = (0..s.cut).filter(|&i| ops[i].disk() == 1).collect();
            for v in vars {
                assert!(s.apply.contains(&v), "{s:?}");
            }
            assert!(s.cut >= 1 && s.cut <= 3);
        }
    }
}
