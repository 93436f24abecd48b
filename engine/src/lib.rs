//! # nx-engine — the host flashing engine
//!
//! Everything `nx flash` does on the host except argument parsing and output: open and check
//! an image file ([`image_file`]), connect to a target ([`transport`]), run the resumable,
//! verified transfer session and reconnect when the link drops ([`send`]), flash several
//! targets concurrently ([`fanout`]), ask a target what it holds ([`query`]), and build the
//! install receipt ([`receipt`]); and the Cap'n Proto clients of the guest daemons bootctld and
//! rebootd ([`rpc_client`]: `nx boot`, `nx reset`, `nx recovery`, `nx flash reboot`).
//!
//! The protocol itself is the sans-IO [`proto::session::Sender`]; this crate is its I/O shell.
//!
//! Progress is reported in the style of espflash's `ProgressCallbacks`: every session takes a
//! [`ProgressSink`] and hands it [`EngineEvent`] values (session events, connection attempts,
//! reconnects, the end of a transfer). What is shown — bars, plain lines, NDJSON — is the
//! caller's business.
//!
//! Architecture invariant: the engine never writes to a terminal: it reports progress as
//! [`EngineEvent`] to a [`ProgressSink`] and failures as typed errors (`engine/tests/hygiene.rs`
//! fails on `println!`, `eprintln!`, `indicatif` or `std::io::stdout`/`stderr` in `src/`).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod delta;
pub mod event;
pub mod fanout;
pub mod image_file;
pub mod query;
pub mod receipt;
pub mod rpc_client;
pub mod send;
pub mod transport;

pub use event::{EngineEvent, NullSink, ProgressSink};

/// The host name sent in HELLO: the kernel's host name made to fit `[A-Za-z0-9._-]{1,64}`.
pub fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if clean.is_empty() {
        "host".to_string()
    } else {
        clean
    }
}

/// An error and its sources, joined with `": "` (what `anyhow`'s `{:#}` shows), for
/// messages that carry a lower layer's failure as text.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_name_fits_the_hello_rule() {
        let h = host_name();
        assert!(!h.is_empty() && h.len() <= 64, "{h}");
        assert!(h
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')));
    }

    #[test]
    fn error_chain_joins_the_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
