//! bootctld's state machine, snapshot and JSON view, without RPC.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use bootctld::json::{self, Persistence};
use bootctld::machine::{BootState, Health, MachineError, Slot};
use bootctld::service::{Daemon, Markers, RebootVia};
use bootctld::snapshot;
use bootctld::store::Store;
use proptest::prelude::*;
use std::sync::{Arc, Mutex};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn set_active_confirm_mark_bad_are_deterministic() {
    let run = || {
        let mut s = BootState::factory_default();
        s.slot_imaged(Slot::B, "2").unwrap();
        s.set_active(Slot::B, true, 3).unwrap();
        let d = s.boot_attempt("boot-1");
        assert_eq!((d.slot, d.trial, d.tries_left), (Slot::B, true, 2));
        s.confirm("boot-1").unwrap();
        s.mark_bad(Slot::A);
        s
    };
    let (x, y) = (run(), run());
    assert_eq!(x, y);
    assert_eq!(snapshot::encode(&x), snapshot::encode(&y));
    assert_eq!(x.active, Slot::B);
    assert_eq!(x.b.health, Health::Good);
    assert!(!x.b.trial);
    assert_eq!(x.a.health, Health::Bad);
    println!("deterministic snapshot: {}", hex(&snapshot::encode(&x)));
}

#[test]
fn same_state_reached_differently_gives_the_same_bytes() {
    let mut x = BootState::factory_default();
    x.slot_imaged(Slot::B, "2").unwrap();
    x.set_active(Slot::B, true, 3).unwrap();

    let mut y = BootState::factory_default();
    y.slot_imaged(Slot::B, "7").unwrap();
    y.mark_bad(Slot::B);
    y.slot_imaged(Slot::B, "2").unwrap();
    y.set_active(Slot::B, false, 0).unwrap();
    y.set_active(Slot::B, true, 3).unwrap();

    assert_eq!(x, y);
    assert_eq!(snapshot::encode(&x), snapshot::encode(&y));
}

#[test]
fn trial_try_counting_and_rollback() {
    let mut s = BootState::factory_default();
    s.slot_imaged(Slot::B, "2").unwrap();
    s.set_active(Slot::B, true, 3).unwrap();
    let mut seen = Vec::new();
    for boot in 1..=5 {
        let d = s.boot_attempt(&format!("boot-{boot}"));
        seen.push((d.slot, d.trial, d.tries_left, d.rolled_back, d.marked_bad));
        s.validate().unwrap();
    }
    assert_eq!(
        seen,
        vec![
            (Slot::B, true, 2, false, None),
            (Slot::B, true, 1, false, None),
            (Slot::B, true, 0, false, None),
            (Slot::A, false, 0, true, Some(Slot::B)),
            (Slot::A, false, 0, false, None),
        ]
    );
    assert_eq!(s.b.health, Health::Bad);
    // Sticky: b cannot be activated again until re-imaged.
    assert_eq!(
        s.set_active(Slot::B, true, 3),
        Err(MachineError::SlotBad(Slot::B))
    );
}

#[test]
fn rollback_needs_a_good_other_slot() {
    let mut s = BootState::factory_default();
    s.slot_imaged(Slot::B, "2").unwrap();
    s.set_active(Slot::B, true, 1).unwrap();
    s.mark_bad(Slot::A);
    assert_eq!(s.active, Slot::B);
    assert!(s.boot_attempt("1").bootable);
    let d = s.boot_attempt("2");
    assert!(
        !d.bootable,
        "no good slot left: the init must boot recovery"
    );
    assert_eq!(d.marked_bad, Some(Slot::B));
}

#[test]
fn snapshot_roundtrip_is_byte_stable() {
    let mut s = BootState::factory_default();
    let factory = snapshot::encode(&s);
    println!(
        "factory snapshot ({} bytes): {}",
        factory.len(),
        hex(&factory)
    );
    // Golden: a change here is a snapshot format change (bump FORMAT, migrate).
    assert_eq!(
        hex(&factory),
        "0000000005000000000000000100020001000000000000000400000001000000\
         fcffffff000000000200000000000000"
    );
    for step in 0..4 {
        match step {
            0 => s.slot_imaged(Slot::B, "2.0.1").unwrap(),
            1 => s.set_active(Slot::B, true, 3).unwrap(),
            2 => {
                s.boot_attempt("6f1f0f3e-6a55-4a9e-9d1a-2a3c4b5d6e7f");
            }
            _ => {
                s.confirm("6f1f0f3e-6a55-4a9e-9d1a-2a3c4b5d6e7f").unwrap();
            }
        }
        let bytes = snapshot::encode(&s);
        let back = snapshot::decode(&bytes).unwrap();
        assert_eq!(back, s, "decode(encode(s)) == s at step {step}");
        assert_eq!(
            snapshot::encode(&back),
            bytes,
            "encode is stable at step {step}"
        );
        assert!(snapshot::is_canonical(&bytes));
    }
}

#[test]
fn json_view_is_stable_and_complete() {
    let mut s = BootState::factory_default();
    s.slot_imaged(Slot::B, "2").unwrap();
    s.set_active(Slot::B, true, 3).unwrap();
    s.boot_attempt("boot-1");
    let p = Persistence::File("/state/bootctl/state.nxs".into());
    let j = json::render(&s, &p);
    println!("{j}");
    assert_eq!(j, json::render(&s, &p));
    assert_eq!(
        j,
        r#"{
  "format": 1,
  "storage": "persistent",
  "snapshot": "/state/bootctl/state.nxs",
  "active": "b",
  "slots": {
    "a": {
      "health": "good",
      "trial": false,
      "tries_left": 0,
      "version": ""
    },
    "b": {
      "health": "unknown",
      "trial": true,
      "tries_left": 2,
      "version": "2"
    }
  },
  "last_boot": {
    "slot": "b",
    "trial": true,
    "boot_id": "boot-1"
  }
}
"#
    );
    let ram = json::render(&s, &Persistence::Ram("state dir /state is missing".into()));
    let v: serde_json::Value = serde_json::from_str(&ram).unwrap();
    assert_eq!(
        v["storage"],
        "ram-only stub/placeholder: state dir /state is missing"
    );
    assert!(v["snapshot"].is_null());
}

fn collecting() -> (Markers, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    (
        Markers::new(move |m: &str| {
            println!("{m}");
            l.lock().unwrap().push(m.to_string());
        }),
        log,
    )
}

#[test]
fn daemon_persists_atomically_and_prints_markers() {
    let dir = tempfile::tempdir().unwrap();
    let opened = Store::open(Some(dir.path()), false);
    assert!(opened.store.is_persistent());
    let (markers, log) = collecting();
    let mut d = Daemon::new(
        opened.state,
        opened.store,
        "boot-1".into(),
        RebootVia::Stub("test".into()),
        markers,
    );
    let snap = dir.path().join("bootctl/state.nxs");
    assert!(!snap.exists(), "nothing is written before the first change");
    d.slot_imaged(Slot::B, "2").unwrap();
    d.set_active(Slot::B, true, 3).unwrap();
    assert_eq!(
        snapshot::decode(&std::fs::read(&snap).unwrap()).unwrap(),
        *d.state()
    );
    // A refused change writes nothing and prints no marker.
    let before = std::fs::read(&snap).unwrap();
    assert!(d.set_active(Slot::A, true, 0).is_err());
    assert_eq!(std::fs::read(&snap).unwrap(), before);
    d.boot_attempt().unwrap();
    d.confirm().unwrap();
    d.mark_bad(Slot::A).unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "bootctl: slotImaged slot=b version=2",
            "bootctl: setActive slot=b trial=true tries=3",
            "bootctl: bootAttempt slot=b trial=true tries=2",
            "bootctl: confirm",
            "bootctl: markBad slot=a",
        ]
    );
    let names: Vec<_> = std::fs::read_dir(dir.path().join("bootctl"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["state.nxs"], "no temp file left behind");
}

#[test]
fn corrupt_snapshot_is_kept_aside() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bootctl")).unwrap();
    std::fs::write(dir.path().join("bootctl/state.nxs"), b"not capnp").unwrap();
    let opened = Store::open(Some(dir.path()), false);
    assert!(opened.store.is_persistent());
    assert_eq!(opened.state, BootState::factory_default());
    assert!(opened.notes[0].contains("corrupt"), "{:?}", opened.notes);
    assert_eq!(
        std::fs::read(dir.path().join("bootctl/state.nxs.corrupt")).unwrap(),
        b"not capnp"
    );
}

#[test]
fn missing_state_dir_is_ram_only_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("state");
    let opened = Store::open(Some(&missing), false);
    assert!(!opened.store.is_persistent());
    assert!(
        opened.notes[0].contains("stub/placeholder"),
        "{:?}",
        opened.notes
    );
    let (markers, _log) = collecting();
    let mut d = Daemon::new(
        opened.state,
        opened.store,
        "b".into(),
        RebootVia::Stub("test".into()),
        markers,
    );
    d.slot_imaged(Slot::B, "2").unwrap();
    assert!(
        !missing.exists(),
        "RAM-only mode never creates the state dir"
    );
    assert!(d.json().contains("ram-only stub/placeholder"));
}

#[derive(Debug, Clone)]
enum Op {
    SetActive(Slot, bool, u8),
    Confirm(u8),
    MarkBad(Slot),
    Imaged(Slot, u8),
    Attempt(u8),
}

fn slot() -> impl Strategy<Value = Slot> {
    prop_oneof![Just(Slot::A), Just(Slot::B)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (slot(), any::<bool>(), 0u8..17).prop_map(|(s, t, n)| Op::SetActive(s, t, n)),
        (0u8..3).prop_map(Op::Confirm),
        slot().prop_map(Op::MarkBad),
        (slot(), 0u8..3).prop_map(|(s, v)| Op::Imaged(s, v)),
        (0u8..3).prop_map(Op::Attempt),
    ]
}

fn apply(s: &mut BootState, op: &Op) -> bool {
    match op {
        Op::SetActive(sl, t, n) => s.set_active(*sl, *t, *n).is_ok(),
        Op::Confirm(b) => s.confirm(&format!("boot-{b}")).is_ok(),
        Op::MarkBad(sl) => {
            s.mark_bad(*sl);
            true
        }
        Op::Imaged(sl, v) => s.slot_imaged(*sl, &format!("v{v}")).is_ok(),
        Op::Attempt(b) => {
            s.boot_attempt(&format!("boot-{b}"));
            true
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_op_sequence_keeps_invariants_and_roundtrips(ops in prop::collection::vec(op(), 0..40)) {
        let mut s = BootState::factory_default();
        let mut twin = BootState::factory_default();
        for op in &ops {
            let before = s.clone();
            let ok = apply(&mut s, op);
            if !ok {
                prop_assert_eq!(&s, &before, "a refused op must not change the state");
            }
            apply(&mut twin, op);
            prop_assert!(s.validate().is_ok(), "{:?} after {:?}", s, op);
            let bytes = snapshot::encode(&s);
            prop_assert_eq!(&snapshot::encode(&twin), &bytes);
            let back = snapshot::decode(&bytes).unwrap();
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(snapshot::encode(&back), bytes);
        }
    }
}
