//! The JSON debug/export view of the slot table (`nx boot status --json`,
//! `bootctld --export-json`, the diag bundle). Deterministic: fixed key order,
//! pretty-printed, trailing newline.
//!
//! ```json
//! {
//!   "format": 1,
//!   "storage": "persistent",
//!   "snapshot": "/state/bootctl/state.nxs",
//!   "active": "b",
//!   "slots": {
//!     "a": { "health": "good", "trial": false, "tries_left": 0, "version": "1" },
//!     "b": { "health": "unknown", "trial": true, "tries_left": 2, "version": "2" }
//!   },
//!   "last_boot": { "slot": "b", "trial": true, "boot_id": "…" }
//! }
//! ```
//! In RAM-only mode `storage` is `"ram-only stub/placeholder: <reason>"` and
//! `snapshot` is `null`.

use crate::machine::{BootState, SlotInfo};
use crate::snapshot::FORMAT;
use serde::Serialize;

/// Where the state lives, as shown in the view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Persistence {
    /// Persisted in this snapshot file.
    File(std::path::PathBuf),
    /// RAM only, with the reason.
    Ram(String),
}

#[derive(Serialize)]
struct View<'a> {
    format: u16,
    storage: String,
    snapshot: Option<String>,
    active: &'static str,
    slots: Slots<'a>,
    last_boot: Option<LastBootView<'a>>,
}

#[derive(Serialize)]
struct Slots<'a> {
    a: SlotView<'a>,
    b: SlotView<'a>,
}

#[derive(Serialize)]
struct SlotView<'a> {
    health: &'static str,
    trial: bool,
    tries_left: u8,
    version: &'a str,
}

#[derive(Serialize)]
struct LastBootView<'a> {
    slot: &'static str,
    trial: bool,
    boot_id: &'a str,
}

fn slot_view(i: &SlotInfo) -> SlotView<'_> {
    SlotView {
        health: i.health.as_str(),
        trial: i.trial,
        tries_left: i.tries_left,
        version: &i.version,
    }
}

/// Render the view.
pub fn render(state: &BootState, persistence: &Persistence) -> String {
    let (storage, snapshot) = match persistence {
        Persistence::File(p) => ("persistent".to_string(), Some(p.display().to_string())),
        Persistence::Ram(why) => (format!("ram-only stub/placeholder: {why}"), None),
    };
    let view = View {
        format: FORMAT,
        storage,
        snapshot,
        active: state.active.as_str(),
        slots: Slots {
            a: slot_view(&state.a),
            b: slot_view(&state.b),
        },
        last_boot: state.last_boot.as_ref().map(|lb| LastBootView {
            slot: lb.slot.as_str(),
            trial: lb.trial,
            boot_id: &lb.boot_id,
        }),
    };
    // Serializing plain structs of strings/ints/bools cannot fail.
    let mut out = serde_json::to_string_pretty(&view)
        .unwrap_or_else(|e| format!("{{\"error\": \"json view failed: {e}\"}}"));
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_is_deterministic_and_complete() {
        let s = BootState::factory_default();
        let p = Persistence::File("/state/bootctl/state.nxs".into());
        let j = render(&s, &p);
        assert_eq!(j, render(&s, &p));
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["active"], "a");
        assert_eq!(v["slots"]["a"]["health"], "good");
        assert_eq!(v["slots"]["b"]["health"], "empty");
        assert_eq!(v["storage"], "persistent");
        assert!(v["last_boot"].is_null());
        let ram = render(&s, &Persistence::Ram("no /state".into()));
        assert!(ram.contains("stub/placeholder"));
    }
}
