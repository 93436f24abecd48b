//! # nx-diag — the recovery diagnostics bundle
//!
//! Collects, each member bounded (a member over its cap is cut and says so inside, and in
//! `MANIFEST.txt`):
//!
//! | member (in the tar)       | what                                                        | cap     |
//! |---------------------------|-------------------------------------------------------------|---------|
//! | `diag/MANIFEST.txt`       | format, every member with its size, sources, truncations     | —       |
//! | `diag/bootctl-state.nxs`  | the raw snapshot `STATE/bootctl/state.nxs` (empty if none)   | 16 KiB  |
//! | `diag/bootctl.json`       | bootctld's JSON view (`exportJson()` on `/run/bootctld.sock`), or `{"not_available": …}` | 16 KiB |
//! | `diag/console.log`        | the tail of a console/marker log file given by the caller    | 128 KiB |
//! | `diag/flash.txt`          | flashd's journal summary and its other records               | 16 KiB  |
//! | `diag/kernel.log`         | the tail of the kernel log (`/dev/kmsg`, non-blocking; `/proc/kmsg` fallback) | 128 KiB |
//! | `diag/next-boot.txt`      | `boot/next_mode`, the factory-wipe request and its journal   | 4 KiB   |
//! | `diag/state-tree.txt`     | every path of `/state` with its kind and size (no symlink followed) | 96 KiB |
//!
//! into a deterministic `tar.zst` ([`bundle::encode`]: ustar, entries sorted, mtime 0,
//! uid/gid 0, mode 0644, zstd level [`bundle::ZSTD_LEVEL`] with a checksum): the same inputs
//! give the same bytes. The bundle is at most [`bundle::MAX_BUNDLE_BYTES`].
//!
//! It is written atomically to `/state/recovery/diag-<n>.tar.zst`, `n` the next free number
//! ([`store`]; the newest [`store::KEEP`] are kept). Markers: `nx_contract::markers::recovery::diag_written`; with no
//! usable `/state`: `nx-diag: not available — <why>` and `recovery: diag written (bytes=0)`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod bundle;
pub mod collect;
pub mod env;
pub mod kmsg;
pub mod store;

use nx_contract::markers::{diag, recovery};
use nx_contract::Marker;
/// bootctld's JSON view, fetched with the one RPC client ([`nx_rpc::bootctl::fetch_view`]).
pub use nx_rpc::bootctl;
use std::path::{Path, PathBuf};

/// Default kernel log sources, in order of preference.
pub const KMSG_SOURCES: [&str; 2] = ["/dev/kmsg", "/proc/kmsg"];
/// Default bootctld socket.
pub const BOOTCTLD_SOCKET: &str = nx_rpc::bootctl::SOCKET;

/// Errors of nx-diag.
#[derive(Debug, thiserror::Error)]
pub enum DiagError {
    /// An I/O operation failed.
    #[error(transparent)]
    Io(#[from] nx_contract::PathIoError),
    /// Building or reading a bundle failed.
    #[error("diag bundle: {0}")]
    Bundle(String),
    /// A bundle is larger than the bound.
    #[error("diag bundle {path} is {len} bytes, more than the {max}-byte bound")]
    TooLarge { path: PathBuf, len: u64, max: u64 },
}

impl DiagError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| DiagError::Io(nx_contract::PathIoError { what, path, source })
    }
}

/// Where the inputs come from.
#[derive(Debug, Clone)]
pub struct Config {
    /// The state dir (`/state`).
    pub state_root: PathBuf,
    /// Count an unmounted state dir as unusable (in the guest it would be RAM).
    pub require_mountpoint: bool,
    /// Kernel log sources, tried in order.
    pub kmsg_sources: Vec<PathBuf>,
    /// The console/marker log file, when the caller has one.
    pub console_log: Option<PathBuf>,
}

impl Config {
    /// The guest defaults for `state_root`.
    pub fn guest(state_root: &Path) -> Self {
        Config {
            state_root: state_root.to_path_buf(),
            require_mountpoint: true,
            kmsg_sources: KMSG_SOURCES.iter().map(PathBuf::from).collect(),
            console_log: None,
        }
    }
}

/// What [`run`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A bundle was written.
    Written(store::Written),
    /// No usable `/state`: nothing written (the reason).
    NotAvailable(String),
}

/// Collect, encode and write a bundle; print the markers through `markers`.
/// `bootctl` is bootctld's view (fetch it with [`bootctl::fetch_view`]).
pub fn run(
    cfg: &Config,
    bootctl: &bootctl::View,
    markers: &mut dyn FnMut(&Marker),
) -> Result<Outcome, DiagError> {
    if let Err(why) = store::usable(&cfg.state_root, cfg.require_mountpoint) {
        markers(&diag::not_available(&why));
        markers(&recovery::diag_written(0));
        return Ok(Outcome::NotAvailable(why));
    }
    let members = collect::gather(cfg, bootctl);
    let bytes = bundle::encode(&members)?;
    let written = store::write(&cfg.state_root, &bytes)?;
    markers(&diag::wrote(written.path.display(), members.len()));
    markers(&recovery::diag_written(written.bytes));
    Ok(Outcome::Written(written))
}
