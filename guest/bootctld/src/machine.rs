//! The slot-state machine: pure, deterministic, no I/O.
//!
//! Two slots, `a` and `b`. Per slot: a [`Health`], a trial flag, the trial
//! tries left, an informational version. One slot is active (the one the next
//! normal boot uses). See docs/updates/bootctl.md for the transition table.
//!
//! Invariants ([`BootState::validate`]):
//! * only the active slot can be in trial;
//! * not in trial ⇒ `tries_left == 0`; in trial ⇒ `tries_left <= MAX_TRIES`;
//! * a `bad` or `empty` slot is never in trial;
//! * versions and boot ids are short printable ASCII.

use std::fmt;

/// Maximum trial tries `setActive` accepts.
pub const MAX_TRIES: u8 = 15;
/// Maximum length of a slot version string.
pub const MAX_VERSION_LEN: usize = 64;
/// Maximum length of a boot id.
pub const MAX_BOOT_ID_LEN: usize = 64;

/// A slot name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    /// `system_a`.
    A,
    /// `system_b`.
    B,
}

impl Slot {
    /// Both slots, in order.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `'a'` / `'b'` (how the ESP's entries name it).
    pub fn as_char(self) -> char {
        match self {
            Slot::A => 'a',
            Slot::B => 'b',
        }
    }

    /// `a` / `b`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// Parse `a` / `b`.
    pub fn parse(s: &str) -> Option<Slot> {
        match s {
            "a" => Some(Slot::A),
            "b" => Some(Slot::B),
            _ => None,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health of a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Never imaged: never booted, never a rollback target.
    Empty,
    /// Imaged, not yet confirmed healthy.
    Unknown,
    /// Confirmed healthy by a boot of it.
    Good,
    /// Sticky: only a re-image (`slot_imaged`) clears it.
    Bad,
}

impl Health {
    /// Lower-case name (JSON view, CLI).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Empty => "empty",
            Health::Unknown => "unknown",
            Health::Good => "good",
            Health::Bad => "bad",
        }
    }

    /// Whether a slot in this health can be booted at all.
    pub fn bootable(self) -> bool {
        matches!(self, Health::Unknown | Health::Good)
    }
}

/// One slot's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Health.
    pub health: Health,
    /// In trial: each boot spends one try.
    pub trial: bool,
    /// Trial boots left (0 when not in trial).
    pub tries_left: u8,
    /// Informational version ("" when unknown).
    pub version: String,
}

impl SlotInfo {
    fn new(health: Health) -> Self {
        SlotInfo {
            health,
            trial: false,
            tries_left: 0,
            version: String::new(),
        }
    }

    fn end_trial(&mut self) {
        self.trial = false;
        self.tries_left = 0;
    }
}

/// What `boot_attempt` chose in the boot identified by `boot_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastBoot {
    /// The slot booted.
    pub slot: Slot,
    /// Whether it booted as a trial.
    pub trial: bool,
    /// `/proc/sys/kernel/random/boot_id` of that boot.
    pub boot_id: String,
}

/// The whole slot table (and the persisted snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootState {
    /// The slot the next normal boot uses.
    pub active: Slot,
    /// Slot `a`.
    pub a: SlotInfo,
    /// Slot `b`.
    pub b: SlotInfo,
    /// The last boot decision (`None` until the first `boot_attempt`, or when
    /// it no longer applies).
    pub last_boot: Option<LastBoot>,
}

/// The answer of `boot_attempt`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDecision {
    /// False: no slot can boot; the caller boots recovery.
    pub bootable: bool,
    /// The slot to boot (meaningless when not bootable: the active slot).
    pub slot: Slot,
    /// Booting it as a trial.
    pub trial: bool,
    /// Tries left after this boot's try.
    pub tries_left: u8,
    /// The active slot failed (tries spent or bad) and the other took over.
    pub rolled_back: bool,
    /// The version of the slot.
    pub version: String,
    /// Slot marked bad by this attempt (tries exhausted), for the marker.
    pub marked_bad: Option<Slot>,
}

/// A refused transition. Messages say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MachineError {
    /// setActive on a bad slot.
    #[error("slot {0} is marked bad (sticky); re-image it first (flashd reports the install with slotImaged), then activate it")]
    SlotBad(Slot),
    /// setActive on a never-imaged slot.
    #[error("slot {0} is empty (never imaged); flash an image into it first")]
    SlotEmpty(Slot),
    /// Trial tries out of range.
    #[error("trial tries must be 1..={MAX_TRIES}, got {0}")]
    BadTries(u8),
    /// tries given without trial.
    #[error("tries must be 0 unless trial is set (got {0})")]
    TriesWithoutTrial(u8),
    /// confirm outside a boot that called boot_attempt.
    #[error("nothing to confirm: no slot was booted in this boot (bootAttempt was not called since the guest started — e.g. in recovery)")]
    NothingBooted,
    /// confirm of a slot marked bad after it booted.
    #[error("slot {0} was marked bad after it booted; it cannot be confirmed until re-imaged")]
    ConfirmBad(Slot),
    /// slotImaged on the active, healthy slot.
    #[error("slot {0} is the active slot; install into the inactive slot {other}", other = .0.other())]
    ImagedActive(Slot),
    /// A version string that is too long or not printable ASCII.
    #[error("invalid version {0:?}: at most {MAX_VERSION_LEN} printable ASCII characters")]
    BadVersion(String),
    /// A decoded snapshot that breaks an invariant.
    #[error("inconsistent state: {0}")]
    Inconsistent(String),
}

fn printable(s: &str, max: usize) -> bool {
    s.len() <= max && s.bytes().all(|c| (0x20..0x7f).contains(&c))
}

impl Default for BootState {
    fn default() -> Self {
        Self::factory_default()
    }
}

impl BootState {
    /// The state of a fresh device: slot `a` active and good (the factory
    /// image), slot `b` empty.
    pub fn factory_default() -> Self {
        BootState {
            active: Slot::A,
            a: SlotInfo::new(Health::Good),
            b: SlotInfo::new(Health::Empty),
            last_boot: None,
        }
    }

    /// One slot's record.
    pub fn slot(&self, s: Slot) -> &SlotInfo {
        match s {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }

    fn slot_mut(&mut self, s: Slot) -> &mut SlotInfo {
        match s {
            Slot::A => &mut self.a,
            Slot::B => &mut self.b,
        }
    }

    /// Check every invariant (used on decoded snapshots).
    pub fn validate(&self) -> Result<(), MachineError> {
        for s in Slot::ALL {
            let i = self.slot(s);
            if i.trial && s != self.active {
                return Err(MachineError::Inconsistent(format!(
                    "slot {s} is in trial but not active"
                )));
            }
            if !i.trial && i.tries_left != 0 {
                return Err(MachineError::Inconsistent(format!(
                    "slot {s} has {} tries left but is not in trial",
                    i.tries_left
                )));
            }
            if i.tries_left > MAX_TRIES {
                return Err(MachineError::Inconsistent(format!(
                    "slot {s} has {} tries left (max {MAX_TRIES})",
                    i.tries_left
                )));
            }
            if i.trial && !i.health.bootable() {
                return Err(MachineError::Inconsistent(format!(
                    "slot {s} is in trial but {}",
                    i.health.as_str()
                )));
            }
            if !printable(&i.version, MAX_VERSION_LEN) {
                return Err(MachineError::BadVersion(i.version.clone()));
            }
        }
        if let Some(lb) = &self.last_boot {
            if !printable(&lb.boot_id, MAX_BOOT_ID_LEN) {
                return Err(MachineError::Inconsistent(format!(
                    "invalid boot id {:?}",
                    lb.boot_id
                )));
            }
        }
        Ok(())
    }

    /// `setActive(slot, trial, tries)`: the next normal boot uses `slot`.
    /// A trial spends one of `tries` per boot. Ends a trial of the other slot.
    pub fn set_active(&mut self, slot: Slot, trial: bool, tries: u8) -> Result<(), MachineError> {
        if trial && !(1..=MAX_TRIES).contains(&tries) {
            return Err(MachineError::BadTries(tries));
        }
        if !trial && tries != 0 {
            return Err(MachineError::TriesWithoutTrial(tries));
        }
        match self.slot(slot).health {
            Health::Bad => return Err(MachineError::SlotBad(slot)),
            Health::Empty => return Err(MachineError::SlotEmpty(slot)),
            Health::Unknown | Health::Good => {}
        }
        self.slot_mut(slot.other()).end_trial();
        let s = self.slot_mut(slot);
        s.trial = trial;
        s.tries_left = tries;
        self.active = slot;
        Ok(())
    }

    /// `confirm()` in the boot `boot_id`: the slot booted in this boot is good
    /// and its trial ends. Returns that slot.
    pub fn confirm(&mut self, boot_id: &str) -> Result<Slot, MachineError> {
        let slot = match &self.last_boot {
            Some(lb) if lb.boot_id == boot_id => lb.slot,
            _ => return Err(MachineError::NothingBooted),
        };
        let s = self.slot_mut(slot);
        if s.health == Health::Bad {
            return Err(MachineError::ConfirmBad(slot));
        }
        s.health = Health::Good;
        s.end_trial();
        if let Some(lb) = &mut self.last_boot {
            lb.trial = false;
        }
        Ok(slot)
    }

    /// `markBad(slot)`: sticky until re-imaged. If it was active and the other
    /// slot is good, the other slot becomes active. Returns the new active slot
    /// when it changed.
    pub fn mark_bad(&mut self, slot: Slot) -> Option<Slot> {
        let s = self.slot_mut(slot);
        s.health = Health::Bad;
        s.end_trial();
        if self.active == slot && self.slot(slot.other()).health == Health::Good {
            self.active = slot.other();
            return Some(self.active);
        }
        None
    }

    /// `prepareInstall(slot)`: flashd is about to overwrite `slot`, so its old content stops
    /// counting: health `empty`, no trial, no version (a power cut during the install leaves
    /// a slot nobody boots). Refused for the active slot unless it is bad or empty, like
    /// [`BootState::slot_imaged`].
    pub fn prepare_install(&mut self, slot: Slot) -> Result<(), MachineError> {
        if slot == self.active && self.slot(slot).health.bootable() {
            return Err(MachineError::ImagedActive(slot));
        }
        let s = self.slot_mut(slot);
        s.health = Health::Empty;
        s.end_trial();
        s.version.clear();
        if self.last_boot.as_ref().is_some_and(|lb| lb.slot == slot) {
            self.last_boot = None;
        }
        Ok(())
    }

    /// `slotImaged(slot, version)`: flashd finished installing into `slot`.
    /// Clears a sticky `bad`, health becomes `unknown`. Refused for the active
    /// slot unless it is bad or empty (nothing healthy would be overwritten).
    pub fn slot_imaged(&mut self, slot: Slot, version: &str) -> Result<(), MachineError> {
        if !printable(version, MAX_VERSION_LEN) {
            return Err(MachineError::BadVersion(version.chars().take(80).collect()));
        }
        if slot == self.active && self.slot(slot).health.bootable() {
            return Err(MachineError::ImagedActive(slot));
        }
        let s = self.slot_mut(slot);
        s.health = Health::Unknown;
        s.end_trial();
        s.version = version.to_string();
        if self.last_boot.as_ref().is_some_and(|lb| lb.slot == slot) {
            // The booted image is gone: confirming now would vouch for bytes
            // that never booted.
            self.last_boot = None;
        }
        Ok(())
    }

    /// `bootAttempt()` in the boot `boot_id`, called once per boot by the
    /// normal init before it mounts a slot:
    /// 1. an active slot that is not bootable (bad/empty) hands over to the
    ///    other slot when that one is good (rollback);
    /// 2. an active trial slot with 0 tries left is marked bad and hands over
    ///    the same way;
    /// 3. an active trial slot with tries left spends one.
    ///
    /// With no bootable slot the decision is `bootable: false` (boot recovery).
    pub fn boot_attempt(&mut self, boot_id: &str) -> BootDecision {
        let mut rolled_back = false;
        let mut marked_bad = None;
        let cur = self.active;
        if self.slot(cur).trial && self.slot(cur).tries_left == 0 {
            let s = self.slot_mut(cur);
            s.health = Health::Bad;
            s.end_trial();
            marked_bad = Some(cur);
        }
        if !self.slot(cur).health.bootable() && self.slot(cur.other()).health == Health::Good {
            self.active = cur.other();
            rolled_back = true;
        }
        let slot = self.active;
        let bootable = self.slot(slot).health.bootable();
        let s = self.slot_mut(slot);
        if bootable && s.trial {
            s.tries_left = s.tries_left.saturating_sub(1);
        }
        self.record_boot(boot_id, slot, bootable, rolled_back, marked_bad)
    }

    /// The decision for `slot` as the table now stands, remembered as this boot's.
    fn record_boot(
        &mut self,
        boot_id: &str,
        slot: Slot,
        bootable: bool,
        rolled_back: bool,
        marked_bad: Option<Slot>,
    ) -> BootDecision {
        let s = self.slot(slot);
        let decision = BootDecision {
            bootable,
            slot,
            trial: bootable && s.trial,
            tries_left: s.tries_left,
            rolled_back,
            version: s.version.clone(),
            marked_bad,
        };
        self.last_boot = bootable.then(|| LastBoot {
            slot,
            trial: decision.trial,
            boot_id: boot_id.chars().take(MAX_BOOT_ID_LEN).collect(),
        });
        decision
    }

    /// `bootAttempt()` when the bootloader made the decision (systemd-boot booted the entry of
    /// `booted`; `tries_left`: that entry's boot counter after this boot's try, `None` when it
    /// has none): the slot table follows what happened instead of choosing.
    /// 1. The bootloader booted the other slot than the active one: the active slot's entry
    ///    ran out of tries (the bootloader sorts it last) — a trial slot is marked bad — or an
    ///    operator picked the other entry; either way the booted slot becomes active
    ///    (`rolled_back`).
    /// 2. A trial slot's tries are the bootloader's counter (it already spent this boot's).
    /// 3. A booted slot that is bad or empty here is not bootable: the caller boots recovery.
    pub fn boot_attempt_loader(
        &mut self,
        boot_id: &str,
        booted: Slot,
        tries_left: Option<u32>,
    ) -> BootDecision {
        let mut rolled_back = false;
        let mut marked_bad = None;
        let cur = self.active;
        let bootable = self.slot(booted).health.bootable();
        if booted != cur && bootable {
            if self.slot(cur).trial {
                let s = self.slot_mut(cur);
                s.health = Health::Bad;
                s.end_trial();
                marked_bad = Some(cur);
            }
            self.slot_mut(cur).end_trial();
            self.active = booted;
            rolled_back = true;
        }
        let s = self.slot_mut(booted);
        if bootable && s.trial {
            if let Some(left) = tries_left {
                s.tries_left = u8::try_from(left).unwrap_or(MAX_TRIES).min(MAX_TRIES);
            }
        }
        self.record_boot(boot_id, booted, bootable, rolled_back, marked_bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn imaged_b() -> BootState {
        let mut s = BootState::factory_default();
        s.slot_imaged(Slot::B, "2").unwrap();
        s
    }

    #[test]
    fn the_bootloader_decides_and_the_table_follows() {
        // Trial of b: the bootloader spends the tries, bootctld mirrors them.
        let mut s = imaged_b();
        s.set_active(Slot::B, true, 3).unwrap();
        for left in [2, 1] {
            let d = s.boot_attempt_loader("boot", Slot::B, Some(left));
            assert!(d.bootable && d.trial && !d.rolled_back, "{d:?}");
            assert_eq!((d.slot, d.tries_left), (Slot::B, left as u8));
            s.validate().unwrap();
        }
        // Out of tries, the bootloader boots a: b is bad, a active again.
        let d = s.boot_attempt_loader("boot3", Slot::A, None);
        assert!(d.bootable && !d.trial && d.rolled_back, "{d:?}");
        assert_eq!((d.slot, d.marked_bad), (Slot::A, Some(Slot::B)));
        assert_eq!((s.active, s.b.health), (Slot::A, Health::Bad));
        s.validate().unwrap();
        // A confirmed switch: the table follows the bootloader without marking anything.
        let mut s = imaged_b();
        s.set_active(Slot::B, true, 3).unwrap();
        let d = s.boot_attempt_loader("b1", Slot::B, Some(2));
        s.confirm("b1").unwrap();
        assert_eq!(d.slot, Slot::B);
        let d = s.boot_attempt_loader("b2", Slot::A, None);
        assert!(d.rolled_back && d.marked_bad.is_none(), "{d:?}");
        assert_eq!((s.active, s.b.health), (Slot::A, Health::Good));
        // A slot bad here is not booted, whatever the bootloader did.
        s.mark_bad(Slot::B);
        let d = s.boot_attempt_loader("b3", Slot::B, None);
        assert!(!d.bootable);
        assert_eq!(s.active, Slot::A);
        assert_eq!(s.last_boot, None);
    }

    #[test]
    fn factory_default_is_valid() {
        let s = BootState::factory_default();
        s.validate().unwrap();
        assert_eq!(s.active, Slot::A);
        assert_eq!(s.a.health, Health::Good);
        assert_eq!(s.b.health, Health::Empty);
    }

    #[test]
    fn trial_spends_tries_then_rolls_back() {
        let mut s = imaged_b();
        s.set_active(Slot::B, true, 3).unwrap();
        for left in [2, 1, 0] {
            let d = s.boot_attempt("boot");
            assert!(d.bootable && d.trial && !d.rolled_back);
            assert_eq!((d.slot, d.tries_left), (Slot::B, left));
            s.validate().unwrap();
        }
        let d = s.boot_attempt("boot4");
        assert!(d.bootable && !d.trial && d.rolled_back);
        assert_eq!(d.slot, Slot::A);
        assert_eq!(d.marked_bad, Some(Slot::B));
        assert_eq!(s.b.health, Health::Bad);
        assert_eq!(s.active, Slot::A);
        s.validate().unwrap();
    }

    #[test]
    fn confirm_only_in_the_boot_that_booted() {
        let mut s = imaged_b();
        s.set_active(Slot::B, true, 3).unwrap();
        assert_eq!(s.confirm("x"), Err(MachineError::NothingBooted));
        s.boot_attempt("boot1");
        assert_eq!(s.confirm("boot2"), Err(MachineError::NothingBooted));
        assert_eq!(s.confirm("boot1"), Ok(Slot::B));
        assert_eq!(s.b.health, Health::Good);
        assert!(!s.b.trial);
        // Confirmed: later boots do not spend tries.
        let d = s.boot_attempt("boot2");
        assert_eq!((d.slot, d.trial, d.tries_left), (Slot::B, false, 0));
    }

    #[test]
    fn bad_is_sticky_until_reimaged() {
        let mut s = imaged_b();
        s.mark_bad(Slot::B);
        assert_eq!(
            s.set_active(Slot::B, true, 3),
            Err(MachineError::SlotBad(Slot::B))
        );
        s.slot_imaged(Slot::B, "3").unwrap();
        s.set_active(Slot::B, true, 3).unwrap();
        assert_eq!(s.b.version, "3");
    }

    #[test]
    fn mark_bad_active_hands_over_to_good_other() {
        let mut s = imaged_b();
        s.set_active(Slot::B, false, 0).unwrap();
        assert_eq!(s.mark_bad(Slot::B), Some(Slot::A));
        assert_eq!(s.active, Slot::A);
        // Both bad: stays, boot_attempt says recovery.
        assert_eq!(s.mark_bad(Slot::A), None);
        let d = s.boot_attempt("b");
        assert!(!d.bootable);
        assert!(s.last_boot.is_none());
    }

    #[test]
    fn arguments_are_checked() {
        let mut s = imaged_b();
        assert_eq!(
            s.set_active(Slot::B, true, 0),
            Err(MachineError::BadTries(0))
        );
        assert_eq!(
            s.set_active(Slot::B, true, 16),
            Err(MachineError::BadTries(16))
        );
        assert_eq!(
            s.set_active(Slot::B, false, 2),
            Err(MachineError::TriesWithoutTrial(2))
        );
        let mut fresh = BootState::factory_default();
        assert_eq!(
            fresh.set_active(Slot::B, false, 0),
            Err(MachineError::SlotEmpty(Slot::B))
        );
        assert_eq!(
            fresh.slot_imaged(Slot::A, "9"),
            Err(MachineError::ImagedActive(Slot::A))
        );
        assert!(fresh.slot_imaged(Slot::B, "bad\nversion").is_err());
    }

    #[test]
    fn switching_active_ends_the_other_trial() {
        let mut s = imaged_b();
        s.set_active(Slot::B, true, 3).unwrap();
        s.set_active(Slot::A, false, 0).unwrap();
        assert!(!s.b.trial);
        assert_eq!(s.b.tries_left, 0);
        s.validate().unwrap();
    }

    #[test]
    fn reimaging_the_booted_slot_forgets_the_boot() {
        let mut s = imaged_b();
        s.set_active(Slot::B, true, 3).unwrap();
        s.boot_attempt("boot1");
        s.set_active(Slot::A, false, 0).unwrap();
        s.slot_imaged(Slot::B, "4").unwrap();
        assert_eq!(s.confirm("boot1"), Err(MachineError::NothingBooted));
    }
}
