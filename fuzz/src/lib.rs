//! Fuzz targets of the parsers and state machines that take bytes from outside: the frame
//! decoder, message decoding, the image head and manifest, the receiver state machine driven
//! by a hostile host, and bootctld's capnp snapshot decoder.
//!
//! Each target is a plain function over `&[u8]` that panics only when an invariant breaks, so
//! the same code runs three ways: as a libFuzzer target (`fuzz/libfuzzer`, built with coverage
//! instrumentation on the stable toolchain by `cargo xtask fuzz`), as a test that replays the
//! checked-in corpus (`fuzz/corpus/<target>/`, every CI run), and over the deterministic seeds
//! of [`seeds`] (which also produce the checked-in seed files).
// A fuzz target reports a broken invariant by panicking: that is libFuzzer's contract (and
// what the corpus tests catch). This crate is test tooling and never ships.
#![allow(clippy::panic)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod receiver;
mod seeds;
mod targets;

pub use seeds::seeds;

/// One fuzz target.
#[derive(Clone, Copy)]
pub struct Target {
    /// Its name: the corpus directory and `cargo xtask fuzz TARGET`.
    pub name: &'static str,
    /// What it feeds the bytes to.
    pub about: &'static str,
    /// Run one input; panics when an invariant breaks.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "frame",
        about: "proto::frame::FrameDecoder over arbitrary bytes, split at arbitrary points",
        run: targets::frame,
    },
    Target {
        name: "msg",
        about: "proto::msg::Message::from_frame of every message type, re-encoded when valid",
        run: targets::msg,
    },
    Target {
        name: "image",
        about: "proto::image::ImageHead::parse and proto::manifest::Manifest::from_bytes",
        run: targets::image,
    },
    Target {
        name: "receiver",
        about: "proto::session::Receiver driven by a hostile host script, with a simulated target",
        run: receiver::run,
    },
    Target {
        name: "snapshot",
        about: "bootctld's capnp snapshot decoder (state.nxs)",
        run: targets::snapshot,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// Run the target `name` on `data` (unknown names do nothing: the libFuzzer binary checks
/// the name before it starts).
pub fn run(name: &str, data: &[u8]) {
    if let Some(t) = target(name) {
        (t.run)(data);
    }
}
