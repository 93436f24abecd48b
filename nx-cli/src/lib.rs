//! Library half of the `nx` command: everything except argument parsing and
//! the terminal lives here so tests can drive it.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod boot;
pub mod completions;
pub mod devices;
pub mod flash;
pub mod image;
pub mod man;
pub mod recovery;
pub mod reset;
pub mod status;
pub mod target;
