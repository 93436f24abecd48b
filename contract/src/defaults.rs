//! Transfer defaults shared by the sender (`nx flash send`), flashd and the benchmarks.

/// Default chunk (frame payload) size of a transfer: 1 MiB.
pub const CHUNK: u32 = 1024 * 1024;
/// Default number of chunks in flight.
pub const WINDOW: u16 = 4;
/// Seconds flashd keeps a session that makes no progress (no new image data written, no
/// verification or install finished) before it drops it so another client gets in, even if
/// it keeps sending INFO (`flashd --stall-timeout`).
pub const STALL_TIMEOUT_SECS: u64 = 30;
