//! Markers of rawrecv, the benchmark's raw-copy receiver (bench guests only). Its reply line
//! goes to the console and back over the bench port.

use super::Marker;
use std::fmt::Display;

/// `rawrecv: ready (port <name> at <dev>, sink partition <partition>)`.
pub fn ready(port_name: &str, dev: impl Display, partition: &str) -> Marker {
    Marker::new(format!(
        "rawrecv: ready (port {port_name} at {dev}, sink partition {partition})"
    ))
}

/// Fixed prefix of [`ready`].
pub const READY_PREFIX: &str = "rawrecv: ready";

/// Fixed prefix of [`done`] (what the host strips before the fields).
pub const DONE_PREFIX: &str = "rawrecv: done ";

/// `rawrecv: done bytes=<n> ms=<t> read_ms=.. write_ms=.. sync_ms=.. hash_ms=..[ digest=<d>]`.
pub fn done(bytes: u64, ms: [u128; 5], digest: Option<&str>) -> Marker {
    let [total, read, write, sync, hash] = ms;
    let mut s = format!(
        "{DONE_PREFIX}bytes={bytes} ms={total} read_ms={read} write_ms={write} sync_ms={sync} hash_ms={hash}"
    );
    if let Some(d) = digest {
        s.push_str(" digest=");
        s.push_str(d);
    }
    Marker::new(s)
}

/// `rawrecv: error <e>`.
pub fn error(e: impl Display) -> Marker {
    Marker::new(format!("rawrecv: error {e}"))
}

/// `rawrecv: error cannot open the sink: <e>`.
pub fn sink_error(e: impl Display) -> Marker {
    Marker::new(format!("rawrecv: error cannot open the sink: {e}"))
}

/// The port cannot be opened yet (stderr).
pub fn open_retry(dev: impl Display, e: impl Display) -> Marker {
    Marker::new(format!("rawrecv: cannot open {dev} ({e}); retrying"))
}

/// The receiver could not be forked off (stderr).
pub fn fork_failed() -> Marker {
    Marker::new("rawrecv: fork failed; booting without the benchmark receiver")
}

/// `/init` could not be executed (stderr).
pub fn exec_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "rawrecv: cannot exec /init ({e}); serving as PID 1"
    ))
}

/// Sample of every constructor (for the contract's tests).
pub fn samples() -> Vec<Marker> {
    vec![
        ready("com.nexus.bench", "/dev/vport0p4", "system_b"),
        done(1, [1, 1, 1, 1, 1], None),
        done(1, [1, 1, 1, 1, 1], Some("crc32:00000000")),
        error("e"),
        sink_error("e"),
        open_retry("/dev/vport0p4", "e"),
        fork_failed(),
        exec_failed("e"),
    ]
}
