//! The chunk plan (shared by sender and receiver) and the skip index.

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::msg::{chunk_hash, valid_chunk_size, ChunkHash, IndexEntry, MAX_INDEX_ENTRIES};

use super::hexser;

/// One planned chunk: a piece of a data range, never crossing a multiple of the
/// chunk size (relative to the segment start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// Sequence number, 1-based: the `seq` of its WRITE frame.
    pub seq: u32,
    /// Index of the segment in the manifest's table.
    pub segment: usize,
    /// Offset relative to the segment start.
    pub rel_offset: u64,
    /// Absolute offset in the image file.
    pub offset: u64,
    /// Length in bytes (1..=chunk size).
    pub len: u32,
}

#[derive(Debug, Clone)]
struct Piece {
    segment: usize,
    seg_offset: u64,
    start: u64,
    end: u64,
    first_index: u32,
    /// Data bytes of all earlier pieces.
    bytes_before: u64,
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("chunk size {0} is not a power of two in 4096..=1048576")]
    ChunkSize(u32),
    #[error("the image needs more than {} chunks at chunk size {chunk_size}; use a larger chunk size", u32::MAX - 1)]
    TooManyChunks { chunk_size: u32 },
}

/// The ordered list of chunks that carry an image's data: every data range of every
/// segment (in table order), split at multiples of the chunk size relative to the
/// segment start. Zero runs are not in the plan. A pure function of the manifest and
/// the chunk size, so both sides compute the same plan; chunk `i` is sent with seq
/// `i + 1`. Memory is proportional to the number of data ranges, not of chunks.
#[derive(Debug, Clone)]
pub struct Plan {
    chunk_size: u32,
    pieces: Vec<Piece>,
    /// Per segment: (first chunk index, chunk count).
    segs: Vec<(u32, u32)>,
    total: u32,
    data_bytes: u64,
}

impl Plan {
    /// Builds the plan.
    pub fn new(manifest: &Manifest, chunk_size: u32) -> Result<Plan, PlanError> {
        if !valid_chunk_size(chunk_size) {
            return Err(PlanError::ChunkSize(chunk_size));
        }
        let c = u64::from(chunk_size);
        let mut pieces = Vec::new();
        let mut segs = Vec::with_capacity(manifest.segments.len());
        let mut next: u64 = 0;
        let mut data_bytes = 0u64;
        for (si, seg) in manifest.segments.iter().enumerate() {
            let first = next;
            for r in &seg.data_ranges {
                let start = r.offset;
                let end = r.end().min(seg.size);
                if end <= start {
                    continue;
                }
                let count = (end - 1) / c - start / c + 1;
                pieces.push(Piece {
                    segment: si,
                    seg_offset: seg.offset,
                    start,
                    end,
                    first_index: u32::try_from(next)
                        .map_err(|_| PlanError::TooManyChunks { chunk_size })?,
                    bytes_before: data_bytes,
                });
                next += count;
                data_bytes += end - start;
            }
            if next >= u64::from(u32::MAX) {
                return Err(PlanError::TooManyChunks { chunk_size });
            }
            segs.push((first as u32, (next - first) as u32));
        }
        Ok(Plan {
            chunk_size,
            pieces,
            segs,
            total: next as u32,
            data_bytes,
        })
    }

    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }
    /// Number of chunks (= the last seq).
    pub fn total(&self) -> u32 {
        self.total
    }
    /// Bytes of data the plan carries (sum of all data ranges).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }
    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.segs.len()
    }

    /// The chunk with sequence number `seq` (1..=total).
    pub fn chunk(&self, seq: u32) -> Option<Chunk> {
        if seq == 0 || seq > self.total {
            return None;
        }
        let index = seq - 1;
        let pi = self
            .pieces
            .partition_point(|p| p.first_index <= index)
            .checked_sub(1)?;
        let p = self.pieces.get(pi)?;
        let c = u64::from(self.chunk_size);
        let k = u64::from(index - p.first_index);
        let start = if k == 0 {
            p.start
        } else {
            (p.start / c + k) * c
        };
        let end = ((p.start / c + k + 1) * c).min(p.end);
        if start >= end {
            return None;
        }
        Some(Chunk {
            seq,
            segment: p.segment,
            rel_offset: start,
            offset: p.seg_offset + start,
            len: (end - start) as u32,
        })
    }

    /// Iterates the chunks with seq in `from..=total`.
    pub fn chunks_from(&self, from: u32) -> impl Iterator<Item = Chunk> + '_ {
        (from.max(1)..=self.total).filter_map(move |s| self.chunk(s))
    }

    /// The seq range of segment `segment`: chunks `first+1 ..= first+count`.
    /// A segment with no data has count 0.
    pub fn segment_chunks(&self, segment: usize) -> Option<(u32, u32)> {
        self.segs.get(segment).copied()
    }

    /// The index (seq − 1) of the first chunk of `segment` that ends after `rel_offset`
    /// (relative to the segment): where to resume so that the byte at `rel_offset` and
    /// everything after it is sent again. `None` past the segment's last chunk.
    pub fn chunk_index_at(&self, segment: usize, rel_offset: u64) -> Option<u32> {
        let (first, count) = self.segment_chunks(segment)?;
        // Chunks are in offset order: binary search on their ends.
        let (mut lo, mut hi) = (first, first.checked_add(count)?);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let c = self.chunk(mid + 1)?;
            if c.rel_offset + u64::from(c.len) > rel_offset {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        (lo < first + count).then_some(lo)
    }

    /// Whether every chunk of `segment` has seq ≤ `done`.
    pub fn segment_complete(&self, segment: usize, done: u32) -> bool {
        self.segs
            .get(segment)
            .is_some_and(|(first, count)| u64::from(*first) + u64::from(*count) <= u64::from(done))
    }

    /// Data bytes in chunks with seq ≤ `done`.
    pub fn bytes_done(&self, done: u32) -> u64 {
        let done = done.min(self.total);
        let Some(c) = self.chunk(done) else {
            return 0;
        };
        let index = done - 1;
        let pi = self.pieces.partition_point(|p| p.first_index <= index);
        match pi.checked_sub(1).and_then(|i| self.pieces.get(i)) {
            Some(p) => p.bytes_before + (c.rel_offset + u64::from(c.len) - p.start),
            None => 0,
        }
    }
}

/// The target's index of the installed image: hashes of its planned chunks. Sent
/// (as [`IndexEntry`] values) in the HELLO_REPLY so the host can turn a chunk whose
/// content the target already holds into a `COPY` write.
///
/// The index is an optimisation only: a stale or wrong entry cannot corrupt an
/// install, because every segment of the staging file is verified against the new
/// manifest before anything is installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipIndex {
    /// Manifest id of the installed image the entries describe.
    #[serde(with = "hexser::arr32")]
    pub image_id: [u8; 32],
    /// Chunk size the entries were planned with.
    pub chunk_size: u32,
    /// At most [`MAX_INDEX_ENTRIES`] entries.
    pub entries: Vec<SkipEntry>,
}

/// One index entry (serde form of [`IndexEntry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipEntry {
    pub offset: u64,
    pub len: u32,
    #[serde(with = "hexser::arr16")]
    pub hash: ChunkHash,
}

impl From<SkipEntry> for IndexEntry {
    fn from(e: SkipEntry) -> IndexEntry {
        IndexEntry {
            offset: e.offset,
            len: e.len,
            hash: e.hash,
        }
    }
}

impl SkipIndex {
    /// Builds the index of an installed image by hashing each chunk of its plan;
    /// `read(offset, len)` returns the bytes at an absolute offset of the installed
    /// image. Stops at [`MAX_INDEX_ENTRIES`] entries.
    pub fn build<E>(
        manifest: &Manifest,
        plan: &Plan,
        mut read: impl FnMut(u64, u32) -> Result<Vec<u8>, E>,
    ) -> Result<SkipIndex, E> {
        let mut entries = Vec::new();
        for c in plan.chunks_from(1).take(MAX_INDEX_ENTRIES) {
            let data = read(c.offset, c.len)?;
            entries.push(SkipEntry {
                offset: c.offset,
                len: c.len,
                hash: chunk_hash(&data),
            });
        }
        Ok(SkipIndex {
            image_id: manifest.id(),
            chunk_size: plan.chunk_size(),
            entries,
        })
    }

    /// The entries in wire form, bounded to [`MAX_INDEX_ENTRIES`].
    pub fn wire_entries(&self) -> Vec<IndexEntry> {
        self.entries
            .iter()
            .take(MAX_INDEX_ENTRIES)
            .map(|e| IndexEntry::from(*e))
            .collect()
    }
}
