//! The normal boot of an A/B slot (docs/updates/bootctl.md, "The normal init's boot flow").
//!
//! 1. `bootAttempt()` to bootctld: which slot this boot uses. A trial slot spends one try (at
//!    zero tries bootctld marks it bad and rolls back to the other slot if that one is good).
//!    An RPC failure or `bootable = false` → `rebootd.mode("recovery")`: never guess a slot.
//! 2. Mount that slot's `rootfs` segment read-only ([`nx_guest::slotfs`]): the manifest's
//!    signature is checked against `/state/trust` when the device trusts a key, and the rootfs
//!    is read through dm-verity with the manifest's root hash. Print
//!    `init: booted slot=<a|b> version=<v> trial=<true|false>`.
//! 3. Health check: the rootfs mounted and its os-release names a version → `confirm()`
//!    (unless `nexus.confirm=manual`: then the selftest client or `nx boot confirm` does it),
//!    then the anti-rollback floor rises to the slot's `security_version` — only for a
//!    confirmed slot (also at every boot of an already-confirmed one).
//! 4. Unusable rootfs (bad signature, a block dm-verity refuses, not a file system): never
//!    confirm. On trial → reset at once: the bootloader counts the try and falls back to the
//!    other slot when none are left. Not on trial → reset into recovery through the
//!    bootloader's one-shot entry.
//!
//! A problem of the environment (no slot disk, no loop or squashfs driver) is not the slot's
//! fault: the slot is neither confirmed nor marked bad, and the guest stays up.
//!
//! The flow is written against two small traits so every branch is tested on the host.

use bootctld::machine::{BootDecision, Slot};
use nx_contract::{markers, Marker};
use nx_guest::slotfs::{Mounted, SlotFsError};

/// The calls the boot flow makes to bootctld and rebootd.
pub trait Daemons {
    /// `bootctld.bootAttempt()`.
    fn boot_attempt(&mut self) -> Result<BootDecision, String>;
    /// `bootctld.confirm()`.
    fn confirm(&mut self) -> Result<(), String>;
    /// `bootctld.markBad(slot)`.
    fn mark_bad(&mut self, slot: Slot) -> Result<(), String>;
    /// `rebootd.mode(target)`: `Ok(true)` = a real reboot is under way.
    fn reboot(&mut self, target: &str) -> Result<bool, String>;
    /// Raise the anti-rollback floor in the trust store to `security_version` (never lowers
    /// it); returns the floor in force.
    fn raise_floor(&mut self, security_version: u64) -> Result<u64, String>;
}

/// Why mounting a slot failed.
#[derive(Debug)]
pub enum MountError {
    /// The partition `system_<slot>` does not exist (no slot disk attached).
    NoPartition(String),
    /// The slot's content or the environment failed (see [`SlotFsError::is_slot_fault`]).
    Slot(SlotFsError),
}

/// Mounts a slot's rootfs.
pub trait Mounter {
    /// Is there a slot disk at all (both slot partitions present)? Checked before
    /// `bootAttempt`, so a boot without the disk never spends a trial try. `Err`: why not.
    fn slot_disk(&mut self) -> Result<(), String>;
    /// Mount the rootfs of `slot` read-only.
    fn mount(&mut self, slot: Slot) -> Result<Mounted, MountError>;
}

/// What PID 1 does after the boot flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The slot booted (confirmed unless `confirmed == false`); print `init: ready`.
    Up { slot: Slot, confirmed: bool },
    /// Running without a usable rootfs and without rebooting (environment fault, or the
    /// reboot could not be carried out); print `init: ready` with what is missing.
    Degraded { why: String },
    /// A reboot was requested and is under way: go straight to the PID 1 loop, which
    /// receives rebootd's SIGTERM.
    Rebooting { target: &'static str },
    /// PID 1 resets the machine itself (no services run yet): with `recovery`, after setting
    /// the bootloader's one-shot entry to recovery.
    Reset { recovery: bool },
}

/// Options from the kernel command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Options {
    /// `nexus.confirm=manual`: do not confirm; leave it to the selftest client / operator.
    pub manual_confirm: bool,
}

/// Whether a factory wipe is pending on `/state` (`STATE/boot/factory_wipe`, see
/// `nx_reset::pending`): `Some(why)` when the normal boot must not happen. A valid request,
/// an invalid one (recovery-init removes it) and an unreadable one all count: only
/// recovery-init decides about a request, and a half-wiped `/state` never boots normal.
pub fn wipe_pending(state_root: &std::path::Path) -> Option<String> {
    match nx_reset::pending(state_root) {
        Ok(nx_reset::Pending::None) => None,
        Ok(nx_reset::Pending::Requested { attempts: 0 }) => {
            Some("a factory wipe was requested".into())
        }
        Ok(nx_reset::Pending::Requested { attempts }) => Some(format!(
            "a factory wipe was started {attempts} time(s) and never completed"
        )),
        Ok(nx_reset::Pending::Invalid { content }) => Some(format!(
            "an invalid factory-wipe request ({content:?}) is on /state; recovery-init removes it"
        )),
        Err(e) => Some(format!("the factory-wipe request cannot be read ({e})")),
    }
}

/// A factory wipe is pending: never mount or confirm a slot, ask rebootd for recovery, where
/// recovery-init performs the wipe (defence in depth: the boot firmware already boots
/// recovery while the request exists).
pub fn refuse_for_wipe(
    daemons: &mut dyn Daemons,
    why: &str,
    emit: &mut dyn FnMut(&Marker),
) -> Outcome {
    emit(&markers::init::refuse_for_wipe(why));
    reboot(daemons, "recovery", emit)
}

/// What the bootloader booted: `nexus.slot=` of the entry's command line, and whether the
/// entry counts tries (`LoaderBootCountPath` is set: the slot is on trial).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Booted {
    pub slot: Slot,
    pub counted: bool,
}

/// Phase 1 (before any service runs — the services live in the rootfs): mount the rootfs of
/// the slot the bootloader booted. `Err`: what PID 1 does instead (degraded without a slot
/// disk or a bootloader; a reset when the slot's rootfs is unusable — on trial the bootloader
/// counts the try and falls back by itself, otherwise recovery through the one-shot entry).
pub fn mount_booted(
    mounter: &mut dyn Mounter,
    booted: Option<Booted>,
    emit: &mut dyn FnMut(&Marker),
) -> Result<(Booted, Mounted), Outcome> {
    if let Err(why) = mounter.slot_disk() {
        let why = markers::init::no_slot_disk_why(why);
        emit(&markers::init::note(&why));
        return Err(Outcome::Degraded { why });
    }
    let Some(b) = booted else {
        let why = markers::init::not_from_bootloader_why();
        emit(&markers::init::note(&why));
        return Err(Outcome::Degraded { why });
    };
    emit(&markers::init::loader_slot(b.slot, b.counted));
    match mounter.mount(b.slot) {
        Ok(m) => {
            let how = match m.check.root_prefix() {
                Some(root) => {
                    emit(&markers::init::rootfs_verity(root));
                    "dm-verity"
                }
                None => {
                    emit(&markers::init::rootfs_hashed(m.rootfs_bytes));
                    "whole-segment hash"
                }
            };
            emit(&markers::init::rootfs_mount_took(m.took.as_millis(), how));
            Ok((b, m))
        }
        Err(MountError::NoPartition(why)) => {
            let why = markers::init::no_partition_why(why, b.slot);
            emit(&markers::init::note(&why));
            Err(Outcome::Degraded { why })
        }
        Err(MountError::Slot(e)) if !e.is_slot_fault() => {
            let why = markers::init::check_failed_why(b.slot, e);
            emit(&markers::init::error(&why));
            Err(Outcome::Degraded { why })
        }
        Err(MountError::Slot(e)) => {
            emit(&markers::init::rootfs_unusable(b.slot, b.counted, e));
            if b.counted {
                emit(&markers::init::reset_for_next_try(b.slot));
                Err(Outcome::Reset { recovery: false })
            } else {
                emit(&markers::init::reset_to_recovery(format_args!(
                    "slot={} is not on trial and its rootfs is unusable",
                    b.slot
                )));
                Err(Outcome::Reset { recovery: true })
            }
        }
    }
}

/// The first line of the rootfs's `/etc/motd` (bounded, printable), if any.
pub fn motd(root: &std::path::Path) -> Option<String> {
    let text = nx_guest::bounded::read_string_opt(&root.join("etc/motd"), 4096)
        .ok()
        .flatten()?;
    let line: String = text
        .lines()
        .next()?
        .chars()
        .take(160)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    (!line.trim().is_empty()).then_some(line)
}

/// Phase 2 (the services run from the mounted rootfs): `bootAttempt` (bootctld follows what
/// the bootloader did), the health check, `confirm`.
pub fn after_mount(
    daemons: &mut dyn Daemons,
    booted: Booted,
    mounted: &Mounted,
    opts: Options,
    emit: &mut dyn FnMut(&Marker),
) -> Outcome {
    let d = match daemons.boot_attempt() {
        Ok(d) => d,
        Err(e) => {
            emit(&markers::init::boot_attempt_failed(e));
            return reboot(daemons, "recovery", emit);
        }
    };
    if !d.bootable {
        emit(&markers::init::no_bootable_slot());
        return reboot(daemons, "recovery", emit);
    }
    let slot = booted.slot;
    emit(&markers::init::boot_attempt(
        d.slot,
        d.trial,
        d.tries_left,
        d.rolled_back,
    ));
    if d.slot != slot {
        let why = format!(
            "bootctld answered slot={} but the bootloader booted slot={slot} (is bootctld started without --efivars?)",
            d.slot
        );
        emit(&markers::init::error(&why));
        return reboot(daemons, "recovery", emit);
    }
    emit(&markers::init::booted(slot, &mounted.version, d.trial));
    if !d.version.is_empty() && d.version != mounted.image_version {
        emit(&markers::init::version_note(
            &d.version,
            slot,
            &mounted.image_version,
        ));
    }
    emit(&markers::init::health_ok(
        slot,
        mounted.rootfs_bytes,
        mounted.device.display(),
        mounted.mountpoint.display(),
        &mounted.version,
    ));
    if let Some(line) = motd(&mounted.mountpoint) {
        emit(&markers::init::motd(line));
    }
    if opts.manual_confirm {
        if !d.trial {
            // Confirmed before (maybe by hand, or a power cut came between the confirm and
            // the floor): catch the floor up.
            raise_floor(daemons, slot, mounted.security_version, emit);
        }
        emit(&markers::init::manual_confirm(slot));
        return Outcome::Up {
            slot,
            confirmed: false,
        };
    }
    match daemons.confirm() {
        Ok(()) => {
            emit(&markers::init::confirmed(slot));
            raise_floor(daemons, slot, mounted.security_version, emit);
            Outcome::Up {
                slot,
                confirmed: true,
            }
        }
        Err(e) => {
            emit(&markers::init::confirm_failed(slot, e));
            Outcome::Up {
                slot,
                confirmed: false,
            }
        }
    }
}

/// The floor rises only for a confirmed slot: after its confirm, or at every boot of an
/// already-confirmed slot (which catches up a confirm made by hand with `nx boot confirm` or a
/// power cut between the confirm and the floor write). Never at install, never for a trial.
fn raise_floor(
    daemons: &mut dyn Daemons,
    slot: Slot,
    security_version: u64,
    emit: &mut dyn FnMut(&Marker),
) {
    match daemons.raise_floor(security_version) {
        Ok(floor) => emit(&markers::init::floor(floor, slot, security_version)),
        Err(e) => emit(&markers::init::floor_failed(e)),
    }
}

fn reboot(
    daemons: &mut dyn Daemons,
    target: &'static str,
    emit: &mut dyn FnMut(&Marker),
) -> Outcome {
    match daemons.reboot(target) {
        Ok(true) => {
            emit(&markers::init::reboot_requested(target));
            Outcome::Rebooting { target }
        }
        Ok(false) => {
            let why = markers::init::reboot_stub_why(target);
            emit(&markers::init::error(&why));
            Outcome::Degraded { why }
        }
        Err(e) => {
            let why = markers::init::reboot_failed_why(target, e);
            emit(&markers::init::error(&why));
            Outcome::Degraded { why }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nx_guest::slotfs::RootfsCheck;
    use proto::manifest::Segment;
    use std::path::PathBuf;

    #[derive(Default)]
    struct Fake {
        decision: Option<BootDecision>,
        confirm_fails: bool,
        reboot_ok: Option<bool>,
        calls: Vec<String>,
    }

    impl Daemons for Fake {
        fn boot_attempt(&mut self) -> Result<BootDecision, String> {
            self.calls.push("bootAttempt".into());
            self.decision.clone().ok_or_else(|| "no bootctld".into())
        }
        fn confirm(&mut self) -> Result<(), String> {
            self.calls.push("confirm".into());
            if self.confirm_fails {
                Err("refused".into())
            } else {
                Ok(())
            }
        }
        fn mark_bad(&mut self, slot: Slot) -> Result<(), String> {
            self.calls.push(format!("markBad {slot}"));
            Ok(())
        }
        fn reboot(&mut self, target: &str) -> Result<bool, String> {
            self.calls.push(format!("reboot {target}"));
            self.reboot_ok.ok_or_else(|| "no rebootd".into())
        }
        fn raise_floor(&mut self, security_version: u64) -> Result<u64, String> {
            self.calls.push(format!("raiseFloor {security_version}"));
            Ok(security_version.max(1))
        }
    }

    enum M {
        Ok,
        NoDisk,
        NoPart,
        SlotFault,
        EnvFault,
        /// dm-verity refused the superblock (a corrupted block).
        Corrupted,
        /// No device mapper in the kernel.
        NoDm,
    }

    struct Mnt(M, Vec<Slot>);

    impl Mounter for Mnt {
        fn slot_disk(&mut self) -> Result<(), String> {
            match self.0 {
                M::NoDisk => Err("no partition system_a".into()),
                _ => Ok(()),
            }
        }
        fn mount(&mut self, slot: Slot) -> Result<Mounted, MountError> {
            self.1.push(slot);
            match self.0 {
                M::Ok => Ok(Mounted {
                    device: PathBuf::from("/dev/dm-0"),
                    mountpoint: PathBuf::from("/sysroot"),
                    version: "2".into(),
                    image_version: "2".into(),
                    rootfs_bytes: 4096,
                    security_version: 2,
                    check: RootfsCheck::Verity {
                        hash: Box::new(Segment {
                            name: "rootfs-verity".into(),
                            offset: 8192,
                            size: 4096,
                            sha256: [0; 32],
                            data_sha256: [0; 32],
                            chunk_sha256: vec![],
                            data_ranges: vec![],
                        }),
                        salt: vec![1],
                        root_hash: [0xab; 32],
                    },
                    took: std::time::Duration::from_millis(7),
                }),
                M::NoPart | M::NoDisk => {
                    Err(MountError::NoPartition("no partition system_b".into()))
                }
                M::SlotFault => Err(MountError::Slot(SlotFsError::NoImage {
                    path: "/dev/vdb2".into(),
                    reason: "blank".into(),
                })),
                M::Corrupted => Err(MountError::Slot(SlotFsError::Corrupted {
                    path: "/dev/vdb2".into(),
                    device: "/dev/dm-0".into(),
                    source: std::io::Error::from_raw_os_error(EIO),
                })),
                M::NoDm => Err(MountError::Slot(SlotFsError::Verity {
                    path: "/dev/vdb2".into(),
                    source: nx_guest::Error::Sys {
                        what: "open /dev/mapper/control".into(),
                        source: std::io::Error::from_raw_os_error(ENOENT),
                    },
                })),
                M::EnvFault => Err(MountError::Slot(SlotFsError::Mount {
                    path: "/dev/vdb2".into(),
                    device: "/dev/loop0".into(),
                    source: std::io::Error::from_raw_os_error(ENODEV),
                })),
            }
        }
    }

    /// `ENODEV` on Linux: the file system type is unknown to the kernel (no driver).
    const ENODEV: i32 = 19;
    const EIO: i32 = 5;
    const ENOENT: i32 = 2;

    #[test]
    fn a_block_refused_by_dm_verity_is_the_slots_fault() {
        for (trial, want) in [
            (true, Outcome::Reset { recovery: false }),
            (false, Outcome::Reset { recovery: true }),
        ] {
            let mut f = Fake {
                decision: Some(decision(Slot::B, trial, 1)),
                reboot_ok: Some(true),
                ..Fake::default()
            };
            let (out, lines, _) = go(&mut f, M::Corrupted, Options::default());
            assert_eq!(out, want);
            assert!(f.calls.is_empty(), "{:?}", f.calls);
            let l = lines
                .iter()
                .find(|l| l.starts_with(&format!("init: rootfs unusable slot=b trial={trial}: ")))
                .unwrap();
            assert!(l.contains(markers::init::VERITY_REFUSED), "{l}");
            assert!(!lines.iter().any(|l| l.starts_with("init: booted")));
        }
    }

    fn decision(slot: Slot, trial: bool, tries_left: u8) -> BootDecision {
        BootDecision {
            bootable: true,
            slot,
            trial,
            tries_left,
            rolled_back: false,
            version: "2".into(),
            marked_bad: None,
        }
    }

    fn go_with(
        f: &mut Fake,
        m: M,
        booted: Option<Booted>,
        opts: Options,
    ) -> (Outcome, Vec<String>, Vec<Slot>) {
        let mut lines = Vec::new();
        let mut mnt = Mnt(m, Vec::new());
        let out = match mount_booted(&mut mnt, booted, &mut |l| lines.push(l.to_string())) {
            Ok((b, mounted)) => {
                after_mount(f, b, &mounted, opts, &mut |l| lines.push(l.to_string()))
            }
            Err(o) => o,
        };
        (out, lines, mnt.1)
    }

    fn go(f: &mut Fake, m: M, opts: Options) -> (Outcome, Vec<String>, Vec<Slot>) {
        let slot = f.decision.as_ref().map_or(Slot::A, |d| d.slot);
        let counted = f.decision.as_ref().is_some_and(|d| d.trial);
        go_with(f, m, Some(Booted { slot, counted }), opts)
    }

    #[test]
    fn healthy_trial_boot_is_confirmed() {
        let mut f = Fake {
            decision: Some(decision(Slot::B, true, 2)),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let (out, lines, mounted) = go(&mut f, M::Ok, Options::default());
        assert_eq!(
            out,
            Outcome::Up {
                slot: Slot::B,
                confirmed: true
            }
        );
        assert_eq!(mounted, [Slot::B]);
        assert_eq!(f.calls, ["bootAttempt", "confirm", "raiseFloor 2"]);
        assert!(lines.contains(&"init: booted slot=b version=2 trial=true".to_string()));
        assert!(lines.contains(&"init: confirmed slot=b".to_string()));
        // The rootfs came through dm-verity: the line names the root hash, then the time.
        let v = lines
            .iter()
            .position(|l| l == "init: rootfs verity root=abababababababab (dm-verity)")
            .unwrap();
        assert_eq!(lines[v + 1], "init: rootfs mount took 7 ms (dm-verity)");
        // The floor rises after the confirm, never before.
        let confirmed = lines.iter().position(|l| l == "init: confirmed slot=b");
        let floor = lines
            .iter()
            .position(|l| l == "init: anti-rollback floor=2 (slot=b security_version=2)");
        assert!(confirmed.is_some() && floor > confirmed, "{lines:?}");
    }

    #[test]
    fn the_floor_rises_only_for_confirmed_slots() {
        // Manual confirm of a trial: no floor.
        let mut f = Fake {
            decision: Some(decision(Slot::B, true, 2)),
            ..Fake::default()
        };
        go(
            &mut f,
            M::Ok,
            Options {
                manual_confirm: true,
            },
        );
        assert!(
            !f.calls.iter().any(|c| c.starts_with("raiseFloor")),
            "{:?}",
            f.calls
        );
        // A failed confirm: no floor.
        let mut f = Fake {
            decision: Some(decision(Slot::B, true, 2)),
            confirm_fails: true,
            ..Fake::default()
        };
        go(&mut f, M::Ok, Options::default());
        assert!(
            !f.calls.iter().any(|c| c.starts_with("raiseFloor")),
            "{:?}",
            f.calls
        );
        // An already-confirmed slot catches the floor up, even with manual confirm.
        let mut f = Fake {
            decision: Some(decision(Slot::A, false, 0)),
            ..Fake::default()
        };
        go(
            &mut f,
            M::Ok,
            Options {
                manual_confirm: true,
            },
        );
        assert_eq!(f.calls, ["bootAttempt", "raiseFloor 2"]);
        // An unusable slot: nothing.
        let mut f = Fake {
            decision: Some(decision(Slot::B, true, 2)),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        go(&mut f, M::SlotFault, Options::default());
        assert!(
            !f.calls.iter().any(|c| c.starts_with("raiseFloor")),
            "{:?}",
            f.calls
        );
    }

    #[test]
    fn manual_confirm_leaves_the_trial_running() {
        let mut f = Fake {
            decision: Some(decision(Slot::B, true, 2)),
            ..Fake::default()
        };
        let (out, _, _) = go(
            &mut f,
            M::Ok,
            Options {
                manual_confirm: true,
            },
        );
        assert_eq!(
            out,
            Outcome::Up {
                slot: Slot::B,
                confirmed: false
            }
        );
        assert_eq!(f.calls, ["bootAttempt"]);
    }

    #[test]
    fn an_unusable_trial_slot_resets_for_the_bootloader_to_count() {
        let mut f = Fake {
            decision: Some(decision(Slot::B, true, 1)),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let (out, lines, _) = go(&mut f, M::SlotFault, Options::default());
        assert_eq!(out, Outcome::Reset { recovery: false });
        assert!(
            f.calls.is_empty(),
            "no daemon runs before the rootfs: {:?}",
            f.calls
        );
        assert!(lines
            .iter()
            .any(|l| l.starts_with("init: rootfs unusable slot=b trial=true: ")));
        assert!(!lines.iter().any(|l| l.starts_with("init: booted")));
    }

    #[test]
    fn an_unusable_blessed_slot_resets_into_recovery() {
        let mut f = Fake {
            decision: Some(decision(Slot::A, false, 0)),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let (out, lines, _) = go(&mut f, M::SlotFault, Options::default());
        assert_eq!(out, Outcome::Reset { recovery: true });
        assert!(f.calls.is_empty());
        assert!(lines
            .iter()
            .any(|l| l.starts_with("init: resetting into recovery")));
    }

    #[test]
    fn no_bootable_slot_or_no_bootctld_goes_to_recovery() {
        let mut d = decision(Slot::A, false, 0);
        d.bootable = false;
        let mut f = Fake {
            decision: Some(d),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let (out, _, _) = go(&mut f, M::Ok, Options::default());
        assert_eq!(out, Outcome::Rebooting { target: "recovery" });

        let mut f = Fake {
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let (out, lines, _) = go(&mut f, M::Ok, Options::default());
        assert_eq!(out, Outcome::Rebooting { target: "recovery" });
        assert!(lines
            .iter()
            .any(|l| l.contains("bootAttempt failed (no bootctld)")));
    }

    #[test]
    fn bootctld_disagreeing_with_the_bootloader_goes_to_recovery() {
        let mut f = Fake {
            decision: Some(decision(Slot::A, false, 0)),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let b = Booted {
            slot: Slot::B,
            counted: true,
        };
        let (out, _, _) = go_with(&mut f, M::Ok, Some(b), Options::default());
        assert_eq!(out, Outcome::Rebooting { target: "recovery" });
        assert_eq!(f.calls, ["bootAttempt", "reboot recovery"]);
    }

    #[test]
    fn environment_faults_neither_confirm_nor_mark_bad() {
        for m in [M::NoPart, M::EnvFault, M::NoDm] {
            let mut f = Fake {
                decision: Some(decision(Slot::A, false, 0)),
                reboot_ok: Some(true),
                ..Fake::default()
            };
            let (out, _, _) = go(&mut f, m, Options::default());
            assert!(matches!(out, Outcome::Degraded { .. }), "{out:?}");
            assert!(f.calls.is_empty());
        }
    }

    #[test]
    fn without_a_slot_disk_or_a_bootloader_nothing_is_mounted() {
        let mut f = Fake {
            decision: Some(decision(Slot::B, true, 2)),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let (out, lines, mounted) = go(&mut f, M::NoDisk, Options::default());
        assert!(matches!(out, Outcome::Degraded { .. }), "{out:?}");
        assert!(f.calls.is_empty(), "{:?}", f.calls);
        assert!(mounted.is_empty());
        assert!(lines[0].starts_with("init: stub/placeholder: no partition system_a"));
        let (out, lines, mounted) = go_with(&mut f, M::Ok, None, Options::default());
        assert!(matches!(out, Outcome::Degraded { .. }), "{out:?}");
        assert!(mounted.is_empty());
        assert!(
            lines[0].contains("not started by the bootloader"),
            "{lines:?}"
        );
    }

    #[test]
    fn a_failed_reboot_keeps_the_guest_up() {
        let mut d = decision(Slot::B, true, 0);
        d.bootable = false;
        let mut f = Fake {
            decision: Some(d.clone()),
            reboot_ok: None,
            ..Fake::default()
        };
        let (out, _, _) = go(&mut f, M::Ok, Options::default());
        assert!(matches!(out, Outcome::Degraded { .. }));
        let mut f = Fake {
            decision: Some(d),
            reboot_ok: Some(false),
            ..Fake::default()
        };
        let (out, _, _) = go(&mut f, M::Ok, Options::default());
        assert!(matches!(out, Outcome::Degraded { .. }));
    }

    #[test]
    fn a_pending_wipe_never_boots_a_slot() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("boot")).unwrap();
        assert_eq!(wipe_pending(root), None);
        std::fs::write(root.join(nx_reset::REQUEST), nx_reset::REQUEST_CONTENT).unwrap();
        let why = wipe_pending(root).unwrap();
        assert!(why.contains("requested"), "{why}");
        std::fs::write(root.join(nx_reset::REQUEST), b"junk").unwrap();
        assert!(wipe_pending(root).unwrap().contains("invalid"));

        let mut f = Fake {
            decision: Some(decision(Slot::A, false, 0)),
            reboot_ok: Some(true),
            ..Fake::default()
        };
        let mut lines = Vec::new();
        let out = refuse_for_wipe(&mut f, "a factory wipe was requested", &mut |l| {
            lines.push(l.to_string())
        });
        assert_eq!(out, Outcome::Rebooting { target: "recovery" });
        assert_eq!(f.calls, ["reboot recovery"]);
        assert!(lines[0].starts_with("init: factory wipe pending (a factory wipe was requested)"));
        // rebootd cannot reboot: the guest stays up without a slot, never boots one.
        let mut f = Fake {
            reboot_ok: None,
            ..Fake::default()
        };
        let out = refuse_for_wipe(&mut f, "x", &mut |_| {});
        assert!(matches!(out, Outcome::Degraded { .. }), "{out:?}");
        assert_eq!(f.calls, ["reboot recovery"]);
    }

    #[test]
    fn a_failed_confirm_is_reported() {
        let mut f = Fake {
            decision: Some(decision(Slot::A, false, 0)),
            confirm_fails: true,
            ..Fake::default()
        };
        let (out, lines, _) = go(&mut f, M::Ok, Options::default());
        assert_eq!(
            out,
            Outcome::Up {
                slot: Slot::A,
                confirmed: false
            }
        );
        assert!(lines.iter().any(|l| l.contains("confirm of slot=a failed")));
    }
}
