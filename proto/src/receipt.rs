//! The install receipt: one record of how an image reached a target.
//!
//! flashd writes it to `/state/flash/last-install.json`; `nx flash send` prints the same
//! record from its side of the link as its last line (and writes it with `--receipt FILE`).
//! `writer` says which side wrote it. Pure data (serde), shared so the two never drift.

use serde::{Deserialize, Serialize};

/// Version of the [`Receipt`] layout.
pub const RECEIPT_VERSION: u32 = 1;

/// Per segment: how its bytes reached the target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentReceipt {
    pub name: String,
    /// Content bytes of the segment.
    pub size: u64,
    /// Data bytes carried over the link (raw or compressed), counted once per chunk.
    pub sent_bytes: u64,
    /// Bytes the target already held (COPY from the installed image, or the whole image
    /// when it was unchanged).
    pub skipped_bytes: u64,
    /// Zero bytes never sent (zero runs of the manifest and all-zero chunks).
    pub zero_bytes: u64,
    /// Bytes saved by compression (decoded length − wire length).
    pub compressed_bytes: u64,
    /// Data bytes held from an earlier session whose breakdown this side did not see.
    pub resumed_bytes: u64,
}

/// The install receipt: flashd writes it to `flash/last-install.json`; `nx flash send`
/// prints the same record (from its side of the link) as its last line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub receipt_version: u32,
    /// Who wrote it: `flashd` or `nx`.
    pub writer: String,
    pub image_version: String,
    /// Manifest id (hex).
    pub image_id: String,
    /// Whole-image hash from the manifest (hex).
    pub image_sha256: String,
    pub image_size: u64,
    pub device: String,
    pub host: String,
    /// Where the image went (file path or `partition NAME (/dev/…)`).
    pub target: String,
    /// `installed`, `unchanged` or `failed`.
    pub state: String,
    /// Sessions that continued an earlier partial transfer.
    pub resume_count: u32,
    /// Sessions (HELLOs) it took.
    pub tries: u32,
    /// Encoded frame bytes received (flashd) or sent (nx), retransmissions included.
    pub wire_bytes: u64,
    pub segments: Vec<SegmentReceipt>,
}
