//! Markers of init (the normal PID 1) and its A/B slot boot flow.

use super::Marker;
use std::fmt::Display;

/// `init: start`.
pub fn start() -> Marker {
    Marker::new("init: start")
}

/// `init: services ready`.
pub fn services_ready() -> Marker {
    Marker::new("init: services ready")
}

/// `init: ready`.
pub fn ready() -> Marker {
    Marker::new("init: ready")
}

/// `init: started [a, b]`.
pub fn started<S: AsRef<str>>(names: &[S]) -> Marker {
    Marker::new(format!("init: started [{}]", super::list(names)))
}

/// `init: error: cannot consume the next-boot record (<e>)`.
pub fn next_boot_consume_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "init: error: cannot consume the next-boot record ({e})"
    ))
}

/// A `recovery` next-boot record is left for the firmware.
pub fn next_boot_recovery_left() -> Marker {
    Marker::new(
        "init: next-boot record asks for recovery but the firmware booted normal; left for the next boot",
    )
}

/// `init: next-boot record unreadable (<e>); left in place`.
pub fn next_boot_unreadable(e: impl Display) -> Marker {
    Marker::new(format!(
        "init: next-boot record unreadable ({e}); left in place"
    ))
}

/// No `/state` disk.
pub fn state_stub() -> Marker {
    Marker::new(
        "init: /state stub/placeholder: no ext4 disk labelled \"state\"; running without persistent state",
    )
}

/// Fixed prefix of [`state_stub`].
pub const STATE_STUB_PREFIX: &str = "init: /state stub/placeholder";

/// `init: error: <e>; cannot talk to bootctld, no slot booted`.
pub fn no_bootctld(e: impl Display) -> Marker {
    Marker::new(format!(
        "init: error: {e}; cannot talk to bootctld, no slot booted"
    ))
}

/// `init: waiting for rebootd's reboot into <target>`.
pub fn waiting_for_reboot(target: impl Display) -> Marker {
    Marker::new(format!("init: waiting for rebootd's reboot into {target}"))
}

/// `init: degraded: <why>`.
pub fn degraded(why: impl Display) -> Marker {
    Marker::new(format!("init: degraded: {why}"))
}

/// Fixed prefix of [`degraded`].
pub const DEGRADED_PREFIX: &str = "init: degraded:";

/// A factory wipe is pending: no slot boots.
pub fn refuse_for_wipe(why: impl Display) -> Marker {
    Marker::new(format!(
        "init: factory wipe pending ({why}); not booting a slot, rebooting to recovery (recovery-init performs the wipe)"
    ))
}

/// The `why` of an `init: …` line that has no more specific constructor (stub reasons of
/// the boot flow), printed as `init: <why>`.
pub fn note(why: impl Display) -> Marker {
    Marker::new(format!("init: {why}"))
}

/// The `why` of a missing slot disk (printed with [`note`], returned as the degraded reason).
pub fn no_slot_disk_why(why: impl Display) -> String {
    format!(
        "stub/placeholder: {why}; no slot disk attached? running without a rootfs; no bootAttempt (no trial try spent), nothing confirmed or marked bad"
    )
}

/// The `why` of a slot without its partition (printed with [`note`]).
pub fn no_partition_why(why: impl Display, slot: impl Display) -> String {
    format!(
        "stub/placeholder: {why}; no slot disk attached? running without a rootfs, slot {slot} neither confirmed nor marked bad"
    )
}

/// Fixed prefix of the missing-partition stub line (`init: stub/placeholder: no partition system_<s>…`).
pub const NO_PARTITION_PREFIX: &str = "init: stub/placeholder: no partition system_";

/// `init: error: <why>`.
pub fn error(why: impl Display) -> Marker {
    Marker::new(format!("init: error: {why}"))
}

/// Fixed prefix of every [`error`] line.
pub const ERROR_PREFIX: &str = "init: error";

/// bootAttempt failed.
pub fn boot_attempt_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "init: error: bootAttempt failed ({e}); cannot choose a slot, rebooting to recovery"
    ))
}

/// Neither slot can boot.
pub fn no_bootable_slot() -> Marker {
    Marker::new("init: no bootable slot (both bad or empty); rebooting to recovery")
}

/// `init: bootAttempt slot=<s> trial=<t> tries_left=<n>[ (rolled back)]`.
pub fn boot_attempt(
    slot: impl Display,
    trial: bool,
    tries_left: impl Display,
    rolled_back: bool,
) -> Marker {
    Marker::new(format!(
        "init: bootAttempt slot={slot} trial={trial} tries_left={tries_left}{}",
        if rolled_back { " (rolled back)" } else { "" }
    ))
}

/// The `why` of a slot check that failed through no fault of the slot (printed with [`error`]).
pub fn check_failed_why(slot: impl Display, e: impl Display) -> String {
    format!(
        "cannot check slot={slot} ({e}); not the slot's fault: not confirming, not marking it bad"
    )
}

/// `init: rootfs unusable slot=<s> trial=<t>: <e>`.
pub fn rootfs_unusable(slot: impl Display, trial: bool, e: impl Display) -> Marker {
    Marker::new(format!("{}: {e}", rootfs_unusable_of(slot, trial)))
}

/// The fixed part of [`rootfs_unusable`] for one slot: `init: rootfs unusable slot=<s> trial=<t>`.
pub fn rootfs_unusable_of(slot: impl Display, trial: bool) -> Marker {
    Marker::new(format!("init: rootfs unusable slot={slot} trial={trial}"))
}

/// How the slot library's error starts when dm-verity refuses a block of the rootfs (the `e` of
/// [`rootfs_unusable`]; tests look for it).
pub const VERITY_REFUSED: &str = "dm-verity refused to read the rootfs";

/// Fixed prefix of [`rootfs_unusable`].
pub const ROOTFS_UNUSABLE_PREFIX: &str = "init: rootfs unusable";

/// `init: booted slot=<s> version=<v> trial=<t>`.
pub fn booted(slot: impl Display, version: impl Display, trial: bool) -> Marker {
    Marker::new(format!(
        "init: booted slot={slot} version={version} trial={trial}"
    ))
}

/// `init: rootfs verity root=<first 16 hex digits of the root hash> (dm-verity)`: the rootfs is
/// mounted through dm-verity, every block is checked when read.
pub fn rootfs_verity(root_prefix: impl Display) -> Marker {
    Marker::new(format!(
        "init: rootfs verity root={root_prefix} (dm-verity)"
    ))
}

/// Fixed prefix of [`rootfs_verity`].
pub const ROOTFS_VERITY_PREFIX: &str = "init: rootfs verity root=";

/// The manifest has no verity entry for the rootfs: it was hashed whole before the mount.
pub fn rootfs_hashed(bytes: impl Display) -> Marker {
    Marker::new(format!(
        "init: rootfs hashed whole ({bytes} bytes; the manifest has no verity entry)"
    ))
}

/// `init: rootfs mount took <ms> ms (<how>)`: from opening the slot partition to the mounted
/// rootfs (head, checks, devices, mount).
pub fn rootfs_mount_took(ms: impl Display, how: impl Display) -> Marker {
    Marker::new(format!("init: rootfs mount took {ms} ms ({how})"))
}

/// Fixed prefix of [`rootfs_mount_took`].
pub const ROOTFS_MOUNT_TOOK_PREFIX: &str = "init: rootfs mount took ";

/// Fixed prefix of [`booted`].
pub const BOOTED_PREFIX: &str = "init: booted slot=";

/// bootctld's recorded version differs from the image's.
pub fn version_note(recorded: impl Display, slot: impl Display, image: impl Display) -> Marker {
    Marker::new(format!(
        "init: note: bootctld records version {recorded} for slot {slot}, the image says {image}"
    ))
}

/// `init: health ok slot=<s> (rootfs <n> bytes on <dev> at <dir>, os-release VERSION=<v>)`.
pub fn health_ok(
    slot: impl Display,
    rootfs_bytes: impl Display,
    loop_dev: impl Display,
    mountpoint: impl Display,
    version: impl Display,
) -> Marker {
    Marker::new(format!(
        "init: health ok slot={slot} (rootfs {rootfs_bytes} bytes on {loop_dev} at {mountpoint}, os-release VERSION={version})"
    ))
}

/// `nexus.confirm=manual`: not confirmed.
pub fn manual_confirm(slot: impl Display) -> Marker {
    Marker::new(format!(
        "init: slot={slot} not confirmed: nexus.confirm=manual (the selftest client or `nx boot confirm` confirms it)"
    ))
}

/// `init: confirmed slot=<s>`.
pub fn confirmed(slot: impl Display) -> Marker {
    Marker::new(format!("init: confirmed slot={slot}"))
}

/// The anti-rollback floor after a confirmed slot: `init: anti-rollback floor=<n> (slot=<s>
/// security_version=<v>)`.
pub fn floor(floor: u64, slot: impl Display, security_version: u64) -> Marker {
    Marker::new(format!(
        "init: anti-rollback floor={floor} (slot={slot} security_version={security_version})"
    ))
}

/// Fixed prefix of [`floor`].
pub const FLOOR_PREFIX: &str = "init: anti-rollback floor=";

/// The floor could not be raised (the next confirmed boot tries again).
pub fn floor_failed(e: impl Display) -> Marker {
    Marker::new(format!(
        "init: error: cannot raise the anti-rollback floor ({e}); the next boot of a confirmed slot retries"
    ))
}

/// Fixed prefix of [`confirmed`].
pub const CONFIRMED_PREFIX: &str = "init: confirmed slot=";

/// confirm() failed.
pub fn confirm_failed(slot: impl Display, e: impl Display) -> Marker {
    Marker::new(format!(
        "init: error: confirm of slot={slot} failed ({e}); it stays unconfirmed"
    ))
}

/// A trial slot failed: the next trial boot follows.
pub fn next_trial(slot: impl Display, tries_left: impl Display) -> Marker {
    Marker::new(format!(
        "init: not confirming slot={slot}; rebooting into the next trial boot ({tries_left} tries left, then rollback)"
    ))
}

/// A confirmed slot's rootfs is unusable.
pub fn marking_bad(slot: impl Display) -> Marker {
    Marker::new(format!(
        "init: slot={slot} is not in trial and its rootfs is unusable: marking it bad"
    ))
}

/// markBad failed.
pub fn mark_bad_failed(slot: impl Display, e: impl Display) -> Marker {
    Marker::new(format!("init: error: markBad slot={slot} failed ({e})"))
}

/// Rollback reboot.
pub fn rebooting_rollback() -> Marker {
    Marker::new("init: rebooting (rollback to the other slot if it is good, else recovery)")
}

/// `init: reboot to <target> requested`.
pub fn reboot_requested(target: impl Display) -> Marker {
    Marker::new(format!("init: reboot to {target} requested"))
}

/// Fixed prefix of every init reboot line.
pub const REBOOT_PREFIX: &str = "init: reboot";

/// The `why` of a stub rebootd (printed with [`error`]).
pub fn reboot_stub_why(target: impl Display) -> String {
    format!("rebootd recorded next boot = {target} but cannot reboot here (stub); staying up")
}

/// The `why` of a failed reboot request (printed with [`error`]).
pub fn reboot_failed_why(target: impl Display, e: impl Display) -> String {
    format!("reboot to {target} failed ({e}); staying up")
}

/// Sample of every constructor (for the contract's tests).
/// `init: initramfs version=<v>`: the version stamp of the initramfs that booted.
pub fn initramfs_version(version: impl Display) -> Marker {
    Marker::new(format!("init: initramfs version={version}"))
}

/// `init: motd: <first line of the slot's /etc/motd>`: what the booted version says.
pub fn motd(text: impl Display) -> Marker {
    Marker::new(format!("init: motd: {text}"))
}

/// Fixed prefix of [`motd`].
pub const MOTD_PREFIX: &str = "init: motd: ";

/// Why no slot is mounted when the kernel was not started by our bootloader.
pub fn not_from_bootloader_why() -> String {
    "stub/placeholder: not started by the bootloader (no nexus.slot= on the command line); no slot is mounted".to_string()
}

/// `init: the bootloader booted slot=<s> (tries counted: <c>)`.
pub fn loader_slot(slot: impl Display, counted: bool) -> Marker {
    Marker::new(format!(
        "init: the bootloader booted slot={slot} (tries counted: {counted})"
    ))
}

/// The trial slot's rootfs is unusable: reset at once, the bootloader spends the next try.
pub fn reset_for_next_try(slot: impl Display) -> Marker {
    Marker::new(format!(
        "init: not confirming slot={slot}; resetting: the bootloader counts the try and falls back to the other slot when none are left"
    ))
}

/// A slot without boot counting is unusable: reset into recovery (one-shot entry).
pub fn reset_to_recovery(why: impl Display) -> Marker {
    Marker::new(format!(
        "init: resetting into recovery (one-shot boot entry): {why}"
    ))
}

/// The one-shot entry for recovery could not be set before the reset.
pub fn oneshot_failed(e: impl Display) -> Marker {
    Marker::new(format!("init: error: one-shot boot entry not set: {e}"))
}

pub fn samples() -> Vec<Marker> {
    vec![
        note(not_from_bootloader_why()),
        motd("nexus 2"),
        initramfs_version("2"),
        loader_slot("b", true),
        loader_slot("a", false),
        reset_for_next_try("b"),
        reset_to_recovery("why"),
        oneshot_failed("e"),
        start(),
        services_ready(),
        ready(),
        started(&["rebootd", "bootctld"]),
        next_boot_consume_failed("e"),
        next_boot_recovery_left(),
        next_boot_unreadable("e"),
        state_stub(),
        no_bootctld("e"),
        waiting_for_reboot("recovery"),
        degraded("why"),
        refuse_for_wipe("why"),
        note(no_slot_disk_why("no disk")),
        note(no_partition_why("no partition system_a", "a")),
        error(check_failed_why("a", "e")),
        boot_attempt_failed("e"),
        no_bootable_slot(),
        boot_attempt("a", false, 0, false),
        rootfs_unusable("a", true, "e"),
        booted("a", "1", false),
        rootfs_verity("0123456789abcdef"),
        rootfs_unusable("a", false, format_args!("{VERITY_REFUSED} of /dev/vda1")),
        rootfs_hashed(4096),
        rootfs_mount_took(12, "dm-verity"),
        booted("b", "2", true),
        booted("b", "2", false),
        confirmed("b"),
        rootfs_unusable("b", true, "e"),
        rootfs_unusable("b", true, format_args!("{VERITY_REFUSED} of /dev/vda2")),
        rootfs_unusable_of("b", true),
        reboot_requested("recovery"),
        refuse_for_wipe("a factory wipe was requested"),
        version_note("1", "a", "2"),
        health_ok("a", 1, "/dev/loop0", "/sysroot", "1"),
        manual_confirm("a"),
        confirmed("a"),
        confirm_failed("a", "e"),
        floor(2, "b", 2),
        floor_failed("e"),
        next_trial("a", 1),
        marking_bad("a"),
        mark_bad_failed("a", "e"),
        rebooting_rollback(),
        reboot_requested("normal"),
        error(reboot_stub_why("normal")),
        error(reboot_failed_why("normal", "e")),
    ]
}
