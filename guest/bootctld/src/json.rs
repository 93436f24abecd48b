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
    #[serde(skip_serializing_if = "Option::is_none")]
    bootloader: Option<&'a Bootloader>,
}

/// The bootloader's side, next to bootctld's table (`nx boot status` shows both and says
/// when they disagree).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bootloader {
    /// The entry this boot came from (`LoaderEntrySelected`), when the bootloader said.
    pub booted_entry: Option<String>,
    /// The slot entries on the ESP, in the bootloader's order (what it boots next first;
    /// entries with no tries left last).
    pub entries: Vec<String>,
    /// The slot the bootloader boots next (`null`: no slot entry with tries left).
    pub next: Option<String>,
    /// `next` is bootctld's active slot.
    pub agrees: bool,
}

impl Bootloader {
    /// The view from the ESP's slot entries (highest generation first) and the booted entry.
    pub fn from_entries(
        entries: &[nx_guest::esp::SlotEntry],
        booted_entry: Option<String>,
        active: &str,
    ) -> Bootloader {
        let mut ordered: Vec<&nx_guest::esp::SlotEntry> = entries.iter().collect();
        // Stable: generation order kept, entries out of tries moved last.
        ordered.sort_by_key(|e| e.name.is_bad());
        let next = ordered
            .iter()
            .find(|e| !e.name.is_bad())
            .map(|e| e.slot.to_string());
        Bootloader {
            booted_entry,
            entries: ordered.iter().map(|e| e.name.file_name()).collect(),
            agrees: next.as_deref() == Some(active),
            next,
        }
    }
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
    render_with(state, persistence, None)
}

/// Render the view with the bootloader's side.
pub fn render_with(
    state: &BootState,
    persistence: &Persistence,
    bootloader: Option<&Bootloader>,
) -> String {
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
        bootloader,
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

    #[test]
    fn the_bootloaders_order_puts_entries_out_of_tries_last() {
        use nx_contract::loader::EntryName;
        let e = |f: &str| {
            let name = EntryName::parse(f).unwrap();
            let (generation, slot) = nx_contract::loader::parse_slot_entry_id(&name.id).unwrap();
            nx_guest::esp::SlotEntry {
                slot,
                generation,
                name,
            }
        };
        let b =
            Bootloader::from_entries(&[e("nexus-2-b+0-3.conf"), e("nexus-1-a.conf")], None, "a");
        assert_eq!(b.entries, ["nexus-1-a.conf", "nexus-2-b+0-3.conf"]);
        assert_eq!(b.next.as_deref(), Some("a"));
        assert!(b.agrees);
        let b = Bootloader::from_entries(&[e("nexus-2-b+3.conf"), e("nexus-1-a.conf")], None, "a");
        assert_eq!(b.next.as_deref(), Some("b"));
        assert!(!b.agrees);
        let j = render_with(
            &BootState::factory_default(),
            &Persistence::Ram("x".into()),
            Some(&b),
        );
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["bootloader"]["next"], "b");
    }
}
