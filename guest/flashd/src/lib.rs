//! flashd — the only flashing authority on the target.
//!
//! It receives an image over a link ([`link`]: a unix socket it serves itself, or the guest's
//! virtio-serial port), streams it into a staging file with a journal beside it ([`store`],
//! [`records`]), verifies each segment's SHA-256 as soon as it is complete, and on `DONE`
//! installs atomically. The protocol decisions are made by the sans-IO
//! [`proto::session::Receiver`]; [`server`] executes its actions, with hashing and fsync on
//! background threads ([`workers`]). With `--install-slot auto` the target is the inactive
//! A/B slot and a verified install makes it active on trial ([`slots`]).
//!
//! Architecture invariant: nothing from the host (names, lengths, offsets) is trusted; the
//! receiver validates every message and the storage layer bounds every range.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod blockio;
pub mod config;
pub mod cpustat;
pub mod link;
pub mod records;
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
