//! Transfer defaults shared by the sender (`nx flash send`), flashd and the benchmarks.

/// Default chunk (frame payload) size of a transfer: 1 MiB.
pub const CHUNK: u32 = 1024 * 1024;

/// Largest frame payload `nx flash send` uses on a `serial:` port (a UART moves 11–100
/// KB/s: a 4 KiB frame is a fraction of a second, so a lost byte costs little and the
/// timeout measures the line, not one huge frame).
pub const SERIAL_FRAME: u32 = 4096;
/// Default number of chunks in flight.
pub const WINDOW: u16 = 4;
/// Seconds flashd keeps a session that makes no progress (no new image data written, no
/// verification or install finished) before it drops it so another client gets in, even if
/// it keeps sending INFO (`flashd --stall-timeout`).
pub const STALL_TIMEOUT_SECS: u64 = 30;
