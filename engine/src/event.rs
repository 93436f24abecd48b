//! What the engine reports while it works: [`EngineEvent`] values handed to a
//! [`ProgressSink`] (bars, plain lines, NDJSON, a test's log — the engine does not know).

use proto::session::ProgressEvent;
use std::time::Duration;

/// Something that happened during a transfer.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// An event of the session state machine ([`proto::session::Sender`]).
    Session(ProgressEvent),
    /// Connecting to the target (attempt ≥ 1).
    Connecting { port: String, attempt: u32 },
    /// The link was lost; trying again after `delay`.
    Reconnect {
        error: String,
        attempt: u32,
        max: u32,
        delay: Duration,
    },
    /// The transfer is over (installed, or failed for good): nothing more comes from this
    /// transfer; flush what is pending and take down progress displays.
    Finished,
}

/// Where the engine sends its [`EngineEvent`]s. One sink per transfer (per target when
/// flashing several); `Send` because transfers run on a multi-threaded runtime.
pub trait ProgressSink: Send {
    /// One event, in order.
    fn event(&mut self, ev: &EngineEvent);
}

/// Any `FnMut(&EngineEvent)` is a sink.
impl<F: FnMut(&EngineEvent) + Send> ProgressSink for F {
    fn event(&mut self, ev: &EngineEvent) {
        self(ev)
    }
}

/// A sink that drops every event.
#[derive(Debug, Clone, Copy, Default)]
pub struct NullSink;

impl ProgressSink for NullSink {
    fn event(&mut self, _ev: &EngineEvent) {}
}

/// Collects every event (tests, tools that look at a transfer afterwards).
impl ProgressSink for Vec<EngineEvent> {
    fn event(&mut self, ev: &EngineEvent) {
        self.push(ev.clone());
    }
}
