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
    /// Bytes saved by `PATCH` writes against the target's base image (decoded length − wire
    /// length): what the target already had, wherever it was.
    #[serde(default)]
    pub patched_bytes: u64,
    /// Bytes the target computed itself (`DERIVE`: the dm-verity hash tree), never sent.
    #[serde(default)]
    pub derived_bytes: u64,
    /// Data bytes held from an earlier session whose breakdown this side did not see.
    pub resumed_bytes: u64,
}

impl SegmentReceipt {
    /// The counters of `segment` before any byte moved: its name and size, and its zero runs
    /// (never sent) counted as zero bytes.
    pub fn planned(segment: &crate::manifest::Segment) -> Self {
        SegmentReceipt {
            name: segment.name.clone(),
            size: segment.size,
            zero_bytes: segment.size.saturating_sub(segment.data_bytes()),
            ..SegmentReceipt::default()
        }
    }

    /// [`SegmentReceipt::planned`] for every segment of `manifest`, in order (what the
    /// target's and the host's receipts start from).
    pub fn planned_all(manifest: &crate::manifest::Manifest) -> Vec<Self> {
        manifest.segments.iter().map(Self::planned).collect()
    }
}

/// Who wrote a receipt (serialised as `"flashd"` / `"nx"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Writer {
    /// The target's record (`/state/flash/last-install.json`).
    #[default]
    Flashd,
    /// The host's record (`nx flash send`).
    Nx,
}

/// How an install ended (serialised as `"installed"` / `"unchanged"` / `"failed"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstallState {
    /// Verified and installed.
    Installed,
    /// The identical image was already installed.
    Unchanged,
    /// The session failed (the transfer stays resumable).
    #[default]
    Failed,
}

impl InstallState {
    /// The JSON word.
    pub fn as_str(self) -> &'static str {
        match self {
            InstallState::Installed => "installed",
            InstallState::Unchanged => "unchanged",
            InstallState::Failed => "failed",
        }
    }
}

impl Writer {
    /// The JSON word.
    pub fn as_str(self) -> &'static str {
        match self {
            Writer::Flashd => "flashd",
            Writer::Nx => "nx",
        }
    }
}

impl std::fmt::Display for InstallState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for InstallState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<&str> for Writer {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The install receipt: flashd writes it to `flash/last-install.json`; `nx flash send`
/// prints the same record (from its side of the link) as its last line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub receipt_version: u32,
    /// Who wrote it: `flashd` or `nx`.
    pub writer: Writer,
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
    pub state: InstallState,
    /// Sessions that continued an earlier partial transfer.
    pub resume_count: u32,
    /// Sessions (HELLOs) it took.
    pub tries: u32,
    /// Encoded frame bytes received (flashd) or sent (nx), retransmissions included.
    pub wire_bytes: u64,
    pub segments: Vec<SegmentReceipt>,
}

#[cfg(test)]
mod typed_field_tests {
    use super::*;

    #[test]
    fn writer_and_state_keep_their_json_words() {
        let r = Receipt {
            writer: Writer::Nx,
            state: InstallState::Unchanged,
            ..Receipt::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["writer"], "nx");
        assert_eq!(v["state"], "unchanged");
        let back: Receipt = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        for s in [
            InstallState::Installed,
            InstallState::Unchanged,
            InstallState::Failed,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert!(s == s.as_str());
        }
        assert_eq!(serde_json::to_value(Writer::Flashd).unwrap(), "flashd");
        assert!(serde_json::from_str::<InstallState>("\"weird\"").is_err());
    }
}
