//! # proto — the sans-IO core of nexus provisioning
//!
//! No tokio, no files, no sockets: every type here works on byte slices and
//! values, so the host (`nx`), the guest (`flashd`) and the tests drive the
//! same code.
//!
//! * [`ident`]: the "who are you?" probe every guest daemon answers before its protocol.
//! * [`frame`]: the wire frame (magic, header, seq, len, payload, crc32) and its
//!   streaming decoder.
//! * [`msg`]: the messages of the flashing conversation carried in frames.
//! * [`manifest`] and [`image`]: the image file format and its canonical manifest.
//! * [`receipt`]: the install receipt both sides write.
//! * [`session`]: the sender and receiver state machines (events in, actions out).
//! * [`rpc`]: generated Cap'n Proto code for the `rebootd`/`bootctld` schemas in `proto/schema/`.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod frame;
pub mod ident;
pub mod image;
pub mod manifest;
pub mod msg;
pub mod receipt;
pub mod rpc;
pub mod session;
pub mod trust;
pub mod verity;
