//! The canonical Cap'n Proto snapshot of a [`BootState`].
//!
//! Format: one `BootState` message (proto/schema/bootctl.capnp) in canonical
//! form (single segment, `set_root_canonical`), written with the standard
//! stream framing (a one-segment table: `u32 0`, `u32 words`). The same state
//! always gives the same bytes, and `decode(encode(s)) == s`. Empty texts and
//! an absent `lastBoot` are left as null pointers. Debug with
//! `capnp decode proto/schema/bootctl.capnp BootState < state.nxs`.

use crate::machine::{BootState, Health, LastBoot, MachineError, Slot, SlotInfo};
use proto::rpc::bootctl_capnp::{self as schema, boot_state, last_boot, slot_info};

/// The snapshot format version in `BootState.format`.
pub const FORMAT: u16 = 1;
/// Bound for a snapshot file (the real size is ~150 bytes).
pub const MAX_SNAPSHOT_BYTES: usize = 16 * 1024;

/// Errors decoding a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Not a valid Cap'n Proto message.
    #[error("not a valid BootState message: {0}")]
    Capnp(#[from] capnp::Error),
    /// An enum value this build does not know.
    #[error("unknown enum value {0} in the snapshot")]
    NotInSchema(u16),
    /// A newer or unknown format.
    #[error("unsupported snapshot format {0} (this bootctld reads format {FORMAT})")]
    Format(u16),
    /// Bytes after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// Too large to be ours.
    #[error("snapshot is {0} bytes, more than the {MAX_SNAPSHOT_BYTES}-byte bound")]
    TooLarge(usize),
    /// Decoded, but breaks an invariant.
    #[error(transparent)]
    Invalid(#[from] MachineError),
}

impl From<capnp::NotInSchema> for SnapshotError {
    fn from(e: capnp::NotInSchema) -> Self {
        SnapshotError::NotInSchema(e.0)
    }
}

/// Machine slot → schema slot.
pub fn slot_to_schema(s: Slot) -> schema::Slot {
    match s {
        Slot::A => schema::Slot::A,
        Slot::B => schema::Slot::B,
    }
}

impl From<Slot> for schema::Slot {
    fn from(s: Slot) -> Self {
        slot_to_schema(s)
    }
}

/// Schema slot → machine slot.
pub fn slot_from_schema(s: schema::Slot) -> Slot {
    match s {
        schema::Slot::A => Slot::A,
        schema::Slot::B => Slot::B,
    }
}

fn health_to_schema(h: Health) -> schema::Health {
    match h {
        Health::Empty => schema::Health::Empty,
        Health::Unknown => schema::Health::Unknown,
        Health::Good => schema::Health::Good,
        Health::Bad => schema::Health::Bad,
    }
}

fn health_from_schema(h: schema::Health) -> Health {
    match h {
        schema::Health::Empty => Health::Empty,
        schema::Health::Unknown => Health::Unknown,
        schema::Health::Good => Health::Good,
        schema::Health::Bad => Health::Bad,
    }
}

fn fill_slot(mut b: slot_info::Builder<'_>, i: &SlotInfo) {
    b.set_health(health_to_schema(i.health));
    b.set_trial(i.trial);
    b.set_tries_left(i.tries_left);
    if !i.version.is_empty() {
        b.set_version(i.version.as_str());
    }
}

/// Write `s` into a `BootState` builder (used for the snapshot and for RPC replies).
pub fn fill(mut b: boot_state::Builder<'_>, s: &BootState) {
    b.set_format(FORMAT);
    b.set_active(slot_to_schema(s.active));
    fill_slot(b.reborrow().init_slot_a(), &s.a);
    fill_slot(b.reborrow().init_slot_b(), &s.b);
    if let Some(lb) = &s.last_boot {
        let mut l = b.init_last_boot();
        l.set_valid(true);
        l.set_slot(slot_to_schema(lb.slot));
        l.set_trial(lb.trial);
        if !lb.boot_id.is_empty() {
            l.set_boot_id(lb.boot_id.as_str());
        }
    }
}

fn text(t: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, SnapshotError> {
    let t = t?;
    Ok(t.to_str()
        .map_err(|_| capnp::Error::failed("text is not UTF-8".into()))?
        .to_string())
}

fn read_slot(r: slot_info::Reader<'_>) -> Result<SlotInfo, SnapshotError> {
    Ok(SlotInfo {
        health: health_from_schema(r.get_health()?),
        trial: r.get_trial(),
        tries_left: r.get_tries_left(),
        version: if r.has_version() {
            text(r.get_version())?
        } else {
            String::new()
        },
    })
}

fn read_last_boot(r: last_boot::Reader<'_>) -> Result<Option<LastBoot>, SnapshotError> {
    if !r.get_valid() {
        return Ok(None);
    }
    Ok(Some(LastBoot {
        slot: slot_from_schema(r.get_slot()?),
        trial: r.get_trial(),
        boot_id: if r.has_boot_id() {
            text(r.get_boot_id())?
        } else {
            String::new()
        },
    }))
}

/// Read a `BootState` (snapshot or RPC reply) and check its invariants.
pub fn read(r: boot_state::Reader<'_>) -> Result<BootState, SnapshotError> {
    let format = r.get_format();
    if format != FORMAT {
        return Err(SnapshotError::Format(format));
    }
    let state = BootState {
        active: slot_from_schema(r.get_active()?),
        a: read_slot(r.get_slot_a()?)?,
        b: read_slot(r.get_slot_b()?)?,
        last_boot: if r.has_last_boot() {
            read_last_boot(r.get_last_boot()?)?
        } else {
            None
        },
    };
    state.validate()?;
    Ok(state)
}

/// The canonical snapshot bytes of `s`.
pub fn encode(s: &BootState) -> Vec<u8> {
    let mut scratch = capnp::message::Builder::new_default();
    fill(scratch.init_root::<boot_state::Builder<'_>>(), s);
    let mut canonical = capnp::message::Builder::new_default();
    let reader = scratch.get_root_as_reader::<boot_state::Reader<'_>>();
    match reader.and_then(|r| canonical.set_root_canonical(r)) {
        Ok(()) => capnp::serialize::write_message_to_words(&canonical),
        // Unreachable for a message we just built; keep the non-canonical form
        // rather than lose the state.
        Err(_) => capnp::serialize::write_message_to_words(&scratch),
    }
}

/// Decode snapshot bytes (bounded, no trailing bytes, invariants checked).
pub fn decode(bytes: &[u8]) -> Result<BootState, SnapshotError> {
    if bytes.len() > MAX_SNAPSHOT_BYTES {
        return Err(SnapshotError::TooLarge(bytes.len()));
    }
    let mut opts = capnp::message::ReaderOptions::new();
    opts.traversal_limit_in_words(Some(MAX_SNAPSHOT_BYTES / 8))
        .nesting_limit(16);
    let mut rest = bytes;
    let msg = capnp::serialize::read_message_from_flat_slice(&mut rest, opts)?;
    if !rest.is_empty() {
        return Err(SnapshotError::Trailing(rest.len()));
    }
    read(msg.get_root::<boot_state::Reader<'_>>()?)
}

/// Whether `bytes` are exactly the canonical encoding of what they decode to.
pub fn is_canonical(bytes: &[u8]) -> bool {
    decode(bytes).is_ok_and(|s| encode(&s) == bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_is_byte_stable() {
        let mut s = BootState::factory_default();
        let e0 = encode(&s);
        assert_eq!(decode(&e0).unwrap(), s);
        assert_eq!(encode(&decode(&e0).unwrap()), e0);
        s.slot_imaged(Slot::B, "2").unwrap();
        s.set_active(Slot::B, true, 3).unwrap();
        s.boot_attempt("0f0e0d0c-0000-4000-8000-000000000000");
        let e1 = encode(&s);
        assert_ne!(e0, e1);
        assert_eq!(decode(&e1).unwrap(), s);
        assert_eq!(encode(&decode(&e1).unwrap()), e1);
        assert!(is_canonical(&e1));
        // single segment framing
        assert_eq!(&e1[0..4], &[0, 0, 0, 0]);
    }

    #[test]
    fn rejects_garbage_trailing_and_oversize() {
        assert!(decode(b"").is_err());
        assert!(decode(&[0xff; 64]).is_err());
        let mut e = encode(&BootState::factory_default());
        e.extend_from_slice(&[0; 8]);
        assert!(matches!(decode(&e), Err(SnapshotError::Trailing(8))));
        assert!(matches!(
            decode(&vec![0; MAX_SNAPSHOT_BYTES + 1]),
            Err(SnapshotError::TooLarge(_))
        ));
    }
}
