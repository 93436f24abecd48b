//! # nx-reset — factory reset of the `/state` disk
//!
//! * [`plan()`]: the exact plan — every path under `apps`, `content` and `settings` that a
//!   wipe removes (with its size), and everything that is preserved (`trust/**` path by path,
//!   `boot`, `bootctl`, `flash`, `recovery` and any other top-level entry as summaries). Pure
//!   read: it never changes anything. The plan type is [`nx_contract::reset_plan::Plan`]
//!   (shared with `nx reset` on the host), rendered as JSON (`Plan::to_json`) for `nx reset
//!   factory --dry-run` (served by rebootd's `resetPlan()`) and as text (`Plan::render_text`)
//!   for the recovery console.
//! * [`wipe()`]: the wipe that recovery-init runs before it starts any service when
//!   `STATE/boot/factory_wipe` exists. Resumable and power-cut safe:
//!   1. the request file stays until the very end, and a journal
//!      (`STATE/boot/factory_wipe.journal`, atomic) records the attempt;
//!   2. the *contents* of the three trees are removed with `openat(O_NOFOLLOW)` /
//!      `unlinkat` relative to directory descriptors: a symlink is removed as a link, never
//!      followed; another file system mounted inside a tree stops the wipe; `trust` is never
//!      opened for writing;
//!   3. everything is synced (`fsync` of the trees, `syncfs`);
//!   4. only then the request is removed (durably), then the journal.
//!
//!   A power cut at any point leaves the request in place, so the boot firmware boots
//!   recovery again and the next [`wipe()`] finishes the job; a half-wiped `/state` never
//!   boots as normal.
//!
//! Markers (exact): `nx_contract::markers::reset::{wipe_start, wipe_done}`.
//!
//! Architecture invariant: nothing on `/state` is trusted — every name is escaped before it
//! is shown, every read is bounded, nothing is followed out of a tree.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

mod fsx;
pub mod plan;
pub mod walk;
pub mod wipe;

pub use plan::{plan, plan_with, Limits};
pub use wipe::{pending, wipe, wipe_with, Pending, WipeOptions, WipeOutcome, WipeReport};

use std::path::PathBuf;

/// The factory-wipe request written by rebootd (`factoryWipe()`), relative to the state root.
pub const REQUEST: &str = nx_contract::state::FACTORY_WIPE;
/// The exact content of a valid request.
pub const REQUEST_CONTENT: &[u8] = b"wipe\n";
/// The wipe journal, relative to the state root (written by [`wipe()`] only).
pub const JOURNAL: &str = nx_contract::state::FACTORY_WIPE_JOURNAL;

/// Errors of planning and wiping. Each names the path it concerns and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// An I/O operation failed.
    #[error(transparent)]
    Io(#[from] nx_contract::PathIoError),
    /// The state dir cannot be used at all.
    #[error("state dir {path}: {reason}")]
    StateDir { path: PathBuf, reason: String },
    /// Another file system is mounted inside a wiped tree: the wipe never crosses it.
    #[error(
        "{path} is another file system mounted inside a wiped tree: unmount it, then run the wipe again (nothing below it was touched)"
    )]
    MountPoint { path: PathBuf },
    /// A directory moved while it was being wiped (its `..` is not the parent we came from).
    #[error("{path} moved during the wipe (its parent changed); run the wipe again")]
    TreeChanged { path: PathBuf },
    /// Test hook: the wipe stopped after the configured number of removals (a simulated
    /// power cut, see [`WipeOptions::stop_after`]).
    #[error("wipe stopped after {removed} removals (simulated power cut)")]
    Interrupted { removed: u64 },
}

impl ResetError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| ResetError::Io(nx_contract::PathIoError { what, path, source })
    }
}

/// The name the device goes by in confirmations: the kernel hostname when it is a plain
/// name (`[A-Za-z0-9._-]{1,64}`, not `(none)`/`localhost`), else `nexus` (flashd's default
/// device name). Read from `/proc/sys/kernel/hostname` (bounded).
pub fn device_name() -> String {
    device_name_from(std::path::Path::new("/proc/sys/kernel/hostname"))
}

/// [`device_name`] reading the hostname from `path` (tests).
pub fn device_name_from(path: &std::path::Path) -> String {
    let name = fsx::read_bounded(path, 256)
        .ok()
        .flatten()
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    if is_device_name(&name) && name != "localhost" {
        name
    } else {
        DEFAULT_DEVICE.to_string()
    }
}

/// The device name when the hostname is not usable.
pub const DEFAULT_DEVICE: &str = "nexus";

/// `[A-Za-z0-9._-]{1,64}` (the device-name rule of the flashing protocol).
pub fn is_device_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("hostname");
        assert_eq!(device_name_from(&p), "nexus");
        std::fs::write(&p, "(none)\n").unwrap();
        assert_eq!(device_name_from(&p), "nexus");
        std::fs::write(&p, "localhost\n").unwrap();
        assert_eq!(device_name_from(&p), "nexus");
        std::fs::write(&p, "board-7\n").unwrap();
        assert_eq!(device_name_from(&p), "board-7");
        std::fs::write(&p, "a/../b\n").unwrap();
        assert_eq!(device_name_from(&p), "nexus");
        std::fs::write(&p, "x".repeat(4096)).unwrap();
        assert_eq!(device_name_from(&p), "nexus");
    }
}
