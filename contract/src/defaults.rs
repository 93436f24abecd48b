//! Transfer defaults shared by the sender (`nx flash send`), flashd and the benchmarks.

/// Default chunk (frame payload) size of a transfer: 1 MiB.
pub const CHUNK: u32 = 1024 * 1024;
/// Default number of chunks in flight.
pub const WINDOW: u16 = 4;
