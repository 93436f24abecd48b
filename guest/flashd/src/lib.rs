//! flashd — the only flashing authority on the target.
//!
//! It receives an image over a link, streams it into a staging file with a journal beside it,
//! verifies each segment's SHA-256 as soon as it is complete, and on `DONE` installs
//! atomically. The protocol decisions are made by the sans-IO [`proto::session::Receiver`];
//! flashd executes its actions, with hashing and fsync on background threads. With
//! `--install-slot auto` the target is the inactive A/B slot and a verified install makes it
//! active on trial.
//!
//! # Code map
//!
//! | module | job |
//! |---|---|
//! | [`config`] | command line → [`config::Config`] (configuration only, no runtime state) |
//! | [`link`] | the transport: a unix socket flashd serves, or the virtio-serial port; frames in, frames out |
//! | [`server`] | the server loop: connections one at a time, the stub without a usable state dir |
//! | [`runtime`] | one receiver and the transfer's explicit phase (`Idle` → `Receiving` → `Installing` → `Consumed`), worker results; `runtime::actions` executes each receiver action in a function of its own; `runtime::installed` keeps the install record, receipt and skip index after an install |
//! | [`console`] | the injected [`console::Output`] every console line goes through; receiver reports → `nx_contract::markers::flashd` markers |
//! | [`install`] | where a verified image goes ([`install::Destination`]: the spec plus the slot chosen at runtime), slot activation and skip-index threads |
//! | [`workers`] | the hasher and durability threads (fsync, journal, the install itself) |
//! | [`store`] | the state dir, the staging file, JSON records (via `nx_guest::fsx`), the install into a file |
//! | [`blockio`] | `O_DIRECT` block-device install and read-back (`nx_guest::fsx::AlignedBuf`) |
//! | [`error`] | [`error::StoreError`], shared by `store` and `blockio` (no import loop between them) |
//! | [`records`] | journal, install record, receipt and counters on `/state/flash` |
//! | [`slots`] | bootctld/rebootd calls of the slot-aware install |
//! | [`cpustat`] | per-thread CPU time for the install log line |
//! | [`testkit`] | in-process servers and images for tests |
//!
//! Dependencies point one way: `server` → `runtime` → (`install`, `workers`, `records`,
//! `store`) → `blockio` → `error`. Console text exists only in `nx_contract::markers::flashd`
//! (markers) and in log lines; the receiver emits typed `ReceiverReport`s.
//!
//! Architecture invariant: nothing from the host (names, lengths, offsets) is trusted; the
//! receiver validates every message and the storage layer bounds every range.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod blockio;
pub mod config;
pub mod console;
pub mod cpustat;
pub mod error;
pub mod install;
pub mod link;
pub mod patch;
pub mod records;
pub mod runtime;
pub mod server;
pub mod slots;
pub mod store;
pub mod testkit;
pub mod workers;

use std::path::PathBuf;

/// Measure both frame CRC implementations on this CPU and keep the faster one for the
/// process (see [`proto::frame::CrcEngine`]: under QEMU TCG the table code is about 4x the
/// emulated PCLMULQDQ code; on real hardware the SIMD code wins). Returns a log line.
pub fn choose_crc_engine() -> String {
    use proto::frame::{crc32_with, set_crc_engine, CrcEngine};
    let buf: Vec<u8> = (0..256 * 1024u32).map(|i| (i ^ (i >> 9)) as u8).collect();
    let rate = |e: CrcEngine| {
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            std::hint::black_box(crc32_with(e, &[std::hint::black_box(&buf)]));
            best = best.min(t.elapsed().as_secs_f64());
        }
        buf.len() as f64 / best.max(1e-9) / 1e6
    };
    let (simd, table) = (rate(CrcEngine::Simd), rate(CrcEngine::Table));
    let pick = if table > simd {
        CrcEngine::Table
    } else {
        CrcEngine::Simd
    };
    set_crc_engine(pick);
    format!("frame crc engine {pick:?} (simd {simd:.0} MB/s, table {table:.0} MB/s)")
}

/// Errors that stop flashd from starting.
#[derive(Debug, thiserror::Error)]
pub enum FlashdError {
    #[error("{0}")]
    Usage(String),
    #[error("public key {path}: {reason} (expected a file written by `nx image keygen`)")]
    Key { path: PathBuf, reason: String },
    #[error("cannot start a worker thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error("virtio-serial port {name}: {reason}")]
    Port { name: String, reason: String },
}
