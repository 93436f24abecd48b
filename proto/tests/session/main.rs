#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Session state machine tests, one test binary: the sender and receiver
//! transitions one by one, and the two wired over a lossy simulated link.
//! `support` holds the shared test image builder and simulated shells.

mod lossy_loop;
mod receiver;
mod sender;
mod support;
