//! Records flashd keeps beside the staging file, and the install receipt.
//!
//! * `flash/journal.json` — the session [`Journal`] (durable progress: resume point).
//! * `flash/counters.json` — [`Counters`]: what arrived how, per segment, for the receipt.
//! * `flash/installed.json` — [`InstalledImage`] without its skip index: what is installed.
//! * `flash/index.json` — the [`SkipIndex`] of the installed image (chunk hashes).
//! * `flash/last-install.json` — the [`Receipt`] of the last install.
//!
//! The receipt schema is shared with `nx flash send --receipt` (same field names and meaning).

use crate::store::{self, StateDir, StoreError};
use proto::manifest::Manifest;
use proto::receipt::{InstallState, Writer};
use proto::session::{InstalledImage, Journal, SkipIndex};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Largest index file read back (a full index of 65536 entries is ~6 MiB of JSON).
pub const MAX_INDEX_LEN: u64 = 8 << 20;

pub use proto::receipt::{Receipt, SegmentReceipt, RECEIPT_VERSION};

/// Receipt counters of the transfer in staging; persisted beside the journal so a restarted
/// flashd still writes an exact receipt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Manifest id (hex) the counters are for.
    pub image_id: String,
    pub resume_count: u32,
    pub tries: u32,
    pub wire_bytes: u64,
    pub host: String,
    pub segments: Vec<SegmentReceipt>,
}

impl Counters {
    /// Fresh counters for `manifest`: zero runs are known up front.
    pub fn new(manifest: &Manifest) -> Counters {
        Counters {
            image_id: hex::encode(manifest.id()),
            segments: SegmentReceipt::planned_all(manifest),
            ..Counters::default()
        }
    }

    /// Whether these counters belong to `manifest` (same id and segment table).
    pub fn matches(&self, manifest: &Manifest) -> bool {
        self.image_id == hex::encode(manifest.id())
            && self.segments.len() == manifest.segments.len()
    }

    pub fn segment_mut(&mut self, index: usize) -> Option<&mut SegmentReceipt> {
        self.segments.get_mut(index)
    }

    /// The receipt for these counters.
    pub fn receipt(
        &self,
        manifest: &Manifest,
        device: &str,
        target: &str,
        state: InstallState,
    ) -> Receipt {
        Receipt {
            receipt_version: RECEIPT_VERSION,
            writer: Writer::Flashd,
            image_version: manifest.version.clone(),
            image_id: hex::encode(manifest.id()),
            image_sha256: hex::encode(manifest.image_sha256),
            image_size: manifest.total_size,
            device: device.to_string(),
            host: self.host.clone(),
            target: target.to_string(),
            state,
            resume_count: self.resume_count,
            tries: self.tries,
            wire_bytes: self.wire_bytes,
            segments: self.segments.clone(),
        }
    }
}

fn counters_path(state: &StateDir) -> PathBuf {
    state.root().join(nx_contract::state::FLASH_COUNTERS)
}

fn index_path(state: &StateDir) -> PathBuf {
    state.root().join(nx_contract::state::FLASH_INDEX)
}

/// `installed.json` without the (large) index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct InstalledRecord {
    #[serde(flatten)]
    image: InstalledImage,
    /// Where it was installed (for `nx flash info`).
    target: String,
}

/// Load the journal; `None` if absent or unreadable (a bad journal only costs a resend).
pub fn load_journal(state: &StateDir) -> (Option<Journal>, Option<String>) {
    match store::read_json::<Journal>(&state.journal_path()) {
        Ok(j) => (j, None),
        Err(e) => (None, Some(format!("ignoring journal: {e}"))),
    }
}

pub fn save_journal(state: &StateDir, j: &Journal) -> Result<(), StoreError> {
    store::write_json_atomic(&state.journal_path(), j)
}

pub fn clear_journal(state: &StateDir) -> Result<(), StoreError> {
    store::remove_if_exists(&state.journal_path())?;
    store::remove_if_exists(&counters_path(state))
}

pub fn load_counters(state: &StateDir) -> Option<Counters> {
    store::read_json::<Counters>(&counters_path(state))
        .ok()
        .flatten()
}

/// Counters only feed the receipt: written without fsync (a power cut may lose the last
/// update, never the transfer).
pub fn save_counters(state: &StateDir, c: &Counters) -> Result<(), StoreError> {
    store::write_json_quick(&counters_path(state), c)
}

/// Load what is installed, with its skip index when that is present and consistent.
pub fn load_installed(state: &StateDir) -> (Option<InstalledImage>, Option<String>) {
    let rec = match store::read_json::<InstalledRecord>(&state.installed_path()) {
        Ok(Some(r)) => r,
        Ok(None) => return (None, None),
        Err(e) => return (None, Some(format!("ignoring install record: {e}"))),
    };
    let mut image = rec.image;
    image.index = None;
    let index = store::read_bounded(&index_path(state), MAX_INDEX_LEN)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<SkipIndex>(&b).ok())
        .filter(|ix| ix.image_id == image.image_id);
    image.index = index;
    (Some(image), None)
}

/// Where the recorded install went (`describe_target` wording), if there is a record.
pub fn installed_target(state: &StateDir) -> Option<String> {
    store::read_json::<InstalledRecord>(&state.installed_path())
        .ok()
        .flatten()
        .map(|r| r.target)
}

/// Persist the install record (the index goes to its own file, if any).
pub fn save_installed(
    state: &StateDir,
    image: &InstalledImage,
    target: &str,
) -> Result<(), StoreError> {
    let mut bare = image.clone();
    let index = bare.index.take();
    // Write the record first: an index without a matching record is ignored.
    store::write_json_atomic(
        &state.installed_path(),
        &InstalledRecord {
            image: bare,
            target: target.to_string(),
        },
    )?;
    match index {
        Some(ix) => store::write_json_atomic(&index_path(state), &ix),
        None => store::remove_if_exists(&index_path(state)),
    }
}

pub fn save_receipt(state: &StateDir, r: &Receipt) -> Result<(), StoreError> {
    store::write_json_atomic(&state.receipt_path(), r)
}

pub fn load_receipt(state: &StateDir) -> Option<Receipt> {
    store::read_json::<Receipt>(&state.receipt_path())
        .ok()
        .flatten()
}

#[cfg(test)]
mod symlink_tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A symlink planted at the temp path of any record leaves its target untouched: the
    /// records are written through `nx_guest::fsx` (temp file `O_NOFOLLOW | O_EXCL`).
    #[test]
    fn planted_temp_symlinks_leave_their_targets_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let st = StateDir::open(dir.path(), false).unwrap();
        for name in [
            ".journal.json.tmp",
            ".installed.json.tmp",
            ".last-install.json.tmp",
            ".counters.json.tmp",
        ] {
            symlink(&victim, st.flash_dir().join(name)).unwrap();
        }
        let j = Journal {
            version: proto::session::JOURNAL_VERSION,
            image_id: [1; 32],
            image_sha256: [2; 32],
            total_size: 4096,
            chunk_size: 4096,
            plan_chunks: 1,
            durable_seq: 0,
            durable_offset: 0,
            verified: vec![false],
        };
        save_journal(&st, &j).unwrap();
        let img = InstalledImage {
            image_id: [1; 32],
            image_sha256: [2; 32],
            total_size: 4096,
            version: "1".into(),
            index: None,
        };
        save_installed(&st, &img, "/dev/vdb2").unwrap();
        let image = crate::testkit::build_image("1", &[("rootfs", vec![7u8; 4096])], None).unwrap();
        let h = proto::image::Header::parse(&image[..proto::image::HEADER_LEN]).unwrap();
        let head = &image[..h.data_offset as usize];
        let m = proto::image::ImageHead::parse(head).unwrap().manifest;
        let c = Counters::new(&m);
        save_counters(&st, &c).unwrap();
        save_receipt(
            &st,
            &c.receipt(&m, "nexus", "/dev/vdb2", InstallState::Installed),
        )
        .unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(load_journal(&st).0, Some(j));
        assert_eq!(load_installed(&st).0, Some(img));
        assert!(load_counters(&st).is_some());
        assert!(load_receipt(&st).is_some());
    }
}
