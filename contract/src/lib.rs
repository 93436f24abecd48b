//! The one home of every contract that more than one crate relies on.
//!
//! Guest programs, the sans-IO `proto`, the QEMU runner, xtask and `nx` import these names
//! instead of spelling them again. Sans-IO: no files, no sockets, no dependencies (serde only
//! behind the `serde` feature, for the factory-reset plan's JSON).
//!
//! Architecture invariant: a port name, a `/state` path, the next-boot grammar, a transfer
//! default or a console marker is written here once; everything else imports it.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod boot;
pub mod defaults;
pub mod diag;
pub mod error;
pub mod loader;
pub mod markers;
pub mod ports;
pub mod reset_plan;
pub mod state;

pub use boot::NextBoot;
pub use error::PathIoError;
pub use markers::Marker;
pub use ports::PortSpec;
